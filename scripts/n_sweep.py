"""Ours against SDPA's cuDNN backend over sequence lengths near one another, same process, alternating rounds:
how the ratio moves with N modulo the kernels' tile sizes (the WS backward's 80-query steps at d128, the
forward's 128-row query tiles), e.g. #11's d128 non-causal 2k rows (perf.md v49).

    python3 scripts/n_sweep.py --d 128 --b 8 --h 16 --ns 1920,2000,2048,2080 [--causal] [--rounds 3]

(B, N, H, D) buffers viewed as (B, H, N, D), as the bench's grid. TFLOP/s count 4 B H N^2 D (halved causal),
the backward 2.5x; each cell the best of --rounds medians (flash_attn2.bench.time_cuda_case). --settle-ms runs
each case that long before it is timed, as the bench's grid does; --spread adds each ratio's spread over the
rounds (ours / cuDNN of each round: min, median, max), to tell a row under 1.0 from one at 1.0 whose readings
scatter around it.

    python3 scripts/n_sweep.py --d 256 --b 2 --h 8 --ns 8192 --causal --rounds 8 --settle-ms 300 --spread"""

import argparse
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flash_attn2
import flash_attn2.bench as bench
from flash_attn2.bench import time_cuda_case


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--b", type=int, default=8)
    ap.add_argument("--h", type=int, default=16)
    ap.add_argument("--ns", default="1920,2000,2048,2080")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--settle-ms", type=float, default=0.0)
    ap.add_argument("--spread", action="store_true")
    args = ap.parse_args()
    bench.SETTLE_MS = args.settle_ms
    extra = " fwd per round (min / median / max) | bwd per round |" if args.spread else ""
    print("| N | fwd ours | fwd cudnn | fwd ours/cudnn | bwd ours | bwd cudnn | bwd ours/cudnn |" + extra)
    print("|---|---|---|---|---|---|---|" + ("---|---|" if args.spread else ""))
    for n in (int(x) for x in args.ns.split(",")):
        q, k, v, dout = (torch.randn(args.b, n, args.h, args.d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
                         for _ in range(4))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        def ours(q, k, v):
            return flash_attn2.attention(q, k, v, args.causal)

        def cudnn(q, k, v):
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=args.causal)

        best = {"ours": [float("inf")] * 2, "cudnn": [float("inf")] * 2}
        ratios = ([], [])  # cuDNN's time / ours, round by round
        for r in range(args.rounds):
            times = {}
            order = (("ours", ours), ("cudnn", cudnn))
            for name, fn in order[::-1] if r % 2 else order:  # each first in every other round
                f, b = times[name] = time_cuda_case(fn, q, k, v, dout)
                best[name] = [min(best[name][0], f), min(best[name][1], b)]
            for i in range(2):
                ratios[i].append(times["cudnn"][i] / times["ours"][i])
        flops = 4 * args.b * args.h * n * n * args.d / (2 if args.causal else 1)
        tf = {name: (flops / t[0] / 1e9, 2.5 * flops / t[1] / 1e9) for name, t in best.items()}
        print(f"| {n} | {tf['ours'][0]:.0f} | {tf['cudnn'][0]:.0f} | {tf['ours'][0] / tf['cudnn'][0]:.3f} | "
              f"{tf['ours'][1]:.0f} | {tf['cudnn'][1]:.0f} | {tf['ours'][1] / tf['cudnn'][1]:.3f} |" +
              "".join(f" {min(r):.3f} / {statistics.median(r):.3f} / {max(r):.3f} |" for r in ratios if args.spread),
              flush=True)


if __name__ == "__main__":
    main()
