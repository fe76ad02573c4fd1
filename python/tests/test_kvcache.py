"""fwd_kvcache (KV-cache attention for decoding): dense and paged caches, in-place append, split-KV, every
variant combined, against the float64 reference; the caches after the append; CUDA graphs; opcheck, compile,
TorchScript; the plain fwd's split-KV path for few queries; every bad-input message."""

import itertools
import random

import pytest
import torch

import flash_attn2
from conftest import requires_cuda
from reference import assert_close_to_reference, naive_attention

F = torch.ops.flash_attn2


def make_cache(b, hkv, capacity, d, dtype, device, page_size=None, gen=None):
    """Random caches: dense (B, Hkv, capacity, D) as a transposed (B, capacity, Hkv, D) buffer, or paged
    (num_pages, page_size, Hkv, D) with a shuffled block table (B, capacity / page_size) and spare pages."""
    if page_size is None:
        kc = torch.randn(b, capacity, hkv, d, dtype=dtype, device=device, generator=gen).transpose(1, 2)
        vc = torch.randn(b, capacity, hkv, d, dtype=dtype, device=device, generator=gen).transpose(1, 2)
        return kc, vc, None
    per_seq = capacity // page_size
    num_pages = b * per_seq + 3
    kc = torch.randn(num_pages, page_size, hkv, d, dtype=dtype, device=device, generator=gen)
    vc = torch.randn(num_pages, page_size, hkv, d, dtype=dtype, device=device, generator=gen)
    table = torch.randperm(num_pages, generator=gen, device=device if gen is None else "cpu")[: b * per_seq]
    return kc, vc, table.view(b, per_seq).to(device=device, dtype=torch.int32)


def logical(cache, table):
    """(B, Hkv, capacity, D) view of a cache, copied out of its pages if paged."""
    if table is None:
        return cache.clone()
    b, per_seq = table.shape
    pages = cache[table.long().flatten()]  # (B * per_seq, page, Hkv, D)
    return pages.view(b, per_seq * cache.shape[1], cache.shape[2], cache.shape[3]).transpose(1, 2).clone()


