"""The public entry point: `lvsa_attention`."""
from __future__ import annotations

import torch

from .config import LVSAConfig
from .flex_backend import cached_block_mask, flex_lvsa_attention
from .gather_backend import GROUP_FRAMES, cached_gather_plan, gather_lvsa_attention
from .layout import check_positive_int
from .pattern import check_num_frames, check_step, lvsa_frame_mask
from .reference import lvsa_attention_reference

BACKEND_NAMES = ("flex", "torch", "gather")
_DTYPES = {
    "flex": (torch.float16, torch.bfloat16, torch.float32),
    "gather": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    "torch": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
}


def _check_inputs(q, k, v, num_frames, tokens_per_frame, step, config, backend, parts) -> None:
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKEND_NAMES))}, got {backend!r}")
    if not isinstance(config, LVSAConfig):
        raise TypeError(f"config must be an LVSAConfig, got {type(config).__name__}")
    check_num_frames(num_frames)
    check_positive_int("tokens_per_frame", tokens_per_frame)
    check_positive_int("parts", parts)
    check_step(step)
    dtypes = _DTYPES[backend]
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape [B, S, H, D], got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must have shape [B, S, H, D] (4 dims), got {x.dim()} dims: {tuple(x.shape)}")
        if x.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            hint = " (float64: backend 'torch')" if x.dtype == torch.float64 else ""
            raise ValueError(f"{name} must be one of {names} for backend {backend!r}{hint}, got {x.dtype}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k and v must have the same shape [B, S, H, D], "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on the same device, got {q.device}, {k.device}, {v.device}")
    if min(q.shape) == 0:
        raise ValueError(f"q, k and v must not be empty, got shape {tuple(q.shape)}")
    expected = parts * num_frames * tokens_per_frame
    if q.shape[1] != expected:
        raise ValueError(
            f"the sequence length S = q.shape[1] must equal parts * num_frames * tokens_per_frame = "
            f"{parts} * {num_frames} * {tokens_per_frame} = {expected}, got {q.shape[1]}"
        )


def _check_kernel_options(backend, kernel_options) -> None:
    """Raise a ValueError unless kernel_options is None or fits the backend (see lvsa_attention)."""
    if kernel_options is None:
        return
    if backend == "flex" and isinstance(kernel_options, dict):
        return
    if backend == "gather" and isinstance(kernel_options, dict) and set(kernel_options) <= {"group_frames"}:
        check_positive_int("kernel_options['group_frames']", kernel_options.get("group_frames", GROUP_FRAMES))
        return
    raise ValueError(
        "kernel_options must be None, a dict with backend 'flex', or {'group_frames': n} with backend 'gather', "
        f"got {kernel_options!r} with backend {backend!r}"
    )


def lvsa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_frames: int,
    tokens_per_frame: int,
    step: int,
    config: LVSAConfig = LVSAConfig(),
    backend: str = "flex",
    parts: int = 2,
    kernel_options: dict | None = None,
) -> torch.Tensor:
    """Long-Video Sparse Attention over [target tokens | source tokens].

    Every token of latent frame f (target or source) attends to every token (target and
    source) of the key frames lvsa_frame_mask(num_frames, step, config)[f]; scale 1/sqrt(D).

    Args:
        q, k, v: [B, S, H, D], S = parts * num_frames * tokens_per_frame, each part frame-major.
        num_frames: F, latent frames of the clip.
        tokens_per_frame: tokens of one latent frame in one part ((H/16) * (W/16) for Wan).
        step: index of the denoising step (0, 1, ...); moves the keyframes when config.rotate.
        config: `LVSAConfig`.
        backend: "flex" (FlexAttention compiled with torch.compile: CUDA, and the CPU),
            "gather" (each group of query frames' key frames gathered into a buffer, then dense
            FlashAttention-3 / FlashAttention-2 / SDPA: CUDA, and the CPU; forward only) or
            "torch" (masked dense attention in PyTorch, the reference: small sequences only).
        parts: copies of the clip in the sequence: 2 for [target | source], 1 for a plain video.
        kernel_options: backend "flex": FlexAttention's kernel_options (e.g. tile sizes, or
            {"BACKEND": "FLASH"}); backend "gather": {"group_frames": n}, the most query frames
            per dense call (default `GROUP_FRAMES`, 1: one call per frame); None keeps the defaults.
    Returns:
        [B, S, H, D], q's dtype.
    """
    _check_inputs(q, k, v, num_frames, tokens_per_frame, step, config, backend, parts)
    _check_kernel_options(backend, kernel_options)
    if backend == "torch":
        return lvsa_attention_reference(q, k, v, lvsa_frame_mask(num_frames, step, config), tokens_per_frame, parts)
    if backend == "gather":
        group_frames = (kernel_options or {}).get("group_frames", GROUP_FRAMES)
        return gather_lvsa_attention(q, k, v, cached_gather_plan(num_frames, parts, step, config, group_frames))
    block_mask = cached_block_mask(num_frames, tokens_per_frame, parts, step, config, q.device)
    return flex_lvsa_attention(q, k, v, block_mask, kernel_options=kernel_options)
