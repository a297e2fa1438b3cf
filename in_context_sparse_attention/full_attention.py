"""ISA step 4's full half: the sharp query blocks attend densely over the pruned key/value set.

Shared by every backend. The pruned set has the same token count L for every head, so the
selected tokens are gathered into [B, H, L, D] tensors and handed to the best dense kernel
(`dense.py`): FlashAttention-3, -2, or PyTorch SDPA (cuDNN on Hopper). The gathers and the
scatter of the output are plain PyTorch here; a backend may pass block-copy kernels
(`gather_blocks`, `scatter_blocks`) with the same contracts.
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


def gather_blocks(x: torch.Tensor, blocks: torch.Tensor, block_size: int, num_tokens: int) -> torch.Tensor:
    """The tokens of whole blocks, per head: x [B, S, H, D], blocks [B, H, N] -> [B, H, L, D].

    Row slot * b + r of head h is token blocks[b, h, slot] * b + r; only the first
    L = num_tokens rows are kept. A token past S (only in a partial last block, which
    always sits in the last slot) reads as token S - 1: such rows are never used.
    """
    ids = block_token_ids(blocks, block_size)[..., :num_tokens].clamp(max=x.shape[1] - 1)
    return gather_tokens(x.transpose(1, 2), ids)


def scatter_blocks(rows: torch.Tensor, blocks: torch.Tensor, out_padded: torch.Tensor) -> None:
    """out_padded[b, blocks[b, h, slot] * b' + r, h] = rows[b, h, slot * b' + r] for every row.

    Args: rows: [B, H, N * b', D]; blocks: [B, H, N]; out_padded: [B, NB * b', H, D].
    """
    if blocks.shape[-1] == 0:
        return
    ids = block_token_ids(blocks, rows.shape[2] // blocks.shape[-1])
    out_padded.transpose(1, 2).scatter_(
        2, ids[..., None].expand(-1, -1, -1, rows.shape[-1]), rows.to(out_padded.dtype)
    )


def full_block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: ISAPlan,
    out_padded: torch.Tensor,
    gather=gather_blocks,
    scatter=scatter_blocks,
    residual=None,
) -> None:
    """Write the output rows of the full (sharp) query blocks into `out_padded`.

    Args:
        q, k, v: [B, S, H, D].
        out_padded: [B, NB * b, H, D] output buffer; rows past S take the padding rows.
        gather, scatter: block copies with the contracts of `gather_blocks` and `scatter_blocks`.
        residual: a `residual.GatedShortcut` for a scatter that adds it as it writes
            (passed as `scatter(..., residual=residual)`), or None.
    """
    if plan.full_query_blocks.shape[-1] == 0:
        return
    layout = plan.layout
    num_kv_tokens = layout.real_tokens_in(plan.kv_blocks.shape[-1])
    q_rows = gather(q, plan.full_query_blocks, layout.block_size, plan.full_query_blocks.shape[-1] * layout.block_size)
    k_rows = gather(k, plan.kv_blocks, layout.block_size, num_kv_tokens)
    v_rows = gather(v, plan.kv_blocks, layout.block_size, num_kv_tokens)
    rows = dense_attention(q_rows, k_rows, v_rows, layout="bhsd")
    if residual is None:
        scatter(rows, plan.full_query_blocks, out_padded)
    else:
        scatter(rows, plan.full_query_blocks, out_padded, residual=residual)
