"""A/B of the forward kernel (--direction bwd: the backward) between two builds of the library, or one build under
two environments, in one call on one GPU: each side's timing runs in its own process (FLASH_ATTN2_LIBRARY plus the
side's variables), alternately A, B, A, B, and each cell keeps the better of its runs.

    python3 scripts/ab_forward.py build/a/libflash_attn2.so build/b/libflash_attn2.so [--head-dims 128,256]
    python3 scripts/ab_forward.py build/gpu/libflash_attn2.so,FLASH_ATTN2_FWD_OVERLAP=0 \
        build/gpu/libflash_attn2.so,FLASH_ATTN2_FWD_OVERLAP=1 --head-dims 128 --causal-lengths 2048,4096,8192
    python3 scripts/ab_forward.py a.so b.so --head-dims 128 --lengths "" --causal-lengths 8192 \
        --mods none,softcap,alibi,dropout      (score modifiers: softcap 50, ALiBi slopes, dropout 0.1;
                                                    varlen: 16k tokens packed, lengths drawn from 64..N;
                                                    det: the deterministic backward;
                                                    window: 4096 keys left (and right, not causal); its
                                                    TFLOP/s count every score of the mask's shape: compare
                                                    the B/A ratio only)
"""

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, torch, flash_attn2
from flash_attn2.bench import packed_lengths
res = {}
dtype = getattr(torch, sys.argv[7])
ints = lambda s: [int(x) for x in s.split(",") if x]
cases = [(d, causal, n, mod) for d in ints(sys.argv[1]) for causal in (False, True)
         for n in ints(sys.argv[3 if causal else 2]) for mod in sys.argv[4].split(",")]
