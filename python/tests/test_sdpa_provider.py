"""The SDPA backend provider: torch.nn.attention.activate_flash_attention_impl("flash_attn2") routes PyTorch's
flash-attention ops to flash_attn2 with aten's semantics, restore_flash_attention_impl() routes them back.

On the CPU (CI) the provider's adapters run through aten's own ops (PyTorch has no CPU kernel for them, so the
provider registers one); on a GPU they replace PyTorch's CUDA kernels and are compared with those."""

import warnings

import pytest
import torch
import torch.nn.attention as attn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.varlen import AuxRequest, varlen_attn

import flash_attn2
from conftest import requires_cuda
from reference import assert_close_to_reference, naive_attention

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
aten = torch.ops.aten


@pytest.fixture
def provider():
    attn.activate_flash_attention_impl("flash_attn2")
    try:
        yield
    finally:
        attn.restore_flash_attention_impl()


def counts():
    s = flash_attn2.sdpa_provider_status()
    return dict(forward=s["forward"], backward=s["backward"], fallback_forward=s["fallback_forward"],
                fallback_backward=s["fallback_backward"])


def advanced(before, **delta):
    """counts() after a call that should have moved each counter by delta (others unchanged)."""
    return {name: value + delta.get(name, 0) for name, value in before.items()}


def kernels(op):
    """The CPU and CUDA entries of an aten op's dispatch table."""
    lines = torch._C._dispatch_dump(f"aten::{op}").splitlines()
    return {line.split(":")[0]: line for line in lines if line.startswith(("CPU:", "CUDA:"))}


def built_with_cuda():
    return any(line.startswith("CUDA:") for line in torch._C._dispatch_dump("flash_attn2::fwd").splitlines())


def reference(q, k, v, dout, **kw):
    """(out, lse, dq, dk, dv) in float64 and in q's dtype (PyTorch's own rounding), for (B, H, N, D) inputs."""
    results = []
    for dtype in (torch.float64, q.dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out, lse = naive_attention(*leaves, **kw)
        grads = torch.autograd.grad(out, leaves, dout.to(dtype))
        results.append((out.detach(), lse.detach(), *grads))
    return results


def leaves(q_shape, kv_shape, device, dtype):
    """Random q, k, v leaves that require grad, and a dout like q."""
    q, k, v = (torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)
               for shape in (q_shape, kv_shape, kv_shape))
    return q, k, v, torch.randn_like(q)


def check(name, ours, ref64, same_dtype, factor=2.0):
    assert_close_to_reference(name, ours.detach(), same_dtype, ref64, factor)


def check_lse(ours, ref):
    """LSE as aten's flash kernel returns it: log-sum-exp where a row sees keys, +inf where it sees none."""
    ours, ref = ours.detach().cpu(), ref.cpu()
    empty = torch.isneginf(ref)
    assert torch.isposinf(ours[empty]).all(), "rows that see no key must have lse = +inf"
    torch.testing.assert_close(ours.double()[~empty], ref[~empty], atol=2e-2, rtol=0)


# ---- registration ------------------------------------------------------------------------------------------------

def test_registered_on_import_not_activated_and_routes_the_dispatcher():
    assert "flash_attn2" in attn.list_flash_attention_impls()
    assert attn.current_flash_attention_impl() is None
    assert not flash_attn2.sdpa_provider_status()["active"]
    ops = ["_flash_attention_forward", "_flash_attention_backward", "_scaled_dot_product_flash_attention",
           "_scaled_dot_product_flash_attention_backward"]
    before = {op: kernels(op) for op in ops}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attn.activate_flash_attention_impl("flash_attn2")
    assert not [w for w in caught if "Overriding" in str(w.message)], "replacing aten's kernels is the point"
    try:
        assert attn.current_flash_attention_impl() == "flash_attn2"
        assert flash_attn2.sdpa_provider_status()["active"]
        for op in ops:
            now = kernels(op)
            assert "sdpa_provider.cpp" in now["CPU"], now
            if built_with_cuda():
                assert "sdpa_provider.cpp" in now["CUDA"], now
            assert "sdpa_provider.cpp" not in before[op].get("CUDA", ""), "was active before activation"
        attn.activate_flash_attention_impl("flash_attn2")  # again: still one registration, still active
        assert flash_attn2.sdpa_provider_status()["active"]
    finally:
        attn.restore_flash_attention_impl()
    assert not flash_attn2.sdpa_provider_status()["active"]
    assert {op: kernels(op) for op in ops} == before


