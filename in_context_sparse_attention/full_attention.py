"""ISA step 4's full half: the sharp query blocks attend densely over the pruned key/value set.

Shared by every backend. The pruned set has the same token count L for every head, so the
selected tokens are gathered into [B, H, L, D] tensors and handed to the best dense kernel
(`dense.py`): FlashAttention-3, -2, or PyTorch SDPA (cuDNN on Hopper).
"""
from __future__ import annotations

import torch

from .dense import dense_attention
from .selection import ISAPlan


def block_token_ids(blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """Token ids of whole blocks: [..., N] block ids -> [..., N * block_size] (may pass S)."""
    offsets = torch.arange(block_size, device=blocks.device)
    return (blocks[..., None] * block_size + offsets).flatten(-2)


def gather_tokens(x_bhsd: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """x: [B, H, S, D] (any strides); token_ids: [B, H, L] -> [B, H, L, D] contiguous."""
    return torch.gather(x_bhsd, 2, token_ids[..., None].expand(-1, -1, -1, x_bhsd.shape[-1]))


def pruned_kv_token_ids(plan: ISAPlan) -> torch.Tensor:
    """Token ids of the pruned key/value set without padding: [B, H, L].

    Only the last block can be partial and, when it is, every head keeps it as its last
    (highest) block, so its padding sits at the end of every row and is cut off there.
    """
    layout = plan.layout
    ids = block_token_ids(plan.kv_blocks, layout.block_size)
    return ids[..., : ids.shape[-1] - (layout.padded_len - layout.seq_len)]


def full_block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: ISAPlan, out_padded: torch.Tensor) -> None:
    """Write the output rows of the full (sharp) query blocks into `out_padded`.

    Args:
        q, k, v: [B, S, H, D].
        out_padded: [B, NB * b, H, D] output buffer; rows past S take the padding rows.
    """
    if plan.full_query_blocks.shape[-1] == 0:
        return
    layout = plan.layout
    q_ids = block_token_ids(plan.full_query_blocks, layout.block_size)  # [B, H, Nf * b]
    kv_ids = pruned_kv_token_ids(plan)  # [B, H, L]
    q_rows = gather_tokens(q.transpose(1, 2), q_ids.clamp(max=layout.seq_len - 1))
    k_rows = gather_tokens(k.transpose(1, 2), kv_ids)
    v_rows = gather_tokens(v.transpose(1, 2), kv_ids)
    o_rows = dense_attention(q_rows, k_rows, v_rows, layout="bhsd")  # [B, H, Nf * b, D]
    out_bhsd = out_padded.transpose(1, 2)
    out_bhsd.scatter_(2, q_ids[..., None].expand(-1, -1, -1, o_rows.shape[-1]), o_rows.to(out_padded.dtype))
