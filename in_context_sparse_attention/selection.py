"""Block-level decisions of ISA, shared by every backend (docs/isa.md, steps 2-5).

All of them work on pooled blocks (NB = S / 64 of them), so they are small: plain PyTorch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import ISAConfig
from .layout import BlockLayout


@dataclass
class ISAPlan:
    """What every backend needs to run the attention of one ISA call.

    Shapes use B batch, H heads, NB blocks, NKV pruned key/value blocks, Nf / Ns full /
    sparse query blocks, E exact blocks per sparse query block, D head dim.
    """

    layout: BlockLayout
    block_counts: torch.Tensor  # [NB] int32, real tokens per block
    key_means: torch.Tensor  # [B, H, NB, D] fp32, kbar
    value_sums: torch.Tensor  # [B, H, NB, D] fp32, Vsum = n_j * vbar
    compressed_out: torch.Tensor  # [B, H, NB, D] fp32, Oc (the residual shortcut)
    kv_blocks: torch.Tensor  # [B, H, NKV] int64, ascending original block ids of the pruned set
    full_query_blocks: torch.Tensor  # [B, H, Nf] int64, ascending
    sparse_query_blocks: torch.Tensor  # [B, H, Ns] int64, ascending
    exact_positions: torch.Tensor  # [B, H, Ns, E] int64, ascending positions into kv_blocks


def compressed_attention(qc: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """P = softmax(qc kc^T / sqrt(D)) over blocks and Oc = P vc.

    Args: qc, kc, vc: [B, H, NB, D] fp32 block means.
    Returns: P [B, H, NB, NB] and Oc [B, H, NB, D], fp32.
    """
    scale = 1.0 / math.sqrt(qc.shape[-1])
    probs = torch.softmax(torch.matmul(qc, kc.transpose(-1, -2)) * scale, dim=-1)
    return probs, torch.matmul(probs, vc)


def select_context_blocks(probs: torch.Tensor, layout: BlockLayout, select_ratio: float) -> torch.Tensor:
    """Context pre-selection: the pruned key/value set as original block ids.

    Saliency of a candidate source block j is the attention mass the nT target query
    blocks give it, sum_{i < nT} P[i, j]. The set is: every block holding a target token,
    the K_ctx most salient candidates, and the partial last block if there is one.

    Returns: [B, H, NKV] int64, ascending.
    """
    batch, heads = probs.shape[:2]
    device = probs.device
    kept = [torch.arange(layout.num_target_blocks, device=device).expand(batch, heads, -1)]
    k_ctx = layout.num_selected(select_ratio)
    if k_ctx > 0:
        first, end = layout.candidate_range
        saliency = probs[:, :, : layout.num_target_query_blocks, first:end].sum(dim=2)  # [B, H, n_cand]
        kept.append(saliency.topk(k_ctx, dim=-1).indices + first)
    if layout.extra_last_block:
        kept.append(torch.full((batch, heads, 1), layout.num_blocks - 1, device=device, dtype=torch.long))
    return torch.cat(kept, dim=-1).sort(dim=-1).values


def split_query_blocks(
    probs: torch.Tensor, layout: BlockLayout, config: ISAConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sharpness split: the floor(NB * flat_ratio) sharpest query blocks go to full attention.

    sharpness_i = sum of the k_s largest of P[i, :nT].
    Returns: full [B, H, Nf] and sparse [B, H, NB - Nf] query block ids, each ascending.
    """
    n_full = layout.num_full_query_blocks(config.flat_ratio)
    k_s = layout.num_sharpness_terms(config.sharpness_ratio)
    target_probs = probs[..., : layout.num_target_query_blocks]
    # a per-row sort of these short rows runs faster on a GPU than torch.topk's radix select
    largest_first = target_probs.sort(dim=-1, descending=True).values
    sharpness = largest_first[..., :k_s].sum(dim=-1)  # [B, H, NB]
    order = sharpness.argsort(dim=-1, descending=True, stable=True)
    return order[..., :n_full].sort(dim=-1).values, order[..., n_full:].sort(dim=-1).values


def exact_block_scores(
    query_means: torch.Tensor, key_means: torch.Tensor, kv_blocks: torch.Tensor, sparse_query_blocks: torch.Tensor
) -> torch.Tensor:
    """qbar . kbar_j of each sparse query block against each pruned block: [B, H, Ns, NKV] fp32.

    Args: query_means, key_means: [B, H, NB, D] fp32; kv_blocks: [B, H, NKV]; sparse_query_blocks: [B, H, Ns].
    """
    head_dim = query_means.shape[-1]
    qbar = torch.gather(query_means, 2, sparse_query_blocks[..., None].expand(-1, -1, -1, head_dim))
    kbar = torch.gather(key_means, 2, kv_blocks[..., None].expand(-1, -1, -1, head_dim))
    return torch.matmul(qbar, kbar.transpose(-1, -2))


def choose_exact_blocks(
    query_means: torch.Tensor,
    key_means: torch.Tensor,
    kv_blocks: torch.Tensor,
    sparse_query_blocks: torch.Tensor,
    num_exact: int,
) -> torch.Tensor:
    """For each sparse query block, the E pruned blocks with the highest qbar . kbar_j.

    Args:
        query_means, key_means: [B, H, NB, D] fp32.
        kv_blocks: [B, H, NKV]; sparse_query_blocks: [B, H, Ns].
    Returns: [B, H, Ns, E] int64 positions into kv_blocks, ascending.
    """
    scores = exact_block_scores(query_means, key_means, kv_blocks, sparse_query_blocks)
    return scores.argsort(dim=-1, descending=True)[..., :num_exact].sort(dim=-1).values


def make_plan(
    query_means: torch.Tensor,
    key_means: torch.Tensor,
    value_means: torch.Tensor,
    layout: BlockLayout,
    config: ISAConfig,
    *,
    select_context=select_context_blocks,
    split_queries=split_query_blocks,
    choose_exact=choose_exact_blocks,
) -> ISAPlan:
    """Run ISA's block-level steps 2-5 on pooled q, k, v ([B, H, NB, D] fp32).

    The three selection steps may be replaced by functions with the same contracts (the
    Triton backend's top-k kernels, `triton_selection.py`).
    """
    probs, compressed_out = compressed_attention(query_means, key_means, value_means)
    kv_blocks = select_context(probs, layout, config.select_ratio)
    full_blocks, sparse_blocks = split_queries(probs, layout, config)
    counts = layout.block_counts(query_means.device)
    num_exact = layout.num_exact_blocks(config.sparsity, config.select_ratio)
    exact = choose_exact(query_means, key_means, kv_blocks, sparse_blocks, num_exact)
    return ISAPlan(
        layout=layout,
        block_counts=counts,
        key_means=key_means,
        value_sums=value_means * counts[:, None].to(value_means.dtype),
        compressed_out=compressed_out,
        kv_blocks=kv_blocks,
        full_query_blocks=full_blocks,
        sparse_query_blocks=sparse_blocks,
        exact_positions=exact,
    )
