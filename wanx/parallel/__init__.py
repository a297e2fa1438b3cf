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

`context`: the mesh, the layout checks, the CFG exchange and the failure contract; `ulysses`: the
attention wrapper and the block hooks; here: FSDP2 weight sharding and `parallelize`.
"""
from __future__ import annotations

from .context import ParallelContext, ParallelError, check_layout
from .ulysses import UlyssesAttention, UlyssesHooks, apply_ulysses

__all__ = ["ParallelContext", "ParallelError", "check_layout", "UlyssesAttention", "UlyssesHooks",
           "apply_ulysses", "shard_dit", "parallelize"]


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
