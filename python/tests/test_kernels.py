"""fwd, LSE and bwd of every device kernel vs the float64 reference over a shape sweep."""

import pytest
import torch

import flash_attn2
from conftest import cuda_kernel_names, requires_cuda, requires_sm90
from reference import assert_close_to_reference, naive_attention, random_qkv


def check_case(b, hq, hkv, nq, nk, d, causal, dtype, device, transposed):
    q, k, v = random_qkv(b, hq, hkv, nq, nk, d, dtype, device, transposed, requires_grad=True)
    dout = torch.randn(b, hq, nq, d, dtype=dtype, device=device)
    q64, k64, v64 = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))

    if device == "cuda":  # poison the allocator's free blocks so unwritten output shows up as NaN
        torch.empty(64 << 20, dtype=torch.uint8, device=device).fill_(0xFF)
    out, lse = flash_attn2.attention_with_lse(q, k, v, causal)
    ref_out, ref_lse = naive_attention(q64, k64, v64, causal)
    torch_out, torch_lse = naive_attention(q.detach(), k.detach(), v.detach(), causal)
    assert out.dtype == dtype and out.device.type == device and out.stride() == torch.empty_like(q).stride()
    assert_close_to_reference("out", out.detach(), torch_out, ref_out.detach())
    visible = torch.isfinite(ref_lse.detach())
    assert torch.equal(torch.isfinite(lse).cpu(), visible), "lse must be -inf exactly on rows with no key"
    assert_close_to_reference("lse", lse.cpu()[visible], torch_lse.cpu()[visible], ref_lse.detach()[visible])

    out.backward(dout)
    ref_out.backward(dout.double().cpu())
    tq, tk, tv = (t.detach().requires_grad_() for t in (q, k, v))
    naive_attention(tq, tk, tv, causal)[0].backward(dout)
    for name, ours, theirs, ref in (("dq", q, tq, q64), ("dk", k, tk, k64), ("dv", v, tv, v64)):
        assert_close_to_reference(name, ours.grad, theirs.grad, ref.grad)


CPU_CASES = [
    (2, 4, 2, 17, 17, 64, False, torch.float32, False),
    (1, 2, 1, 257, 100, 32, True, torch.float32, True),
    (1, 3, 3, 100, 257, 72, True, torch.float64, False),
    (2, 8, 1, 1000, 1, 64, True, torch.bfloat16, True),
    (1, 2, 2, 1, 1000, 128, True, torch.float16, False),
]


@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,causal,dtype,transposed", CPU_CASES)
def test_cpu_matches_reference(b, hq, hkv, nq, nk, d, causal, dtype, transposed):
    check_case(b, hq, hkv, nq, nk, d, causal, dtype, "cpu", transposed)


@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,dtype", [(2, 4, 2, 300, 600, 64, torch.float32),
                                                   (1, 4, 4, 513, 70, 32, torch.float64)])
def test_cpu_wide_query_tiles(b, hq, hkv, nq, nk, d, dtype):
    """Unmasked forwards take 256-row query tiles when that leaves every thread at least four tasks: with one
    thread these shapes do (tails of 44 and 1 rows, key tiles of 512 and a partial one). The unmasked backward
    takes them always (here: gradients through tails of 44 and 1 rows, float32 operands read in place through
    the transposed views' strides, float64 ones too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        check_case(b, hq, hkv, nq, nk, d, False, dtype, "cpu", True)
    finally:
        torch.set_num_threads(threads)


CUDA_CASES = []
for _dtype in (torch.bfloat16, torch.float16):
    for _d in (32, 64, 72, 96, 128, 160, 192, 224, 256):
        CUDA_CASES.append((2, 4, 4, 257, 257, _d, _d % 64 == 0, _dtype, _d == 128))
    for _causal in (False, True):
        for _n in (1, 17, 128, 1000, 4096):
            CUDA_CASES.append((1, 2, 2, _n, _n, 64, _causal, _dtype, False))
        CUDA_CASES.append((2, 8, 1, 1000, 17, 128, _causal, _dtype, True))
        CUDA_CASES.append((2, 16, 2, 17, 1000, 64, _causal, _dtype, False))


@requires_cuda
@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,causal,dtype,transposed", CUDA_CASES)
def test_cuda_matches_reference(b, hq, hkv, nq, nk, d, causal, dtype, transposed):
    check_case(b, hq, hkv, nq, nk, d, causal, dtype, "cuda", transposed)


LAYOUT_DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


@pytest.mark.parametrize("device", LAYOUT_DEVICES)
def test_outputs_follow_the_inputs_memory_order(device):
    """out follows q's memory order, dq / dk / dv follow q / k / v (a (B, N, H, D) buffer viewed as (B, H, N, D)
    gives outputs with the same strides), in eager mode and under torch.compile; inputs that are not dense with a
    contiguous last dim give contiguous outputs."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    b, hq, hkv, n, d = 2, 4, 2, 37, 32
    q = torch.randn(b, n, hq, d, device=device, dtype=dtype).transpose(1, 2)  # (B, N, H, D) buffer
    k = torch.randn(b, hkv, n, d, device=device, dtype=dtype)                 # contiguous
    v = torch.randn(b, n, hkv, d, device=device, dtype=dtype).transpose(1, 2)
    out, lse = flash_attn2.attention_with_lse(q, k, v, True)
    assert out.stride() == q.stride() and lse.is_contiguous()
    dq, dk, dv = torch.ops.flash_attn2.bwd(torch.randn_like(out), q, k, v, out, lse, True)
    assert (dq.stride(), dk.stride(), dv.stride()) == (q.stride(), k.stride(), v.stride())
    # non-dense q (one third of a packed (B, N, 3, H, D) qkv buffer): contiguous out
    qkv = torch.randn(b, n, 3, hq, d, device=device, dtype=dtype)
    q3 = qkv[:, :, 0].transpose(1, 2)
    assert flash_attn2.attention(q3, k, v).is_contiguous()
    # varlen: packed (T, H, D) views of a (T, H, D) buffer and of a (H, T, D) buffer
    cu = torch.tensor([0, 20, 37], dtype=torch.int32, device=device)
    qp = torch.randn(hq, n, d, device=device, dtype=dtype).transpose(0, 1)
    kp = torch.randn(n, hkv, d, device=device, dtype=dtype)
    assert flash_attn2.attention_varlen(qp, kp, kp, cu, cu, 20, 20).stride() == qp.stride()

    def step(q, k, v):
        out, lse = flash_attn2.attention_with_lse(q, k, v, True)
        return out, torch.ops.flash_attn2.bwd(torch.ones_like(out), q, k, v, out, lse, True)

    compiled = torch.compile(step, fullgraph=True)
    c_out, c_grads = compiled(q, k, v)
    e_out, e_grads = step(q, k, v)
    assert c_out.stride() == e_out.stride() == q.stride()
    assert [g.stride() for g in c_grads] == [g.stride() for g in e_grads]


