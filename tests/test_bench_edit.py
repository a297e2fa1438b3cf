"""benchmarks/bench_edit.py --tiny runs the real pipeline on a CPU and records every stage."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_whole_edit_benchmark_writes_every_stage(tmp_path):
    out = tmp_path / "bench.json"
    script = os.path.join(ROOT, "benchmarks", "bench_edit.py")
    result = subprocess.run([sys.executable, script, "--tiny", "--steps", "3", "--json", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert [r["method"] for r in report["results"]] == ["dense", "torch"]
    for r in report["results"]:
        assert set(r["stages_s"]) == {"preprocess", "text", "vae_encode", "denoise", "vae_decode", "write"}
        assert all(seconds > 0 for seconds in r["stages_s"].values())
        assert len(r["step_s"]) == 3 and r["full_edit_extrapolated"]
        assert r["full_edit_s"] > r["measured_total_s"]  # 29 more steps extrapolated
        assert r["video_shape"] == [9, 64, 96, 3]
    assert (tmp_path / "bench.md").read_text().count("|") > 20
    assert report["memory"]["tier"] == "offload none, weights bf16, guidance batch"
    assert report["memory"]["cap_gib"] is None


def test_memory_cap_needs_the_gpu_model(tmp_path):
    script = os.path.join(ROOT, "benchmarks", "bench_edit.py")
    result = subprocess.run([sys.executable, script, "--tiny", "--memory-cap-gib", "24", "--json",
                             str(tmp_path / "bench.json")], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert result.returncode == 2
    assert "--memory-cap-gib" in result.stderr.splitlines()[-1]
    assert not (tmp_path / "bench.json").exists()


def test_guidance_modes_run_interleaved_on_one_pipeline(tmp_path):
    out = tmp_path / "bench.json"
    script = os.path.join(ROOT, "benchmarks", "bench_edit.py")
    result = subprocess.run([sys.executable, script, "--tiny", "--steps", "2", "--methods", "torch",
                             "--guidance", "batch,sequential", "--rounds", "2", "--json", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert [(r["guidance"], r["round"]) for r in report["results"]] == [
        ("batch", 1), ("sequential", 1), ("batch", 2), ("sequential", 2)]
    assert all(len(r["step_s"]) == 2 and r["video_shape"] == [9, 64, 96, 3] for r in report["results"])
    table = (tmp_path / "bench.md").read_text()
    assert table.count("| torch | sequential |") == 2 and table.count("| torch | batch |") == 2


@pytest.mark.parametrize("flags, named", [(["--guidance", "parallel"], "--guidance"),
                                          (["--rounds", "0"], "--rounds")])
def test_bad_guidance_arguments_are_named(tmp_path, flags, named):
    script = os.path.join(ROOT, "benchmarks", "bench_edit.py")
    result = subprocess.run([sys.executable, script, "--tiny", *flags, "--json", str(tmp_path / "bench.json")],
                            cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert result.returncode == 2
    assert named in result.stderr.splitlines()[-1]
    assert not (tmp_path / "bench.json").exists()
