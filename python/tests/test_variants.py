"""The attention variants (window, softcap, ALiBi, dropout, varlen, deterministic) on every kernel, against the
float64 reference of reference.py, every option combined with every other."""

import itertools
import random

import pytest
import torch

import flash_attn2
from conftest import cuda_kernel_names, requires_cuda, requires_sm90
from reference import assert_close_to_reference, naive_attention, random_qkv

F = torch.ops.flash_attn2


def make_options(b, hq, causal, window, softcap, alibi, dropout_p, device, seed=0):
    slopes = None
    if alibi == "head":
        slopes = torch.rand(hq, device=device) * 0.5
    elif alibi == "batch":
        slopes = torch.rand(b, hq, device=device) * 0.5
    rng = torch.tensor([1234 + seed, 77 * seed], dtype=torch.int64) if dropout_p > 0 else None
    return dict(causal=causal, window_size=window, softcap=softcap, alibi_slopes=slopes, dropout_p=dropout_p,
                rng_state=rng)


def reference_options(opts, keep):
    return dict(causal=opts["causal"], window_size=opts["window_size"], softcap=opts["softcap"],
                alibi_slopes=None if opts["alibi_slopes"] is None else opts["alibi_slopes"].double().cpu(),
                dropout_p=opts["dropout_p"], keep=keep)


def check_variant_case(b, hq, hkv, nq, nk, d, dtype, device, opts, transposed=False, factor=2.0, qkv=None):
    q, k, v = qkv or random_qkv(b, hq, hkv, nq, nk, d, dtype, device, transposed, requires_grad=True)
    dout = torch.randn(b, hq, nq, d, dtype=dtype, device=device)
    keep = None
    if opts["dropout_p"] > 0:
        keep = flash_attn2.dropout_keep_mask(opts["rng_state"], b, hq, nq, nk, opts["dropout_p"])
    ref_opts = reference_options(opts, keep)
    q64, k64, v64 = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = naive_attention(q64, k64, v64, **ref_opts)
    torch_opts = dict(ref_opts, alibi_slopes=opts["alibi_slopes"],
                      keep=None if keep is None else keep.to(device))
    tq, tk, tv = (t.detach().requires_grad_() for t in (q, k, v))
    torch_out, torch_lse = naive_attention(tq, tk, tv, **torch_opts)

    if device == "cuda":  # poison the allocator's free blocks so unwritten output shows up as NaN
        torch.empty(64 << 20, dtype=torch.uint8, device=device).fill_(0xFF)
    out, lse = flash_attn2.attention_with_lse(q.detach(), k.detach(), v.detach(), **opts)
    assert_close_to_reference("out", out, torch_out.detach(), ref_out.detach(), factor)
    visible = torch.isfinite(ref_lse.detach())
    assert torch.equal(torch.isfinite(lse).cpu(), visible), "lse must be -inf exactly on rows with no key"
    assert_close_to_reference("lse", lse.cpu()[visible], torch_lse.detach().cpu()[visible], ref_lse.detach()[visible],
                              factor)

    ours = flash_attn2.attention(q, k, v, **opts)
    ours.backward(dout)
    ref_out.backward(dout.double().cpu())
    torch_out.backward(dout)
    check_grads([("dq", q.grad, tq.grad, q64.grad), ("dk", k.grad, tk.grad, k64.grad),
                 ("dv", v.grad, tv.grad, v64.grad)], factor)

    # The deterministic backward with the same options: bitwise reproducible, and the same gradients.
    kw = dict(window_size=list(opts["window_size"]), softcap=opts["softcap"], alibi_slopes=opts["alibi_slopes"],
              dropout_p=opts["dropout_p"], rng_state=opts["rng_state"])
    args = (dout, q.detach(), k.detach(), v.detach(), out, lse, opts["causal"], None)
    first = F.bwd(*args, **kw, deterministic=True)
    again = F.bwd(*args, **kw, deterministic=True)
    for name, a, b, ref in zip(("dq", "dk", "dv"), first, again, (q.grad, k.grad, v.grad)):
        assert torch.equal(a, b), f"deterministic {name} differs between runs"
        torch.testing.assert_close(a.float(), ref.float(), atol=2e-2 if dtype != torch.float32 else 1e-5, rtol=2e-2)


def check_grads(rows, factor):
    """(name, ours, PyTorch's in the same dtype, float64 reference) within the pass rule. dQ and dK go through
    D = rowsum(dO * O) with O rounded to the input dtype (FlashAttention-2's backward): an absolute error of
    about eps * |dV| that PyTorch's autograd does not have where it cancels exactly (a row that sees a single
    key has dS = 0), so that is their floor too."""
    ours_dv = rows[2][1]
    eps = torch.finfo(ours_dv.dtype).eps if ours_dv.dtype in (torch.float16, torch.bfloat16) else 0.0
    d_floor = 2 * eps * rows[2][3].abs().max().item() if rows[2][3].numel() else 0.0
    for name, ours, theirs, ref in rows:
        if name in ("dq", "dk") and eps > 0 and ours.numel():
            err = (ours.double().cpu() - ref.double().cpu()).abs().max().item()
            terr = (theirs.double().cpu() - ref.double().cpu()).abs().max().item()
            assert torch.isfinite(ours).all(), f"{name}: non-finite values"
            assert err <= factor * terr + 1e-3 + d_floor, (
                f"{name}: max error vs float64 {err:.3e}, PyTorch's own {terr:.3e}, D floor {d_floor:.3e}")
        else:
            assert_close_to_reference(name, ours, theirs, ref, factor)


WINDOWS = [(-1, -1), (0, 0), (7, 3), (200, -1), (-1, 5)]
OPTION_GRID = list(itertools.product([False, True], WINDOWS, [0.0, 2.5], [None, "head", "batch"], [0.0, 0.3]))


@pytest.mark.parametrize("causal,window,softcap,alibi,dropout_p", OPTION_GRID)
def test_cpu_every_option_combination(causal, window, softcap, alibi, dropout_p):
    opts = make_options(2, 4, causal, window, softcap, alibi, dropout_p, "cpu", seed=len(str(window)))
    check_variant_case(2, 4, 2, 37, 53, 16, torch.float32, "cpu", opts, transposed=alibi == "batch")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("nq,nk", [(64, 300), (300, 64), (130, 130), (1, 257)])
def test_cpu_variants_dtypes_and_shapes(dtype, nq, nk):
    opts = make_options(1, 6, True, (40, -1), 4.0, "head", 0.1, "cpu", seed=nq)
    check_variant_case(1, 6, 3, nq, nk, 24, dtype, "cpu", opts)


@pytest.mark.parametrize("nq,nk,causal,window,softcap,dropout_p,dtype", [
    (700, 700, True, (-1, -1), 0.0, 0.0, torch.float32), (600, 900, False, (300, 20), 2.5, 0.2, torch.float32),
    (500, 800, True, (-1, -1), 0.0, 0.3, torch.bfloat16), (700, 400, False, (-1, 0), 1.5, 0.0, torch.float64),
    (650, 650, True, (7, -1), 0.0, 0.0, torch.float32)])
def test_cpu_backward_query_tiles_across_the_band(nq, nk, causal, window, softcap, dropout_p, dtype):
    """The backward's query tiles per key tile on masked layouts: 256 rows where the queries see every key of the
    tile, 64 on the band's edges (unaligned: they start where the tile's visible queries do), none where the band
    is narrower than a key tile (the 7-key window)."""
    opts = make_options(1, 4, causal, window, softcap, None, dropout_p, "cpu", seed=nq)
    check_variant_case(1, 4, 2, nq, nk, 16, dtype, "cpu", opts, transposed=dtype == torch.float32)


