"""Decode (one query over a KV cache) on a dense and on paged caches, for the paged-vs-dense gap of #8.

    python3 scripts/profile_decode.py                      times every layout (CUDA graphs, µs per call)
    ncu -k regex:splitkv -c 1 python3 scripts/profile_decode.py --only paged16   one layout, once (for profilers)

Layouts: dense (B, Hkv, L, D); pagedP = (pages, P, Hkv, D) in a shuffled page order (as an allocator hands them
out, and as the bench has them); pagedPsorted = the same pages in order (each sequence's pages consecutive), which
separates the cost of scattered pages from that of the paged row layout (rows of one head Hkv * D apart).
"""

import argparse

import torch

import flash_attn2
from flash_attn2.bench import graph_us

parser = argparse.ArgumentParser()
parser.add_argument("--b", type=int, default=16)
parser.add_argument("--hkv", type=int, default=8)
parser.add_argument("--n", type=int, default=8192)
parser.add_argument("--only", default="")
args = parser.parse_args()
b, hkv, n, d, hq = args.b, args.hkv, args.n, 128, 32
torch.manual_seed(0)
q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16)
k = torch.randn(b, hkv, n, d, device="cuda", dtype=torch.bfloat16)
v = torch.randn(b, hkv, n, d, device="cuda", dtype=torch.bfloat16)
lens = torch.full((b,), n, dtype=torch.int32, device="cuda")


def paged(page, shuffled):
    per_seq = n // page
    perm = torch.randperm(b * per_seq, device="cuda") if shuffled else torch.arange(b * per_seq, device="cuda")
    kc = k.view(b, hkv, per_seq, page, d).permute(0, 2, 3, 1, 4).reshape(b * per_seq, page, hkv, d)[perm.argsort()]
    vc = v.view(b, hkv, per_seq, page, d).permute(0, 2, 3, 1, 4).reshape(b * per_seq, page, hkv, d)[perm.argsort()]
    table = perm.view(b, per_seq).to(torch.int32)
    return lambda: flash_attn2.attention_kvcache(q, kc, vc, None, None, lens, table)


layouts = {"dense": lambda: flash_attn2.attention_kvcache(q, k, v)}
for page in (16, 64, 256):
    layouts[f"paged{page}"] = paged(page, True)
    layouts[f"paged{page}sorted"] = paged(page, False)
ref = layouts["dense"]()[0].float()
if args.only:
    layouts[args.only]()
    torch.cuda.synchronize()
    raise SystemExit(0)
kv_bytes = 2 * b * hkv * n * d * 2
for order in (list(layouts), list(reversed(layouts))):  # two passes, the second in reverse (drift shows)
    for name in order:
        err = (layouts[name]()[0].float() - ref).abs().max().item()
        us = graph_us(layouts[name])
        print(f"| {name} | {us:.1f} µs | {kv_bytes / (us * 1e-6) / 1e12:.2f} TB/s | max diff vs dense {err:.1e} |")
