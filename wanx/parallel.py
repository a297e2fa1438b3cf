"""Several GPUs for one edit, on PyTorch's own distributed engine (torchrun, DeviceMesh, functional
collectives, FSDP2): Ulysses sequence parallelism, CFG parallelism and weight sharding.

    # torchrun --nproc-per-node 4 inference.py ...   (each process runs the same program)
    context = ParallelContext.from_environment(ulysses_degree=2, cfg_degree=2, num_heads=40)
    pipe = EditingPipeline.load(cfg, parallel=context)   # calls `parallelize(dit, context)`
    result = pipe.edit(source, prompt)                    # every rank returns the same result
    if context.is_main: ...write the files...
    context.close()

The processes form a (cfg_degree, ulysses_degree) DeviceMesh. The ranks of mesh row 0 compute the
conditional prediction and those of row 1 the unconditional one (`gather_cfg` exchanges them each
step); the ulysses_degree ranks of a row split every sequence of S tokens into contiguous chunks
and run each self-attention over all S tokens for a share of the heads (`UlyssesAttention`).
Everything else in a block is token-wise, so it runs on the local chunk unchanged: model.py is
not touched; hooks on its blocks shard and gather the sequence (`apply_ulysses`).

Without torchrun (world size 1) `from_environment` starts no process group and everything here
is a no-op. The model never reads the environment; only `from_environment` does.
"""
from __future__ import annotations

import inspect
import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .attention import SelfAttentionMethod, TokenLayout
from .config import ConfigError, one_line

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class ParallelError(RuntimeError):
    """A stage failed on some rank; every rank raises this with the same one-line message.

    Attributes: `rank` (the lowest failing rank), `stage`, `error_type` (the name of the
    exception that rank raised, e.g. "NonFiniteError", for the exit status).
    """

    def __init__(self, message: str, rank: int, stage: str, error_type: str):
        super().__init__(message)
        self.rank, self.stage, self.error_type = rank, stage, error_type


def check_layout(ulysses_degree: int, cfg_degree: int, world_size: int, num_heads: Optional[int] = None) -> None:
    """Refuse, with one line (ConfigError), a layout that cannot run; starts nothing.

    Args:
        ulysses_degree: ranks sharing one sequence; must divide `num_heads` (40: 1, 2, 4, 5, 8, ...).
        cfg_degree: 1 (cond and uncond as one batch of 2 on each rank) or 2 (one each).
        world_size: the processes torchrun started (1 without torchrun).
        num_heads: the DiT's attention heads, when known.
    """
    for name, value in (("ulysses_degree", ulysses_degree), ("cfg_degree", cfg_degree)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"parallel.{name} must be a positive int, got {value!r}")
    if cfg_degree > 2:
        raise ConfigError(f"parallel.cfg_degree must be 1 or 2 (cond and uncond), got {cfg_degree}")
    needed = ulysses_degree * cfg_degree
    if needed != world_size and world_size == 1:
        raise ConfigError(f"ulysses_degree {ulysses_degree} x cfg_degree {cfg_degree} needs {needed} processes: "
                          f"launch with torchrun --nproc-per-node {needed}")
    if needed != world_size:
        raise ConfigError(f"ulysses_degree {ulysses_degree} x cfg_degree {cfg_degree} = {needed} must equal the "
                          f"world size {world_size} (torchrun --nproc-per-node)")
    if num_heads is not None and num_heads % ulysses_degree:
        divisors = ", ".join(str(d) for d in range(1, num_heads + 1) if num_heads % d == 0)
        raise ConfigError(f"ulysses_degree {ulysses_degree} must divide the {num_heads} attention heads "
                          f"(choose {divisors})")


def _wait(tensor: torch.Tensor) -> torch.Tensor:
    """A functional collective's result as a plain tensor (waits for the collective)."""
    return tensor.wait() if isinstance(tensor, funcol.AsyncCollectiveTensor) else tensor


