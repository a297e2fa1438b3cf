"""The memory tiers wired through the planner, the pipeline and the CLI (`memory:` config section).

Profile "auto" against given free-memory figures for the 81-frame 960x544 plan of the 14 B
model, the refusals that come before anything loads, sequential guidance against the batched
one, offload "model" on the CPU against "none", and a CUDA out-of-memory error in a stage, all
on the CPU (free memory is an argument of `make_plan`, the CLI's is monkeypatched).
"""
import numpy as np
import pytest
import torch

import inference
import scheduler
from model import WanDiT
from wanx import components, pipeline, planning, report
from wanx.config import ConfigError, MemorySetting, load_config
from wanx.memory import GIB, Fp8Linear
from wanx.pipeline import EditingPipeline
from wanx.t5 import WanTextEncoder
from wanx.vae import WanVAE

TINY = "configs/tiny.yaml"
QUICK = ["sampler.steps=2", "video.size=[32,48]"]
CLI_QUICK = ["sampler.steps=2", "video.max_frames=7", "video.size=[32,48]"]
ASSET = "assets/demo_input.mp4"
# Sequential guidance runs the very operations of the batched one on the same inputs; only the
# summation order of a matmul may change with its batch size, a few fp32 units of each output.
# The tiny DiT's blocks and guidance's uncond + g (cond - uncond) (g = 2.5: factors up to 1 + 2g
# on the rounding of cond and uncond) carry that to the guided velocity: 9 units of 2^-23 at its
# largest value were measured when this was written. Bound: 64 units.
SEQUENTIAL_BOUND = 64 * 2.0**-23


def shaped_source(frames: int, height: int, width: int) -> pipeline.SourceVideo:
    """A source of the given working shape whose values are never read (planning looks at shapes only)."""
    video = torch.zeros(3, 1, 1, 1).expand(3, frames, height, width)
    return pipeline.SourceVideo(path="memory", video=video, fps=16.0, frames_read=frames, source_size=(height, width))


def tiny_source() -> pipeline.SourceVideo:
    video = np.random.default_rng(0).integers(0, 256, size=(5, 40, 64, 3), dtype=np.uint8)
    return pipeline.SourceVideo.from_frames(load_config(TINY, QUICK), video, fps=16.0)


def plan_14b(free_gib, overrides=()):
    """The plan of an 81-frame 960x544 edit of the 14 B model on a GPU with `free_gib` free (None: unknown)."""
    cfg = load_config("inference.yaml", ["device=cuda", "video.size=[544,960]", *overrides])
    free = None if free_gib is None else int(free_gib * GIB)
    return planning.make_plan(cfg, shaped_source(81, 544, 960), free)


