"""CUDA kernels of ISA's block-level steps (`make_plan`) at one size, by total time.

    python benchmarks/profile_selection.py --seq-len 65536
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for the package

from in_context_sparse_attention import ISAConfig
from in_context_sparse_attention.layout import BlockLayout
from in_context_sparse_attention.reference import pool_blocks
from in_context_sparse_attention.selection import make_plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=65536)
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--rows", type=int, default=25, help="kernels listed")
    args = parser.parse_args()
    layout = BlockLayout(seq_len=args.seq_len, target_len=args.seq_len // 2, block_size=64)
    x = torch.randn(1, args.seq_len, args.heads, args.dim, device="cuda", dtype=torch.bfloat16)
    means = [pool_blocks(x * scale, layout) for scale in (1.0, 0.5, 2.0)]  # [1, H, NB, D] fp32 each
    for _ in range(3):
        make_plan(*means, layout, ISAConfig())
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            make_plan(*means, layout, ISAConfig())
        torch.cuda.synchronize()
    print(f"make_plan x 10 at S = {args.seq_len}, H = {args.heads}, D = {args.dim}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
