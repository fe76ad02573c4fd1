"""A/B of paged decoding (fwd_kvcache, bf16, D = 128, Hq = 32, one query or --nq) between two builds of the library
or one build under two environments, beside the same build on a dense cache: each side runs in its own process,
alternately A, B, A, B; each cell keeps the better of its runs. Times are µs per call from CUDA graphs of 20 calls
(flash_attn2.bench.graph_us). The paged cache holds the dense one's rows in shuffled pages, so each side's paged
output must equal its dense output bit for bit (same kernel, split and key order: printed per row).

    python3 scripts/ab_paged.py /tmp/libs/a.so /tmp/libs/b.so --pages 16,32,64 --cases "1,8,131072;16,8,8192"
"""

import argparse

from ab_forward import run_sides  # scripts/ is on sys.path when this file runs

CHILD = r"""
import json, sys, torch, flash_attn2
from flash_attn2.bench import graph_us
res = {}
nq = int(sys.argv[3])
for case in sys.argv[1].split(";"):
    b, hkv, n = (int(x) for x in case.split(","))
    gen = torch.Generator(device="cuda").manual_seed(b * 1000 + hkv + n)
    q = torch.randn(b, 32, nq, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(b, hkv, n, 128, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    lens = torch.full((b,), n, dtype=torch.int32, device="cuda")
    dense_out = flash_attn2.attention_kvcache(q, k, v, None, None, lens)[0]
    dense = graph_us(lambda: flash_attn2.attention_kvcache(q, k, v, None, None, lens))
    for page in (int(x) for x in sys.argv[2].split(",")):
        pages = b * n // page
        perm = torch.randperm(pages, device="cuda", generator=gen)
        table = perm.view(b, n // page).int()
        def paged_cache(x):  # (b, hkv, n, d) -> (pages, page, hkv, d), page table[bi, j] = rows [j page, (j + 1) page)
            c = torch.empty(pages, page, hkv, 128, device="cuda", dtype=x.dtype)
            c[perm] = x.permute(0, 2, 1, 3).reshape(pages, page, hkv, 128)
            return c
        kc, vc = paged_cache(k), paged_cache(v)
        out = flash_attn2.attention_kvcache(q, kc, vc, None, None, lens, table)[0]
        us = graph_us(lambda: flash_attn2.attention_kvcache(q, kc, vc, None, None, lens, table))
        res[f"{case},{page}"] = (us, dense, bool(torch.equal(out, dense_out)))
        del kc, vc
print(json.dumps(res))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--cases", default="1,8,131072;16,8,8192;16,8,32768;64,8,8192")
    ap.add_argument("--pages", default="16,32,64")
    ap.add_argument("--nq", type=int, default=1, help="queries per sequence (speculative decoding: > 1)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    best = {"a": {}, "b": {}}
    same = {"a": True, "b": True}
    for name, rounds in run_sides(args.a, args.b, CHILD, [args.cases, args.pages, str(args.nq)],
                                  rounds=args.rounds).items():
        for res in rounds:
            for key, (paged, dense, equal) in res.items():
                old = best[name].get(key, (float("inf"), float("inf"), True))
                best[name][key] = (min(old[0], paged), min(old[1], dense), old[2] and equal)
    print(f"Nq = {args.nq}")
    print("| B | Hkv | L | page | A paged µs | B paged µs | A/B paged | A dense µs | B dense µs | A paged / dense | "
          "B paged / dense | paged = dense (A, B) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key, (ap_, ad, ae) in best["a"].items():
        bp, bd, be = best["b"][key]
        print(f"| {' | '.join(key.split(','))} | {ap_:.1f} | {bp:.1f} | {ap_ / bp:.3f} | {ad:.1f} | {bd:.1f} | "
              f"{ad / ap_:.3f} | {bd / bp:.3f} | {'yes' if ae else 'NO'}, {'yes' if be else 'NO'} |")


if __name__ == "__main__":
    main()
