"""One full WanDiT forward with dense self-attention and with ISA, at LIVEditor's working size.

Default shape: 81 frames at 544x960 -> latent [1, 16, 21, 68, 120] -> T = C = 21*34*60 =
42,840 tokens (S = 85,680), batch 1, random bf16 weights made on the GPU (the 14B model is
never built on the host). For each backend: seconds per forward (median of --repeats after
one warm-up forward that also pays Triton autotuning / TileLang compilation), peak GPU
memory, the time spent inside the self-attention op (CUDA events around each call;
projections, RoPE and cross-attention excluded), hence attention's share of the forward,
the time in the float64 RoPE rotations, and the GPU's SM clock, power and temperature over
the timed forwards (nvidia-smi, `gpu_monitor.py`).
ISA outputs are compared with the dense output; no speed-up is reported for a backend whose
output is not finite.

    python benchmarks/bench_dit.py --json out.json            # the 14B model on a GPU
    python benchmarks/bench_dit.py --tiny --frames 5 --height 64 --width 64 --backends dense,torch  # CPU check
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root holds model.py
sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder, for gpu_monitor

import model as model_module
from in_context_sparse_attention import ISAConfig, dense_kernel_name
from model import TINY_CONFIG
from wanx.attention import LVSAOptions, SelfAttentionMethod, make_attention
from wanx.random_weights import random_dit

from gpu_monitor import GpuMonitor, describe


class OpTimer:
    """Times the calls of wrapped functions under a label (CUDA events on GPU, no syncs)."""

    def __init__(self, use_cuda: bool):
        self.use_cuda = use_cuda
        self.spans = {}

    def wrap(self, fn, label, only=None):
        """`fn` timed under `label`; calls for which `only(*args)` is false are not timed."""

        def timed(*args, **kwargs):
            if only is not None and not only(*args):
                return fn(*args, **kwargs)
            if self.use_cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn(*args, **kwargs)
                end.record()
            else:
                start = time.perf_counter()
                out = fn(*args, **kwargs)
                end = time.perf_counter()
            self.spans.setdefault(label, []).append((start, end))
            return out

        return timed

    def take_seconds(self) -> dict:
        """label -> seconds spent in its calls (synchronises first); clears the record."""
        if self.use_cuda:
            torch.cuda.synchronize()
            totals = {k: sum(s.elapsed_time(e) for s, e in v) / 1000.0 for k, v in self.spans.items()}
        else:
            totals = {k: sum(e - s for s, e in v) for k, v in self.spans.items()}
        self.spans = {}
        return totals


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class TimedAttention(SelfAttentionMethod):
    """A self-attention method whose calls `timer` adds up under "attention"."""

    def __init__(self, inner: SelfAttentionMethod, timer):
        self.inner, self.name, self.uses_gate = inner, inner.name, inner.uses_gate
        self.timed_call = timer.wrap(inner.__call__, "attention")

    def __call__(self, q, k, v, layout, gate=None):
        return self.timed_call(q, k, v, layout, gate)


def method_options(backend: str):
    """The options each method runs with here: ISA's and LVSA's defaults (LVSA on its default kernel)."""
    if backend == "dense":
        return None
    if backend == "lvsa":
        return LVSAOptions()
    return ISAConfig()


def run_backend(model, backend, inputs, repeats, device, timer, warmups=1, monitor=None):
    """`warmups` untimed forwards plus `repeats` timed ones -> (result dict, last output); with a
    `GpuMonitor`, the GPU's clock, power and temperature over the timed forwards too."""
    model.set_attention(TimedAttention(make_attention(backend, method_options(backend)), timer))
    with torch.no_grad():
        start = time.perf_counter()
        for _ in range(warmups):
            model(*inputs)
        synchronize(device)
        warmup = time.perf_counter() - start if warmups else None
        timer.take_seconds()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        totals, attention, rope = [], [], []
        timed_from = GpuMonitor.now()
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            out = model(*inputs)
            synchronize(device)
            totals.append(time.perf_counter() - start)
            ops = timer.take_seconds()
            attention.append(ops.get("attention", 0.0))
            rope.append(ops.get("rope", 0.0))
    result = {
        "backend": backend,
        "seconds_per_forward": statistics.median(totals),
        "all_seconds": totals,
        "attention_seconds": statistics.median(attention),
        "rope_seconds": statistics.median(rope),
        "warmup_seconds": warmup,
        "peak_gpu_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "gpu_state": monitor.state_since(timed_from) if monitor is not None else None,
    }
    result["attention_share"] = result["attention_seconds"] / result["seconds_per_forward"]
    return result, out.float()


