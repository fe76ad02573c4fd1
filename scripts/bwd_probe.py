"""Where the warp-specialised backward's consumer cycles go: runs cases on a -DFLASH_ATTN2_BWD_TIMELINE build
(FLASH_ATTN2_LIBRARY) and reads BwdProbe's counters (flash_bwd_sm90_kernel.cuh): per consumer warpgroup, SM clock
cycles in each step of its loop. Prints, per case, the time of an unprobed backward call (median of 15) and the
cycles per consumer per step for each slot (the forward's counterpart: scripts/fwd_probe.py, perf.md v32).

  FLASH_ATTN2_LIBRARY=build/bprobe/libflash_attn2.so python3 scripts/bwd_probe.py --cases "128,F,8192;64,F,8192"

A case is "D,causal(T/F),N[,ENV=VALUE...]"; B = 16384 / N, H = 2048 / D, bf16, (B, N, H, D) memory. Build the
library with the macro in both the CUDA and the host code, e.g.
  cmake -S . -B build/bprobe -G Ninja -DFLASH_ATTN2_WITH_CUDA=ON -DFLASH_ATTN2_CUDA_ARCHS=90a \\
    -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH=$(python3 -c "import torch; print(torch.utils.cmake_prefix_path)") \\
    -DCMAKE_CUDA_FLAGS=-DFLASH_ATTN2_BWD_TIMELINE -DCMAKE_CXX_FLAGS=-DFLASH_ATTN2_BWD_TIMELINE
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flash_attn2  # noqa: E402,F401
from fwd_probe import time_and_probe  # noqa: E402

# BwdProbe::Slot, in order (flash_bwd_sm90_kernel.cuh)
SLOTS = ["full_wait", "issue_s_dp", "s_wait", "probs", "dp_wait", "ds", "issue_dv", "ds_barrier", "issue_dq",
         "issue_dk", "dq_wait", "dq_buf_wait", "dq_store", "dk_wait", "steps", "total"]
CONSUMERS, NSLOTS = 2, 16


def run_case(d, causal, n, env):
    b, h = 16384 // n, 2048 // d
    q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    o, lse = torch.ops.flash_attn2.fwd_with_lse(q, k, v, causal)
    do = torch.randn_like(o)
    ms, line = time_and_probe(lambda: torch.ops.flash_attn2.bwd(do, q, k, v, o, lse, causal), env)
    if not line:
        sys.exit("bwd_probe.py: no counters written: is FLASH_ATTN2_LIBRARY a -DFLASH_ATTN2_BWD_TIMELINE build, "
                 "and does this case run the WS backward?")
    vals = torch.tensor([int(x) for x in line], dtype=torch.float64).view(-1, CONSUMERS, NSLOTS)
    used = vals[vals[:, :, SLOTS.index("steps")] > 0]  # (block, consumer) pairs that ran a step
    flops = 2.5 * 4 * b * h * n * n * d / (2 if causal else 1)
    return ms, flops / ms / 1e9, used


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="128,F,8192;128,T,8192;64,F,8192;128,F,2048")
    args = ap.parse_args()
    shown = SLOTS[:14]
    print("| case | ms | TFLOP/s | consumers | steps / consumer | " + " | ".join(f"{s} /step" for s in shown)
          + " | total /step | untracked /step |")
    print("|" + "---|" * (len(shown) + 7))
    for case in args.cases.split(";"):
        parts = case.split(",")
        d, causal, n = int(parts[0]), parts[1] == "T", int(parts[2])
        env = dict(x.split("=", 1) for x in parts[3:] if "=" in x)
        ms, tflops, used = run_case(d, causal, n, env)
        sums = used.sum(0)
        steps = sums[SLOTS.index("steps")].item()
        per = [sums[i].item() / steps for i in range(len(shown))]
        total = sums[SLOTS.index("total")].item() / steps
        print(f"| {case} | {ms:.3f} | {tflops:.0f} | {used.shape[0]} | {steps / used.shape[0]:.1f} | "
              + " | ".join(f"{x:.0f}" for x in per) + f" | {total:.0f} | {total - sum(per):.0f} |", flush=True)


if __name__ == "__main__":
    main()
