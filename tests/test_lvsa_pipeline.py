"""Long-Video Sparse Attention in the editing pipeline: the "lvsa" method in the DiT, its config
section, the plan and summary text, and the CLI on a 161-frame clip (41 latent frames)."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import inference
from assets.make_demo_video import draw_frame
from in_context_sparse_attention import ISAConfig
from long_video_sparse_attention import LVSAConfig, lvsa_frame_mask, token_frame_index
from model import WanDiT
from wanx import planning, report
from wanx.attention import LVSAAttention, LVSAOptions, TokenLayout, attention_names, make_attention
from wanx.config import ConfigError, attention_options, load_config
from wanx.pipeline import EditingPipeline, SourceVideo
from wanx.video import read_video, write_video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
# 161 frames -> 41 latent frames; 16 x 32 pixels -> a 2 x 4 latent -> 1 x 2 tokens per frame
LONG = ["sampler.steps=2", "video.max_frames=161", "video.size=[16,32]"]


class RecordingLVSA(LVSAAttention):
    """The lvsa method, keeping every call's q, k, v, layout and output."""

    def __init__(self, options=None):
        super().__init__(options)
        self.calls = []

    def __call__(self, q, k, v, layout, gate=None):
        out = super().__call__(q, k, v, layout, gate)
        self.calls.append((q, k, v, layout, out))
        return out


def dit_inputs(latent_frames: int, height: int = 4, width: int = 4):
    """Latent, source latent, timestep and text context for the tiny DiT: 16 channels,
    `latent_frames` frames of height x width latent pixels ((height / 2) * (width / 2) tokens per frame)."""
    generator = torch.Generator().manual_seed(0)
    shape = (1, 16, latent_frames, height, width)
    return (torch.randn(shape, generator=generator), torch.randn(shape, generator=generator), torch.tensor([700.0]),
            [torch.randn(5, 32, generator=generator)])


def masked_attention(q, k, v, frame_mask, tokens_per_frame):
    """Dense SDPA in float64 with the token mask of `frame_mask` over [target | source]: the expected LVSA output."""
    frames = token_frame_index(frame_mask.shape[0], tokens_per_frame, parts=2)
    mask = frame_mask[frames][:, frames]
    out = F.scaled_dot_product_attention(*(x.double().transpose(1, 2) for x in (q, k, v)), attn_mask=mask)
    return out.transpose(1, 2).to(q.dtype)


def shaped_source(frames: int, height: int, width: int) -> SourceVideo:
    """A source of the given working shape whose values are never read (planning looks at shapes only)."""
    video = torch.zeros(3, 1, 1, 1).expand(3, frames, height, width)
    return SourceVideo(path="memory", video=video, fps=16.0, frames_read=frames, source_size=(height, width))


