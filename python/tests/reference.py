"""float64 reference attention and the FlashAttention-style pass rule."""

import math

import torch


def naive_attention(q, k, v, causal=False, scale=None):
    """softmax(q k^T * scale) v in the inputs' dtype, bottom-right causal, GQA by repeating k/v heads."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    if causal:
        nq, nk = q.shape[2], k.shape[2]
        i = torch.arange(nq, device=q.device)[:, None]
        j = torch.arange(nk, device=q.device)[None, :]
        s = s.masked_fill(j > i + (nk - nq), float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
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