class ParallelContext:
    """Who this process is in the (cfg_degree, ulysses_degree) mesh. `ParallelContext()` is the
    single-process context (no process group, every method a no-op); build the others with
    `from_environment`."""

    def __init__(self, ulysses_degree: int = 1, cfg_degree: int = 1, shard_weights: bool = False,
                 mesh: Optional[DeviceMesh] = None, shard_mesh: Optional[DeviceMesh] = None, owns_group: bool = False):
        if mesh is None and ulysses_degree * cfg_degree != 1:
            raise ConfigError("a parallel layout needs a process group: use ParallelContext.from_environment")
        self.ulysses_degree, self.cfg_degree, self.shard_weights = ulysses_degree, cfg_degree, shard_weights
        self.mesh, self.shard_mesh, self._owns_group = mesh, shard_mesh, owns_group

    @classmethod
    def from_environment(cls, ulysses_degree: int = 1, cfg_degree: int = 1, shard_weights: bool = False, *,
                         device_type: Optional[str] = None, num_heads: Optional[int] = None,
                         timeout_s: float = 600.0) -> "ParallelContext":
        """The context of this process, from the variables torchrun sets (WORLD_SIZE, RANK, LOCAL_RANK,
        MASTER_ADDR, MASTER_PORT). The layout is checked (`check_layout`) before the process group
        starts; the group is joined (or the one already started is reused) and the mesh is built.

        Args:
            ulysses_degree, cfg_degree: the mesh's shape (their product must be the world size).
            shard_weights: shard the DiT's weights over all ranks with FSDP2 (`shard_dit`).
            device_type: "cuda" (NCCL; this process takes GPU LOCAL_RANK) or "cpu" (gloo);
                default: "cuda" when available.
            num_heads: the DiT's heads, to refuse a ulysses_degree that does not divide them now.
            timeout_s: how long a collective waits for a missing rank before it fails.
        Raises:
            ConfigError: a bad layout or launch, on one line.
        """
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        check_layout(ulysses_degree, cfg_degree, world_size, num_heads)
        if world_size == 1:
            return cls(shard_weights=shard_weights)
        missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
        if missing:
            raise ConfigError(f"WORLD_SIZE is {world_size} but {', '.join(missing)} not set: launch with torchrun")
        device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
        if device_type == "cuda":
            local_rank = int(os.environ["LOCAL_RANK"])
            if local_rank >= torch.cuda.device_count():
                raise ConfigError(f"LOCAL_RANK {local_rank} but this machine has {torch.cuda.device_count()} GPUs")
            torch.cuda.set_device(local_rank)
        owns_group = not dist.is_initialized()
        if owns_group:
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
        elif dist.get_world_size() != world_size:
            raise ConfigError(f"the process group has {dist.get_world_size()} ranks, WORLD_SIZE is {world_size}")
        mesh = init_device_mesh(device_type, (cfg_degree, ulysses_degree), mesh_dim_names=("cfg", "ulysses"))
        shard_mesh = init_device_mesh(device_type, (world_size,), mesh_dim_names=("shard",)) if shard_weights else None
        return cls(ulysses_degree, cfg_degree, shard_weights, mesh, shard_mesh, owns_group)

    @property
    def world_size(self) -> int:
        return 1 if self.mesh is None else self.mesh.size()

    @property
    def rank(self) -> int:
        return 0 if self.mesh is None else dist.get_rank()

    @property
    def is_main(self) -> bool:
        """Rank 0: the only one that prints and writes files."""
        return self.rank == 0

    @property
    def cfg_rank(self) -> int:
        """0: this rank computes the conditional prediction; 1: the unconditional one (cfg_degree 2)."""
        return 0 if self.mesh is None else self.mesh.get_local_rank("cfg")

    @property
    def ulysses_group(self) -> Optional[dist.ProcessGroup]:
        return None if self.mesh is None else self.mesh.get_group("ulysses")

    def describe(self) -> str:
        """One line for the run's summary."""
        if self.mesh is None:
            return "one process"
        shards = ", weights sharded over all ranks (FSDP2)" if self.shard_weights else ""
        return (f"{self.world_size} processes ({dist.get_backend()}): ulysses {self.ulysses_degree} "
                f"x cfg {self.cfg_degree}{shards}")

    def gather_cfg(self, prediction: torch.Tensor) -> torch.Tensor:
        """Exchange the rows' predictions: [B, ...] -> [cfg_degree * B, ...] ordered by cfg rank
        (cond first), bit-identical on every rank."""
        if self.cfg_degree == 1:
            return prediction
        return _wait(funcol.all_gather_single(prediction.contiguous(), 0, self.mesh.get_group("cfg")))

    @contextmanager
    def stage(self, name: str):
        """`with context.stage("vae_decode"):` run a stage so that an exception on any rank stops every rank.

        Each rank catches its own exception, then all ranks exchange one line each (all_gather_object);
        if any failed, all raise `ParallelError` naming the lowest failing rank and its reason. The
        body must not leave a rank waiting in a collective that a failed rank skipped: such a rank
        waits for `timeout_s`, then fails with the process group's timeout (and torchrun stops the
        others once one exits with an error). Single process: the body's exceptions pass unchanged.
        """
        if self.mesh is None:
            yield
            return
        failure = None
        try:
            yield
        except Exception as exc:
            failure = exc
        mine = None if failure is None else (type(failure).__name__, one_line(failure))
        reports = [None] * self.world_size
        try:
            dist.all_gather_object(reports, mine)
        except Exception as exc:
            silent = f"the other ranks did not answer ({one_line(exc)})"
            if mine is None or mine[1] == one_line(exc):
                raise ParallelError(f"{name} failed on rank {self.rank}: {silent}", self.rank, name,
                                    type(exc).__name__) from exc
            raise ParallelError(f"{name} failed on rank {self.rank}: {mine[1]}; {silent}", self.rank, name,
                                mine[0]) from failure
        for rank, report in enumerate(reports):
            if report is not None:
                raise ParallelError(f"{name} failed on rank {rank}: {report[1]}", rank, name, report[0]) from failure

    def close(self) -> None:
        """Leave the process group if this context started it (call once, at the end of the run)."""
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.mesh = self.shard_mesh = None


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
        return _wait(funcol.all_to_all_single(send.contiguous(), None, None, self.group))

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
            gate = _wait(funcol.all_gather_single(gate.contiguous(), 1, self.group))[:, :seq_len]
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
        return _wait(funcol.all_gather_single(output.contiguous(), 1, self.group))[:, :self.seq_len]

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


def shard_dit(dit, context: ParallelContext) -> None:
    """With `shard_weights`, shard every DiT block and then the rest (the root) over all ranks with
    FSDP2 `fully_shard`: each rank keeps 1 / world_size of the weights; a block's are all-gathered
    just before it runs and freed after. All ranks run the same forwards in step (cond and uncond:
    one batch-1 forward each per step), which the all-gathers require."""
    if context.shard_mesh is None:
        return
    from torch.distributed.fsdp import fully_shard

    for block in dit.blocks:
        fully_shard(block, mesh=context.shard_mesh)
    fully_shard(dit, mesh=context.shard_mesh)


def parallelize(dit, context: ParallelContext) -> UlyssesHooks:
    """`shard_dit` and `apply_ulysses` on a loaded DiT; returns the Ulysses hooks (remove() undoes them)."""
    shard_dit(dit, context)
    return apply_ulysses(dit, context)
