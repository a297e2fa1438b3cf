"""inference.py as users run it: a subprocess on the tiny config, its dry run and its refusals."""
import os
import signal
import subprocess
import sys
import time

import pytest

import inference
from wanx.video import read_video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
ASSET = os.path.join(ROOT, "assets", "demo_input.mp4")
# Small and quick: 7 frames read, trimmed to 5 (4k+1), 32 x 48 pixels, 2 steps.
QUICK = ["sampler.steps=2", "video.max_frames=7", "video.size=[32,48]"]


def cli(*args, timeout=240):
    return subprocess.run([sys.executable, os.path.join(ROOT, "inference.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def error_line(result) -> str:
    """The reason: exactly one non-empty stderr line, in the CLI's format."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("inference.py: error: ")
    return lines[0]


def test_tiny_config_writes_mp4_with_expected_frames_and_size(tmp_path):
    out = tmp_path / "edit.mp4"
    result = cli("--config", TINY, "--input", ASSET, "--prompt", "make the ball yellow", "--output", str(out),
                 "--compare", "--quiet", *QUICK)
    assert result.returncode == 0, result.stderr
    frames, fps = read_video(out)
    assert frames.shape == (5, 32, 48, 3)
    assert fps == 16
    side, _ = read_video(tmp_path / "edit_compare.mp4")
    assert side.shape == (5, 32, 96, 3)
    assert "RANDOM weights" in result.stdout
    assert "ISA, torch backend" in result.stdout
    assert sorted(os.listdir(tmp_path)) == ["edit.mp4", "edit_compare.mp4"]  # no temporary files left


def test_dry_run_subprocess_prints_plan_and_writes_nothing(tmp_path):
    out = tmp_path / "edit.mp4"
    result = cli("--input", ASSET, "--prompt", "make it snow", "--output", str(out), "--dry-run")
    assert result.returncode == 0, result.stderr
    for needle in ("frames      33", "960x544", "tokens      18360 target + 18360 source", "ISA (tilelang)",
                   "fewer", "memory", "nothing loaded"):
        assert needle in result.stdout
    assert not out.exists()


def test_dry_run_loads_nothing(tmp_path, monkeypatch, capsys):
    """The real config, with weight files present: not one loader or tensor reader runs."""
    # Libraries bind `from safetensors import safe_open` when first imported: import them
    # before the patch below, so that no later test inherits the refusing stand-in.
    import diffusers.models.model_loading_utils  # noqa: F401
    import safetensors
    import torch
    import transformers.modeling_utils  # noqa: F401

    from model import WanDiT
    from wanx import dit_loader, t5, vae

    wan = tmp_path / "wan"
    (wan / "google" / "umt5-xxl").mkdir(parents=True)
    for name in ("Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth"):
        (wan / name).write_bytes(b"not touched")
    ckpt = tmp_path / "liveditor_ckpt.bin"
    ckpt.write_bytes(b"not touched")

    def refuse(*args, **kwargs):
        raise AssertionError("--dry-run must not load weights")

    monkeypatch.setattr(dit_loader, "load_dit", refuse)
    monkeypatch.setattr(vae.WanVAE, "from_checkpoint", refuse)
    monkeypatch.setattr(vae.WanVAE, "tiny", refuse)
    monkeypatch.setattr(t5.WanTextEncoder, "from_wan_checkpoint", refuse)
    monkeypatch.setattr(t5.WanTextEncoder, "tiny", refuse)
    monkeypatch.setattr(WanDiT, "tiny", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(safetensors, "safe_open", refuse)
    monkeypatch.setattr(dit_loader, "safe_open", refuse)

    status = inference.main(["--input", ASSET, "--prompt", "make it snow", "--checkpoint", str(ckpt),
                             "--output", str(tmp_path / "out.mp4"), "--dry-run", f"model.wan_dir={wan}"])
    stdout = capsys.readouterr().out
    assert status == 0
    assert f"model.checkpoint: {ckpt} (found)" in stdout
    assert f"model.vae: {wan}/Wan2.1_VAE.pth (found)" in stdout
    assert not (tmp_path / "out.mp4").exists()


def test_config_override_and_flags(capsys):
    status = inference.main(["--config", TINY, "--input", ASSET, "--prompt", "x", "--dry-run", "--steps", "3",
                             "--guidance", "1.0", "video.size=[64,96]", "attention.backend=dense"])
    stdout = capsys.readouterr().out
    assert status == 0
    assert "-> 96x64" in stdout  # the override
    assert "3 steps x batch 1 (no CFG)" in stdout  # the flags
    assert "attention   dense" in stdout


def test_flags_override_key_value_overrides(capsys):
    status = inference.main(["--config", TINY, "--input", ASSET, "--prompt", "x", "--dry-run",
                             "--backend", "torch", "attention.backend=dense"])
    assert status == 0
    assert "ISA (torch)" in capsys.readouterr().out


@pytest.fixture
def not_a_video(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("this is text, not a video\n")
    return path


# case: (flags replacing the defaults, key=value overrides, the reason expected on stderr)
BAD_CASES = {
    "missing input": ({"--input": "/nonexistent/in.mp4"}, [], "input video not found"),
    "input is a folder": ({"--input": "{tmp}"}, [], "input is not a file"),
    "not a video": ({"--input": "{not_a_video}"}, [], "cannot read video"),
    "empty prompt": ({"--prompt": "  "}, [], "the prompt is empty"),
    "unknown backend": ({"--backend": "flash"}, [], "unknown backend 'flash'"),
    "unknown backend in config": ({}, ["attention.backend=flash"], "unknown attention backend 'flash'"),
    "unknown config key": ({}, ["sampler.stepz=4"], "bad configuration"),
    "wrong config type": ({}, ["sampler.steps=many"], "bad configuration"),
    "missing checkpoint": ({"--checkpoint": "/nonexistent/liveditor_ckpt.bin"}, [], "checkpoint not found"),
    "missing config": ({"--config": "/nonexistent/cfg.yaml"}, [], "config file not found"),
    "bad flag value": ({"--steps": "many"}, [], "invalid int value"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_exits_nonzero_with_one_line_and_no_output(case, tmp_path, not_a_video):
    flags, overrides, reason = BAD_CASES[case]
    out = tmp_path / "out.mp4"
    args = {"--config": TINY, "--input": ASSET, "--prompt": "make it snow", "--output": str(out)}
    args.update({k: v.format(tmp=tmp_path, not_a_video=not_a_video) for k, v in flags.items()})
    result = cli(*[x for kv in args.items() for x in kv], "--quiet", *QUICK, *overrides)
    assert result.returncode != 0
    assert reason in error_line(result)
    assert not out.exists()
    assert not [f for f in os.listdir(tmp_path) if f != not_a_video.name]


def test_missing_weights_of_real_config(tmp_path):
    out = tmp_path / "out.mp4"
    result = cli("--input", ASSET, "--prompt", "make it snow", "--output", str(out),
                 f"model.wan_dir={tmp_path}/absent", f"model.checkpoint={tmp_path}/absent.bin")
    assert result.returncode == 2
    assert "model.checkpoint not found" in error_line(result)
    assert not out.exists()


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "out.mp4"
    out.write_bytes(b"keep me")
    result = cli("--config", TINY, "--input", ASSET, "--prompt", "x", "--output", str(out), *QUICK)
    assert result.returncode == 2
    assert "output exists" in error_line(result)
    assert out.read_bytes() == b"keep me"


def test_existing_compare_output_needs_overwrite(tmp_path):
    (tmp_path / "out_compare.mp4").write_bytes(b"keep me")
    result = cli("--config", TINY, "--input", ASSET, "--prompt", "x", "--output", str(tmp_path / "out.mp4"),
                 "--compare", *QUICK)
    assert "output exists" in error_line(result)
    assert not (tmp_path / "out.mp4").exists()


def test_ctrl_c_leaves_no_file(tmp_path):
    out = tmp_path / "out.mp4"
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "inference.py"), "--config", TINY, "--input", ASSET, "--prompt", "x",
         "--output", str(out), "--compare", "--quiet", "sampler.steps=1000", "video.max_frames=5",
         "video.size=[32,48]"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if "RANDOM weights" in line:
                break
        time.sleep(3.0)  # into loading or denoising
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "interrupted: no output written" in stderr
    assert os.listdir(tmp_path) == []


def test_interrupt_while_writing_removes_what_was_written(tmp_path, monkeypatch, capsys):
    """Ctrl-C between the edit and the side-by-side file: neither stays."""
    import wanx.video

    real_encode = wanx.video.encode_video
    calls = []

    def encode_then_interrupt(path, frames, fps=16):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_encode(path, frames, fps=fps)

    monkeypatch.setattr(wanx.video, "encode_video", encode_then_interrupt)
    out = tmp_path / "out.mp4"
    status = inference.main(["--config", TINY, "--input", ASSET, "--prompt", "x", "--output", str(out),
                             "--compare", "--quiet", *QUICK])
    assert status == 130
    assert len(calls) == 2
    assert os.listdir(tmp_path) == []