def versions() -> dict:
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "tilelang", "diffusers"):
        try:
            found[name] = importlib.import_module(name).__version__
        except ImportError:
            found[name] = None
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--frames", type=int, default=81, help="video frames (4k+1); latent frames = (frames - 1) / 4 + 1"
    )
    parser.add_argument("--height", type=int, default=544)
    parser.add_argument("--width", type=int, default=960)
    parser.add_argument(
        "--backends", default="dense,triton,tilelang", help="comma-separated: dense, torch, triton, tilelang"
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed forwards per backend first (0: only where the kernels are already warm, "
                             "e.g. dense after another backend in the same process)")
    parser.add_argument("--tiny", action="store_true", help="the tiny test model instead of the 14B one")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.repeats < 1 or args.warmup < 0:
        parser.error(f"--repeats must be at least 1 and --warmup at least 0; got {args.repeats} and {args.warmup}")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = dict(TINY_CONFIG) if args.tiny else {}
    latent_shape = (1, 16, (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8)
    tokens = latent_shape[2] * (latent_shape[3] // 2) * (latent_shape[4] // 2)
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python"] + sys.argv),
        "machine": platform.node(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "versions": versions(),
        "model": "tiny" if args.tiny else "Wan 2.2 A14B expert + LIVEditor (random weights)",
        "dtype": str(dtype),
        "latent_shape": latent_shape,
        "target_tokens": tokens,
        "source_tokens": tokens,
        "isa_config": dataclasses.asdict(ISAConfig()),
        "dense_kernel": dense_kernel_name(torch.empty(1, 1, 1, 128, dtype=dtype, device=device)),
    }
    print(json.dumps(info, indent=1))

    start = time.perf_counter()
    model = random_dit(config, device=device, dtype=dtype, seed=args.seed)
    synchronize(device)
    info["build_seconds"] = time.perf_counter() - start
    info["parameters"] = model.parameter_report()
    print(f"model built in {info['build_seconds']:.1f} s: {info['parameters']}")

    g = torch.Generator(device="cpu").manual_seed(args.seed)
    text_dim = model.config.text_dim
    inputs = (
        torch.randn(latent_shape, generator=g).to(device),
        torch.randn(latent_shape, generator=g).to(device),
        torch.tensor([500.0], device=device),
        [torch.randn(120, text_dim, generator=g).to(device=device, dtype=dtype)],
    )

    timer = OpTimer(device.type == "cuda")
    model_module.apply_rope = timer.wrap(model_module.apply_rope, "rope")

    monitor = GpuMonitor(torch.cuda.current_device()) if device.type == "cuda" else None
    results, reference = [], None
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        try:
            result, out = run_backend(model, backend, inputs, args.repeats, device, timer, args.warmup, monitor)
        except ValueError as error:
            print(f"{backend}: skipped: {error}")
            results.append({"backend": backend, "skipped": str(error)})
            continue
        result["finite"] = bool(torch.isfinite(out).all())
        if backend == "dense":
            reference = out
        elif reference is not None:
            result["rel_l2_error_vs_dense"] = float((out - reference).norm() / reference.norm())
            result["cosine_vs_dense"] = float(
                torch.nn.functional.cosine_similarity(out.flatten(), reference.flatten(), dim=0)
            )
        results.append(result)
        print(json.dumps(result))
        if args.json:  # after every backend, so that a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump({"info": info, "results": results}, f, indent=1)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if monitor is not None:
        monitor.close()
    dense = next((r for r in results if r["backend"] == "dense" and "skipped" not in r), None)
    lines = [
        "| self-attention | s / forward | attention s | attention share | RoPE s | peak GPU GiB "
        "| speed-up vs dense | rel. L2 error vs dense | GPU while timed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['backend']} | skipped: {r['skipped'].splitlines()[0][:80]} | | | | | | | |")
            continue
        speedup = (
            "refused (output not finite)"
            if not r["finite"]
            else (f"{dense['seconds_per_forward'] / r['seconds_per_forward']:.2f}x" if dense else "n/a")
        )
        peak = f"{r['peak_gpu_gib']:.1f}" if r["peak_gpu_gib"] is not None else "n/a"
        error = f"{r['rel_l2_error_vs_dense']:.3f}" if "rel_l2_error_vs_dense" in r else "-"
        lines.append(
            f"| {r['backend']} | {r['seconds_per_forward']:.2f} | {r['attention_seconds']:.2f} | "
            f"{100 * r['attention_share']:.0f}% | {r['rope_seconds']:.2f} | {peak} | {speedup} | {error} | "
            f"{describe(r['gpu_state']) if device.type == 'cuda' else 'CPU'} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "results": results, "table": table}, f, indent=1)


if __name__ == "__main__":
    main()
