"""The main job: check flash_attn2 against a float64 reference, then time it beside PyTorch's SDPA.

    python -m flash_attn2.bench                 # every available device
    python -m flash_attn2.bench --device cuda --quick --out results.md

CPU: B=1, H=8, D=64, float32, N in {1024, 4096}: fwd and fwd+bwd milliseconds vs SDPA (same process).
CUDA: bf16/fp16, D in {64, 128, 256}, causal off/on, N from 512 to 16384 with B*N = 16k tokens and
hidden = H*D = 2048: fwd and bwd TFLOP/s for flash_attn2 and each SDPA backend, CUDA-event medians.
FLOPs follow the FlashAttention papers: fwd = 4*B*H*N*N*D (halved when causal), bwd = 2.5 * fwd.
--variants adds bf16 D=128 rows for packed varlen batches (vs our dense kernel and varlen_attn), a 4096 sliding
window on N=16k, softcap, ALiBi, dropout (vs SDPA flash with dropout) and the deterministic backward; their
FLOPs count visible scores only; each row and its baselines are timed in turn over three rounds, best of each.
--decode adds decoding rows (bf16, D=128, Hq=32, one query over a cache of 1k-128k keys, Hkv 8 / 32, B 1 / 16 / 64;
then Nq = 4 / 16): fwd_kvcache's K/V read bandwidth beside the copy bandwidth measured in the same run, the plain
fwd on the same tensors, each SDPA backend (enable_gqa), and paged caches (pages of 16 / 256) vs dense.
--gqa adds GQA rows (bf16, D=128, causal, Hq / Hkv = 32 / 8 and 64 / 8, N = 4k and 8k): fwd and bwd TFLOP/s of
ours, each SDPA backend (enable_gqa) and FlashAttention-4, and fwd+bwd time against cuDNN.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import flash_attn2


def naive_attention_fp64(q, k, v, causal):
    q, k, v = (t.double() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        nq, nk = q.shape[2], k.shape[2]
        i = torch.arange(nq, device=q.device)[:, None]
        j = torch.arange(nk, device=q.device)[None, :]
        s = s.masked_fill(j > i + (nk - nq), float("-inf"))
    return torch.softmax(s, -1) @ v


def check_correctness(device, dtype):
    """Max error vs float64 for flash_attn2 and for SDPA in the same dtype, on a GQA, Nq != Nk case."""
    q = torch.randn(2, 8, 300, 64, device=device, dtype=dtype)
    k = torch.randn(2, 2, 333, 64, device=device, dtype=dtype)
    v = torch.randn(2, 2, 333, 64, device=device, dtype=dtype)
    rows = []
    for causal in (False, True):
        ref = naive_attention_fp64(q, k, v, causal)
        ours = (flash_attn2.attention(q, k, v, causal).double() - ref).abs().max().item()
        kr, vr = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)
        if causal:  # SDPA's is_causal is top-left aligned; pass flash_attn2's bottom-right mask explicitly
            i = torch.arange(300, device=device)[:, None]
            j = torch.arange(333, device=device)[None, :]
            sdpa_out = F.scaled_dot_product_attention(q, kr, vr, attn_mask=j <= i + 33)
        else:
            sdpa_out = F.scaled_dot_product_attention(q, kr, vr)
        theirs = (sdpa_out.double() - ref).abs().max().item()
        rows.append((causal, ours, theirs))
    return rows


def median_ms_cpu_pair(fn_a, fn_b, reps):
    """Median ms of fn_a and of fn_b, timed alternately (A B, B A, A B, ...) after one warm-up call each, so
    that drift of a shared machine's speed (other jobs, clocks) falls on both alike rather than on whichever
    ran second."""
    fn_a()
    fn_b()
    times = ([], [])
    for i in range(reps):
        for j in ((0, 1) if i % 2 == 0 else (1, 0)):
            start = time.perf_counter()
            (fn_a, fn_b)[j]()
            times[j].append(time.perf_counter() - start)
    return statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3


# --settle-ms: run each timed case this long first, so that the GPU's clock and power have settled to the case's
# own level (attention runs at the H200's power cap; short bursts after a lighter case run at higher clocks, and
# unsettled A/Bs of the same code read 0.99-1.04 against 0.985-1.015 settled, docs/perf.md v25).
SETTLE_MS = 0.0


def median_ms_cuda(fn, warmup=3, reps=10):
    for _ in range(warmup):
        fn()
    if SETTLE_MS > 0:
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        for _ in range(max(0, int(SETTLE_MS / max(s.elapsed_time(e), 1e-3)) - 1)):
            fn()
    start = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        start[i].record()
        fn()
        end[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(start, end))


def progress(i, total, what):
    """One line per case on stderr, so long runs show where they are without cluttering the table."""
    print(f"[{i}/{total}] {what}", file=sys.stderr, flush=True)


def bench_cpu(reps, rows, seqlens=(1024, 4096)):
    print(f"CPU ({torch.get_num_threads()} threads), float32, B=1, H=8, D=64; median ms of {reps}, ours and SDPA "
          "timed alternately")
    print(f"{'N':>6} {'causal':>6} | {'fwd ours':>9} {'fwd sdpa':>9} {'sdpa/ours':>9} | "
          f"{'f+b ours':>9} {'f+b sdpa':>9} {'sdpa/ours':>9}")
    cases = [(n, causal) for n in seqlens for causal in (False, True)]
    for i, (n, causal) in enumerate(cases, 1):
        progress(i, len(cases), f"cpu N={n} causal={causal}")
        q, k, v = (torch.randn(1, 8, n, 64, requires_grad=True) for _ in range(3))
        dout = torch.randn(1, 8, n, 64)

        def ours():
            return flash_attn2.attention(q, k, v, causal)

        def sdpa():
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        def with_backward(fn):
            return lambda: torch.autograd.grad(fn(), (q, k, v), dout)

        with torch.no_grad():
            f_ours, f_sdpa = median_ms_cpu_pair(ours, sdpa, reps)
        b_ours, b_sdpa = median_ms_cpu_pair(with_backward(ours), with_backward(sdpa), reps)
        print(f"{n:>6} {str(causal):>6} | {f_ours:9.1f} {f_sdpa:9.1f} {f_sdpa / f_ours:9.2f} | "
              f"{b_ours:9.1f} {b_sdpa:9.1f} {b_sdpa / b_ours:9.2f}", flush=True)
        for impl, f_ms, b_ms in (("flash_attn2", f_ours, b_ours), ("sdpa", f_sdpa, b_sdpa)):
            base = dict(device="cpu", dtype="float32", D=64, causal=causal, N=n, impl=impl)
            rows.append(dict(base, direction="fwd", ms=f_ms))
            rows.append(dict(base, direction="fwd+bwd", ms=b_ms))


SDPA_BACKENDS = {
    "flash": "FLASH_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
}


def time_cuda_case(fn, q, k, v, dout):
    """(fwd ms, bwd ms) of fn(q, k, v); bwd via autograd.grad on a retained graph (no .grad accumulation)."""
    fwd = median_ms_cuda(lambda: fn(q, k, v))
    out = fn(q, k, v)
    bwd = median_ms_cuda(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True))
    return fwd, bwd


def flash_attn_4():
    """FlashAttention-4's flash_attn_func (PyPI flash-attn-4, `flash_attn.cute`; inputs (B, N, H, D), returns
    (out, lse)) where it imports, else None: an optional column of the CUDA grid (../shared/tools/fa4-wheels.sh
    brings it to a machine without network)."""
    try:
        from flash_attn.cute import flash_attn_func
    except Exception as e:  # not installed, or its CuTe DSL runtime does not load
        print(f"FlashAttention-4: not available ({type(e).__name__}: {e})")
        return None
    print("FlashAttention-4: flash_attn.cute.flash_attn_func")
    return flash_attn_func


def grid_header(with_fa4):
    """The CUDA grid's header: TFLOP/s of ours and each SDPA backend, ratios to SDPA flash and to cuDNN, and
    FlashAttention-4's columns where it runs."""
    header = ("| dtype | D | causal | N | B | H | fwd ours | fwd flash | fwd cudnn | fwd eff | fwd ours/flash "
              "| bwd ours | bwd flash | bwd cudnn | bwd eff | bwd ours/flash | fwd ours/cudnn | bwd ours/cudnn |")
    return header + (" fwd fa4 | bwd fa4 | fwd ours/fa4 | bwd ours/fa4 |" if with_fa4 else "")


