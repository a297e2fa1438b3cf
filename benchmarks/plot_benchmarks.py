"""PNG figures for the README from the committed benchmark JSON files.

    python benchmarks/plot_benchmarks.py

reads docs/benchmarks_attention.json (benchmarks/bench_attention.py) and writes
docs/attention_vs_length.png: the median time of dense attention (cuDNN, and FlashAttention-3
when it was measured) and of each ISA backend against the sequence length, log-log, with ISA's
speed-up over dense FA3 (cuDNN when FA3 was not measured) written at each length.
When docs/bench_edit.json (benchmarks/bench_edit.py) exists, it also writes
docs/edit_stages.png: one horizontal bar per attention method, a whole 32-step edit split into
its stages; the denoising part is extrapolated from the measured steps when the JSON says so.
From docs/bench_edit_memory_*.json (bench_edit.py --memory-cap-gib, one per GPU memory cap) it
writes docs/memory_tiers.png: the tier profile auto chose per cap, its estimated and measured
peak, and its seconds per denoising step.
From docs/profile_dit_*.json (benchmarks/profile_dit.py; in reverse name order, so _before above _after) it
writes docs/dit_profile.png: one DiT forward's GPU kernel time split into attention, matrix
products, the fused element-wise kernels and the rest, one bar per profile.
From docs/benchmarks_attention_h200.json (bench_attention.py with a stage breakdown) it writes
docs/isa_budget.png: one ISA call at the breakdown's length, one bar per backend split into its
stages, against the time a speed-up goal over dense FA3 allows (3.2x: --goal).
The figures depend only on the JSON: the PNGs carry no timestamp or software version.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullLocator  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGSIZE = (8.0, 4.5)  # inches: readable at the README's width
DPI = 110
PNG_METADATA = {"Software": None}  # no matplotlib version in the file: same JSON, same bytes
FULL_STEPS = 32  # bench_edit.FULL_STEPS: the steps of a whole edit
DENSE_LABELS = {"sdpa_cudnn": "dense cuDNN", "flash_attn_3": "dense FA3"}  # bench_attention's dense baselines
SPEEDUP_BASELINES = ("flash_attn_3", "sdpa_cudnn")  # the first one measured at every length is the reference
STAGE_LABELS = {"preprocess": "read and resize", "text": "text encoder", "vae_encode": "VAE encode",
                "denoise": "denoise", "vae_decode": "VAE decode", "write": "mp4 write"}
STAGE_COLORS = {"preprocess": "#8c8c8c", "text": "#9467bd", "vae_encode": "#2ca02c", "denoise": "#1f77b4",
                "vae_decode": "#98df8a", "write": "#ff7f0e"}
OPTIONAL_STAGES = ("write",)
METHOD_STYLES = {"sdpa_cudnn": ("#7f7f7f", "s", "--"), "flash_attn_3": ("#000000", "D", "--"),
                 "triton": ("#d62728", "o", "-"), "tilelang": ("#1f77b4", "^", "-")}
OTHER_STYLE = ("#2ca02c", "v", "-")


def field(data, path: str, *keys):
    """data[k0][k1]...; a ValueError naming `path` and the missing field when one is absent."""
    value = data
    for depth, key in enumerate(keys):
        try:
            value = value[key]
        except (KeyError, IndexError, TypeError):
            dotted = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in keys[: depth + 1]).lstrip(".")
            raise ValueError(f"{path}: missing field '{dotted}'") from None
    return value


def load_json(path: str) -> dict:
    """The parsed file; a ValueError naming it when it is not JSON."""
    with open(path) as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from None


def attention_series(report: dict, path: str) -> dict:
    """Sequence lengths, median ms per method, the speed-up reference and the ISA speed-ups from
    a bench_attention report."""
    rows = field(report, path, "results")
    if not rows:
        raise ValueError(f"{path}: 'results' is empty")
    backends = field(report, path, "backends")
    seq_lens = [field(report, path, "results", i, "seq_len") for i in range(len(rows))]
    ms = {"sdpa_cudnn": [field(report, path, "results", i, "dense_ms", "sdpa_cudnn") for i in range(len(rows))]}
    if all("flash_attn_3" in field(report, path, "results", i, "dense_ms") for i in range(len(rows))):
        ms["flash_attn_3"] = [field(report, path, "results", i, "dense_ms", "flash_attn_3") for i in range(len(rows))]
    dense = list(ms)
    correct = {}
    for name in backends:
        ms[name] = [field(report, path, "results", i, "isa", name, "ms") for i in range(len(rows))]
        correct[name] = all(field(report, path, "results", i, "isa", name, "correct") for i in range(len(rows)))
    reference = next(name for name in SPEEDUP_BASELINES if name in dense)
    speedups = {name: [d / s for d, s in zip(ms[reference], ms[name])] for name in backends if correct[name]}
    return {"seq_lens": seq_lens, "dense": dense, "backends": backends, "ms": ms, "correct": correct,
            "reference": reference, "speedups": speedups}


def plot_attention(report: dict, path: str, out_path: str) -> None:
    """docs/attention_vs_length.png: attention time against sequence length, log-log."""
    series = attention_series(report, path)
    device = field(report, path, "environment", "device")
    date = str(field(report, path, "environment", "date"))[:10]
    row = field(report, path, "results", 0)
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    for name in series["dense"] + series["backends"]:
        color, marker, style = METHOD_STYLES.get(name, OTHER_STYLE)
        label = DENSE_LABELS.get(name, f"ISA {name}")
        if name in series["correct"] and not series["correct"][name]:
            label += " (disagrees with the reference: no speed-up)"
        ax.plot(series["seq_lens"], series["ms"][name], linestyle=style, marker=marker, color=color, label=label)
    annotated = list(series["speedups"])
    for i, seq in enumerate(series["seq_lens"]):
        if not annotated:
            break
        lowest = min(series["ms"][name][i] for name in annotated)
        text = " / ".join(f"{series['speedups'][name][i]:.2f}x" for name in annotated)
        ax.annotate(text, (seq, lowest), xytext=(0, -14), textcoords="offset points", ha="center", va="top",
                    fontsize=9, color="#333333")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(FixedLocator(series["seq_lens"]))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{int(x):,}"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_locator(NullLocator())
    low, high = min(series["seq_lens"]), max(series["seq_lens"])
    ax.set_xlim(low / 1.25, high * 1.25)
    bottom = min(min(values) for values in series["ms"].values())
    ax.set_ylim(bottom=bottom / 2.2)
    ax.set_xlabel("sequence length S (tokens; target T = source C = S/2)")
    ax.set_ylabel("attention time (ms, median)")
    ax.set_title(f"Attention forward, H={row.get('heads', '?')}, D={row.get('head_dim', '?')}, "
                 f"{row.get('dtype', '?')}: {device}, {date}", fontsize=11)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)
    if annotated:
        names = " / ".join(annotated)
        fig.text(0.01, 0.01, f"Numbers under the points: speed-up of ISA ({names}) over "
                             f"{DENSE_LABELS[series['reference']]} at that length.", fontsize=8, color="#333333")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(out_path, dpi=DPI, metadata=PNG_METADATA)
    plt.close(fig)


def edit_bars(report: dict, path: str) -> tuple[list[str], dict, list[float], str]:
    """Per method: its label and the seconds of each stage of a whole edit, the denoising
    stage extrapolated to FULL_STEPS when the JSON says so; the totals; the denoise legend label."""
    rows = field(report, path, "results")
    if not rows:
        raise ValueError(f"{path}: 'results' is empty")
    steps = field(report, path, "steps")
    # the mp4 write is not timed where ffmpeg is missing (bench_edit's "video_io": false)
    timed = [stage for stage in STAGE_LABELS if stage not in OPTIONAL_STAGES
             or all(stage in (row.get("stages_s") or {}) for row in rows)]
    methods, seconds, totals = [], {stage: [] for stage in timed}, []
    extrapolated = False
    for i in range(len(rows)):
        method = field(report, path, "results", i, "method")
        methods.append(method if method == "dense" else f"ISA {method}")
        stages = {stage: field(report, path, "results", i, "stages_s", stage) for stage in timed}
        if field(report, path, "results", i, "full_edit_extrapolated"):
            extrapolated = True
            first = field(report, path, "results", i, "first_step_s")
            median = field(report, path, "results", i, "step_median_s")
            stages["denoise"] = first + (FULL_STEPS - 1) * median
        for stage, value in stages.items():
            seconds[stage].append(value)
        totals.append(sum(stages.values()))
    if extrapolated:
        denoise_label = f"denoise, {FULL_STEPS} steps (extrapolated from {steps})"
    else:
        denoise_label = f"denoise, {steps} steps"
    return methods, seconds, totals, denoise_label


def plot_edit(report: dict, path: str, out_path: str) -> None:
    """docs/edit_stages.png: a whole edit's seconds per stage, one horizontal bar per method."""
    methods, seconds, totals, denoise_label = edit_bars(report, path)
    args = field(report, path, "args")
    device = field(report, path, "device")
    date = str(field(report, path, "date"))[:10]
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    positions = list(range(len(methods)))[::-1]  # the first method on top
    left = [0.0] * len(methods)
    for stage, widths in seconds.items():
        label = STAGE_LABELS[stage]
        ax.barh(positions, widths, left=left, height=0.6, color=STAGE_COLORS[stage],
                label=denoise_label if stage == "denoise" else label)
        for y, x0, width in zip(positions, left, widths):
            if width >= 0.08 * max(totals):
                ax.text(x0 + width / 2, y, f"{width:.0f} s", ha="center", va="center", fontsize=9, color="white")
        left = [x + w for x, w in zip(left, widths)]
    for y, total in zip(positions, totals):
        ax.text(total, y, f" {total:.0f} s", ha="left", va="center", fontsize=9)
    ax.set_yticks(positions, methods)
    ax.set_xlim(0, max(totals) * 1.12)
    ax.set_xlabel(f"seconds for a whole {FULL_STEPS}-step edit")
    shape = f"{args.get('frames', '?')} frames {args.get('width', '?')}x{args.get('height', '?')}"
    untimed = "" if "write" in seconds else " (mp4 write not timed)"
    ax.set_title(f"Whole edit by attention method, {shape}: {device}, {date}{untimed}", fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3, fontsize=9, frameon=False)
    fig.tight_layout()
    fig.savefig(out_path, dpi=DPI, metadata=PNG_METADATA)
    plt.close(fig)


