"""Time a whole edit through the real pipeline code (`EditingPipeline`), stage by stage.

    python benchmarks/bench_edit.py                      # GPU: 81 frames 960x544, full-size random weights
    python benchmarks/bench_edit.py --steps 4            # shorter timing run, reported per step
    python benchmarks/bench_edit.py --tiny               # CPU: the tiny model, dense and ISA "torch"
    python benchmarks/bench_edit.py --methods triton --memory-cap-gib 24   # a 24 GiB card, emulated
    python benchmarks/bench_edit.py --methods triton --steps 3 --guidance batch,sequential --rounds 2
                                                         # guidance A/B in one process, interleaved

With --memory-cap-gib G the process may allocate at most G GiB of the GPU
(`torch.cuda.set_per_process_memory_fraction`, which emulates a smaller card) and the memory
tier is chosen as `profile: auto` chooses it for G GiB free; the report records the tier, the
reason, the planner's estimate of each stage and the measured peaks.

Every component is built at its real size with random weights on the device
(`model.kind: random`, no file read), once; then, for each attention method, the same source
runs the pipeline's stages: read and resize, text encoding (prompt and negative prompt),
VAE encode, N Flow-UniPC steps with CFG (cond and uncond each step), VAE decode, and the mp4
write (encode and verify). With --guidance the same loaded pipeline runs each listed CFG
guidance mode in turn ("batch": cond and uncond as one DiT batch of 2; "sequential": two batch-1
passes), and --rounds repeats the whole sequence, so that two modes are compared interleaved in
one process, on one set of weights and one clock history. It records seconds and peak GPU
memory per stage, every step's seconds, the dense kernel behind the method, the device,
library versions and the GPU's clocks while denoising. A full 32-step edit's time is
extrapolated from the measured steps when `--steps` is smaller; the JSON and the Markdown
table say which numbers are which.
The output video is noise: the weights are random.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "assets"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

FULL_STEPS = 32
STAGES = ("preprocess", "text", "vae_encode", "denoise", "vae_decode", "write")


def draw_input(frames: int, height: int, width: int) -> np.ndarray:
    """The demo scene drawn at the benchmark's size (assets/make_demo_video.py): uint8 [F, H, W, 3]."""
    from make_demo_video import draw_frame

    return np.stack([draw_frame(k, frames, height, width) for k in range(frames)])


def ffmpeg_available() -> bool:
    """Whether video files can be read and written here (imageio-ffmpeg brings the ffmpeg binary)."""
    try:
        import imageio_ffmpeg

        return bool(imageio_ffmpeg.get_ffmpeg_exe())
    except (ImportError, RuntimeError):
        return False


def versions() -> dict:
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "tilelang", "diffusers", "transformers"):
        try:
            found[name] = __import__(name).__version__
        except Exception:  # a missing or broken optional package is reported, not fatal
            found[name] = None
    return found


def run_method(pipe, source, method: str, guidance: str, prompt: str, folder: str, monitor, write: bool) -> dict:
    """One edit with `method` (its options from the pipeline's config) and CFG `guidance` mode; seconds and peak
    memory per stage."""
    from wanx.config import attention_options
    from wanx.video import encode_video

    pipe.memory = dataclasses.replace(pipe.memory, guidance=guidance)
    pipe.cfg.attention.backend = method
    pipe.dit.set_attention(method, attention_options(pipe.cfg))
    if pipe.device.type == "cuda":
        torch.cuda.empty_cache()
    started = monitor.now() if monitor else None
    result = pipe.edit(source, prompt, progress=False)
    gpu_state = monitor.state_since(started) if monitor else None
    if write:
        start = time.perf_counter()
        encode_video(os.path.join(folder, f"{method}-{guidance}.mp4"), result.video, fps=result.fps)
        result.timings["write"] = time.perf_counter() - start
    steps = result.step_seconds
    steady = steps[1:] if len(steps) > 1 else steps
    step_median = statistics.median(steady)
    stages = {name: result.timings[name] for name in STAGES if name in result.timings}
    measured_total = sum(stages.values())
    full_total = measured_total - stages["denoise"] + steps[0] + step_median * (FULL_STEPS - 1)
    return {
        "method": method, "guidance": guidance, "dense_kernel": result.dense_kernel, "stages_s": stages,
        "peak_memory_gib": result.peak_memory, "step_s": steps, "step_median_s": step_median,
        "first_step_s": steps[0], "measured_total_s": measured_total,
        "full_edit_s": full_total if len(steps) < FULL_STEPS else measured_total,
        "full_edit_extrapolated": len(steps) < FULL_STEPS, "gpu_state_while_editing": gpu_state,
        "video_shape": list(result.video.shape),
    }