def grid_row(dtype, d, causal, n, b, h, f, bw):
    """One row of grid_header's table: f and bw are TFLOP/s of ours, SDPA flash, cuDNN, efficient (and
    FlashAttention-4 when a fifth entry is given); nan where an implementation did not run."""
    row = (f"| {dtype} | {d} | {causal} | {n} | {b} | {h} | " + " | ".join(f"{x:.0f}" for x in f[:4])
           + f" | {f[0] / f[1]:.2f} | " + " | ".join(f"{x:.0f}" for x in bw[:4]) + f" | {bw[0] / bw[1]:.2f} | "
           + f"{f[0] / f[2]:.2f} | {bw[0] / bw[2]:.2f} |")
    if len(f) > 4:
        row += f" {f[4]:.0f} | {bw[4]:.0f} | {f[0] / f[4]:.2f} | {bw[0] / bw[4]:.2f} |"
    return row


def time_implementations(cases, describe, inputs, causal_of, fa4, sdpa_kwargs=None):
    """{case: {"ours" | an SDPA backend | "fa4": (fwd ms, bwd ms), or None where it did not run}}: ours and each
    SDPA backend over every case first, then FlashAttention-4 (where given) over them in a second pass. In calls
    where FlashAttention-4 ran between our rows, our later rows read up to 18% lower than in calls without it,
    while cuDNN's did not move (perf.md v14), so nothing of ours is timed after it has run. inputs(case) gives
    (q, k, v, dout), (B, H, N, D) views of (B, N, H, D) buffers; describe(case) a progress label."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdpa_kwargs = sdpa_kwargs or {}
    results = {}
    for i, case in enumerate(cases, 1):
        progress(i, len(cases), describe(case))
        causal = causal_of(case)
        q, k, v, dout = inputs(case)
        res = results[case] = {}
        res["ours"] = time_cuda_case(lambda q, k, v: flash_attn2.attention(q, k, v, causal), q, k, v, dout)
        for name, backend in SDPA_BACKENDS.items():
            try:
                with sdpa_kernel(getattr(SDPBackend, backend)):
                    res[name] = time_cuda_case(lambda q, k, v: F.scaled_dot_product_attention(
                        q, k, v, is_causal=causal, **sdpa_kwargs), q, k, v, dout)
            except RuntimeError:
                res[name] = None
        del q, k, v, dout
    for i, case in enumerate(cases if fa4 is not None else [], 1):
        progress(i, len(cases), f"FlashAttention-4 {describe(case)}")
        causal = causal_of(case)
        q, k, v, dout = inputs(case)
        try:  # on the (B, N, H, D) buffers themselves
            results[case]["fa4"] = time_cuda_case(lambda q, k, v: fa4(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)[0].transpose(1, 2),
                q, k, v, dout)
        except Exception as e:  # a head dim, dtype or layout it does not build
            print(f"FlashAttention-4 failed at {describe(case)}: {e}")
            results[case]["fa4"] = None
        del q, k, v, dout
    return results


def bench_cuda(quick, out_path, rows, head_dims=None, seqlens=None):
    print(f"CUDA: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float16]
    head_dims = head_dims or ([64, 128] if quick else [64, 128, 256])
    seqlens = seqlens or ([2048, 8192, 16384] if quick else [512, 1024, 2048, 4096, 8192, 16384])
    fa4 = flash_attn_4()
    cases = [(dtype, d, causal, n) for dtype in dtypes for d in head_dims for causal in (False, True) for n in seqlens]

    def inputs(case):
        dtype, d, _, n = case
        b, h = 16384 // n, 2048 // d
        # (B, N, H, D) buffers viewed as (B, H, N, D), the layout a QKV projection produces.
        q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()
                   for _ in range(3))
        return q, k, v, torch.randn(b, n, h, d, device="cuda", dtype=dtype).transpose(1, 2)

    results = time_implementations(
        cases, lambda c: f"cuda {str(c[0]).replace('torch.', '')} D={c[1]} causal={c[2]} N={c[3]}", inputs,
        lambda c: c[2], fa4)

    header = grid_header(fa4 is not None)
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    print("TFLOP/s (CUDA-event medians); ratios = flash_attn2 / SDPA flash, / SDPA cuDNN (and / FlashAttention-4)")
    print(header)
    names = ("ours", "flash", "cudnn", "efficient") + (("fa4",) if fa4 is not None else ())
    for (dtype, d, causal, n), res in results.items():
        b, h = 16384 // n, 2048 // d
        fwd_flops = 4 * b * h * n * n * d / (2 if causal else 1)
        bwd_flops = 2.5 * fwd_flops

        def tflops(name, idx, flops):
            r = res.get(name)
            return flops / (r[idx] * 1e-3) / 1e12 if r else float("nan")

        f = [tflops(x, 0, fwd_flops) for x in names]
        bw = [tflops(x, 1, bwd_flops) for x in names]
        row = grid_row(str(dtype).replace("torch.", ""), d, causal, n, b, h, f, bw)
        print(row, flush=True)
        lines.append(row)
        impls = ("flash_attn2", "sdpa flash", "sdpa cudnn", "sdpa efficient", "flash-attn-4")
        for impl, fv, bv in zip(impls, f, bw):
            base = dict(device="cuda", dtype=str(dtype).replace("torch.", ""), D=d, causal=causal, N=n, impl=impl)
            rows.append(dict(base, direction="fwd", tflops=fv))
            rows.append(dict(base, direction="bwd", tflops=bv))
    if out_path:
        with open(out_path, "w") as fh:
            fh.write("\n".join(lines) + "\n")


def bench_gqa_cuda(out_path=None):
    """#11's GQA rows: bf16, D = 128, causal, Hq / Hkv = 32 / 8 and 64 / 8, N = 4k and 8k, 16k tokens, (B, N, H, D)
    buffers viewed as (B, H, N, D). Every implementation gets the grouped K/V: SDPA with enable_gqa, and
    FlashAttention-4 where it imports; a backend that refuses it shows nan."""
    fa4 = flash_attn_4()
    names = ["ours", "flash", "cudnn", "efficient"] + (["fa4"] if fa4 is not None else [])
    header = ("| Hq/Hkv | N | B | " + " | ".join(f"fwd {x}" for x in names) + " | "
              + " | ".join(f"bwd {x}" for x in names) + " | fwd ours/cudnn | bwd ours/cudnn | fwd+bwd ours/cudnn |")
    lines = ["", "GQA: TFLOP/s, bf16, D = 128, causal (SDPA with enable_gqa)", "", header,
             "|" + "---|" * (header.count("|") - 1)]
    print("\n".join(lines[1:]), flush=True)
    cases = [(hq, hkv, n) for hq, hkv in ((32, 8), (64, 8)) for n in (4096, 8192)]
    d, dtype = 128, torch.bfloat16

    def inputs(case):
        hq, hkv, n = case
        b = 16384 // n
        q = torch.randn(b, n, hq, d, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()
        k, v = (torch.randn(b, n, hkv, d, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()
                for _ in range(2))
        return q, k, v, torch.randn(b, n, hq, d, device="cuda", dtype=dtype).transpose(1, 2)

    results = time_implementations(cases, lambda c: f"GQA {c[0]}/{c[1]} N={c[2]}", inputs, lambda c: True, fa4,
                                   sdpa_kwargs={"enable_gqa": True})
    for (hq, hkv, n), res in results.items():
        b = 16384 // n
        fwd_flops = 4 * b * hq * n * n * d / 2
        tf = {x: (fwd_flops / (res[x][0] * 1e-3) / 1e12, 2.5 * fwd_flops / (res[x][1] * 1e-3) / 1e12)
              if res.get(x) else (float("nan"), float("nan")) for x in names}
        both = (lambda x: res[x][0] + res[x][1] if res.get(x) else float("nan"))
        line = (f"| {hq}/{hkv} | {n} | {b} | " + " | ".join(f"{tf[x][0]:.0f}" for x in names) + " | "
                + " | ".join(f"{tf[x][1]:.0f}" for x in names) + f" | {tf['ours'][0] / tf['cudnn'][0]:.2f} | "
                f"{tf['ours'][1] / tf['cudnn'][1]:.2f} | {both('cudnn') / both('ours'):.2f} |")
        print(line, flush=True)
        lines.append(line)
    if out_path:
        with open(out_path, "a") as fh:
            fh.write("\n".join(lines) + "\n")


def bench_provider_cuda(out_path=None, rows=None):
    """F.scaled_dot_product_attention's flash path with the SDPA provider active (torch.nn.attention's
    "flash_attn2" implementation) beside flash_attn2 called directly and the stock flash path: the provider should
    cost nothing but a dispatch."""
    import torch.nn.attention as attn
    from torch.nn.attention import SDPBackend, sdpa_kernel

    header = ("| D | causal | N | B | H | fwd ours | fwd sdpa->fa2 | fwd sdpa flash | fwd provider/ours "
              "| bwd ours | bwd sdpa->fa2 | bwd sdpa flash | bwd provider/ours |")
    lines = ["", "SDPA provider: TFLOP/s, bf16, (B, N, H, D) buffers viewed as (B, H, N, D)", "", header,
             "|" + "---|" * 13]
    print("\n".join(lines[1:]), flush=True)
    cases = [(d, causal, n) for d in (64, 128) for causal in (False, True) for n in (2048, 8192)]
    for i, (d, causal, n) in enumerate(cases):
        progress(i + 1, len(cases), f"provider D={d} causal={causal} N={n}")
        b, h = 16384 // n, 2048 // d
        q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
                   for _ in range(3))
        dout = torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        flops = 4 * b * h * n * n * d / (2 if causal else 1)

        def sdpa(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        results = {"ours": time_cuda_case(lambda q, k, v: flash_attn2.attention(q, k, v, causal), q, k, v, dout)}
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            results["stock"] = time_cuda_case(sdpa, q, k, v, dout)
            attn.activate_flash_attention_impl("flash_attn2")
            try:
                results["provider"] = time_cuda_case(sdpa, q, k, v, dout)
            finally:
                attn.restore_flash_attention_impl()
        tf = {name: (flops / (f * 1e-3) / 1e12, 2.5 * flops / (bw * 1e-3) / 1e12) for name, (f, bw) in results.items()}
        row = (f"| {d} | {causal} | {n} | {b} | {h} | "
               + " | ".join(f"{tf[x][0]:.0f}" for x in ("ours", "provider", "stock"))
               + f" | {tf['provider'][0] / tf['ours'][0]:.2f} | "
               + " | ".join(f"{tf[x][1]:.0f}" for x in ("ours", "provider", "stock"))
               + f" | {tf['provider'][1] / tf['ours'][1]:.2f} |")
        print(row, flush=True)
        lines.append(row)
        if rows is not None:
            for name, (fv, bv) in tf.items():
                impl = {"ours": "flash_attn2", "stock": "sdpa flash", "provider": "sdpa flash via flash_attn2"}[name]
                base = dict(device="cuda", dtype="bfloat16", D=d, causal=causal, N=n, impl=impl, table="provider")
                rows.append(dict(base, direction="fwd", tflops=fv))
                rows.append(dict(base, direction="bwd", tflops=bv))
    if out_path:
        with open(out_path, "a") as fh:
            fh.write("\n".join(lines) + "\n")


def packed_lengths(total=16384, longest=4096, seed=0):
    """The varlen rows' packed batch: sequence lengths drawn from 64..longest (a CPU generator seeded `seed`) until
    they sum to `total`, the last one cut to fit (also scripts/ab_forward.py's and env_ab.py's `varlen` cases)."""
    gen, lengths = torch.Generator().manual_seed(seed), []
    while sum(lengths) < total:
        lengths.append(min(int(torch.randint(64, longest + 1, (1,), generator=gen)), total - sum(lengths)))
    return lengths


def window_visible_scores(n, left, right):
    """Scores a sliding window leaves visible in one head of n queries over n keys: query i sees keys
    [i - left, i + right] within [0, n) (causal: right = 0). The window rows count only these (their TFLOP/s)."""
    return sum(min(n - 1, i + right) - max(0, i - left) + 1 for i in range(n))


def _fwd_bwd_ms(fn, inputs, dout):
    fwd = median_ms_cuda(lambda: fn(*inputs))
    out = fn(*inputs)
    bwd = median_ms_cuda(lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True))
    return fwd, bwd


VARIANT_ROUNDS = 3


def _alternated(*runs, rounds=VARIANT_ROUNDS):
    """(fwd ms, bwd ms) of each run (a callable returning them), timed in turn over several rounds, each keeping its
    best: a variant row and its baseline then see the same GPU clock and power state (timed one after the other
    once, their ratios swung by 0.04-0.09 between calls, perf.md v32)."""
    best = [None] * len(runs)
    for _ in range(rounds):
        for i, run in enumerate(runs):
            f, b = run()
            best[i] = (f, b) if best[i] is None else (min(best[i][0], f), min(best[i][1], b))
    return best


def _if_available(run, what):
    """run, if one call of it succeeds; None (and a line saying why) where a backend is missing or refuses these
    inputs, so that a baseline ours are compared with is timed only where it runs."""
    try:
        run()
        return run
    except (ImportError, RuntimeError) as e:
        print(f"{what} unavailable: {e}")
        return None


def bench_variants_cuda(out_path=None):
    """The variants issue's rows: bf16, D = 128, 16 heads (hidden 2048); TFLOP/s count visible scores only."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype, d, h = torch.bfloat16, 128, 16
    lines = ["| case | fwd ms | bwd ms | fwd TFLOP/s | bwd TFLOP/s | baseline | fwd ratio | bwd ratio |",
             "|---|---|---|---|---|---|---|---|"]

    def row(name, flops, ms, base_name, base):
        f, b = flops / (ms[0] * 1e-3) / 1e12, 2.5 * flops / (ms[1] * 1e-3) / 1e12
        if base is None:
            ratio = "| — | — |"
        else:
            ratio = f"| {base[0] / ms[0]:.2f} | {base[1] / ms[1]:.2f} |"
        line = f"| {name} | {ms[0]:.3f} | {ms[1]:.3f} | {f:.0f} | {b:.0f} | {base_name} {ratio}"
        print(line, flush=True)
        lines.append(line)

    def dense(b, n):
        q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()
                   for _ in range(3))
        return (q, k, v), torch.randn(b, n, h, d, device="cuda", dtype=dtype).transpose(1, 2)

    # Packed varlen batch of 16k tokens, lengths drawn from 64..4096, vs our dense kernel on 16k tokens (B = 8,
    # N = 2048) and vs torch.nn.attention.varlen.varlen_attn on the same packed batch.
    lengths = packed_lengths()
    total = sum(lengths)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device="cuda")
    max_len = max(lengths)
    qv, kv, vv = (torch.randn(total, h, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    dv = torch.randn(total, h, d, device="cuda", dtype=dtype)
    dense_in, dense_dout = dense(8, 2048)
    for causal in (False, True):
        scores = sum(n * (n + 1) // 2 if causal else n * n for n in lengths)
        flops = 4 * h * d * scores

        def theirs_run():
            from torch.nn.attention.varlen import varlen_attn

            return _fwd_bwd_ms(lambda q, k, v: varlen_attn(q, k, v, cu, cu, max_len, max_len,
                                                           window_size=(-1, 0) if causal else (-1, -1)),
                               (qv, kv, vv), dv)

        runs = [lambda: _fwd_bwd_ms(lambda q, k, v: flash_attn2.attention_varlen(q, k, v, cu, cu, max_len, max_len,
                                                                                  causal), (qv, kv, vv), dv),
                lambda: _fwd_bwd_ms(lambda q, k, v: flash_attn2.attention(q, k, v, causal), dense_in, dense_dout),
                _if_available(theirs_run, "varlen_attn")]
        timed = _alternated(*(run for run in runs if run is not None))
        mine, base_dense = timed[0], timed[1]
        dense_flops = 4 * 8 * h * 2048 * 2048 * d / (2 if causal else 1)
        # Compare TFLOP/s with the dense run: scale its times to the varlen FLOP count.
        scaled = (base_dense[0] * flops / dense_flops, base_dense[1] * flops / dense_flops)
        row(f"varlen {len(lengths)} seqs causal={causal}", flops, mine, "ours dense B8 N2048 (same TFLOP/s = 1.00)",
            scaled)
        if len(timed) == 3:
            theirs = timed[2]
            row(f"varlen_attn causal={causal}", flops, theirs, "", None)
            print(f"  ours / varlen_attn: fwd {theirs[0] / mine[0]:.2f}, bwd {theirs[1] / mine[1]:.2f}")
            lines.append(f"| ours / varlen_attn causal={causal} | | | | | | {theirs[0] / mine[0]:.2f} | "
                         f"{theirs[1] / mine[1]:.2f} |")
    del qv, kv, vv, dense_in

    # Sliding window 4096 on N = 16k (causal) vs dense causal scaled by the visible fraction.
    n = 16384
    inputs, dout = dense(1, n)
    w = 4096
    visible = window_visible_scores(n, w, 0)
    causal_scores = n * (n + 1) // 2
    flops = 4 * h * d * visible
    mine, base = _alternated(
        lambda: _fwd_bwd_ms(lambda q, k, v: flash_attn2.attention(q, k, v, True, window_size=(w, 0)), inputs, dout),
        lambda: _fwd_bwd_ms(lambda q, k, v: flash_attn2.attention(q, k, v, True), inputs, dout))
    frac = visible / causal_scores
    row("window 4096, N=16k", flops, mine, f"ours causal x visible fraction {frac:.3f} (goal >= 0.91)",
        (base[0] * frac, base[1] * frac))
    del inputs

    # Softcap 50 vs none; dropout 0.1 vs none and vs SDPA flash with dropout (B = 2, N = 8k, causal).
    inputs, dout = dense(2, 8192)
    flops = 4 * 2 * h * 8192 * 8192 * d / 2
    alibi = torch.rand(h, device="cuda")

    def deterministic():
        torch.use_deterministic_algorithms(True)
        try:
            return _fwd_bwd_ms(lambda q, k, v: flash_attn2.attention(q, k, v, True), inputs, dout)
        finally:
            torch.use_deterministic_algorithms(False)

    def sdpa_dropout():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return _fwd_bwd_ms(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.1),
                               inputs, dout)

    runs = [lambda: _fwd_bwd_ms(lambda q, k, v: flash_attn2.attention(q, k, v, True), inputs, dout),
            lambda: _fwd_bwd_ms(lambda q, k, v: flash_attn2.attention(q, k, v, True, softcap=50.0), inputs, dout),
            lambda: _fwd_bwd_ms(lambda q, k, v: flash_attn2.attention(q, k, v, True, alibi_slopes=alibi), inputs, dout),
            lambda: _fwd_bwd_ms(lambda q, k, v: flash_attn2.attention(q, k, v, True, dropout_p=0.1), inputs, dout),
            deterministic, _if_available(sdpa_dropout, "SDPA flash with dropout")]
    timed = _alternated(*(run for run in runs if run is not None))
    plain = timed[0]
    row("causal N=8k, plain", flops, plain, "", None)
    row("softcap 50", flops, timed[1], "ours plain (goal >= 0.9)", plain)
    row("alibi", flops, timed[2], "ours plain", plain)
    mine = timed[3]
    row("dropout 0.1", flops, mine, "ours plain", plain)
    if len(timed) == 6:
        sdpa = timed[5]
        row("dropout 0.1", flops, mine, "SDPA flash dropout 0.1 (goal fwd+bwd >= 1.0)", sdpa)
        print(f"  dropout fwd+bwd ours / SDPA flash: {(sdpa[0] + sdpa[1]) / (mine[0] + mine[1]):.2f}")
        lines.append(f"| dropout fwd+bwd vs SDPA flash | | | | | | {(sdpa[0] + sdpa[1]) / (mine[0] + mine[1]):.2f} | |")
    row("deterministic bwd", flops, timed[4], "ours plain", plain)
    # FlashAttention-4 with and without the same softcap, after all of ours (see time_implementations): what the
    # softcap costs the nearest other kernel on this GPU, beside #7's 0.9 bar for ours.
    fa4 = flash_attn_4()
    if fa4 is not None:
        def fa4_run(softcap):
            return lambda: _fwd_bwd_ms(lambda q, k, v: fa4(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           causal=True, softcap=softcap)[0].transpose(1, 2),
                                       inputs, dout)

        try:
            fa4_plain, fa4_capped = _alternated(fa4_run(0.0), fa4_run(50.0))
        except Exception as e:  # a version without softcap, or one that refuses it on this GPU
            print(f"FlashAttention-4 softcap rows failed: {e}")
        else:
            row("FA4 causal N=8k, plain", flops, fa4_plain, "ours plain", plain)
            row("FA4 softcap 50", flops, fa4_capped, "FA4 plain", fa4_plain)
            row("softcap 50", flops, timed[1], "FA4 softcap 50", fa4_capped)
    if out_path:
        with open(out_path, "a") as fh:
            fh.write("\n" + "\n".join(lines) + "\n")


def copy_bandwidth_tbs():
    """Device copy bandwidth (read + write bytes / time) of a 1 GiB copy, the roofline the decode rows are read
    against."""
    src = torch.empty(1 << 29, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = median_ms_cuda(lambda: dst.copy_(src), warmup=3, reps=20)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e12


def graph_us(fn, calls=20, reps=7):
    """Median µs per call of fn, captured `calls` times in one CUDA graph and replayed: kernel time without the
    host's launch and dispatch overhead (which is what a served decode step, itself graph-captured, pays)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    us = median_ms_cuda(graph.replay, warmup=2, reps=reps) * 1e3 / calls
    del graph
    return us


def bench_decode_cuda(out_path=None, rows=None, max_cache_gib=40.0):
    """The KV-cache issue's rows: bf16, D = 128, Hq = 32; one query (and 4 / 16) over a cache of L keys. Achieved
    K/V read bandwidth = K/V bytes / time, beside the copy bandwidth measured here; SDPA backends get the same
    cache as dense (B, Hkv, L, D) tensors with enable_gqa."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype, d, hq = torch.bfloat16, 128, 32
    copy = copy_bandwidth_tbs()
    print(f"decode: copy bandwidth {copy:.2f} TB/s")
    lines = [f"Decode, bf16, D = 128, Hq = 32; copy bandwidth {copy:.2f} TB/s (read + write of a 1 GiB copy). "
             "Times in µs per call from CUDA graphs of 20 calls (no launch overhead; medians of 7 replays; the "
             "better of two such measurements per implementation, taken in opposite orders within the row), except "
             "'eager' (CUDA-event medians of single calls from Python); bandwidth = K/V bytes read / time.", "",
             "| B | Hkv | L | Nq | fwd_kvcache µs | TB/s | of copy | eager µs | fwd (plain op) µs | SDPA flash µs | "
             "SDPA cuDNN µs | SDPA efficient µs | vs fastest SDPA | paged 16 / dense | paged 256 / dense |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def sdpa_us(backend, q, k, v):
        try:
            with sdpa_kernel(backend):
                return graph_us(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
        except RuntimeError:
            return None

    def paged_us(q, k, v, page):
        b, hkv, n, _ = k.shape
        per_seq = n // page
        # pages in a shuffled order, as an allocator hands them out
        perm = torch.randperm(b * per_seq, device="cuda")
        kc = k.view(b, hkv, per_seq, page, d).permute(0, 2, 3, 1, 4).reshape(b * per_seq, page, hkv, d)[perm.argsort()]
        vc = v.view(b, hkv, per_seq, page, d).permute(0, 2, 3, 1, 4).reshape(b * per_seq, page, hkv, d)[perm.argsort()]
        table = perm.view(b, per_seq).to(torch.int32)
        lens = torch.full((b,), n, dtype=torch.int32, device="cuda")
        us = graph_us(lambda: flash_attn2.attention_kvcache(q, kc, vc, None, None, lens, table))
        ref = flash_attn2.attention_kvcache(q, k, v)[0]
        got = flash_attn2.attention_kvcache(q, kc, vc, None, None, lens, table)[0]
        assert (got.float() - ref.float()).abs().max() < 1e-2, "paged and dense decode disagree"
        return us

    cases = [(b, hkv, n, 1) for hkv in (8, 32) for b in (1, 16, 64) for n in (1024, 8192, 32768, 131072)]
    cases += [(16, 8, 8192, 4), (16, 8, 8192, 16), (16, 8, 32768, 4), (16, 8, 32768, 16)]
    for i, (b, hkv, n, nq) in enumerate(cases, 1):
        kv_bytes = 2 * b * hkv * n * d * 2
        if kv_bytes / 2**30 > max_cache_gib:
            print(f"skip B={b} Hkv={hkv} L={n}: the cache would take {kv_bytes / 2**30:.0f} GiB")
            continue
        progress(i, len(cases), f"decode B={b} Hkv={hkv} L={n} Nq={nq}")
        q = torch.randn(b, hq, nq, d, device="cuda", dtype=dtype)
        k = torch.randn(b, hkv, n, d, device="cuda", dtype=dtype)
        v = torch.randn(b, hkv, n, d, device="cuda", dtype=dtype)
        # Two passes over the implementations, the second in reverse order, keeping each one's better time: a row
        # measured first right after a multi-GB row read up to 10% slow (perf.md v20), whichever kernel it was.
        impls = [("ours", lambda: graph_us(lambda: flash_attn2.attention_kvcache(q, k, v))),
                 ("plain", lambda: graph_us(lambda: flash_attn2.attention(q, k, v)))]
        impls += [(name, lambda backend=backend: sdpa_us(getattr(SDPBackend, backend), q, k, v))
                  for name, backend in SDPA_BACKENDS.items()]
        best = {}
        for order in (impls, impls[::-1]):
            for name, measure in order:
                t, old = measure(), best.get(name)
                best[name] = t if old is None else old if t is None else min(old, t)
        ours, plain = best["ours"], best["plain"]
        theirs = {name: best[name] for name in SDPA_BACKENDS}
        eager = median_ms_cuda(lambda: flash_attn2.attention_kvcache(q, k, v)) * 1e3
        fastest = min((t for t in theirs.values() if t is not None), default=None)
        paged = ["", ""]
        if nq == 1 and hkv == 8 and (b, n) in ((16, 8192), (16, 32768), (64, 8192), (1, 131072)):
            paged = [f"{ours / paged_us(q, k, v, page):.2f}" for page in (16, 256)]
        tbs = kv_bytes / (ours * 1e-6) / 1e12
        fmt = lambda t: "n/a" if t is None else f"{t:.1f}"  # noqa: E731
        line = (f"| {b} | {hkv} | {n} | {nq} | {ours:.1f} | {tbs:.2f} | {tbs / copy:.2f} | {eager:.1f} | {plain:.1f} | "
                f"{fmt(theirs['flash'])} | {fmt(theirs['cudnn'])} | {fmt(theirs['efficient'])} | "
                f"{'n/a' if fastest is None else f'{fastest / ours:.3f}'} | {paged[0]} | {paged[1]} |")
        print(line, flush=True)
        lines.append(line)
        if rows is not None:
            rows.append(dict(device="cuda", dtype="bfloat16", D=d, case="decode", B=b, Hkv=hkv, L=n, Nq=nq,
                             us=ours, eager_us=eager, plain_us=plain, tbs=tbs, copy_tbs=copy, **{f"sdpa_{k}_us": t for k, t in theirs.items()}))
        del q, k, v
    if out_path:
        with open(out_path, "a") as fh:
            fh.write("\n" + "\n".join(lines) + "\n")


def write_json(path, rows):
    import json

    meta = dict(torch=torch.__version__, device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    with open(path, "w") as fh:
        json.dump(dict(meta, rows=rows), fh, indent=1, default=float)


def write_plot(path, rows):
    """TFLOP/s (CUDA) or ms (CPU) against sequence length per implementation, one panel per head dim and
    direction (causal dashed). Needs matplotlib (pip install .[bench]); returns False without it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    decode = [r for r in rows if r.get("case") == "decode" and r["Nq"] == 1]
    metric = "tflops" if any("tflops" in r for r in rows) else "ms"
    # The provider table repeats flash_attn2 and stock flash at a few lengths: plot only its own line.
    rows = [r for r in rows if metric in r and (r.get("table") != "provider" or "via" in r["impl"])]
    panels = sorted({(r["device"], r["dtype"], r["D"], r["direction"]) for r in rows}, key=str)
    decode_panels = sorted({(r["B"], r["Hkv"]) for r in decode})
    total = len(panels) + len(decode_panels)
    if not total:
        return False
    cols = min(2, total)
    nrows = (total + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(6 * cols, 3.6 * nrows), squeeze=False)
    # Decode: K/V read bandwidth against cache length per implementation, one panel per (B, Hkv), with the copy
    # bandwidth of the run as the roofline.
    for ax, (b, hkv) in zip(list(axes.flat)[len(panels):], decode_panels):
        pts = sorted((r for r in decode if (r["B"], r["Hkv"]) == (b, hkv)), key=lambda r: r["L"])
        kv_bytes = lambda r: 2 * r["B"] * r["Hkv"] * r["L"] * r["D"] * 2  # noqa: E731
        ax.plot([r["L"] for r in pts], [r["tbs"] for r in pts], marker="o", label="flash_attn2 fwd_kvcache")
        for name in ("flash", "cudnn", "efficient"):
            sdpa = [(r["L"], kv_bytes(r) / (r[f"sdpa_{name}_us"] * 1e-6) / 1e12) for r in pts
                    if r.get(f"sdpa_{name}_us") is not None]
            if sdpa:
                ax.plot([p[0] for p in sdpa], [p[1] for p in sdpa], marker=".", label=f"sdpa {name}")
        ax.axhline(pts[0]["copy_tbs"], color="gray", linestyle=":", label="copy bandwidth")
        ax.set_xscale("log", base=2)
        ax.set_title(f"decode bf16 D={pts[0]['D']} B={b} Hkv={hkv}")
        ax.set_xlabel("cache length")
        ax.set_ylabel("K/V read TB/s")
        ax.legend(fontsize=7)
    for ax, (device, dtype, d, direction) in zip(axes.flat, panels):
        for impl in sorted({r["impl"] for r in rows}):
            for causal in (False, True):
                key = (device, dtype, d, direction, impl, causal)
                pts = sorted((r["N"], r[metric]) for r in rows
                             if (r["device"], r["dtype"], r["D"], r["direction"], r["impl"], r["causal"]) == key)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], "--" if causal else "-", marker="o",
                            label=f"{impl}{' causal' if causal else ''}")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{device} {dtype} D={d} {direction}")
        ax.set_xlabel("sequence length")
        ax.set_ylabel("TFLOP/s" if metric == "tflops" else "ms")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[total:]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--quick", action="store_true", help="a smaller CUDA grid")
    parser.add_argument("--reps", type=int, default=5, help="CPU timing repetitions")
    parser.add_argument("--out", help="also write the CUDA table (markdown) here")
    parser.add_argument("--head-dims", type=lambda x: [int(d) for d in x.split(",")],
                        help="comma-separated CUDA head dims (default 64,128 with --quick, else 64,128,256)")
    parser.add_argument("--seqlens", type=lambda x: [int(n) for n in x.split(",")],
                        help="comma-separated CUDA grid sequence lengths (default 2048,8192,16384 with --quick, else "
                             "512,...,16384; B = 16384 // N)")
    parser.add_argument("--variants", action="store_true",
                        help="CUDA: also time varlen, sliding window, softcap, ALiBi, dropout and deterministic rows")
    parser.add_argument("--variants-only", action="store_true", help="CUDA: only the variant rows")
    parser.add_argument("--decode", action="store_true",
                        help="CUDA: also time decoding (fwd_kvcache, one query over a long KV cache) vs SDPA")
    parser.add_argument("--decode-only", action="store_true", help="CUDA: only the decode rows")
    parser.add_argument("--provider", action="store_true",
                        help="CUDA: also time SDPA's flash path with the flash_attn2 SDPA provider active")
    parser.add_argument("--provider-only", action="store_true", help="CUDA: only the SDPA provider rows")
    parser.add_argument("--gqa", action="store_true",
                        help="CUDA: add the GQA rows (D=128, causal, 32/8 and 64/8 heads, N=4k and 8k)")
    parser.add_argument("--gqa-only", action="store_true", help="CUDA: only the GQA rows")
    parser.add_argument("--json", help="also write every timing as JSON here (for machines)")
    parser.add_argument("--settle-ms", type=float, default=0.0,
                        help="CUDA: run each case this long before timing it (steady clock and power)")
    parser.add_argument("--plot", help="write a PNG plot here (default: next to --out, with .png); needs matplotlib")
    parser.add_argument("--cpu-seqlens", type=lambda x: [int(n) for n in x.split(",")], default=[1024, 4096],
                        help="CPU sequence lengths (default 1024,4096)")
    args = parser.parse_args(argv)
    global SETTLE_MS
    SETTLE_MS = args.settle_ms
    devices = ["cpu", "cuda"] if args.device == "auto" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        if args.device == "cuda":
            sys.exit("flash_attn2.bench: --device cuda asked for, but torch sees no CUDA device")
        devices.remove("cuda")
        print("no CUDA device: CPU only")
    torch.manual_seed(0)
    ok = True
    for device in devices:
        dtypes = [torch.float32] if device == "cpu" else [torch.bfloat16, torch.float16]
        for dtype in dtypes:
            for causal, ours, theirs in check_correctness(device, dtype):
                passed = ours <= 2 * theirs + 1e-5
                ok &= passed
                print(f"check {device} {str(dtype):15} causal={causal!s:5}: max |err| vs fp64 {ours:.2e} "
                      f"(SDPA in same dtype {theirs:.2e}) {'ok' if passed else 'FAIL'}")
    rows = []
    for device in devices:
        if device == "cpu":
            bench_cpu(args.reps, rows, args.cpu_seqlens)
        else:
            if not (args.variants_only or args.decode_only or args.provider_only or args.gqa_only):
                bench_cuda(args.quick, args.out, rows, args.head_dims, args.seqlens)
            if args.variants or args.variants_only:
                bench_variants_cuda(args.out)
            if args.decode or args.decode_only:
                bench_decode_cuda(args.out, rows)
            if args.provider or args.provider_only:
                bench_provider_cuda(args.out, rows)
            if args.gqa or args.gqa_only:
                bench_gqa_cuda(args.out)
    if args.json:
        write_json(args.json, rows)
    plot = args.plot or (args.out.rsplit(".", 1)[0] + ".png" if args.out else None)
    if plot and rows:
        if write_plot(plot, rows):
            print(f"plot: {plot}")
        else:
            print("plot skipped: matplotlib is not installed (pip install .[bench])")
    if not ok:
        sys.exit("flash_attn2.bench: correctness check failed")


if __name__ == "__main__":
    main()