def tier_lines(text: str) -> list[str]:
    """The rows of the tier table in a plan's text (after its two header lines)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("tiers")) + 2
    return [line for line in lines[start:] if line.startswith(" " * 12)]


def test_every_stage_counts_towards_a_tiers_peak():
    """On 41 frames at 1280x720 the VAE's work space (one frame's pixels x VAE_WORK_BYTES_PER_PIXEL) makes the VAE
    stage the largest of the blocks tier; with video.vae_tiling it is not estimated (zero)."""
    def blocks_tier(overrides):
        cfg = load_config("inference.yaml", ["device=cuda", "video.size=[720,1280]", *overrides])
        plan = planning.make_plan(cfg, shaped_source(41, 720, 1280), None,
                                  setting=MemorySetting("blocks", "bf16", "sequential"))
        return plan, next(t for t in plan.memory_tiers if t.setting == plan.memory_setting)

    plan, tier = blocks_tier([])
    work = 720 * 1280 * planning.VAE_WORK_BYTES_PER_PIXEL / GIB
    assert plan.memory["vae_work_space"] == pytest.approx(work)
    assert tier.vae == pytest.approx(plan.memory["vae_weights"] + work)
    assert tier.peak == tier.vae > max(tier.text, tier.denoise)
    tiled, tiled_tier = blocks_tier(["video.vae_tiling=true"])
    assert tiled.memory["vae_work_space"] == 0.0 and tiled_tier.peak == max(tiled_tier.text, tiled_tier.denoise)
    assert "VAE work space not estimated (video.vae_tiling)" in report.format_plan(tiled)


@pytest.mark.parametrize("free_gib, expected", [
    (24, MemorySetting("blocks", "bf16", "sequential")),  # blocks + batch 2 needs 22.2 GiB, above 90% of 24
    (48, MemorySetting("none", "bf16", "sequential")),  # 40.2 GiB (text stage); the guided batch of 2 needs 47.6
    (80, MemorySetting("none", "bf16", "sequential")),  # 85,680 tokens per sample: sequential is the faster here
    (141, MemorySetting("none", "bf16", "sequential")),
])
def test_auto_picks_the_fastest_tier_that_fits(free_gib, expected):
    plan = plan_14b(free_gib)
    assert plan.memory_setting == expected
    chosen = next(t for t in plan.memory_tiers if t.setting == expected)
    usable = free_gib * (1 - planning.FIT_MARGIN)
    assert chosen.peak <= usable and plan.memory["peak_estimate"] == chosen.peak
    faster = plan.memory_tiers[:plan.memory_tiers.index(chosen)]
    assert all(t.peak > usable for t in faster)
    text = report.format_plan(plan, all_tiers=True)
    rows = tier_lines(text)
    assert len(rows) == 12  # 3 offloads x 2 weights x 2 guidance modes on a GPU
    marked = [row for row in rows if row.endswith("<- chosen")]
    assert marked == [row for row in rows if row.split()[:3] == [expected.offload, expected.weights,
                                                                    expected.guidance]]
    assert f"{usable:.1f} GiB of {free_gib:.1f} GiB free usable" in text
    for row, tier in zip(rows, plan.memory_tiers):
        assert row.split()[:4] == [tier.setting.offload, tier.setting.weights, tier.setting.guidance,
                                   f"{tier.peak:.1f}"]
        assert ("too large" in row) == (tier.peak > usable) != ("fits" in row)


def test_the_recalibrated_estimate_meets_the_measured_peaks():
    """docs/benchmarks.md (the memory estimate after the fusions), H200: a bf16 batch-1 forward peaked
    at 36.89 GiB, the denoising stage of a bf16 batch-2 edit at 46.39 GiB, an fp8 batch-1 forward at 24.63."""
    plan = plan_14b(None)
    tiers = {t.setting: t for t in plan.memory_tiers}
    batch2 = tiers[MemorySetting()]
    batch1 = tiers[MemorySetting("model", "bf16", "sequential")]  # the DiT alone on the GPU, batch 1
    fp8 = tiers[MemorySetting("model", "fp8", "sequential")]
    assert abs(batch1.dit["peak"] - 36.89) < 0.1
    assert 0 <= batch2.denoise - 46.39 < 1.3  # the per-sample term of the earlier fit, on the safe side
    assert 0 <= fp8.dit["peak"] - 24.63 < 0.25  # the fit of fp8's unfused GELU, on the safe side


def test_no_tier_that_fits_is_refused_naming_the_smallest_and_the_free_memory():
    smallest = min(plan_14b(None).memory_tiers, key=lambda t: t.peak)
    with pytest.raises(ConfigError) as error:
        plan_14b(8)
    message = str(error.value)
    assert "\n" not in message
    assert f"the smallest, {smallest.setting.describe()}, needs about {smallest.peak:.1f} GiB" in message
    assert "and 8.0 GiB are free" in message


def test_values_set_under_auto_are_kept_and_manual_takes_them_as_given():
    assert plan_14b(48, ["memory.offload=blocks"]).memory_setting == MemorySetting("blocks", "bf16", "sequential")
    assert plan_14b(80, ["memory.weights=fp8"]).memory_setting == MemorySetting("none", "fp8", "sequential")
    assert plan_14b(141, ["memory.guidance=batch"]).memory_setting == MemorySetting("none", "bf16", "batch")
    manual = plan_14b(24, ["memory.profile=manual", "memory.guidance=sequential"])
    assert manual.memory_setting == MemorySetting("none", "bf16", "sequential")
    assert any("may run out of GPU memory" in w for w in manual.warnings)
    assert plan_14b(None).memory_setting == MemorySetting(guidance="sequential")  # free memory unknown: the fastest


@pytest.mark.parametrize("frames, height, width, first", [
    (17, 480, 832, "batch"),  # 15,600 tokens per sample: one batch of 2 measured faster on the H200
    (41, 480, 832, "sequential"),  # 34,320 tokens: two batch-1 passes measured faster
    (81, 544, 960, "sequential"),  # 85,680 tokens
])
def test_the_guidance_order_follows_the_tokens_per_sample(frames, height, width, first):
    cfg = load_config("inference.yaml", ["device=cuda", f"video.size=[{height},{width}]"])
    plan = planning.make_plan(cfg, shaped_source(frames, height, width), None)
    tokens_per_sample = plan.target_tokens + plan.source_tokens
    assert (tokens_per_sample >= planning.SEQUENTIAL_GUIDANCE_MIN_TOKENS) == (first == "sequential")
    second = {"batch": "sequential", "sequential": "batch"}[first]
    assert [t.setting.guidance for t in plan.memory_tiers] == [first, second] * 6
    assert plan.memory_setting == MemorySetting("none", "bf16", first)
    no_cfg = planning.make_plan(load_config("inference.yaml", ["device=cuda", f"video.size=[{height},{width}]",
                                                               "sampler.guidance=1.0"]),
                                shaped_source(frames, height, width), None)
    assert no_cfg.memory_setting == MemorySetting()  # without CFG both modes run one batch-1 pass: batch first


def test_auto_on_the_cpu_is_the_fastest_tier_and_blocks_are_not_listed():
    plan = planning.make_plan(load_config("inference.yaml", ["device=cpu"]), shaped_source(81, 544, 960))
    assert plan.memory_setting == MemorySetting("none", "bf16", "batch") and plan.free_gib is None
    assert {t.setting.offload for t in plan.memory_tiers} == {"none", "model"}
    assert "the CPU has no GPU memory limit" in plan.memory_reason


def test_auto_on_a_gpu_needs_a_plan():
    cfg = load_config(TINY, ["device=cuda"])
    with pytest.raises(ConfigError, match="memory.profile auto picks the tier from the edit's size"):
        planning.memory_setting_without_plan(cfg, torch.device("cuda"))
    manual = load_config(TINY, ["device=cuda", "memory.profile=manual", "memory.weights=fp8"])
    assert planning.memory_setting_without_plan(manual, torch.device("cuda")) == MemorySetting(weights="fp8")


def refuse_loading(monkeypatch):
    """Make any loading of a network fail the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("nothing may load before the refusal")

    monkeypatch.setattr(components, "load_components", refuse)
    monkeypatch.setattr(pipeline, "load_components", refuse)