# The warp-specialised forward (FLASH_ATTN2_FWD_WS; "require" raises where it would fall back), d64 on three
# consumers, d128 and d256 on two:
# key ranges from one tile to many turns of its 2-stage ring, masks, GQA, Nq != Nk, rows that see no key, padded
# head dims and both input layouts (Nq >= 17: fewer queries take the split-KV kernel).
WS_CASES = [
    (2, 4, 4, 257, 257, 128, False, torch.bfloat16, False),
    (2, 4, 4, 257, 257, 128, True, torch.bfloat16, True),
    (1, 8, 2, 1000, 1000, 128, True, torch.float16, False),
    (2, 4, 1, 300, 700, 120, False, torch.bfloat16, True),
    (1, 2, 2, 700, 300, 104, True, torch.float16, False),
    (1, 2, 2, 4096, 4096, 128, True, torch.bfloat16, False),
    (3, 2, 2, 17, 70, 128, False, torch.bfloat16, True),
    (2, 4, 4, 257, 257, 64, True, torch.bfloat16, False),
    (2, 2, 2, 130, 300, 40, False, torch.float16, True),
    (1, 4, 2, 300, 700, 256, False, torch.float16, True),
    (1, 2, 2, 500, 500, 232, True, torch.bfloat16, False),
]


@requires_sm90
@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,causal,dtype,transposed", WS_CASES)
def test_cuda_warp_specialised_forward(monkeypatch, b, hq, hkv, nq, nk, d, causal, dtype, transposed):
    monkeypatch.setenv("FLASH_ATTN2_FWD_WS", "require")
    check_case(b, hq, hkv, nq, nk, d, causal, dtype, "cuda", transposed)


@requires_sm90
@pytest.mark.parametrize("d,dtype", [(64, torch.bfloat16), (128, torch.float16), (256, torch.bfloat16)])
def test_cuda_warp_specialised_forward_lazy_rescale_moves(monkeypatch, d, dtype):
    """Score-modifier kernels (and d256) move a row's running max only when P would exceed 2^8. The kernel walks
    key tiles from the last down: keys that grow toward the front make the max move by far more than that, tile
    after tile (raw scores up to ~8 sqrt(d) apart), so every rescale path runs; softcap 500 keeps the modifier
    kernel but barely bends the scores."""
    monkeypatch.setenv("FLASH_ATTN2_FWD_WS", "require")
    torch.manual_seed(5)
    nk = 1100
    q = torch.randn(2, 4, 300, d, device="cuda", dtype=dtype) * 2
    ramp = torch.linspace(4.0, 0.25, nk, device="cuda").view(1, 1, nk, 1)
    k = (torch.randn(2, 2, nk, d, device="cuda", dtype=torch.float32) * ramp).to(dtype)
    v = torch.randn(2, 2, nk, d, device="cuda", dtype=dtype)
    for causal in (False, True):
        for kw in ({}, {"softcap": 500.0}):
            out, lse = flash_attn2.attention_with_lse(q, k, v, causal, **kw)
            ref_out, ref_lse = naive_attention(q.double().cpu(), k.double().cpu(), v.double().cpu(), causal, **kw)
            torch_out, torch_lse = naive_attention(q, k, v, causal, **kw)
            assert_close_to_reference("out", out, torch_out, ref_out)
            assert_close_to_reference("lse", lse.cpu(), torch_lse.cpu(), ref_lse)


# The warp-specialised backward, the default on sm_90 at d64 and d128 (FLASH_ATTN2_BWD_WS; "require" raises where
# it would fall back): one key tile to many, GQA groups, Nq != Nk both ways, rows that see no key, partial tiles,
# padded head dims, both layouts (the forward's d128-bucket cases but its 4k one, and a key range of many tiles for
# few queries); at d64 an odd and an even number of steps per block (the consumers take the steps' dQ in turn).
WS_BWD_CASES = [WS_CASES[i] for i in (0, 1, 2, 3, 4, 6)] + [
    (1, 2, 2, 64, 2000, 128, True, torch.bfloat16, False),
    (2, 4, 4, 257, 257, 64, False, torch.bfloat16, False),
    (1, 8, 2, 1000, 1000, 64, True, torch.float16, True),
    (2, 4, 1, 300, 700, 40, True, torch.bfloat16, False),
    (3, 2, 2, 17, 70, 64, False, torch.float16, True),
    (1, 2, 2, 700, 300, 56, True, torch.bfloat16, True),
]


@requires_sm90
@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,causal,dtype,transposed", WS_BWD_CASES)
def test_cuda_warp_specialised_backward(monkeypatch, b, hq, hkv, nq, nk, d, causal, dtype, transposed):
    monkeypatch.setenv("FLASH_ATTN2_BWD_WS", "require")
    check_case(b, hq, hkv, nq, nk, d, causal, dtype, "cuda", transposed)


@requires_sm90
@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,causal,dtype,transposed", [WS_BWD_CASES[i] for i in (1, 3, 5, 8, 9)])
def test_cuda_warp_specialised_backward_dq_by_red_add(monkeypatch, b, hq, hkv, nq, nk, d, causal, dtype, transposed):
    """FLASH_ATTN2_BWD_WS_DQ=red: the A/B switch back to red.add for dQ (the default: TMA reduce-adds)."""
    monkeypatch.setenv("FLASH_ATTN2_BWD_WS", "require")
    monkeypatch.setenv("FLASH_ATTN2_BWD_WS_DQ", "red")
    check_case(b, hq, hkv, nq, nk, d, causal, dtype, "cuda", transposed)


@requires_sm90
@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,causal,dtype,transposed", [
    (2, 4, 2, 333, 517, 128, False, torch.bfloat16, False), (1, 2, 2, 80, 128, 128, False, torch.float16, True),
    (1, 8, 2, 1000, 700, 128, False, torch.bfloat16, True), (2, 2, 1, 17, 300, 112, False, torch.float16, False),
    (1, 2, 2, 700, 300, 128, True, torch.bfloat16, False),
    (2, 4, 2, 333, 517, 64, False, torch.bfloat16, False), (1, 2, 2, 128, 128, 64, True, torch.float16, True),
    (1, 8, 2, 1000, 1000, 64, True, torch.bfloat16, True), (2, 2, 1, 17, 300, 40, False, torch.float16, False),
    (1, 2, 2, 700, 300, 56, True, torch.bfloat16, False)])
@pytest.mark.parametrize("blockm", ["", "64"])
def test_cuda_warp_specialised_backward_larger_steps(monkeypatch, blockm, b, hq, hkv, nq, nk, d, causal, dtype,
                                                    transposed):
    """The WS backward's step sizes: by default FlashAttention-3's larger steps. d128: 80 queries a step, its dQ
    transposed (dQ^T = K^T dS^T, dS stored query-major by stmatrix.trans), causal or not (64 on causal calls with
    FLASH_ATTN2_BWD_WS_M80_MASKED=0). d64: 128 queries a step, each consumer the dQ of its
    own 64 rows, causal or not. One dQ buffer. FLASH_ATTN2_BWD_WS_BLOCKM=64 keeps 64 queries a step (A/B runs).
    Steps that end past the sequence, exact tiles, many steps with GQA, padded head dims with few queries."""
    monkeypatch.setenv("FLASH_ATTN2_BWD_WS", "require")
    monkeypatch.setenv("FLASH_ATTN2_BWD_WS_BLOCKM", blockm)
    check_case(b, hq, hkv, nq, nk, d, causal, dtype, "cuda", transposed)


