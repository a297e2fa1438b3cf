"""Dense attention on the best kernel present: FlashAttention-3, else FlashAttention-2,
else PyTorch SDPA with its cuDNN kernel first (on an H100 well ahead of SDPA's own flash
kernel: docs/benchmarks.md), then flash, efficient, math.

FlashAttention-3 is found under either of its import names: `flash_attn_interface` (the
full build from the flash-attention repository's `hopper/` directory) or
`fa3_fwd_interface` (the forward-only wheel `fa3-fwd` on PyPI, bf16 only). The choice is
logged once per process so that a run never silently changes kernels. The environment
variable ISA_DENSE_KERNEL pins it: "auto" (the default, the order above), "fa3", "fa2"
(an error if not installed) or "sdpa"; a kernel that cannot take the tensors (a CPU
tensor, a dtype it lacks) falls back to SDPA either way.
"""
from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

logger = logging.getLogger(__name__)

_FLASH_DTYPES = (torch.float16, torch.bfloat16)
_SDPA_PRIORITY = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


@functools.lru_cache(maxsize=None)
def _flash_attn_3():
    """FlashAttention-3's `flash_attn_func` and the dtypes its build has kernels for, or None."""
    try:
        from flash_attn_interface import flash_attn_func  # the full build (Hopper)

        return flash_attn_func, _FLASH_DTYPES
    except ImportError:
        pass
    try:
        from fa3_fwd_config import CONFIG
        from fa3_fwd_interface import flash_attn_func  # the forward-only build
    except ImportError:
        return None
    fp16_disabled = CONFIG.get("build_flags", {}).get("FLASHATTENTION_DISABLE_FP16", False)
    return flash_attn_func, (torch.bfloat16,) if fp16_disabled else _FLASH_DTYPES


@functools.lru_cache(maxsize=None)
def _flash_attn_2():
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


@functools.lru_cache(maxsize=None)
def _announce(kernel: str) -> None:
    logger.info("dense attention runs on %s", kernel)


_CHOICES = ("auto", "fa3", "fa2", "sdpa")


def _pinned_kernel() -> str:
    """ISA_DENSE_KERNEL's value, checked; "auto" when it is unset."""
    choice = os.environ.get("ISA_DENSE_KERNEL", "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"ISA_DENSE_KERNEL must be one of {', '.join(_CHOICES)}, got {choice!r}")
    if choice == "fa3" and _flash_attn_3() is None:
        raise ValueError(
            "ISA_DENSE_KERNEL=fa3 but FlashAttention-3 is not installed (flash_attn_interface or fa3_fwd_interface)"
        )
    if choice == "fa2" and _flash_attn_2() is None:
        raise ValueError("ISA_DENSE_KERNEL=fa2 but FlashAttention-2 is not installed (pip install flash-attn)")
    return choice


def kernel_for(is_cuda: bool, dtype: torch.dtype, head_dim: int) -> str:
    """Name of the kernel for CUDA or CPU tensors of this dtype and head dim: the best one
    installed, or the one ISA_DENSE_KERNEL pins."""
    choice = _pinned_kernel()
    if is_cuda and dtype in _FLASH_DTYPES and head_dim <= 256:
        flash_3 = _flash_attn_3()
        if choice in ("auto", "fa3") and flash_3 is not None and dtype in flash_3[1]:
            return "FlashAttention-3"
        if choice in ("auto", "fa2") and _flash_attn_2() is not None:
            return "FlashAttention-2"
    return "PyTorch SDPA"  # on CUDA: cuDNN first, then flash, efficient, math


def dense_kernel_name(q: torch.Tensor) -> str:
    """Name of the kernel `dense_attention` uses for tensors like `q`."""
    return kernel_for(q.is_cuda, q.dtype, q.shape[-1])


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str = "bshd") -> torch.Tensor:
    """Softmax attention softmax(q k^T / sqrt(D)) v without a mask.

    Args:
        q, k, v: [B, Lq, H, D], [B, Lk, H, D], [B, Lk, H, D] for layout "bshd"; the same
            with the sequence and head axes swapped for layout "bhsd".
    Returns:
        The output in q's layout, shape and dtype.
    """
    if layout not in ("bshd", "bhsd"):
        raise ValueError(f"layout must be 'bshd' or 'bhsd', got {layout!r}")
    kernel = dense_kernel_name(q)
    _announce(kernel)
    if kernel == "PyTorch SDPA":
        if layout == "bshd":
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if q.is_cuda:
            with sdpa_kernel(_SDPA_PRIORITY, set_priority=True):
                out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2) if layout == "bshd" else out
    if layout == "bhsd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    func = _flash_attn_3()[0] if kernel == "FlashAttention-3" else _flash_attn_2()
    out = func(q, k, v)
    if isinstance(out, tuple):  # some FlashAttention-3 builds also return the log-sum-exp
        out = out[0]
    return out.transpose(1, 2) if layout == "bhsd" else out