@pytest.mark.parametrize("softcap,alibi,dropout_p", [(2.5, "batch", 0.3), (0.0, "head", 0.0), (1.5, None, 0.2)])
def test_cpu_wide_query_tiles_with_score_modifiers(softcap, alibi, dropout_p):
    """The forward's 256-row query tiles (unmasked layouts, here forced by one thread) with every score modifier."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        opts = make_options(2, 4, False, (-1, -1), softcap, alibi, dropout_p, "cpu", seed=3)
        check_variant_case(2, 4, 2, 290, 530, 16, torch.float32, "cpu", opts)
    finally:
        torch.set_num_threads(threads)


def test_window_larger_than_sequence_equals_dense():
    q, k, v = random_qkv(2, 2, 2, 33, 45, 16, torch.float64, "cpu")
    big = flash_attn2.attention(q, k, v, window_size=(10_000, 10_000))
    torch.testing.assert_close(big, flash_attn2.attention(q, k, v), rtol=0, atol=0)
    torch.testing.assert_close(flash_attn2.attention(q, k, v, True, window_size=(10_000, -1)),
                               flash_attn2.attention(q, k, v, True), rtol=0, atol=0)


def test_gradcheck_float64_every_option_with_dropout():
    q, k, v = random_qkv(1, 2, 1, 9, 13, 8, torch.float64, "cpu", requires_grad=True)
    slopes = torch.rand(1, 2)
    rng = torch.tensor([5, 9])

    def f(q, k, v):
        return flash_attn2.attention(q, k, v, True, window_size=(6, 2), softcap=3.0, alibi_slopes=slopes,
                                     dropout_p=0.3, rng_state=rng)

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_dropout_mask_is_a_pure_function_and_has_the_right_rate():
    rng = torch.tensor([42, 1000])
    m1 = flash_attn2.dropout_keep_mask(rng, 2, 3, 100, 200, 0.25)
    m2 = flash_attn2.dropout_keep_mask(rng.clone(), 2, 3, 100, 200, 0.25)
    assert m1.dtype == torch.bool and m1.shape == (2, 3, 100, 200)
    assert torch.equal(m1, m2)
    assert abs(m1.float().mean().item() - 0.75) < 0.01
    other = flash_attn2.dropout_keep_mask(torch.tensor([42, 1001]), 2, 3, 100, 200, 0.25)
    assert not torch.equal(m1, other), "the offset must change the mask"
    # A sub-block of a larger mask is the same: the mask depends on (b, h, i, j) only.
    assert torch.equal(flash_attn2.dropout_keep_mask(rng, 2, 3, 50, 60, 0.25), m1[:, :, :50, :60])


def test_autograd_draws_rng_state_and_reuses_it_in_backward():
    q, k, v = random_qkv(1, 2, 2, 12, 12, 8, torch.float64, "cpu", requires_grad=True)
    torch.manual_seed(0)
    a = flash_attn2.attention(q, k, v, dropout_p=0.5)
    b = flash_attn2.attention(q, k, v, dropout_p=0.5)
    assert not torch.equal(a, b), "each call draws a fresh mask"
    torch.manual_seed(0)
    assert torch.equal(a, flash_attn2.attention(q, k, v, dropout_p=0.5)), "the draw follows torch.manual_seed"

    def seeded(q, k, v):  # the same drawn state on every call: gradcheck then proves backward reuses it
        torch.manual_seed(1)
        return flash_attn2.attention(q, k, v, True, dropout_p=0.4)

    assert torch.autograd.gradcheck(seeded, (q, k, v))


def test_compiled_dropout_draws_a_new_mask_every_call():
    """The state is drawn by an op inside the graph, not baked in at trace time; compiled == eager for the
    same generator state, gradients included (the backward reuses the forward's draw)."""
    torch._dynamo.reset()

    def step(q, k, v):
        return flash_attn2.attention(q, k, v, True, window_size=(6, 0), dropout_p=0.3).sum()

    compiled = torch.compile(step, fullgraph=True)
    q, k, v = random_qkv(1, 2, 2, 24, 24, 16, torch.float32, "cpu", requires_grad=True)
    assert compiled(q, k, v).item() != compiled(q, k, v).item(), "two compiled calls must draw different masks"
    torch.manual_seed(3)
    ours = compiled(q, k, v)
    g_ours = torch.autograd.grad(ours, (q, k, v))
    torch.manual_seed(3)
    eager = step(q, k, v)
    g_eager = torch.autograd.grad(eager, (q, k, v))
    torch.testing.assert_close(ours, eager)
    for a, b in zip(g_ours, g_eager):
        torch.testing.assert_close(a, b)


def test_with_lse_and_bwd_need_rng_state_for_dropout():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(RuntimeError, match="dropout_p = 0.1 needs rng_state"):
        flash_attn2.attention_with_lse(q, q, q, dropout_p=0.1)
    out, lse = flash_attn2.attention_with_lse(q, q, q)
    with pytest.raises(RuntimeError, match="needs rng_state"):
        F.bwd(out, q, q, q, out, lse, dropout_p=0.1)


# ---------------------------------------------------------------------------------------------------------
# Variable-length batches.

def assert_deterministic_backward(deterministic, default, runs=3):
    """deterministic() and default() give (dq, dk, dv): the deterministic mode bitwise the same over `runs` calls,
    and the default mode's gradients to rounding."""
    first = deterministic()
    for _ in range(runs - 1):
        for a, b in zip(first, deterministic()):
            assert torch.equal(a, b)
    for a, b in zip(first, default()):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


def packed_batch(lengths_q, lengths_k, hq, hkv, d, dtype, device, requires_grad=False):
    tq, tk = sum(lengths_q), sum(lengths_k)
    q = torch.randn(tq, hq, d, dtype=dtype, device=device, requires_grad=requires_grad)
    k = torch.randn(tk, hkv, d, dtype=dtype, device=device, requires_grad=requires_grad)
    v = torch.randn(tk, hkv, d, dtype=dtype, device=device, requires_grad=requires_grad)
    cu = lambda ls: torch.tensor([0] + list(itertools.accumulate(ls)), dtype=torch.int32, device=device)  # noqa
    return q, k, v, cu(lengths_q), cu(lengths_k)


def check_varlen_deterministic(lengths, d):
    """Packed causal batch: the deterministic backward bitwise reproducible and the default one to rounding."""
    q, k, v, cu_q, cu_k = packed_batch(lengths, lengths, 4, 2, d, torch.bfloat16, "cuda")
    n = max(lengths)
    out, lse = flash_attn2.attention_varlen_with_lse(q, k, v, cu_q, cu_k, n, n, True)
    dout = torch.randn_like(out)
    bwd = lambda **kw: F.bwd_varlen(dout, q, k, v, out, lse, cu_q, cu_k, n, n, True, None, **kw)
    assert_deterministic_backward(lambda: bwd(deterministic=True), bwd)


def check_varlen_against_reference(lengths_q, lengths_k, dtype, device, opts, hq=4, hkv=2, d=32, factor=2.0):
    q, k, v, cu_q, cu_k = packed_batch(lengths_q, lengths_k, hq, hkv, d, dtype, device, requires_grad=True)
    B = len(lengths_q)
    max_q, max_k = max(lengths_q), max(lengths_k)
    dout = torch.randn_like(q)
    keep_all = None
    if opts["dropout_p"] > 0:
        keep_all = flash_attn2.dropout_keep_mask(opts["rng_state"], B, hq, max_q, max_k, opts["dropout_p"])
    if device == "cuda":
        torch.empty(64 << 20, dtype=torch.uint8, device=device).fill_(0xFF)
    out, lse = flash_attn2.attention_varlen_with_lse(q.detach(), k.detach(), v.detach(), cu_q, cu_k, max_q, max_k,
                                                     **opts)
    assert lse.shape == (hq, q.shape[0])
    ours = flash_attn2.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **opts)
    ours.backward(dout)
    for b in range(B):
        sq = slice(int(cu_q[b]), int(cu_q[b + 1]))
        sk = slice(int(cu_k[b]), int(cu_k[b + 1]))
        nq, nk = lengths_q[b], lengths_k[b]
        if nq == 0:
            continue
        per = lambda t, s: t.detach()[s].transpose(0, 1).unsqueeze(0)  # noqa: E731
        qb, kb, vb, dob = per(q, sq), per(k, sk), per(v, sk), per(dout, sq)
        o_opts = dict(opts)
        if opts["alibi_slopes"] is not None and opts["alibi_slopes"].dim() == 2:
            o_opts["alibi_slopes"] = opts["alibi_slopes"][b:b + 1]
        keep = None if keep_all is None else keep_all[b:b + 1, :, :nq, :nk]
        ref_opts = reference_options(o_opts, keep)
        q64, k64, v64 = (t.double().cpu().requires_grad_() for t in (qb, kb, vb))
        ref_out, ref_lse = naive_attention(q64, k64, v64, **ref_opts)
        tq, tk, tv = (t.clone().requires_grad_() for t in (qb, kb, vb))
        torch_out, torch_lse = naive_attention(
            tq, tk, tv, **dict(ref_opts, alibi_slopes=o_opts["alibi_slopes"],
                               keep=None if keep is None else keep.to(device)))
        assert_close_to_reference(f"out[{b}]", out[sq].transpose(0, 1).unsqueeze(0), torch_out.detach(),
                                  ref_out.detach(), factor)
        vis = torch.isfinite(ref_lse.detach())[0]
        assert torch.equal(torch.isfinite(lse[:, sq]).cpu(), vis), f"lse[{b}] -inf pattern"
        assert_close_to_reference(f"lse[{b}]", lse[:, sq].cpu()[vis], torch_lse.detach()[0].cpu()[vis],
                                  ref_lse.detach()[0][vis], factor)
        ref_out.backward(dob.double().cpu())
        torch_out.backward(dob)
        if nk > 0:
            per_seq = lambda g: g.transpose(0, 1).unsqueeze(0)  # noqa: E731
            check_grads([("dq", per_seq(q.grad[sq]), tq.grad, q64.grad), ("dk", per_seq(k.grad[sk]), tk.grad, k64.grad),
                         ("dv", per_seq(v.grad[sk]), tv.grad, v64.grad)], factor)
        else:
            assert torch.equal(q.grad[sq], torch.zeros_like(q.grad[sq]))


