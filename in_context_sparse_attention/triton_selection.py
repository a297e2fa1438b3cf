"""ISA's block-level steps 2-5 with Triton kernels for the top-k selections.

`make_plan` returns the same `ISAPlan` as `selection.make_plan`: only the sorts are
replaced (segmented sorts took most of its GPU time: docs/benchmarks.md). Every value
that a selection compares (P, saliency, sharpness, block scores) comes from the very same
PyTorch calls on the same operands as there, so it is bit-identical: the plans can only
differ where two values are exactly equal (ties, broken either way, except the stable
sharpness order, which is kept).

Runs on CUDA tensors, or on CPU tensors under triton's interpreter (TRITON_INTERPRET=1).
The kernels module is imported on first use, as in `triton_backend.py`.
"""
from __future__ import annotations

import functools

import torch
import triton

from . import selection
from .config import ISAConfig
from .layout import BlockLayout
from .selection import ISAPlan, exact_block_scores

# values one program holds in registers: 16 per thread at 4 warps, ~60 registers per thread
_TILE_ELEMENTS = 2048


@functools.lru_cache(maxsize=None)
def _kernels():
    from . import triton_selection_kernels

    return triton_selection_kernels


def _row_tiles(width: int) -> tuple[int, int, int]:
    """(rows per program, padded width, warps) for row-wise selections over `width` columns:
    _TILE_ELEMENTS values per program, or one row of more, with 16 values per thread up
    to 16 warps."""
    padded = triton.next_power_of_2(max(1, width))
    return max(1, _TILE_ELEMENTS // padded), padded, max(4, min(16, padded // 512))


def select_context_blocks(probs: torch.Tensor, layout: BlockLayout, select_ratio: float) -> torch.Tensor:
    """Context pre-selection; the same result as `selection.select_context_blocks`.

    Args: probs: [B, H, NB, NB] fp32, P.
    Returns: [B, H, NKV] int64, ascending.
    """
    batch, heads = probs.shape[:2]
    first, end = layout.candidate_range
    num_kv = layout.num_kv_blocks(select_ratio)
    saliency = probs[:, :, : layout.num_target_query_blocks, first:end].sum(dim=2).contiguous()  # [B, H, n_cand]
    kv_blocks = torch.empty(batch, heads, num_kv, dtype=torch.long, device=probs.device)
    _kernels().select_context_kernel[(batch * heads,)](
        saliency_ptr=saliency, kv_blocks_ptr=kv_blocks, num_candidates=end - first,
        num_selected=layout.num_selected(select_ratio), first_candidate=first, num_kv=num_kv,
        num_blocks=layout.num_blocks, CANDIDATES=triton.next_power_of_2(max(1, end - first)), TARGET_TILE=1024,
        EXTRA_LAST=layout.extra_last_block, num_warps=_row_tiles(end - first)[2],
    )
    return kv_blocks


def query_sharpness(probs: torch.Tensor, layout: BlockLayout, sharpness_ratio: float) -> torch.Tensor:
    """sharpness_i = sum of the k_s largest of P[i, :nT], bit-identical to `selection`'s.

    The kernel writes the k_s largest of each row in descending order into the first
    columns of a [B, H, NB, nT] buffer, the very values and layout of `selection`'s sorted
    rows, so the same torch sum gives the same bits: a sum in another order could differ
    in the last bit, and at 65,536 tokens the Nf-th and Nf+1-th sharpness of a head are
    often only ~1e-5 apart.

    Args: probs: [B, H, NB, NB] fp32, contiguous.
    Returns: [B, H, NB] fp32.
    """
    batch, heads, num_blocks = probs.shape[:3]
    num_terms = layout.num_sharpness_terms(sharpness_ratio)
    num_rows = batch * heads * num_blocks
    num_cols = layout.num_target_query_blocks
    largest_first = torch.empty(batch, heads, num_blocks, num_cols, dtype=torch.float32, device=probs.device)
    rows, cols, warps = _row_tiles(num_cols)
    terms = triton.next_power_of_2(num_terms)
    chunk = max(1, min(terms, _TILE_ELEMENTS // (rows * terms)))  # a [rows, terms, chunk] compare tile
    _kernels().sharpness_terms_kernel[(triton.cdiv(num_rows, rows),)](
        probs_ptr=probs, terms_ptr=largest_first, num_rows=num_rows, row_stride=num_blocks, num_cols=num_cols,
        num_terms=num_terms, ROWS=rows, COLS=cols, TERMS=terms, CHUNK=chunk, num_warps=warps,
    )
    return largest_first[..., :num_terms].sum(dim=-1)


def split_query_blocks(
    probs: torch.Tensor, layout: BlockLayout, config: ISAConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sharpness split; the same result as `selection.split_query_blocks`.

    Args: probs: [B, H, NB, NB] fp32, contiguous.
    Returns: full [B, H, Nf] and sparse [B, H, NB - Nf] query block ids, each ascending.
    """
    batch, heads, num_blocks = probs.shape[:3]
    num_full = layout.num_full_query_blocks(config.flat_ratio)
    sharpness = query_sharpness(probs, layout, config.sharpness_ratio)
    full = torch.empty(batch, heads, num_full, dtype=torch.long, device=probs.device)
    sparse = torch.empty(batch, heads, num_blocks - num_full, dtype=torch.long, device=probs.device)
    _, blocks, warps = _row_tiles(num_blocks)
    _kernels().split_query_blocks_kernel[(batch * heads,)](
        sharpness_ptr=sharpness,
        full_ptr=full,
        sparse_ptr=sparse,
        num_blocks=num_blocks,
        num_full=num_full,
        BLOCKS=blocks,
        num_warps=warps,
    )
    return full, sparse


def choose_exact_blocks(
    query_means: torch.Tensor,
    key_means: torch.Tensor,
    kv_blocks: torch.Tensor,
    sparse_query_blocks: torch.Tensor,
    num_exact: int,
) -> torch.Tensor:
    """For each sparse query block, the E pruned blocks with the highest qbar . kbar_j;
    the same result as `selection.choose_exact_blocks`.

    The scores are the same gathers and fp32 GEMM as there (so bit-identical): a fused
    dot with another summation order would move near-equal scores across the E-th place.

    Args:
        query_means, key_means: [B, H, NB, D] fp32.
        kv_blocks: [B, H, NKV]; sparse_query_blocks: [B, H, Ns].
    Returns: [B, H, Ns, E] int64 positions into kv_blocks, ascending.
    """
    batch, heads, num_sparse = sparse_query_blocks.shape
    num_kv = kv_blocks.shape[-1]
    exact = torch.empty(batch, heads, num_sparse, num_exact, dtype=torch.long, device=query_means.device)
    if num_sparse == 0:
        return exact
    scores = exact_block_scores(query_means, key_means, kv_blocks, sparse_query_blocks).contiguous()  # [B, H, Ns, NKV]
    num_rows = batch * heads * num_sparse
    rows, kv, warps = _row_tiles(num_kv)
    _kernels().exact_blocks_kernel[(triton.cdiv(num_rows, rows),)](
        scores_ptr=scores,
        exact_ptr=exact,
        num_rows=num_rows,
        num_kv=num_kv,
        num_exact=num_exact,
        ROWS=rows,
        KV=kv,
        num_warps=warps,
    )
    return exact


def make_plan(
    query_means: torch.Tensor,
    key_means: torch.Tensor,
    value_means: torch.Tensor,
    layout: BlockLayout,
    config: ISAConfig,
) -> ISAPlan:
    """ISA's block-level steps 2-5 on pooled q, k, v ([B, H, NB, D] fp32);
    the same plan as `selection.make_plan`, with the selections above."""
    return selection.make_plan(
        query_means,
        key_means,
        value_means,
        layout,
        config,
        select_context=select_context_blocks,
        split_queries=split_query_blocks,
        choose_exact=choose_exact_blocks,
    )
