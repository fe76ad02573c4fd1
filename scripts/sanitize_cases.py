"""Small shapes for compute-sanitizer (memcheck, racecheck): every kernel path once, tails and masks included."""

import torch

import flash_attn2

torch.manual_seed(0)
for dtype in (torch.bfloat16, torch.float16):
    for d, nq, nk, hq, hkv, causal in [(64, 17, 33, 4, 2, True), (128, 130, 70, 2, 1, True),
                                       (72, 65, 65, 2, 2, False), (256, 33, 129, 2, 2, False),
                                       (32, 1, 200, 2, 2, True)]:
        q = torch.randn(2, hq, nq, d, device="cuda", dtype=dtype, requires_grad=True)
        k = torch.randn(2, hkv, nk, d, device="cuda", dtype=dtype, requires_grad=True)
        v = torch.randn(2, hkv, nk, d, device="cuda", dtype=dtype, requires_grad=True)
        out = flash_attn2.attention(q, k, v, causal)
        out.backward(torch.randn_like(out))
torch.cuda.synchronize()
print("sanitize cases ran")