def test_switch_rejects_an_unknown_action():
    with pytest.raises(RuntimeError, match=r"action is 'on'; expected 'activate', 'restore' or 'status'"):
        torch.ops.flash_attn2._sdpa_provider("on")


# ---- aten's semantics --------------------------------------------------------------------------------------------

SHAPES = [(2, 4, 4, 37, 37, 64), (1, 6, 2, 33, 80, 40), (2, 2, 1, 65, 17, 128)]  # B, Hq, Hkv, Nq, Nk, D


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_flash_op(provider, device, shape, causal):
    """aten::_scaled_dot_product_flash_attention, (B, H, N, D) views of (B, N, H, D) buffers, GQA, Nq != Nk
    (bottom-right causal, as aten's flash kernel aligns it), and its autograd backward."""
    torch.manual_seed(0)
    b, hq, hkv, nq, nk, d = shape
    q, k, v = (torch.randn(b, n, h, d, device=device, dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
               for h, n in ((hq, nq), (hkv, nk), (hkv, nk)))
    dout = torch.randn(b, hq, nq, d, device=device, dtype=torch.bfloat16)
    before = counts()
    out, lse, cq, ck, mq, mk, seed, offset, debug = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    assert counts() == advanced(before, forward=1, backward=1)
    assert (cq, ck, mq, mk) == (None, None, nq, nk)
    assert (seed.shape, seed.dtype, offset.shape, offset.dtype) == ((2,), torch.uint64, (), torch.uint64)
    assert debug.numel() == 0 and lse.shape == (b, hq, nq) and lse.dtype == torch.float32
    for t, like in ((out, q), (dq, q), (dk, k), (dv, v)):  # aten's meta: empty_like of the input
        assert t.stride() == torch.empty_like(like).stride()
    ref, same = reference(q, k, v, dout, causal=causal)
    for name, ours, r, s in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), ref[:1] + ref[2:], same[:1] + same[2:]):
        check(name, ours, r, s)
    check_lse(lse, ref[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", [(None, None), (8, None), (None, 0), (5, 3), (-7, -2), (100, 100)])
@pytest.mark.parametrize("causal", [False, True])
def test_flash_attention_forward_dense(provider, device, window, causal):
    """aten::_flash_attention_forward on (B, N, H, D) inputs: windows with FlashAttention-2's rules (negative =
    unbounded, causal = right bound 0), a scale, GQA, and the backward through autograd."""
    torch.manual_seed(1)
    b, hq, hkv, nq, nk, d = 2, 4, 2, 29, 45, 32
    q, k, v, dout = leaves((b, nq, hq, d), (b, nk, hkv, d), device, torch.float16)
    left, right = window
    before = counts()
    out, lse, rng, unused, debug = aten._flash_attention_forward(
        q, k, v, None, None, nq, nk, 0.0, causal, False, scale=0.3, window_size_left=left, window_size_right=right)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    assert counts() == advanced(before, forward=1, backward=1)
    assert out.stride() == q.stride() and lse.shape == (b, hq, nq)
    bhnd = lambda t: t.transpose(1, 2)  # noqa: E731
    win = tuple(-1 if w is None or w < 0 else w for w in window)
    ref, same = reference(bhnd(q), bhnd(k), bhnd(v), bhnd(dout), causal=causal, scale=0.3, window_size=win)
    for name, ours, r, s in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), ref[:1] + ref[2:], same[:1] + same[2:]):
        check(name, bhnd(ours), r, s)
    check_lse(lse, ref[1])


