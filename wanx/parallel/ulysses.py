"""Ulysses sequence parallelism for `model.WanDiT` without changing it: a self-attention method wrapper
(`UlyssesAttention`) and forward hooks on the blocks that shard and gather the sequence (`UlyssesHooks`)."""
from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

from ..attention import SelfAttentionMethod, TokenLayout
from .context import ParallelContext, check_layout, wait


class UlyssesAttention(SelfAttentionMethod):
    """Ulysses sequence parallelism around any self-attention method.

    Each of the `degree` ranks of `group` holds a contiguous chunk of L = ceil(S / degree) tokens
    (the last chunk zero-padded) with all H heads. An all-to-all turns that into all S_pad = degree * L
    tokens for H / degree heads; the padding is cut off so that the inner method sees exactly the S
    tokens of the global `TokenLayout` (ISA's blocks, T and C, and every softmax are those of one
    process); its output is padded again and a second all-to-all returns the rank's chunk, all heads.
    """

    def __init__(self, inner: SelfAttentionMethod, group: dist.ProcessGroup):
        self.inner, self.group = inner, group
        self.degree = dist.get_world_size(group)
        self.name, self.uses_gate = inner.name, inner.uses_gate

    def describe(self) -> str:
        return f"Ulysses x{self.degree} over {self.inner.describe()}"

    def _exchange(self, send: torch.Tensor) -> torch.Tensor:
        """all-to-all: slice i of dim 0 goes to rank i; slice i of the result came from rank i."""
        return wait(funcol.all_to_all_single(send.contiguous(), None, None, self.group))

    def _to_full_sequence(self, x: torch.Tensor, seq_len: int) -> torch.Tensor:
        """[B, L, H, D] (this rank's tokens, all heads) -> [B, S, H / degree, D] (all tokens, its heads)."""
        batch, local, heads, dim = x.shape
        send = x.reshape(batch, local, self.degree, heads // self.degree, dim).permute(2, 0, 1, 3, 4)
        received = self._exchange(send)  # [degree (source rank = token chunk), B, L, H / degree, D]
        full = received.permute(1, 0, 2, 3, 4).reshape(batch, self.degree * local, heads // self.degree, dim)
        return full[:, :seq_len].contiguous()

    def _to_local_tokens(self, x: torch.Tensor, local: int) -> torch.Tensor:
        """[B, S, H / degree, D] -> [B, L, H, D]: the inverse of `_to_full_sequence`."""
        batch, seq_len, heads, dim = x.shape
        padded = F.pad(x, (0, 0, 0, 0, 0, self.degree * local - seq_len))
        send = padded.reshape(batch, self.degree, local, heads, dim).permute(1, 0, 2, 3, 4)
        received = self._exchange(send)  # [degree (source rank = head group), B, L, H / degree, D]
        return received.permute(1, 2, 0, 3, 4).reshape(batch, local, self.degree * heads, dim)

    def __call__(self, q, k, v, layout: TokenLayout, gate=None):
        """q, k, v: [B, L, H, D], this rank's chunk of the sequence `layout` describes; gate:
        [B, L, 1, 1] or None. Returns [B, L, H, D] (padding rows: zeros, for the caller to drop)."""
        seq_len, local, heads = layout.seq_len, q.shape[1], q.shape[2]
        if local != -(-seq_len // self.degree):
            raise ValueError(f"Ulysses x{self.degree}: {local} local tokens, expected ceil({seq_len} / {self.degree})")
        if heads % self.degree:
            raise ValueError(f"Ulysses x{self.degree} cannot split {heads} heads")
        q, k, v = (self._to_full_sequence(x, seq_len) for x in (q, k, v))
        if gate is not None:
            gate = wait(funcol.all_gather_tensor(gate.contiguous(), 1, self.group))[:, :seq_len]
        return self._to_local_tokens(self.inner(q, k, v, layout, gate=gate), local)


class UlyssesHooks:
    """The forward hooks `apply_ulysses` puts on a DiT's blocks; `remove()` takes them off.

    - first block, before: x [B, S, dim] is zero-padded to degree * L tokens and rank r keeps
      tokens [r L, (r + 1) L);
    - every block, before: its `freqs` [S, head_dim / 2] (global RoPE positions) is padded (unit
      rotations) and sliced the same way, and its self-attention method is wrapped in
      `UlyssesAttention` unless it already is (so `set_attention` after `apply_ulysses` stays right);
    - last block, after: the chunks are all-gathered and the padding dropped: [B, S, dim].
    """

    def __init__(self, dit, group: Optional[dist.ProcessGroup]):
        self.group, self.blocks = group, list(dit.blocks)
        self.degree = 1 if group is None else dist.get_world_size(group)
        self.rank = 0 if group is None else dist.get_rank(group)
        self.seq_len = 0
        self._handles = []
        if self.degree == 1:
            return
        self._signature = inspect.signature(self.blocks[0].forward)
        for block in self.blocks:
            self._handles.append(block.register_forward_pre_hook(self._shard_inputs, with_kwargs=True))
        self._handles.append(self.blocks[-1].register_forward_hook(self._gather_output))

    def _local_chunk(self, x: torch.Tensor, dim: int, pad_value: float) -> torch.Tensor:
        """This rank's L = ceil(n / degree) entries of `x` along `dim` (n = x.shape[dim]), padded with
        `pad_value` where they run past n."""
        total = x.shape[dim]
        local = -(-total // self.degree)
        start = min(self.rank * local, total)
        chunk = x.narrow(dim, start, min(local, total - start))
        if chunk.shape[dim] == local:
            return chunk
        shape = list(x.shape)
        shape[dim] = local - chunk.shape[dim]
        return torch.cat([chunk, x.new_full(shape, pad_value)], dim=dim)

    def _shard_inputs(self, block, args, kwargs):
        bound = self._signature.bind(*args, **kwargs)
        if block is self.blocks[0]:
            self.seq_len = bound.arguments["x"].shape[1]
            bound.arguments["x"] = self._local_chunk(bound.arguments["x"], 1, 0.0)
        if bound.arguments["freqs"].shape[0] != self.seq_len:
            raise ValueError(f"Ulysses: freqs holds {bound.arguments['freqs'].shape[0]} positions, the sequence "
                             f"{self.seq_len} tokens")
        bound.arguments["freqs"] = self._local_chunk(bound.arguments["freqs"], 0, 1.0)
        if not isinstance(block.self_attn.method, UlyssesAttention):
            block.self_attn.method = UlyssesAttention(block.self_attn.method, self.group)
        return bound.args, bound.kwargs

    def _gather_output(self, block, args, output):
        return wait(funcol.all_gather_tensor(output.contiguous(), 1, self.group))[:, :self.seq_len]

    def remove(self) -> None:
        """Take the hooks off and unwrap the blocks' attention methods."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for block in self.blocks:
            if isinstance(block.self_attn.method, UlyssesAttention):
                block.self_attn.method = block.self_attn.method.inner


def apply_ulysses(dit, context: ParallelContext) -> UlyssesHooks:
    """Run `dit` (a `model.WanDiT`) with Ulysses sequence parallelism over the context's ulysses ranks.

    Nothing is installed when ulysses_degree is 1. Raises ConfigError when the degree does not
    divide the DiT's heads.
    """
    if context.ulysses_degree == 1:
        return UlyssesHooks(dit, None)
    check_layout(context.ulysses_degree, context.cfg_degree, context.world_size, dit.config.num_heads)
    return UlyssesHooks(dit, context.ulysses_group)