VARLEN_LENGTHS = [
    ([5, 0, 17, 1, 33], [9, 4, 17, 0, 20]),  # zero-length sequences on either side, Nq != Nk
    ([40], [40]),                            # a single sequence
    ([0, 0], [3, 0]),                        # nothing to attend with
]


@pytest.mark.parametrize("lengths_q,lengths_k", VARLEN_LENGTHS)
@pytest.mark.parametrize("variant", ["plain", "causal", "all"])
def test_cpu_varlen_matches_per_sequence_reference(lengths_q, lengths_k, variant):
    b = len(lengths_q)
    if variant == "plain":
        opts = make_options(b, 4, False, (-1, -1), 0.0, None, 0.0, "cpu")
    elif variant == "causal":
        opts = make_options(b, 4, True, (-1, -1), 0.0, None, 0.0, "cpu")
    else:
        opts = make_options(b, 4, True, (6, -1), 3.0, "batch", 0.25, "cpu", seed=3)
    check_varlen_against_reference(lengths_q, lengths_k, torch.float32, "cpu", opts)


def test_varlen_equals_dense_calls_without_dropout():
    lengths = [3, 50, 0, 21]
    q, k, v, cu_q, cu_k = packed_batch(lengths, lengths, 2, 1, 16, torch.float64, "cpu")
    out = flash_attn2.attention_varlen(q, k, v, cu_q, cu_k, 50, 50, True, window_size=(9, 0), softcap=2.0)
    for b, n in enumerate(lengths):
        s = slice(int(cu_q[b]), int(cu_q[b + 1]))
        dense = flash_attn2.attention(*(t[s].transpose(0, 1).unsqueeze(0) for t in (q, k, v)), True,
                                      window_size=(9, 0), softcap=2.0)
        torch.testing.assert_close(out[s], dense[0].transpose(0, 1), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------
# The ops as PyTorch sees them.

def test_opcheck_variant_ops():
    q, k, v = random_qkv(2, 4, 2, 17, 23, 16, torch.float32, "cpu", requires_grad=True)
    slopes = torch.rand(4)
    rng = torch.tensor([3, 4])
    kw = dict(window_size=[5, 2], softcap=2.0, alibi_slopes=slopes, dropout_p=0.2, rng_state=rng)
    torch.library.opcheck(F.fwd.default, (q, k, v, True, None), kw)
    torch.library.opcheck(F.fwd_with_lse.default, (q, k, v, False, 0.3), kw)
    out, lse = F.fwd_with_lse(q.detach(), k.detach(), v.detach(), True, None, **kw)
    torch.library.opcheck(F.bwd.default, (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, True,
                                          None), dict(kw, deterministic=True))
    qp, kp, vp, cu_q, cu_k = packed_batch([3, 0, 9], [4, 2, 9], 4, 2, 16, torch.float32, "cpu", requires_grad=True)
    torch.library.opcheck(F.fwd_varlen.default, (qp, kp, vp, cu_q, cu_k, 9, 9, True, None), kw)
    out, lse = F.fwd_varlen_with_lse(qp.detach(), kp.detach(), vp.detach(), cu_q, cu_k, 9, 9, True, None, **kw)
    torch.library.opcheck(F.fwd_varlen_with_lse.default, (qp, kp, vp, cu_q, cu_k, 9, 9, False, None), kw)
    torch.library.opcheck(F.bwd_varlen.default, (torch.randn_like(out), qp.detach(), kp.detach(), vp.detach(), out, lse,
                                                 cu_q, cu_k, 9, 9, True, None), kw)


def test_compile_fullgraph_dynamic_with_variants():
    torch._dynamo.reset()
    slopes = torch.rand(4)
    rng = torch.tensor([3, 4])

    def attend(q, k, v):
        return flash_attn2.attention(q, k, v, True, window_size=(8, 0), softcap=3.0, alibi_slopes=slopes,
                                     dropout_p=0.1, rng_state=rng).square().sum()

    compiled = torch.compile(attend, fullgraph=True, dynamic=True)
    for nq in (33, 65):
        q, k, v = random_qkv(2, 4, 2, nq, 40, 16, torch.float32, "cpu", requires_grad=True)
        compiled(q, k, v).backward()
        tq, tk, tv = (t.detach().requires_grad_() for t in (q, k, v))
        attend(tq, tk, tv).backward()
        torch.testing.assert_close(q.grad, tq.grad, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(k.grad, tk.grad, atol=1e-4, rtol=1e-4)

    def attend_varlen(q, k, v, cu_q, cu_k):
        return flash_attn2.attention_varlen(q, k, v, cu_q, cu_k, 9, 9, True, window_size=(3, -1)) * 2

    qp, kp, vp, cu_q, cu_k = packed_batch([3, 0, 9], [4, 2, 9], 4, 2, 16, torch.float32, "cpu", requires_grad=True)
    c = torch.compile(attend_varlen, fullgraph=True, dynamic=True)
    torch.testing.assert_close(c(qp, kp, vp, cu_q, cu_k), attend_varlen(qp, kp, vp, cu_q, cu_k))


def test_torchscript_with_variant_keywords():
    @torch.jit.script
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor) -> torch.Tensor:
        return torch.ops.flash_attn2.fwd(q, k, v, True, None, window_size=[4, 0], softcap=2.0, alibi_slopes=slopes)

    @torch.jit.script
    def attend_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
        return torch.ops.flash_attn2.fwd_varlen(q, k, v, cu, cu, 9, 9, True)

    q, k, v = random_qkv(1, 2, 2, 19, 19, 16, torch.float32, "cpu")
    slopes = torch.rand(2)
    expected = flash_attn2.attention(q, k, v, True, window_size=(4, 0), softcap=2.0, alibi_slopes=slopes)
    assert torch.equal(attend(q, k, v, slopes), expected)
    qp, kp, vp, cu, _ = packed_batch([3, 9], [3, 9], 2, 2, 16, torch.float32, "cpu")
    assert torch.equal(attend_varlen(qp, kp, vp, cu), flash_attn2.attention_varlen(qp, kp, vp, cu, cu, 9, 9, True))


# ---------------------------------------------------------------------------------------------------------
# Bad input: every check names the argument.

def _qkv():
    return torch.randn(2, 4, 8, 16), torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16)


VARIANT_ERRORS = [
    (dict(window_size=(-2, 0)), r"window_size must be -1 \(unbounded\) or >= 0 on each side, got \(-2, 0\)"),
    (dict(window_size=(0, -5)), r"window_size must be -1"),
    (dict(softcap=-1.0), r"softcap must be a finite number >= 0 \(0 disables it\), got -1"),
    (dict(softcap=float("inf")), r"softcap must be a finite number >= 0"),
    (dict(dropout_p=1.0, rng_state=torch.tensor([1, 2])), r"dropout_p must be in \[0, 1\), got 1"),
    (dict(dropout_p=-0.1, rng_state=torch.tensor([1, 2])), r"dropout_p must be in \[0, 1\), got -0.1"),
    (dict(alibi_slopes=torch.rand(3)), r"alibi_slopes has shape \[3\]; expected \(Hq,\) = \(4,\) or \(B, Hq\) = \(2, 4\)"),
    (dict(alibi_slopes=torch.rand(4, 2)), r"alibi_slopes has shape \[4, 2\]"),
    (dict(alibi_slopes=torch.rand(4).double()), r"alibi_slopes has dtype Double; expected float32"),
    (dict(alibi_slopes=torch.rand(4, device="meta")), r"alibi_slopes is on meta but q is on cpu"),
    (dict(dropout_p=0.1, rng_state=torch.tensor([1.0, 2.0])), r"rng_state must be an int64 CPU tensor \[seed, offset\] of 2 elements, got Float"),
    (dict(dropout_p=0.1, rng_state=torch.tensor([1, 2, 3])), r"rng_state must be an int64 CPU tensor .* with shape \[3\]"),
]


