"""Time the Triton sparse kernel (exact top-E + Taylor) under each tile configuration.

    python benchmarks/tune_sparse_kernel.py --seq-len 65536

One ISA plan is built on random bf16 inputs (T = C = S/2, B = 1); then every
configuration of `triton_kernels.SPARSE_TUNING_CONFIGS` (or the grid given on the command
line) runs the sparse half alone. Prints, fastest first, the median time
(triton.testing.do_bench), the largest difference from the first configuration's output,
and the compiled kernel's registers, spills and shared memory.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for the package

from in_context_sparse_attention import ISAConfig, triton_backend, triton_kernels
from in_context_sparse_attention.layout import BlockLayout


def configurations(args) -> list[dict]:
    if not args.grid:
        return [
            {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
            for c in triton_kernels.SPARSE_TUNING_CONFIGS
        ]
    grid = itertools.product(args.taylor_stages, args.warps, args.stages, args.maxnreg)
    return [
        {
            "TAYLOR_STAGES": taylor_stages,
            "num_warps": warps,
            "num_stages": stages,
            **({"maxnreg": maxnreg} if maxnreg else {}),
        }
        for taylor_stages, warps, stages, maxnreg in grid
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=65536)
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--grid", action="store_true", help="time the grid below instead of the tuning list")
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--taylor-stages", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--maxnreg", type=int, nargs="+", default=[0], help="register cap per thread; 0: none")
    parser.add_argument("--rep", type=int, default=200, help="do_bench repetition, ms")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("tune_sparse_kernel.py needs a CUDA GPU")

    seq = args.seq_len
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(1, seq, args.heads, args.dim, generator=gen, device="cuda").to(torch.bfloat16) for _ in range(3)
    )
    layout = BlockLayout(seq_len=seq, target_len=seq // 2, block_size=64)
    backend = triton_backend.TritonBackend()
    plan = backend.make_plan(*(backend.pool_blocks(x, layout) for x in (q, k, v)), layout, ISAConfig())
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
        f"S = {seq}, H = {args.heads}, D = {args.dim}, bf16; NKV = {plan.kv_blocks.shape[-1]}, "
        f"Ns = {plan.sparse_query_blocks.shape[-1]}, E = {plan.exact_positions.shape[-1]}"
    )

    reference = None
    rows = []
    for tiles in configurations(args):
        out = torch.full((1, layout.padded_len, args.heads, args.dim), float("nan"), dtype=q.dtype, device="cuda")
        try:
            handle = triton_backend.sparse_block_attention(q, k, v, plan, out, tiles=tiles)
        except triton.runtime.errors.OutOfResources as error:
            print(f"{tiles}: skipped ({error})")
            continue
        rows_of_sparse = out[0].view(layout.num_blocks, 64, args.heads, args.dim)
        if reference is None:
            reference = rows_of_sparse.clone()
        ms = triton.testing.do_bench(
            functools.partial(triton_backend.sparse_block_attention, q, k, v, plan, out, tiles=tiles),
            rep=args.rep,
            return_mode="median",
        )
        written = ~torch.isnan(rows_of_sparse)
        diff = (rows_of_sparse - reference).abs()[written & ~torch.isnan(reference)].max().item()
        resources = f"{handle.n_regs} regs, {handle.n_spills} spills, {handle.metadata.shared // 1024} KiB shared"
        rows.append((ms, tiles, diff, int(written.sum().item()), resources))
    for ms, tiles, diff, written, resources in sorted(rows, key=lambda row: row[0]):
        print(f"{ms:7.3f} ms  max|diff| {diff:.2e}  written {written}  {resources}  {tiles}")


if __name__ == "__main__":
    main()
