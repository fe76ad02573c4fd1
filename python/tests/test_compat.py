"""flash_attn2.compat: flash-attn's API (layouts, defaults, options) over the ops, against the reference."""

import itertools

import pytest
import torch

import flash_attn2
from flash_attn2 import compat
from reference import naive_attention


def bnhd(b, n, h, d, dtype=torch.float64, grad=True):
    return torch.randn(b, n, h, d, dtype=dtype, requires_grad=grad)


@pytest.mark.parametrize("causal,window,softcap,alibi", [(False, (-1, -1), 0.0, False), (True, (5, 0), 2.0, True),
                                                          (False, (3, 7), 0.0, True)])
def test_flash_attn_func_matches_reference_in_flash_attn_layout(causal, window, softcap, alibi):
    q, k, v = bnhd(2, 13, 4, 16), bnhd(2, 17, 2, 16), bnhd(2, 17, 2, 16)
    slopes = torch.rand(4, dtype=torch.float32) if alibi else None
    out = compat.flash_attn_func(q, k, v, softmax_scale=0.3, causal=causal, window_size=window, softcap=softcap,
                                 alibi_slopes=slopes)
    assert out.shape == (2, 13, 4, 16)
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    ref, _ = naive_attention(t(q), t(k), t(v), causal, 0.3, window, softcap, slopes)
    torch.testing.assert_close(out, t(ref))
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(t(ref), (q, k, v), dout)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_packed_forms_equal_the_unpacked_one():
    qkv = torch.randn(2, 9, 3, 4, 8, dtype=torch.float64)
    expected = compat.flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True)
    torch.testing.assert_close(compat.flash_attn_qkvpacked_func(qkv, causal=True), expected, rtol=0, atol=0)
    torch.testing.assert_close(compat.flash_attn_kvpacked_func(qkv[:, :, 0], qkv[:, :, 1:], causal=True), expected,
                               rtol=0, atol=0)


def test_varlen_forms_and_lse():
    lengths = [3, 0, 11]
    cu = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32)
    qkv = torch.randn(14, 3, 4, 8, dtype=torch.float64)
    out, lse, probs = compat.flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu, 11, 11, causal=True,
                                                    return_attn_probs=True)
    assert probs is None and lse.shape == (4, 14)
    ours, ours_lse = flash_attn2.attention_varlen_with_lse(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu, 11, 11, True)
    torch.testing.assert_close(out, ours, rtol=0, atol=0)
    torch.testing.assert_close(lse, ours_lse, rtol=0, atol=0)
    torch.testing.assert_close(compat.flash_attn_varlen_qkvpacked_func(qkv, cu, 11, causal=True), out, rtol=0, atol=0)
    torch.testing.assert_close(compat.flash_attn_varlen_kvpacked_func(qkv[:, 0], qkv[:, 1:], cu, cu, 11, 11,
                                                                      causal=True), out, rtol=0, atol=0)


def test_dropout_and_deterministic_flags():
    q, k, v = bnhd(1, 8, 2, 8), bnhd(1, 8, 2, 8), bnhd(1, 8, 2, 8)

    def f(q, k, v):  # the same drawn state on every call: gradcheck proves backward reuses the forward's mask
        torch.manual_seed(0)
        return compat.flash_attn_func(q, k, v, dropout_p=0.3, causal=True, deterministic=True)

    assert torch.autograd.gradcheck(f, (q, k, v))
    torch.manual_seed(1)
    a = compat.flash_attn_func(q, k, v, dropout_p=0.3)
    assert not torch.equal(a, compat.flash_attn_func(q, k, v, dropout_p=0.3))


@pytest.mark.parametrize("paged", [False, True])
def test_flash_attn_with_kvcache_in_flash_attn_layout(paged):
    """flash-attn layouts: q (B, Nq, H, D), caches (B, cap, Hkv, D) or (blocks, page, Hkv, D), k/v appended in place,
    cache_seqlens as an int or a tensor."""
    torch.manual_seed(3)
    b, hq, hkv, d, cap = 2, 4, 2, 8, 32
    q = bnhd(b, 1, hq, d, grad=False)
    k, v = bnhd(b, 2, hkv, d, grad=False), bnhd(b, 2, hkv, d, grad=False)
    if paged:
        kc, vc = torch.randn(5, 16, hkv, d, dtype=torch.float64), torch.randn(5, 16, hkv, d, dtype=torch.float64)
        table = torch.tensor([[4, 1], [0, 3]], dtype=torch.int32)
        logical = lambda c: c[table.long().flatten()].view(b, cap, hkv, d)  # noqa: E731
    else:
        kc, vc = bnhd(b, cap, hkv, d, grad=False), bnhd(b, cap, hkv, d, grad=False)
        table = None
        logical = lambda c: c  # noqa: E731
    out, lse = compat.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=7, block_table=table, causal=True,
                                              return_softmax_lse=True)
    assert out.shape == (b, 1, hq, d) and lse.shape == (b, hq, 1)
    lk, lv = logical(kc), logical(vc)
    assert torch.equal(lk[:, 7:9], k) and torch.equal(lv[:, 7:9], v), "k / v appended at cache_seqlens"
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    ref, ref_lse = naive_attention(t(q), t(lk[:, :9]), t(lv[:, :9]), causal=True)
    torch.testing.assert_close(out, t(ref))
    torch.testing.assert_close(lse, ref_lse)


def test_what_cannot_be_honoured_raises():
    q = bnhd(1, 4, 2, 8, grad=False)
    with pytest.raises(NotImplementedError, match="rotary_cos is not supported"):
        compat.flash_attn_with_kvcache(q, q, q, rotary_cos=q)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="block_table"):
        compat.flash_attn_varlen_func(q[0], q[0], q[0], cu, cu, 4, 4, block_table=torch.zeros(1, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"q must be \(batch, seqlen, nheads, headdim\)"):
        compat.flash_attn_func(q[0], q, q)
    with pytest.raises(ValueError, match=r"qkv must be \(batch, seqlen, 3, nheads, headdim\)"):
        compat.flash_attn_qkvpacked_func(q)
