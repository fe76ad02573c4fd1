"""Per-kernel device time of the backward op (torch.profiler), under several environments in one process:

    python3 scripts/bwd_kernel_times.py --case 128,F,2048,none --variants "on:;off:FLASH_ATTN2_BWD_DQ_STORE=0"

Cases and variants as scripts/env_ab.py's. Each variant: a warm-up, then --reps calls profiled; each kernel's
mean microseconds a call (kernels named by their first 60 characters)."""

import argparse
import collections
import os

import torch
from torch.profiler import ProfilerActivity, profile

from env_ab import make_case


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", required=True)
    ap.add_argument("--variants", required=True)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    d, causal, n, mod = args.case.split(",")
    (q, k, v), cargs, kw, (_, fwd_lse, bwd), _ = make_case(int(d), causal == "T", int(n), mod, torch.bfloat16)
    o, lse = fwd_lse(q, k, v, *cargs, **kw)
    do = torch.randn_like(o)
    for spec in args.variants.split(";"):
        name, _, assigns = spec.partition(":")
        env = dict(a.split("=", 1) for a in assigns.split(",") if a)
        saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        for _ in range(10):
            bwd(do, q, k, v, o, lse, *cargs, **kw)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.reps):
                bwd(do, q, k, v, o, lse, *cargs, **kw)
            torch.cuda.synchronize()
        times = collections.defaultdict(float)
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                times[e.name[:60]] += e.device_time / args.reps
        total = sum(times.values())
        print(f"{args.case} {name}: total {total:.1f} us; " +
              "; ".join(f"{k} {t:.1f}" for k, t in sorted(times.items(), key=lambda kv: -kv[1])))
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


if __name__ == "__main__":
    main()