# The Meta kernels (torch.compile, export) say the same, except for the CPU-only device-mismatch case.
ERROR_CASES = [(dev, kw, msg) for dev in ("cpu", "meta") for kw, msg in VARIANT_ERRORS
               if not (dev == "meta" and "is on meta" in msg)]


@pytest.mark.parametrize("device,kwargs,message", ERROR_CASES)
def test_bad_variant_options_raise_clear_errors(device, kwargs, message):
    q, k, v = (t.to(device) for t in _qkv())
    kwargs = {n: (t.to(device) if n == "alibi_slopes" and t.device.type == "cpu" else t) for n, t in kwargs.items()}
    with pytest.raises(RuntimeError, match=message):
        flash_attn2.attention_with_lse(q, k, v, **kwargs)
    with pytest.raises(RuntimeError, match=message):
        F.bwd(q, q, k, v, q, torch.zeros(2, 4, 8, device=device), **kwargs)


def _packed():
    q = torch.randn(10, 4, 16)
    kv = torch.randn(12, 2, 16)
    return q, kv, kv.clone()


VARLEN_ERRORS = [
    (lambda q, k, v: (torch.tensor([0, 4, 10], dtype=torch.int64), torch.tensor([0, 5, 12], dtype=torch.int32), 6, 7),
     r"cu_seqlens_q has dtype Long; expected int32"),
    (lambda q, k, v: (torch.tensor([0, 4, 10], dtype=torch.int32), torch.tensor([0, 12], dtype=torch.int32), 6, 12),
     r"cu_seqlens_q has 3 elements but cu_seqlens_k has 2"),
    (lambda q, k, v: (torch.tensor([1, 4, 10], dtype=torch.int32), torch.tensor([0, 5, 12], dtype=torch.int32), 6, 7),
     r"cu_seqlens_q must start at 0, got 1"),
    (lambda q, k, v: (torch.tensor([0, 7, 4, 10], dtype=torch.int32), torch.tensor([0, 5, 6, 12], dtype=torch.int32), 7, 7),
     r"cu_seqlens_q must be non-decreasing, but element 2 \(4\) < element 1 \(7\)"),
    (lambda q, k, v: (torch.tensor([0, 4, 9], dtype=torch.int32), torch.tensor([0, 5, 12], dtype=torch.int32), 6, 7),
     r"cu_seqlens_q must end at the number of packed tokens, 10, got 9"),
    (lambda q, k, v: (torch.tensor([0, 4, 10], dtype=torch.int32), torch.tensor([0, 5, 12], dtype=torch.int32), 5, 7),
     r"sequence 1 has length 6 \(from cu_seqlens_q\) but max_seqlen is 5"),
    (lambda q, k, v: (torch.tensor([[0, 4, 10]], dtype=torch.int32), torch.tensor([0, 5, 12], dtype=torch.int32), 6, 7),
     r"cu_seqlens_q has shape \[1, 3\]; expected \(B \+ 1,\)"),
    (lambda q, k, v: (torch.tensor([0, 4, 10], dtype=torch.int32, device="meta"), torch.tensor([0, 5, 12], dtype=torch.int32), 6, 7),
     r"cu_seqlens_q is on meta but q is on cpu"),
]


@pytest.mark.parametrize("make,message", VARLEN_ERRORS)
def test_bad_varlen_inputs_raise_clear_errors(make, message):
    q, k, v = _packed()
    cu_q, cu_k, mq, mk = make(q, k, v)
    with pytest.raises(RuntimeError, match=message):
        flash_attn2.attention_varlen(q, k, v, cu_q, cu_k, mq, mk)


def test_bad_varlen_shapes_raise_clear_errors():
    q, k, v = _packed()
    cu = torch.tensor([0, 10], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"q must have 3 dimensions \(Tq, Hq, D\)"):
        flash_attn2.attention_varlen(q[None], k, v, cu, cu, 10, 12)
    with pytest.raises(RuntimeError, match="k has 12 tokens but v has 11"):
        flash_attn2.attention_varlen(q, k, v[:11], cu, torch.tensor([0, 12], dtype=torch.int32), 10, 12)
    with pytest.raises(RuntimeError, match="max_seqlen_q and max_seqlen_k must be >= 0"):
        flash_attn2.attention_varlen(q, k, v, cu, torch.tensor([0, 12], dtype=torch.int32), -1, 12)
    out, lse = flash_attn2.attention_varlen_with_lse(q, k, v, cu, torch.tensor([0, 12], dtype=torch.int32), 10, 12)
    with pytest.raises(RuntimeError, match=r"lse has shape \[4, 9\]; expected \(Hq, Tq\) = \(4, 10\)"):
        F.bwd_varlen(out, q, k, v, out, lse[:, :9], cu, torch.tensor([0, 12], dtype=torch.int32), 10, 12)


def test_dropout_keep_mask_bad_input():
    with pytest.raises(RuntimeError, match="dropout_p must be in"):
        flash_attn2.dropout_keep_mask(torch.tensor([1, 2]), 1, 1, 4, 4, 1.5)
    with pytest.raises(RuntimeError, match="rng_state must be an int64 CPU tensor"):
        flash_attn2.dropout_keep_mask(torch.tensor([1, 2], dtype=torch.int32), 1, 1, 4, 4, 0.5)
    with pytest.raises(RuntimeError, match="sizes must be >= 0"):
        flash_attn2.dropout_keep_mask(torch.tensor([1, 2]), -1, 1, 4, 4, 0.5)


# ---------------------------------------------------------------------------------------------------------
# CUDA: both kernel families (scripts/gpu_check.sh runs this file again with FLASH_ATTN2_PORTABLE_KERNELS=1).

def cuda_option_cases():
    rnd = random.Random(7)
    cases = []
    shapes = [(2, 4, 2, 200, 333, 64), (1, 8, 1, 333, 200, 128), (2, 4, 4, 129, 129, 256), (1, 6, 2, 77, 501, 96),
              (2, 2, 1, 256, 256, 32), (1, 4, 2, 1, 700, 128), (1, 4, 4, 300, 300, 160)]
    for i, grid in enumerate(OPTION_GRID[::3]):
        shape = shapes[i % len(shapes)]
        dtype = torch.bfloat16 if i % 2 == 0 else torch.float16
        causal, window, softcap, alibi, dropout_p = grid
        window = (window[0] * 13 if window[0] > 0 else window[0], window[1] * 7 if window[1] > 0 else window[1])
        cases.append((shape, dtype, causal, window, softcap * 4, alibi, dropout_p, rnd.random() < 0.5))
    return cases


@requires_cuda
@pytest.mark.parametrize("shape,dtype,causal,window,softcap,alibi,dropout_p,transposed", cuda_option_cases())
def test_cuda_option_combinations(shape, dtype, causal, window, softcap, alibi, dropout_p, transposed):
    b, hq, hkv, nq, nk, d = shape
    opts = make_options(b, hq, causal, window, softcap, alibi, dropout_p, "cuda", seed=nq)
    check_variant_case(b, hq, hkv, nq, nk, d, dtype, "cuda", opts, transposed)


@requires_sm90
@pytest.mark.parametrize("causal,window,softcap,alibi,dropout_p", [
    (True, (-1, -1), 30.0, "head", 0.0), (False, (200, 7), 0.0, "batch", 0.2), (True, (300, -1), 5.0, None, 0.1),
    (False, (-1, -1), 0.0, None, 0.0)])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_cuda_warp_specialised_forward_with_variants(monkeypatch, causal, window, softcap, alibi, dropout_p, d):
    """The warp-specialised forward (FLASH_ATTN2_FWD_WS=require) with the dense variants, every head dim, on a
    persistent grid of 4 blocks (tiles that see no key under the window are written as empty rows in turn)."""
    monkeypatch.setenv("FLASH_ATTN2_FWD_WS", "require")
    monkeypatch.setenv("FLASH_ATTN2_FWD_WS_BLOCKS", "4")
    opts = make_options(2, 4, causal, window, softcap, alibi, dropout_p, "cuda", seed=11)
    check_variant_case(2, 4, 2, 333, 517, d, torch.bfloat16, "cuda", opts, transposed=True)


