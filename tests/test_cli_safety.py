"""inference.py never loses a user's file, never reports a failed write as success, and stops on one line.

Each test drives the real CLI (a subprocess, or `inference.main` in process where a stage has
to be made to fail) on the tiny random-weight config.
"""
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import inference
from test_inference_cli import ASSET, QUICK, ROOT, TINY, cli, error_line
from wanx.tokenizer import visible_text
from wanx.video import read_video

PROMPT = "make the ball yellow"


def run_args(out, *extra, source=ASSET):
    return ["--config", TINY, "--input", str(source), "--prompt", PROMPT, "--output", str(out), "--quiet", *QUICK,
            *extra]


@pytest.fixture
def input_copy(tmp_path):
    """The demo clip copied into its own folder, as a user's input."""
    folder = tmp_path / "in"
    folder.mkdir()
    path = folder / "x_compare.mp4"
    path.write_bytes(open(ASSET, "rb").read())
    return path


def test_compare_output_that_is_the_input_is_refused(input_copy):
    before = input_copy.read_bytes()
    result = cli(*run_args(input_copy.parent / "x.mp4", "--compare", "--overwrite", source=input_copy))
    assert result.returncode == 2
    assert "is the input video" in error_line(result)
    assert input_copy.read_bytes() == before
    assert sorted(os.listdir(input_copy.parent)) == ["x_compare.mp4"]


def test_output_folder_linked_to_the_inputs_folder_is_refused(input_copy, tmp_path):
    (tmp_path / "out").symlink_to(input_copy.parent)
    before = input_copy.read_bytes()
    result = cli(*run_args(tmp_path / "out" / "x_compare.mp4", "--overwrite", source=input_copy))
    assert "is the input video" in error_line(result)
    assert input_copy.read_bytes() == before


def test_an_existing_fifo_is_refused_even_with_overwrite(tmp_path):
    fifo = tmp_path / "out.mp4"
    os.mkfifo(fifo)
    result = cli(*run_args(fifo, "--overwrite"))
    assert result.returncode == 2
    assert "is a FIFO" in error_line(result)


@pytest.mark.parametrize("output, reason", [
    ("{tmp}/out/", "ends with a separator"),
    ("/sys/out.mp4", "not writable"),
    ("{tmp}/" + "n" * 250 + ".mp4", "too long"),
    ("{tmp}/file/out.mp4", "is not a folder"),
])
def test_output_problems_are_found_before_loading(output, reason, tmp_path):
    (tmp_path / "file").write_bytes(b"")
    result = cli(*run_args(output.format(tmp=tmp_path)))
    assert result.returncode == 2
    assert reason in error_line(result)
    assert "RANDOM weights" not in result.stdout  # nothing was loaded


def test_overrides_between_flags_are_accepted(tmp_path):
    status = inference.main(["--config", TINY, "sampler.steps=3", "--input", ASSET, "video.size=[32,48]",
                             "--prompt", PROMPT, "--dry-run"])
    assert status == 0


@pytest.mark.parametrize("prompt", ["\u200b\u200b", "\u200d \ufeff", "\t\n", "\u2060\u3000",
                                    "\u2028\u00a0\u3000\u200b\ufe0f", "\u3164\u2800\u034f"])
def test_a_prompt_of_invisible_characters_is_empty(prompt, tmp_path):
    result = cli("--config", TINY, "--input", ASSET, "--prompt", prompt, "--output", str(tmp_path / "o.mp4"))
    assert result.returncode == 2
    assert "the prompt is empty" in error_line(result)


def test_malformed_checkpoint_is_refused_before_anything_loads(tmp_path):
    checkpoint = tmp_path / "liveditor_ckpt.bin"
    checkpoint.write_text("not a checkpoint\n")
    result = cli(*run_args(tmp_path / "o.mp4", f"model.checkpoint={checkpoint}"))
    assert result.returncode == 2
    assert str(checkpoint) in error_line(result)
    assert "RANDOM weights" not in result.stdout
    assert sorted(os.listdir(tmp_path)) == ["liveditor_ckpt.bin"]


def test_non_finite_predictions_stop_the_run_and_write_nothing(tmp_path, monkeypatch, capsys):
    from model import WanDiT

    real_tiny = WanDiT.tiny

    def nan_dit(*args, **kwargs):
        dit = real_tiny(*args, **kwargs)
        with torch.no_grad():
            next(dit.parameters()).fill_(float("nan"))
        return dit

    monkeypatch.setattr(WanDiT, "tiny", nan_dit)
    status = inference.main(run_args(tmp_path / "o.mp4", "--compare"))
    err = capsys.readouterr().err
    assert status == 1
    assert "denoising step 1 of 2" in err and "NaN or infinite" in err
    assert os.listdir(tmp_path) == []


