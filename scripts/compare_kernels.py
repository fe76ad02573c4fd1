"""Backward kernels side by side on one GPU: the default selection (on an H100 built with sm_90a: the wgmma
kernels for d = 64 / 128 / 256) and the portable mma.sync kernel (FLASH_ATTN2_PORTABLE_KERNELS=1), each checked
against float64 on edge shapes, then timed beside SDPA flash on the benchmark shapes (bf16, B*N = 16k,
hidden 2048). Columns of the timing table: D | causal | N | bwd TFLOP/s default | portable | SDPA flash |
default / flash.

    FLASH_ATTN2_LIBRARY=build/gpu/libflash_attn2.so python3 scripts/compare_kernels.py
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flash_attn2
from flash_attn2.bench import median_ms_cuda

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python", "tests"))
from reference import naive_attention  # noqa: E402

PORTABLE = "FLASH_ATTN2_PORTABLE_KERNELS"


def select(portable):
    if portable:
        os.environ[PORTABLE] = "1"
    else:
        os.environ.pop(PORTABLE, None)


def naive_grads(q, k, v, dout, causal, dtype):
    """Gradients of the naive attention of python/tests/reference.py computed in `dtype` (float64: the
    reference)."""
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out, _ = naive_attention(q, k, v, causal)
    return torch.autograd.grad(out, (q, k, v), dout.to(dtype))


def check(dtype):
    """Worst error / allowance over edge shapes for each kernel; allowance = 2 x the error of the same naive
    attention in `dtype` + 1e-3 (python/tests/reference.py's rule)."""
    shapes = []  # (b, hq, hkv, nq, nk, d, causal)
    for d in (64, 128, 256):
        shapes += [(2, 4, 4, 257, 1000, d, True), (2, 4, 2, 1000, 257, d, False), (1, 2, 2, 333, 333, d, True),
                   (1, 2, 1, 1, 17, d, True), (1, 2, 2, 17, 1, d, False), (2, 8, 1, 200, 130, d, True),
                   (1, 2, 2, 128, 128, d, False), (1, 2, 2, 64, 256, d, True)]
    shapes += [(1, 2, 2, 300, 300, 72, True), (1, 2, 2, 300, 129, 120, False)]  # padded head dims
    worst = {False: 0.0, True: 0.0}
    for b, hq, hkv, nq, nk, d, causal in shapes:
        q = torch.randn(b, nq, hq, d, device="cuda", dtype=dtype).transpose(1, 2)
        k, v = (torch.randn(b, hkv, nk, d, device="cuda", dtype=dtype) for _ in range(2))
        dout = torch.randn(b, hq, nq, d, device="cuda", dtype=dtype)
        ref = naive_grads(q, k, v, dout, causal, torch.float64)
        theirs = naive_grads(q, k, v, dout, causal, dtype)
        out, lse = flash_attn2.attention_with_lse(q, k, v, causal)
        for portable in (False, True):
            select(portable)
            ours = torch.ops.flash_attn2.bwd(dout, q, k, v, out, lse, causal)
            ratios = []
            for name, o, t, r in zip("qkv", ours, theirs, ref):
                err_o = (o.double() - r).abs().max().item()
                err_t = (t.double() - r).abs().max().item()
                ratios.append(err_o / (2 * err_t + 1e-3))
            worst[portable] = max(worst[portable], *ratios)
            if max(ratios) > 1 or not all(torch.isfinite(g).all() for g in ours):
                print(f"FAIL {'portable' if portable else 'default '} {dtype} b{b} h{hq}/{hkv} nq{nq} nk{nk} "
                      f"d{d} causal={causal}: error/allowed dq {ratios[0]:.2f} dk {ratios[1]:.2f} "
                      f"dv {ratios[2]:.2f}", flush=True)
        select(False)
    return worst


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--seqlens", default="2048,16384")
    args = parser.parse_args()
    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        worst = check(dtype)
        print(f"check {dtype}: worst error / allowed: default {worst[False]:.2f}, portable {worst[True]:.2f} "
              f"({'ok' if max(worst.values()) <= 1 else 'FAIL'})", flush=True)
    print("| D | causal | N | bwd default | bwd portable | bwd SDPA flash | default / flash |")
    print("|---|---|---|---|---|---|---|")
    for d in (64, 128, 256):
        for causal in (False, True):
            for n in (int(x) for x in args.seqlens.split(",")):
                b, h = 16384 // n, 2048 // d
                q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
                           .requires_grad_() for _ in range(3))
                dout = torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
                flops = 2.5 * 4 * b * h * n * n * d / (2 if causal else 1)

                def bwd_ms(fn):
                    out = fn()
                    return median_ms_cuda(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True),
                                          warmup=5, reps=args.reps)

                times = []
                for portable in (False, True):
                    select(portable)
                    times.append(bwd_ms(lambda: flash_attn2.attention(q, k, v, causal)))
                select(False)
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    times.append(bwd_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)))
                tf = [flops / t / 1e9 for t in times]
                print(f"| {d} | {causal} | {n} | {tf[0]:.0f} | {tf[1]:.0f} | {tf[2]:.0f} | {times[2] / times[0]:.2f} |",
                      flush=True)


if __name__ == "__main__":
    main()
