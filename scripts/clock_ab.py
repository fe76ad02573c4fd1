"""Speed beside the SM clock and power: each side (a library and its environment, as in ab_forward.py) runs one
case's forward in a loop for a few seconds in its own process, while nvidia-smi samples the SM clock, power and
throttle reasons every 100 ms; sides alternate A, B, A, B. Asks whether a kernel change that saves cycles loses
time to a lower clock (perf.md v18).

    python3 scripts/clock_ab.py build/gpu/libflash_attn2.so,FLASH_ATTN2_SOFTCAP_POLY=0 \\
        build/gpu/libflash_attn2.so --d 128 --n 8192 --softcap 50 [--causal] [--rounds 2]
    python3 scripts/clock_ab.py cudnn build/gpu/libflash_attn2.so --d 128      (a side named cudnn or flash
                                                                                runs SDPA's backend)
    python3 scripts/clock_ab.py cudnn build/gpu/libflash_attn2.so --n 4096 --batch 4 --heads 64 --heads-kv 8 --causal
                                     (the shape by hand: GQA with enable_gqa for SDPA; default 16k tokens, hidden 2048)
"""

import argparse
import os
import statistics
import subprocess
import sys

CHILD = r"""
import sys, time, torch, flash_attn2
d, n, causal, softcap, secs = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", float(sys.argv[4]), float(sys.argv[5])
b, h, hkv = (int(x) for x in sys.argv[7:10])
q = torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
k, v = (torch.randn(b, n, hkv, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
f = lambda: torch.ops.flash_attn2.fwd(q, k, v, causal, softcap=softcap)
if sys.argv[6] != "ours":  # an SDPA backend (softcap not applicable)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[sys.argv[6]]
    def f():
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=hkv != h)
for _ in range(5):
    f()
torch.cuda.synchronize()
print("ready", flush=True)
sys.stdin.readline()
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
reps, t0 = 0, time.time()
s.record()
while time.time() - t0 < secs:
    for _ in range(20):
        f()
    reps += 20
    torch.cuda.synchronize()
e.record()
torch.cuda.synchronize()
ms = s.elapsed_time(e) / reps
flops = 4 * b * h * n * n * d / (2 if causal else 1)
print(f"{flops / ms / 1e9:.1f}", flush=True)
"""


def run_side(side, args):
    lib, *envs = side.split(",")
    kernel = "ours"
    if lib in ("cudnn", "flash"):  # SDPA's backend instead of our op
        kernel, lib = lib, os.environ.get("FLASH_ATTN2_LIBRARY", "")
    env = dict(os.environ, FLASH_ATTN2_LIBRARY=lib)
    env.update(kv.split("=", 1) for kv in envs)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(args.d), str(args.n), "1" if args.causal else "0",
                              str(args.softcap), str(args.seconds), kernel, str(args.batch), str(args.heads),
                              str(args.heads_kv)], env=env, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    smi = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw,clocks_event_reasons.active",
                            "--format=csv,noheader,nounits", "-lms", "100"], stdout=subprocess.PIPE, text=True)
    child.stdin.write("go\n")
    child.stdin.flush()
    tflops = float(child.stdout.readline())
    child.wait()
    smi.terminate()
    lines = [l.split(",") for l in smi.communicate()[0].splitlines() if l.count(",") == 2]
    lines = lines[2:-2] or lines  # drop the edges of the loop
    if not lines:  # nvidia-smi refused the query
        return tflops, float("nan"), float("nan"), ["(no nvidia-smi samples)"]
    clock = statistics.median(float(l[0]) for l in lines)
    power = statistics.median(float(l[1]) for l in lines)
    reasons = sorted({l[2].strip() for l in lines})
    return tflops, clock, power, reasons


def main():
    p = argparse.ArgumentParser()
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--softcap", type=float, default=0.0)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch", type=int, default=0, help="default: 16384 // n")
    p.add_argument("--heads", type=int, default=0, help="query heads; default: 2048 // d")
    p.add_argument("--heads-kv", type=int, default=0, help="default: --heads (no GQA)")
    args = p.parse_args()
    args.batch = args.batch or 16384 // args.n
    args.heads = args.heads or 2048 // args.d
    args.heads_kv = args.heads_kv or args.heads
    print(f"d{args.d} N={args.n} B={args.batch} H={args.heads}/{args.heads_kv} causal={args.causal} "
          f"softcap={args.softcap}")
    print("| side | round | TFLOP/s | SM MHz (median) | W (median) | TFLOP/s per GHz | clock event reasons |")
    print("|---|---|---|---|---|---|---|")
    for r in range(args.rounds):
        for name, side in (("A", args.a), ("B", args.b)):
            tflops, clock, power, reasons = run_side(side, args)
            print(f"| {name} | {r} | {tflops:.0f} | {clock:.0f} | {power:.0f} | {tflops / clock * 1e3:.0f} | "
                  f"{' '.join(reasons)} |", flush=True)


if __name__ == "__main__":
    main()
