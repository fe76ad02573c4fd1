"""Small shapes for compute-sanitizer (memcheck, racecheck): every kernel path once, tails and masks included,
with every variant (window, softcap, ALiBi, dropout, varlen, deterministic)."""

import torch

import flash_attn2

torch.manual_seed(0)
rng = torch.tensor([7, 8])
for dtype in (torch.bfloat16, torch.float16):
    for d, nq, nk, hq, hkv, causal in [(64, 17, 33, 4, 2, True), (128, 130, 70, 2, 1, True),
                                       (72, 65, 65, 2, 2, False), (256, 33, 129, 2, 2, False),
                                       (32, 1, 200, 2, 2, True)]:
        q = torch.randn(2, hq, nq, d, device="cuda", dtype=dtype, requires_grad=True)
        k = torch.randn(2, hkv, nk, d, device="cuda", dtype=dtype, requires_grad=True)
        v = torch.randn(2, hkv, nk, d, device="cuda", dtype=dtype, requires_grad=True)
        out = flash_attn2.attention(q, k, v, causal)
        out.backward(torch.randn_like(out))
        slopes = torch.rand(2, hq, device="cuda")
        out = flash_attn2.attention(q, k, v, causal, window_size=(20, 5), softcap=4.0, alibi_slopes=slopes,
                                    dropout_p=0.2, rng_state=rng)
        out.backward(torch.randn_like(out))
        out, lse = flash_attn2.attention_with_lse(q.detach(), k.detach(), v.detach(), causal, window_size=(9, -1))
        torch.ops.flash_attn2.bwd(torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, causal, None,
                                  window_size=[9, -1], deterministic=True)
        lengths = [5, 0, nq, 1]
        cu = torch.tensor([0, 5, 5, 5 + nq, 6 + nq], dtype=torch.int32, device="cuda")
        qp = torch.randn(6 + nq, hq, d, device="cuda", dtype=dtype, requires_grad=True)
        kp = torch.randn(6 + nq, hkv, d, device="cuda", dtype=dtype, requires_grad=True)
        vp = torch.randn(6 + nq, hkv, d, device="cuda", dtype=dtype, requires_grad=True)
        out = flash_attn2.attention_varlen(qp, kp, vp, cu, cu, nq, nq, causal, softcap=3.0, dropout_p=0.1,
                                           rng_state=rng)
        out.backward(torch.randn_like(out))
torch.cuda.synchronize()
print("sanitize cases ran")