def check_dense_and_packed(nq, nk, d, causal, window, softcap, alibi, dropout_p, seeds):
    """One option set on CUDA, bfloat16, against the float64 reference twice: a dense GQA case (B = 2, 4 / 2 heads,
    transposed memory) and a packed batch of three sequences (one of a single query row, and with nk = 100 one
    without keys), each with its own seed."""
    opts = make_options(2, 4, causal, window, softcap, alibi, dropout_p, "cuda", seed=seeds[0])
    check_variant_case(2, 4, 2, nq, nk, d, torch.bfloat16, "cuda", opts, transposed=True)
    opts = make_options(3, 4, causal, window, softcap, alibi, dropout_p, "cuda", seed=seeds[1])
    check_varlen_against_reference([nq // 3, 1, nq - nq // 3], [nk // 2, 50, nk - nk // 2 - 50], torch.bfloat16,
                                   "cuda", opts, d=d)


@requires_sm90
@pytest.mark.parametrize("shift", ["", "0"])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("nq,nk,causal,window,softcap,alibi,dropout_p", [
    (700, 700, True, (-1, -1), 0.0, None, 0.1), (1000, 100, True, (-1, -1), 3.0, "head", 0.0),
    (1000, 1200, False, (300, 0), 0.0, "batch", 0.2), (1600, 1600, True, (-1, -1), 0.0, None, 0.0)])
def test_cuda_warp_specialised_forward_row_shift(monkeypatch, shift, d, nq, nk, causal, window, softcap, alibi,
                                                 dropout_p):
    """The WS forward's query tiles shifted up (FwdParams::row_shift_unit, the default on rows bounded on the
    right; FLASH_ATTN2_FWD_ROW_SHIFT=0 keeps them at row 0; every dense length here shifts at d64 (by 64 or 128)
    and d256 (by 16-128), none at d128, whose unit is its tile): each sequence's first tile holds rows above its
    row 0 (zeros, or in a packed batch the previous sequence's rows) that are never stored, with dropout (draws in
    groups of 16 queries), softcap, ALiBi, windows, Nq > Nk (the first tiles see no key: written as empty rows
    from the first valid row), and packed sequences of other lengths, one empty."""
    monkeypatch.setenv("FLASH_ATTN2_FWD_WS", "require")
    monkeypatch.setenv("FLASH_ATTN2_FWD_ROW_SHIFT", shift)
    check_dense_and_packed(nq, nk, d, causal, window, softcap, alibi, dropout_p, seeds=(13, 14))


@requires_sm90
@pytest.mark.parametrize("fixed", ["", "0"])
@pytest.mark.parametrize("softcap,causal,dropout_p", [(0.5, False, 0.0), (20.0, True, 0.0), (50.0, False, 0.1),
                                                      (56.0, True, 0.0)])
@pytest.mark.parametrize("d", [128, 256])
def test_cuda_warp_specialised_forward_softcap_fixed_offset(monkeypatch, fixed, softcap, causal, dropout_p, d):
    """The WS forward's softcap against a fixed offset (d128 and d256, bfloat16, no ALiBi, softcap up to 56;
    FLASH_ATTN2_SOFTCAP_FIXED=0 keeps the running max): keys share one direction u, and
    query heads 0 and 1 point along -u and +u, so their rows saturate at -softcap (every P at the floor of the
    offset's range) and at +softcap (its top); heads 2 and 3 spread between. Causal cases have Nq > Nk: rows that
    see no key (LSE -inf, zero output) and rows that see one. Output, LSE and gradients against float64."""
    monkeypatch.setenv("FLASH_ATTN2_FWD_WS", "require")
    monkeypatch.setenv("FLASH_ATTN2_SOFTCAP_FIXED", fixed)
    b, hq, hkv = 2, 4, 2
    nq, nk = (333, 200) if causal else (200, 333)
    gen = torch.Generator().manual_seed(int(softcap) + d)
    u = torch.randn(d, generator=gen)
    u = u / u.norm()
    k = 0.3 * torch.randn(b, hkv, nk, d, generator=gen) + 3.0 * u
    q = torch.randn(b, hq, nq, d, generator=gen)
    a = softcap * d ** 0.5  # scale * a * 3 = 3 softcap: tanh(3) = 0.995
    q[:, 0] = -a * u + 0.1 * q[:, 0]  # head 0: every score far below -softcap before the cap
    q[:, 1] = a * u + 0.1 * q[:, 1]   # head 1: every score far above
    v = torch.randn(b, hkv, nk, d, generator=gen)
    qkv = tuple(t.to("cuda", torch.bfloat16).requires_grad_() for t in (q, k, v))
    opts = make_options(b, hq, causal, (-1, -1), softcap, None, dropout_p, "cuda", seed=5)
    check_variant_case(b, hq, hkv, nq, nk, d, torch.bfloat16, "cuda", opts, qkv=qkv)


@requires_sm90
@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,causal,window,dtype", [
    (1, 2, 2, 700, 300, 128, True, (-1, -1), torch.bfloat16), (2, 4, 2, 333, 517, 128, True, (-1, -1), torch.float16),
    (1, 8, 2, 1000, 1000, 128, True, (-1, -1), torch.bfloat16), (2, 2, 1, 300, 300, 112, False, (90, 17), torch.bfloat16),
    (1, 2, 2, 517, 333, 128, True, (200, 0), torch.float16), (1, 2, 1, 80, 400, 128, False, (0, 0), torch.bfloat16)])
def test_cuda_warp_specialised_backward_80_queries_masked(monkeypatch, b, hq, hkv, nq, nk, d, causal, window, dtype):
    """The 80-query d128 steps on causal and windowed calls (the default; FlashAttention-3 takes 64 there), whose
    steps straddle the diagonal at other rows than the 64-query steps' (80-row steps over 128-key tiles); the
    profiler names the kernel that ran."""
    monkeypatch.setenv("FLASH_ATTN2_BWD_WS", "require")
    monkeypatch.delenv("FLASH_ATTN2_PORTABLE_KERNELS", raising=False)  # a Hopper kernel to be named
    opts = make_options(b, hq, causal, window, 0.0, None, 0.0, "cuda", seed=nq)
    check_variant_case(b, hq, hkv, nq, nk, d, dtype, "cuda", opts, transposed=True)
    q, k, v = random_qkv(b, hq, hkv, nq, nk, d, dtype, "cuda", requires_grad=True)
    names = cuda_kernel_names(lambda: flash_attn2.attention(q, k, v, **opts).sum().backward(),
                              "flash_bwd_sm90_ws_kernel")
    assert names and all("128, 80>" in n or "128, 80," in n for n in names), names


@requires_sm90
@pytest.mark.parametrize("mods", ["none", "softcap", "all"])
@pytest.mark.parametrize("nq,nk,causal,window,hkv", [
    (2048, 2048, False, (-1, -1), 2), (336, 400, True, (-1, -1), 1), (352, 300, False, (-1, -1), 2),
    (368, 517, True, (100, -1), 2), (384, 384, False, (50, 20), 1), (333, 700, False, (-1, -1), 2)])
def test_cuda_warp_specialised_backward_partial_last_step(monkeypatch, mods, nq, nk, causal, window, hkv):
    """The d128 WS backward's 80-query steps run a key tile's last step on 48 queries where no query from the 48th
    on sees its keys (kWsBwdPartialRows; 2048 = 25 x 80 + 48, 336 = 4 x 80 + 16, 352, 368 and 333 too, 384 not):
    the same gradients as every step on 80 (FLASH_ATTN2_BWD_PARTIAL_STEP=0), bit for bit where they are
    deterministic (dK and dV; dQ in the deterministic mode), on the plain and the softcap-only kernels (ALiBi +
    dropout + softcap: the kernel with every score modifier, which keeps 80, must give the same both ways), GQA
    and MQA, causal and windowed bands (whose key tiles end their steps at other rows); and against the float64
    reference."""
    monkeypatch.setenv("FLASH_ATTN2_BWD_WS", "require")
    b, hq, d = 2, 4, 128
    softcap, alibi, dropout_p = {"none": (0.0, None, 0.0), "softcap": (20.0, None, 0.0),
                                 "all": (5.0, "head", 0.1)}[mods]
    opts = make_options(b, hq, causal, window, softcap, alibi, dropout_p, "cuda", seed=nq)
    if nq != 2048:
        check_variant_case(b, hq, hkv, nq, nk, d, torch.bfloat16, "cuda", opts)
    q, k, v = random_qkv(b, hq, hkv, nq, nk, d, torch.bfloat16, "cuda")
    out, lse = flash_attn2.attention_with_lse(q, k, v, **opts)
    dout = torch.randn_like(out)
    kw = dict(window_size=list(window), softcap=softcap, alibi_slopes=opts["alibi_slopes"], dropout_p=dropout_p,
              rng_state=opts["rng_state"])
    grads = {}
    for flag in ("", "0"):
        monkeypatch.setenv("FLASH_ATTN2_BWD_PARTIAL_STEP", flag)
        grads[flag] = (F.bwd(dout, q, k, v, out, lse, causal, None, **kw),
                       F.bwd(dout, q, k, v, out, lse, causal, None, **kw, deterministic=True))
    (dq, dk, dv), det = grads[""]
    (dq0, dk0, dv0), det0 = grads["0"]
    assert torch.equal(dk, dk0) and torch.equal(dv, dv0)
    torch.testing.assert_close(dq.float(), dq0.float(), atol=2e-2, rtol=2e-2)
    for name, a, a0 in zip(("dq", "dk", "dv"), det, det0):
        assert torch.equal(a, a0), f"deterministic {name}: partial last step differs"