@requires_sm90
@pytest.mark.parametrize("blockm", ["", "64"])
def test_cuda_warp_specialised_backward_larger_steps_are_the_kernels_that_run(monkeypatch, blockm):
    """The cases above are right whichever kernel runs: the profiler's kernel names say which one did (by default
    d128: 80 queries a step, on causal calls 64 with FLASH_ATTN2_BWD_WS_M80_MASKED=0; d64: 128 either way;
    FLASH_ATTN2_BWD_WS_BLOCKM=64: 64 always)."""
    monkeypatch.setenv("FLASH_ATTN2_BWD_WS", "require")
    monkeypatch.delenv("FLASH_ATTN2_PORTABLE_KERNELS", raising=False)  # a Hopper kernel to be named
    monkeypatch.setenv("FLASH_ATTN2_BWD_WS_BLOCKM", blockm)
    big = blockm == ""
    for d, causal, m80_masked, traits in ((128, False, "", "128, 80" if big else "128, 64"),
                                          (128, True, "", "128, 80" if big else "128, 64"),
                                          (128, True, "0", "128, 64"), (64, True, "", "64, 128" if big else "64, 64")):
        monkeypatch.setenv("FLASH_ATTN2_BWD_WS_M80_MASKED", m80_masked)
        q, k, v = (torch.randn(1, 2, 300, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        names = cuda_kernel_names(lambda: flash_attn2.attention(q, k, v, causal).sum().backward(),
                                  "flash_bwd_sm90_ws_kernel")
        assert names, "the profiler recorded no WS backward kernel"
        # (the traits' head dim and step, followed by their further arguments or their end)
        assert all(traits + ">" in n or traits + "," in n for n in names), (d, causal, m80_masked, names)


@requires_sm90
@pytest.mark.parametrize("wide,dq", [("", ""), ("", "red"), ("2wg", ""), ("2wg", "red")])
@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,causal,dtype,transposed", [
    (2, 4, 2, 333, 517, 256, True, torch.bfloat16, True), (1, 2, 1, 700, 300, 256, False, torch.float16, False),
    (2, 2, 2, 65, 129, 240, True, torch.bfloat16, False), (1, 3, 3, 200, 200, 232, False, torch.bfloat16, True),
    (1, 2, 1, 150, 90, 248, True, torch.float16, False)])
def test_cuda_wide_backward_dq(monkeypatch, wide, dq, b, hq, hkv, nq, nk, d, causal, dtype, transposed):
    """The d256 backwards: the dQ-warpgroup kernel (the default; its dQ from the third warpgroup, a step behind
    the other two, through two dS^T buffers, by TMA reduce-adds of each warp's 16 x 32 boxes through one buffer,
    or by the threads' red.add with FLASH_ATTN2_BWD_WS_DQ=red; P^T handed over as float16), and the split-role
    kernel (FLASH_ATTN2_BWD_WIDE=2wg) with its dQ by TMA reduce-adds from each warpgroup's stage buffer or by
    red.add. Many query steps per key tile (the buffers reused), GQA, Nq != Nk, a sequence that ends inside a
    step, head dims below 256 (columns past d clipped)."""
    monkeypatch.setenv("FLASH_ATTN2_BWD_WIDE", wide)
    monkeypatch.setenv("FLASH_ATTN2_BWD_WS_DQ", dq)
    check_case(b, hq, hkv, nq, nk, d, causal, dtype, "cuda", transposed)


@requires_sm90
@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,dtype,transposed", [
    (2, 4, 2, 333, 256, 128, torch.bfloat16, False), (1, 2, 2, 80, 500, 128, torch.float16, True),
    (1, 8, 2, 1000, 1024, 128, torch.bfloat16, True), (2, 2, 1, 17, 200, 112, torch.float16, False),
    (1, 8, 8, 700, 250, 120, torch.float16, True)])
@pytest.mark.parametrize("blockm", ["", "64"])
def test_cuda_warp_specialised_backward_clusters(monkeypatch, blockm, b, hq, hkv, nq, nk, d, dtype, transposed):
    """Uniform rows with an even number of key tiles a head, outside the deterministic mode: the WS backward (d128,
    without score modifiers) runs in clusters of two blocks, consecutive key tiles of one head, each copying
    half of every step's Q and dO into both (FLASH_ATTN2_BWD_CLUSTER=require raises where it would not). dK and
    dV the same bit for bit as without clusters (=0; dQ's reduce-adds land in any order), every gradient within
    PyTorch's error of the float64 reference, the allocator poisoned: steps past the sequence's end, partial key
    tiles, GQA / MQA, head dims below 128, both step sizes."""
    monkeypatch.setenv("FLASH_ATTN2_BWD_WS", "require")
    monkeypatch.setenv("FLASH_ATTN2_BWD_WS_BLOCKM", blockm)
    q, k, v = random_qkv(b, hq, hkv, nq, nk, d, dtype, "cuda", transposed, requires_grad=True)
    dout = torch.randn(b, hq, nq, d, dtype=dtype, device="cuda")

    def grads():
        for t in (q, k, v):
            t.grad = None
        flash_attn2.attention(q, k, v, False).backward(dout)
        return q.grad, k.grad, v.grad

    (dq0, dk0, dv0), (dq, dk, dv) = (under_poison(monkeypatch, "FLASH_ATTN2_BWD_CLUSTER", value, grads)
                                     for value in ("0", "require"))
    assert torch.equal(dk0, dk) and torch.equal(dv0, dv)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    naive_attention(q64, k64, v64, False)[0].backward(dout.double())
    tq, tk, tv = (t.detach().requires_grad_() for t in (q, k, v))
    naive_attention(tq, tk, tv, False)[0].backward(dout)
    for name, ours, theirs, ref in (("dq", dq, tq, q64), ("dk", dk, tk, k64), ("dv", dv, tv, v64)):
        assert_close_to_reference(name, ours, theirs.grad, ref.grad)


@requires_sm90
@pytest.mark.parametrize("nk,d,causal,kw", [(384, 128, False, {}), (512, 128, True, {}),
                                            (512, 128, False, dict(deterministic=True)),
                                            (512, 128, False, dict(window_size=(100, 100))), (512, 64, False, {})])
def test_cuda_warp_specialised_backward_clusters_refused(monkeypatch, nk, d, causal, kw):
    """Calls the backward's clusters do not take: an odd number of key tiles a head, causal rows, the deterministic
    mode, windows; FLASH_ATTN2_BWD_CLUSTER=require names the rule (d64: no clusters compiled in, nothing to
    refuse)."""
    monkeypatch.setenv("FLASH_ATTN2_BWD_WS", "require")
    monkeypatch.setenv("FLASH_ATTN2_BWD_CLUSTER", "require")
    q, k, v = random_qkv(1, 2, 2, 300, nk, d, torch.bfloat16, "cuda", False)
    window = kw.get("window_size", (-1, -1))
    out, lse = flash_attn2.attention_with_lse(q, k, v, causal, window_size=window)
    if d == 64:
        torch.ops.flash_attn2.bwd(torch.randn_like(out), q, k, v, out, lse, causal, None)
        return
    with pytest.raises(ValueError, match="FLASH_ATTN2_BWD_CLUSTER=require, but this call cannot run in clusters"):
        torch.ops.flash_attn2.bwd(torch.randn_like(out), q, k, v, out, lse, causal, None, window_size=list(window),
                                  deterministic=kw.get("deterministic", False))


@requires_cuda
@pytest.mark.parametrize("d,causal,varlen,dtype,portable", [
    (128, False, False, torch.bfloat16, ""), (64, True, False, torch.float16, ""), (256, False, False, torch.bfloat16, ""),
    (128, True, True, torch.bfloat16, ""), (120, False, False, torch.float16, ""), (40, True, False, torch.bfloat16, ""),
    (128, False, False, torch.float16, "1")])