def expected_caches(kc, vc, table, lens, k_new, v_new):
    """The physical caches after the append, computed with plain indexing."""
    kc, vc = kc.clone(), vc.clone()
    if k_new is None:
        return kc, vc
    for b in range(k_new.shape[0]):
        for n in range(k_new.shape[2]):
            pos = int(lens[b]) + n
            if table is None:
                kc[b, :, pos] = k_new[b, :, n]
                vc[b, :, pos] = v_new[b, :, n]
            else:
                page, off = int(table[b, pos // kc.shape[1]]), pos % kc.shape[1]
                kc[page, off] = k_new[b, :, n]
                vc[page, off] = v_new[b, :, n]
    return kc, vc


def check_kvcache_case(b, hq, hkv, nq, nnew, d, capacity, page_size, dtype, device, causal=False, window=(-1, -1),
                       softcap=0.0, alibi=False, num_splits=0, lens=None, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    kc, vc, table = make_cache(b, hkv, capacity, d, dtype, "cpu", page_size, gen)
    kc, vc = kc.to(device), vc.to(device)
    if page_size is None:  # keep the transposed-buffer strides on the device
        kc = kc.transpose(1, 2).contiguous().transpose(1, 2)
        vc = vc.transpose(1, 2).contiguous().transpose(1, 2)
    table = None if table is None else table.to(device)
    if lens is None:
        lens = [int(torch.randint(0, capacity - nnew + 1, (1,), generator=gen)) for _ in range(b)]
        lens[0] = 0
        if b > 1:
            lens[-1] = capacity - nnew  # full after the append
    cache_seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    q = torch.randn(b, hq, nq, d, generator=gen).to(device=device, dtype=dtype)
    k_new = v_new = None
    if nnew > 0:
        k_new = torch.randn(b, hkv, nnew, d, generator=gen).to(device=device, dtype=dtype)
        v_new = torch.randn(b, hkv, nnew, d, generator=gen).to(device=device, dtype=dtype)
    slopes = (torch.rand(b, hq, generator=gen) * 0.5).to(device) if alibi else None
    want_k, want_v = expected_caches(kc, vc, table, lens, k_new, v_new)
    full_k, full_v = logical(want_k, table), logical(want_v, table)

    if device == "cuda":  # poison the allocator's free blocks so unwritten output shows up as NaN
        torch.empty(64 << 20, dtype=torch.uint8, device=device).fill_(0xFF)
    out, lse = flash_attn2.attention_kvcache(q, kc, vc, k_new, v_new, cache_seqlens, table, causal,
                                             window_size=window, softcap=softcap, alibi_slopes=slopes,
                                             num_splits=num_splits)
    name = (f"B{b} H{hq}/{hkv} Nq{nq} Nnew{nnew} D{d} cap{capacity} page{page_size} {dtype} causal{causal} "
            f"window{window} softcap{softcap} alibi{alibi} splits{num_splits} lens{lens}")
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v), f"{name}: caches after the append differ"
    assert out.shape == q.shape and lse.shape == (b, hq, nq) and lse.dtype == (
        torch.float64 if dtype == torch.float64 else torch.float32), name
    for i in range(b):
        n = lens[i] + nnew
        kb, vb = full_k[i : i + 1, :, :n], full_v[i : i + 1, :, :n]
        opts = dict(causal=causal, window_size=window, softcap=softcap)
        ref_out, ref_lse = naive_attention(q[i : i + 1].double().cpu(), kb.double().cpu(), vb.double().cpu(),
                                           alibi_slopes=None if slopes is None else slopes[i : i + 1].double().cpu(),
                                           **opts)
        t_out, _ = naive_attention(q[i : i + 1], kb, vb, alibi_slopes=None if slopes is None else slopes[i : i + 1],
                                   **opts)
        assert_close_to_reference(f"{name} seq {i} out", out[i : i + 1], t_out, ref_out, factor=3.0)
        ours_lse = lse[i].double().cpu()
        finite = torch.isfinite(ref_lse[0])
        assert torch.equal(torch.isfinite(ours_lse), finite), f"{name} seq {i}: lse -inf pattern differs"
        if finite.any():
            tol = 1e-9 if dtype == torch.float64 else 2e-3
            assert (ours_lse[finite] - ref_lse[0][finite]).abs().max() <= tol, f"{name} seq {i}: lse"


def grid(device):
    """Every layout x Nnew x Nq x causal, each with rotating heads, window, softcap, ALiBi, splits and dtype."""
    rnd = random.Random(7)
    pages = [None, 16, 256]
    heads = [(8, 1), (16, 2), (4, 4)]  # MQA, GQA 8:1, MHA
    windows = [(-1, -1), (5, 0), (3, 2), (40, -1)]
    splits = [0, 1, 3, 64]
    dtypes = [torch.float32, torch.float64] if device == "cpu" else [torch.bfloat16, torch.float16]
    dims = [16, 40] if device == "cpu" else [64, 128, 96, 256, 32]
    cases = []
    for idx, (page, nnew, nq, causal) in enumerate(itertools.product(pages, [0, 1, 3, 16], [1, 4, 17], [False, True])):
        hq, hkv = heads[idx % 3]
        capacity = 512 if page == 256 else rnd.choice([48, 80, 160])
        if page == 16:
            capacity = 16 * rnd.choice([3, 5, 9])
        cases.append(dict(b=rnd.choice([1, 3]), hq=hq, hkv=hkv, nq=nq, nnew=nnew, d=dims[idx % len(dims)],
                          capacity=capacity, page_size=page, dtype=dtypes[idx % 2], causal=causal,
                          window=windows[(idx // 2) % 4], softcap=[0.0, 5.0][(idx // 3) % 2],
                          alibi=(idx // 5) % 2 == 1, num_splits=splits[idx % 4], seed=idx))
    return cases


@pytest.mark.parametrize("case", grid("cpu"), ids=lambda c: f"p{c['page_size']}-n{c['nnew']}-q{c['nq']}-c{int(c['causal'])}")
def test_kvcache_cpu(case):
    check_kvcache_case(device="cpu", **case)


@requires_cuda
@pytest.mark.parametrize("case", grid("cuda"), ids=lambda c: f"p{c['page_size']}-n{c['nnew']}-q{c['nq']}-c{int(c['causal'])}")
def test_kvcache_cuda(case):
    check_kvcache_case(device="cuda", **case)


@requires_cuda
@pytest.mark.parametrize("page_size", [None, 16, 32, 64, 128, 256])
def test_kvcache_cuda_long_decode(page_size):
    """Decoding shapes: one query over thousands of keys, splits chosen by the heuristic and forced."""
    for splits in (0, 1, 7, 256):  # 256: every lane of the combine holds eight splits' LSEs
        check_kvcache_case(b=2, hq=32, hkv=8, nq=1, nnew=1, d=128, capacity=4096, page_size=page_size,
                           dtype=torch.bfloat16, device="cuda", num_splits=splits, lens=[4000, 1234], seed=splits)


@requires_cuda
@pytest.mark.parametrize("page_size", [None, 8, 16, 32, 64, 128, 256])
@pytest.mark.parametrize("stagger", ["", "0", "1"], ids=["default", "stages", "staggered"])
def test_kvcache_cuda_d128_staggered_and_staged(stagger, page_size, monkeypatch):
    """The d128 16-row decode on dense caches and pages in both loops: K and V staggered on 128-key tiles (the
    default but on short rows in grids of a wave or more; pages of 16 keys or more, a thread's run of 16 rows in
    one page) and the 64-key stages (pages of 8 in every setting); FLASH_ATTN2_SPLITKV_STAGGER=1 / =0 force each.
    Key counts off the tiles and pages (a last tile of one key, splits of one tile, sequences ending inside a
    run), every option, both dtypes, d96 and d128, one grid of more than a wave of blocks over a few hundred keys;
    paged capacities rounded up to whole pages (shuffled), so a tile's last runs may lie past the table's row."""
    if stagger:
        monkeypatch.setenv("FLASH_ATTN2_SPLITKV_STAGGER", stagger)
    else:
        monkeypatch.delenv("FLASH_ATTN2_SPLITKV_STAGGER", raising=False)
    cases = [
        dict(b=2, hq=32, hkv=8, nq=1, nnew=1, d=128, capacity=3000, lens=[2999, 128]),
        dict(b=2, hq=16, hkv=4, nq=4, nnew=4, d=96, capacity=700, causal=True, window=(100, 0), softcap=8.0,
             num_splits=5, lens=[600, 3]),
        dict(b=1, hq=8, hkv=1, nq=2, nnew=0, d=128, capacity=1100, alibi=True, num_splits=64, lens=[1100],
             dtype=torch.float16),
        dict(b=3, hq=8, hkv=8, nq=1, nnew=16, d=128, capacity=257, num_splits=3, causal=True, lens=[241, 0, 112]),
        dict(b=9, hq=32, hkv=32, nq=1, nnew=0, d=128, capacity=300, window=(64, -1), lens=None),
        dict(b=3, hq=16, hkv=2, nq=1, nnew=3, d=128, capacity=1000, num_splits=2, lens=[997, 21, 500]),
    ]
    for i, case in enumerate(cases):
        case.setdefault("dtype", torch.bfloat16)
        if page_size is not None:
            case["capacity"] = -(-case["capacity"] // page_size) * page_size
        check_kvcache_case(page_size=page_size, device="cuda", seed=500 + i, **case)


@requires_cuda
@pytest.mark.parametrize("d", [32, 64, 96, 128, 160, 192, 256])
def test_kvcache_cuda_combine_split_counts(d):
    """Every head-dim class of the combine across its split-count paths: up to one batch of partial loads (32
    splits at d64 / d128, 16 at d192 / d256, 24 at d160) the weights go by shuffle, beyond that through per-warp
    copies and more batches, beyond 32 splits with several LSEs per lane. Counts on both sides of each boundary,
    one sequence long enough to give every split keys and one short enough to leave most of them empty."""
    for splits in (15, 16, 17, 24, 25, 32, 33, 40, 64):
        check_kvcache_case(b=2, hq=8, hkv=2, nq=1, nnew=0, d=d, capacity=64 * 128, page_size=None,
                           dtype=torch.bfloat16, device="cuda", num_splits=splits, lens=[64 * 128, 700],
                           seed=splits + d)


@requires_cuda
@pytest.mark.parametrize("hq,hkv,nq", [(8, 8, 17), (32, 8, 5), (32, 8, 16), (40, 8, 13), (16, 2, 9)],
                         ids=lambda x: str(x))
@pytest.mark.parametrize("page_size", [None, 16])
def test_kvcache_cuda_wide_row_tiles(hq, hkv, nq, page_size):
    """More than 16 packed (query, q head) rows take the split-KV kernel whose warps split 64 rows: 17, 20, 64,
    65 (two row tiles) and 72 rows, with splits, causal, window, softcap and ALiBi."""
    for i, opts in enumerate((dict(), dict(causal=True, num_splits=3), dict(window=(50, 3), softcap=8.0, alibi=True),
                              dict(causal=True, num_splits=64))):
        for d in (64, 128):
            check_kvcache_case(b=2, hq=hq, hkv=hkv, nq=nq, nnew=nq if i % 2 else 0, d=d, capacity=1024,
                               page_size=page_size, dtype=torch.bfloat16 if i % 2 else torch.float16, device="cuda",
                               seed=100 * i + d + nq, **opts)


@requires_cuda
def test_kvcache_cuda_more_batches_than_grid_z():
    """65537 sequences: the combine's grid is (query, q head, batch up to 65535), so its blocks take a second
    batch past that; checked on sequences at both ends and past the limit, and the whole output finite."""
    b, hq, hkv, d, capacity = 65537, 4, 1, 64, 256  # two 128-key tiles at d64: two splits of one tile each
    gen = torch.Generator(device="cuda").manual_seed(5)
    q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    kc = torch.randn(b, hkv, capacity, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    vc = torch.randn(b, hkv, capacity, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    lens = torch.randint(0, capacity + 1, (b,), device="cuda", dtype=torch.int32, generator=gen)
    torch.empty(64 << 20, dtype=torch.uint8, device="cuda").fill_(0xFF)
    out, lse = flash_attn2.attention_kvcache(q, kc, vc, None, None, lens, None, num_splits=2)
    empty = lens.cpu() == 0
    assert torch.isfinite(out).all() and torch.isfinite(lse.cpu()[~empty]).all()
    for i in (0, 1, 65534, 65535, 65536):
        n = int(lens[i])
        if n == 0:
            assert not out[i].cpu().any() and (lse[i].cpu() == -float("inf")).all(), f"seq {i}: empty sequence"
            continue
        qi, kb, vb = q[i : i + 1], kc[i : i + 1, :, :n], vc[i : i + 1, :, :n]
        ref_out, ref_lse = naive_attention(qi.double().cpu(), kb.double().cpu(), vb.double().cpu())
        t_out, _ = naive_attention(qi, kb, vb)
        assert_close_to_reference(f"seq {i} of {b} (length {n}) out", out[i : i + 1], t_out, ref_out, factor=3.0)
        assert (lse[i].double().cpu() - ref_lse[0]).abs().max() <= 2e-3, f"seq {i}: lse"


@requires_cuda
def test_cuda_batch_limit_of_the_dense_ops():
    """The dense ops keep batch <= 65535 (a kernel may put the batch in the grid's y / z); fwd_kvcache, whose
    kernels do not, takes more (the test above). The error names the limit and the sizes."""
    q = torch.randn(65536, 1, 1, 8, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"flash_attn2::fwd(_with_lse)?: sizes exceed the CUDA kernels' limits \(batch <= 65535, "
                       r"heads and sequence lengths < 2\^30\), got B = 65536, Hq = 1, Nq = 1, Nk = 1"):
        flash_attn2.attention(q, q, q)


@requires_cuda
def test_kvcache_cuda_more_heads_than_grid_y():
    """65537 query heads over one kv head (MQA): the combine's grid takes q heads up to 65535, so its blocks take a
    second head past that; checked on heads at both ends and past the limit, and the whole output finite."""
    hq, d, n = 65537, 64, 256
    gen = torch.Generator(device="cuda").manual_seed(6)
    q = torch.randn(1, hq, 1, d, device="cuda", dtype=torch.float16, generator=gen)
    kc = torch.randn(1, 1, n, d, device="cuda", dtype=torch.float16, generator=gen)
    vc = torch.randn(1, 1, n, d, device="cuda", dtype=torch.float16, generator=gen)
    torch.empty(64 << 20, dtype=torch.uint8, device="cuda").fill_(0xFF)
    out, lse = flash_attn2.attention_kvcache(q, kc, vc, num_splits=2)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    heads = torch.tensor([0, 1, 65534, 65535, 65536], device="cuda")
    ref_out, ref_lse = naive_attention(q[:, heads].double().cpu(), kc.double().cpu(), vc.double().cpu())
    t_out, _ = naive_attention(q[:, heads], kc, vc)
    assert_close_to_reference(f"{hq} q heads over one kv head", out[:, heads], t_out, ref_out, factor=3.0)
    assert (lse[:, heads].double().cpu() - ref_lse).abs().max() <= 2e-3, "lse"


@requires_cuda
@pytest.mark.parametrize("nq", [1, 5, 16])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_fwd_few_queries_takes_split_kv(nq, d):
    """The plain fwd with Nq <= 16 runs the split-KV kernel: every variant, GQA, strided q, and its LSE feeds the
    backward."""
    torch.manual_seed(nq * d)
    b, hq, hkv, nk = 2, 8, 2, 3000
    q = torch.randn(b, nq, hq, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(b, hkv, nk, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, hkv, nk, d, device="cuda", dtype=torch.bfloat16)
    slopes = torch.rand(hq, device="cuda") * 0.1
    for opts in (dict(), dict(causal=True), dict(window_size=(100, 0), softcap=20.0), dict(alibi_slopes=slopes)):
        out, lse = flash_attn2.attention_with_lse(q, k, v, **opts)
        ref_opts = {key: (val.double().cpu() if torch.is_tensor(val) else val) for key, val in opts.items()}
        ref_out, ref_lse = naive_attention(q.double().cpu(), k.double().cpu(), v.double().cpu(), **ref_opts)
        t_out, _ = naive_attention(q, k, v, **opts)
        assert_close_to_reference(f"fwd Nq={nq} d={d} {list(opts)}", out, t_out, ref_out, factor=3.0)
        assert (lse.double().cpu() - ref_lse).abs().max() < 2e-3
        # the same answer as fwd_kvcache on the same keys
        out_kv, lse_kv = flash_attn2.attention_kvcache(q, k, v, causal=opts.get("causal", False),
                                                       window_size=opts.get("window_size", (-1, -1)),
                                                       softcap=opts.get("softcap", 0.0),
                                                       alibi_slopes=opts.get("alibi_slopes"))
        assert torch.equal(out_kv, out) and torch.equal(lse_kv, lse)
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    flash_attn2.attention(qg, kg, vg, causal=True).float().square().sum().backward()
    qr, kr, vr = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    naive_attention(qr, kr, vr, causal=True)[0].square().sum().backward()
    for ours, ref in ((qg.grad, qr.grad), (kg.grad, kr.grad), (vg.grad, vr.grad)):
        assert (ours.double().cpu() - ref).abs().max() < 0.05 * ref.abs().max() + 1e-2


@requires_cuda
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_kvcache_cuda_chained_steps(graph):
    """Decode steps back to back in one stream, each step's query the previous step's output, with splits of 8 key
    tiles or more: the combine lets the next step's split-KV blocks launch from its start (programmatic dependent
    launch), and they prefetch their first key tiles before waiting for it, so a read of the query, or of a stale
    cache_seqlens, before that wait would show here. Between two of the steps a plain copy rewrites cache_seqlens.
    V carries a common direction per head, so that each output, as the next query, gives scores far from uniform."""
    torch.manual_seed(3)
    b, hq, hkv, d, cap = 2, 8, 2, 128, 4096
    kc = torch.randn(b, hkv, cap, d, device="cuda", dtype=torch.bfloat16)
    vc = (torch.randn(b, hkv, cap, d, device="cuda") + 1.5 * torch.randn(1, hkv, 1, d, device="cuda")).bfloat16()
    lens = ([4096, 1500], [3000, 4096], [700, 2600])
    lens_t = [torch.tensor(x, dtype=torch.int32, device="cuda") for x in lens]
    seqlens = torch.zeros(b, dtype=torch.int32, device="cuda")
    q0 = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16)
    outs = {}

    def steps():
        q = q0
        for i, n in enumerate(lens):
            if i == 1:  # a plain kernel between steps 0 and 1; none between 1 and 2
                seqlens.copy_(lens_t[i])
            keys = cap if i != 2 else max(n)  # step 2 on a view of the caches' first keys
            for splits in (1, 3):
                q = flash_attn2.attention_kvcache(q, kc[:, :, :keys], vc[:, :, :keys], None, None,
                                                  seqlens if i == 1 else lens_t[i], None, num_splits=splits)[0]
                outs[(i, splits)] = q

    if graph:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            steps()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            steps()
        for out in outs.values():
            out.fill_(float("nan"))
        g.replay()
    else:
        steps()
    torch.cuda.synchronize()
    q = q0
    for i, n in enumerate(lens):
        for splits in (1, 3):
            got = outs[(i, splits)]
            for j in range(b):
                kb, vb = kc[j : j + 1, :, : n[j]], vc[j : j + 1, :, : n[j]]
                ref, _ = naive_attention(q[j : j + 1].double().cpu(), kb.double().cpu(), vb.double().cpu())
                t_out, _ = naive_attention(q[j : j + 1], kb, vb)
                assert_close_to_reference(f"step {i} splits {splits} seq {j}", got[j : j + 1], t_out, ref, factor=3.0)
            q = got  # the next step's query is what this step returned


@requires_cuda
def test_kvcache_cuda_graph_replay():
    """One decode step captured in a CUDA graph, replayed with new cache_seqlens and new tokens."""
    torch.manual_seed(0)
    b, hq, hkv, d, cap = 3, 16, 4, 128, 2048
    kc = torch.randn(b, hkv, cap, d, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    seqlens = torch.tensor([100, 0, 1500], dtype=torch.int32, device="cuda")
    q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16)
    k_new = torch.randn(b, hkv, 1, d, device="cuda", dtype=torch.bfloat16)
    v_new = torch.randn_like(k_new)
    static = {}

    def step():
        static["out"], static["lse"] = flash_attn2.attention_kvcache(q, kc, vc, k_new, v_new, seqlens, causal=True)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for it in range(4):
        q.copy_(torch.randn_like(q))
        k_new.copy_(torch.randn_like(k_new))
        v_new.copy_(torch.randn_like(v_new))
        seqlens.copy_(torch.tensor([101 + it, 1 + 7 * it, 1600 + 100 * it], dtype=torch.int32))
        kc_before, vc_before = kc.clone(), vc.clone()
        graph.replay()
        torch.cuda.synchronize()
        want_k, want_v = expected_caches(kc_before, vc_before, None, seqlens.tolist(), k_new, v_new)
        assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
        for i, n in enumerate((seqlens + 1).tolist()):
            ref, _ = naive_attention(q[i : i + 1].double(), kc[i : i + 1, :, :n].double(), vc[i : i + 1, :, :n].double())
            assert (static["out"][i : i + 1].double() - ref).abs().max() < 2e-2, f"replay {it} seq {i}"


def small_case(device, paged=False, dtype=torch.float32):
    b, hq, hkv, d = 2, 4, 2, 16
    if paged:
        kc = torch.randn(6, 16, hkv, d, device=device, dtype=dtype)
        table = torch.tensor([[0, 2], [5, 1]], dtype=torch.int32, device=device)
    else:
        kc = torch.randn(b, hkv, 32, d, device=device, dtype=dtype)
        table = None
    return dict(q=torch.randn(b, hq, 1, d, device=device, dtype=dtype), k_cache=kc, v_cache=torch.randn_like(kc),
                k_new=torch.randn(b, hkv, 2, d, device=device, dtype=dtype),
                v_new=torch.randn(b, hkv, 2, d, device=device, dtype=dtype),
                cache_seqlens=torch.tensor([3, 17], dtype=torch.int32, device=device), block_table=table)


DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("paged", [False, True])
def test_kvcache_opcheck(device, paged):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    c = small_case(device, paged, dtype)
    args = (c["q"], c["k_cache"], c["v_cache"], c["k_new"], c["v_new"], c["cache_seqlens"], c["block_table"], True, None)
    torch.library.opcheck(F.fwd_kvcache.default, args, dict(window_size=[4, 0], softcap=3.0, num_splits=2))


@pytest.mark.parametrize("device", DEVICES)
def test_kvcache_compile_and_torchscript(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    c = small_case(device, True, dtype)

    def step(q, kc, vc, kn, vn, lens, table):
        out, lse = flash_attn2.attention_kvcache(q, kc, vc, kn, vn, lens, table, True)
        return out * 2, lse

    eager_k, eager_v = c["k_cache"].clone(), c["v_cache"].clone()
    want = step(c["q"], eager_k, eager_v, c["k_new"], c["v_new"], c["cache_seqlens"], c["block_table"])
    ck, cv = c["k_cache"].clone(), c["v_cache"].clone()
    got = torch.compile(step, fullgraph=True)(c["q"], ck, cv, c["k_new"], c["v_new"], c["cache_seqlens"],
                                              c["block_table"])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(ck, eager_k) and torch.equal(cv, eager_v), "compiled call must write the caches in place"

    @torch.jit.script
    def scripted(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, kn: torch.Tensor, vn: torch.Tensor,
                 lens: torch.Tensor, table: torch.Tensor):
        return torch.ops.flash_attn2.fwd_kvcache(q, kc, vc, kn, vn, lens, table, True, None, num_splits=1)

    sk, sv = c["k_cache"].clone(), c["v_cache"].clone()
    out, lse = scripted(c["q"], sk, sv, c["k_new"], c["v_new"], c["cache_seqlens"], c["block_table"])
    assert torch.equal(sk, eager_k) and torch.allclose(out * 2, want[0], atol=1e-2)


def test_kvcache_refuses_grad_and_runs_under_no_grad():
    c = small_case("cpu")
    q = c["q"].requires_grad_()
    with pytest.raises(RuntimeError, match="fwd_kvcache is not differentiable"):
        flash_attn2.attention_kvcache(q, c["k_cache"], c["v_cache"], cache_seqlens=c["cache_seqlens"])
    with torch.no_grad():
        out, _ = flash_attn2.attention_kvcache(q, c["k_cache"], c["v_cache"], cache_seqlens=c["cache_seqlens"])
    assert not out.requires_grad


@pytest.mark.parametrize("device", DEVICES)
def test_kvcache_bad_inputs(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16

    def call(**over):
        c = small_case(device, over.pop("paged", False), dtype)
        c.update(over)
        return F.fwd_kvcache(c["q"], c["k_cache"], c["v_cache"], c["k_new"], c["v_new"], c["cache_seqlens"],
                             c["block_table"], False, None, **c.get("kw", {}))

    c = small_case(device, dtype=dtype)
    cases = [
        (dict(k_cache=c["k_cache"].to(torch.float64)), "k_cache has dtype"),
        (dict(v_cache=c["v_cache"][:, :, :16]), "k_cache has shape .* but v_cache has shape"),
        (dict(k_cache=c["k_cache"][:1], v_cache=c["v_cache"][:1]), "k_cache has batch 1 but q has batch 2"),
        (dict(k_new=None), "k_new and v_new must be given together"),
        (dict(k_new=c["k_new"][:, :1]), "k_new has shape"),
        (dict(v_new=c["v_new"][:, :, :1]), "v_new has shape .* but k_new has shape"),
        (dict(cache_seqlens=c["cache_seqlens"].long()), "cache_seqlens has dtype Long; expected int32"),
        (dict(cache_seqlens=c["cache_seqlens"][:1]), "cache_seqlens has 1 elements but q has batch 2"),
        (dict(cache_seqlens=None), "k_new needs cache_seqlens"),
        (dict(q=c["q"][:, :3]), "q has 3 heads, which is not a multiple of the 2 heads"),
        (dict(kw=dict(num_splits=-1)), r"num_splits must be in \[0, 256\]"),
        (dict(kw=dict(num_splits=1000)), r"num_splits must be in \[0, 256\]"),
        (dict(paged=True, block_table=torch.zeros(2, 2, dtype=torch.int64, device=device)),
         "block_table has dtype Long; expected int32"),
        (dict(paged=True, block_table=torch.zeros(3, 2, dtype=torch.int32, device=device)),
         "block_table has 3 rows but q has batch 2"),
        (dict(paged=True, block_table=torch.zeros(2, dtype=torch.int32, device=device)), r"block_table must have shape"),
        (dict(paged=True, cache_seqlens=None, k_new=None, v_new=None), "paged caches .* need cache_seqlens"),
        (dict(paged=True, k_cache=torch.zeros(6, 12, 2, 16, dtype=dtype, device=device),
              v_cache=torch.zeros(6, 12, 2, 16, dtype=dtype, device=device)), "page size .* must be a power of two, got 12"),
    ]
    if device == "cpu":  # value checks need the data: the CPU kernel checks them, CUDA clamps (no host sync)
        cases += [
            (dict(cache_seqlens=torch.tensor([31, 0], dtype=torch.int32)), r"cache_seqlens\[0\] = 31 plus 2 new keys does "
             "not fit the cache capacity of 32"),
            (dict(cache_seqlens=torch.tensor([-1, 0], dtype=torch.int32)), r"cache_seqlens\[0\] = -1"),
            (dict(paged=True, block_table=torch.tensor([[9, 0], [1, 2]], dtype=torch.int32)),
             r"block_table\[0, 0\] = 9 is not a page of the cache \(6 pages\)"),
            (dict(paged=True, block_table=torch.tensor([[0, 9], [1, 2]], dtype=torch.int32), k_new=None, v_new=None,
                  cache_seqlens=torch.tensor([3, 17], dtype=torch.int32)), None),  # slot 1 unused by sequence 0
        ]
    else:
        cases += [
            (dict(k_cache=c["k_cache"].transpose(2, 3).contiguous().transpose(2, 3)), "caches are written in place"),
            (dict(q=c["q"].float()), "k_cache has dtype BFloat16 but q has dtype Float"),
        ]
    for over, message in cases:
        if message is None:
            call(**over)  # an unused table entry is not looked at
            continue
        with pytest.raises(RuntimeError, match=message):
            call(**over)
    meta = small_case("meta")
    with pytest.raises(RuntimeError, match="k_new and v_new must be given together"):
        F.fwd_kvcache(meta["q"], meta["k_cache"], meta["v_cache"], meta["k_new"], None, meta["cache_seqlens"])
