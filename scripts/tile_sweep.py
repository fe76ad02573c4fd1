"""Tile-configuration sweep: one library build per process (FLASH_ATTN2_LIBRARY), its gradients checked
against a float64 reference, then fwd and bwd timed beside SDPA flash in the same process (bf16, D 64 / 128).
Used to pick rows of the traits table (csrc/cuda/kernel_traits.cuh); scripts/tile_sweep.sh builds the variant
libraries. Columns: label | D | causal | N | fwd ours | fwd flash | ratio | bwd ours | bwd flash | ratio (TFLOP/s).

    FLASH_ATTN2_LIBRARY=build/sweep/v1.so python3 scripts/tile_sweep.py --label v1
"""

import argparse
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flash_attn2
from compare_kernels import naive_grads  # scripts/ is on sys.path when this runs as a script
from flash_attn2.bench import median_ms_cuda

# The traits table shapes the mma.sync kernels only: time those, also on sm_90 where wgmma ones would run.
os.environ.setdefault("FLASH_ATTN2_PORTABLE_KERNELS", "1")


def check(dtype):
    """Max gradient error vs float64 over the allowance of the test suite (python/tests/reference.py): 2x the
    error of the same naive attention computed in `dtype`, plus 1e-3."""
    worst = 0.0
    for d in (64, 128):
        for nq, nk, causal in ((257, 1000, True), (1000, 257, False), (333, 333, True)):
            q, k, v = (torch.randn(2, 4, n, d, device="cuda", dtype=dtype, requires_grad=True)
                       for n in (nq, nk, nk))
            dout = torch.randn(2, 4, nq, d, device="cuda", dtype=dtype)
            ref = naive_grads(q, k, v, dout, causal, torch.float64)
            theirs = naive_grads(q, k, v, dout, causal, dtype)
            ours = torch.autograd.grad(flash_attn2.attention(q, k, v, causal), (q, k, v), dout)
            for o, t, r in zip(ours, theirs, ref):
                err_o = (o.double() - r).abs().max().item()
                err_t = (t.double() - r).abs().max().item()
                worst = max(worst, err_o / (2 * err_t + 1e-3))
    return worst


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--label", default="")
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    worst = check(torch.bfloat16)
    print(f"{args.label}: gradient error / allowed = {worst:.2f} {'ok' if worst <= 1 else 'FAIL'}", flush=True)
    for d in (64, 128):
        for causal in (False, True):
            for n in (2048, 16384):
                b, h = 16384 // n, 2048 // d
                q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
                           .requires_grad_() for _ in range(3))
                dout = torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
                fwd_flops = 4 * b * h * n * n * d / (2 if causal else 1)

                def fwd_bwd_ms(fn):
                    with torch.no_grad():
                        fwd = median_ms_cuda(fn, warmup=5, reps=args.reps)
                    out = fn()
                    bwd = median_ms_cuda(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True),
                                         warmup=5, reps=args.reps)
                    return fwd, bwd

                ours = fwd_bwd_ms(lambda: flash_attn2.attention(q, k, v, causal))
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    flash = fwd_bwd_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
                cells = []
                for i, flops in ((0, fwd_flops), (1, 2.5 * fwd_flops)):
                    cells += [f"{flops / ours[i] / 1e9:.0f}", f"{flops / flash[i] / 1e9:.0f}", f"{flash[i] / ours[i]:.3f}"]
                print(f"| {args.label} | {d} | {causal} | {n} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
