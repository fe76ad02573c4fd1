"""Several environments of one library, timed in one process: the launchers read their FLASH_ATTN2_* variables on
every call, so the variants can take turns call by call (A, B, C, A, B, C, ...) on the same inputs, under the
same clock and power state, without ab_forward.py's process per side and round (5-8 s each). Each cell is the
median of --reps CUDA-event timed calls after a settle run of --settle-ms; each variant keeps its best round.

    python3 scripts/env_ab.py --cases "128,T,16384,window;128,F,4096,varlen" \
        --variants "default:;group16:FLASH_ATTN2_FWD_GRID_GROUP=16;dynamic:FLASH_ATTN2_FWD_WS_WALK=dynamic"

A case is D,causal (T/F),N,mod with the mods of ab_forward.py (none, window, varlen, softcap, alibi, dropout) or
gqa (4 query heads a K/V head); 16k tokens, hidden 2048, (B, N, H, D) memory. A variant is
name:VAR=value,VAR=value (nothing after the colon: the environment as it is). --direction bwd times the backward
op. Only variables the launchers read per call may be varied (not FLASH_ATTN2_LIBRARY).
"""

import argparse
import os
import statistics

import torch

import flash_attn2  # noqa: F401  (loads the library, registers the ops)
from flash_attn2.bench import packed_lengths, window_visible_scores


def make_case(d, causal, n, mod, dtype):
    b, h = 16384 // n, 2048 // d
    kw = {"softcap": dict(softcap=50.0), "alibi": dict(alibi_slopes=torch.rand(h, device="cuda")),
          "dropout": dict(dropout_p=0.1, rng_state=torch.tensor([1, 2])), "none": {}, "varlen": {},
          "window": dict(window_size=(4096, 0) if causal else (4096, 4096)), "gqa": {}}[mod]
    if mod == "varlen":  # 16k tokens packed, lengths drawn from 64..N (the bench's batch when N = 4096)
        lens = packed_lengths(16384, n)
        cu = torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32)
        q, k, v = (torch.randn(16384, h, d, device="cuda", dtype=dtype) for _ in range(3))
        args = (cu, cu, max(lens), max(lens), causal)
        ops = (torch.ops.flash_attn2.fwd_varlen, torch.ops.flash_attn2.fwd_varlen_with_lse,
               torch.ops.flash_attn2.bwd_varlen)
        scores = h * sum(l * (l + 1) // 2 if causal else l * l for l in lens)
    else:
        hkv = h // 4 if mod == "gqa" else h  # gqa: 4 query heads a K/V head
        q = torch.randn(b, n, h, d, device="cuda", dtype=dtype).transpose(1, 2)
        k, v = (torch.randn(b, n, hkv, d, device="cuda", dtype=dtype).transpose(1, 2) for _ in range(2))
        args = (causal,)
        ops = torch.ops.flash_attn2.fwd, torch.ops.flash_attn2.fwd_with_lse, torch.ops.flash_attn2.bwd
        scores = b * h * n * n / (2 if causal else 1)
        if mod == "window":  # count the visible scores only
            scores = b * h * window_visible_scores(n, 4096, 0 if causal else 4096)
    return (q, k, v), args, kw, ops, 4 * d * scores


def time_ms(fn, reps):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def settle(fn, ms):
    if ms <= 0:
        return
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    while True:
        fn()
        end.record()
        end.synchronize()
        if start.elapsed_time(end) >= ms:
            return


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", required=True)
    ap.add_argument("--variants", required=True)
    ap.add_argument("--direction", default="fwd", choices=("fwd", "bwd"))
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--settle-ms", type=float, default=200.0)
    args = ap.parse_args()
    variants = []
    for spec in args.variants.split(";"):
        name, _, assigns = spec.partition(":")
        env = dict(a.split("=", 1) for a in assigns.split(",") if a)
        variants.append((name, env))
    names = {k for _, env in variants for k in env}
    base = {k: os.environ.get(k) for k in names}

    def apply(env):
        for k in names:
            v = env.get(k, base[k])
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    dtype = getattr(torch, args.dtype)
    print(f"| case | {' | '.join(n + ' TFLOP/s' for n, _ in variants)} | "
          f"{' | '.join(n + ' / ' + variants[0][0] for n, _ in variants[1:])} |")
    print("|---" * (2 * len(variants)) + "|")
    for spec in args.cases.split(";"):
        d, causal, n, mod = spec.split(",")
        (q, k, v), cargs, kw, (fwd, fwd_lse, bwd), flops = make_case(int(d), causal == "T", int(n), mod, dtype)
        fn = lambda: fwd(q, k, v, *cargs, **kw)  # noqa: E731
        if args.direction == "bwd":
            o, lse = fwd_lse(q, k, v, *cargs, **kw)
            do = torch.randn_like(o)
            fn = lambda: bwd(do, q, k, v, o, lse, *cargs, **kw)  # noqa: E731
        best = [float("inf")] * len(variants)
        for _ in range(args.rounds):
            for i, (_, env) in enumerate(variants):
                apply(env)
                settle(fn, args.settle_ms)
                best[i] = min(best[i], time_ms(fn, args.reps))
        apply({})
        if args.direction == "bwd":
            flops *= 2.5
        tf = [flops / (ms * 1e-3) / 1e12 for ms in best]
        print(f"| {spec} | {' | '.join(f'{t:.0f}' for t in tf)} | "
              f"{' | '.join(f'{best[0] / ms:.3f}' for ms in best[1:])} |", flush=True)
        del q, k, v, fn


if __name__ == "__main__":
    main()