for d, causal, n, mod in cases:
    b, h = 16384 // n, 2048 // d
    hkv = h
    if mod == "gqa":  # the bench's GQA rows' grouping: 64 query heads over 8 K/V heads
        h, hkv = 64, 8
    kw = {"softcap": dict(softcap=50.0), "alibi": dict(alibi_slopes=torch.rand(h, device="cuda")),
          "dropout": dict(dropout_p=0.1, rng_state=torch.tensor([1, 2])), "none": {}, "varlen": {}, "det": {},
          "gqa": {},
          "window": dict(window_size=(4096, 0) if causal else (4096, 4096))}[mod]
    bwd_kw = dict(kw, deterministic=True) if mod == "det" else kw  # det: the deterministic backward
    if mod == "varlen":  # 16k tokens packed, lengths drawn from 64..N
        lens = packed_lengths(16384, n)
        cu = torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32)
        q, k, v = (torch.randn(16384, h, d, device="cuda", dtype=dtype) for _ in range(3))
        args = (cu, cu, max(lens), max(lens), causal)
        fwd, fwd_lse, bwd = (torch.ops.flash_attn2.fwd_varlen, torch.ops.flash_attn2.fwd_varlen_with_lse,
                             torch.ops.flash_attn2.bwd_varlen)
        scores = sum(l * (l + 1) // 2 if causal else l * l for l in lens)
    else:
        q, k, v = (torch.randn(b, n, hh, d, device="cuda", dtype=dtype).transpose(1, 2) for hh in (h, hkv, hkv))
        args = (causal,)
        fwd, fwd_lse, bwd = torch.ops.flash_attn2.fwd, torch.ops.flash_attn2.fwd_with_lse, torch.ops.flash_attn2.bwd
        scores = b * n * n / (2 if causal else 1)
    f = lambda: fwd(q, k, v, *args, **kw)
    if sys.argv[5] == "bwd":
        o, lse = fwd_lse(q, k, v, *args, **kw)
        do = torch.randn_like(o)
        f = lambda: bwd(do, q, k, v, o, lse, *args, **bwd_kw)
    for _ in range(3):
        f()
    settle = float(sys.argv[6]) / 1e3  # --settle-ms: run the case this long before timing it (steady clock / power)
    if settle > 0:
        w0, w1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        w0.record(); f(); w1.record(); torch.cuda.synchronize()
        for _ in range(max(0, int(settle * 1e3 / max(w0.elapsed_time(w1), 1e-3)) - 1)):
            f()
        torch.cuda.synchronize()
    ts = []
    for _ in range(15):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); f(); e.record(); torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    ms = sorted(ts)[len(ts) // 2]
    flops = 4 * h * scores * d * (2.5 if sys.argv[5] == "bwd" else 1)
    res[f"{d} {causal} {n} {mod}"] = flops / ms / 1e9
print(json.dumps(res))
"""


def start_clock_samples():
    """nvidia-smi sampling the SM clock and power every 100 ms (None where there is no nvidia-smi)."""
    try:
        return subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
                                 "-lms", "100"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    except OSError:
        return None


def stop_clock_samples(smi):
    """[(MHz, W), ...] from start_clock_samples."""
    if smi is None:
        return []
    smi.terminate()
    samples = []
    for line in smi.communicate()[0].splitlines():
        try:
            mhz, watts = (float(x) for x in line.split(","))
            samples.append((mhz, watts))
        except ValueError:
            pass
    return samples


def run_sides(side_a, side_b, child, child_args, rounds=2):
    """Runs `child` (a Python source that prints one JSON object last) for each side, alternately A, B, A, B. A side
    is "library[,VAR=VALUE...]": the process gets FLASH_ATTN2_LIBRARY and those variables. Returns
    {"a": [result of round 1, ...], "b": [...]}. Prints each side's median SM clock and power over its runs: on
    an H200 attention runs at the power cap, so a change that moves work between pipes is paid in clock (perf.md
    v18), and a B/A ratio is read with the clocks beside it."""
    results = {"a": [], "b": []}
    samples = {"a": [], "b": []}
    for _ in range(rounds):
        for name, side in (("a", side_a), ("b", side_b)):
            lib, *assignments = side.split(",")
            env = dict(os.environ, FLASH_ATTN2_LIBRARY=lib, **dict(a.split("=", 1) for a in assignments))
            smi = start_clock_samples()
            try:
                out = subprocess.run([sys.executable, "-c", child, *child_args], env=env, capture_output=True,
                                     text=True, check=True).stdout
            finally:
                samples[name] += stop_clock_samples(smi)
            results[name].append(json.loads(out.strip().splitlines()[-1]))
    for name in ("a", "b"):
        busy = [s for s in samples[name] if s[1] > 150]  # the samples under load (not the process start-up)
        if busy:
            mhz = sorted(s[0] for s in busy)[len(busy) // 2]
            watts = sorted(s[1] for s in busy)[len(busy) // 2]
            print(f"side {name.upper()}: SM clock {mhz:.0f} MHz, {watts:.0f} W (medians of {len(busy)} samples "
                  "above 150 W)", flush=True)
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--head-dims", default="128,256")
    ap.add_argument("--lengths", default="2048,8192,16384", help="sequence lengths of the non-causal rows")
    ap.add_argument("--causal-lengths", default="2048,8192,16384")
    ap.add_argument("--mods", default="none", help="none,softcap,alibi,dropout,varlen,window,det,gqa (64 / 8 heads)")
    ap.add_argument("--direction", default="fwd", choices=("fwd", "bwd"), help="time the forward or the backward op")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    ap.add_argument("--rounds", type=int, default=2, help="A, B alternations; each cell keeps its best")
    ap.add_argument("--settle-ms", type=float, default=0.0,
                    help="run each case this long before its timed runs, so that the clock and power have settled "
                         "to the case's own level (the first rows after a process starts ran at other clocks: "
                         "same-code rows read 0.94-1.02 in session 21)")
    args = ap.parse_args()
    runs = run_sides(args.a, args.b, CHILD,
                     [args.head_dims, args.lengths, args.causal_lengths, args.mods, args.direction,
                      str(args.settle_ms), args.dtype], rounds=args.rounds)
    best = {"a": {}, "b": {}}
    for name, rounds in runs.items():
        for res in rounds:
            for key, tf in res.items():
                best[name][key] = max(best[name].get(key, 0.0), tf)
    print(f"| D | causal | N | modifier | {args.direction} A | {args.direction} B | B/A |")
    print("|---|---|---|---|---|---|---|")
    for key, a in best["a"].items():
        b = best["b"][key]
        print(f"| {' | '.join(key.split())} | {a:.0f} | {b:.0f} | {b / a:.3f} |")


if __name__ == "__main__":
    main()