# A child process that runs the CLI with the encoder patched to send itself a signal part-way
# through writing the comparison video (the second output), after the first one is complete.
SIGNAL_DURING_WRITE = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    import inference, wanx.video
    real = wanx.video.encode_video
    calls = []
    def encode_then_signal(path, frames, fps=16, **kwargs):
        calls.append(path)
        real(path, frames, fps=fps, **kwargs)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.{name})
    wanx.video.encode_video = encode_then_signal
    sys.exit(inference.main(sys.argv[1:]))
""")


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_a_signal_during_the_write_keeps_old_outputs_whole_and_leaves_nothing(name, tmp_path):
    out, compare = tmp_path / "out.mp4", tmp_path / "out_compare.mp4"
    out.write_bytes(b"old edit")
    compare.write_bytes(b"old comparison")
    script = SIGNAL_DURING_WRITE.format(root=ROOT, name=name)
    result = subprocess.run([sys.executable, "-c", script, *run_args(out, "--compare", "--overwrite")],
                            cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 128 + getattr(signal, name), result.stderr
    assert f"stopped by {name}: no output written" in result.stderr
    assert out.read_bytes() == b"old edit" and compare.read_bytes() == b"old comparison"
    assert sorted(os.listdir(tmp_path)) == ["out.mp4", "out_compare.mp4"]


# The CLI under a file-size limit: ffmpeg cannot write the whole video, as on a full disk.
FILE_SIZE_LIMIT = textwrap.dedent("""
    import resource, signal, sys
    sys.path.insert(0, {root!r})
    resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
    import inference
    sys.exit(inference.main(sys.argv[1:]))
""")


def test_a_write_that_runs_out_of_space_fails_and_publishes_nothing(tmp_path):
    out = tmp_path / "out.mp4"
    out.write_bytes(b"old edit")
    script = FILE_SIZE_LIMIT.format(root=ROOT, limit=2048)
    result = subprocess.run([sys.executable, "-c", script, *run_args(out, "--compare", "--overwrite")],
                            cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 1, result.stderr
    line = error_line(result)
    assert "nothing was written" in line
    assert "wrote" not in result.stdout
    assert out.read_bytes() == b"old edit"
    assert sorted(os.listdir(tmp_path)) == ["out.mp4"]


def test_a_checkpoint_named_in_the_config_is_never_an_output(tmp_path):
    checkpoint = tmp_path / "ck.bin"
    checkpoint.write_bytes(b"the user's checkpoint")
    result = cli(*run_args(checkpoint, "--overwrite", f"model.checkpoint={checkpoint}"))
    assert result.returncode == 2
    assert "is model.checkpoint" in error_line(result)
    assert checkpoint.read_bytes() == b"the user's checkpoint"


# A SIGTERM that arrives while the outputs are renamed into place is held back until both are:
# the run then stops with 143, and its message says the outputs were written (they are complete).
SIGNAL_DURING_PUBLISH = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    import inference, wanx.outputs
    real = os.link  # without --overwrite each output is hard-linked into place
    def link_then_signal(src, dst, **kwargs):
        real(src, dst, **kwargs)
        if str(dst).endswith("out.mp4"):
            os.kill(os.getpid(), signal.SIGTERM)
    wanx.outputs.os.link = link_then_signal
    sys.exit(inference.main(sys.argv[1:]))
""")


def test_a_signal_during_the_renames_is_reported_after_them(tmp_path):
    out = tmp_path / "out.mp4"
    script = SIGNAL_DURING_PUBLISH.format(root=ROOT)
    result = subprocess.run([sys.executable, "-c", script, *run_args(out, "--compare")],
                            cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 143, result.stderr
    assert "the outputs were already complete and written" in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["out.mp4", "out_compare.mp4"]
    assert read_video(tmp_path / "out_compare.mp4")[0].shape == (5, 32, 96, 3)


def test_visible_text_keeps_real_prompts():
    assert visible_text("make it snow \u2764\ufe0f") == "makeitsnow\u2764\ufe0f"
    assert visible_text("e\u0301") == "e\u0301"  # a mark on a letter is text
