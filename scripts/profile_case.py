"""One flash_attn2 forward + backward on the benchmark's layout, for profilers (ncu -k regex:flash_bwd_kernel).

    ncu --section WarpStateStats -k regex:flash_bwd_kernel -c 1 python3 scripts/profile_case.py --d 128
"""

import argparse

import torch

import flash_attn2

parser = argparse.ArgumentParser()
parser.add_argument("--d", type=int, default=128)
parser.add_argument("--n", type=int, default=16384)
parser.add_argument("--causal", action="store_true")
parser.add_argument("--dtype", default="bfloat16")
args = parser.parse_args()
b, h = max(1, 16384 // args.n), 2048 // args.d
dtype = getattr(torch, args.dtype)
q, k, v = (torch.randn(b, args.n, h, args.d, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()
           for _ in range(3))
out = flash_attn2.attention(q, k, v, args.causal)
out.backward(torch.randn_like(out))
torch.cuda.synchronize()