def test_cuda_backward_zero_fill(monkeypatch, d, causal, varlen, dtype, portable):
    """The preprocessing kernel zero-fills dq_accum beside D (FLASH_ATTN2_BWD_PRE_ZERO=0: a fill before it, as
    before). In the deterministic mode every gradient is the same bit for bit both ways, on poisoned memory
    (dq_accum is allocated uninitialised); by default within PyTorch's error of the float64 reference. Dense and
    packed, GQA, every backward kernel family (d64 / d128 WS, d256, the portable kernels)."""
    monkeypatch.setenv("FLASH_ATTN2_PORTABLE_KERNELS", portable)
    b, hq, hkv, nq, nk = 2, 4, 2, 333, 300
    if varlen:
        lens = [200, 0, 133]
        cu = torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32)
        q, k, v = (torch.randn(sum(lens), h, d, device="cuda", dtype=dtype) for h in (hq, hkv, hkv))
        out, lse = flash_attn2.attention_varlen_with_lse(q, k, v, cu, cu, max(lens), max(lens), causal)
        args = (torch.randn_like(out), q, k, v, out, lse, cu, cu, max(lens), max(lens), causal, None)
        op = torch.ops.flash_attn2.bwd_varlen
    else:
        q, k, v = random_qkv(b, hq, hkv, nq, nk, d, dtype, "cuda", True)
        out, lse = flash_attn2.attention_with_lse(q, k, v, causal)
        args = (torch.randn_like(out), q, k, v, out, lse, causal, None)
        op = torch.ops.flash_attn2.bwd
    same_bits_under(monkeypatch, "FLASH_ATTN2_BWD_PRE_ZERO", lambda: op(*args, deterministic=True))
    if varlen:
        return  # (the packed backward's values: test_variants' packed cases run this path too)
    grads = under_poison(monkeypatch, "FLASH_ATTN2_BWD_PRE_ZERO", "", lambda: op(*args))
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    naive_attention(qd, kd, vd, causal)[0].backward(args[0].double())
    tq, tk, tv = (t.detach().requires_grad_() for t in (q, k, v))
    naive_attention(tq, tk, tv, causal)[0].backward(args[0])
    for name, ours, theirs, ref in zip(("dq", "dk", "dv"), grads, (tq, tk, tv), (qd, kd, vd)):
        assert_close_to_reference(name, ours, theirs.grad, ref.grad)


@requires_sm90
def test_cuda_warp_specialised_backward_refuses_what_it_cannot_run(monkeypatch):
    monkeypatch.setenv("FLASH_ATTN2_BWD_WS", "require")
    monkeypatch.delenv("FLASH_ATTN2_PORTABLE_KERNELS", raising=False)  # the Hopper kernel's refusal
    q = torch.randn(1, 2, 64, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 1, 64, 128, device="cuda", dtype=torch.bfloat16).expand(1, 2, 64, 128)  # head stride 0
    # Raised inside the autograd engine, whose translation turns a C++ std::invalid_argument into RuntimeError.
    with pytest.raises(RuntimeError, match="FLASH_ATTN2_BWD_WS=require, but the TMA cannot address"):
        flash_attn2.attention(q, k, k).sum().backward()


@requires_sm90
@pytest.mark.parametrize("walk,qbuf", [("", ""), ("dynamic", ""), ("tile", ""), ("", "1")])
@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,causal,dtype,transposed", [WS_CASES[i] for i in (1, 3, 5, 7, 8, 9, 10)])
def test_cuda_warp_specialised_forward_many_tiles_per_block(monkeypatch, b, hq, hkv, nq, nk, d, causal, dtype,
                                                            transposed, walk, qbuf):
    """The persistent grid capped at 5 blocks: every block walks many tiles, its K/V ring, Q buffers and
    ping-pong turns running on from one tile to the next. Without a mask at d128 / d256, or with
    FLASH_ATTN2_FWD_WS_WALK=tile, the blocks stride (static walk); with a causal mask, by default (at d256 where
    rows see 1024 keys or more), without a mask at d64, or with FLASH_ATTN2_FWD_WS_WALK=dynamic (unmasked rows
    too), they take their tiles from the per-call tile counter (dynamic walk). d128 has two Q buffers (tile k's in buffer k % 2);
    FLASH_ATTN2_FWD_WS_QBUF=1 keeps to one."""
    monkeypatch.setenv("FLASH_ATTN2_FWD_WS", "require")
    monkeypatch.setenv("FLASH_ATTN2_FWD_WS_BLOCKS", "5")
    monkeypatch.setenv("FLASH_ATTN2_FWD_WS_WALK", walk)
    monkeypatch.setenv("FLASH_ATTN2_FWD_WS_QBUF", qbuf)
    check_case(b, hq, hkv, nq, nk, d, causal, dtype, "cuda", transposed)


@requires_sm90
@pytest.mark.parametrize("blocks", ["", "5"])
@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,causal,dtype,transposed,kw", [
    (2, 4, 4, 257, 257, 128, False, torch.bfloat16, False, {}),
    (2, 3, 1, 300, 700, 120, False, torch.float16, True, {}),
    (1, 4, 2, 1000, 1000, 128, True, torch.bfloat16, True, {}),
    (3, 2, 2, 17, 70, 104, False, torch.bfloat16, False, {}),
    (2, 4, 4, 390, 390, 128, False, torch.bfloat16, True, dict(softcap=30.0)),
    (2, 4, 2, 390, 200, 128, True, torch.float16, False, dict(dropout_p=0.25, rng_state=torch.tensor([3, 4]))),
    (1, 4, 4, 600, 600, 128, True, torch.bfloat16, False, dict(window_size=(200, 50), alibi_slopes="h")),
    (2, 4, 4, 700, 900, 128, False, torch.bfloat16, True, dict(window_size=(300, 100))),
    (1, 8, 8, 520, 520, 128, True, torch.float16, False, dict(window_size=(256, 0))),
    (2, 4, 4, 257, 257, 64, True, torch.bfloat16, False, {}),
    (1, 4, 2, 1000, 1000, 64, False, torch.bfloat16, True, {}),
    (2, 2, 2, 130, 300, 40, False, torch.float16, True, {}),
    (1, 6, 3, 700, 700, 64, True, torch.bfloat16, True, dict(window_size=(300, 0))),
])
def test_cuda_warp_specialised_forward_o_by_tma(monkeypatch, b, hq, hkv, nq, nk, d, causal, dtype, transposed, kw,
                                                blocks):
    """The d64 / d128 WS forward stores O by the TMA from a buffer of its own on dense calls without score modifiers
    (FLASH_ATTN2_FWD_TMA_O=0: by its consumers' threads, as the score-modifier kernel always does; the softcap
    kernel's rows: test_cuda_warp_specialised_forward_softcap_kernel): the same O and LSE bit for bit, every row written (the allocator poisoned), partial tiles, head dims below
    128 and 64, d64's causal tiles shifted above row 0, windows, one block per tile or 5 blocks walking many
    tiles; the score modifiers' rows beside them."""
    monkeypatch.setenv("FLASH_ATTN2_FWD_WS", "require")
    monkeypatch.setenv("FLASH_ATTN2_FWD_WS_BLOCKS", blocks)
    monkeypatch.setenv("FLASH_ATTN2_FWD_STREAMK", "0")  # the stream-K tail needs O by the TMA (its own test)
    q, k, v = random_qkv(b, hq, hkv, nq, nk, d, dtype, "cuda", transposed)
    if kw.get("alibi_slopes") == "h":
        kw = dict(kw, alibi_slopes=torch.rand(hq, device="cuda"))
    results = []
    for tma_o in ("0", ""):
        monkeypatch.setenv("FLASH_ATTN2_FWD_TMA_O", tma_o)
        torch.empty(64 << 20, dtype=torch.uint8, device="cuda").fill_(0xFF)  # unwritten output shows up as NaN
        results.append(flash_attn2.attention_with_lse(q, k, v, causal, **kw))
    (out0, lse0), (out1, lse1) = results
    assert torch.equal(out0, out1) and torch.equal(lse0, lse1)
    assert not out1.isnan().any()
    if "dropout_p" not in kw:  # (with dropout: the same keep mask on both sides is what the first assert checks)
        ref = naive_attention(q.double(), k.double(), v.double(), causal, **kw)[0]
        assert_close_to_reference("out", out1, naive_attention(q, k, v, causal, **kw)[0], ref)


