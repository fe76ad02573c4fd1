"""The backward's fixed cost per key-tile block: time of the backward op over Nk keys (fixed: a fixed grid of
key-tile blocks) for several Nq (steps per block = Nq / step rows), non-causal; a least-squares line of time
against Nq gives ms per query row (the steps) and the intercept (what every block pays whatever its steps, times
the waves, plus the preprocess / convert kernels' fixed part)."""
import argparse, statistics, torch
import flash_attn2  # noqa
from flash_attn2.bench import median_ms_cuda

ap = argparse.ArgumentParser()
ap.add_argument("--d", type=int, default=256)
ap.add_argument("--nk", type=int, default=8192)
ap.add_argument("--bh", default="2,8")
ap.add_argument("--nqs", default="512,1024,2048,4096,8192")
ap.add_argument("--rounds", type=int, default=3)
a = ap.parse_args()
b, h = map(int, a.bh.split(","))
nqs = [int(x) for x in a.nqs.split(",")]
k, v = (torch.randn(b, a.nk, h, a.d, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
cases = {}
for nq in nqs:
    q = torch.randn(b, nq, h, a.d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    o, lse = torch.ops.flash_attn2.fwd_with_lse(q, k, v, False)
    do = torch.randn_like(o)
    cases[nq] = (q, o, lse, do)
best = {nq: float("inf") for nq in nqs}
for _ in range(a.rounds):
    for nq in nqs:
        q, o, lse, do = cases[nq]
        f = lambda: torch.ops.flash_attn2.bwd(do, q, k, v, o, lse, False)
        best[nq] = min(best[nq], median_ms_cuda(f, warmup=5, reps=20))
slope, icpt = statistics.linear_regression(nqs, [best[n] for n in nqs])
print(f"d{a.d} Nk {a.nk} B {b} H {h}: ms per 1k query rows {slope * 1024:.4f}, intercept {icpt:.4f} ms")
for n in nqs:
    fl = 2.5 * 4 * b * h * n * a.nk * a.d
    print(f"  Nq {n}: {best[n]:.4f} ms ({fl / best[n] / 1e9:.0f} TFLOP/s), line {icpt + slope * n:.4f}")
# Both the intercept and a 64-row step's time scale with the waves, so their ratio is steps per block.
print(f"  fixed cost per block: {icpt / (slope * 64):.2f} steps of 64 query rows")