def packed(lengths, h, d, device, dtype):
    t = torch.randn(sum(lengths), h, d, device=device, dtype=dtype, requires_grad=True)
    cu = torch.tensor([0] + list(lengths), device=device).cumsum(0).to(torch.int32)
    return t, cu


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window_size", [(-1, -1), (-1, 0), (6, 0), (4, 4)])
def test_varlen_attn(provider, device, window_size):
    """torch.nn.attention.varlen.varlen_attn (aten::_flash_attention_forward / _backward with cumulative sequence
    lengths): every sequence like the dense reference on its own slice, a sequence with fewer keys than queries
    (rows that see no key get lse = +inf under a right bound), the LSE in (H, T) layout."""
    torch.manual_seed(2)
    hq, hkv, d = 4, 2, 64
    len_q, len_k = [13, 1, 40, 9], [13, 7, 52, 3]
    q, cu_q = packed(len_q, hq, d, device, torch.bfloat16)
    k, cu_k = packed(len_k, hkv, d, device, torch.bfloat16)
    v, _ = packed(len_k, hkv, d, device, torch.bfloat16)
    dout = torch.randn_like(q)
    before = counts()
    out, lse = varlen_attn(q, k, v, cu_q, cu_k, max(len_q), max(len_k), return_aux=AuxRequest(lse=True),
                           window_size=window_size)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    assert counts() == advanced(before, forward=1, backward=1)
    assert lse.shape == (hq, sum(len_q))
    causal = window_size == (-1, 0)
    sq, sk = cu_q.tolist(), cu_k.tolist()
    for i in range(len(len_q)):
        rows, keys = slice(sq[i], sq[i + 1]), slice(sk[i], sk[i + 1])
        seq = lambda t, r: t[r].transpose(0, 1)[None]  # noqa: E731  (1, H, n, D)
        ref, same = reference(seq(q, rows), seq(k, keys), seq(v, keys), seq(dout, rows), causal=causal,
                              window_size=window_size)
        got = (seq(out, rows), seq(dq, rows), seq(dk, keys), seq(dv, keys))
        for name, ours, r, s in zip(("out", "dq", "dk", "dv"), got, ref[:1] + ref[2:], same[:1] + same[2:]):
            check(f"sequence {i} {name}", ours, r, s)
        check_lse(lse[:, rows][None], ref[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_dropout_state_follows_atens_contract(provider, device, causal):
    """Dropout draws [seed, offset] from the device's default generator (advancing it), returns it in aten's
    rng_state (2,) uint64, and the backward regenerates exactly the forward's keep mask from it: out and grads
    equal flash_attn2's own ops given that [seed, offset]."""
    torch.manual_seed(3)
    b, h, nq, nk, d, p = 2, 3, 50, 70, 64, 0.3
    q, k, v, dout = leaves((b, h, nq, d), (b, h, nk, d), device, torch.bfloat16)
    out, lse, _, _, _, _, seed, offset, _ = aten._scaled_dot_product_flash_attention(q, k, v, p, causal)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    state = seed.view(torch.int64).cpu()
    with torch.no_grad():
        want_out, want_lse = flash_attn2.attention_with_lse(q, k, v, causal, dropout_p=p, rng_state=state)
        want = torch.ops.flash_attn2.bwd(dout, q, k, v, want_out, want_lse, causal, dropout_p=p, rng_state=state)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    for got, expected in zip((dq, dk, dv), want):
        assert torch.equal(got, expected)
    # About p of the probabilities were dropped: compare with the output without dropout.
    keep = flash_attn2.dropout_keep_mask(state, b, h, nq, nk, p, device=q.device)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.03
    second = aten._scaled_dot_product_flash_attention(q, k, v, p, causal)[6]
    assert not torch.equal(second.cpu(), seed.cpu()), "the generator must advance between calls"


@pytest.mark.parametrize("device", DEVICES)
def test_backward_of_a_foreign_dropout_forward_is_not_ours(provider, device):
    """A dropout backward whose rng_state flash_attn2 did not write (its forward ran on PyTorch's kernel) must not
    run here: the mask would differ. On a GPU it goes to PyTorch's kernel; on the CPU there is none."""
    torch.manual_seed(4)
    q, k, v, dout = (torch.randn(1, 2, 16, 32, device=device, dtype=torch.bfloat16) for _ in range(4))
    out, lse, _, _, _, _, seed, offset, _ = aten._scaled_dot_product_flash_attention(q, k, v, 0.2, False)
    # The same numbers in new tensors, with a tag that is not ours: what a stock forward's state looks like.
    foreign_seed, foreign_tag = seed.clone(), torch.zeros_like(offset)
    before = counts()
    call = lambda: aten._scaled_dot_product_flash_attention_backward(  # noqa: E731
        dout, q, k, v, out, lse, None, None, 16, 16, 0.2, False, foreign_seed, foreign_tag)
    if device == "cpu":
        with pytest.raises(RuntimeError, match="cannot run dropout whose forward ran on PyTorch's kernel"):
            call()
    else:
        call()
    assert counts() == advanced(before, fallback_backward=1)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_state_is_found_on_the_host_or_by_its_tag(provider, device):
    """The backward finds [seed, offset] from the forward's own rng_state tensor without reading the device (the
    tag may even be wrong), or, for a copy of the state, by reading it and its tag back; both give the forward's
    mask."""
    torch.manual_seed(10)
    q, k, v, dout = (torch.randn(1, 2, 16, 32, device=device, dtype=torch.bfloat16) for _ in range(4))
    out, lse, _, _, _, _, seed, offset, _ = aten._scaled_dot_product_flash_attention(q, k, v, 0.3, True)
    state = seed.view(torch.int64).cpu()
    want = torch.ops.flash_attn2.bwd(dout, q, k, v, out, lse, True, dropout_p=0.3, rng_state=state)
    for s, tag in ((seed, torch.zeros_like(offset)), (seed.clone(), offset.clone())):
        before = counts()
        got = aten._scaled_dot_product_flash_attention_backward(dout, q, k, v, out, lse, None, None, 16, 16, 0.3,
                                                                True, s, tag)
        assert counts() == advanced(before, backward=1)
        for g, w in zip(got, want):
            assert torch.equal(g, w)


@pytest.mark.parametrize("device", DEVICES)
def test_what_flash_attn2_cannot_do_goes_to_the_stock_kernel(provider, device):
    """return_debug_mask, seqused_k, alibi_slopes and float32 are PyTorch's kernel's business: on a GPU they run
    there (same result as before activation), on the CPU they fail with the reason."""
    torch.manual_seed(5)
    q, k, v = (torch.randn(1, 20, 2, 64, device=device, dtype=torch.bfloat16) for _ in range(3))
    cu = torch.tensor([0, 20], device=device, dtype=torch.int32)
    cases = {
        "return_debug_mask": lambda: aten._flash_attention_forward(q, k, v, None, None, 20, 20, 0.0, False, True),
        "seqused_k": lambda: aten._flash_attention_forward(q[0], k[0], v[0], cu, cu, 20, 20, 0.0, False, False,
                                                           seqused_k=cu[1:]),
        "alibi_slopes": lambda: aten._flash_attention_forward(
            q, k, v, None, None, 20, 20, 0.0, False, False,
            alibi_slopes=torch.ones(2, device=device, dtype=torch.float32)),
        "dtype Float": lambda: aten._scaled_dot_product_flash_attention(q.float(), k.float(), v.float()),
    }
    for reason, call in cases.items():
        before = counts()
        if device == "cpu":
            with pytest.raises(RuntimeError, match=f"flash_attn2's SDPA provider cannot run {reason}"):
                call()
        else:  # what PyTorch's kernel does without the provider: the same result, or the same error
            def outcome():
                try:
                    return call()[0]
                except RuntimeError as e:
                    return str(e).splitlines()[0]

            got = outcome()
            attn.restore_flash_attention_impl()
            try:
                want = outcome()
            finally:
                attn.activate_flash_attention_impl("flash_attn2")
            assert type(got) is type(want) and (got == want if isinstance(got, str) else torch.equal(got, want)), \
                reason
        assert counts() == advanced(before, fallback_forward=1), reason


# ---- on the GPU, against PyTorch's own flash kernel --------------------------------------------------------------

def run_sdpa(q, k, v, dout, **kw):
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = F.scaled_dot_product_attention(q, k, v, **kw)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 8, 8, 1000, 1000, 128), (1, 16, 4, 517, 517, 64), (3, 4, 4, 300, 300, 256)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
def test_scaled_dot_product_attention_flash_path_matches_stock(dtype, shape, causal):
    """F.scaled_dot_product_attention under sdpa_kernel(FLASH_ATTENTION): stock before activation, flash_attn2
    after (within the dtype's rounding of the float64 reference, as the stock kernel is), stock again (bitwise)
    after restore."""
    torch.manual_seed(6)
    b, hq, hkv, n, _, d = shape
    kw = dict(is_causal=causal, enable_gqa=hq != hkv)
    q = torch.randn(b, n, hq, d, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(b, n, hkv, d, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()
    v = torch.randn(b, n, hkv, d, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()
    dout = torch.randn(b, hq, n, d, device="cuda", dtype=dtype)
    stock = run_sdpa(q, k, v, dout, **kw)
    before = counts()
    attn.activate_flash_attention_impl("flash_attn2")
    try:
        ours = run_sdpa(q, k, v, dout, **kw)
        assert counts() == advanced(before, forward=1, backward=1)
    finally:
        attn.restore_flash_attention_impl()
    again = run_sdpa(q, k, v, dout, **kw)
    assert counts() == advanced(before, forward=1, backward=1), "restore must route back to PyTorch's kernel"
    assert torch.equal(stock[0], again[0])
    for s, a in zip(stock[1:], again[1:]):  # PyTorch's dq accumulates with atomics: equal to rounding only
        torch.testing.assert_close(s, a, atol=2e-3, rtol=1e-2)
    ref, _ = reference(q, k, v, dout, causal=causal)
    for name, o, s, r in zip(("out", "dq", "dk", "dv"), ours, stock, ref[:1] + ref[2:]):
        assert o.stride() == s.stride(), f"{name}: strides {o.stride()} vs stock {s.stride()}"
        check(name, o, r, s)


@requires_cuda
@pytest.mark.parametrize("window_size", [(-1, -1), (-1, 0), (64, 0)])
def test_varlen_attn_matches_stock(window_size):
    torch.manual_seed(7)
    lengths = [300, 1, 700, 129]
    q, cu = packed(lengths, 8, 128, "cuda", torch.bfloat16)
    k, _ = packed(lengths, 8, 128, "cuda", torch.bfloat16)
    v, _ = packed(lengths, 8, 128, "cuda", torch.bfloat16)
    dout = torch.randn_like(q)

    def run():
        out, lse = varlen_attn(q, k, v, cu, cu, max(lengths), max(lengths), return_aux=AuxRequest(lse=True),
                               window_size=window_size)
        return (out, lse, *torch.autograd.grad(out, (q, k, v), dout))

    stock = run()
    before = counts()
    attn.activate_flash_attention_impl("flash_attn2")
    try:
        ours = run()
    finally:
        attn.restore_flash_attention_impl()
    assert counts() == advanced(before, forward=1, backward=1)
    torch.testing.assert_close(ours[1], stock[1], atol=1e-3, rtol=0)
    for name, o, s in zip(("out", "dq", "dk", "dv"), ours[:1] + ours[2:], stock[:1] + stock[2:]):
        err = (o.float() - s.float()).abs().max().item()
        scale = s.float().abs().max().item()
        assert err <= 2e-2 * max(scale, 1.0), f"{name}: {err} vs stock (max |stock| {scale})"


@requires_cuda
def test_compiled_sdpa_runs_on_the_provider():
    """torch.compile keeps aten's flash op in the graph (meta strides = ours) and calls it at run time."""
    torch.manual_seed(8)
    q, k, v = (torch.randn(2, 512, 8, 64, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
               for _ in range(3))

    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).sum(-1)

    compiled = torch.compile(f, fullgraph=True)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        want = f(q, k, v)
        want_g = torch.autograd.grad(want.sum(), (q, k, v))
        before = counts()
        attn.activate_flash_attention_impl("flash_attn2")
        try:
            got = compiled(q, k, v)
            got_g = torch.autograd.grad(got.sum(), (q, k, v))
        finally:
            attn.restore_flash_attention_impl()
    assert counts() == advanced(before, forward=1, backward=1)
    torch.testing.assert_close(got, want, atol=3e-2, rtol=2e-2)
    for g, w in zip(got_g, want_g):
        torch.testing.assert_close(g, w, atol=3e-2, rtol=2e-2)


@requires_cuda
def test_dropout_under_graph_capture_goes_to_the_stock_kernel(provider):
    """flash_attn2's dropout state is read on the host, so a captured dropout step (forward and backward) is
    PyTorch's, graph-safe, and replays with a fresh mask."""
    torch.manual_seed(9)
    q, k, v = (torch.randn(1, 4, 128, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn(1, 4, 128, 64, device="cuda", dtype=torch.bfloat16)

    def step():
        out = aten._scaled_dot_product_flash_attention(q, k, v, 0.1, False)[0]
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    before = counts()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        results = step()
    assert counts() == advanced(before, fallback_forward=1, fallback_backward=1)
    graph.replay()
    first = [t.clone() for t in results]
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.isfinite(t).all() for t in results)
    assert not torch.equal(first[0], results[0]), "each replay must draw a new dropout mask"