@torch.no_grad()
@pytest.mark.parametrize("latent_frames", [1, 7, 21])
def test_lvsa_equals_dense_up_to_21_latent_frames(latent_frames):
    model = WanDiT.tiny()
    inputs = dit_inputs(latent_frames)
    dense = model(*inputs, step=0)
    model.set_attention("lvsa")
    for step in (0, 1, 2):
        torch.testing.assert_close(model(*inputs, step=step), dense, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_lvsa_beyond_21_latent_frames_is_sparse_and_each_layer_matches_masked_attention():
    model = WanDiT.tiny()
    inputs = dit_inputs(41)
    dense = model(*inputs, step=1)
    method = RecordingLVSA()
    model.set_attention(method)
    sparse = model(*inputs, step=1)
    assert (sparse - dense).abs().max() > 1e-3
    assert len(method.calls) == model.config.num_layers
    frame_mask = lvsa_frame_mask(41, 1, LVSAConfig())
    assert not frame_mask.all()
    for q, k, v, layout, out in method.calls:
        assert layout == TokenLayout(target_len=41 * 4, grids=((41, 2, 2), (41, 2, 2)), step=1)
        torch.testing.assert_close(out, masked_attention(q, k, v, frame_mask, 4), rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_the_denoising_step_reaches_the_method_and_rotates_the_keyframes():
    model = WanDiT.tiny()
    inputs = dit_inputs(41, 2, 2)  # keyframe interval 3 at 41 frames
    model.set_attention("lvsa")
    step0, step1, step3 = (model(*inputs, step=s) for s in (0, 1, 3))
    assert (step1 - step0).abs().max() > 1e-4  # the keyframes moved
    torch.testing.assert_close(step3, step0, rtol=0, atol=0)  # the pattern repeats every 3 steps
    torch.testing.assert_close(model(*inputs), step0, rtol=0, atol=0)  # no step: step 0
    model.set_attention("lvsa", LVSAConfig(rotate=False))
    torch.testing.assert_close(model(*inputs, step=1), model(*inputs, step=0), rtol=0, atol=0)


@torch.no_grad()
def test_the_sampler_passes_steps_0_to_n_minus_1():
    pipe = EditingPipeline.load(load_config(TINY, ["sampler.steps=3", "video.size=[16,32]",
                                                   "attention.backend=lvsa"]), progress=False)
    method = RecordingLVSA()
    pipe.dit.set_attention(method)
    frames = np.zeros((5, 16, 32, 3), np.uint8)
    pipe.edit(SourceVideo.from_frames(pipe.cfg, frames), "x", progress=False)
    layers = pipe.dit.config.num_layers
    assert [layout.step for _, _, _, layout, _ in method.calls] == [s for s in range(3) for _ in range(layers)]


def test_method_options_and_refusals():
    assert "lvsa" in attention_names()
    method = make_attention("lvsa")
    assert not method.uses_gate and method.config == LVSAConfig() and method.kernel == "auto"
    method = make_attention("lvsa", LVSAConfig(window=2))
    assert method.config.window == 2 and method.kernel == "auto"
    method = make_attention("lvsa", LVSAOptions(LVSAConfig(window=1), kernel="flex"))
    assert (method.config.window, method.kernel) == (1, "flex") and "LVSA" in method.describe()
    with pytest.raises(TypeError, match="LVSAConfig or an LVSAOptions, got ISAConfig"):
        make_attention("lvsa", ISAConfig())
    with pytest.raises(ValueError, match="kernel must be one of 'auto', 'flex', 'torch', 'gather', got 'cuda'"):
        LVSAOptions(kernel="cuda")
    q = torch.randn(1, 2 * 4 * 3, 1, 8)
    with pytest.raises(ValueError, match="one token grid"):
        make_attention("lvsa")(q, q, q, TokenLayout(target_len=12, grids=((4, 1, 3), (2, 2, 3))))
    with pytest.raises(ValueError, match="target_len"):
        make_attention("lvsa")(q, q, q, TokenLayout(target_len=11, grids=((4, 1, 3), (4, 1, 3))))


def test_config_section_builds_the_options():
    cfg = load_config(TINY, ["attention.backend=lvsa", "attention.lvsa.window=2", "attention.lvsa.keyframe_interval=4",
                             "attention.lvsa.sparsity_scale=2", "attention.lvsa.rotate=false",
                             "attention.lvsa.kernel=torch"])
    expected = LVSAConfig(window=2, keyframe_interval=4, sparsity_scale=2.0, rotate=False)
    assert attention_options(cfg) == LVSAOptions(expected, kernel="torch")
    assert load_config(None).attention.lvsa.keyframe_interval is None
    assert attention_options(load_config(None, ["attention.backend=lvsa"])) == LVSAOptions()
    assert attention_options(load_config(None, ["attention.backend=triton"])) == ISAConfig()
    assert attention_options(load_config(None, ["attention.backend=dense"])) is None
    assert load_config("inference.yaml").attention.lvsa == load_config(None).attention.lvsa  # the file's = schema's


@pytest.mark.parametrize("override, message", [
    ("attention.lvsa.window=-1", "attention.lvsa: LVSAConfig.window must be an int >= 0, got -1"),
    ("attention.lvsa.first_frames=-2", "LVSAConfig.first_frames must be an int >= 0"),
    ("attention.lvsa.reference_frames=0", "LVSAConfig.reference_frames must be an int >= 1"),
    ("attention.lvsa.sparsity_scale=0", "LVSAConfig.sparsity_scale must be a finite number > 0"),
    ("attention.lvsa.sparsity_scale=.nan", "LVSAConfig.sparsity_scale must be a finite number > 0"),
    ("attention.lvsa.keyframe_interval=0", "LVSAConfig.keyframe_interval must be None"),
    ("attention.lvsa.keyframe_interval=1.5", "attention.lvsa.keyframe_interval must be an integer"),
    ("attention.lvsa.rotate=yes", "attention.lvsa.rotate must be true or false"),
    ("attention.lvsa.kernel=cuda", "attention.lvsa.kernel must be one of auto, flex, torch, gather, got 'cuda'"),
    ("attention.lvsa.windw=2", "unknown key 'attention.lvsa.windw'"),
    ("attention.lvsa=3", "attention.lvsa must be a section"),
    ("attention.backend=lvsb", "choose one of dense, torch, triton, tilelang, lvsa"),
])
def test_config_refusals_are_one_line(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(TINY, [override])
    assert "\n" not in str(info.value)


def test_statistics_of_41_latent_frames():
    """docs/lvsa.md: kfi 3; 21 frames per query frame at step 0, 22 at step 1 (odd offsets miss frame 0)."""
    stats = planning.lvsa_statistics(41, 2, LVSAConfig())
    assert (stats["frames"], stats["interval"], stats["automatic"]) == (41, 3, True)
    assert (stats["attended_min"], stats["attended_max"]) == (21, 22)
    assert stats["share_step0"] == pytest.approx(21 / 41)
    assert stats["share"] == pytest.approx((21 + 22) / 82)
    assert not stats["dense"]
    still = planning.lvsa_statistics(41, 32, LVSAConfig(rotate=False))
    assert still["share"] == still["share_step0"] == pytest.approx(21 / 41)
    assert planning.lvsa_statistics(21, 32, LVSAConfig())["dense"]


def test_plan_shows_the_pattern_and_the_flops():
    cfg = load_config("inference.yaml", ["video.size=[544,960]", "attention.backend=lvsa", "sampler.steps=1"])
    plan = planning.make_plan(cfg, shaped_source(161, 544, 960))
    assert plan.lvsa == LVSAOptions() and plan.isa is None and plan.warnings == []
    assert plan.flops_run == pytest.approx(plan.flops_dense * 21 / 41)
    text = report.format_plan(plan)
    assert "41 latent frames, keyframe interval 3 (automatic)" in text
    assert "each query frame attends to 21 of 41 frames" in text
    assert "attended share 0.512 averaged over the 1 steps' masks" in text
    assert " 0 AwwAwwAwwAw.A..A..A..A..A..A..A..A..A..A. 21" in text
    assert "40 A..A..A..A..A..A..A..A..A..A..AwwAwwAwwAw 21" in text

    long = report.format_plan(planning.make_plan(cfg, shaped_source(321, 544, 960)))
    rows = [line.split()[0] for line in long.splitlines() if line.startswith("            ")]
    assert rows == ["0", "1", "...", "39", "40", "...", "79", "80"]


@pytest.mark.parametrize("backend, frames, warned", [
    ("dense", 161, True), ("tilelang", 85, True), ("torch", 81, False), ("lvsa", 161, False),
])
def test_warning_beyond_the_training_length(backend, frames, warned):
    cfg = load_config("inference.yaml", ["video.size=[64,64]", f"attention.backend={backend}"])
    text = report.format_plan(planning.make_plan(cfg, shaped_source(frames, 64, 64)))
    warning = "beyond the 81-frame training length; consider attention.backend=lvsa"
    assert (f"warning     {frames} frames" in text and warning in text) == warned


@pytest.fixture(scope="module")
def long_input(tmp_path_factory) -> str:
    """A 161-frame clip of the demo scene at 32 x 64 pixels."""
    path = str(tmp_path_factory.mktemp("long") / "long.mp4")
    write_video(path, np.stack([draw_frame(k, 161, 32, 64) for k in range(161)]), fps=16)
    return path


def test_dry_run_shows_the_keyframe_interval_and_the_mask(long_input, capsys):
    status = inference.main(["--config", TINY, "--input", long_input, "--prompt", "x", "--dry-run",
                             "--backend", "lvsa", *LONG])
    stdout = capsys.readouterr().out
    assert status == 0
    assert "latent      [16, 41, 2, 4]" in stdout
    assert "keyframe interval 3 (automatic)" in stdout and "LVSA (kernel torch, picked by auto)" in stdout
    assert " 1 AwwAwwAwwAw.A..A..A..A..A..A..A..A..A..A. 21" in stdout
    assert "warning" not in stdout


def test_dry_run_warns_dense_attention_on_a_long_clip(long_input, capsys):
    status = inference.main(["--config", TINY, "--input", long_input, "--prompt", "x", "--dry-run",
                             "attention.backend=dense", *LONG])
    assert status == 0
    assert ("warning     161 frames (41 latent) with 'dense' attention: beyond the 81-frame training length; "
            "consider attention.backend=lvsa") in capsys.readouterr().out


def test_cli_edits_a_161_frame_clip_with_lvsa(long_input, tmp_path):
    out = tmp_path / "edit.mp4"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "inference.py"), "--config", TINY,
                             "--input", long_input, "--prompt", "make it snow", "--output", str(out), "--quiet",
                             "attention.backend=lvsa", *LONG], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    frames, fps = read_video(out)
    assert frames.shape == (161, 16, 32, 3) and fps == 16
    assert "attention   LVSA, torch kernel; 41 latent frames, keyframe interval 3" in result.stdout
