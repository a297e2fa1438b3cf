"""Attention benchmark: every working ISA backend against dense attention.

For each S (T = C = S/2, B = 1, H = 40, D = 128, bf16 by default) it prints and records:
median time (triton.testing.do_bench, CUDA events; with --repeats N the median of N
such medians, the methods interleaved) of dense SDPA on its cuDNN and flash
backends, of dense FlashAttention-3 when it is installed, and of each ISA backend;
speed-ups against each; ISA's (alpha = 0) relative L2 error and cosine similarity against
dense attention on random inputs and on a structured video-like input; and, at the sizes
in --breakdown-at, the time of each stage of each ISA backend. Every timing is recorded
with the GPU's SM clock, power and temperature while it ran (`gpu_monitor.py`), since
the H100 lowers its clock on its own under load. ISA's full part runs on
whichever dense kernel `dense_kernel_name` reports (printed with the versions). A backend
whose output disagrees with the "torch" reference backend gets no speed-up reported.

    python benchmarks/bench_attention.py --json docs/benchmarks_attention.json
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for the package
sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder, for gpu_monitor

from in_context_sparse_attention import BACKEND_NAMES, ISAConfig, editing_sparse_attention, full_attention
from in_context_sparse_attention.backends import get_backend
from in_context_sparse_attention.dense import dense_attention, dense_kernel_name
from in_context_sparse_attention.layout import BlockLayout
from in_context_sparse_attention.residual import GatedShortcut, add_residual

from gpu_monitor import GpuMonitor, describe
from gpu_monitor import environment as machine_environment

DENSE_BACKENDS = {"sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_flash": SDPBackend.FLASH_ATTENTION}
FLASH_ATTENTION_3 = "flash_attn_3"  # the dense baseline's name when FlashAttention-3 is installed
DENSE_LABELS = {"sdpa_cudnn": "cuDNN", "sdpa_flash": "flash", FLASH_ATTENTION_3: "FA3"}
REFERENCE_AGREEMENT = 1e-2  # max relative L2 between a kernel backend and the "torch" backend


def environment() -> dict:
    """Machine, GPU and library versions, with ISA's dense kernel and TileLang's version."""
    info = machine_environment(torch.device("cuda"))
    info["isa_dense_kernel"] = dense_kernel_name(torch.empty(1, 1, 1, 128, dtype=torch.bfloat16, device="cuda"))
    try:
        import tilelang

        info["tilelang"] = tilelang.__version__
    except ImportError:
        info["tilelang"] = None
    return info


def random_qkv(seq: int, heads: int, dim: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """Independent standard normal q, k, v: [1, S, H, D]."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(1, seq, heads, dim, generator=gen, device="cuda").to(dtype) for _ in range(3)]


