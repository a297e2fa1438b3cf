"""Backend "tilelang": host side of the TileLang kernels (checks, compile cache, launches).

The kernels (`tilelang_kernels.py`) take batch, sequence length, heads and block counts
as runtime values, so each kernel is compiled once per (head dim, dtype, block size,
GPU architecture) and process: a video's 40 layers x 32 steps, at any length, reuse it.
TileLang itself is imported on first compilation, so that asking for this backend on a
machine without CUDA (or without tilelang) gets a clear error from `check_inputs`.
"""
from __future__ import annotations

import functools
import importlib.util

import torch

from . import triton_selection
from .backend_base import ISABackend
from .layout import BlockLayout
from .residual import GatedShortcut
from .selection import ISAPlan
from .triton_block_copies import gather_blocks, scatter_blocks

_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}
# One warpgroup per program and several programs per SM, with cp.async loads, rather than
# tilelang's default warp-specialised producer/consumer split, which takes 240 registers a
# thread and so fits one program per SM: the sparse kernel runs faster so (docs/benchmarks.md).
_PASS_CONFIGS = {"tl.disable_warp_specialized": True}


def target_arch(device: torch.device) -> str:
    """The nvcc architecture for `device`: Hopper needs sm_90a for wgmma and setmaxnreg."""
    major, minor = torch.cuda.get_device_capability(device)
    return "sm_90a" if (major, minor) == (9, 0) else f"sm_{major}{minor}"


@functools.lru_cache(maxsize=None)
def compiled_kernel(kind: str, head_dim: int, dtype: str, block_size: int, arch: str):
    """Build and compile one kernel ("pool" or "sparse"; dtype "float16" or "bfloat16")
    for `arch` (e.g. "sm_90a"), once per process.

    Compiling needs nvcc but no GPU, so this also runs on CPU-only machines (tests).
    Returns a tilelang JITKernel, called with torch tensors as its prim_func's arguments.
    """
    import tilelang

    from . import tilelang_kernels

    builders = {
        "pool": tilelang_kernels.build_pool_blocks,
        "sparse": tilelang_kernels.build_sparse_attention,
    }
    func = builders[kind](head_dim, dtype, block_size)
    return tilelang.compile(func, target={"kind": "cuda", "arch": arch}, pass_configs=_PASS_CONFIGS)


def _kernel(kind: str, x: torch.Tensor, block_size: int):
    return compiled_kernel(kind, x.shape[-1], _DTYPE_NAMES[x.dtype], block_size, target_arch(x.device))