def memory_rows(reports: list[tuple[str, dict]]) -> list[dict]:
    """One row per bench_edit.py report run with --memory-cap-gib (or without, the reference): the
    cap, the tier, the planner's estimate and the measured peak (over all stages) in GiB, and the
    median seconds per denoising step; sorted from the largest cap (no cap first) down."""
    rows = []
    for path, report in reports:
        memory = field(report, path, "memory")
        result = field(report, path, "results", 0)
        peaks = field(report, path, "results", 0, "peak_memory_gib")
        if not peaks:
            raise ValueError(f"{path}: no peak memory recorded (a CPU run?)")
        rows.append({"cap": memory.get("cap_gib"), "tier": field(report, path, "memory", "tier"),
                     "estimate": field(report, path, "memory", "estimate_gib", "peak"),
                     "peak": max(peaks.values()), "step": result["step_median_s"]})
    return sorted(rows, key=lambda r: -(r["cap"] if r["cap"] is not None else float("inf")))


def plot_memory(reports: list[tuple[str, dict]], out_path: str) -> None:
    """docs/memory_tiers.png: per GPU memory cap, the tier auto chose, its estimated and measured peak
    (left) and its seconds per denoising step (right)."""
    rows = memory_rows(reports)
    device = field(reports[0][1], reports[0][0], "device")
    labels = [("no cap" if r["cap"] is None else f"{r['cap']:g} GiB cap") + "\n" +
              r["tier"].replace("offload ", "").replace("weights ", "").replace("guidance ", "") for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(FIGSIZE[0] * 1.25, FIGSIZE[1]), dpi=DPI)
    x = list(range(len(rows)))
    left.bar([i - 0.2 for i in x], [r["estimate"] for r in rows], width=0.4, color="#c7c7c7",
             label="planner's estimate")
    left.bar([i + 0.2 for i in x], [r["peak"] for r in rows], width=0.4, color="#1f77b4", label="measured peak")
    for i, r in enumerate(rows):
        if r["cap"] is not None:
            left.hlines(r["cap"], i - 0.45, i + 0.45, colors="#d62728", linestyles="--",
                        label="cap" if i == next(j for j, q in enumerate(rows) if q["cap"] is not None) else None)
        left.text(i + 0.2, r["peak"], f"{r['peak']:.1f}", ha="center", va="bottom", fontsize=8)
    left.set_xticks(x, labels, fontsize=7)
    left.set_ylabel("GiB (all stages)")
    left.legend(fontsize=8)
    right.bar(x, [r["step"] for r in rows], width=0.5, color="#2ca02c")
    for i, r in enumerate(rows):
        right.text(i, r["step"], f"{r['step']:.2f} s", ha="center", va="bottom", fontsize=8)
    right.set_xticks(x, labels, fontsize=7)
    right.set_ylabel("seconds per denoising step")
    for ax in (left, right):
        ax.grid(True, axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    date = str(field(reports[0][1], reports[0][0], "date"))[:10]
    fig.suptitle(f"Memory tiers chosen by profile auto, whole edit (81 frames 960x544, ISA): {device}, {date}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out_path, dpi=DPI, metadata=PNG_METADATA)
    plt.close(fig)


PROFILE_CATEGORIES = (("attention", "#d62728"), ("matmul", "#1f77b4"), ("fused element-wise", "#ff7f0e"),
                      ("other", "#8c8c8c"))


def plot_profile(reports: list[tuple[str, dict]], out_path: str) -> None:
    """docs/dit_profile.png: per profile_dit.py report, one horizontal bar of a DiT forward's
    kernel seconds by category, with the time outside attention written at its end."""
    labels, lefts = [], [0.0] * len(reports)
    fig, ax = plt.subplots(figsize=(FIGSIZE[0], 1.6 + 0.8 * len(reports)), dpi=DPI)
    for path, report in reports:
        labels.append(str(report.get("label", os.path.basename(path))))
    y = list(range(len(reports)))[::-1]
    for name, color in PROFILE_CATEGORIES:
        widths = [field(report, path, "category_seconds", name) for path, report in reports]
        ax.barh(y, widths, left=lefts, color=color, label=name, height=0.55)
        lefts = [left + width for left, width in zip(lefts, widths)]
    for row, total, (path, report) in zip(y, lefts, reports):
        outside = field(report, path, "outside_attention_seconds")
        ax.text(total + 0.05, row, f"{total:.2f} s (outside attention {outside:.2f} s)", va="center", fontsize=8)
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlim(0, max(lefts) * 1.45)
    ax.set_xlabel("GPU kernel seconds per DiT forward")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=len(PROFILE_CATEGORIES))
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    path, first = reports[0]
    fig.suptitle(f"One DiT forward (81 frames 544x960, ISA {field(first, path, 'backend')}), by kernel category: "
                 f"{field(first, path, 'device')}, {str(field(first, path, 'date'))[:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_path, dpi=DPI, metadata=PNG_METADATA)
    plt.close(fig)


BUDGET_STAGES = (("pooling", "pooling", "#8c8c8c"), ("selection", "selection", "#9467bd"),
                 ("full part (gather + dense + scatter)", "full half: block copies + dense FA3", "#1f77b4"),
                 ("sparse kernel", "sparse kernel", "#d62728"))


def budget_rows(report: dict, path: str) -> tuple[dict, list[str], str, float]:
    """The first result with a stage breakdown, its backends, and its dense reference (FA3, else
    cuDNN): the reference's name and ms."""
    rows = [row for row in field(report, path, "results") if row.get("breakdown_ms")]
    if not rows:
        raise ValueError(f"{path}: no result has a 'breakdown_ms' (run bench_attention.py with --breakdown-at)")
    row = rows[0]
    dense = field(row, path, "dense_ms")
    reference = next((name for name in SPEEDUP_BASELINES if name in dense), None)
    if reference is None:
        raise ValueError(f"{path}: 'dense_ms' has none of {', '.join(SPEEDUP_BASELINES)}")
    return row, list(field(row, path, "breakdown_ms")), reference, dense[reference]


def plot_isa_budget(report: dict, path: str, out_path: str, goal: float) -> None:
    """docs/isa_budget.png: each backend's stages, one after another, and the line at dense / goal."""
    row, backends, reference, dense_ms = budget_rows(report, path)
    fig, ax = plt.subplots(figsize=(FIGSIZE[0], 1.8 + 0.7 * len(backends)), dpi=DPI)
    y = list(range(len(backends)))[::-1]
    lefts = [0.0] * len(backends)
    for key, label, color in BUDGET_STAGES:
        widths = [field(row, path, "breakdown_ms", backend, key) for backend in backends]
        ax.barh(y, widths, left=lefts, color=color, label=label, height=0.55)
        lefts = [left + width for left, width in zip(lefts, widths)]
    for row_y, total in zip(y, lefts):
        ax.text(total + 0.4, row_y, f"{total:.1f} ms: {dense_ms / total:.2f}x", va="center", fontsize=8)
    budget = dense_ms / goal
    ax.axvline(budget, color="#000000", linestyle="--", linewidth=1)
    ax.text(budget, len(backends) - 0.45, f" {goal:g}x {DENSE_LABELS[reference]} = {budget:.1f} ms", fontsize=8,
            va="bottom", ha="right")
    ax.set_yticks(y, [f"ISA {backend}" for backend in backends], fontsize=8)
    ax.set_ylim(-0.6, len(backends) - 0.1)
    ax.set_xlim(0, max(lefts + [budget]) * 1.25)
    ax.set_xlabel("ms per call, stages timed one by one")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=len(BUDGET_STAGES))
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    environment = field(report, path, "environment")
    fig.suptitle(f"ISA at {row['seq_len']:,} tokens against {goal:g}x dense ({dense_ms:.1f} ms): "
                 f"{environment.get('device', '?')}, {str(environment.get('date', '?'))[:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_path, dpi=DPI, metadata=PNG_METADATA)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Write the figures; a one-line SystemExit naming the file when a JSON file is unreadable or
    lacks a field the figure needs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attention-json", default=os.path.join(ROOT, "docs", "benchmarks_attention.json"))
    parser.add_argument("--edit-json", default=os.path.join(ROOT, "docs", "bench_edit.json"))
    parser.add_argument("--memory-json", nargs="*", default=sorted(glob.glob(os.path.join(
        ROOT, "docs", "bench_edit_memory_*.json"))), help="bench_edit.py reports, one per memory cap")
    parser.add_argument("--profile-json", nargs="*", default=sorted(glob.glob(os.path.join(
        ROOT, "docs", "profile_dit_*.json")), reverse=True), help="profile_dit.py reports, one bar each")
    parser.add_argument("--budget-json", default=os.path.join(ROOT, "docs", "benchmarks_attention_h200.json"),
                        help="a bench_attention.py report with a stage breakdown")
    parser.add_argument("--goal", type=float, default=3.2, help="the speed-up over dense the budget figure marks")
    parser.add_argument("--out-dir", default=os.path.join(ROOT, "docs"))
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    try:
        attention_png = os.path.join(args.out_dir, "attention_vs_length.png")
        plot_attention(load_json(args.attention_json), args.attention_json, attention_png)
        print(f"wrote {attention_png}")
        if os.path.exists(args.edit_json):
            edit_png = os.path.join(args.out_dir, "edit_stages.png")
            plot_edit(load_json(args.edit_json), args.edit_json, edit_png)
            print(f"wrote {edit_png}")
        else:
            print(f"{args.edit_json} not found: skipping the edit stages figure (run benchmarks/bench_edit.py)")
        if args.memory_json:
            memory_png = os.path.join(args.out_dir, "memory_tiers.png")
            plot_memory([(path, load_json(path)) for path in args.memory_json], memory_png)
            print(f"wrote {memory_png}")
        if args.profile_json:
            profile_png = os.path.join(args.out_dir, "dit_profile.png")
            plot_profile([(path, load_json(path)) for path in args.profile_json], profile_png)
            print(f"wrote {profile_png}")
        if os.path.exists(args.budget_json):
            budget_png = os.path.join(args.out_dir, "isa_budget.png")
            plot_isa_budget(load_json(args.budget_json), args.budget_json, budget_png, args.goal)
            print(f"wrote {budget_png}")
        else:
            print(f"{args.budget_json} not found: skipping the ISA budget figure (run benchmarks/bench_attention.py)")
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
