"""Is #11's GQA forward gap about GQA or about the rows' shape? The GQA rows (D = 128, causal, N = 4k, 16k tokens,
(B, N, H, D) buffers) beside the same shapes without grouping (Hkv = Hq) and the grid's hidden-2048 shape, forward
and backward TFLOP/s of ours and SDPA's cuDNN backend (enable_gqa), CUDA-event medians, one process.

    PYTHONPATH=python python3 scripts/gqa_probe.py [--n 4096]
"""

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flash_attn2
from flash_attn2.bench import time_cuda_case


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--heads", default="16/16,32/32,32/8,64/64,64/8")
    args = ap.parse_args()
    n, d = args.n, 128
    b = 16384 // n
    print(f"| Hq/Hkv | N | B | fwd ours | fwd cuDNN | fwd ours/cuDNN | bwd ours | bwd cuDNN | bwd ours/cuDNN |")
    print("|---|---|---|---|---|---|---|---|---|")
    for pair in args.heads.split(","):
        hq, hkv = (int(x) for x in pair.split("/"))
        q = torch.randn(b, n, hq, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
        k, v = (torch.randn(b, n, hkv, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
                for _ in range(2))
        dout = torch.randn(b, n, hq, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        ours = time_cuda_case(lambda q, k, v: flash_attn2.attention(q, k, v, causal=True), q, k, v, dout)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            cudnn = time_cuda_case(lambda q, k, v: F.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=hq != hkv), q, k, v, dout)
        flops = 4 * b * hq * n * n * d / 2
        tf = [flops / (t * 1e-3) / 1e12 for t in (ours[0], cudnn[0])]
        tb = [2.5 * flops / (t * 1e-3) / 1e12 for t in (ours[1], cudnn[1])]
        print(f"| {hq}/{hkv} | {n} | {b} | {tf[0]:.0f} | {tf[1]:.0f} | {tf[0] / tf[1]:.2f} | {tb[0]:.0f} | "
              f"{tb[1]:.0f} | {tb[0] / tb[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