def video_like_qkv(seq: int, heads: int, dim: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """Smooth random fields over a (frame, 32, 32) grid for the target half; the source
    half is the same field plus 10% noise (an edit whose source is close to its target).
    Returns q, k, v: [1, S, H, D] with T = C = S/2."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    frames = seq // 2 // (32 * 32)
    tensors = []
    for _ in range(3):
        coarse = torch.randn(1, heads * dim, max(2, frames // 4), 4, 4, generator=gen, device="cuda")
        field = F.interpolate(coarse, size=(frames, 32, 32), mode="trilinear", align_corners=False)
        target = field.flatten(2).transpose(1, 2).reshape(1, -1, heads, dim) * 2.0  # [1, T, H, D]
        source = target + 0.1 * torch.randn(target.shape, generator=gen, device="cuda")
        tensors.append(torch.cat([target, source], dim=1).to(dtype))
        del coarse, field, target, source
    return tensors


def dense_sdpa(q, k, v, backend: SDPBackend) -> torch.Tensor:
    """Dense attention on one SDPA backend: [B, S, H, D] in and out."""
    with sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def dense_baselines(q: torch.Tensor) -> dict:
    """The dense kernels to time, by name: SDPA's cuDNN and flash backends, and
    FlashAttention-3 when `dense_attention` finds it. Each maps [B, S, H, D] q, k, v to the output."""
    baselines = {name: (lambda q, k, v, b=backend: dense_sdpa(q, k, v, b)) for name, backend in DENSE_BACKENDS.items()}
    if dense_kernel_name(q) == "FlashAttention-3":
        baselines[FLASH_ATTENTION_3] = dense_attention
    return baselines


def agreement(x: torch.Tensor, ref: torch.Tensor) -> dict:
    """Relative L2 error and cosine similarity of x against ref (in fp32)."""
    x, ref = x.float().flatten(), ref.float().flatten()
    return {
        "rel_l2": ((x - ref).norm() / ref.norm()).item(),
        "cosine": F.cosine_similarity(x, ref, dim=0).item(),
        "finite": bool(torch.isfinite(x).all()),
    }


def median_ms(fn, warmup: int, rep: int) -> float:
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def timed(label: str, fn, warmup: int, rep: int, monitor: GpuMonitor) -> tuple[float, dict | None]:
    """The median ms of fn and the GPU's state while it was timed; prints both."""
    start = monitor.now()
    ms = median_ms(fn, warmup, rep)
    state = monitor.state_since(start)
    print(f"  {label}: {ms:.2f} ms ({describe(state)})", flush=True)
    return ms, state


def working_backends(names: list[str]) -> list[str]:
    """The ISA backends that import and run a small CUDA case; the others are reported."""
    q, k, v = random_qkv(300, 2, 128, torch.bfloat16, seed=1)
    reference = editing_sparse_attention(q, k, v, 150, 150, backend="torch")
    usable = []
    for name in names:
        try:
            out = editing_sparse_attention(q, k, v, 150, 150, backend=name)
        except Exception as error:  # any failure to import, compile or run: not usable here
            print(f"backend {name!r} skipped: {error}")
            continue
        err = agreement(out, reference)["rel_l2"]
        if err > REFERENCE_AGREEMENT:
            print(f"backend {name!r} skipped: relative L2 {err:.2e} against 'torch' on a small case")
            continue
        usable.append(name)
    return usable


def stage_breakdown(q, k, v, t_len: int, c_len: int, backend: str, config: ISAConfig, iters: int) -> dict:
    """Median ms of each stage of `editing_sparse_attention` (its steps, run one by one
    between CUDA events), with a per-token alpha tensor as the model passes it. A backend
    that fuses the residual into its scatter and sparse kernel has it timed there."""
    impl = get_backend(backend)
    gather, scatter = impl.gather_blocks, impl.scatter_blocks
    layout = BlockLayout(seq_len=q.shape[1], target_len=t_len, block_size=config.block_size)
    alpha = torch.rand(1, q.shape[1], 1, 1, device="cuda") * 0.25
    fused = impl.fuses_residual  # the residual is added by the scatter and the sparse kernel
    names = ["pooling", "selection", "full part (gather + dense + scatter)", "sparse kernel", "residual and output"]
    samples = {name: [] for name in names}
    for _ in range(iters + 3):
        events = [torch.cuda.Event(enable_timing=True) for _ in range(len(names) + 1)]
        events[0].record()
        means = [impl.pool_blocks(x, layout) for x in (q, k, v)]
        events[1].record()
        plan = impl.make_plan(*means, layout, config)
        events[2].record()
        residual = {"residual": GatedShortcut.of(plan, alpha, q.device)} if fused else {}
        out_padded = torch.empty(1, layout.padded_len, q.shape[2], q.shape[3], dtype=q.dtype, device="cuda")
        full_attention.full_block_attention(q, k, v, plan, out_padded, gather=gather, scatter=scatter, **residual)
        events[3].record()
        impl.sparse_block_attention(q, k, v, plan, out_padded, **residual)
        events[4].record()
        if not fused:
            add_residual(out_padded, plan, alpha)
        out_padded[:, : layout.seq_len].contiguous()
        events[5].record()
        torch.cuda.synchronize()
        for i, name in enumerate(names):
            samples[name].append(events[i].elapsed_time(events[i + 1]))
    result = {name: statistics.median(times[3:]) for name, times in samples.items()}
    result["total (with alpha tensor)"] = sum(result[name] for name in names)

    num_kv_tokens = layout.real_tokens_in(plan.kv_blocks.shape[-1])
    q_rows = gather(q, plan.full_query_blocks, layout.block_size, plan.full_query_blocks.shape[-1] * layout.block_size)
    k_rows, v_rows = (gather(x, plan.kv_blocks, layout.block_size, num_kv_tokens) for x in (k, v))
    dense_alone = functools.partial(dense_attention, q_rows, k_rows, v_rows, layout="bhsd")
    result["of which dense kernel alone"] = median_ms(dense_alone, 50, 300)
    result["shapes"] = {"full_query_tokens": q_rows.shape[2], "pruned_kv_tokens": k_rows.shape[2]}
    if backend == "triton":
        from in_context_sparse_attention import triton_kernels

        result["shapes"]["sparse_kernel_config"] = str(triton_kernels.sparse_block_attention_kernel_tuned.best_config)
    return result


def run_size(seq: int, args, backends: list[str], monitor: GpuMonitor) -> dict:
    t_len = c_len = seq // 2
    config = ISAConfig()
    dtype = getattr(torch, args.dtype)
    row = {
        "seq_len": seq,
        "target_len": t_len,
        "source_len": c_len,
        "heads": args.heads,
        "head_dim": args.dim,
        "dtype": args.dtype,
    }
    q, k, v = random_qkv(seq, args.heads, args.dim, dtype, seed=seq)

    baselines = dense_baselines(q)
    dense_out = dense_sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION)
    torch_out = editing_sparse_attention(q, k, v, t_len, c_len, config=config, backend="torch")
    isa_calls, row["isa"], out = {}, {}, None
    for name in backends:
        isa_calls[name] = functools.partial(
            editing_sparse_attention, q, k, v, t_len, c_len, config=config, backend=name
        )
        out = isa_calls[name]()  # also compiles and autotunes before any timing
        entry = {"vs_dense_random": agreement(out, dense_out), "vs_torch_backend": agreement(out, torch_out)}
        entry["correct"] = (
            entry["vs_torch_backend"]["finite"] and entry["vs_torch_backend"]["rel_l2"] <= REFERENCE_AGREEMENT
        )
        entry["ms_runs"], entry["gpu_states"] = [], []
        row["isa"][name] = entry
    row["dense_ms_runs"] = {name: [] for name in baselines}
    row["dense_gpu_states"] = {name: [] for name in baselines}
    for run in range(args.repeats):  # interleaved, so that every method meets the same GPU states
        for name, fn in baselines.items():
            ms, state = timed(
                f"S={seq} run {run + 1} dense {name}", functools.partial(fn, q, k, v), args.warmup, args.rep, monitor
            )
            row["dense_ms_runs"][name].append(ms)
            row["dense_gpu_states"][name].append(state)
        for name in backends:
            ms, state = timed(f"S={seq} run {run + 1} ISA {name}", isa_calls[name], args.warmup, args.rep, monitor)
            row["isa"][name]["ms_runs"].append(ms)
            row["isa"][name]["gpu_states"].append(state)
    row["dense_ms"] = {name: statistics.median(runs) for name, runs in row["dense_ms_runs"].items()}
    for name in backends:
        entry = row["isa"][name]
        entry["ms"] = statistics.median(entry["ms_runs"])
        entry["speedup"] = (
            {dense: row["dense_ms"][dense] / entry["ms"] for dense in baselines} if entry["correct"] else None
        )
    del dense_out, torch_out, out, isa_calls

    if seq in args.breakdown_at:
        row["breakdown_ms"] = {
            name: stage_breakdown(q, k, v, t_len, c_len, name, config, iters=10) for name in backends
        }
    del q, k, v
    q, k, v = video_like_qkv(seq, args.heads, args.dim, dtype, seed=seq + 1)
    dense_out = dense_sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION)
    for name in backends:
        out = editing_sparse_attention(q, k, v, t_len, c_len, config=config, backend=name)
        row["isa"][name]["vs_dense_video"] = agreement(out, dense_out)
    del q, k, v, dense_out
    torch.cuda.empty_cache()
    return row


