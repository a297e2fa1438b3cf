"""`ISABackend`: what an ISA backend supplies, documented here and nowhere else.

`editing_sparse_attention` (api.py) runs ISA as one fixed pipeline and asks its backend
for each step:

    check_inputs(q, config)                    refuse what the backend cannot run
    pool_blocks(x, layout)     x = q, k, v     block means
    make_plan(qc, kc, vc, layout, config)      the block decisions (an `ISAPlan`)
    gather_blocks / scatter_blocks             the block copies around the dense kernel
    sparse_block_attention(q, k, v, plan, out) exact top-E + Taylor for the diffuse blocks

A backend must bring `pool_blocks` and `sparse_block_attention`; the other steps have
PyTorch defaults here, which a backend overrides where a kernel pays. Everything else
(compressed attention, the dense kernel, the residual when it is not fused) is shared.
"""
from __future__ import annotations

import abc

import torch

from . import full_attention, selection
from .config import ISAConfig
from .layout import BlockLayout
from .selection import ISAPlan


class ISABackend(abc.ABC):
    """One way to run ISA's kernel-worthy steps.

    Class attributes:
        name: the name `backends.get_backend` knows it by (one of `backends.BACKEND_NAMES`).
        dtypes: the dtypes of q, k, v it runs.
        head_dims, block_sizes: the head dims D and `ISAConfig.block_size` values it runs;
            None for any.
        hint: what to use instead, the end of every refusal.
        fuses_residual: True when its `scatter_blocks` and `sparse_block_attention` take
            `residual=` a `residual.GatedShortcut` and add gate[b, t] * Oc[b, h, block(t)]
            to every row they write; the caller then passes it to both. With False they
            never get one and `residual.add_residual` makes a PyTorch pass over the
            finished output instead.
    """

    name: str
    dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    head_dims: tuple[int, ...] | None = None
    block_sizes: tuple[int, ...] | None = None
    hint: str = "use backend 'torch'"
    fuses_residual: bool = False

    def unsupported_reason(self, device: torch.device | str, dtype: torch.dtype) -> str | None:
        """Why this backend cannot run q, k, v of `dtype` on `device` on this machine (the
        device, a missing package, the dtype), as one message that ends with `hint`; None
        when it can. Cheap and without GPU work, so a caller may ask before loading anything.
        This default checks the dtype only; backends tied to a device add theirs."""
        return self._dtype_reason(dtype)

    def limits_reason(self, head_dim: int, dtype: torch.dtype, block_size: int) -> str | None:
        """Why the kernels cannot take this head dim, dtype or block size, on any device;
        None when they can (from `head_dims`, `dtypes` and `block_sizes`)."""
        if self.head_dims is not None and head_dim not in self.head_dims:
            return f"backend {self.name!r} supports head dims {self.head_dims}, got {head_dim}; {self.hint}"
        if self._dtype_reason(dtype) is not None:
            return self._dtype_reason(dtype)
        if self.block_sizes is not None and block_size not in self.block_sizes:
            return f"backend {self.name!r} supports block sizes {self.block_sizes}, got {block_size}; {self.hint}"
        return None

    def _dtype_reason(self, dtype: torch.dtype) -> str | None:
        if dtype in self.dtypes:
            return None
        names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
        return f"backend {self.name!r} supports dtypes {names}, got {dtype}; {self.hint}"

    def check_inputs(self, q: torch.Tensor, config: ISAConfig) -> None:
        """Raise a ValueError, with `hint`, for q ([B, S, H, D]; k and v match it) or a
        config that this backend cannot run. The call's own checks have passed already."""
        reason = self.unsupported_reason(q.device, q.dtype) or self.limits_reason(
            q.shape[-1], q.dtype, config.block_size
        )
        if reason is not None:
            raise ValueError(reason)

    @abc.abstractmethod
    def pool_blocks(self, x: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
        """Mean of x over each block, padding excluded: [B, S, H, D] -> [B, H, NB, D] fp32."""

    def make_plan(
        self,
        query_means: torch.Tensor,
        key_means: torch.Tensor,
        value_means: torch.Tensor,
        layout: BlockLayout,
        config: ISAConfig,
    ) -> ISAPlan:
        """ISA's block decisions from the pooled q, k, v ([B, H, NB, D] fp32). Any override
        must return the very plan of `selection.make_plan`, which this default runs."""
        return selection.make_plan(query_means, key_means, value_means, layout, config)

    def gather_blocks(self, x: torch.Tensor, blocks: torch.Tensor, block_size: int, num_tokens: int) -> torch.Tensor:
        """The tokens of whole blocks per head: x [B, S, H, D], blocks [B, H, N] -> [B, H, L, D]
        with L = num_tokens, under the contract of `full_attention.gather_blocks` (the default)."""
        return full_attention.gather_blocks(x, blocks, block_size, num_tokens)

    def scatter_blocks(self, rows: torch.Tensor, blocks: torch.Tensor, out_padded: torch.Tensor) -> None:
        """rows [B, H, N * b, D] into out_padded [B, NB * b, H, D] at the blocks' rows, under the
        contract of `full_attention.scatter_blocks` (the default). With `fuses_residual` it
        also takes `residual=`."""
        full_attention.scatter_blocks(rows, blocks, out_padded)

    @abc.abstractmethod
    def sparse_block_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: ISAPlan, out_padded: torch.Tensor
    ) -> None:
        """Exact top-E blocks plus 0-th order Taylor terms, in one online softmax, for the
        diffuse query blocks of `plan`: q, k, v [B, S, H, D]; written into out_padded
        [B, NB * b, H, D] at the real rows of those blocks and nowhere else. With
        `fuses_residual` it also takes `residual=`."""
