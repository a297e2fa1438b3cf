"""The editing pipeline in process: configuration, plan arithmetic, CFG batching, determinism."""
import numpy as np
import pytest
import torch

import scheduler
from in_context_sparse_attention import ISAConfig
from wanx import components, pipeline, planning, report
from wanx.config import WAN_NEGATIVE_PROMPT, ConfigError, isa_config, load_config
from wanx.pipeline import EditingPipeline
from wanx.planning import attention_flops

ROOT_TINY = "configs/tiny.yaml"
QUICK = ["sampler.steps=2", "video.size=[32,48]"]


def tiny_source(frames: int = 5, height: int = 40, width: int = 64) -> pipeline.SourceVideo:
    """Random uint8 frames made into a source at the tiny QUICK config's working size (32 x 48)."""
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, size=(frames, height, width, 3), dtype=np.uint8)
    return pipeline.SourceVideo.from_frames(load_config(ROOT_TINY, QUICK), video, fps=16.0)


def shaped_source(frames: int, height: int, width: int) -> pipeline.SourceVideo:
    """A source of the given working shape whose values are never read (planning looks at shapes only)."""
    video = torch.zeros(3, 1, 1, 1).expand(3, frames, height, width)
    return pipeline.SourceVideo(path="memory", video=video, fps=16.0, frames_read=frames, source_size=(height, width))


def test_defaults_are_the_papers():
    cfg = load_config("inference.yaml")
    assert (cfg.sampler.steps, cfg.sampler.shift, cfg.sampler.guidance, cfg.sampler.seed) == (32, 6.0, 2.5, 42)
    assert cfg.attention.backend == "tilelang"
    assert isa_config(cfg) == ISAConfig()
    assert cfg.negative_prompt == WAN_NEGATIVE_PROMPT and cfg.negative_prompt.startswith("色调艳丽")
    assert cfg.model.vae.endswith("Wan2.2-T2V-A14B/Wan2.1_VAE.pth")  # interpolation resolved
    assert cfg.video.max_frames == 81 and cfg.video.fps == 16


@pytest.mark.parametrize("override, message", [
    ("sampler.stepz=3", "bad configuration"),
    ("sampler.steps=abc", "bad configuration"),
    ("attention.backend=flash", "unknown attention backend"),
    ("attention.sparsity=0", "attention: ISAConfig.sparsity"),
    ("video.size=[30,48]", "multiples of 16"),
    ("model.kind=huge", "model.kind"),
    ("device=tpu", "device"),
    ("steps", "key=value"),
])
def test_config_refuses(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT_TINY, [override])


def test_settings_take_values_verbatim():
    cfg = load_config(ROOT_TINY, ["negative_prompt=a"], {"negative_prompt": "no: colons, [brackets] or =signs"})
    assert cfg.negative_prompt == "no: colons, [brackets] or =signs"


def test_working_size():
    cfg = load_config(None)
    assert planning.working_size(cfg, 1080, 1920) == (544, 960)
    assert planning.working_size(cfg, 1920, 1080) == (960, 544)
    assert planning.working_size(cfg, 500, 510) == (720, 720)
    assert planning.working_size(load_config(None, ["video.bucket_scale=0.25"]), 1080, 1920) == (128, 240)
    assert planning.working_size(load_config(None, ["video.size=[64,96]"]), 1080, 1920) == (64, 96)


def test_dense_flops_formula():
    assert attention_flops(1000, 500, 3, 64, None) == 4 * 1000 ** 2 * 64 * 3


def test_isa_flops_match_spec_estimate():
    """docs/isa.md: at S = 65,536, T = C, defaults, ISA needs about 3.3x fewer FLOPs."""
    dense = attention_flops(65536, 32768, 40, 128, None)
    isa = attention_flops(65536, 32768, 40, 128, ISAConfig())
    assert 3.2 < dense / isa < 3.4


