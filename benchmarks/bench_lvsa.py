"""LVSA benchmark: Long-Video Sparse Attention (FlexAttention, gathered frames) against dense attention.

For each clip length (161 and 321 video frames by default, i.e. 41 and 81 latent frames, at
544x960: 2,040 tokens per latent frame, S = 2 * F * 2,040 = 167,280 and 330,480 tokens for
[target | source]; B = 1, 40 heads, D = 128, bf16) it prints and records:

- the median time (triton.testing.do_bench, CUDA events) of dense attention on SDPA's
  cuDNN kernel and on FlashAttention-3 when it is importable (`flash_attn_interface` or
  `fa3_fwd_interface`), and of LVSA (`lvsa_attention`) at the first --steps denoising steps
  (the keyframes move with the step) on the kernels --kernels names:
  "flex": backend "flex", FlexAttention's default Triton kernel and, when `flash_attn.cute`
  is importable, its experimental FLASH one ("flex_flash");
  "gather": backend "gather", each group of query frames with their key frames gathered into
  buffers and one dense call (FlashAttention-3 when importable), once per --group-frames
  value ("gather_g8": at most 8 query frames per dense call);
- LVSA's attended fraction (share of the (query, key) token pairs it attends) and, for
  "flex", the share of 128 x 128 tiles the kernel computes (partial tiles at frame
  boundaries included; "gather" computes the attended pairs alone, shown as "-");
- on CUDA, the peak memory a call takes beyond its inputs and output (JSON and the log);
- the achieved fraction of FlashAttention-3's speed per attended FLOP,
  attended fraction * FA3 time / LVSA time; the goal is >= 0.85, i.e.
  LVSA time <= attended fraction * FA3 time / 0.85;
- the relative L2 error of LVSA's full-size output against a float32 reference computed
  for --check-rows sampled query rows of two heads (every key, the LVSA mask).

    python benchmarks/bench_lvsa.py                        # GPU; writes docs/bench_lvsa.json
    python benchmarks/bench_lvsa.py --frames 321 --heads 40 --warmup 100 --rep 500
    python benchmarks/bench_lvsa.py --kernels gather --group-frames 8 4 2 1
    python benchmarks/bench_lvsa.py --smoke                # tiny sizes on the CPU, in seconds

--smoke defaults to tiny sizes (options given still apply), runs FlexAttention eagerly (no
compile) and the gather backend on SDPA, times with a wall clock and writes JSON only where --json says: it checks the
script, not the speed.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.metadata
import importlib.util
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for the package
sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder, for gpu_monitor

from in_context_sparse_attention.dense import dense_kernel_name  # noqa: E402
from long_video_sparse_attention import (  # noqa: E402
    GROUP_FRAMES,
    LVSAConfig,
    attended_fraction,
    block_structure,
    cached_block_mask,
    flex_lvsa_attention,
    keyframe_interval,
    lvsa_attention,
    lvsa_frame_mask,
    token_frame_index,
)

from gpu_monitor import environment  # noqa: E402

REPOSITORY = Path(__file__).resolve().parents[1]
GOAL = 0.85  # LVSA should reach this fraction of FlashAttention-3's speed per attended FLOP
KERNELS = ("flex", "gather")
SMOKE = dict(frames=[85, 105], height=48, width=64, heads=2, head_dim=32, dtype="float32", check_rows=64)


def latent_frames(video_frames: int) -> int:
    """Wan's VAE keeps the first frame and compresses every 4 after it: 4k + 1 frames -> k + 1."""
    if video_frames < 1 or (video_frames - 1) % 4:
        raise ValueError(f"--frames must be 4k + 1 video frames (e.g. 81, 161, 321), got {video_frames}")
    return (video_frames - 1) // 4 + 1


def flash_attention_3():
    """FlashAttention-3's flash_attn_func, from either of its packages, or None."""
    for module in ("flash_attn_interface", "fa3_fwd_interface"):
        try:
            return __import__(module).flash_attn_func
        except ImportError:
            continue
    return None