@requires_sm90
@pytest.mark.parametrize("softcap,alibi,dropout_p", [(30.0, None, 0.0), (0.0, None, 0.1), (0.0, "head", 0.0),
                                                     (5.0, "head", 0.0), (30.0, None, 0.1)])
@pytest.mark.parametrize("d", [64, 128])
def test_cuda_warp_specialised_backward_late_dp_choice(monkeypatch, softcap, alibi, dropout_p, d):
    """The larger steps' score-modifier kernels issue dP^T after P^T (BwdSm90WsTraits<..., true>) on every
    score-modifier call (beside S^T ptxas serialised their wgmma, and the switch for it is gone); the profiler
    names the kernel that ran."""
    monkeypatch.setenv("FLASH_ATTN2_BWD_WS", "require")
    monkeypatch.delenv("FLASH_ATTN2_PORTABLE_KERNELS", raising=False)  # a Hopper kernel to be named
    b, hq, hkv, nq, nk = 1, 2, 2, 200, 300
    opts = make_options(b, hq, False, (-1, -1), softcap, alibi, dropout_p, "cuda", seed=3)
    q, k, v = random_qkv(b, hq, hkv, nq, nk, d, torch.bfloat16, "cuda", requires_grad=True)
    names = cuda_kernel_names(lambda: flash_attn2.attention(q, k, v, **opts).sum().backward(),
                              "flash_bwd_sm90_ws_kernel")
    big = "128, 80, true>" if d == 128 else "64, 128, true>"
    assert names and all(big in n for n in names), names


SOFTCAP_BWD_KERNEL = "BwdSm90WsTraits<__nv_bfloat16, 128, 80, true>, true, true>"


@requires_sm90
@pytest.mark.parametrize("nq,nk,causal,window,hkv,d", [
    (333, 517, True, (-1, -1), 2, 128), (517, 333, False, (-1, -1), 4, 128), (700, 700, True, (200, 0), 2, 120),
    (300, 900, False, (250, 33), 1, 128)])
