"""benchmarks/bench_dit.py on a CPU with the tiny model: every backend timed, compared with dense,
and recorded with its GPU state (none on a CPU)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_cpu_run_writes_every_backend(tmp_path):
    out = tmp_path / "bench_dit.json"
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_dit.py"), "--tiny", "--frames", "5",
                    "--height", "64", "--width", "64", "--backends", "dense,torch", "--repeats", "2",
                    "--json", str(out)], cwd=ROOT, check=True, capture_output=True, text=True, timeout=300)
    report = json.loads(out.read_text())
    assert report["info"]["command"].startswith("python ") and "--tiny" in report["info"]["command"]
    dense, isa = report["results"]
    assert (dense["backend"], isa["backend"]) == ("dense", "torch")
    for result in (dense, isa):
        assert len(result["all_seconds"]) == 2 and result["seconds_per_forward"] > 0 and result["finite"]
        assert 0 < result["attention_seconds"] < result["seconds_per_forward"]
        assert result["gpu_state"] is None and result["peak_gpu_gib"] is None
    assert 0 < isa["rel_l2_error_vs_dense"] < 0.05
    assert "| torch |" in report["table"] and report["table"].count("| CPU |") == 2
