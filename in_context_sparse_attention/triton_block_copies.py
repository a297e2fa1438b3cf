"""Host side of the Triton block copies around the dense kernel: `gather_blocks` and
`scatter_blocks` (kernels in `triton_kernels.py`), shared by the Triton and TileLang backends.

The contracts are those of `full_attention.gather_blocks` / `scatter_blocks`, except that
a gathered token past S reads as 0, and the scatter may add ISA's residual as it writes.
Runs on CUDA tensors, or on CPU tensors under triton's interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import functools

import torch
import triton

from .residual import GatedShortcut

# Warps per program of the memory-bound kernels (pooling, block copies), each of which
# moves one [b, D] tile; 2 measured fastest (docs/benchmarks.md, "Measurements behind the code").
COPY_WARPS = 2


@functools.lru_cache(maxsize=None)
def _kernels():
    """The kernels module, imported on first use: triton reads TRITON_INTERPRET when the
    kernels are defined, so the switch may be set after this module is imported."""
    from . import triton_kernels

    return triton_kernels


def gather_blocks(x: torch.Tensor, blocks: torch.Tensor, block_size: int, num_tokens: int) -> torch.Tensor:
    """The tokens of whole blocks, per head: x [B, S, H, D], blocks [B, H, N] -> [B, H, L, D].

    Row slot * b + r of head h is token blocks[b, h, slot] * b + r; only the first
    L = num_tokens rows are kept, and a token past S (a partial last block) reads as 0.
    """
    batch, seq, heads, dim = x.shape
    num_slots = blocks.shape[-1]
    out = torch.empty(batch, heads, num_tokens, dim, dtype=x.dtype, device=x.device)
    if num_slots == 0 or num_tokens == 0:
        return out
    _kernels().gather_blocks_kernel[(batch * heads, triton.cdiv(num_tokens, block_size))](
        x_ptr=x,
        blocks_ptr=blocks.contiguous(),
        out_ptr=out,
        seq_len=seq,
        heads=heads,
        num_slots=num_slots,
        num_tokens=num_tokens,
        stride_xb=x.stride(0),
        stride_xs=x.stride(1),
        stride_xh=x.stride(2),
        stride_xd=x.stride(3),
        BLOCK=block_size,
        HEAD_DIM=dim,
        num_warps=COPY_WARPS,
    )
    return out


def scatter_blocks(
    rows: torch.Tensor, blocks: torch.Tensor, out_padded: torch.Tensor, residual: GatedShortcut | None = None
) -> None:
    """The inverse of `gather_blocks` into the padded output: out_padded[b, blocks[b, h, slot] * b' + r, h]
    = rows[b, h, slot * b' + r] for every row r of every slot, plus the residual when given.

    Args: rows: [B, H, N * b', D] (any strides); blocks: [B, H, N]; out_padded: [B, NB * b', H, D],
        contiguous; residual: ISA's gated residual (added at the real rows), or None.
    """
    batch, heads, num_rows, dim = rows.shape
    num_slots = blocks.shape[-1]
    if num_slots == 0:
        return
    if not out_padded.is_contiguous():
        raise ValueError("scatter_blocks writes into a contiguous out_padded [B, NB * b, H, D]")
    block_size = num_rows // num_slots
    num_blocks = out_padded.shape[1] // block_size
    _kernels().scatter_blocks_kernel[(batch * heads, num_slots)](
        rows_ptr=rows,
        blocks_ptr=blocks.contiguous(),
        out_ptr=out_padded,
        shortcut_ptr=None if residual is None else residual.shortcut,
        gate_ptr=None if residual is None else residual.gate,
        seq_len=None if residual is None else residual.gate.shape[1],
        heads=heads,
        num_slots=num_slots,
        num_blocks=num_blocks,
        stride_rb=rows.stride(0),
        stride_rh=rows.stride(1),
        stride_rs=rows.stride(2),
        stride_rd=rows.stride(3),
        BLOCK=block_size,
        HEAD_DIM=dim,
        num_warps=COPY_WARPS,
    )
