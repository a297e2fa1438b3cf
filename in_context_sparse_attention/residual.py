"""ISA step 6's gated residual in PyTorch: out += alpha * Oc[block(token)], in place.

The default for backends without a fused `add_residual` hook (the Triton backend has one).
"""
from __future__ import annotations

import torch

from .selection import ISAPlan


def add_residual(out_padded: torch.Tensor, plan: ISAPlan, alpha) -> None:
    """In place: out_padded[b, t] += alpha[b, t] * Oc[b, :, block(t)] at the real rows.

    Each sum is formed in fp32 and rounded once to out_padded's dtype, with one fp32
    temporary of [B, S, H, D] (the gathered shortcut, scaled in place).

    Args:
        out_padded: [B, NB * b, H, D]; alpha: a float or a tensor broadcastable to [B, S, 1, 1].
    """
    layout = plan.layout
    block_of_token = torch.arange(layout.seq_len, device=out_padded.device) // layout.block_size
    shortcut = plan.compressed_out[:, :, block_of_token].transpose(1, 2)  # [B, S, H, D] fp32, a fresh tensor
    out_padded[:, : layout.seq_len].add_(shortcut.mul_(alpha))
