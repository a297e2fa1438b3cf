"""wanx.parallel on one CUDA GPU with an NCCL process group of world size 1.

The multi-process tests (tests/test_parallel.py) run on the CPU with gloo. Here the code paths
that otherwise only run with several GPUs run on NCCL, in a world of one rank: the DeviceMesh
and its groups, the Ulysses all-to-alls and all-gathers (identity exchanges with one rank, so
every result must be bit-identical to the plain computation), FSDP2 sharding of the DiT (a
shard of one rank: bit-identical forwards), a whole tiny edit through the pipeline with that
context, and the failure exchange of `ParallelContext.stage` over its gloo group.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from in_context_sparse_attention import ISAConfig
from model import WanDiT
from wanx.attention import DenseAttention, TokenLayout, make_attention
from wanx.config import load_config
from wanx.parallel import ParallelContext, ParallelError, UlyssesAttention, parallelize
from wanx.pipeline import EditingPipeline, SourceVideo

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def nccl_context(tmp_path_factory):
    """A ParallelContext over an NCCL group of one rank, built as `from_environment` builds one for N."""
    store = dist.FileStore(str(tmp_path_factory.mktemp("nccl") / "store"), 1)
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    mesh = init_device_mesh("cuda", (1, 1), mesh_dim_names=("cfg", "ulysses"))
    shard_mesh = init_device_mesh("cuda", (1,), mesh_dim_names=("shard",))
    failure_group = dist.new_group(backend="gloo")
    context = ParallelContext(1, 1, True, mesh, shard_mesh, failure_group, owns_group=True)
    assert dist.get_backend(context.ulysses_group) == "nccl"
    yield context
    context.close()
    assert not dist.is_initialized()


@pytest.mark.parametrize("method", [DenseAttention(), make_attention("triton", ISAConfig())], ids=["dense", "triton"])
def test_ulysses_exchanges_on_nccl_are_exact(nccl_context, method):
    layout = TokenLayout(target_len=1000, grids=((5, 10, 20), (4, 10, 20)), step=0)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, layout.seq_len, 8, 128, generator=gen, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    gate = torch.rand(1, layout.seq_len, 1, 1, generator=gen, device="cuda", dtype=torch.bfloat16)
    gate = gate if method.uses_gate else None
    expected = method(q, k, v, layout, gate=gate)
    out = UlyssesAttention(method, nccl_context.ulysses_group)(q, k, v, layout, gate=gate)
    assert torch.equal(out, expected)


@torch.no_grad()
def test_fsdp2_sharded_dit_forward_is_bit_identical(nccl_context):
    plain = WanDiT.tiny(seed=5).to("cuda", torch.bfloat16).eval()
    sharded = WanDiT.tiny(seed=5).to("cuda", torch.bfloat16).eval()
    hooks = parallelize(sharded, nccl_context)
    assert type(sharded.blocks[0]).__name__.startswith("FSDP")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 3, 16, 16, generator=gen).cuda()
    source = torch.randn(1, 16, 3, 16, 16, generator=gen).cuda()
    context = [torch.randn(20, plain.config.text_dim, generator=gen).cuda().to(torch.bfloat16)]
    t = torch.tensor([600.0], device="cuda")
    expected = plain(x, source, t, context)
    out = sharded(x, source, t, context)
    assert torch.isfinite(expected).all()
    assert torch.equal(out, expected)
    hooks.remove()


def test_pipeline_edit_with_an_nccl_context_matches_one_process(nccl_context):
    overrides = ["device=cuda", "memory.profile=manual", "sampler.steps=2", "video.max_frames=5", "video.size=[32,48]"]
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), overrides)
    frames = np.random.default_rng(0).integers(0, 256, size=(5, 32, 48, 3), dtype=np.uint8)
    source = SourceVideo.from_frames(cfg, frames)
    plain = EditingPipeline.load(cfg, progress=False).edit(source, "make it snow", progress=False)
    shared = EditingPipeline.load(cfg, progress=False, parallel=nccl_context)
    assert shared.parallel.world_size == 1 and shared.parallel.mesh is not None
    result = shared.edit(source, "make it snow", progress=False)
    assert np.array_equal(result.video, plain.video)


def test_a_failing_stage_raises_parallel_error_on_nccl(nccl_context):
    with pytest.raises(ParallelError, match=r"decode failed on rank 0: .*no frames"):
        with nccl_context.stage("decode"):
            raise ValueError("no frames")
