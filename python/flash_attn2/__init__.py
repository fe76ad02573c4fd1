"""flash_attn2: exact FlashAttention-2 attention as PyTorch custom ops (CPU and CUDA).

Importing the package loads the operator library, which registers ``torch.ops.flash_attn2.fwd``,
``torch.ops.flash_attn2.fwd_with_lse`` and ``torch.ops.flash_attn2.bwd``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Tuple

import torch

__all__ = ["attention", "attention_with_lse", "library_path", "cmake_prefix_path"]
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


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v, differentiable.

    q is (B, Hq, Nq, D); k and v are (B, Hkv, Nk, D) with Hq % Hkv == 0. ``causal`` hides key j from
    query i when j > i + (Nk - Nq). ``scale`` defaults to 1/sqrt(D).
    """
    return torch.ops.flash_attn2.fwd(q, k, v, causal, scale)


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    scale: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`attention`, also returning the float32 log-sum-exp of each query row, shape (B, Hq, Nq).

    A row that sees no key has output 0 and log-sum-exp -inf. Gradients flow through the output only.
    """
    return torch.ops.flash_attn2.fwd_with_lse(q, k, v, causal, scale)