def _seconds(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown(report: dict) -> str:
    a = report["args"]
    lines = [f"Whole edit, {a['frames']} frames {a['width']}x{a['height']}, {report['steps']} measured steps "
             f"(guidance scale {report['guidance_scale']:g}), {report['device']}, {report['date']}.",
             f"Command: `{report['command']}`", "",
             "| method | guidance | dense kernel | read + resize s | text s | VAE enc s | step s (median) | "
             "first step s | VAE dec s | write s | 32-step edit s | peak GiB (denoise) |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["results"]:
        s = r["stages_s"]
        star = "*" if r["full_edit_extrapolated"] else ""
        peak = r["peak_memory_gib"].get("denoise")
        lines.append(f"| {r['method']} | {r['guidance']} | {r['dense_kernel']} | {s['preprocess']:.2f} | "
                     f"{s['text']:.2f} | {s['vae_encode']:.2f} | {r['step_median_s']:.2f} | {r['first_step_s']:.2f} | "
                     f"{s['vae_decode']:.2f} | {_seconds(s.get('write'))} | {r['full_edit_s']:.1f}{star} | "
                     f"{'-' if peak is None else f'{peak:.1f}'} |")
    lines += ["", f"Loading (building the random networks on the device): {report['load_s']:.1f} s, once."]
    memory = report.get("memory")
    if memory and any(r["peak_memory_gib"] for r in report["results"]):  # peaks are recorded on a GPU only
        cap = "no cap" if memory["cap_gib"] is None else f"capped at {memory['cap_gib']:g} GiB"
        measured = max(max(r["peak_memory_gib"].values(), default=0.0) for r in report["results"])
        estimate = memory["estimate_gib"]
        lines.append(f"Memory ({cap}): {memory['tier']} ({memory['reason']}); estimated peak {estimate['peak']:.1f} "
                     f"GiB (text {estimate['text']:.1f}, denoising {estimate['denoise']:.1f}), measured peak over "
                     f"all stages {measured:.1f} GiB.")
    if not report["video_io"]:
        lines.append("No ffmpeg on this machine: the source was drawn in memory (the read + resize column is "
                     "the resize alone) and no mp4 was written (the totals hold no read and no write time).")
    lines += [
              "\\* extrapolated: the measured stages, the first step, and the median of the later steps "
              f"for the remaining {FULL_STEPS - 1} steps." if any(r["full_edit_extrapolated"]
                                                                  for r in report["results"]) else ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", help="an mp4 to edit; default: the demo scene drawn at --frames/--height/--width")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=544)
    parser.add_argument("--width", type=int, default=960)
    parser.add_argument("--steps", type=int, default=FULL_STEPS, help="denoising steps actually run")
    parser.add_argument("--methods", default="dense,triton,tilelang", help="comma-separated attention methods")
    parser.add_argument("--prompt", default="turn the red ball into a tennis ball")
    parser.add_argument("--tiny", action="store_true", help="the tiny CPU model (methods default to dense,torch)")
    parser.add_argument("--json", default=None, help="output JSON (default docs/bench_edit.json, "
                                                     "docs/bench_edit_tiny.json with --tiny)")
    parser.add_argument("--memory-cap-gib", type=float, default=None,
                        help="GPU memory this process may use (emulates a smaller card); the tier is chosen "
                             "for it as memory.profile auto does")
    parser.add_argument("--guidance", default=None,
                        help="comma-separated CFG guidance modes to run on the one loaded pipeline, of batch and "
                             "sequential (default: the memory tier's)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every method x guidance edit this many times, interleaved (an A/B in one process)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides after the benchmark's own, e.g. memory.offload=blocks")
    args = parser.parse_intermixed_args(argv)
    if args.tiny and args.methods == parser.get_default("methods"):
        args.methods = "dense,torch"
    if args.tiny and (args.frames, args.height, args.width) == (81, 544, 960):
        args.frames, args.height, args.width = 9, 64, 96
    if args.memory_cap_gib is not None and (args.tiny or not torch.cuda.is_available()):
        parser.error("--memory-cap-gib caps a CUDA GPU's memory: it needs a GPU and the full-size model")
    if args.memory_cap_gib is not None and args.memory_cap_gib <= 0:
        parser.error(f"--memory-cap-gib must be positive, got {args.memory_cap_gib}")
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    guidance_modes = None
    if args.guidance is not None:
        from wanx.config import GUIDANCE_MODES

        guidance_modes = [g.strip() for g in args.guidance.split(",") if g.strip()]
        if not guidance_modes or set(guidance_modes) - set(GUIDANCE_MODES):
            parser.error(f"--guidance takes a comma-separated list of {' and '.join(GUIDANCE_MODES)}, "
                         f"got {args.guidance!r}")
        if args.memory_cap_gib is not None:
            parser.error("--guidance and --memory-cap-gib exclude each other: under a cap the tier (guidance "
                         "included) is the one memory.profile auto picks")
    json_path = args.json or os.path.join(ROOT, "docs", "bench_edit_tiny.json" if args.tiny else "bench_edit.json")

    from wanx.config import isa_config, load_config
    from wanx.memory import GIB
    from wanx.pipeline import EditingPipeline, SourceVideo, read_source
    from wanx.planning import make_plan
    from wanx.video import write_video

    # without a cap, the first tier for this size whatever the free memory (offload none, bf16, and the
    # guidance mode the planner orders first) unless memory.* overrides say otherwise: a benchmark measures
    # the tier it is given; with a cap, the tier auto picks for that much memory
    profile = "manual" if args.memory_cap_gib is None else "auto"
    overrides = [f"sampler.steps={args.steps}", f"video.max_frames={args.frames}",
                 f"video.size=[{args.height},{args.width}]", "attention.backend=dense", f"memory.profile={profile}"]
    if args.tiny:
        cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), overrides + args.overrides)
    else:
        cfg = load_config(os.path.join(ROOT, "inference.yaml"),
                          overrides + ["model.kind=random", "model.dit=null", "model.tokenizer=null"] + args.overrides)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    with tempfile.TemporaryDirectory() as folder:
        video_io = ffmpeg_available()
        if video_io:
            path = args.input
            if path is None:
                path = os.path.join(folder, "input.mp4")
                write_video(path, draw_input(args.frames, args.height, args.width), fps=16)
            source = read_source(cfg, path)
        else:
            if args.input is not None:
                parser.error("--input needs ffmpeg (imageio-ffmpeg), which is not installed here")
            print("no ffmpeg here (imageio-ffmpeg missing): the source is drawn in memory and no mp4 is written; "
                  "the read and write stages are not timed", flush=True)
            source = SourceVideo.from_frames(cfg, draw_input(args.frames, args.height, args.width))
        print(f"input: {source.video.shape[1]} frames at {source.video.shape[3]}x{source.video.shape[2]}",
              flush=True)
        free_bytes = None
        if args.memory_cap_gib is not None:
            device_index = torch.cuda.current_device()
            cap_bytes = args.memory_cap_gib * GIB
            torch.cuda.set_per_process_memory_fraction(
                min(1.0, cap_bytes / torch.cuda.get_device_properties(device_index).total_memory), device_index)
            free_bytes = int(min(cap_bytes, torch.cuda.mem_get_info(device_index)[0]))
        plan = make_plan(cfg, source, free_bytes)
        tier = next(t for t in plan.memory_tiers if t.setting == plan.memory_setting)
        print(f"memory: {plan.memory_setting.describe()} ({plan.memory_reason}); estimated peak "
              f"{tier.peak:.1f} GiB", flush=True)
        pipe = EditingPipeline.load(cfg, progress=False, memory=plan.memory_setting)
        isa = isa_config(cfg)
        device = pipe.device
        monitor = None
        if device.type == "cuda":
            from gpu_monitor import GpuMonitor

            monitor = GpuMonitor(device.index or 0)
            monitor.__enter__()
        try:
            results = []
            for round_index in range(args.rounds):
                for method in methods:
                    for guidance in guidance_modes or [plan.memory_setting.guidance]:
                        label = f"{method}, guidance {guidance}, round {round_index + 1} of {args.rounds}"
                        print(f"{label}: editing ({args.steps} steps)...", flush=True)
                        r = run_method(pipe, source, method, guidance, args.prompt, folder, monitor, write=video_io)
                        r["round"] = round_index + 1
                        results.append(r)
                        print(f"{label}: step median {r['step_median_s']:.2f} s, stages "
                              + ", ".join(f"{k} {v:.2f}" for k, v in r["stages_s"].items()), flush=True)
        finally:
            if monitor is not None:
                monitor.__exit__(None, None, None)
    report = {
        "command": "python benchmarks/bench_edit.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"),
        "versions": versions(), "args": vars(args), "steps": args.steps,
        "guidance_scale": float(cfg.sampler.guidance), "video_io": video_io,
        "load_s": pipe.load_seconds, "isa_config": dataclasses.asdict(isa),
        "memory": {"cap_gib": args.memory_cap_gib, "setting": dataclasses.asdict(plan.memory_setting),
                   "tier": plan.memory_setting.describe(),
                   "reason": plan.memory_reason,
                   "estimate_gib": {"text": tier.text, "denoise": tier.denoise, "peak": tier.peak}},
        "results": results,
    }
    with open(json_path, "w") as handle:
        json.dump(report, handle, indent=1)
    table = markdown(report)
    with open(os.path.splitext(json_path)[0] + ".md", "w") as handle:
        handle.write(table)
    print(table)
    print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
