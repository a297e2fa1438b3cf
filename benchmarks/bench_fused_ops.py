"""The DiT's memory-bound steps at the 14 B's shape, before and after fusing them.

    python benchmarks/bench_fused_ops.py --json docs/bench_fused_ops.json   # GPU

Each row times one DiT step on the activations of an 81-frame 544x960 batch-1 forward (N tokens
of width C = 5,120; FFN width 13,824; bf16 matmul inputs, fp32 residual stream), as the model
ran it before (`before`: the separate kernels, the row kernels at `_row_warps`' 16 warps) and as
it runs it now (`after`: the fused kernels, tuned warps), with both in the same process:

- q (or k) norm + RoPE: `rms_norm` then `rope`, the norm at 16 warps / tuned (a kernel doing
  both in one pass, measured on 2026-12-02, was slower: 1.79 ms against 1.44 ms, and was dropped);
- residual + LayerNorm: `gated_residual` then `layer_norm_modulate` / `residual_layer_norm`, for
  the self-attention residual (gated, affine norm3) and the cross-attention one (modulated norm2);
- FFN first layer: `F.linear` then GELU / `linear_gelu` (GEMM with a GELU epilogue);
- cross-attention q norm and the block's first LayerNorm: the same kernel at 16 warps / tuned.

Printed and saved: median ms (triton's do_bench) and the bytes each step must move at least
(its inputs read once, its outputs written once) over that time.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root
sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder, for gpu_monitor

from model import rope_frequencies
from wanx import fused_ops

from gpu_monitor import GpuMonitor, describe, environment


def untuned_rms_norm(x, weight, eps):
    """`rms_norm_triton` as it launched before tuning: 16 warps per row."""
    out = torch.empty_like(x)
    block = triton.next_power_of_2(x.shape[-1])
    fused_ops._rms_norm_kernel[(x.numel() // x.shape[-1],)](
        x, weight, out, x.shape[-1], eps, BLOCK_C=block, num_warps=fused_ops._row_warps(block), enable_fp_fusion=False)
    return out


def untuned_layer_norm(x, eps, weight, bias, shift, scale, dtype):
    """`layer_norm_modulate_triton` as it launched before tuning: 16 warps per row."""
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    block = triton.next_power_of_2(x.shape[-1])
    fused_ops._layer_norm_modulate_kernel[(x.shape[0] * x.shape[1],)](
        x, weight, bias, shift, scale, out, x.shape[1], x.shape[-1], eps,
        HAS_AFFINE=weight is not None, HAS_MODULATION=shift is not None, BLOCK_C=block,
        num_warps=fused_ops._row_warps(block), enable_fp_fusion=False)
    return out


def cases(tokens: int, grid: tuple[int, int, int], dim: int, ffn: int, heads: int) -> list[tuple]:
    """(name, minimal bytes moved, before, after) for each step."""
    g = torch.Generator(device="cuda").manual_seed(0)
    bf16, fp32 = torch.bfloat16, torch.float32

    def randn(*shape, dtype=bf16):
        return torch.randn(*shape, generator=g, device="cuda", dtype=fp32).to(dtype)

    freqs = rope_frequencies([grid, grid], dim // heads, device="cuda")  # [N, D/2]
    q = randn(1, tokens, heads, dim // heads)
    norm_w = randn(dim) * 0.1 + 1
    residual, y = randn(1, tokens, dim, dtype=fp32), randn(1, tokens, dim)
    gate, shift, scale = (randn(1, 1, dim, dtype=fp32) for _ in range(3))
    ln_w, ln_b = randn(dim, dtype=fp32), randn(dim, dtype=fp32)
    linear = torch.nn.Linear(dim, ffn, device="cuda", dtype=bf16)
    normed = randn(1, tokens, dim)
    act, res = tokens * dim * 2, tokens * dim * 4  # bytes of one bf16 / fp32 activation
    return [
        ("q norm + RoPE", 4 * act,
         lambda: fused_ops.rope(untuned_rms_norm(q.flatten(2), norm_w, 1e-6).view(q.shape), freqs),
         lambda: fused_ops.rope(fused_ops.rms_norm(q.flatten(2), norm_w, 1e-6).view(q.shape), freqs)),
        ("gated residual + affine LayerNorm (norm3)", 2 * res + 2 * act + 4 * dim,
         lambda: untuned_layer_norm(fused_ops.gated_residual(residual, y, gate), 1e-6, ln_w, ln_b, None, None, bf16),
         lambda: fused_ops.residual_layer_norm(residual, y, gate, 1e-6, ln_w, ln_b, dtype=bf16)),
        ("residual + modulated LayerNorm (norm2)", 2 * res + 2 * act,
         lambda: untuned_layer_norm(fused_ops.gated_residual(residual, y), 1e-6, None, None, shift, scale, bf16),
         lambda: fused_ops.residual_layer_norm(residual, y, None, 1e-6, shift=shift, scale=scale, dtype=bf16)),
        ("FFN Linear + GELU", tokens * ffn * 2 + act,
         lambda: F.gelu(linear(normed), approximate="tanh"),
         lambda: fused_ops.linear_gelu(normed, linear)),
        ("cross-attention q norm", 2 * act,
         lambda: untuned_rms_norm(normed, norm_w, 1e-6),
         lambda: fused_ops.rms_norm(normed, norm_w, 1e-6)),
        ("modulated LayerNorm (norm1)", res + act,
         lambda: untuned_layer_norm(residual, 1e-6, None, None, shift, scale, bf16),
         lambda: fused_ops.layer_norm_modulate(residual, 1e-6, shift=shift, scale=scale, dtype=bf16)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=81, help="video frames (the latent has (F - 1) / 4 + 1)")
    parser.add_argument("--height", type=int, default=544)
    parser.add_argument("--width", type=int, default=960)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_fused_ops needs a CUDA GPU")
    device = torch.device("cuda")
    grid = ((args.frames - 1) // 4 + 1, args.height // 16, args.width // 16)
    tokens = 2 * grid[0] * grid[1] * grid[2]  # target and source
    env = environment(device)
    print(json.dumps(env))
    print(f"N = {tokens} tokens (target + source), C = 5120, FFN 13824, 40 heads")
    rows = []
    with torch.no_grad(), GpuMonitor(torch.cuda.current_device()) as monitor:
        for name, nbytes, before, after in cases(tokens, grid, 5120, 13824, 40):
            after()  # autotuning
            start = monitor.now()
            ms_before = triton.testing.do_bench(before, warmup=100, rep=400)
            ms_after = triton.testing.do_bench(after, warmup=100, rep=400)
            state = monitor.state_since(start)
            rows.append({"step": name, "before_ms": ms_before, "after_ms": ms_after, "min_bytes": nbytes,
                         "before_tb_s": nbytes / ms_before / 1e9, "after_tb_s": nbytes / ms_after / 1e9,
                         "gpu_state": state})
            print(f"{name}: {ms_before:.3f} -> {ms_after:.3f} ms ({describe(state)})")
    lines = ["| step | before ms | after ms | speed-up | min. bytes / after time |",
             "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['step']} | {r['before_ms']:.3f} | {r['after_ms']:.3f} | {r['before_ms'] / r['after_ms']:.2f}x "
              f"| {r['after_tb_s']:.2f} TB/s |" for r in rows]
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"info": {**env, "tokens": tokens, "grid": grid}, "rows": rows,
                                               "table": "\n".join(lines)}, indent=1))


if __name__ == "__main__":
    main()
