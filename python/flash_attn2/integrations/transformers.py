"""flash_attn2 as a transformers attention implementation.

    from flash_attn2.integrations import transformers as fa2_transformers
    name = fa2_transformers.register()                  # "fa2"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=name)

``register()`` adds our attention function to transformers' ``AttentionInterface`` and, under the same name,
FlashAttention's mask function to ``AttentionMaskInterface`` (models then hand us the 2D padding mask, or None when
nothing is padded, never a 4D mask). The function follows transformers' FlashAttention-2 semantics:

- padded batches (a 2D mask) are unpadded into our packed variable-length op and padded back;
- packed sequences (``cu_seq_lens_q/k`` and ``max_length_q/k`` kwargs, or ``position_ids`` restarting at 0 in a
  batch of one) run the variable-length op directly;
- causal attention is bottom-right aligned, so a decode step (one query over the KV cache) needs no mask;
- ``scaling``, ``sliding_window`` (window (w - 1, w - 1), as transformers passes to flash-attn), ``softcap``,
  training ``dropout`` and GQA (K/V never repeated) go straight to the op;
- outputs are (B, N, H, D), as transformers expects.

Why the name "fa2" and not "flash_attn2": transformers 5 treats every implementation name containing "flash" as
a FlashAttention flavour and then imports the flash-attn package or downloads a hub kernel for it; a name without
"flash" makes it call our registered function, offline. transformers stays an optional dependency: nothing here
imports it until ``register()`` is called.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

import flash_attn2

NAME = "fa2"


def _target_dtype(query: torch.Tensor, module: torch.nn.Module) -> torch.dtype:
    """The dtype the op runs in: the input's, except float32 on CUDA (the CUDA kernels take 16-bit inputs), which
    becomes the autocast dtype, else the model's 16-bit weight dtype, else bfloat16."""
    if query.device.type != "cuda" or query.dtype not in (torch.float32, torch.float64):
        return query.dtype
    if torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    for p in module.parameters():
        if p.dtype in (torch.float16, torch.bfloat16):
            return p.dtype
    return torch.bfloat16


def _unpad(x: torch.Tensor, keep: torch.Tensor):
    """x (B, H, N, D), keep (B, N) bool -> packed (T, H, D), row indices into (B * N), int32 cu_seqlens, and N as
    the bound on the lengths (a bound is all the op needs; the true maximum would cost a host sync)."""
    b, h, n, d = x.shape
    lengths = keep.sum(-1, dtype=torch.int32)
    index = keep.reshape(-1).nonzero().reshape(-1)
    packed = x.transpose(1, 2).reshape(b * n, h, d).index_select(0, index)
    cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    return packed, index, cu, n


def _cu_from_position_ids(position_ids: torch.Tensor):
    """Packed sequences in a batch of one: a sequence starts wherever position_ids is 0."""
    pos = position_ids.reshape(-1)
    starts = (pos == 0).nonzero().reshape(-1).to(torch.int32)
    if starts.numel() == 0 or int(starts[0]) != 0:
        starts = torch.cat([torch.zeros(1, dtype=torch.int32, device=pos.device), starts])
    cu = torch.cat([starts, torch.tensor([pos.numel()], dtype=torch.int32, device=pos.device)])
    return cu, int((cu[1:] - cu[:-1]).max())


def _is_packed(position_ids: Optional[torch.Tensor], batch: int, n: int) -> bool:
    if position_ids is None or batch != 1 or position_ids.shape[-1] != n:
        return False
    pos = position_ids.reshape(-1)
    return bool((pos != torch.arange(n, device=pos.device) + pos[0]).any())


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      sliding_window: Optional[int] = None, softcap: Optional[float] = None,
                      is_causal: Optional[bool] = None, **kwargs):
    """transformers' attention-interface signature: query (B, Hq, Nq, D), key / value (B, Hkv, Nk, D) ->
    (output (B, Nq, Hq, D), None)."""
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("flash_attn2: attention sinks (s_aux) are not supported")
    b, hq, nq, d = query.shape
    nk = key.shape[2]
    in_dtype = query.dtype
    dtype = _target_dtype(query, module)
    q, k, v = (t.to(dtype) for t in (query, key, value))
    causal = module.is_causal if is_causal is None else is_causal
    window = (-1, -1)
    if sliding_window is not None and nk > sliding_window:
        window = (sliding_window - 1, sliding_window - 1)
    options = dict(window_size=window, softcap=softcap or 0.0, dropout_p=dropout)

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(f"flash_attn2: expected a 2D padding mask (register() sets the mask function that makes "
                             f"one), got shape {tuple(attention_mask.shape)}")
        keep_k = attention_mask[:, -nk:].bool()
        keep_q = keep_k[:, -nq:]
        qp, index_q, cu_q, max_q = _unpad(q, keep_q)
        kp, _, cu_k, max_k = _unpad(k, keep_k)
        vp, _, _, _ = _unpad(v, keep_k)
        out = flash_attn2.attention_varlen(qp, kp, vp, cu_q, cu_k, max_q, max_k, causal, scaling, **options)
        full = out.new_zeros(b * nq, hq, d).index_copy(0, index_q, out)
        return full.view(b, nq, hq, d).to(in_dtype), None
    if cu_q is None and nq == nk and _is_packed(kwargs.get("position_ids"), b, nq):
        cu_q, max_q = _cu_from_position_ids(kwargs["position_ids"])
        cu_k, max_k = cu_q, max_q
    if cu_q is not None and cu_k is not None:
        qp, kp, vp = (t.transpose(1, 2).reshape(-1, t.shape[1], d) for t in (q, k, v))
        out = flash_attn2.attention_varlen(qp, kp, vp, cu_q.to(torch.int32), cu_k.to(torch.int32), int(max_q),
                                           int(max_k), causal, scaling, **options)
        return out.view(b, nq, hq, d).to(in_dtype), None
    out = flash_attn2.attention(q, k, v, causal, scaling, **options)
    return out.transpose(1, 2).to(in_dtype), None


def register(name: str = NAME) -> str:
    """Registers the attention function and its mask function with transformers under `name`; returns it."""
    if "flash" in name:
        raise ValueError(f"flash_attn2: {name!r} contains 'flash', which makes transformers look for the flash-attn "
                         "package or a hub kernel instead of calling this function; pick another name")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, flash_attention_mask)
    return name
