"""The process layout of a parallel edit: a (cfg_degree, ulysses_degree) DeviceMesh built from torchrun's
variables, the checks that refuse a bad layout before any process group starts, the CFG exchange, and the
failure contract (`ParallelContext.stage`)."""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..config import ConfigError, one_line

logger = logging.getLogger(__name__)

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


def wait(tensor: torch.Tensor) -> torch.Tensor:
    """A functional collective's result as a plain tensor (waits for the collective)."""
    return tensor.wait() if isinstance(tensor, funcol.AsyncCollectiveTensor) else tensor


class ParallelContext:
    """Who this process is in the (cfg_degree, ulysses_degree) mesh. `ParallelContext()` is the
    single-process context (no process group, every method a no-op); build the others with
    `from_environment`."""

    def __init__(self, ulysses_degree: int = 1, cfg_degree: int = 1, shard_weights: bool = False,
                 mesh: Optional[DeviceMesh] = None, shard_mesh: Optional[DeviceMesh] = None,
                 failure_group: Optional[dist.ProcessGroup] = None, owns_group: bool = False):
        if mesh is None and ulysses_degree * cfg_degree != 1:
            raise ConfigError("a parallel layout needs a process group: use ParallelContext.from_environment")
        self.ulysses_degree, self.cfg_degree, self.shard_weights = ulysses_degree, cfg_degree, shard_weights
        self.mesh, self.shard_mesh, self.failure_group, self._owns_group = mesh, shard_mesh, failure_group, owns_group

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
            timeout_s: how long the failure exchange of `stage` (and the default group) waits for a
                missing rank before it fails; the mesh's own groups keep PyTorch's defaults.
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
        # failures are exchanged on the CPU: a rank whose GPU is in an error state can still report
        failure_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        return cls(ulysses_degree, cfg_degree, shard_weights, mesh, shard_mesh, failure_group, owns_group)

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
        return wait(funcol.all_gather_tensor(prediction.contiguous(), 0, self.mesh.get_group("cfg")))

    @contextmanager
    def stage(self, name: str):
        """`with context.stage("vae_decode"):` run a stage so that an exception on any rank stops every rank.

        Each rank catches its own exception (and logs its line at once), then all ranks exchange one line
        each (all_gather_object over a gloo group); if any failed, all raise `ParallelError` naming the
        lowest failing rank and its reason. A rank that failed while the others wait in a collective
        it skipped gets no answer: after `timeout_s` it raises ParallelError with its own reason and
        its process ends, and torchrun then stops the others (an exiting worker ends the whole job).
        Single process: the body's exceptions pass unchanged.
        """
        if self.mesh is None:
            yield
            return
        failure = None
        try:
            yield
        except Exception as exc:
            failure = exc
            logger.error("%s failed on rank %d: %s", name, self.rank, one_line(exc))
        mine = None if failure is None else (type(failure).__name__, one_line(failure))
        reports = [None] * self.world_size
        try:
            dist.all_gather_object(reports, mine, group=self.failure_group)
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
        self.mesh = self.shard_mesh = self.failure_group = None