@pytest.mark.parametrize("overrides, reason", [
    (["memory.offload=disk"], "memory.offload must be one of none, model, blocks"),
    (["memory.guidance=interleaved"], "memory.guidance must be one of batch, sequential"),
    (["memory.profile=fast"], "memory.profile must be one of auto, manual"),
    (["device=cpu", "memory.offload=blocks"], "memory.offload blocks streams the DiT's blocks to a CUDA GPU; "
                                              "the device here is cpu"),
    (["device=cuda"], "no memory tier fits the GPU: the smallest, offload model, weights bf16, guidance batch, "
                      "needs about 38.8 MiB and 1.0 MiB are free"),  # the tiny umT5's 31.4 MiB and 23.5% work space
])
def test_the_cli_refuses_bad_memory_settings_before_loading(overrides, reason, monkeypatch, capsys, tmp_path):
    refuse_loading(monkeypatch)
    monkeypatch.setattr(planning, "free_gpu_bytes", lambda cfg: 2**20)  # 1 MiB: smaller than every tier
    if "device=cuda" in overrides:  # a GPU that this CPU machine does not have, as far as the CLI can tell
        monkeypatch.setattr(components, "resolve_device", lambda cfg: torch.device("cuda"))
    out = tmp_path / "edit.mp4"
    status = inference.main(["--config", TINY, "--input", ASSET, "--prompt", "snow", "--output", str(out),
                             "--quiet", *CLI_QUICK, *overrides])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and reason in lines[0], lines
    assert list(tmp_path.iterdir()) == []


