"""inference.py under torchrun (gloo, CPU): the same edit as one process, written once by rank 0."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from test_inference_cli import ASSET, QUICK, ROOT, TINY, cli, error_line
from test_parallel import launch_torchrun
from wanx.video import read_video

PROMPT = "make the ball yellow"
TIMEOUT_S = 240


def edit_args(out, *extra):
    return ["--config", TINY, "--input", ASSET, "--prompt", PROMPT, "--output", str(out), "--quiet", *QUICK, *extra]


# inference.py with the encoder patched to also save the frames it encodes (the edit before H.264,
# whose lossy coding may move a pixel by several levels for a difference of one in its input)
SAVING_CLI = textwrap.dedent("""
    import sys
    import numpy as np
    sys.path.insert(0, {root!r})
    import inference, wanx.video
    real = wanx.video.encode_video
    def encode_and_save(path, frames, fps=16, **kwargs):
        np.save({frames_file!r}, frames)
        return real(path, frames, fps=fps, **kwargs)
    wanx.video.encode_video = encode_and_save
    sys.exit(inference.main(sys.argv[1:]))
""")


def saving_cli(folder, frames_file) -> str:
    script = folder / "saving_cli.py"
    script.write_text(SAVING_CLI.format(root=ROOT, frames_file=str(frames_file)))
    return str(script)


def torchrun_cli(nproc: int, script: str, *args) -> subprocess.CompletedProcess:
    status, stdout, stderr = launch_torchrun(nproc, [script, *args], TIMEOUT_S)
    return subprocess.CompletedProcess([script, *args], status, stdout, stderr)


def test_two_processes_write_the_single_process_edit_within_one_grey_level(tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    single, parallel = out_dir / "single.mp4", out_dir / "parallel.mp4"
    single_frames, parallel_frames = tmp_path / "single.npy", tmp_path / "parallel.npy"
    done = subprocess.run([sys.executable, saving_cli(tmp_path, single_frames), *edit_args(single)], cwd=ROOT,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    script = saving_cli(tmp_path, parallel_frames)
    result = torchrun_cli(2, script, *edit_args(parallel, "parallel.ulysses_degree=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote       ") == 1  # rank 0 alone prints the summary and writes
    assert "2 processes (gloo): ulysses 2 x cfg 1" in result.stdout
    assert sorted(os.listdir(out_dir)) == ["parallel.mp4", "single.mp4"]
    assert read_video(parallel)[0].shape == read_video(single)[0].shape == (5, 32, 48, 3)
    a, b = np.load(single_frames).astype(int), np.load(parallel_frames).astype(int)
    # the two runs differ by the fp32 rounding of sums taken over other splits of the sequence
    assert np.abs(a - b).max() <= 1


def test_a_degree_above_one_without_torchrun_is_refused_before_loading(tmp_path):
    result = cli(*edit_args(tmp_path / "o.mp4", "parallel.ulysses_degree=2"))
    assert result.returncode == 2
    assert "launch with torchrun --nproc-per-node 2" in error_line(result)
    assert "RANDOM weights" not in result.stdout


@pytest.mark.parametrize("override, reason", [
    ("parallel.cfg_degree=3", "parallel.cfg_degree must be 1 or 2"),
    ("parallel.ulysses_degree=0", "parallel.ulysses_degree must be in"),
])
def test_bad_parallel_values_are_refused(override, reason, tmp_path):
    result = cli(*edit_args(tmp_path / "o.mp4", override))
    assert result.returncode == 2 and reason in error_line(result)


def test_dry_run_shows_each_ranks_share():
    result = cli("--input", ASSET, "--prompt", PROMPT, "--dry-run", "video.size=[544,960]", "video.max_frames=81",
                 "parallel.ulysses_degree=4", "parallel.cfg_degree=2", "parallel.shard_weights=true")
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("parallel"))
    # the demo's 33 frames at 544x960: 2 x 18,360 tokens over 4 ranks, 40 heads over 4, the CFG batch split over 2
    assert "8 processes: ulysses 4 x cfg 2, weights sharded; per GPU 9180 tokens, 10 heads, batch 1" in line