def median_ms(fn, device: torch.device, warmup: int, rep: int) -> float:
    """Median time of fn() in ms: do_bench with warmup / rep in ms on CUDA; on the CPU the
    median of 3 wall-clock runs after one warm-up run."""
    if device.type == "cuda":
        import triton

        return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def dense_baselines(device: torch.device, dtype: torch.dtype) -> dict:
    """name -> dense attention on [B, S, H, D] tensors."""

    def sdpa(q, k, v):
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        if device.type != "cuda":
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)

    baselines = {"sdpa_cudnn" if device.type == "cuda" else "sdpa": sdpa}
    flash_attn_func = flash_attention_3()
    if device.type == "cuda" and flash_attn_func is not None and dtype in (torch.bfloat16, torch.float16):

        def fa3(q, k, v):
            out = flash_attn_func(q, k, v)
            return out[0] if isinstance(out, tuple) else out  # some builds also return the log-sum-exp

        baselines["fa3"] = fa3
    return baselines


def kernel_list(text: str) -> list[str]:
    """--kernels: comma-separated names out of KERNELS."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in KERNELS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(KERNELS)} (comma-separated), got {text!r}")
    return names


def lvsa_kernels(device: torch.device, kernels: list[str], group_frames: list[int]) -> dict:
    """name -> (backend, kernel_options) of the LVSA kernels to time.

    "flex": FlexAttention's default (Triton) kernel, and its experimental FlashAttention
    (CuTe-DSL) one when flash_attn.cute is importable; "gather": one entry per group size,
    "gather_g{n}" with at most n query frames per dense call."""
    chosen = {}
    if "flex" in kernels:
        chosen["flex"] = ("flex", None)
        try:
            flash_cute = device.type == "cuda" and importlib.util.find_spec("flash_attn.cute") is not None
        except ImportError:
            flash_cute = False
        if flash_cute:
            chosen["flex_flash"] = ("flex", {"BACKEND": "FLASH"})
    if "gather" in kernels:
        for frames in group_frames:
            chosen[f"gather_g{frames}"] = ("gather", {"group_frames": frames})
    return chosen


def run_with_peak_memory(fn, device: torch.device) -> tuple[torch.Tensor, float | None]:
    """fn()'s output, and on CUDA the memory it took at its peak beyond what was allocated
    before the call and the output it returns, in GB (None on the CPU)."""
    if device.type != "cuda":
        return fn(), None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    extra = torch.cuda.max_memory_allocated(device) - before - out.numel() * out.element_size()
    return out, extra / 1e9


def sampled_rows_error(q, k, v, out, frame_mask, tokens_per_frame, rows: int) -> float:
    """Relative L2 error of out [1, S, H, D] on `rows` query rows spread over the sequence (both
    parts, many frames) and two heads, against float32 masked softmax attention over every key."""
    seq, heads, dim = q.shape[1], q.shape[2], q.shape[3]
    frames = token_frame_index(frame_mask.shape[0], tokens_per_frame, device=q.device)
    query_rows = torch.linspace(0, seq - 1, min(rows, seq), device=q.device).round().long()
    allowed = frame_mask.to(q.device)[frames[query_rows]][:, frames]  # [rows, S]
    errors, norms = 0.0, 0.0
    for head in sorted({0, heads - 1}):
        scores = q[0, query_rows, head].float() @ k[0, :, head].float().T * dim**-0.5
        expected = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1) @ v[0, :, head].float()
        errors += float((out[0, query_rows, head].float() - expected).square().sum())
        norms += float(expected.square().sum())
    return (errors / norms) ** 0.5


def run_clip(video_frames: int, args, device: torch.device, dtype: torch.dtype, config: LVSAConfig) -> dict:
    """Times and errors for one clip length."""
    num_frames = latent_frames(video_frames)
    tokens_per_frame = (args.height // 16) * (args.width // 16)
    seq = 2 * num_frames * tokens_per_frame
    shape = (1, seq, args.heads, args.head_dim)
    print(f"\n{video_frames} video frames -> F = {num_frames} latent frames x {tokens_per_frame} tokens, "
          f"q/k/v {list(shape)} {dtype}, kfi = {keyframe_interval(num_frames, config)}", flush=True)
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(shape, generator=generator, device=device, dtype=dtype) for _ in range(3))
    dense_flops = 4.0 * shape[0] * shape[2] * seq * seq * shape[3]

    dense_ms = {}
    for name, dense_attend in dense_baselines(device, dtype).items():
        try:
            dense_ms[name] = median_ms(functools.partial(dense_attend, q, k, v), device, args.warmup, args.rep)
        except RuntimeError as error:  # e.g. no cuDNN attention kernel for this GPU or dtype
            print(f"  dense {name}: not run ({str(error).splitlines()[0]})")
            continue
        print(f"  dense {name}: {dense_ms[name]:.2f} ms, {dense_flops / dense_ms[name] / 1e9:.0f} TFLOP/s", flush=True)

    steps = []
    for step in range(args.steps):
        frame_mask = lvsa_frame_mask(num_frames, step, config)
        fraction = attended_fraction(frame_mask)
        tiles = block_structure(frame_mask.to(device), tokens_per_frame).computed_fraction
        for kernel, (backend, kernel_options) in lvsa_kernels(device, args.kernels, args.group_frames).items():
            if args.smoke and backend == "flex":  # eager FlexAttention: no compile on the CPU
                block_mask = cached_block_mask(num_frames, tokens_per_frame, 2, step, config, device)
                attend = functools.partial(flex_lvsa_attention, q, k, v, block_mask, compiled=False)
            else:
                attend = functools.partial(
                    lvsa_attention, q, k, v, num_frames, tokens_per_frame, step, config, backend,
                    kernel_options=kernel_options,
                )
            try:
                lvsa_ms = median_ms(attend, device, args.warmup, args.rep)
            except Exception as error:  # an optional kernel that does not build here: say so and go on
                reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                print(f"  LVSA {kernel} step {step}: not run ({reason})")
                continue
            out, extra_gb = run_with_peak_memory(attend, device)
            relative_error = sampled_rows_error(q, k, v, out, frame_mask, tokens_per_frame, args.check_rows)
            del out
            row = {
                "step": step,
                "kernel": kernel,
                "backend": backend,
                "kernel_options": kernel_options,
                "dense_kernel": dense_kernel_name(q) if backend == "gather" else None,
                "attended_fraction": fraction,
                "computed_tile_fraction": tiles if backend == "flex" else None,
                "peak_extra_gb": extra_gb,
                "lvsa_ms": lvsa_ms,
                "lvsa_attended_tflops": fraction * dense_flops / lvsa_ms / 1e9,
                "relative_l2_sampled_rows": relative_error,
            }
            for name, ms in dense_ms.items():
                row[f"speedup_vs_{name}"] = ms / lvsa_ms
                row[f"speed_per_attended_flop_vs_{name}"] = fraction * ms / lvsa_ms
            if "fa3" in dense_ms:
                row["meets_goal"] = row["speed_per_attended_flop_vs_fa3"] >= GOAL
            details = f"tiles {tiles:.3f}" if backend == "flex" else f"on {row['dense_kernel']}"
            memory = f", peak extra {extra_gb:.2f} GB" if extra_gb is not None else ""
            print(f"  LVSA {kernel} step {step}: attended {fraction:.3f}, {details}, {lvsa_ms:.2f} ms, "
                  f"{row['lvsa_attended_tflops']:.0f} attended TFLOP/s, rel. L2 {relative_error:.2e}{memory}"
                  + "".join(f", x{ms / lvsa_ms:.2f} vs {name}" for name, ms in dense_ms.items()), flush=True)
            steps.append(row)
    del q, k, v
    return {
        "video_frames": video_frames,
        "latent_frames": num_frames,
        "tokens_per_frame": tokens_per_frame,
        "seq_len": seq,
        "batch": shape[0],
        "heads": args.heads,
        "head_dim": args.head_dim,
        "dtype": str(dtype).replace("torch.", ""),
        "keyframe_interval": keyframe_interval(num_frames, config),
        "dense_ms": dense_ms,
        "dense_tflops": {name: dense_flops / ms / 1e9 for name, ms in dense_ms.items()},
        "lvsa": steps,
    }


def markdown_table(results: list[dict]) -> str:
    """One row per clip and step."""

    def cell(value, pattern):
        return pattern.format(value) if value is not None else "-"

    lines = [
        "| video frames | F | S | step | kernel | attended | tiles computed | dense cuDNN ms | dense FA3 ms | LVSA ms "
        f"| speed-up vs FA3 | FA3 speed per attended FLOP (goal >= {GOAL}) | rel. L2 |",
        "| ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for clip in results:
        dense = clip["dense_ms"]
        for row in clip["lvsa"]:
            lines.append(
                f"| {clip['video_frames']} | {clip['latent_frames']} | {clip['seq_len']:,} | {row['step']} "
                f"| {row['kernel']} | {row['attended_fraction']:.3f} "
                f"| {cell(row['computed_tile_fraction'], '{:.3f}')} "
                f"| {cell(dense.get('sdpa_cudnn'), '{:.1f}')} | {cell(dense.get('fa3'), '{:.1f}')} "
                f"| {row['lvsa_ms']:.1f} | {cell(row.get('speedup_vs_fa3'), 'x{:.2f}')} "
                f"| {cell(row.get('speed_per_attended_flop_vs_fa3'), '{:.2f}')} "
                f"| {row['relative_l2_sampled_rows']:.1e} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[161, 321], help="video frames per clip, 4k + 1")
    parser.add_argument("--height", type=int, default=544)
    parser.add_argument("--width", type=int, default=960)
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--steps", type=int, default=2, help="denoising steps timed: 0 .. steps-1")
    parser.add_argument("--warmup", type=int, default=100, help="do_bench warm-up, ms")
    parser.add_argument("--rep", type=int, default=500, help="do_bench repetition, ms")
    parser.add_argument("--check-rows", type=int, default=1024, help="query rows of the error check")
    parser.add_argument("--json", default=None, help="JSON output (default docs/bench_lvsa.json, none with --smoke)")
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    parser.add_argument("--kernels", type=kernel_list, default=list(KERNELS),
                        help=f"LVSA kernels to time, comma-separated (default {','.join(KERNELS)})")
    parser.add_argument("--group-frames", type=int, nargs="+", default=[GROUP_FRAMES, 1],
                        help="kernel gather: most query frames per dense call, one row per value")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, eager FlexAttention")
    args = parser.parse_args()
    if args.smoke:
        for name, value in SMOKE.items():  # tiny defaults; what the command line sets stays
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
        device = torch.device("cpu")
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA GPU (or --smoke for the CPU)")
        device = torch.device("cuda")
        args.json = args.json or str(REPOSITORY / "docs" / "bench_lvsa.json")
    if any(frames < 1 for frames in args.group_frames):
        parser.error(f"--group-frames must be positive ints, got {args.group_frames}")
    for frames in args.frames:
        try:
            latent_frames(frames)
        except ValueError as error:
            parser.error(str(error))
    dtype = getattr(torch, args.dtype)
    config = LVSAConfig()

    env = environment(device)
    for key, value in env.items():
        print(f"{key}: {value}")
    print(f"LVSA config: {config}")
    results = [run_clip(frames, args, device, dtype, config) for frames in args.frames]
    table = markdown_table(results)
    print("\n" + table)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"environment": env, "config": dataclasses.asdict(config), "goal": GOAL, "results": results},
                      handle, indent=2)
        print(f"\nwrote {args.json}")
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(table + "\n")


if __name__ == "__main__":
    main()
