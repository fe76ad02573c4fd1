"""Context parallelism: attention over a sequence sharded across the ranks of a torch.distributed group.

    out = flash_attn2.distributed.ring_attention(q, k, v, causal=True, group=group, layout="zigzag")

q is this rank's (B, Hq, N_local, D) shard, k and v its (B, Hkv, N_local, D) shards of a sequence of length
N_local * world_size; the result is this rank's shard of attention over the whole sequence, differentiable.

Layouts (``shard``/``unshard`` convert full tensors):
  "contiguous": rank r holds chunk r of W equal chunks.
  "zigzag":     the sequence is cut into 2W chunks and rank r holds chunks r and 2W - 1 - r, so causal work is
                the same on every rank (N_local must be even).

Methods:
  "ring" (default): K/V blocks travel around the ring; each step runs flash_attn2's fwd_with_lse on the block in
      hand while the next one is already in flight (batch_isend_irecv), and merges the partial outputs with the
      log-sum-exp rule in float32. The backward sends K/V around again with the dK/dV accumulators of the block
      travelling beside it, and runs flash_attn2's bwd with the global LSE. Communication per rank: W - 1 K/V
      blocks forward, W - 1 K/V blocks plus W dK/dV blocks backward; memory: two K/V blocks.
  "allgather": K/V are gathered once (all_gather) and each local query chunk attends to the prefix it sees;
      dK/dV are summed across ranks (all_reduce) and each rank keeps its shard. Cheaper when K/V are small next to
      Q (GQA with few K/V heads: the K/V bytes are Hkv/Hq of the query bytes) and W is small; it holds the whole
      sequence's K/V on every rank, so the ring is the choice for long sequences.

Causal masks follow the global positions: a K/V chunk before the query chunk is attended in full, the chunk
itself causally, a later one not at all (skipped, no kernel launch). Sliding windows (``window_size``, global
positions, FlashAttention's semantics) do the same per pair of chunks: the kernel call covers the tight box of
query rows and keys that see each other, with the local window that reproduces the global one on it (the box's
bottom-right corner always lies on the window's band, so one call is exact), and pairs with nothing visible are
skipped. softcap passes through; ALiBi and dropout are not supported here (both depend on positions the
per-chunk kernel calls do not know).
Works with gloo (CPU tensors, CPU kernel) and NCCL (CUDA tensors). No Python loops over heads or batches.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

__all__ = ["ring_attention", "shard", "unshard"]

_LAYOUTS = ("contiguous", "zigzag")
_METHODS = ("ring", "allgather")


def _world_rank(group):
    return dist.get_world_size(group), dist.get_rank(group)


def _check_layout(layout, n_local=None):
    if layout not in _LAYOUTS:
        raise ValueError(f"flash_attn2.distributed: layout must be one of {_LAYOUTS}, got {layout!r}")
    if layout == "zigzag" and n_local is not None and n_local % 2:
        raise ValueError(f"flash_attn2.distributed: the zigzag layout needs an even local length, got {n_local}")


def shard(x: torch.Tensor, group=None, layout: str = "zigzag", dim: int = 2) -> torch.Tensor:
    """This rank's shard (along ``dim``) of a full tensor that every rank holds."""
    _check_layout(layout)
    world, rank = _world_rank(group)
    parts = 2 * world if layout == "zigzag" else world
    if x.shape[dim] % parts:
        raise ValueError(f"flash_attn2.distributed.shard: dim {dim} has length {x.shape[dim]}, not a multiple of "
                         f"{parts} ({layout} layout over {world} ranks)")
    chunks = x.chunk(parts, dim)
    if layout == "contiguous":
        return chunks[rank].contiguous()
    return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]], dim)


def _from_rank_order(pieces: List[torch.Tensor], layout: str, dim: int) -> torch.Tensor:
    """The full tensor from every rank's shard (in rank order)."""
    if layout == "contiguous":
        return torch.cat(pieces, dim)
    halves = [p.chunk(2, dim) for p in pieces]
    return torch.cat([h[0] for h in halves] + [h[1] for h in reversed(halves)], dim)


def unshard(x: torch.Tensor, group=None, layout: str = "zigzag", dim: int = 2) -> torch.Tensor:
    """The full tensor from every rank's shard (all_gather; every rank gets it)."""
    _check_layout(layout)
    world, _ = _world_rank(group)
    pieces = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(pieces, x.contiguous(), group=group)
    return _from_rank_order(pieces, layout, dim)


