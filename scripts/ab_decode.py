"""A/B of the decode step (fwd_kvcache, one query or --nq, bf16, D = 128, Hq = 32) between two builds of the library or
one build under two environments: each side runs in its own process, alternately A, B, A, B; each cell keeps
the better of its runs. Times are µs per call from CUDA graphs of 20 calls (flash_attn2.bench.graph_us), with
SDPA's cuDNN backend on the same cache for reference.

    python3 scripts/ab_decode.py build/gpu/libflash_attn2.so,FLASH_ATTN2_PDL=0 build/gpu/libflash_attn2.so
"""

import argparse

from ab_forward import run_sides  # scripts/ is on sys.path when this file runs

CHILD = r"""
import json, sys, torch, flash_attn2
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from flash_attn2.bench import graph_us
res = {}
nq, sep = int(sys.argv[2]), int(sys.argv[3])
# --sep: every call follows an unrelated small kernel launched plainly (as a served step's own kernels would be),
# and that kernel's time alone is subtracted: no overlap with the previous decode call.
sep_buf = torch.zeros(1 << 14, device="cuda")
sep_us = graph_us(lambda: sep_buf.add_(1)) if sep else 0.0
for case in sys.argv[1].split(";"):
    b, hkv, n = (int(x) for x in case.split(","))
    q = torch.randn(b, 32, nq, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(b, hkv, n, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    def ours_call():
        if sep:
            sep_buf.add_(1)
        flash_attn2.attention_kvcache(q, k, v)
    def cudnn_call():
        if sep:
            sep_buf.add_(1)
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    ours = graph_us(ours_call) - sep_us
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        cudnn = graph_us(cudnn_call) - sep_us
    res[case] = (ours, cudnn)
print(json.dumps(res))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--cases", default="1,8,1024;1,8,8192;1,8,32768;1,32,8192;16,8,8192")
    ap.add_argument("--nq", type=int, default=1, help="queries per sequence (speculative decoding: > 1)")
    ap.add_argument("--sep", action="store_true",
                    help="each call after an unrelated small kernel (launched plainly), whose own time is subtracted")
    args = ap.parse_args()
    best = {"a": {}, "b": {}}
    for name, rounds in run_sides(args.a, args.b, CHILD, [args.cases, str(args.nq), str(int(args.sep))]).items():
        for res in rounds:
            for key, (ours, cudnn) in res.items():
                old = best[name].get(key, (float("inf"), float("inf")))
                best[name][key] = (min(old[0], ours), min(old[1], cudnn))
    print("| B | Hkv | L | A µs | B µs | A/B | cuDNN µs | B vs cuDNN |")
    print("|---|---|---|---|---|---|---|---|")
    for key, (a, ca) in best["a"].items():
        b, cb = best["b"][key]
        print(f"| {' | '.join(key.split(','))} | {a:.1f} | {b:.1f} | {a / b:.3f} | {min(ca, cb):.1f} | "
              f"{min(ca, cb) / b:.2f} |")


if __name__ == "__main__":
    main()