def markdown_table(rows: list[dict], backends: list[str]) -> str:
    dense_names = list(rows[0]["dense_ms"]) if rows else []
    labels = [DENSE_LABELS[name] for name in dense_names]
    lines = [
        "| S | "
        + " | ".join(f"dense {label} ms" for label in labels)
        + " | ISA backend | ISA ms | "
        + " | ".join(f"speed-up vs {label}" for label in labels)
        + " | rel L2 / cos vs dense (random) | rel L2 / cos vs dense (video-like) |",
        "| ---: | " + "---: | " * len(labels) + "--- | ---: | " + "---: | " * len(labels) + "--- | --- |",
    ]
    for row in rows:
        dense = " | ".join(f"{row['dense_ms'][name]:.1f}" for name in dense_names)
        for name in backends:
            entry = row["isa"][name]
            speed = entry["speedup"]
            ups = " | ".join(f"{speed[dn]:.2f}x" if speed else "refused" for dn in dense_names)
            rnd, vid = entry["vs_dense_random"], entry["vs_dense_video"]
            lines.append(
                f"| {row['seq_len']:,} | {dense} | {name} | {entry['ms']:.1f} | {ups} "
                f"| {rnd['rel_l2']:.3f} / {rnd['cosine']:.4f} | {vid['rel_l2']:.3f} / {vid['cosine']:.4f} |"
            )
    return "\n".join(lines)