# ---------------------------------------------------------------------------------------------------------
# Which (query rows, key rows, local window) kernel calls a step needs: the chunk pairs of the layout, with the
# global mask reduced per pair to "all", "causal", "skip" or (windows) a box with its local window.

_ALL = slice(None)


_FULL, _CAUSAL = (-1, -1), (-1, 0)


def _ring_step_calls(layout, window, rank, src, world, n_local):
    """(query rows, key rows, local window) calls for this rank's queries against the K/V shard of rank `src`.
    Full and causal attention use the fewest calls the layout allows; other windows go pair by pair."""
    if window == _FULL:
        return [(_ALL, _ALL, _FULL)]
    if window != _CAUSAL:
        return _window_calls(_chunks(layout, rank, world, n_local), _chunks(layout, src, world, n_local), *window)
    if src == rank:  # the local shard is in global order: plain causal attention on it
        return [(_ALL, _ALL, _CAUSAL)]
    if layout == "contiguous":
        return [(_ALL, _ALL, _FULL)] if src < rank else []
    half = n_local // 2
    if src < rank:  # both query chunks see the first K/V chunk (src) in full, neither sees 2W - 1 - src
        return [(_ALL, slice(0, half), _FULL)]
    return [(slice(half, None), _ALL, _FULL)]  # only the late query chunk sees both K/V chunks, in full


def _chunks(layout, rank, world, n_local):
    """(global offset, local slice) of the chunks rank `rank` holds."""
    if layout == "contiguous":
        return [(rank * n_local, slice(0, n_local))]
    half = n_local // 2
    return [(rank * half, slice(0, half)), ((2 * world - 1 - rank) * half, slice(half, n_local))]


def _box(qo, nq, ko, nk, left, right):
    """Queries [qo, qo + nq) against keys [ko, ko + nk) under the global window (left, right) (-1: unbounded): the
    tight box (rows, keys) of the pairs that see each other, as local index ranges, and the window that reproduces
    the global one on that box with the op's bottom-right alignment; None when no pair is visible.
    Query i sees keys j in [i + d - left, i + d + right], d = qo - ko; the op sees local j' = j - s0 in
    [i' + diag - left', i' + diag + right'] with diag = (s1 - s0) - (r1 - r0); equal when left' = left + t and
    right' = right - t, t = s1 - r1 - d, both >= 0 because the box's corner (r1 - 1, s1 - 1) is a visible pair."""
    d = qo - ko
    r0 = max(0, -d - right) if right >= 0 else 0
    r1 = min(nq, nk - d + left) if left >= 0 else nq
    if r0 >= r1 or nk == 0:
        return None
    s0 = max(0, r0 + d - left) if left >= 0 else 0
    s1 = min(nk, r1 + d + right) if right >= 0 else nk
    if s0 >= s1:
        return None
    t = s1 - r1 - d
    return (r0, r1), (s0, s1), (left + t if left >= 0 else -1, right - t if right >= 0 else -1)


def _window_calls(q_chunks, k_chunks, left, right):
    """(query rows, key rows, local window) calls for every pair of chunks that has a visible pair."""
    calls = []
    for qo, qs in q_chunks:
        for ko, ks in k_chunks:
            box = _box(qo, qs.stop - qs.start, ko, ks.stop - ks.start, left, right)
            if box is not None:
                (r0, r1), (s0, s1), window = box
                calls.append((slice(qs.start + r0, qs.start + r1), slice(ks.start + s0, ks.start + s1), window))
    return calls


def _merge(acc_out, acc_lse, rows, out, lse):
    """acc (float32/64) <- log-sum-exp combination of acc[rows] and a partial (out, lse)."""
    a_lse = acc_lse[..., rows]
    m = torch.maximum(a_lse, lse)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)  # rows that have seen nothing yet
    wa, wb = torch.exp(a_lse - m), torch.exp(lse - m)
    total = wa + wb
    acc_out[..., rows, :] = (acc_out[..., rows, :] * wa[..., None] + out.to(acc_out.dtype) * wb[..., None]) / \
        torch.where(total > 0, total, torch.ones_like(total))[..., None]
    acc_lse[..., rows] = m + torch.log(total)


