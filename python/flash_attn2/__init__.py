"""flash_attn2: exact FlashAttention-2 attention as PyTorch custom ops (CPU and CUDA).

Importing the package loads the operator library, which registers ``torch.ops.flash_attn2.fwd``,
``fwd_with_lse``, ``bwd``, their packed variable-length forms ``fwd_varlen``, ``fwd_varlen_with_lse`` and
``bwd_varlen``, ``fwd_kvcache`` (KV-cache attention for decoding) and ``dropout_keep_mask``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Tuple

import torch

__all__ = [
    "attention",
    "attention_with_lse",
    "attention_varlen",
    "attention_varlen_with_lse",
    "attention_kvcache",
    "dropout_keep_mask",
    "sdpa_provider_status",
    "library_path",
    "cmake_prefix_path",
]
__version__ = "0.1.0"

_PACKAGE_DIR = Path(__file__).resolve().parent
#: Prefix for CMake's find_package(flash_attn2) against this installed package.
cmake_prefix_path = str(_PACKAGE_DIR / "share" / "cmake")


def _find_library() -> Path:
    override = os.environ.get("FLASH_ATTN2_LIBRARY")
    if override:
        return Path(override)
    return _PACKAGE_DIR / "lib" / "libflash_attn2.so"


library_path = _find_library()
if not library_path.exists():
    raise ImportError(
        f"flash_attn2: operator library not found at {library_path}; install the package with "
        "`pip install --no-build-isolation .` or point FLASH_ATTN2_LIBRARY at a built libflash_attn2.so"
    )
torch.ops.load_library(str(library_path))


@torch.library.register_fake("flash_attn2::draw_rng_state")
def _draw_rng_state_fake(device):
    return torch.empty(2, dtype=torch.int64)


def _options(window_size, softcap, alibi_slopes, dropout_p, rng_state):
    """The ops' keyword options from the wrappers' arguments."""
    return dict(window_size=list(window_size), softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
                rng_state=rng_state)


def _rng_state_for(q: torch.Tensor, dropout_p: float, rng_state: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The dropout state of a differentiable call: the given one, or a fresh draw from q's device generator.
    Drawn through an op so that a torch.compile graph draws anew on every call."""
    if rng_state is not None or not 0.0 < dropout_p < 1.0:
        return rng_state
    return torch.ops.flash_attn2.draw_rng_state(q.device)


_OPTIONS_DOC = """
    Options (FlashAttention-2's semantics; diag = Nk - Nq, bottom-right aligned):
      causal: key j hidden from query i when j > i + diag (same as window right = 0).
      scale: softmax scale, default 1/sqrt(D).
      window_size: (left, right); key j visible iff i + diag - left <= j <= i + diag + right; -1 = unbounded.
      softcap: > 0 turns logits into softcap * tanh(scale q.k / softcap).
      alibi_slopes: float32 (Hq,) or (B, Hq) on q's device; logits get - slope_h * |i + diag - j|.
      dropout_p: P is multiplied by keep / (1 - p) after the softmax (the LSE does not see it); the keep mask is
        a pure function of rng_state (int64 CPU [seed, offset]) and (b, h, i, j), identical on CPU and CUDA.
        The differentiable ``attention``/``attention_varlen`` draw rng_state from q's device's default generator
        when it is not given; the ``*_with_lse`` forms need it explicitly.
"""


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    scale: Optional[float] = None,
    *,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    rng_state: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """softmax(logits) v, differentiable.

    q is (B, Hq, Nq, D); k and v are (B, Hkv, Nk, D) with Hq % Hkv == 0.
    """
    return torch.ops.flash_attn2.fwd(
        q, k, v, causal, scale,
        **_options(window_size, softcap, alibi_slopes, dropout_p, _rng_state_for(q, dropout_p, rng_state)))


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    scale: Optional[float] = None,
    *,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    rng_state: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`attention`, also returning the float32 log-sum-exp of each query row, shape (B, Hq, Nq).

    A row that sees no key has output 0 and log-sum-exp -inf. Gradients flow through the output only.
    """
    return torch.ops.flash_attn2.fwd_with_lse(
        q, k, v, causal, scale, **_options(window_size, softcap, alibi_slopes, dropout_p, rng_state))


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = False,
    scale: Optional[float] = None,
    *,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    rng_state: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention over a packed variable-length batch, differentiable.

    q is (Tq, Hq, D), k and v (Tk, Hkv, D); cu_seqlens_* are int32 (B + 1,) offsets on q's device (sequence b is
    rows [cu[b], cu[b + 1])); each sequence behaves exactly like :func:`attention` on its own slice.
    """
    return torch.ops.flash_attn2.fwd_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
        **_options(window_size, softcap, alibi_slopes, dropout_p, _rng_state_for(q, dropout_p, rng_state)))


