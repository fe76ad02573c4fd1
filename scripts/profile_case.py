"""One flash_attn2 forward + backward on the benchmark's layout, for profilers (ncu -k regex:flash_bwd_kernel).

    ncu --section WarpStateStats -k regex:flash_bwd_kernel -c 1 python3 scripts/profile_case.py --d 128
    ... profile_case.py --d 128 --n 8192 --causal --softcap 50     (or --alibi, --dropout 0.1, --window 4096)
    ... profile_case.py --d 256 --n 8192 --impl cudnn               (SDPA's cuDNN backend on the same inputs)
    ... profile_case.py --d 128 --n 8192 --impl fa4                 (FlashAttention-4, flash_attn.cute, where it
                                                                     imports: ../shared/tools/fa4-wheels.sh)
"""

import argparse

import torch

parser = argparse.ArgumentParser()
parser.add_argument("--d", type=int, default=128)
parser.add_argument("--n", type=int, default=16384)
parser.add_argument("--causal", action="store_true")
parser.add_argument("--dtype", default="bfloat16")
parser.add_argument("--softcap", type=float, default=0.0)
parser.add_argument("--alibi", action="store_true")
parser.add_argument("--dropout", type=float, default=0.0)
parser.add_argument("--window", type=int, default=-1, help="keys to the left (and, without --causal, right)")
parser.add_argument("--impl", default="ours", choices=["ours", "cudnn", "fa4"],
                    help="cudnn, fa4: plain calls only")
args = parser.parse_args()
b, h = max(1, 16384 // args.n), 2048 // args.d
dtype = getattr(torch, args.dtype)
q, k, v = (torch.randn(b, args.n, h, args.d, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()
           for _ in range(3))
slopes = torch.rand(h, device="cuda") if args.alibi else None
window = (args.window, -1 if args.window < 0 else 0 if args.causal else args.window)
if args.impl == "cudnn":
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=args.causal)
elif args.impl == "fa4":  # on the same (B, N, H, D) buffers; its kernels compile on first use, outside the kernels
    from flash_attn.cute import flash_attn_func
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=args.causal)[0]
    out = out.transpose(1, 2)
else:
    import flash_attn2  # here: the cudnn and fa4 cases need no build of ours

    out = flash_attn2.attention(q, k, v, args.causal, softcap=args.softcap, alibi_slopes=slopes,
                                dropout_p=args.dropout, window_size=window)
out.backward(torch.randn_like(out))
torch.cuda.synchronize()