class _RingExchange:
    """Sends tensors to the next rank of the ring and receives as many from the previous one, non-blocking."""

    def __init__(self, group):
        self.group = group
        world, rank = _world_rank(group)
        self.next = dist.get_global_rank(group, (rank + 1) % world) if group is not None else (rank + 1) % world
        self.prev = dist.get_global_rank(group, (rank - 1) % world) if group is not None else (rank - 1) % world

    def start(self, tensors):
        received = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, r, self.prev, self.group) for r in received]
        return received, dist.batch_isend_irecv(ops)

    @staticmethod
    def finish(works):
        for w in works:
            w.wait()


def _ring_blocks(k, v, group):
    """Yields (source rank, K block, V block) for each of the W ring steps, starting with this rank's own block;
    the next block is already in flight while the caller works on the current one (and waited for when the
    caller asks for it)."""
    world, rank = _world_rank(group)
    ring = _RingExchange(group)
    k_cur, v_cur = k.contiguous(), v.contiguous()
    for step in range(world):
        pending = ring.start([k_cur, v_cur]) if step + 1 < world else None
        yield (rank - step) % world, k_cur, v_cur
        if pending is not None:
            (k_cur, v_cur), works = pending
            _RingExchange.finish(works)


def _acc_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _ring_forward(q, k, v, window, scale, softcap, group, layout):
    world, rank = _world_rank(group)
    n_local = q.shape[2]
    acc_out = torch.zeros(q.shape, dtype=_acc_dtype(q), device=q.device)
    acc_lse = torch.full(q.shape[:3], float("-inf"), dtype=acc_out.dtype, device=q.device)
    for src, k_cur, v_cur in _ring_blocks(k, v, group):
        for rows, keys, w in _ring_step_calls(layout, window, rank, src, world, n_local):
            out, lse = torch.ops.flash_attn2.fwd_with_lse(q[:, :, rows], k_cur[:, :, keys], v_cur[:, :, keys], False,
                                                          scale, window_size=list(w), softcap=softcap)
            _merge(acc_out, acc_lse, rows, out, lse.to(acc_lse.dtype))
    return acc_out.to(q.dtype), acc_lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)


def _ring_backward(dout, q, k, v, out, lse, window, scale, softcap, group, layout):
    world, rank = _world_rank(group)
    n_local = q.shape[2]
    dq = torch.zeros(q.shape, dtype=_acc_dtype(q), device=q.device)
    dk = torch.zeros(k.shape, dtype=_acc_dtype(k), device=k.device)  # travels with the K/V block in hand
    dv = torch.zeros_like(dk)
    ring = _RingExchange(group)
    for src, k_cur, v_cur in _ring_blocks(k, v, group):
        for rows, keys, w in _ring_step_calls(layout, window, rank, src, world, n_local):
            gq, gk, gv = torch.ops.flash_attn2.bwd(dout[:, :, rows], q[:, :, rows], k_cur[:, :, keys],
                                                   v_cur[:, :, keys], out[:, :, rows], lse[:, :, rows].contiguous(),
                                                   False, scale, window_size=list(w), softcap=softcap)
            dq[:, :, rows] += gq
            dk[:, :, keys] += gk
            dv[:, :, keys] += gv
        # The accumulators follow their block: after W hand-overs each is back with the block's owner, complete.
        (dk, dv), works = ring.start([dk, dv]) if world > 1 else ((dk, dv), [])
        _RingExchange.finish(works)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _gather_kv(k, v, group, layout):
    world, _ = _world_rank(group)
    pieces_k = [torch.empty_like(k) for _ in range(world)]
    pieces_v = [torch.empty_like(v) for _ in range(world)]
    dist.all_gather(pieces_k, k.contiguous(), group=group)
    dist.all_gather(pieces_v, v.contiguous(), group=group)
    return _from_rank_order(pieces_k, layout, 2), _from_rank_order(pieces_v, layout, 2)


def _allgather_calls(layout, window, rank, world, n_local, n_total):
    """(query rows, key rows, local window) per local query chunk against the gathered K/V. Causal: a chunk at
    global offset o attends to the keys [0, o + length) with bottom-right causal alignment, which is exactly the
    global causal mask; other windows take the chunk's tight box."""
    if window == _FULL:
        return [(_ALL, _ALL, _FULL)]
    if window != _CAUSAL:
        return _window_calls(_chunks(layout, rank, world, n_local), [(0, slice(0, n_total))], *window)
    if layout == "contiguous":
        return [(_ALL, slice(0, (rank + 1) * n_local), _CAUSAL)]
    half = n_local // 2
    return [(slice(0, half), slice(0, (rank + 1) * half), _CAUSAL),
            (slice(half, None), slice(0, (2 * world - rank) * half), _CAUSAL)]


