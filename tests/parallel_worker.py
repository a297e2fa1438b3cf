"""The multi-process side of tests/test_parallel.py, run by torchrun on the CPU (gloo):

    python -m torch.distributed.run --nproc-per-node N tests/parallel_worker.py SCENARIO OUT_DIR

"checks" (N = 2 or 4) runs every comparison for that world size and saves OUT_DIR/rank<r>.pt:
{"compare": {name: (result of the parallel run, the same quantity from one process)}, "latent":
the pipeline's final latent, "failure": the message the stage failure gave this rank, ...}. The
single-process references are computed in the same process, with the same thread count.

"hang" (N = 2): rank 1 fails inside a DiT forward, between two collectives, while rank 0 waits in
an all-to-all; the process group's timeout is 5 s. Every rank must end with an error.

A rank that fails prints one line "rank R: Type: message" on stderr and exits with status 1.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

from in_context_sparse_attention import ISAConfig
from model import WanDiT
from wanx.attention import DenseAttention, TokenLayout, make_attention
from wanx.config import ConfigError, load_config, one_line
from wanx.parallel import ParallelContext, ParallelError, UlyssesAttention, apply_ulysses, shard_dit
from wanx.pipeline import EditingPipeline, SourceVideo

SMALL_ISA = ISAConfig(block_size=4)  # blocks of 4 tokens: sparse selection happens at these small sizes
HEADS = 4  # the tiny DiT with 4 heads of 16, so that Ulysses x4 has one head per rank


def chunk(x: torch.Tensor, degree: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s ceil(S / degree) tokens of x [B, S, ...] (dim 1), zero-padded at the end."""
    local = -(-x.shape[1] // degree)
    part = x[:, rank * local:(rank + 1) * local]
    missing = local - part.shape[1]
    return torch.cat([part, part.new_zeros(part.shape[0], missing, *part.shape[2:])], dim=1)


def attention_cases(context: ParallelContext) -> dict:
    """UlyssesAttention(dense and ISA "torch") against the method on the whole sequence, S = T + C
    not divisible by the degree and T not a multiple of ISA's block size."""
    degree = context.ulysses_degree
    rank = torch.distributed.get_rank(context.ulysses_group)
    out = {}
    for name, method, target, source in (("dense", DenseAttention(), 20, 17),
                                         ("isa", make_attention("torch", SMALL_ISA), 21, 20)):
        layout = TokenLayout(target_len=target, grids=((1, 1, target), (1, 1, source)), step=0)
        gen = torch.Generator().manual_seed(11)
        q, k, v = (torch.randn(2, target + source, HEADS, 8, generator=gen) for _ in range(3))
        gate = (torch.rand(2, target + source, 1, 1, generator=gen) - 0.5) * 0.5
        reference = method(q, k, v, layout, gate=gate)
        local = -(-layout.seq_len // degree)
        valid = max(0, min(local, layout.seq_len - rank * local))
        result = UlyssesAttention(method, context.ulysses_group)(
            chunk(q, degree, rank), chunk(k, degree, rank), chunk(v, degree, rank), layout,
            gate=chunk(gate, degree, rank) if method.uses_gate else None)
        out[f"attention {name} x{degree}"] = (result[:, :valid], reference[:, rank * local:rank * local + valid])
    return out


def tiny_dit() -> WanDiT:
    dit = WanDiT.tiny(seed=3, num_heads=HEADS)
    dit.set_attention("torch", SMALL_ISA)
    return dit


def dit_inputs():
    """A guided batch: target grid (2, 3, 3) (T = 18, not a multiple of 4), source grid (1, 3, 3) (C = 9):
    S = 27, divisible by neither 2 nor 4."""
    gen = torch.Generator().manual_seed(5)
    latent = torch.randn(2, 16, 2, 6, 6, generator=gen)
    source = torch.randn(1, 16, 1, 6, 6, generator=gen)
    context = [torch.randn(7, 32, generator=gen), torch.randn(5, 32, generator=gen)]
    return latent, source, torch.tensor([700.0, 700.0]), context


def dit_case(context: ParallelContext, shard: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(the DiT forward as the pipeline runs it under `context`, the batch-2 forward of one process).

    With cfg_degree 2 this rank runs its half of the batch and `gather_cfg` rebuilds the whole."""
    latent, source, timestep, text = dit_inputs()
    reference = tiny_dit()(latent, source, timestep, text, step=0)
    dit = tiny_dit()
    if shard:
        shard_dit(dit, context)
    hooks = apply_ulysses(dit, context)
    if context.cfg_degree == 2:
        row = slice(context.cfg_rank, context.cfg_rank + 1)
        latent, timestep, text = latent[row], timestep[row], text[row]
    result = context.gather_cfg(dit(latent, source, timestep, text, step=0))
    hooks.remove()
    if not shard:  # the hooks are off and the methods unwrapped: one process's forward again, bit for bit
        torch.testing.assert_close(dit(*dit_inputs(), step=0), reference, rtol=0, atol=0)
    return result, reference


def pipeline_latent(context: ParallelContext) -> torch.Tensor:
    """The final latent of a 2-step tiny edit under `context` (one process when the context is single)."""
    cfg = load_config("configs/tiny.yaml", ["sampler.steps=2", "video.size=[32,48]"])
    frames = np.random.default_rng(0).integers(0, 256, size=(5, 40, 64, 3), dtype=np.uint8)
    pipe = EditingPipeline.load(cfg, progress=False, parallel=context)
    latents = []
    decode = pipe.vae.decode
    pipe.vae.decode = lambda latent: latents.append(latent.clone()) or decode(latent)
    pipe.edit(SourceVideo.from_frames(cfg, frames), "make it snow", progress=False)
    return latents[0]


def refusal(function, *args) -> str:
    """The one-line ConfigError `function(*args)` raises on this rank ("accepted" if none)."""
    try:
        function(*args)
    except ConfigError as exc:
        return str(exc)
    return "accepted"


def guidance_one_edit(context: ParallelContext) -> None:
    """An edit without guidance (nothing for cfg_degree 2 to split)."""
    cfg = load_config("configs/tiny.yaml", ["sampler.steps=1", "video.size=[32,48]", "sampler.guidance=1.0"])
    pipe = EditingPipeline.load(cfg, progress=False, parallel=context)
    pipe.edit(SourceVideo.from_frames(cfg, np.zeros((5, 32, 48, 3), dtype=np.uint8)), "x", progress=False)


def stage_failure(context: ParallelContext) -> str:
    """The message every rank gets when the last rank fails inside a stage (the group stays usable)."""
    try:
        with context.stage("a test stage"):
            if context.rank == context.world_size - 1:
                raise ValueError("boom on the last rank\nsecond line of the message")
    except ParallelError as exc:
        return f"{exc.error_type}|{exc}"
    return "no error"


def checks() -> dict:
    world = int(os.environ["WORLD_SIZE"])
    ulysses = ParallelContext.from_environment(ulysses_degree=world, device_type="cpu")
    compare = attention_cases(ulysses)
    compare[f"dit ulysses {world}"] = dit_case(ulysses)
    results = {"failure": stage_failure(ulysses),
               "heads_refused": refusal(apply_ulysses, WanDiT.tiny(num_heads=1), ulysses)}
    if world == 2:
        cfg_only = ParallelContext.from_environment(cfg_degree=2, device_type="cpu")
        compare["dit cfg 2"] = dit_case(cfg_only)
        sharded = ParallelContext.from_environment(ulysses_degree=2, shard_weights=True, device_type="cpu")
        compare["dit ulysses 2 sharded"] = dit_case(sharded, shard=True)
        parallel = cfg_only
        results["no_guidance"] = refusal(guidance_one_edit, cfg_only)
    else:
        parallel = ParallelContext.from_environment(ulysses_degree=2, cfg_degree=2, shard_weights=True,
                                                    device_type="cpu")
        compare["dit ulysses 2 x cfg 2"] = dit_case(parallel)
        compare["dit ulysses 2 x cfg 2 sharded"] = dit_case(parallel, shard=True)
        results["shard_fraction"] = shard_fraction(parallel)
    results["latent"] = pipeline_latent(parallel)
    compare["pipeline latent"] = (results["latent"], pipeline_latent(ParallelContext()))
    results["compare"] = compare
    ulysses.close()
    return results


def shard_fraction(context: ParallelContext) -> float:
    """The share of the DiT's weights that this rank holds after `shard_dit`."""
    dit = tiny_dit()
    total = sum(p.numel() for p in dit.parameters())
    shard_dit(dit, context)
    return sum(p.to_local().numel() for p in dit.parameters()) / total


def hang() -> dict:
    context = ParallelContext.from_environment(ulysses_degree=2, device_type="cpu", timeout_s=5)
    dit = tiny_dit()
    apply_ulysses(dit, context)

    def fail(*_):
        raise RuntimeError("boom inside block 1 on rank 1")

    if context.rank == 1:
        dit.blocks[1].register_forward_pre_hook(fail)
    latent, source, timestep, text = dit_inputs()
    with context.stage("denoising"):
        dit(latent, source, timestep, text, step=0)
    return {}


def main() -> None:
    scenario, out_dir = sys.argv[1], Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    try:
        with torch.no_grad():
            results = {"checks": checks, "hang": hang}[scenario]()
    except Exception as exc:
        print(f"rank {rank}: {type(exc).__name__}: {one_line(exc)}", file=sys.stderr, flush=True)
        sys.exit(1)
    torch.save(results, out_dir / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