@requires_sm90
@pytest.mark.parametrize("blocks", ["", "5"])
@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,causal,dtype,transposed,kw", [
    (2, 4, 4, 257, 257, 128, False, torch.bfloat16, False, dict(softcap=50.0)),
    (1, 4, 2, 1000, 1000, 128, True, torch.bfloat16, True, dict(softcap=30.0)),
    (3, 2, 2, 17, 70, 104, False, torch.bfloat16, False, dict(softcap=5.0)),
    (2, 4, 4, 390, 200, 120, True, torch.bfloat16, True, dict(softcap=50.0)),
    (1, 4, 4, 600, 600, 128, True, torch.bfloat16, False, dict(softcap=50.0, window_size=(200, 50))),
    (2, 4, 4, 700, 900, 128, False, torch.bfloat16, True, dict(softcap=20.0, window_size=(300, 100))),
    (1, 4, 4, 300, 300, 128, False, torch.bfloat16, False, dict(softcap=60.0)),  # past the fixed offset's range
    (2, 4, 2, 390, 390, 128, True, torch.float16, False, dict(softcap=30.0)),  # float16: running max
    (1, 4, 4, 390, 390, 128, False, torch.bfloat16, False, dict(softcap=30.0, alibi_slopes="h")),
    (2, 4, 2, 390, 200, 128, True, torch.bfloat16, False, dict(softcap=30.0, dropout_p=0.25,
                                                               rng_state=torch.tensor([3, 4]))),
    (2, 4, 4, 257, 257, 256, False, torch.bfloat16, False, dict(softcap=50.0)),
    (1, 4, 2, 700, 500, 256, True, torch.bfloat16, True, dict(softcap=30.0, window_size=(200, 50))),
    (2, 2, 2, 130, 330, 240, False, torch.bfloat16, False, dict(softcap=20.0)),
    (1, 4, 4, 300, 300, 256, True, torch.bfloat16, False, dict(softcap=30.0, dropout_p=0.25,
                                                               rng_state=torch.tensor([3, 4]))),
])
def test_cuda_warp_specialised_forward_softcap_kernel(monkeypatch, b, hq, hkv, nq, nk, d, causal, dtype, transposed,
                                                      kw, blocks):
    """bfloat16 calls at d128 and d256 whose only score modifier is a softcap (within the fixed offset's range;
    windows allowed) take a WS kernel of their own (d128: three consumers, 64-key tiles, O stored by the TMA; d256:
    80-key tiles; torch.profiler names it): O within PyTorch's own error of the float64 reference, as the score-modifier kernel's
    (FLASH_ATTN2_FWD_SOFTCAP_KERNEL=0), and the same LSE to float32 rounding, every row written (the allocator
    poisoned), partial tiles, head dims below 128, GQA, one block per tile or 5 blocks walking many tiles. The
    calls it must leave to the score-modifier kernel (float16, ALiBi, dropout, softcap 60) beside them: there the
    setting changes no bit. And a packed batch."""
    monkeypatch.setenv("FLASH_ATTN2_FWD_WS", "require")
    monkeypatch.setenv("FLASH_ATTN2_FWD_WS_BLOCKS", blocks)
    q, k, v = random_qkv(b, hq, hkv, nq, nk, d, dtype, "cuda", transposed)
    if kw.get("alibi_slopes") == "h":
        kw = dict(kw, alibi_slopes=torch.rand(hq, device="cuda"))
    takes = dtype == torch.bfloat16 and kw["softcap"] <= 56 and "alibi_slopes" not in kw and "dropout_p" not in kw
    lens = [200, 0, 64, 129, 383, 1, 256]
    cu = torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32)
    qp, kp, vp = (torch.randn(sum(lens), hq, d, device="cuda", dtype=dtype) for _ in range(3))
    var = "FLASH_ATTN2_FWD_SOFTCAP_KERNEL"
    dense = lambda: flash_attn2.attention_with_lse(q, k, v, causal, **kw)  # noqa: E731
    packed = lambda: flash_attn2.attention_varlen_with_lse(qp, kp, vp, cu, cu, max(lens), max(lens), causal, **kw)  # noqa: E731,E501
    calls = [dense] + ([packed] if "alibi_slopes" not in kw else [])
    for call in calls:
        monkeypatch.setenv(var, "")
        names = cuda_kernel_names(call, "flash_fwd_sm90_ws_kernel")
        assert names and any(SOFTCAP_KERNEL in n for n in names) == takes, names
    if not takes:
        out, _ = same_bits_under(monkeypatch, var, dense)
        if "alibi_slopes" not in kw:
            out_p, _ = same_bits_under(monkeypatch, var, packed)
    else:
        results = [under_poison(monkeypatch, var, value, call) for call in calls for value in ("0", "")]
        for (_, lse0), (_, lse1) in zip(results[0::2], results[1::2]):
            torch.testing.assert_close(lse1, lse0, atol=1e-4, rtol=1e-5)
        out, out_p = results[1][0], results[3][0]
        ref = naive_attention(q.double(), k.double(), v.double(), causal, **kw)[0]
        assert_close_to_reference("out (score-modifier kernel)", results[0][0],
                                  naive_attention(q, k, v, causal, **kw)[0], ref)
    if "dropout_p" not in kw:
        ref = naive_attention(q.double(), k.double(), v.double(), causal, **kw)[0]
        assert_close_to_reference("out", out, naive_attention(q, k, v, causal, **kw)[0], ref)
        if "alibi_slopes" not in kw:  # the packed batch
            assert_packed_sequences_match(out_p, qp, kp, vp, cu, lens, causal, **kw)


SOFTCAP_KERNEL = "true, true>("  # flash_fwd_sm90_ws_kernel<Kt, kScoreMod, kSoftcapOnly>


def under_poison(monkeypatch, var, value, call):
    """call() with the environment variable var set to value, on memory poisoned first (an unwritten output shows
    up as NaN); no NaN in the results."""
    monkeypatch.setenv(var, value)
    torch.empty(64 << 20, dtype=torch.uint8, device="cuda").fill_(0xFF)
    result = call()
    for t in result:
        assert not t.isnan().any(), f"{var}={value!r}"
    return result


def same_bits_under(monkeypatch, var, call, settings=("0", "")):
    """call() under each setting of the environment variable var (under_poison: no NaN): every result bit for bit
    the same; returns the last setting's."""
    results = [under_poison(monkeypatch, var, value, call) for value in settings]
    for first, last in zip(results[0], results[-1]):
        assert torch.equal(first, last), var
    return results[-1]


def unchanged_by_switch(monkeypatch, var, q, k, v, causal, **kw):
    """A call whose kernel has no use for the switch var: the same bits with it "0" and "require", and O to the
    float64 reference within PyTorch's own error in the dtype."""
    out, _ = same_bits_under(monkeypatch, var, lambda: flash_attn2.attention_with_lse(q, k, v, causal, **kw),
                             settings=("0", "require"))
    ref = naive_attention(q.double(), k.double(), v.double(), causal, **kw)[0]
    assert_close_to_reference("out", out, naive_attention(q, k, v, causal, **kw)[0], ref)


