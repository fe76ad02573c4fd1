"""The flash-attn package's Python API over flash_attn2's ops, so code written for FlashAttention-2 runs by
changing one import:

    from flash_attn2.compat import flash_attn_func, flash_attn_varlen_func

Layouts are flash-attn's: q, k, v (B, N, H, D); qkv (B, N, 3, H, D); kv (B, N, 2, H, D); packed batches
(T, H, D) with int32 cu_seqlens. They reach the ops as strided views (no copies); outputs come back as
(B, N, H, D) / (T, H, D) views of the ops' results. Semantics are flash-attn's (bottom-right causal, windows,
softcap, ALiBi, dropout, deterministic backward). ``return_attn_probs=True`` returns (out, softmax_lse, None):
the log-sum-exp as flash-attn returns it, but not the attention-probability matrix (flash-attn documents it as a
testing aid; the kernels never materialise it). ``flash_attn_with_kvcache`` runs on ``fwd_kvcache`` (dense and
paged caches, in-place append, split-KV); its rotary, ``cache_batch_idx`` and ``cache_leftpad`` arguments are not
supported and raise a clear error, as does ``block_table`` on the varlen functions.
"""

from __future__ import annotations

import torch

import flash_attn2  # noqa: F401  (loads the operator library)

__all__ = [
    "flash_attn_func",
    "flash_attn_varlen_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_with_kvcache",
]


def _rng(dropout_p, device):
    return torch.ops.flash_attn2.draw_rng_state(device) if dropout_p > 0 else None


class _Attention(torch.autograd.Function):
    """fwd_with_lse / bwd with the per-call `deterministic` flag of flash-attn's API."""

    @staticmethod
    def forward(ctx, q, k, v, varlen, causal, scale, window, softcap, alibi, dropout_p, deterministic):
        rng = _rng(dropout_p, q.device)
        kw = dict(window_size=list(window), softcap=softcap, alibi_slopes=alibi, dropout_p=dropout_p, rng_state=rng)
        if varlen is None:
            out, lse = torch.ops.flash_attn2.fwd_with_lse(q, k, v, causal, scale, **kw)
        else:
            out, lse = torch.ops.flash_attn2.fwd_varlen_with_lse(q, k, v, *varlen, causal, scale, **kw)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (varlen, causal, scale, kw, deterministic)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        varlen, causal, scale, kw, deterministic = ctx.args
        det = deterministic or torch.are_deterministic_algorithms_enabled()
        if varlen is None:
            dq, dk, dv = torch.ops.flash_attn2.bwd(dout, q, k, v, out, lse, causal, scale, **kw, deterministic=det)
        else:
            dq, dk, dv = torch.ops.flash_attn2.bwd_varlen(dout, q, k, v, out, lse, *varlen, causal, scale, **kw,
                                                          deterministic=det)
        return dq, dk, dv, None, None, None, None, None, None, None, None


def _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
           return_attn_probs):
    for n, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"flash_attn2.compat: {n} must be (batch, seqlen, nheads, headdim), got shape "
                             f"{tuple(t.shape)}")
    # (B, N, H, D) -> (B, H, N, D) views: the ops take any strides.
    out, lse = _Attention.apply(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, causal, softmax_scale,
                                tuple(window_size), softcap, alibi_slopes, dropout_p, deterministic)
    out = out.transpose(1, 2)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (B, Nq, Hq, D), k and v (B, Nk, Hkv, D) -> out (B, Nq, Hq, D) [, softmax_lse (B, Hq, Nq), None]."""
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                  return_attn_probs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """qkv (B, N, 3, H, D)."""
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"flash_attn2.compat: qkv must be (batch, seqlen, 3, nheads, headdim), got {tuple(qkv.shape)}")
    return _dense(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal, window_size, softcap,
                  alibi_slopes, deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (B, Nq, Hq, D), kv (B, Nk, 2, Hkv, D)."""
    if kv.dim() != 5 or kv.shape[2] != 2:
        raise ValueError(f"flash_attn2.compat: kv must be (batch, seqlen, 2, nheads_k, headdim), got {tuple(kv.shape)}")
    return _dense(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                  deterministic, return_attn_probs)


def _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
            window_size, softcap, alibi_slopes, deterministic, return_attn_probs, block_table=None):
    if block_table is not None:
        raise NotImplementedError("flash_attn2.compat: block_table on flash_attn_varlen_func (paged K/V for packed "
                                  "batches) is not supported; use flash_attn_with_kvcache for paged caches")
    varlen = (cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k))
    out, lse = _Attention.apply(q, k, v, varlen, causal, softmax_scale, tuple(window_size), softcap, alibi_slopes,
                                dropout_p, deterministic)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """q (Tq, Hq, D), k and v (Tk, Hkv, D), int32 cu_seqlens (B + 1,) -> out (Tq, Hq, D) [, lse (Hq, Tq), None]."""
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                   causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs, block_table)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """qkv (T, 3, H, D)."""
    if qkv.dim() != 4 or qkv.shape[1] != 3:
        raise ValueError(f"flash_attn2.compat: qkv must be (total, 3, nheads, headdim), got {tuple(qkv.shape)}")
    return _varlen(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p,
                   softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (Tq, Hq, D), kv (Tk, 2, Hkv, D)."""
    if kv.dim() != 4 or kv.shape[1] != 2:
        raise ValueError(f"flash_attn2.compat: kv must be (total_k, 2, nheads_k, headdim), got {tuple(kv.shape)}")
    return _varlen(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                   softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """q (B, Nq, Hq, D); k_cache / v_cache (B, capacity, Hkv, D), or (num_blocks, page_size, Hkv, D) with
    block_table (B, max_blocks) int32; k / v (B, Nnew, Hkv, D) appended in place at cache_seqlens (an int or (B,)
    int32). Returns out (B, Nq, Hq, D) [, softmax_lse (B, Hq, Nq)]. Inference only."""
    for name, value in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin), ("cache_batch_idx", cache_batch_idx),
                        ("cache_leftpad", cache_leftpad)):
        if value is not None:
            raise NotImplementedError(f"flash_attn2.compat.flash_attn_with_kvcache: {name} is not supported; apply "
                                      "rotary embeddings / index the cache before the call")
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((q.shape[0],), cache_seqlens, dtype=torch.int32, device=q.device)
    paged = block_table is not None
    kc = k_cache if paged else k_cache.transpose(1, 2)
    vc = v_cache if paged else v_cache.transpose(1, 2)
    out, lse = torch.ops.flash_attn2.fwd_kvcache(
        q.transpose(1, 2), kc, vc, None if k is None else k.transpose(1, 2), None if v is None else v.transpose(1, 2),
        cache_seqlens, block_table, causal, softmax_scale, window_size=list(window_size), softcap=softcap,
        alibi_slopes=alibi_slopes, num_splits=num_splits)
    out = out.transpose(1, 2)
    return (out, lse) if return_softmax_lse else out