def _allgather_forward(q, k, v, window, scale, softcap, group, layout):
    world, rank = _world_rank(group)
    k_full, v_full = _gather_kv(k, v, group, layout)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
                      device=q.device)
    out = torch.zeros_like(out)  # rows no key reaches (possible with windows): 0, lse -inf
    lse.fill_(float("-inf"))
    for rows, keys, w in _allgather_calls(layout, window, rank, world, q.shape[2], k_full.shape[2]):
        o, l = torch.ops.flash_attn2.fwd_with_lse(q[:, :, rows], k_full[:, :, keys], v_full[:, :, keys], False,
                                                  scale, window_size=list(w), softcap=softcap)
        out[:, :, rows] = o
        lse[:, :, rows] = l
    return out, lse


def _allgather_backward(dout, q, k, v, out, lse, window, scale, softcap, group, layout):
    world, rank = _world_rank(group)
    k_full, v_full = _gather_kv(k, v, group, layout)  # gathered again rather than kept: memory over time
    dq = torch.zeros_like(q)
    dk_full = torch.zeros(k_full.shape, dtype=_acc_dtype(k), device=k.device)
    dv_full = torch.zeros_like(dk_full)
    for rows, keys, w in _allgather_calls(layout, window, rank, world, q.shape[2], k_full.shape[2]):
        gq, gk, gv = torch.ops.flash_attn2.bwd(dout[:, :, rows], q[:, :, rows], k_full[:, :, keys],
                                               v_full[:, :, keys], out[:, :, rows], lse[:, :, rows].contiguous(),
                                               False, scale, window_size=list(w), softcap=softcap)
        dq[:, :, rows] = gq
        dk_full[:, :, keys] += gk
        dv_full[:, :, keys] += gv
    dist.all_reduce(dk_full, group=group)
    dist.all_reduce(dv_full, group=group)
    return dq, shard(dk_full, group, layout).to(k.dtype), shard(dv_full, group, layout).to(v.dtype)


class _ContextParallelAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, window, scale, softcap, group, layout, method):
        fwd = _ring_forward if method == "ring" else _allgather_forward
        out, lse = fwd(q, k, v, window, scale, softcap, group, layout)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options = (window, scale, softcap, group, layout, method)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        window, scale, softcap, group, layout, method = ctx.options
        bwd = _ring_backward if method == "ring" else _allgather_backward
        dq, dk, dv = bwd(dout.contiguous(), q, k, v, out, lse, window, scale, softcap, group, layout)
        return dq, dk, dv, None, None, None, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                   scale: Optional[float] = None, *, group=None, layout: str = "zigzag", method: str = "ring",
                   softcap: float = 0.0, window_size: Tuple[int, int] = (-1, -1)) -> torch.Tensor:
    """This rank's shard of attention over the sequence sharded across `group` (see the module docstring).
    window_size: (left, right) in global positions, -1 unbounded; causal sets right = 0."""
    _check_layout(layout, q.shape[2] if q.dim() == 4 else None)
    if method not in _METHODS:
        raise ValueError(f"flash_attn2.distributed: method must be one of {_METHODS}, got {method!r}")
    if len(window_size) != 2 or any(int(w) < -1 for w in window_size):
        raise ValueError("flash_attn2.distributed.ring_attention: window_size must be (left, right) with values >= -1 "
                         f"(-1: unbounded), got {tuple(window_size)}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("flash_attn2.distributed.ring_attention: q, k, v must be (B, H, N_local, D) shards, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[2] != k.shape[2] or k.shape != v.shape:
        raise ValueError("flash_attn2.distributed.ring_attention: q, k and v must be shards of the same sequence "
                         f"(same N_local), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("flash_attn2.distributed.ring_attention: torch.distributed is not initialised")
    if scale is None:
        scale = q.shape[-1] ** -0.5 if q.shape[-1] > 0 else 1.0
    window = (int(window_size[0]), 0 if causal else int(window_size[1]))
    return _ContextParallelAttention.apply(q, k, v, window, scale, softcap, group, layout, method)