def assert_packed_sequences_match(out, q, k, v, cu, lens, causal, check=lambda b: True, **kw):
    """Each sequence of a packed batch's output as the dense op on its own slice: the float64 reference, within
    PyTorch's own error in the dtype (sequences where check(b), not empty). A sequence of one key under a bfloat16
    softcap, where the Hopper kernels take P against a fixed offset, is bounded by one ulp of v instead: PyTorch's
    P is exactly 1 there (error 0), the fixed offset's is rounded to bfloat16 for the P V product while the row
    sum keeps it in float32, so O = v (1 + e), |e| <= 2^-9, rounds to v or its neighbour (README: softcap)."""
    for b, n in enumerate(lens):
        if n == 0 or not check(b):
            continue
        s = slice(int(cu[b]), int(cu[b + 1]))
        qb, kb, vb = (t[s].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        ref = naive_attention(qb.double(), kb.double(), vb.double(), causal, **kw)[0]
        ours = out[s].transpose(0, 1).unsqueeze(0)
        if n == 1 and kw.get("softcap", 0.0) > 0 and q.dtype == torch.bfloat16:
            err = (ours.double() - ref).abs()
            assert (err <= 2.0**-7 * ref.abs()).all(), f"sequence {b}: one key, error {err.max().item():.3e}"
            continue
        assert_close_to_reference(f"out of sequence {b}", ours, naive_attention(qb, kb, vb, causal, **kw)[0], ref)


@requires_sm90
@pytest.mark.parametrize("blocks", ["", "5"])
@pytest.mark.parametrize("d,causal,dtype,window", [
    (128, False, torch.bfloat16, (-1, -1)), (128, True, torch.float16, (-1, -1)), (120, True, torch.bfloat16, (90, 0)),
    (64, True, torch.bfloat16, (-1, -1)), (64, False, torch.float16, (-1, -1)), (40, True, torch.bfloat16, (70, 0)),
])
def test_cuda_warp_specialised_forward_o_by_tma_packed(monkeypatch, d, causal, dtype, window, blocks):
    """Packed batches store O by the TMA over one map, as their Q is loaded, where a consumer's 64-row box lies
    inside its sequence, and by the threads where it would cross the sequence's end (the next sequence's rows) or
    start above its row 0 (shifted first tiles): the same O and LSE bit for bit as FLASH_ATTN2_FWD_TMA_O=0, and the
    rows of every other sequence untouched, on sequences of every length against 64 and the tiles, an empty one."""
    monkeypatch.setenv("FLASH_ATTN2_FWD_WS", "require")
    monkeypatch.setenv("FLASH_ATTN2_FWD_WS_BLOCKS", blocks)
    lens = [200, 0, 64, 129, 383, 1, 256, 450]
    cu = torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32)
    total, hq, hkv = sum(lens), 4, 2
    q = torch.randn(total, hq, d, device="cuda", dtype=dtype)
    k, v = (torch.randn(total, hkv, d, device="cuda", dtype=dtype) for _ in range(2))
    out, _ = same_bits_under(monkeypatch, "FLASH_ATTN2_FWD_TMA_O", lambda: flash_attn2.attention_varlen_with_lse(
        q, k, v, cu, cu, max(lens), max(lens), causal, window_size=window))
    assert_packed_sequences_match(out, q, k, v, cu, lens, causal, window_size=window)


@requires_sm90
@pytest.mark.parametrize("nseq", [9, 70, 300])
@pytest.mark.parametrize("softcap", [0.0, 30.0])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_cuda_warp_specialised_forward_seq_order(monkeypatch, d, causal, softcap, nseq):
    """Packed batches on the WS forward's dynamic walk take their tiles longest sequence first and claim none past
    a sequence's end (SeqOrder, a table each block builds from cu_seqlens_q): the same O and LSE bit for bit as the
    grid's order (FLASH_ATTN2_FWD_SEQ_ORDER=0), on poisoned memory, and each sequence as the dense op on its own
    slice; empty sequences first, last and between, one much longer than the rest, GQA; 300 sequences are more
    than the table holds at any head dim (the grid's order then); with a softcap (the score-modifier kernel, which
    keeps the grid's order) the two settings agree too."""
    monkeypatch.setenv("FLASH_ATTN2_FWD_WS", "require")
    monkeypatch.setenv("FLASH_ATTN2_FWD_WS_WALK", "dynamic")
    monkeypatch.setenv("FLASH_ATTN2_FWD_WS_BLOCKS", "7")  # many tiles a block, from the counter
    gen = torch.Generator().manual_seed(nseq)
    lens = torch.randint(0, 300 if nseq < 100 else 40, (nseq,), generator=gen).tolist()
    lens[0] = lens[-1] = lens[nseq // 3] = 0
    lens[nseq // 2] = 700 if nseq < 100 else 150
    cu = torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32)
    total, hq, hkv = sum(lens), 4, 2
    dtype = torch.bfloat16
    q = torch.randn(total, hq, d, device="cuda", dtype=dtype)
    k, v = (torch.randn(total, hkv, d, device="cuda", dtype=dtype) for _ in range(2))
    out, _ = same_bits_under(monkeypatch, "FLASH_ATTN2_FWD_SEQ_ORDER", lambda: flash_attn2.attention_varlen_with_lse(
        q, k, v, cu, cu, max(lens), max(lens), causal, softcap=softcap))
    assert_packed_sequences_match(out, q, k, v, cu, lens, causal,
                                  check=lambda b: nseq < 100 or b % 10 == 5 or b == nseq // 2, softcap=softcap)


@requires_sm90
@pytest.mark.parametrize("blocks", ["", "5"])
@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,causal,dtype,transposed", [
    (2, 4, 4, 257, 257, 256, False, torch.bfloat16, False), (2, 4, 4, 257, 257, 256, True, torch.bfloat16, True),
    (1, 8, 2, 1000, 1000, 256, True, torch.float16, False), (3, 2, 2, 17, 70, 256, False, torch.bfloat16, True),
    (1, 2, 2, 700, 300, 240, True, torch.float16, False)] + WS_CASES[9:11])
def test_cuda_warp_specialised_forward_wide_key_tiles(monkeypatch, b, hq, hkv, nq, nk, d, causal, dtype, transposed,
                                                      blocks):
    """The d256 WS forward's wider key tiles (80 keys, the default without score modifiers;
    FLASH_ATTN2_FWD_WS_BLOCKN=80 says so): key ranges ending anywhere in a tile, masks across its 10 n8 columns, one
    key tile or many, one block per tile or a persistent grid of 5."""
    monkeypatch.setenv("FLASH_ATTN2_FWD_WS", "require")
    monkeypatch.setenv("FLASH_ATTN2_FWD_WS_BLOCKN", "80")
    monkeypatch.setenv("FLASH_ATTN2_FWD_WS_BLOCKS", blocks)
    check_case(b, hq, hkv, nq, nk, d, causal, dtype, "cuda", transposed)


