"""wanx.parallel: Ulysses sequence parallelism, CFG parallelism, FSDP2 weight sharding and the failure
contract, on the CPU with gloo. The multi-process checks run under torchrun (tests/parallel_worker.py,
2 and 4 processes, one launch each, every launch under a timeout); the rest runs in this process.

Tolerances. Ulysses attention is compared bit for bit: each head's attention is computed on the same
values in the same order whichever rank holds the head. The DiT forwards and the pipeline's latent
are compared within 1e-5 * max|reference|: the arithmetic is the same, but the token-wise matrix
products run on fewer rows per call (S / degree tokens, or a batch of 1 instead of 2 under CFG
parallelism), which may change how the CPU kernels block their fp32 sums; each such reordering
moves a result by a few units of fp32 rounding (2^-24 = 6e-8 relative), and two blocks and two
sampler steps add up to about 1e-6 at most (measured: 2e-7 to 5e-7 for the forwards, 3e-7 for the
latent). A wrong token, head or position gives errors above 1e-2 * max|reference| (checked by
giving rank 1 rank 0's RoPE positions: 4e-2).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from model import WanDiT
from wanx.config import ConfigError, load_config
from wanx.parallel import ParallelContext, check_layout, parallelize
from wanx.pipeline import EditingPipeline, SourceVideo

ROOT = Path(__file__).resolve().parent.parent
RELATIVE_BOUND = 1e-5
LAUNCH_TIMEOUT_S = 150
TORCHRUN_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_torchrun(nproc: int, argv: list[str], timeout_s: float = LAUNCH_TIMEOUT_S) -> tuple[int, str, str]:
    """`torchrun --nproc-per-node NPROC ARGV...` on a free local port; (exit status, stdout, stderr).

    The launch gets its own process group, which is killed whole if it outlives `timeout_s` (the
    test then fails: a hang is a failure, never a wait)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"torchrun --nproc-per-node {nproc} {' '.join(argv[:2])} hung (over {timeout_s} s)")
    return process.returncode, stdout, stderr


def torchrun(nproc: int, scenario: str, out_dir: Path) -> tuple[int, str, float]:
    """Run tests/parallel_worker.py SCENARIO under torchrun; (exit status, stderr, seconds)."""
    start = time.monotonic()
    status, _, stderr = launch_torchrun(nproc, [str(ROOT / "tests" / "parallel_worker.py"), scenario, str(out_dir)])
    return status, stderr, time.monotonic() - start


def run_checks(nproc: int, out_dir: Path) -> list[dict]:
    status, stderr, _ = torchrun(nproc, "checks", out_dir)
    errors = [line for line in stderr.splitlines() if line.startswith("rank ")]
    assert status == 0, errors or stderr[-3000:]
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(nproc)]


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return run_checks(2, tmp_path_factory.mktemp("world2"))


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    return run_checks(4, tmp_path_factory.mktemp("world4"))


@pytest.fixture(params=[2, 4])
def world(request):
    return request.getfixturevalue(f"world{request.param}")


def assert_matches(result: torch.Tensor, reference: torch.Tensor, bound: float, name: str) -> None:
    assert result.shape == reference.shape, name
    error = (result.double() - reference.double()).abs().max().item()
    assert error <= bound * reference.abs().max().item(), f"{name}: max error {error:.3e}"


@pytest.mark.parametrize("method", ["dense", "isa"])
def test_ulysses_attention_equals_one_process(world, method):
    """Ulysses over dense and ISA ("torch" backend), S = 37 / 41 tokens (not divisible by 2 or 4), T = 21
    (not a multiple of the 4-token ISA blocks): every rank's chunk equals one process's, bit for bit."""
    for results in world:
        (name,) = [key for key in results["compare"] if key.startswith(f"attention {method}")]
        assert_matches(*results["compare"][name], 0.0, name)


def test_dit_forward_equals_one_process(world2, world4):
    """The tiny DiT (4 heads, ISA "torch", S = 27) with ulysses 2, cfg 2 (as the pipeline runs it),
    ulysses 2 with FSDP2-sharded weights, ulysses 4, ulysses 2 x cfg 2 (also sharded)."""
    expected = {2: {"dit ulysses 2", "dit cfg 2", "dit ulysses 2 sharded"},
                4: {"dit ulysses 4", "dit ulysses 2 x cfg 2", "dit ulysses 2 x cfg 2 sharded"}}
    for size, ranks in ((2, world2), (4, world4)):
        for results in ranks:
            names = {key for key in results["compare"] if key.startswith("dit ")}
            assert names == expected[size]
            for name in names:
                assert_matches(*results["compare"][name], RELATIVE_BOUND, f"{name} (world {size})")


def test_pipeline_ranks_agree_and_match_one_process(world):
    """A 2-step tiny edit (cfg 2 on 2 processes; ulysses 2 x cfg 2, sharded, on 4): every rank ends with
    the same latent bit for bit, and it is one process's within the bound."""
    latents = [results["latent"] for results in world]
    for latent in latents[1:]:
        assert torch.equal(latent, latents[0])
    assert_matches(*world[0]["compare"]["pipeline latent"], RELATIVE_BOUND, "pipeline latent")


def test_weights_are_sharded(world4):
    fractions = [results["shard_fraction"] for results in world4]
    assert sum(fractions) == pytest.approx(1.0) and max(fractions) < 0.3


