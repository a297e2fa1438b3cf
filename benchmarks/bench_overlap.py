"""ISA with its two halves on one stream and on two streams (ISA_CONCURRENT_HALVES), in one process.

    python benchmarks/bench_overlap.py --seq-lens 32768 65536 131072 --json docs/bench_overlap.json

For each S (T = C = S/2, B = 1, H = 40, D = 128, bf16, random inputs, a per-token alpha
tensor as the DiT passes it) and each ISA backend: the call with the sparse half after the
full half on the caller's stream ("one stream") and with the sparse half on a second stream
("two streams"), interleaved --rounds times so that both meet the same GPU states, next to
dense attention on the same kernel ISA's full half uses. Every timing is the median of
`triton.testing.do_bench` and is recorded with the GPU's SM clock, power and temperature.
The two outputs are compared bit for bit.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for the package

from bench_attention import environment, random_qkv, working_backends  # noqa: E402

from in_context_sparse_attention import ISAConfig, editing_sparse_attention  # noqa: E402
from in_context_sparse_attention.dense import dense_attention, dense_kernel_name  # noqa: E402

from gpu_monitor import GpuMonitor, describe  # noqa: E402

MODES = {"one stream": "0", "two streams": "1"}


def timed(fn, warmup: int, rep: int, monitor: GpuMonitor) -> dict:
    start = monitor.now()
    ms = triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    return {"ms": ms, "gpu": monitor.state_since(start)}


def with_mode(mode: str, fn):
    """fn run with ISA_CONCURRENT_HALVES set for `mode` (restored afterwards)."""

    def run():
        before = os.environ.get("ISA_CONCURRENT_HALVES")
        os.environ["ISA_CONCURRENT_HALVES"] = MODES[mode]
        try:
            return fn()
        finally:
            if before is None:
                del os.environ["ISA_CONCURRENT_HALVES"]
            else:
                os.environ["ISA_CONCURRENT_HALVES"] = before

    return run


def run_size(seq: int, args, backends: list[str], monitor: GpuMonitor) -> dict:
    q, k, v = random_qkv(seq, args.heads, args.dim, torch.bfloat16, seed=0)
    alpha = torch.rand(1, seq, 1, 1, device="cuda") * 0.25
    half = seq // 2
    calls = {
        backend: {
            mode: with_mode(
                mode, lambda b=backend: editing_sparse_attention(q, k, v, half, half, alpha, ISAConfig(), backend=b)
            )
            for mode in MODES
        }
        for backend in backends
    }
    row = {"seq_len": seq, "dense_kernel": dense_kernel_name(q), "dense": [], "backends": {}}
    for backend, modes in calls.items():
        outputs = {mode: call() for mode, call in modes.items()}  # first calls: autotuning, compilation
        torch.cuda.synchronize()
        same = torch.equal(outputs["one stream"], outputs["two streams"])
        row["backends"][backend] = {"same_bits": same, **{mode: [] for mode in MODES}}
    for _ in range(args.rounds):
        row["dense"].append(timed(lambda: dense_attention(q, k, v), args.warmup, args.rep, monitor))
        for backend, modes in calls.items():
            for mode, call in modes.items():
                row["backends"][backend][mode].append(timed(call, args.warmup, args.rep, monitor))
    row["dense_ms"] = statistics.median(t["ms"] for t in row["dense"])
    print(f"S = {seq}: dense {row['dense_kernel']} {row['dense_ms']:.2f} ms", flush=True)
    for backend, result in row["backends"].items():
        for mode in MODES:
            result[f"{mode} ms"] = statistics.median(t["ms"] for t in result[mode])
            states = "; ".join(describe(t["gpu"]) for t in result[mode])
            print(f"  {backend} {mode}: {result[f'{mode} ms']:.2f} ms ({states})", flush=True)
    return row


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| S | dense ms | backend | one stream ms | two streams ms | saved ms | vs dense (two streams) | same bits |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        for backend, result in row["backends"].items():
            one, two = result["one stream ms"], result["two streams ms"]
            lines.append(
                f"| {row['seq_len']:,} | {row['dense_ms']:.2f} | {backend} | {one:.2f} | {two:.2f} | {one - two:.2f} "
                f"| {row['dense_ms'] / two:.2f}x | {'yes' if result['same_bits'] else 'NO'} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[32768, 65536, 131072])
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--backends", nargs="+", default=["triton", "tilelang"])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timings of each mode")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    parser.add_argument("--rep", type=int, default=200, help="do_bench repetition, ms")
    parser.add_argument("--json", default="docs/bench_overlap.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_overlap.py needs a CUDA GPU")

    env = environment()
    print(json.dumps(env))
    backends = working_backends(args.backends)
    rows = []
    with GpuMonitor(torch.cuda.current_device()) as monitor:
        for seq in args.seq_lens:
            rows.append(run_size(seq, args, backends, monitor))
    Path(args.json).write_text(json.dumps({"environment": env, "args": vars(args), "results": rows}, indent=1))
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
