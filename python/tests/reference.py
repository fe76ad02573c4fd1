"""float64 reference attention with every variant, and the FlashAttention-style pass rule."""

import math

import torch


def visibility(nq, nk, causal=False, window_size=(-1, -1), device="cpu"):
    """Bool (nq, nk): key j visible to query i iff i + diag - left <= j <= i + diag + right (diag = nk - nq)."""
    left, right = window_size
    if causal:
        right = 0
    i = torch.arange(nq, device=device)[:, None]
    j = torch.arange(nk, device=device)[None, :]
    diag = nk - nq
    vis = torch.ones(nq, nk, dtype=torch.bool, device=device)
    if left >= 0:
        vis &= j >= i + diag - left
    if right >= 0:
        vis &= j <= i + diag + right
    return vis


def naive_attention(q, k, v, causal=False, scale=None, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                    dropout_p=0.0, keep=None):
    """The op's semantics in the inputs' dtype: logits = cap(scale q.k) - slope |i + diag - j|, visibility as
    above, P multiplied by keep / (1 - p) after the softmax (keep: bool (B, Hq, Nq, Nk)). GQA by repeating k/v."""
    b, hq, nq, d = q.shape
    nk = k.shape[2]
    group = hq // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        slopes = alibi_slopes if alibi_slopes.dim() == 2 else alibi_slopes[None].expand(b, hq)
        i = torch.arange(nq, device=q.device)[:, None]
        j = torch.arange(nk, device=q.device)[None, :]
        dist = (i + (nk - nq) - j).abs().to(s.dtype)
        s = s - slopes.to(s.dtype)[:, :, None, None] * dist
    s = s.masked_fill(~visibility(nq, nk, causal, window_size, q.device), float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    if keep is not None and dropout_p > 0:
        p = p * keep.to(p.dtype) / (1.0 - dropout_p)
    return p @ v, lse


def random_qkv(b, hq, hkv, nq, nk, d, dtype, device, transposed=False, requires_grad=False):
    def make(h, n):
        if transposed:
            t = torch.randn(b, n, h, d, dtype=dtype, device=device).transpose(1, 2)
        else:
            t = torch.randn(b, h, n, d, dtype=dtype, device=device)
        return t.requires_grad_(requires_grad)

    return make(hq, nq), make(hkv, nk), make(hkv, nk)


def assert_close_to_reference(name, ours, torch_same_dtype, reference, factor=2.0):
    """Error vs float64 within `factor` x PyTorch's own error in the same dtype, plus a small floor."""
    assert ours.shape == reference.shape, f"{name}: shape {tuple(ours.shape)} vs {tuple(reference.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    ours_err = (ours.double().cpu() - reference.double().cpu()).abs().max().item() if ours.numel() else 0.0
    torch_err = (torch_same_dtype.double().cpu() - reference.double().cpu()).abs().max().item() if ours.numel() else 0.0
    floor = {torch.float64: 1e-12, torch.float32: 1e-5}.get(ours.dtype, 1e-3)
    assert ours_err <= factor * torch_err + floor, (
        f"{name}: max error vs float64 {ours_err:.3e}, PyTorch's own in {ours.dtype}: {torch_err:.3e}"
    )
