"""Backend "triton": host side of the Triton kernels (checks, allocation, tiles, launches).

Runs on CUDA tensors, or on CPU tensors under triton's interpreter (TRITON_INTERPRET=1).
The kernels module is imported on first use, so that the interpreter switch, read by
`triton.jit` when the kernels are defined, may be set after this module is imported.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from . import triton_selection
from .backend_base import ISABackend
from .layout import BlockLayout
from .residual import GatedShortcut
from .selection import ISAPlan
from .triton_block_copies import COPY_WARPS, gather_blocks, scatter_blocks

_LOG2_E = 1.4426950408889634


def interpreting() -> bool:
    """Whether triton runs kernels on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=None)
def _kernels():
    from . import triton_kernels

    return triton_kernels


def pool_blocks(x: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Mean of x over each block, padding excluded: [B, S, H, D] -> [B, H, NB, D] fp32."""
    batch, seq, heads, dim = x.shape
    out = torch.empty(batch, heads, layout.num_blocks, dim, dtype=torch.float32, device=x.device)
    _kernels().pool_blocks_kernel[(batch * heads, layout.num_blocks)](
        x_ptr=x, out_ptr=out, seq_len=seq, heads=heads, num_blocks=layout.num_blocks,
        stride_xb=x.stride(0), stride_xs=x.stride(1), stride_xh=x.stride(2), stride_xd=x.stride(3),
        BLOCK=layout.block_size, HEAD_DIM=dim, num_warps=COPY_WARPS,
    )
    return out


# The interpreter's fixed configuration.
INTERPRETER_SPARSE_TILES = {"TAYLOR_STAGES": 1, "num_warps": 4, "num_stages": 1}
TAYLOR_TILE = 64  # pruned blocks per tile of the sparse kernel's Taylor loop


def _token_descriptor(x: torch.Tensor, block_size: int) -> TensorDescriptor:
    """A descriptor of x [B, S, H, D] viewed as [B, S, H * D] that loads one block of one
    head ([1, b, D]); rows past S read as zeros.

    It reads x in place when the (H, D) axes are contiguous and the start and the other
    strides are 16-byte aligned, else a contiguous copy. A size-1 axis is never stepped
    over, so its stride (which PyTorch leaves arbitrary) is taken as the contiguous one.
    """
    batch, seq, heads, dim = x.shape

    def strides(t: torch.Tensor) -> list[int]:
        row = t.stride(1) if seq > 1 else heads * dim
        return [t.stride(0) if batch > 1 else seq * row, row, 1]

    readable = (
        x.stride(3) == 1
        and (heads == 1 or x.stride(2) == dim)
        and x.data_ptr() % 16 == 0
        and all(stride > 0 and stride * x.element_size() % 16 == 0 for stride in strides(x)[:2])
    )
    if not readable:
        x = x.clone(memory_format=torch.contiguous_format)
    return TensorDescriptor(x, shape=[batch, seq, heads * dim], strides=strides(x), block_shape=[1, block_size, dim])


def sparse_block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: ISAPlan,
    out_padded: torch.Tensor,
    residual: GatedShortcut | None = None,
    tiles: dict | None = None,
):
    """Exact top-E blocks plus 0-th order Taylor terms for the diffuse query blocks.

    Args:
        q, k, v: [B, S, H, D]; k and v are read in place through a block table when
            their (H, D) axes are contiguous (a copy is made otherwise).
        plan: the block decisions; out_padded: [B, NB * b, H, D], written at the real rows
            of the diffuse query blocks only.
        residual: ISA's gated residual, added to every row written; or None.
        tiles: a fixed kernel configuration (TAYLOR_STAGES, num_warps, num_stages,
            optionally maxnreg) instead of the autotuned one on CUDA
            (benchmarks/tune_sparse_kernel.py); the interpreter always runs INTERPRETER_SPARSE_TILES.
    Returns:
        triton's handle of the launched kernel (its registers and shared memory, for
        benchmarks), or None when there is no diffuse query block.
    """
    layout = plan.layout
    batch, seq, heads, dim = q.shape
    num_sparse = plan.sparse_query_blocks.shape[-1]
    if num_sparse == 0:
        return None
    num_kv = plan.kv_blocks.shape[-1]
    num_exact = plan.exact_positions.shape[-1]
    kv_blocks = plan.kv_blocks.to(torch.int32).contiguous()  # [B, H, NKV]
    exact_positions = plan.exact_positions.to(torch.int32).contiguous()  # [B, H, Ns, E]
    exact_blocks = torch.gather(
        kv_blocks[:, :, None, :].expand(-1, -1, num_sparse, -1), 3, plan.exact_positions
    ).contiguous()  # [B, H, Ns, E] int32
    per_block = plan.kv_blocks[..., None].expand(-1, -1, -1, dim)
    operand_dtype = q.dtype  # the kernel's dot operands; the online softmax stays fp32
    taylor_keys = torch.gather(plan.key_means, 2, per_block).to(operand_dtype)  # [B, H, NKV, D]
    taylor_values = torch.gather(plan.value_sums, 2, per_block).to(operand_dtype)  # [B, H, NKV, D]
    taylor_counts = plan.block_counts[plan.kv_blocks].to(torch.float32)  # [B, H, NKV]
    taylor_keys_desc, taylor_values_desc = (
        TensorDescriptor(
            x, shape=[batch * heads, num_kv, dim], strides=[num_kv * dim, dim, 1], block_shape=[1, TAYLOR_TILE, dim]
        )
        for x in (taylor_keys, taylor_values)
    )
    kernels = _kernels()
    if q.device.type != "cuda":
        kernel, tiles = kernels.sparse_block_attention_kernel, INTERPRETER_SPARSE_TILES
    elif tiles is None:
        kernel, tiles = kernels.sparse_block_attention_kernel_tuned, {}
    else:
        kernel = kernels.sparse_block_attention_kernel
    q_desc, k_desc, v_desc = (_token_descriptor(x, layout.block_size) for x in (q, k, v))
    return kernel[(num_sparse, batch * heads)](
        q_desc=q_desc,
        k_desc=k_desc,
        v_desc=v_desc,
        out_ptr=out_padded,
        taylor_keys_desc=taylor_keys_desc,
        taylor_values_desc=taylor_values_desc,
        taylor_counts_ptr=taylor_counts,
        sparse_blocks_ptr=plan.sparse_query_blocks.to(torch.int32).contiguous(),
        exact_positions_ptr=exact_positions,
        exact_blocks_ptr=exact_blocks,
        shortcut_ptr=None if residual is None else residual.shortcut,
        gate_ptr=None if residual is None else residual.gate,
        seq_len=seq,
        heads=heads,
        num_blocks=layout.num_blocks,
        num_kv=num_kv,
        num_sparse=num_sparse,
        num_exact=num_exact,
        qk_scale_log2=_LOG2_E / math.sqrt(dim),
        stride_ob=out_padded.stride(0),
        stride_os=out_padded.stride(1),
        stride_oh=out_padded.stride(2),
        stride_od=out_padded.stride(3),
        BLOCK=layout.block_size,
        HEAD_DIM=dim,
        TAYLOR_TILE=TAYLOR_TILE,
        EXACT_PAD=max(16, triton.next_power_of_2(num_exact)),
        **tiles,
    )


class TritonBackend(ISABackend):
    """Triton kernels for pooling, the block selections, the block copies and the sparse
    half; CUDA, or CPU under TRITON_INTERPRET=1."""

    name = "triton"
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    head_dims = (64, 128)
    block_sizes = (16, 32, 64, 128)
    hint = "use backend='torch'"
    fuses_residual = True  # scatter_blocks and sparse_block_attention add it as they write

    def unsupported_reason(self, device: torch.device | str, dtype: torch.dtype) -> str | None:
        device = torch.device(device)
        if device.type == "cpu" and not interpreting():
            return (
                "backend 'triton' needs CUDA tensors, got CPU tensors: use backend='torch', "
                "or set TRITON_INTERPRET=1 to run the kernels on triton's CPU interpreter"
            )
        if device.type not in ("cpu", "cuda"):
            return f"backend 'triton' runs on CUDA (or CPU under TRITON_INTERPRET=1), got device {device}; {self.hint}"
        if device.type == "cuda" and not torch.cuda.is_available():
            return f"backend 'triton' needs a CUDA GPU, and none is available; {self.hint}"
        return super().unsupported_reason(device, dtype)

    pool_blocks = staticmethod(pool_blocks)
    make_plan = staticmethod(triton_selection.make_plan)
    gather_blocks = staticmethod(gather_blocks)
    scatter_blocks = staticmethod(scatter_blocks)
    sparse_block_attention = staticmethod(sparse_block_attention)