def test_cuda_warp_specialised_backward_softcap_kernel(monkeypatch, nq, nk, causal, window, hkv, d):
    """bfloat16 d128 backward calls whose only score modifier is a softcap (windows allowed) take a WS kernel of
    their own (BwdSm90WsTraits<bf16, 128, 80, true> with kSoftcapOnly; the profiler names it): in the deterministic
    mode bit for bit the score-modifier kernel's gradients (FLASH_ATTN2_BWD_SOFTCAP_KERNEL=0; the same arithmetic),
    and by default within PyTorch's own error of the float64 reference, dense (GQA, MQA, Nq != Nk, windows, d120)
    and packed (an empty sequence, one of a single query)."""
    monkeypatch.setenv("FLASH_ATTN2_BWD_WS", "require")
    monkeypatch.delenv("FLASH_ATTN2_PORTABLE_KERNELS", raising=False)  # a Hopper kernel to be named
    q, k, v = random_qkv(2, 4, hkv, nq, nk, d, torch.bfloat16, "cuda", transposed=True)
    kw = dict(window_size=list(window), softcap=30.0)
    out, lse = F.fwd_with_lse(q, k, v, causal, None, **kw)
    dout = torch.randn_like(out)

    def bwd(kernel):
        monkeypatch.setenv("FLASH_ATTN2_BWD_SOFTCAP_KERNEL", kernel)
        return F.bwd(dout, q, k, v, out, lse, causal, None, deterministic=True, **kw)
    names = cuda_kernel_names(lambda: bwd(""), "flash_bwd_sm90_ws_kernel")
    assert names and all(SOFTCAP_BWD_KERNEL in n for n in names), names
    names = cuda_kernel_names(lambda: bwd("0"), "flash_bwd_sm90_ws_kernel")
    assert names and not any(SOFTCAP_BWD_KERNEL in n for n in names), names
    for ours, mod in zip(bwd(""), bwd("0")):
        assert torch.equal(ours, mod)
    monkeypatch.setenv("FLASH_ATTN2_BWD_SOFTCAP_KERNEL", "")
    opts = make_options(2, 4, causal, window, 30.0, None, 0.0, "cuda")
    check_variant_case(2, 4, hkv, nq, nk, d, torch.bfloat16, "cuda", opts, transposed=True)
    opts = make_options(4, 4, causal, window, 30.0, None, 0.0, "cuda")
    check_varlen_against_reference([nq // 2, 0, 1, nq - nq // 2], [nk // 3, 40, 60, nk - nk // 3 - 100],
                                   torch.bfloat16, "cuda", opts, d=d)


@requires_sm90
@pytest.mark.parametrize("dtype,d,softcap,alibi,dropout_p", [
    (torch.float16, 128, 30.0, None, 0.0), (torch.bfloat16, 128, 30.0, "head", 0.0),
    (torch.bfloat16, 128, 30.0, None, 0.1), (torch.bfloat16, 64, 30.0, None, 0.0), (torch.bfloat16, 128, 0.0, None, 0.1)])
def test_cuda_warp_specialised_backward_softcap_kernel_leaves(monkeypatch, dtype, d, softcap, alibi, dropout_p):
    """The calls the WS backward's softcap kernel leaves to the others: float16, ALiBi, dropout, d64, no softcap."""
    monkeypatch.setenv("FLASH_ATTN2_BWD_WS", "require")
    monkeypatch.delenv("FLASH_ATTN2_PORTABLE_KERNELS", raising=False)
    monkeypatch.delenv("FLASH_ATTN2_BWD_SOFTCAP_KERNEL", raising=False)
    opts = make_options(1, 2, True, (-1, -1), softcap, alibi, dropout_p, "cuda", seed=3)
    q, k, v = random_qkv(1, 2, 2, 200, 300, d, dtype, "cuda", requires_grad=True)
    names = cuda_kernel_names(lambda: flash_attn2.attention(q, k, v, **opts).sum().backward(),
                              "flash_bwd_sm90_ws_kernel")
    assert names and not any("true>, true, true>" in n for n in names), names


@requires_sm90
@pytest.mark.parametrize("causal,window,softcap,alibi,dropout_p", [
    (True, (-1, -1), 30.0, "head", 0.0), (False, (200, 7), 0.0, "batch", 0.2), (True, (300, -1), 5.0, None, 0.1),
    (False, (-1, -1), 0.0, None, 0.0)])
@pytest.mark.parametrize("d,mod_big", [(64, ""), (128, ""), (64, "0"), (128, "0")])
def test_cuda_warp_specialised_backward_with_variants(monkeypatch, causal, window, softcap, alibi, dropout_p, d,
                                                      mod_big):
    """The warp-specialised backward (FLASH_ATTN2_BWD_WS=require) with the dense variants (by default with the
    larger steps, 128 queries at d64 and 80 at d128, dP^T after P^T; FLASH_ATTN2_BWD_WS_MOD_BIG=0: 64, dP^T beside
    S^T)."""
    monkeypatch.setenv("FLASH_ATTN2_BWD_WS", "require")
    monkeypatch.setenv("FLASH_ATTN2_BWD_WS_MOD_BIG", mod_big)
    opts = make_options(2, 4, causal, window, softcap, alibi, dropout_p, "cuda", seed=11)
    check_variant_case(2, 4, 2, 333, 517, d, torch.bfloat16, "cuda", opts, transposed=True)


@requires_sm90
@pytest.mark.parametrize("first_row", ["", "0"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("nq,nk,causal,window,softcap,dropout_p", [
    (700, 900, True, (301, -1), 0.0, 0.2), (900, 700, False, (250, 33), 4.0, 0.0), (517, 517, True, (90, 0), 0.0, 0.1)])
def test_cuda_warp_specialised_backward_steps_from_first_row(monkeypatch, first_row, d, nq, nk, causal, window,
                                                             softcap, dropout_p):
    """The WS backward's steps start at each key tile's first visible query rounded down to 16 (the default,
    BwdParams::steps_from_first_row) or at the multiple of the step's rows below it (FLASH_ATTN2_BWD_FIRST_ROW=0):
    both against the float64 reference on windows whose bands start off those multiples, with dropout (its draws
    come in groups of 16 queries), GQA, Nq != Nk, and a packed batch."""
    monkeypatch.setenv("FLASH_ATTN2_BWD_WS", "require")
    monkeypatch.setenv("FLASH_ATTN2_BWD_FIRST_ROW", first_row)
    check_dense_and_packed(nq, nk, d, causal, window, softcap, None, dropout_p, seeds=(5, 6))


@requires_sm90
@pytest.mark.parametrize("variant", ["causal", "all"])
@pytest.mark.parametrize("d", [64, 128])
def test_cuda_warp_specialised_backward_varlen(monkeypatch, variant, d):
    """Packed batches on the warp-specialised backward: rows past a sequence's end hold the next sequence's rows."""
    monkeypatch.setenv("FLASH_ATTN2_BWD_WS", "require")
    lengths_q, lengths_k = [300, 1, 129, 0, 520], [280, 64, 129, 7, 600]
    opts = {"causal": make_options(5, 4, True, (-1, -1), 0.0, None, 0.0, "cuda"),
            "all": make_options(5, 4, True, (37, -1), 3.0, "batch", 0.1, "cuda")}[variant]
    check_varlen_against_reference(lengths_q, lengths_k, torch.bfloat16, "cuda", opts, d=d)


@requires_sm90
@pytest.mark.parametrize("nq,nk,causal,window,d", [(700, 900, True, (300, -1), 128), (900, 700, True, (-1, -1), 128),
                                                   (520, 520, False, (-1, -1), 128), (333, 517, False, (64, 7), 128),
                                                   (700, 900, True, (300, -1), 64), (520, 520, False, (-1, -1), 64)])
def test_cuda_warp_specialised_backward_deterministic(monkeypatch, nq, nk, causal, window, d):
    """The WS backward's deterministic mode (the dQ writer adds each query tile in the key tiles' turn): bitwise
    the same over runs, and the default kernel's gradients to rounding."""
    q, k, v = random_qkv(2, 8, 2, nq, nk, d, torch.bfloat16, "cuda")
    out, lse = flash_attn2.attention_with_lse(q, k, v, causal, window_size=window)
    dout = torch.randn_like(out)

    def bwd(ws, **kw):
        monkeypatch.setenv("FLASH_ATTN2_BWD_WS", ws)
        return F.bwd(dout, q, k, v, out, lse, causal, None, window_size=list(window), **kw)
    assert_deterministic_backward(lambda: bwd("require", deterministic=True), lambda: bwd("0"))


@requires_sm90
@pytest.mark.parametrize("d", [64, 128])
def test_cuda_warp_specialised_backward_varlen_deterministic(monkeypatch, d):
    """Packed batches on the WS backward's deterministic mode: bitwise reproducible and equal to rounding to the
    default mode (rows past a sequence's end add zeros to the next sequence's rows outside any turn)."""
    monkeypatch.setenv("FLASH_ATTN2_BWD_WS", "require")
    check_varlen_deterministic([300, 0, 700, 5, 129], d=d)


@requires_sm90
@pytest.mark.parametrize("wide", ["", "2wg"])
@pytest.mark.parametrize("nq,nk,causal,window,d", [(700, 900, True, (300, -1), 256), (900, 700, True, (-1, -1), 256),
                                                   (333, 517, False, (64, 7), 240), (520, 520, False, (-1, -1), 256)])
def test_cuda_wide_backward_deterministic(monkeypatch, wide, nq, nk, causal, window, d):
    """The d256 backwards' deterministic mode: the dQ-warpgroup kernel (its dQ warpgroup adds each query tile in
    the key tiles' turn while the other two run ahead) and the split-role kernel (FLASH_ATTN2_BWD_WIDE=2wg):
    bitwise the same over runs, and the default mode's gradients to rounding."""
    monkeypatch.setenv("FLASH_ATTN2_BWD_WIDE", wide)
    q, k, v = random_qkv(2, 8, 2, nq, nk, d, torch.bfloat16, "cuda")
    out, lse = flash_attn2.attention_with_lse(q, k, v, causal, window_size=window)
    dout = torch.randn_like(out)
    bwd = lambda **kw: F.bwd(dout, q, k, v, out, lse, causal, None, window_size=list(window), **kw)
    assert_deterministic_backward(lambda: bwd(deterministic=True), bwd)


@requires_sm90
@pytest.mark.parametrize("wide", ["", "2wg"])
def test_cuda_wide_backward_varlen_deterministic(monkeypatch, wide):
    """Packed batches on the d256 backwards' deterministic mode (an empty sequence and one of 5 rows)."""
    monkeypatch.setenv("FLASH_ATTN2_BWD_WIDE", wide)
    check_varlen_deterministic([300, 0, 700, 5, 129], d=256)


@requires_sm90
@pytest.mark.parametrize("lengths_q,lengths_k", VARLEN_LENGTHS + [([300, 1, 129, 0, 520], [280, 64, 129, 7, 600])])
@pytest.mark.parametrize("variant", ["plain", "causal", "all"])
@pytest.mark.parametrize("blocks,walk", [("", ""), ("3", ""), ("3", "dynamic"), ("3", "tile")])
def test_cuda_warp_specialised_forward_varlen(monkeypatch, lengths_q, lengths_k, variant, blocks, walk):
    """Packed batches on the warp-specialised forward (one TMA map over all sequences); blocks = 3: a persistent
    grid of 3 blocks walks every tile, past-the-end and empty ones included, striding (walk = tile) or taking
    tiles from the per-call counter (walk = dynamic, the default for packed rows)."""
    monkeypatch.setenv("FLASH_ATTN2_FWD_WS", "require")
    monkeypatch.setenv("FLASH_ATTN2_FWD_WS_BLOCKS", blocks)
    monkeypatch.setenv("FLASH_ATTN2_FWD_WS_WALK", walk)
    opts = {"plain": make_options(len(lengths_q), 4, False, (-1, -1), 0.0, None, 0.0, "cuda"),
            "causal": make_options(len(lengths_q), 4, True, (-1, -1), 0.0, None, 0.0, "cuda"),
            "all": make_options(len(lengths_q), 4, True, (37, -1), 3.0, "batch", 0.1, "cuda")}[variant]
    check_varlen_against_reference(lengths_q, lengths_k, torch.bfloat16, "cuda", opts, d=128)


@requires_sm90
@pytest.mark.parametrize("case", ["window", "window_causal", "varlen", "varlen_causal"])
@pytest.mark.parametrize("d", [256])
def test_cuda_warp_specialised_forward_wide_key_tiles_with_variants(monkeypatch, case, d):
    """The d256 WS forward's wider key tiles (80 keys; FLASH_ATTN2_FWD_WS_BLOCKN=80) under the variants that keep
    the kernel without score modifiers: windows (tiles that see no key, masks on both sides) and packed batches."""
    monkeypatch.setenv("FLASH_ATTN2_FWD_WS", "require")
    monkeypatch.setenv("FLASH_ATTN2_FWD_WS_BLOCKN", "80")
    if case.startswith("window"):
        causal, window = (True, (300, -1)) if case == "window_causal" else (False, (200, 7))
        opts = make_options(2, 4, causal, window, 0.0, None, 0.0, "cuda", seed=3)
        check_variant_case(2, 4, 2, 333, 717, d, torch.bfloat16, "cuda", opts, transposed=True)
    else:
        lengths_q, lengths_k = [300, 1, 129, 0, 520], [280, 64, 177, 7, 600]
        opts = make_options(5, 4, case == "varlen_causal", (-1, -1), 0.0, None, 0.0, "cuda")
        check_varlen_against_reference(lengths_q, lengths_k, torch.bfloat16, "cuda", opts, d=d)


@requires_cuda
@pytest.mark.parametrize("lengths_q,lengths_k", VARLEN_LENGTHS + [([300, 1, 129, 0, 520], [280, 64, 129, 7, 600])])
@pytest.mark.parametrize("variant", ["plain", "causal", "all"])
@pytest.mark.parametrize("d", [64, 128])
def test_cuda_varlen_matches_per_sequence_reference(lengths_q, lengths_k, variant, d):
    b = len(lengths_q)
    if variant == "plain":
        opts = make_options(b, 4, False, (-1, -1), 0.0, None, 0.0, "cuda")
    elif variant == "causal":
        opts = make_options(b, 4, True, (-1, -1), 0.0, None, 0.0, "cuda")
    else:
        opts = make_options(b, 4, True, (60, -1), 8.0, "batch", 0.2, "cuda", seed=5)
    check_varlen_against_reference(lengths_q, lengths_k, torch.bfloat16, "cuda", opts, d=d)


@requires_cuda
@pytest.mark.parametrize("d", [64, 128, 256, 96])
def test_cuda_dropout_mask_equals_cpu_mask(d):
    """q = 0 makes P uniform over the keys, v = identity makes out[i, j] = keep[i, j] / ((1 - p) Nk): the CUDA
    forward's mask read back exactly; dO = identity does the same for the backward's dV = (P Z)^T dO."""
    nq, nk, p = d, d, 0.3
    rng = torch.tensor([99, 123])
    expected = flash_attn2.dropout_keep_mask(rng, 2, 3, nq, nk, p)
    q = torch.zeros(2, 3, nq, d, device="cuda", dtype=torch.bfloat16)
    eye = torch.eye(nk, d, device="cuda", dtype=torch.bfloat16).expand(2, 3, nk, d).contiguous()
    out = flash_attn2.attention(q, eye, eye, dropout_p=p, rng_state=rng)
    assert torch.equal((out.float().cpu() > 0), expected), "CUDA forward keep mask != CPU mask"
    qg = q.clone().requires_grad_()
    vg = eye.clone().requires_grad_()
    flash_attn2.attention(qg, eye, vg, dropout_p=p, rng_state=rng).backward(torch.eye(nq, d, device="cuda",
                                                                                      dtype=torch.bfloat16).expand_as(q))
    assert torch.equal((vg.grad.float().cpu() > 0).transpose(-1, -2)[..., :nq, :nk], expected), \
        "CUDA backward keep mask != CPU mask"


@requires_cuda
@pytest.mark.parametrize("d", [64, 128, 256, 96])
def test_cuda_deterministic_backward_is_bitwise_reproducible(d):
    q, k, v = random_qkv(2, 8, 2, 700, 900, d, torch.bfloat16, "cuda")
    out, lse = flash_attn2.attention_with_lse(q, k, v, True, window_size=(300, -1))
    dout = torch.randn_like(out)
    bwd = lambda **kw: F.bwd(dout, q, k, v, out, lse, True, None, window_size=[300, -1], **kw)
    assert_deterministic_backward(lambda: bwd(deterministic=True), bwd)
    # Through autograd: torch.use_deterministic_algorithms turns it on.
    torch.use_deterministic_algorithms(True)
    try:
        grads = []
        for _ in range(2):
            qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
            flash_attn2.attention(qq, kk, vv, True).backward(dout)
            grads.append((qq.grad, kk.grad, vv.grad))
        for a, b in zip(*grads):
            assert torch.equal(a, b)
    finally:
        torch.use_deterministic_algorithms(False)


@requires_cuda
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("nq,nk", [(520, 520), (200, 1000), (1000, 200), (130, 900)])
def test_cuda_deterministic_rotated_walk(monkeypatch, d, nq, nk):
    """Unmasked deterministic backwards with few key tiles walk rotated (each key tile from its own query tile,
    a query tile's turns in arrival order: RotatedDqWalk): bitwise reproducible and the default mode's gradients
    to rounding, as is the walk from query tile 0 (FLASH_ATTN2_DET_ROTATE=0); the two add in different orders,
    so their float32 sums differ somewhere (every shape here has two key tiles and two query tiles at least)."""
    q, k, v = random_qkv(2, 8, 2, nq, nk, d, torch.bfloat16, "cuda")
    out, lse = flash_attn2.attention_with_lse(q, k, v, False)
    dout = torch.randn_like(out)

    def bwd(rotate, **kw):
        monkeypatch.setenv("FLASH_ATTN2_DET_ROTATE", rotate)
        return F.bwd(dout, q, k, v, out, lse, False, None, **kw)
    assert_deterministic_backward(lambda: bwd("1", deterministic=True), lambda: bwd("1"))
    assert_deterministic_backward(lambda: bwd("0", deterministic=True), lambda: bwd("1"))
    rotated, plain = bwd("1", deterministic=True), bwd("0", deterministic=True)
    assert any(not torch.equal(a, b) for a, b in zip(rotated, plain)), "the rotated walk did not run"


@requires_cuda
def test_cuda_varlen_deterministic_rotated_walk(monkeypatch):
    """A packed unmasked batch (sequences of one, several and no query or key tiles) on the rotated walk:
    bitwise reproducible and the default mode's gradients to rounding."""
    monkeypatch.setenv("FLASH_ATTN2_DET_ROTATE", "1")
    lengths_q, lengths_k = [300, 1, 129, 0, 520, 700], [280, 64, 129, 7, 600, 700]
    q, k, v, cu_q, cu_k = packed_batch(lengths_q, lengths_k, 4, 2, 128, torch.bfloat16, "cuda")
    nq, nk = max(lengths_q), max(lengths_k)
    out, lse = flash_attn2.attention_varlen_with_lse(q, k, v, cu_q, cu_k, nq, nk, False)
    dout = torch.randn_like(out)
    bwd = lambda **kw: F.bwd_varlen(dout, q, k, v, out, lse, cu_q, cu_k, nq, nk, False, None, **kw)
    assert_deterministic_backward(lambda: bwd(deterministic=True), bwd)


@requires_cuda
def test_cuda_varlen_deterministic_and_graph_safe():
    check_varlen_deterministic([300, 0, 700, 5], d=64)


@requires_sm90
@pytest.mark.parametrize("case", ["dense", "variants", "packed", "packed_all", "deterministic"])
@pytest.mark.parametrize("dq", ["", "red"])
@pytest.mark.parametrize("loads", ["", "0"])
def test_cuda_wide_backward_tma_loads(monkeypatch, case, dq, loads):
    """The d256 dQ-warpgroup backward with its Q and dO copied by the TMA (the default) or by the compute threads'
    cp.async (FLASH_ATTN2_BWD_WIDE_TMA_LOADS=0): with the TMA, rows past a sequence's end hold the next sequence's
    rows (packed) or the TMA's zeros, made harmless by LSE = +inf there; with every score modifier, packed batches
    with empty sequences, head dims below 256 and the deterministic mode; dQ by reduce-adds and by red.add."""
    monkeypatch.setenv("FLASH_ATTN2_BWD_WIDE_TMA_LOADS", loads)
    monkeypatch.setenv("FLASH_ATTN2_BWD_WS_DQ", dq)
    if case == "dense":
        opts = make_options(2, 4, True, (-1, -1), 0.0, None, 0.0, "cuda", seed=1)
        check_variant_case(2, 4, 2, 333, 517, 256, torch.bfloat16, "cuda", opts, transposed=True)
        opts = make_options(1, 2, False, (-1, -1), 0.0, None, 0.0, "cuda", seed=2)
        check_variant_case(1, 2, 1, 700, 300, 240, torch.float16, "cuda", opts)
    elif case == "variants":
        opts = make_options(2, 4, True, (300, -1), 5.0, "batch", 0.1, "cuda", seed=3)
        check_variant_case(2, 4, 2, 200, 450, 256, torch.bfloat16, "cuda", opts, transposed=True)
    elif case in ("packed", "packed_all"):
        lengths_q, lengths_k = [300, 1, 129, 0, 520], [280, 64, 129, 7, 600]
        opts = make_options(5, 4, True, (-1, -1), 0.0, None, 0.0, "cuda") if case == "packed" else \
            make_options(5, 4, True, (37, -1), 3.0, "batch", 0.1, "cuda")
        check_varlen_against_reference(lengths_q, lengths_k, torch.bfloat16, "cuda", opts, d=256)
    else:
        check_varlen_deterministic([300, 0, 700, 5, 129], d=256)