def attention_varlen_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = False,
    scale: Optional[float] = None,
    *,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    rng_state: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`attention_varlen`, also returning the (Hq, Tq) log-sum-exp (FlashAttention's layout)."""
    return torch.ops.flash_attn2.fwd_varlen_with_lse(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
        **_options(window_size, softcap, alibi_slopes, dropout_p, rng_state))


def attention_kvcache(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: Optional[torch.Tensor] = None,
    v_new: Optional[torch.Tensor] = None, cache_seqlens: Optional[torch.Tensor] = None,
    block_table: Optional[torch.Tensor] = None, causal: bool = False, scale: Optional[float] = None, *,
    window_size: Tuple[int, int] = (-1, -1), softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None,
    num_splits: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (B, Hq, Nq, D) over a KV cache, for decoding; returns (out, lse). Not differentiable.

    Dense caches are (B, Hkv, capacity, D) (any strides with a contiguous last dim: a (B, capacity, Hkv, D)
    buffer transposed works); paged caches are (num_pages, page_size, Hkv, D) with ``block_table`` (B, pages)
    int32. ``cache_seqlens`` (B,) int32 counts each sequence's valid keys before this call (None: the whole
    capacity). ``k_new`` / ``v_new`` (B, Hkv, Nnew, D) are written into the caches in place at
    [cache_seqlens[b], cache_seqlens[b] + Nnew) first; the attention then sees cache_seqlens[b] + Nnew keys. The
    op does not advance cache_seqlens. ``num_splits``: 0 picks the split of the keys over thread blocks, 1
    disables splitting. causal / window_size / softcap / alibi_slopes / scale mean what they mean for
    :func:`attention` (bottom-right aligned per sequence). No host synchronisation: CUDA-graph capturable.
    """
    return torch.ops.flash_attn2.fwd_kvcache(
        q, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, causal, scale,
        window_size=list(window_size), softcap=softcap, alibi_slopes=alibi_slopes, num_splits=num_splits)


def dropout_keep_mask(
    rng_state: torch.Tensor, batch: int, heads: int, seqlen_q: int, seqlen_k: int, dropout_p: float,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """The bool (batch, heads, seqlen_q, seqlen_k) keep mask the kernels apply for rng_state and dropout_p."""
    return torch.ops.flash_attn2.dropout_keep_mask(rng_state, batch, heads, seqlen_q, seqlen_k, dropout_p, device)


for _f in (attention, attention_with_lse, attention_varlen, attention_varlen_with_lse):
    _f.__doc__ = (_f.__doc__ or "") + _OPTIONS_DOC


# ---- SDPA backend provider ---------------------------------------------------------------------------------------
# torch.nn.attention.activate_flash_attention_impl("flash_attn2") routes PyTorch's flash-attention ops (the flash
# path of F.scaled_dot_product_attention, torch.nn.attention.varlen.varlen_attn) to flash_attn2's kernels;
# restore_flash_attention_impl() undoes it. Registered on import, never activated on import (PyTorch asks providers
# not to). The switch itself lives in the C++ library (flash_attn2::sdpa::activate / restore), shared with LibTorch
# programs.

class _SdpaProviderHandle:
    def remove(self) -> None:
        torch.ops.flash_attn2._sdpa_provider("restore")


def _activate_sdpa_provider() -> _SdpaProviderHandle:
    torch.ops.flash_attn2._sdpa_provider("activate")
    return _SdpaProviderHandle()


def sdpa_provider_status() -> dict:
    """Whether the SDPA provider is active, and how many calls of PyTorch's flash ops it ran on flash_attn2
    (``forward``, ``backward``) or handed to PyTorch's own kernel (``fallback_forward``, ``fallback_backward``)."""
    active, fwd, bwd, fb_fwd, fb_bwd = torch.ops.flash_attn2._sdpa_provider("status")
    return dict(active=bool(active), forward=fwd, backward=bwd, fallback_forward=fb_fwd, fallback_backward=fb_bwd)


import torch.nn.attention  # noqa: E402  (the registry; torch imports it today, but not by contract)

if hasattr(torch.nn.attention, "register_flash_attention_impl"):
    torch.nn.attention.register_flash_attention_impl("flash_attn2", register_fn=_activate_sdpa_provider)
