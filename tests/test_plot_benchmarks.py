"""benchmarks/plot_benchmarks.py draws both README figures from benchmark JSON files and names
the file when one lacks a field."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import plot_benchmarks  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ATTENTION_JSON = os.path.join(ROOT, "docs", "benchmarks_attention.json")
STAGES = ("preprocess", "text", "vae_encode", "denoise", "vae_decode", "write")


def edit_report(steps: int = 4) -> dict:
    """A bench_edit.py report with made-up seconds: dense, triton and tilelang, `steps` steps run."""
    results = []
    for method, step in (("dense", 40.0), ("triton", 18.0), ("tilelang", 18.5)):
        step_s = [step + 3.0] + [step] * (steps - 1)
        stages = {"preprocess": 1.2, "text": 3.5, "vae_encode": 12.0, "denoise": sum(step_s), "vae_decode": 25.0,
                  "write": 2.0}
        measured = sum(stages.values())
        full = measured - stages["denoise"] + step_s[0] + step * 31
        results.append({"method": method, "dense_kernel": "FlashAttention-3", "stages_s": stages, "step_s": step_s,
                        "step_median_s": step, "first_step_s": step_s[0], "measured_total_s": measured,
                        "full_edit_s": full, "full_edit_extrapolated": steps < 32})
    return {"command": "python benchmarks/bench_edit.py --steps 4", "date": "2026-11-23 10:00 UTC",
            "device": "NVIDIA H100 80GB HBM3", "args": {"frames": 81, "height": 544, "width": 960, "steps": steps},
            "steps": steps, "batch": 2, "load_s": 30.0, "results": results}


def assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 20_000  # axes, lines, text: far more than an empty canvas


def test_writes_both_figures(tmp_path, capsys):
    edit_json = tmp_path / "bench_edit.json"
    edit_json.write_text(json.dumps(edit_report()))
    out = tmp_path / "figures"
    assert plot_benchmarks.main(["--attention-json", ATTENTION_JSON, "--edit-json", str(edit_json),
                                 "--out-dir", str(out)]) == 0
    assert_png(out / "attention_vs_length.png")
    assert_png(out / "edit_stages.png")
    assert "edit_stages.png" in capsys.readouterr().out


def test_edit_denoise_is_extrapolated_to_32_steps():
    report = edit_report(steps=4)
    methods, seconds, totals, label = plot_benchmarks.edit_bars(report, "bench_edit.json")
    assert methods == ["dense", "ISA triton", "ISA tilelang"]
    assert label == "denoise, 32 steps (extrapolated from 4)"
    for i, result in enumerate(report["results"]):
        assert seconds["denoise"][i] == pytest.approx(result["first_step_s"] + 31 * result["step_median_s"])
        assert totals[i] == pytest.approx(result["full_edit_s"])


def test_same_json_gives_the_same_bytes(tmp_path):
    outputs = []
    for name in ("a", "b"):
        plot_benchmarks.main(["--attention-json", ATTENTION_JSON, "--edit-json", str(tmp_path / "absent.json"),
                              "--out-dir", str(tmp_path / name)])
        outputs.append((tmp_path / name / "attention_vs_length.png").read_bytes())
    assert outputs[0] == outputs[1]


def test_missing_edit_json_skips_that_figure(tmp_path, capsys):
    plot_benchmarks.main(["--attention-json", ATTENTION_JSON, "--edit-json", str(tmp_path / "absent.json"),
                          "--out-dir", str(tmp_path)])
    assert_png(tmp_path / "attention_vs_length.png")
    assert not (tmp_path / "edit_stages.png").exists()
    assert "skipping" in capsys.readouterr().out


def test_missing_field_is_one_line_naming_the_file(tmp_path):
    with open(ATTENTION_JSON) as handle:
        attention = json.load(handle)
    del attention["results"][1]["isa"]["triton"]["ms"]
    broken = tmp_path / "broken_attention.json"
    broken.write_text(json.dumps(attention))
    with pytest.raises(SystemExit) as error:
        plot_benchmarks.main(["--attention-json", str(broken), "--out-dir", str(tmp_path)])
    message = str(error.value.code)
    assert str(broken) in message and "results[1].isa.triton.ms" in message and "\n" not in message

    edit = edit_report()
    del edit["results"][0]["stages_s"]["vae_decode"]
    broken_edit = tmp_path / "broken_edit.json"
    broken_edit.write_text(json.dumps(edit))
    with pytest.raises(SystemExit) as error:
        plot_benchmarks.main(["--attention-json", ATTENTION_JSON, "--edit-json", str(broken_edit),
                              "--out-dir", str(tmp_path)])
    message = str(error.value.code)
    assert str(broken_edit) in message and "results[0].stages_s.vae_decode" in message and "\n" not in message


def memory_report(cap, tier: str, estimate: float, peaks: dict, step: float) -> dict:
    """A bench_edit.py --memory-cap-gib report with made-up figures, one method."""
    report = edit_report(steps=3)
    report["results"] = report["results"][1:2]
    report["results"][0].update(peak_memory_gib=peaks, step_median_s=step)
    report["memory"] = {"cap_gib": cap, "tier": tier, "estimate_gib": {"peak": estimate}}
    return report


def test_memory_figure_orders_caps_and_takes_the_peak_over_all_stages(tmp_path):
    reports = [("a.json", memory_report(24.0, "offload blocks, weights bf16, guidance sequential", 12.9,
                                        {"text": 13.1, "denoise": 12.5}, 12.6)),
               ("b.json", memory_report(None, "offload none, weights bf16, guidance batch", 48.5,
                                        {"text": 40.2, "denoise": 48.5}, 13.2))]
    rows = plot_benchmarks.memory_rows(reports)
    assert [r["cap"] for r in rows] == [None, 24.0]
    assert rows[1]["peak"] == 13.1 and rows[1]["step"] == 12.6
    plot_benchmarks.plot_memory(reports, str(tmp_path / "memory.png"))
    assert_png(tmp_path / "memory.png")


def test_memory_figure_names_a_report_without_peaks():
    report = memory_report(24.0, "offload blocks, weights bf16, guidance sequential", 12.9, {}, 12.6)
    with pytest.raises(ValueError, match="cpu.json: no peak memory"):
        plot_benchmarks.memory_rows([("cpu.json", report)])


def profile_report(label: str, attention: float, matmul: float) -> dict:
    """A profile_dit.py report with made-up seconds per kernel category."""
    seconds = {"attention": attention, "matmul": matmul, "fused element-wise": 0.4, "other": 0.1}
    return {"label": label, "date": "2026-12-02T03:00:00+00:00", "device": "NVIDIA H200", "backend": "triton",
            "category_seconds": seconds, "kernel_seconds": sum(seconds.values()),
            "outside_attention_seconds": sum(seconds.values()) - attention}


def test_profile_figure_one_bar_per_report(tmp_path):
    paths = []
    for name, report in (("profile_dit_before.json", profile_report("before", 3.0, 2.8)),
                         ("profile_dit_after.json", profile_report("after", 3.0, 2.5))):
        paths.append(tmp_path / name)
        paths[-1].write_text(json.dumps(report))
    assert plot_benchmarks.main(["--attention-json", ATTENTION_JSON, "--edit-json", str(tmp_path / "none.json"),
                                 "--memory-json", "--profile-json", *map(str, paths),
                                 "--out-dir", str(tmp_path)]) == 0
    assert_png(tmp_path / "dit_profile.png")
    broken = profile_report("broken", 3.0, 2.5)
    del broken["category_seconds"]["matmul"]
    paths[1].write_text(json.dumps(broken))
    with pytest.raises(SystemExit) as error:
        plot_benchmarks.main(["--attention-json", ATTENTION_JSON, "--edit-json", str(tmp_path / "none.json"),
                              "--memory-json", "--profile-json", *map(str, paths), "--out-dir", str(tmp_path)])
    assert "profile_dit_after.json" in str(error.value) and "matmul" in str(error.value)


def budget_report(breakdown: bool = True) -> dict:
    """A bench_attention.py report at one length with made-up stage times for two backends."""
    stages = {"pooling": 0.8, "selection": 1.8, "full part (gather + dense + scatter)": 35.5, "sparse kernel": 5.0}
    row = {"seq_len": 65536, "dense_ms": {"sdpa_cudnn": 140.0, "flash_attn_3": 128.0}}
    if breakdown:
        row["breakdown_ms"] = {"triton": dict(stages), "tilelang": {**stages, "sparse kernel": 6.5}}
    return {"environment": {"device": "NVIDIA H200", "date": "2026-12-02T04:44:00+00:00"}, "backends": ["triton"],
            "results": [{"seq_len": 32768, "dense_ms": {"flash_attn_3": 32.0}}, row]}


def test_budget_figure_takes_the_row_with_a_breakdown_and_the_fa3_reference(tmp_path):
    row, backends, reference, dense_ms = plot_benchmarks.budget_rows(budget_report(), "a.json")
    assert row["seq_len"] == 65536 and backends == ["triton", "tilelang"]
    assert (reference, dense_ms) == ("flash_attn_3", 128.0)
    path = tmp_path / "a.json"
    path.write_text(json.dumps(budget_report()))
    assert plot_benchmarks.main(["--attention-json", ATTENTION_JSON, "--edit-json", str(tmp_path / "none.json"),
                                 "--memory-json", "--profile-json", "--budget-json", str(path),
                                 "--out-dir", str(tmp_path)]) == 0
    assert_png(tmp_path / "isa_budget.png")


def test_budget_figure_without_a_breakdown_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "no_breakdown.json"
    path.write_text(json.dumps(budget_report(breakdown=False)))
    with pytest.raises(SystemExit) as error:
        plot_benchmarks.main(["--attention-json", ATTENTION_JSON, "--edit-json", str(tmp_path / "none.json"),
                              "--memory-json", "--profile-json", "--budget-json", str(path),
                              "--out-dir", str(tmp_path)])
    assert "no_breakdown.json" in str(error.value) and "breakdown_ms" in str(error.value)
    assert "\n" not in str(error.value)