@requires_sm90
@pytest.mark.parametrize("blocks", ["", "5", "2"])
@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,dtype,transposed", [
    (2, 4, 4, 256, 257, 128, torch.bfloat16, False),
    (2, 3, 1, 250, 700, 120, torch.float16, True),
    (1, 4, 2, 1000, 1000, 128, torch.bfloat16, True),
    (3, 2, 2, 1024, 100, 128, torch.float16, False),
])
def test_cuda_warp_specialised_forward_clusters(monkeypatch, b, hq, hkv, nq, nk, d, dtype, transposed, blocks):
    """Uniform rows at d128 without score modifiers, an even number of query tiles a head: the WS forward
    runs in clusters of two blocks, each copying half of every K / V tile into both (FLASH_ATTN2_FWD_CLUSTER=require
    raises where it would not). O and LSE the same bit for bit as without clusters (=0), every row written (the
    allocator poisoned), within PyTorch's error of the float64 reference: partial query and key tiles, GQA / MQA,
    head dims below 128, one pair of blocks per two tiles or 2 / 4 blocks walking many tiles (an odd cap is taken
    down to pairs)."""
    monkeypatch.setenv("FLASH_ATTN2_FWD_WS", "require")
    monkeypatch.setenv("FLASH_ATTN2_FWD_WS_BLOCKS", blocks)
    monkeypatch.setenv("FLASH_ATTN2_FWD_STREAMK", "0")  # its split tiles fall by walkers, which the clusters halve
    q, k, v = random_qkv(b, hq, hkv, nq, nk, d, dtype, "cuda", transposed)
    call = lambda: flash_attn2.attention_with_lse(q, k, v, False)  # noqa: E731
    out, lse = same_bits_under(monkeypatch, "FLASH_ATTN2_FWD_CLUSTER", call, settings=("0", "require"))
    ref = naive_attention(q.double(), k.double(), v.double(), False)[0]
    assert_close_to_reference("out", out, naive_attention(q, k, v, False)[0], ref)


@requires_sm90
@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,dtype,transposed,blocks,cluster", [
    (2, 3, 3, 640, 300, 128, torch.bfloat16, False, "4", "0"),   # 30 tiles on 4 blocks, 3 key tiles
    (2, 5, 5, 512, 1000, 128, torch.float16, True, "6", ""),     # clusters: 20 pairs on 3, 8 key tiles
    (1, 8, 2, 1024, 777, 128, torch.bfloat16, True, "10", ""),   # GQA, clusters, a partial key tile
    (3, 4, 1, 300, 2000, 96, torch.bfloat16, False, "7", "0"),   # MQA, d96, a partial query tile, 16 key tiles
    (1, 7, 7, 256, 256, 128, torch.bfloat16, False, "4", ""),    # two key tiles: splits of one
    (2, 5, 5, 512, 1000, 128, torch.bfloat16, False, "6", "0"),  # the second case without clusters
])
def test_cuda_warp_specialised_forward_stream_k(monkeypatch, b, hq, hkv, nq, nk, d, dtype, transposed, blocks,
                                                cluster):
    """The static stride's stream-K tail (FLASH_ATTN2_FWD_STREAMK=require raises where a call has none): the last
    full round and the partial one shared out by key tiles, a tile split between two walkers (blocks, or clusters
    of two) finished by whichever piece ends second. O within PyTorch's error of the float64 reference, every row
    written (the allocator poisoned), and O and the LSE equal to rounding to the whole tiles' (=0); three times, so
    the split flags start from zero on every call, each bit for bit the first (deterministic)."""
    monkeypatch.setenv("FLASH_ATTN2_FWD_WS", "require")
    monkeypatch.setenv("FLASH_ATTN2_FWD_WS_BLOCKS", blocks)
    monkeypatch.setenv("FLASH_ATTN2_FWD_CLUSTER", cluster)
    q, k, v = random_qkv(b, hq, hkv, nq, nk, d, dtype, "cuda", transposed)
    call = lambda: flash_attn2.attention_with_lse(q, k, v, False)  # noqa: E731
    whole = under_poison(monkeypatch, "FLASH_ATTN2_FWD_STREAMK", "0", call)
    ref = naive_attention(q.double(), k.double(), v.double(), False)[0]
    torch_out = naive_attention(q, k, v, False)[0]
    first = None
    for _ in range(3):
        out, lse = under_poison(monkeypatch, "FLASH_ATTN2_FWD_STREAMK", "require", call)
        assert_close_to_reference("out", out, torch_out, ref)
        torch.testing.assert_close(lse, whole[1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out, whole[0], atol=2e-2, rtol=0)
        assert (out != whole[0]).float().mean() < 0.1  # rounding of the split tiles' rows only
        if first is None:
            first = out, lse
        else:  # deterministic: the merge's arithmetic does not depend on which piece ended second
            assert torch.equal(out, first[0]) and torch.equal(lse, first[1])


@requires_sm90
@pytest.mark.parametrize("b,hq,hkv,nq,nk,dtype,transposed,blocks,cluster,streamk", [
    (2, 3, 3, 640, 300, torch.bfloat16, False, "4", "0", ""),   # 30 tiles on 4 blocks, the stream-K tail
    (2, 3, 3, 640, 300, torch.bfloat16, False, "4", "0", "0"),  # whole tiles only
    (2, 5, 5, 512, 1000, torch.float16, True, "6", "", ""),     # clusters and the tail, 8 key tiles
    (1, 8, 2, 1024, 777, torch.bfloat16, True, "10", "", "0"),  # GQA, clusters, a partial key tile
    (2, 3, 3, 640, 100, torch.bfloat16, False, "4", "0", "0"),  # one key tile a tile
    (2, 3, 3, 640, 200, torch.bfloat16, False, "4", "0", "0"),  # two
    (1, 7, 7, 256, 256, torch.bfloat16, False, "4", "", ""),    # two key tiles: the tail's splits of one
    (4, 16, 16, 1000, 1000, torch.float16, False, "", "", ""),  # the launcher's grid
])
def test_cuda_warp_specialised_forward_q_ahead(monkeypatch, b, hq, hkv, nq, nk, dtype, transposed, blocks, cluster,
                                               streamk):
    """Each tile's Q copied during the tile before (the static stride over uniform rows, with or without clusters
    and the stream-K tail, tiles of one, two and more key tiles): O and the LSE bit for bit those of Q copied when
    the producer reaches its tile (FLASH_ATTN2_FWD_Q_AHEAD=0), every row written (the allocator poisoned), O
    within PyTorch's error of the float64 reference."""
    monkeypatch.setenv("FLASH_ATTN2_FWD_WS", "require")
    monkeypatch.setenv("FLASH_ATTN2_FWD_WS_BLOCKS", blocks)
    monkeypatch.setenv("FLASH_ATTN2_FWD_CLUSTER", cluster)
    monkeypatch.setenv("FLASH_ATTN2_FWD_STREAMK", streamk)
    q, k, v = random_qkv(b, hq, hkv, nq, nk, 128, dtype, "cuda", transposed)
    call = lambda: flash_attn2.attention_with_lse(q, k, v, False)  # noqa: E731
    out, _ = same_bits_under(monkeypatch, "FLASH_ATTN2_FWD_Q_AHEAD", call, settings=("0", "", "0", ""))
    ref = naive_attention(q.double(), k.double(), v.double(), False)[0]
    assert_close_to_reference("out", out, naive_attention(q, k, v, False)[0], ref)


@requires_sm90
@pytest.mark.parametrize("case", ["causal", "full_round", "one_key_tile", "softcap", "one_tile_a_block"])
def test_cuda_warp_specialised_forward_stream_k_refused(monkeypatch, case):
    """Calls without a stream-K tail: causal rows (the dynamic walk), a last round that is full, one key tile, a
    score modifier (another kernel: nothing to refuse, the same bits), a block per tile."""
    monkeypatch.setenv("FLASH_ATTN2_FWD_WS", "require")
    monkeypatch.setenv("FLASH_ATTN2_FWD_STREAMK", "require")
    b, h, nq, nk, blocks, causal, kw = 2, 3, 640, 300, "4", False, {}
    if case == "causal":
        causal = True
    elif case == "full_round":
        blocks = "5"  # 30 tiles on 5 blocks
    elif case == "one_key_tile":
        nk = 128
    elif case == "softcap":
        kw = dict(softcap=30.0)
    elif case == "one_tile_a_block":
        blocks = "all"
    monkeypatch.setenv("FLASH_ATTN2_FWD_WS_BLOCKS", blocks)
    q, k, v = random_qkv(b, h, h, nq, nk, 128, torch.bfloat16, "cuda", False)
    if kw:
        unchanged_by_switch(monkeypatch, "FLASH_ATTN2_FWD_STREAMK", q, k, v, causal, **kw)
        return
    with pytest.raises(ValueError, match="FLASH_ATTN2_FWD_STREAMK=require, but this call has no stream-K tail"):
        flash_attn2.attention(q, k, v, causal, **kw)


@requires_sm90
@pytest.mark.parametrize("nq,d,causal,kw", [(384, 128, False, {}), (512, 128, True, {}), (512, 256, False, {}),
                                            (512, 128, False, dict(softcap=30.0)),
                                            (512, 128, False, dict(window_size=(100, 100)))])
def test_cuda_warp_specialised_forward_clusters_refused(monkeypatch, nq, d, causal, kw):
    """Calls the clusters do not take: an odd number of query tiles a head, causal rows, d256, score modifiers (the
    softcap kernel), windows; FLASH_ATTN2_FWD_CLUSTER=require names the rule."""
    monkeypatch.setenv("FLASH_ATTN2_FWD_WS", "require")
    monkeypatch.setenv("FLASH_ATTN2_FWD_CLUSTER", "require")
    q, k, v = random_qkv(1, 2, 2, nq, nq, d, torch.bfloat16, "cuda", False)
    if "softcap" in kw or d == 256:  # kernels without clusters compiled in: nothing to refuse, the same bits
        unchanged_by_switch(monkeypatch, "FLASH_ATTN2_FWD_CLUSTER", q, k, v, causal, **kw)
        return
    with pytest.raises(ValueError, match="FLASH_ATTN2_FWD_CLUSTER=require, but this call cannot run in clusters"):
        flash_attn2.attention(q, k, v, causal, **kw)


@requires_sm90
def test_cuda_warp_specialised_forward_refuses_what_it_cannot_run(monkeypatch):
    monkeypatch.setenv("FLASH_ATTN2_FWD_WS", "require")
    monkeypatch.delenv("FLASH_ATTN2_PORTABLE_KERNELS", raising=False)  # the Hopper kernel's refusal
    q = torch.randn(1, 2, 64, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 1, 64, 128, device="cuda", dtype=torch.bfloat16).expand(1, 2, 64, 128)  # head stride 0
    with pytest.raises(ValueError, match="FLASH_ATTN2_FWD_WS=require, but the TMA cannot address"):
        flash_attn2.attention(q, k, k)
    monkeypatch.setenv("FLASH_ATTN2_FWD_WS", "1")  # falls back quietly
    ref = naive_attention(q.double(), k.double(), k.double(), False)[0]
    assert (flash_attn2.attention(q, k, k).double() - ref).abs().max() < 2e-2


@requires_cuda
@pytest.mark.parametrize("group", ["3", "8", "1000", ""])
@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,causal,dtype,transposed", [
    (2, 8, 2, 700, 700, 128, True, torch.bfloat16, True), (3, 5, 5, 300, 517, 64, True, torch.float16, False),
    (1, 4, 1, 129, 1000, 256, False, torch.bfloat16, False), (2, 3, 3, 1, 200, 96, True, torch.bfloat16, True)])