def pool_blocks(x: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Mean of x over each block, padding excluded: [B, S, H, D] -> [B, H, NB, D] fp32."""
    batch, _, heads, dim = x.shape
    out = torch.empty(batch, heads, layout.num_blocks, dim, dtype=torch.float32, device=x.device)
    with torch.cuda.device(x.device):
        _kernel("pool", x, layout.block_size)(x.contiguous(), out)
    return out


def sparse_kernel_inputs(plan: ISAPlan, dtype: torch.dtype) -> dict:
    """The sparse kernel's block tables and Taylor operands, from the plan.

    Returns (int32 and fp32 tensors on the plan's device):
        query_blocks: [B, H, Ns] int32, the diffuse query blocks.
        exact_blocks: [B, H, Ns, E] int32, original block ids of each one's exact blocks.
        key_means, value_means: [B, H, NKV, D] `dtype`, kbar_j and vbar_j = Vsum_j / n_j
            of the pruned blocks, in kv_blocks order.
        taylor_counts: [B, H, Ns, NKV] fp32, n_j, or 0 where block j is exact for that query block.
    """
    kv_blocks = plan.kv_blocks  # [B, H, NKV]
    batch, heads, num_kv = kv_blocks.shape
    num_sparse, num_exact = plan.exact_positions.shape[-2:]
    dim = plan.key_means.shape[-1]
    index = kv_blocks[..., None].expand(-1, -1, -1, dim)
    counts = plan.block_counts[kv_blocks].to(torch.float32)  # [B, H, NKV]
    key_means = torch.gather(plan.key_means, 2, index).to(dtype)
    value_means = (torch.gather(plan.value_sums, 2, index) / counts[..., None]).to(dtype)
    taylor_counts = counts[:, :, None, :].expand(-1, -1, num_sparse, -1).contiguous()
    taylor_counts.scatter_(3, plan.exact_positions, 0.0)
    exact_blocks = torch.gather(kv_blocks, 2, plan.exact_positions.flatten(2)).view(
        batch, heads, num_sparse, num_exact
    )
    return {
        "query_blocks": plan.sparse_query_blocks.to(torch.int32).contiguous(),
        "exact_blocks": exact_blocks.to(torch.int32),
        "key_means": key_means.contiguous(),
        "value_means": value_means.contiguous(),
        "taylor_counts": taylor_counts,
    }


def sparse_block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: ISAPlan,
    out_padded: torch.Tensor,
    residual: GatedShortcut | None = None,
) -> None:
    """Exact top-E blocks plus 0-th order Taylor terms for the diffuse query blocks.

    Args:
        q, k, v: [B, S, H, D] (copied to contiguous memory if they are not).
        plan: the block decisions; out_padded: [B, NB * b, H, D] contiguous, written at the
            real rows of the diffuse query blocks only.
        residual: ISA's gated residual, added to every row written; or None.
    """
    if plan.sparse_query_blocks.shape[-1] == 0:
        return
    if not out_padded.is_contiguous():
        raise ValueError("backend 'tilelang' writes into a contiguous out_padded [B, NB * b, H, D]")
    inputs = sparse_kernel_inputs(plan, q.dtype)
    if residual is None:  # the kernel always adds one: a zero gate
        residual = GatedShortcut(
            plan.compressed_out.contiguous(), torch.zeros(q.shape[:2], dtype=torch.float32, device=q.device)
        )
    kernel = _kernel("sparse", q, plan.layout.block_size)
    with torch.cuda.device(q.device):
        kernel(
            q.contiguous(),
            k.contiguous(),
            v.contiguous(),
            inputs["query_blocks"],
            inputs["exact_blocks"],
            inputs["key_means"],
            inputs["value_means"],
            inputs["taylor_counts"],
            residual.shortcut,
            residual.gate,
            out_padded,
        )


class TileLangBackend(ISABackend):
    """TileLang kernels for pooling and the sparse half (which adds the residual); CUDA GPUs
    (Hopper: sm_90a). The block selection and the block copies are the Triton kernels
    (`triton_selection.py`, `triton_block_copies.py`)."""

    name = "tilelang"
    dtypes = (torch.float16, torch.bfloat16)
    head_dims = (64, 128)
    block_sizes = (64,)
    hint = "use backend 'torch' (any device) or 'triton'"
    fuses_residual = True  # the (shared) scatter and the sparse kernel add it as they write

    def unsupported_reason(self, device: torch.device | str, dtype: torch.dtype) -> str | None:
        device = torch.device(device)
        if not torch.cuda.is_available() or device.type != "cuda":
            where = "no CUDA device is available" if not torch.cuda.is_available() else f"got tensors on {device}"
            return f"the tilelang backend needs a CUDA GPU ({where}); {self.hint}"
        if importlib.util.find_spec("tilelang") is None:
            return f"the tilelang backend needs the tilelang package (pip install tilelang==0.1.15); {self.hint}"
        return super().unsupported_reason(device, dtype)

    pool_blocks = staticmethod(pool_blocks)
    make_plan = staticmethod(triton_selection.make_plan)
    gather_blocks = staticmethod(gather_blocks)
    scatter_blocks = staticmethod(scatter_blocks)
    sparse_block_attention = staticmethod(sparse_block_attention)