def breakdown_table(rows: list[dict]) -> str:
    lines = []
    for row in rows:
        per_backend = row.get("breakdown_ms")
        if not per_backend:
            continue
        names = list(per_backend)
        stages = [stage for stage in per_backend[names[0]] if stage != "shapes"]
        lines += [f"ISA stages at S = {row['seq_len']:,} (median ms, alpha tensor):", ""]
        lines += ["| stage | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
        lines += [
            f"| {stage} | " + " | ".join(f"{per_backend[n][stage]:.2f}" for n in names) + " |" for stage in stages
        ]
        lines += [""] + [f"{n} shapes: {per_backend[n]['shapes']}" for n in names] + [""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[16384, 32768, 65536, 131072])
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--backends", nargs="+", default=list(BACKEND_NAMES), help="ISA backends to try")
    parser.add_argument(
        "--breakdown-at",
        type=int,
        nargs="*",
        default=[65536],
        help="S values with a stage breakdown of each ISA backend",
    )
    parser.add_argument("--warmup", type=int, default=100, help="do_bench warm-up, ms")
    parser.add_argument("--rep", type=int, default=500, help="do_bench repetition, ms")
    parser.add_argument(
        "--repeats", type=int, default=1, help="interleaved timings of every method; the median is reported"
    )
    parser.add_argument("--json", default="docs/benchmarks_attention.json")
    parser.add_argument("--markdown", default=None, help="also write the tables to this file")
    args = parser.parse_args()

    env = environment()
    for key, value in env.items():
        print(f"{key}: {value}")
    print(f"shapes: B=1, H={args.heads}, D={args.dim}, {args.dtype}, T = C = S/2, S in {args.seq_lens}")
    print(f"ISA {ISAConfig()}")
    backends = working_backends(args.backends)
    print(f"ISA backends: {backends}")
    rows = []
    with GpuMonitor(torch.cuda.current_device()) as monitor:
        for seq in args.seq_lens:
            rows.append(run_size(seq, args, backends, monitor))
            print(json.dumps(rows[-1]), flush=True)
    tables = markdown_table(rows, backends) + "\n\n" + breakdown_table(rows)
    with open(args.json, "w") as handle:
        json.dump({"environment": env, "backends": backends, "results": rows}, handle, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(tables + "\n")
    print(tables)


if __name__ == "__main__":
    main()