def test_cuda_grid_head_group(monkeypatch, group, b, hq, hkv, nq, nk, d, causal, dtype, transposed):
    """The grids ordered in groups of heads (FLASH_ATTN2_FWD_GRID_GROUP / _BWD_GRID_GROUP; group sizes that do not
    divide the heads, one larger than all of them, and the launchers' choice, groups of 8 in the d64 / d128
    backward of masked calls up to 4096 rows and in the WS forward of causal calls up to 8192 rows): every tile
    is computed once, so the forward, its LSE and dK / dV (one block each) are bitwise those of the head-by-head
    order (group 1), and dQ (float32 adds in another order) equal to rounding; and the float64 reference holds."""
    q, k, v = random_qkv(b, hq, hkv, nq, nk, d, dtype, "cuda", transposed, requires_grad=True)
    dout = torch.randn(b, hq, nq, d, dtype=dtype, device="cuda")

    def run():
        q.grad = k.grad = v.grad = None
        torch.empty(64 << 20, dtype=torch.uint8, device="cuda").fill_(0xFF)  # poison freed blocks
        out, lse = flash_attn2.attention_with_lse(q, k, v, causal)
        out.backward(dout)
        return out.detach(), lse, q.grad, k.grad, v.grad

    monkeypatch.setenv("FLASH_ATTN2_FWD_GRID_GROUP", "1")
    monkeypatch.setenv("FLASH_ATTN2_BWD_GRID_GROUP", "1")
    base = run()
    monkeypatch.setenv("FLASH_ATTN2_FWD_GRID_GROUP", group)
    monkeypatch.setenv("FLASH_ATTN2_BWD_GRID_GROUP", group)
    grouped = run()
    for name, x, y in zip(("out", "lse", "dq", "dk", "dv"), base, grouped):
        if name == "dq":
            torch.testing.assert_close(y, x, rtol=2e-2, atol=2e-2, msg=name)
        else:
            assert torch.equal(y, x), name
    check_case(b, hq, hkv, nq, nk, d, causal, dtype, "cuda", transposed)


@requires_cuda
@pytest.mark.parametrize("window", [(700, 0), (-1, 0)])
@pytest.mark.parametrize("group", ["4", ""])
def test_cuda_grid_head_group_sliding_window(monkeypatch, group, window):
    """The launchers' other grouped order: sliding windows (left bound, right 0) over more than 4096 rows take the WS
    forward's grid, and at d128 the WS backward's, in groups of 4 heads, as causal rows of 4097-8192 take the WS
    backward's; the output and dK / dV bitwise those of the head-by-head order, dQ to rounding, with a group count
    that does not divide the heads."""
    q, k, v = random_qkv(1, 6, 6, 4200, 4200, 128, torch.bfloat16, "cuda", False, requires_grad=True)
    dout = torch.randn_like(q)

    def run():
        q.grad = k.grad = v.grad = None
        torch.empty(64 << 20, dtype=torch.uint8, device="cuda").fill_(0xFF)  # poison freed blocks
        out = flash_attn2.attention(q, k, v, True, window_size=window)
        out.backward(dout)
        return out.detach(), q.grad, k.grad, v.grad

    for var in ("FLASH_ATTN2_FWD_GRID_GROUP", "FLASH_ATTN2_BWD_GRID_GROUP"):
        monkeypatch.setenv(var, "1")
    base = run()
    for var in ("FLASH_ATTN2_FWD_GRID_GROUP", "FLASH_ATTN2_BWD_GRID_GROUP"):
        monkeypatch.setenv(var, group)
    grouped = run()
    for name, x, y in zip(("out", "dq", "dk", "dv"), base, grouped):
        if name == "dq":
            torch.testing.assert_close(y, x, rtol=2e-2, atol=2e-2, msg=name)
        else:
            assert torch.equal(y, x), name