def test_blocks_on_the_cpu_are_refused_by_the_loader_too(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("nothing may load before the refusal")

    monkeypatch.setattr(WanTextEncoder, "tiny", refuse)
    with pytest.raises(ConfigError, match="memory: offload 'blocks' streams the DiT's blocks to a CUDA GPU"):
        EditingPipeline.load(load_config(TINY, QUICK), progress=False, memory=MemorySetting("blocks"))


def guided_velocities(guidance: str):
    """The guided velocity at every timestep of the schedule on the same noise, and the DiT's batch sizes."""
    pipe = EditingPipeline.load(load_config(TINY, QUICK + ["sampler.steps=4"]), progress=False,
                                memory=MemorySetting(guidance=guidance))
    velocities, batches = [], []
    forward = pipe.dit.forward

    def every_timestep(self, velocity, noise, callback=None):
        velocities.extend(velocity(noise, t) for t in self.timesteps)
        return noise

    def counting(x, *args, **kwargs):
        batches.append(x.shape[0])
        return forward(x, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(scheduler.FlowUniPCSampler, "sample", every_timestep)
        patch.setattr(pipe.dit, "forward", counting)
        pipe.edit(tiny_source(), "make it snow", progress=False)
    return torch.stack(velocities), batches


def test_sequential_guidance_equals_the_batched_one():
    batched, batch_sizes = guided_velocities("batch")
    sequential, sequential_sizes = guided_velocities("sequential")
    assert batch_sizes == [2] * 4 and sequential_sizes == [1] * 8
    assert batched.dtype == torch.float32 and batched.shape[0] == 4
    error = (sequential - batched).abs().max() / batched.abs().max()
    assert error <= SEQUENTIAL_BOUND, error


def test_offload_model_on_the_cpu_gives_the_same_edit_and_moves_each_network(monkeypatch):
    cfg = load_config(TINY, QUICK)
    source = tiny_source()
    reference = EditingPipeline.load(cfg, progress=False).edit(source, "make it snow", progress=False)
    moved = []
    real_on_device = pipeline.on_device

    def recording(module, device):
        moved.append(type(module).__name__)
        return real_on_device(module, device)

    monkeypatch.setattr(pipeline, "on_device", recording)
    pipe = EditingPipeline.load(cfg, progress=False, memory=MemorySetting("model"))
    result = pipe.edit(source, "make it snow", progress=False)
    assert moved == ["UMT5EncoderModel", "AutoencoderKLWan", "WanDiT", "AutoencoderKLWan"]
    assert np.array_equal(result.video, reference.video)
    assert result.plan.memory_setting == MemorySetting("model")
    assert "memory      offload model, weights bf16, guidance batch" in report.format_summary(result, [])


def test_fp8_weights_are_applied_by_the_loader():
    cfg = load_config(TINY, QUICK + ["model.dtype=bfloat16"])
    pipe = EditingPipeline.load(cfg, progress=False, memory=MemorySetting("model", "fp8"))
    layers = [m for m in pipe.dit.modules() if isinstance(m, Fp8Linear)]
    assert len(layers) == 20 and pipe.dit.compute_dtype == torch.bfloat16  # 10 matrices in each of 2 blocks
    result = pipe.edit(tiny_source(), "make it snow", progress=False)
    assert result.video.shape == (5, 32, 48, 3)


@pytest.mark.parametrize("owner, name, stage, advice", [
    (WanDiT, "forward", "denoising", "memory.guidance=sequential, memory.weights=fp8, a shorter clip"),
    (WanVAE, "decode", "decoding the edit", "video.vae_tiling=true, memory.offload=model, a shorter clip"),
])
def test_out_of_memory_names_the_stage_and_writes_nothing(owner, name, stage, advice, monkeypatch, capsys, tmp_path):
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(owner, name, out_of_memory)
    out = tmp_path / "edit.mp4"
    status = inference.main(["--config", TINY, "--input", ASSET, "--prompt", "snow", "--output", str(out),
                             "--quiet", *CLI_QUICK])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 1 and len(lines) == 1, lines
    assert lines[0] == (f"inference.py: error: the GPU ran out of memory while {stage}; try {advice} (--max-frames) "
                        "or a smaller video.size; nothing was written")
    assert list(tmp_path.iterdir()) == []


def test_the_dry_run_lists_every_tier_and_marks_the_choice(capsys):
    status = inference.main(["--config", TINY, "--input", ASSET, "--prompt", "snow", "--dry-run", *CLI_QUICK,
                             "memory.guidance=sequential"])
    text = capsys.readouterr().out
    rows = tier_lines(text)
    assert status == 0 and len(rows) == 8  # the CPU: offload none and model, 2 weights, 2 guidance modes
    assert [row.split()[:3] for row in rows if row.endswith("<- chosen")] == [["none", "bf16", "sequential"]]
    assert "memory      offload none, weights bf16, guidance sequential: about" in text