def test_isa_keeping_everything_costs_dense_plus_compression():
    config = ISAConfig(select_ratio=1.0, flat_ratio=1.0)
    s, b, d = 64 * 20, 64, 32
    expected = 4 * s * s * d + 4 * (s // b) ** 2 * d
    assert attention_flops(s, s // 2, 1, d, config) == expected


def test_isa_statistics():
    stats = planning.isa_statistics(65536, 32768, ISAConfig())
    assert stats["blocks"] == 1024
    assert stats["full_query_blocks"] == 512 and stats["full_query_share"] == 0.5
    assert stats["source_candidates"] == 512 and stats["source_kept"] == 64
    assert stats["kv_blocks"] == 576 and stats["exact_blocks"] == 36


def test_plan_of_the_real_model_loads_nothing():
    cfg = load_config("inference.yaml", ["video.size=[544,960]"])
    plan = planning.make_plan(cfg, shaped_source(81, 544, 960))
    assert plan.latent_shape == (16, 21, 68, 120)
    assert plan.target_tokens == plan.source_tokens == 21 * 34 * 60
    assert (plan.num_layers, plan.heads, plan.head_dim, plan.batch) == (40, 40, 128, 2)
    assert 25 < plan.memory["dit_weights"] < 28  # 14.3 B parameters in bf16, GiB
    assert plan.flops_dense / plan.flops_run > 3


@pytest.fixture(scope="module")
def tiny_pipe():
    return EditingPipeline.load(load_config(ROOT_TINY, QUICK), progress=False)


def test_tiny_edit_shapes_and_determinism(tiny_pipe):
    source = tiny_source()
    first = tiny_pipe.edit(source, "make it snow", progress=False)
    second = tiny_pipe.edit(source, "make it snow", progress=False)
    assert first.video.shape == first.source.shape == (5, 32, 48, 3)
    assert first.video.dtype == np.uint8
    assert np.array_equal(first.video, second.video)
    assert first.backend == "torch"
    assert set(first.timings) == {"load", "preprocess", "text", "vae_encode", "denoise", "vae_decode"}
    summary = report.format_summary(first, ["out.mp4"])
    assert "ISA, torch backend" in summary and "of source blocks kept" in summary


def test_seed_changes_the_result():
    a = EditingPipeline.load(load_config(ROOT_TINY, QUICK + ["sampler.seed=1"]), progress=False)
    b = EditingPipeline.load(load_config(ROOT_TINY, QUICK + ["sampler.seed=2"]), progress=False)
    source = tiny_source()
    assert not np.array_equal(a.edit(source, "x", progress=False).video, b.edit(source, "x", progress=False).video)


def test_cfg_runs_one_batch_of_two_per_step(tiny_pipe, monkeypatch):
    """Cond and uncond share one DiT call; the guided velocity is uncond + g (cond - uncond)."""
    calls, prompts, velocities = [], [], []
    encode = tiny_pipe.text_encoder.encode

    def record_prompts(batch):
        prompts.append(list(batch))
        return encode(batch)

    def fake_dit(latent, source_latent, timestep, context, step=None):
        calls.append((tuple(latent.shape), tuple(source_latent.shape), tuple(timestep.shape), len(context)))
        return torch.stack([torch.full_like(latent[0], 1.0), torch.full_like(latent[0], 3.0)])

    def one_step(self, velocity, noise, callback=None):
        velocities.append(velocity(noise, self.timesteps[0]))
        return noise

    monkeypatch.setattr(tiny_pipe.text_encoder, "encode", record_prompts)
    monkeypatch.setattr(tiny_pipe, "dit", fake_dit)
    monkeypatch.setattr(tiny_pipe.dit, "attention_backend", "torch", raising=False)
    monkeypatch.setattr(scheduler.FlowUniPCSampler, "sample", one_step)
    tiny_pipe.edit(tiny_source(), "make it snow", negative_prompt="blurry", progress=False)

    assert prompts == [["make it snow", "blurry"]]
    latent = (1, 16, 2, 4, 6)
    assert calls == [((2,) + latent[1:], latent, (2,), 2)]
    g = tiny_pipe.cfg.sampler.guidance
    assert torch.allclose(velocities[0], torch.full(latent, 3.0 + g * (1.0 - 3.0)))


def test_guidance_one_skips_the_unconditional_pass(monkeypatch):
    pipe = EditingPipeline.load(load_config(ROOT_TINY, QUICK + ["sampler.guidance=1.0"]), progress=False)
    shapes, prompts = [], []
    forward, encode = pipe.dit.forward, pipe.text_encoder.encode
    monkeypatch.setattr(pipe.dit, "forward", lambda x, *a, **kw: shapes.append(x.shape[0]) or forward(x, *a, **kw))
    monkeypatch.setattr(pipe.text_encoder, "encode", lambda p: prompts.append(list(p)) or encode(p))
    pipe.edit(tiny_source(), "x", progress=False)
    assert shapes == [1, 1] and prompts == [["x"]]


def test_empty_prompt_is_refused(tiny_pipe):
    with pytest.raises(ConfigError, match="empty"):
        tiny_pipe.edit(tiny_source(), "   ", progress=False)


def test_missing_weights_are_listed(tmp_path):
    cfg = load_config("inference.yaml", [f"model.wan_dir={tmp_path}", f"model.checkpoint={tmp_path}/c.bin"])
    problems = components.missing_weights(cfg)
    assert len(problems) == 4 and all("not found" in p for p in problems)
    with pytest.raises(ConfigError, match="model.checkpoint not found"):
        EditingPipeline.load(cfg, progress=False)


def test_tiny_checkpoint_round_trip(tmp_path):
    """A DiT saved as a .bin (with a prefix, as LIVEditor's) loads through model.checkpoint."""
    from model import WanDiT

    state = {"model." + k: v for k, v in WanDiT.tiny(seed=7).state_dict().items()}
    torch.save(state, tmp_path / "ckpt.bin")
    pipe = EditingPipeline.load(load_config(ROOT_TINY, QUICK + [f"model.checkpoint={tmp_path}/ckpt.bin"]),
                                progress=False)
    reference = WanDiT.tiny(seed=7)
    for key, value in reference.state_dict().items():
        assert torch.equal(pipe.dit.state_dict()[key], value), key


def test_side_by_side():
    left = np.zeros((2, 4, 6, 3), np.uint8)
    right = np.full((2, 4, 6, 3), 255, np.uint8)
    both = pipeline.side_by_side(left, right)
    assert both.shape == (2, 4, 12, 3) and both[:, :, :6].max() == 0 and both[:, :, 6:].min() == 255
    with pytest.raises(ValueError):
        pipeline.side_by_side(left, right[:, :2])


def test_a_prompt_of_invisible_characters_is_refused_by_the_pipeline_too(tiny_pipe):
    with pytest.raises(ConfigError, match="empty"):
        tiny_pipe.edit(tiny_source(), "\u200b\ufe0f\u3164", progress=False)
