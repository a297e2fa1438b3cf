"""Where one DiT forward's GPU time goes: attention, matrix products, the fused element-wise kernels, the rest.

    python benchmarks/profile_dit.py --backend triton --json dit_profile.json     # the 14 B on a GPU
    python benchmarks/profile_dit.py --tiny --frames 5 --height 64 --width 64     # CPU check of the script

One warm-up forward (autotuning, compilation), then one forward under `torch.profiler`. Every
device kernel (CPU ops with --tiny on a CPU) is put in one category by its name (`CATEGORIES`,
first match wins):

- attention: FlashAttention / SDPA kernels (self- and cross-attention) and the ISA and LVSA
  kernels (pooling, selection, block copies, the sparse kernel);
- matmul: cuBLAS / CUTLASS GEMMs (every linear layer);
- fused element-wise: this project's Triton kernels for norms, modulation, RoPE and the gated
  residual (`wanx.fused_ops`);
- other: everything else (casts, copies, PyTorch's own element-wise kernels), listed by name.

Printed and saved: the seconds per category, their share of the kernel time, the matmuls'
achieved TFLOP/s against the FLOPs the DiT's linear layers need (`linear_flops`), and the
kernels that took the most time. Issue 16's "time outside attention" is everything but the
first category.
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from in_context_sparse_attention import ISAConfig
from model import TINY_CONFIG
from wanx.attention import LVSAOptions, make_attention
from wanx.random_weights import random_dit

CATEGORIES = (
    ("attention", re.compile(r"flash|fmha|attention|cudnn|pool_blocks|select_context|sharpness_terms|split_query"
                             r"|exact_blocks|top_k|gather_blocks|scatter_blocks|sparse_block|tilelang|main_kernel",
                             re.IGNORECASE)),
    ("matmul", re.compile(r"gemm|nvjet|cutlass|xmma|cublas|aten::mm|aten::addmm|aten::bmm|aten::matmul|aten::linear",
                          re.IGNORECASE)),
    ("fused element-wise", re.compile(r"_rms_norm_kernel|_layer_norm_modulate_kernel|_rope_kernel"
                                      r"|_gated_residual_kernel|_residual_layer_norm_kernel")),
)


def category_of(kernel_name: str) -> str:
    for name, pattern in CATEGORIES:
        if pattern.search(kernel_name):
            return name
    return "other"


def linear_flops(config, tokens: int, text_len: int, batch: int) -> float:
    """FLOPs of one forward's linear layers: per block and token, self-attention's q, k, v, o (4 dim^2),
    cross-attention's q and o (2 dim^2) and the FFN (2 dim ffn); cross-attention's k and v on the
    text rows (2 dim^2 each row); 2 FLOPs per multiply-add. Embeddings and the head are left out."""
    dim, ffn, layers = config.dim, config.ffn_dim, config.num_layers
    per_token = 4 * dim * dim + 2 * dim * dim + 2 * dim * ffn
    return 2.0 * batch * layers * (tokens * per_token + text_len * 2 * dim * dim)


def kernel_times(prof, use_cuda: bool) -> dict[str, float]:
    """Kernel name -> total seconds: device kernels (and copies) on CUDA; on a CPU the self time of
    PyTorch's ops, which stand in for kernels there."""
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        if use_cuda:
            if event.device_type != DeviceType.CUDA:
                continue
            micros = event.self_device_time_total
        else:
            if not event.key.startswith("aten::"):
                continue
            micros = event.self_cpu_time_total
        if micros > 0:
            totals[event.key] = totals.get(event.key, 0.0) + micros / 1e6
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="triton", help="self-attention method (dense, triton, tilelang, lvsa...)")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=544)
    parser.add_argument("--width", type=int, default=960)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="the tiny test model instead of the 14 B one")
    parser.add_argument("--rows", type=int, default=20, help="kernels listed")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if (args.frames - 1) % 4 or args.height % 16 or args.width % 16 or args.batch < 1:
        parser.error("--frames must be 4k+1, --height/--width multiples of 16 and --batch positive")
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda" if use_cuda else "cpu")
    dtype = torch.bfloat16 if use_cuda else torch.float32
    model = random_dit(dict(TINY_CONFIG) if args.tiny else None, device=device, dtype=dtype)
    options = None if args.backend == "dense" else LVSAOptions() if args.backend == "lvsa" else ISAConfig()
    model.set_attention(make_attention(args.backend, options))
    latent = (args.batch, 16, (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8)
    tokens = 2 * latent[2] * (latent[3] // 2) * (latent[4] // 2)
    g = torch.Generator().manual_seed(0)
    text_len = 120
    inputs = (torch.randn(latent, generator=g).to(device), torch.randn(latent, generator=g).to(device),
              torch.full((args.batch,), 500.0, device=device),
              [torch.randn(text_len, model.config.text_dim, generator=g).to(device, dtype)] * args.batch)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if use_cuda else [])
    with torch.no_grad():
        model(*inputs)  # warm-up: autotuning and compilation stay out of the profile
        if use_cuda:
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            model(*inputs)
            if use_cuda:
                torch.cuda.synchronize()
    kernels = kernel_times(prof, use_cuda)
    total = sum(kernels.values())
    by_category = {name: 0.0 for name, _ in CATEGORIES}
    by_category["other"] = 0.0
    for name, seconds in kernels.items():
        by_category[category_of(name)] += seconds
    flops = linear_flops(model.config, tokens, text_len, args.batch)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if use_cuda else "cpu", "torch": torch.__version__,
        "backend": args.backend, "latent_shape": latent, "tokens_per_sample": tokens,
        "kernel_seconds": total, "category_seconds": by_category,
        "outside_attention_seconds": total - by_category["attention"],
        "linear_tflop": flops / 1e12,
        "matmul_tflops_achieved": flops / by_category["matmul"] / 1e12 if by_category["matmul"] else None,
        "top_kernels": sorted(kernels.items(), key=lambda kv: -kv[1])[:args.rows],
    }
    print(f"{report['device']}, {args.backend}, latent {list(latent)}, S = {tokens} per sample, batch {args.batch}")
    print(f"kernel time {total:.3f} s; outside attention {report['outside_attention_seconds']:.3f} s")
    for name, seconds in by_category.items():
        print(f"  {name:20} {seconds:8.3f} s  {100 * seconds / total:5.1f}%")
    if report["matmul_tflops_achieved"]:
        print(f"linear layers: {report['linear_tflop']:.3g} TFLOP in {by_category['matmul']:.3f} s, "
              f"{report['matmul_tflops_achieved']:.3g} TFLOP/s")
    for name, seconds in report["top_kernels"]:
        print(f"  {seconds * 1e3:9.1f} ms  {category_of(name):20} {name[:100]}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
