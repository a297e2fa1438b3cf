"""Backend "torch": LVSA as masked dense softmax attention, in readable PyTorch.

The reference the kernels are tested against. It builds the [S, S] token mask, so it is
meant for small sequences; it works one head at a time to keep memory at one [B, S, S]
score matrix, in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import torch

from .layout import check_positive_int, lvsa_token_mask


def lvsa_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    frame_mask: torch.Tensor,
    tokens_per_frame: int,
    parts: int = 2,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) v, the mask allowing query token i to see key token j
    when frame_mask[frame(i), frame(j)] (see `layout.token_frame_index`).

    Args:
        q, k, v: [B, S, H, D], S = parts * F * tokens_per_frame.
        frame_mask: bool [F, F] from `lvsa_frame_mask` (any device; moved to q's).
        tokens_per_frame: tokens of one latent frame in one part.
        parts: copies of the clip in the sequence (2: target then source).
    Returns:
        [B, S, H, D] in q's dtype.
    """
    check_positive_int("tokens_per_frame", tokens_per_frame)
    check_positive_int("parts", parts)
    expected = parts * frame_mask.shape[0] * tokens_per_frame
    if q.dim() != 4 or q.shape[1] != expected:
        raise ValueError(
            f"q must be [B, S, H, D] with S = parts * F * tokens_per_frame = {parts} * {frame_mask.shape[0]} * "
            f"{tokens_per_frame} = {expected}, got shape {tuple(q.shape)}"
        )
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    allowed = lvsa_token_mask(frame_mask.to(q.device), tokens_per_frame, parts)  # [S, S]
    bias = torch.zeros(allowed.shape, dtype=compute_dtype, device=q.device).masked_fill_(~allowed, float("-inf"))
    scale = q.shape[-1] ** -0.5
    out = torch.empty_like(q)
    for head in range(q.shape[2]):
        q_head, k_head, v_head = (x[:, :, head].to(compute_dtype) for x in (q, k, v))  # [B, S, D]
        scores = q_head @ k_head.transpose(1, 2) * scale + bias  # [B, S, S]
        out[:, :, head] = (torch.softmax(scores, dim=-1) @ v_head).to(q.dtype)
    return out