def test_failure_on_one_rank_stops_every_rank_with_its_line(world):
    """The last rank raises inside `stage`; every rank raises the same one-line ParallelError."""
    size = len(world)
    for results in world:
        assert results["failure"] == f"ValueError|a test stage failed on rank {size - 1}: boom on the last rank"
    for results in world:
        assert results["heads_refused"] == f"ulysses_degree {size} must divide the 1 attention heads (choose 1)"


def test_failure_inside_a_collective_ends_every_rank(tmp_path):
    """Rank 1 fails between two collectives while rank 0 waits in an all-to-all: with a 5 s process-group
    timeout both end with an error line (rank 1 gives its reason) and nothing is saved."""
    status, stderr, seconds = torchrun(2, "hang", tmp_path)
    lines = [line for line in stderr.splitlines() if line.startswith("rank ")]
    assert status != 0 and seconds < 90
    reason = "rank 1: ParallelError: denoising failed on rank 1: boom inside block 1 on rank 1;"
    assert any(line.startswith(reason) for line in lines), lines
    assert not list(tmp_path.iterdir())


@pytest.fixture
def no_torchrun(monkeypatch):
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def fake_torchrun(monkeypatch, world_size: int, complete: bool = True) -> None:
    """torchrun's variables, as if this process were rank 0 of `world_size` (nothing listens)."""
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    if complete:
        for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1")):
            monkeypatch.setenv(name, value)


@pytest.mark.parametrize("world_size, complete, options, message", [
    (1, True, dict(ulysses_degree=2), "needs 2 processes: launch with torchrun --nproc-per-node 2"),
    (1, True, dict(ulysses_degree=2, cfg_degree=2), "needs 4 processes"),
    (4, True, dict(ulysses_degree=3), "ulysses_degree 3 x cfg_degree 1 = 3 must equal the world size 4"),
    (2, True, dict(ulysses_degree=2, num_heads=3), "must divide the 3 attention heads (choose 1, 3)"),
    (4, True, dict(ulysses_degree=1, cfg_degree=4), "cfg_degree must be 1 or 2"),
    (2, True, dict(ulysses_degree=0, cfg_degree=2), "ulysses_degree must be a positive int"),
    (2, False, dict(ulysses_degree=2), "WORLD_SIZE is 2 but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set"),
])
def test_bad_layouts_are_refused_before_any_process_group(no_torchrun, world_size, complete, options, message):
    if world_size > 1:
        fake_torchrun(no_torchrun, world_size, complete)
    with pytest.raises(ConfigError) as caught:
        ParallelContext.from_environment(device_type="cpu", **options)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert not dist.is_initialized()


def test_forty_heads_allow_their_divisors():
    allowed = []
    for degree in range(1, 11):
        try:
            check_layout(degree, 1, degree, 40)
            allowed.append(degree)
        except ConfigError:
            pass
    assert allowed == [1, 2, 4, 5, 8, 10]


def test_world_size_one_is_a_no_op(no_torchrun):
    """Without torchrun: no process group, no hooks, the DiT bit-identical to the DiT without a context,
    predictions unchanged, and exceptions of a stage pass through unchanged."""
    context = ParallelContext.from_environment(ulysses_degree=1, cfg_degree=1, shard_weights=True)
    assert context.mesh is None and context.world_size == 1 and context.is_main and context.cfg_rank == 0
    assert context.describe() == "one process" and not dist.is_initialized()
    gen = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 16, 2, 4, 4, generator=gen), torch.randn(1, 16, 2, 4, 4, generator=gen),
              torch.tensor([500.0, 500.0]), [torch.randn(3, 32, generator=gen)] * 2)
    reference = WanDiT.tiny(seed=1)(*inputs, step=0)
    dit = WanDiT.tiny(seed=1)
    parallelize(dit, context)
    assert all(not block._forward_pre_hooks and not block._forward_hooks for block in dit.blocks)
    with torch.no_grad():
        assert torch.equal(dit(*inputs, step=0), reference)
    assert context.gather_cfg(reference) is reference
    with pytest.raises(KeyError, match="unchanged"):
        with context.stage("a stage"):
            raise KeyError("unchanged")


def test_pipeline_with_a_single_process_context_is_unchanged(no_torchrun):
    cfg = load_config("configs/tiny.yaml", ["sampler.steps=2", "video.size=[32,48]"])
    frames = np.random.default_rng(0).integers(0, 256, size=(5, 40, 64, 3), dtype=np.uint8)
    source = SourceVideo.from_frames(cfg, frames)
    plain = EditingPipeline.load(cfg, progress=False).edit(source, "make it snow", progress=False)
    context = ParallelContext.from_environment()
    pipe = EditingPipeline.load(cfg, progress=False, parallel=context)
    assert np.array_equal(pipe.edit(source, "make it snow", progress=False).video, plain.video)


def test_cfg_parallel_without_guidance_is_refused(world2):
    for results in world2:
        assert results["no_guidance"] == "parallel.cfg_degree 2 needs classifier-free guidance (sampler.guidance != 1)"


def test_a_layout_without_a_process_group_is_refused():
    with pytest.raises(ConfigError, match="needs a process group: use ParallelContext.from_environment"):
        ParallelContext(ulysses_degree=2)
