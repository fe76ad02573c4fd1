"""The decode step (fwd_kvcache, bf16, D = 128, Hq = 32; one query unless a case gives Nq) per split count: µs
per call from CUDA graphs of 20 calls (flash_attn2.bench.graph_us), num_splits = 0 (the launcher's choice) and forced counts, with
SDPA's cuDNN backend on the same cache for reference. Checks the launcher's choice against the sweep.

    python3 scripts/decode_splits.py [--cases "B,Hkv,L[,Nq];..."] [--splits 0,8,16,...]
"""

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flash_attn2
from flash_attn2.bench import graph_us


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="1,8,1024;1,8,8192;1,8,32768;1,32,8192")
    ap.add_argument("--splits", default="0,8,16,24,32,48,64")
    args = ap.parse_args()
    splits = [int(s) for s in args.splits.split(",")]
    print("| B | Hkv | L | Nq | " + " | ".join(f"splits {s or 'auto'} µs" for s in splits) + " | cuDNN µs |")
    print("|---" * (5 + len(splits)) + "|")
    for case in args.cases.split(";"):
        b, hkv, n, nq = ([int(x) for x in case.split(",")] + [1])[:4]
        q = torch.randn(b, 32, nq, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(b, hkv, n, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        times = [min(graph_us(lambda: flash_attn2.attention_kvcache(q, k, v, num_splits=s)) for _ in range(2))
                 for s in splits]
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            cudnn = graph_us(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
        print(f"| {b} | {hkv} | {n} | {nq} | " + " | ".join(f"{t:.1f}" for t in times) + f" | {cudnn:.1f} |")


if __name__ == "__main__":
    main()
