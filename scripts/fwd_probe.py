"""Where the warp-specialised forward's consumer cycles go (perf.md v32): runs cases on a -DFLASH_ATTN2_FWD_TIMELINE
build (FLASH_ATTN2_LIBRARY) and reads FwdProbe's counters (flash_fwd_sm90_ws_kernel.cuh): per consumer warpgroup,
SM clock cycles in each step of its loop. Prints, per case, the time of an unprobed call (the bench's median of 15),
and cycles per consumer per key tile for each slot, plus per query tile for the once-a-tile slots.

  FLASH_ATTN2_LIBRARY=build/probe/libflash_attn2.so python3 scripts/fwd_probe.py --cases "128,F,2048;128,F,8192"

A case is "D,causal(T/F),N[,W<left>][,ENV=VALUE...]"; B = 16384 / N, H = 2048 / D, bf16, (B, N, H, D) memory;
W<left>: a sliding window of <left> keys (and as many right where not causal), TFLOP/s counting visible scores.
"""
import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
import flash_attn2  # noqa: E402,F401
from flash_attn2.bench import median_ms_cuda, window_visible_scores  # noqa: E402

SLOTS = ["q_wait", "kv_wait", "turn_wait", "issue", "s_wait", "softmax", "pv_wait", "rescale", "epilogue", "tiles",
         "iters", "total", "issue_pv", "epi_finalize", "epi_stage", "epi_sync", "setup", "consume", "advance"]
EPI = (13, 14, 15, 8)  # the epilogue's steps in order: finalize, O staged (and the LSE), barrier, stores on


def time_and_probe(f, env):
    """(median ms of f over 15 unprobed calls, the counters one more call wrote as a list of strings), with env set
    for both and restored after (shared with scripts/bwd_probe.py)."""
    old = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        ms = median_ms_cuda(f, warmup=5, reps=15)
        with tempfile.NamedTemporaryFile("r", suffix=".txt") as tmp:
            os.environ["FLASH_ATTN2_TIMELINE_FILE"] = tmp.name
            f()
            torch.cuda.synchronize()
            del os.environ["FLASH_ATTN2_TIMELINE_FILE"]
            line = open(tmp.name).read().split()
    finally:
        for key, val in old.items():
            if val is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = val
    return ms, line


def run_case(d, causal, n, env, window=-1):
    b, h = 16384 // n, 2048 // d
    kw = {} if window < 0 else dict(window_size=(window, 0 if causal else window))
    q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    f = lambda: torch.ops.flash_attn2.fwd(q, k, v, causal, **kw)
    ms, line = time_and_probe(f, env)
    vals = torch.tensor([int(x) for x in line], dtype=torch.float64).view(-1, 3, len(SLOTS))
    used = vals[vals[:, :, 9] > 0]  # (block, consumer) pairs that ran a tile
    if window < 0:
        flops = 4 * b * h * n * n * d / (2 if causal else 1)
    else:
        flops = 4 * b * h * d * window_visible_scores(n, window, 0 if causal else window)
    return ms, flops / ms / 1e9, used


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="128,F,2048;128,F,8192;128,T,2048;128,T,8192")
    args = ap.parse_args()
    print("| case | ms | TFLOP/s | consumers | tiles / consumer | key tiles / tile | "
          + " | ".join(f"{s} /kt" for s in SLOTS[:9]) + " | issue_pv /kt | total /kt | untracked /kt | epilogue /tile "
          "(finalize + staged + barrier + stores) | q_wait /tile | untracked /tile: advance + set-up + in consume + "
          "the end |")
    print("|" + "---|" * 21)
    for case in args.cases.split(";"):
        parts = case.split(",")
        d, causal, n = int(parts[0]), parts[1] == "T", int(parts[2])
        window = next((int(x[1:]) for x in parts[3:] if x.startswith("W")), -1)
        env = dict(x.split("=", 1) for x in parts[3:] if "=" in x)
        ms, tflops, used = run_case(d, causal, n, env, window)
        sums = used.sum(0)
        iters, tiles = sums[10].item(), sums[9].item()
        epi = [sums[i].item() / tiles for i in EPI]
        sums[8] = sum(sums[i] for i in EPI)  # the epilogue column: all its steps
        per_kt = [sums[i].item() / iters for i in range(9)] + [sums[12].item() / iters]
        total = sums[11].item() / iters
        untracked = total - sum(per_kt)
        # The untracked cycles split: the walk's step (advance) and the tile's set-up between calls of consume, what
        # a call spends outside its slots, and what follows the last call (the consumer's end).
        setup, consume, adv = sums[16].item(), sums[17].item(), sums[18].item()
        tracked = sum(per_kt) * iters
        print(f"| {case} | {ms:.3f} | {tflops:.0f} | {used.shape[0]} | {tiles / used.shape[0]:.1f} | "
              f"{iters / tiles:.1f} | " + " | ".join(f"{x:.0f}" for x in per_kt)
              + f" | {total:.0f} | {untracked:.0f} | {sums[8].item() / tiles:.0f} ("
              + " + ".join(f"{x:.0f}" for x in epi) + f") | {sums[0].item() / tiles:.0f} | "
              f"{adv / tiles:.0f} + {setup / tiles:.0f} + {(consume - tracked) / tiles:.0f} + "
              f"{(sums[11].item() - adv - setup - consume) / tiles:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
