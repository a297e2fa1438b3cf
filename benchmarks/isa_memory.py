"""Peak GPU memory of one `editing_sparse_attention` call per ISA backend, stage by stage.

Default shape: the DiT's self-attention at LIVEditor's working size, T = C = 42,840
(S = 85,680), B = 1, H = 40, D = 128, bf16, with a per-token alpha [1, S, 1, 1] fp32.
All numbers are GiB above what was allocated when the measured step began:
- "first call": the call that pays Triton autotuning / TileLang compilation;
- "kept": what is still allocated after that call, its output dropped;
- "call": a later call as a whole (as in the model);
- one row per stage of that call (each stage wrapped where `api` calls it), and the dense
  SDPA call on the same q, k, v for comparison.

    python benchmarks/isa_memory.py --json out.json
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from in_context_sparse_attention import api, editing_sparse_attention
from in_context_sparse_attention.backends import get_backend
from in_context_sparse_attention.dense import dense_attention

GIB = 2**30


def measure(fn, *args, **kwargs) -> tuple[float, float]:
    """(peak above the start, still allocated at the end) in GiB; fn's result is dropped."""
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(*args, **kwargs)
    torch.cuda.synchronize()
    gc.collect()
    return (torch.cuda.max_memory_allocated() - start) / GIB, (torch.cuda.memory_allocated() - start) / GIB


def staged(name: str, record: dict):
    """Wrap `api`'s shared stages and the backend's steps so that each call's peak (GiB
    above its start) is added to record[label]; returns a function that undoes it."""
    impl = get_backend(name)

    def wrap(fn, label):
        def timed(*args, **kwargs):
            torch.cuda.synchronize()
            start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            out = fn(*args, **kwargs)
            torch.cuda.synchronize()
            record[label] = max(record.get(label, 0.0), (torch.cuda.max_memory_allocated() - start) / GIB)
            return out

        return timed

    hooks = ("pool_blocks", "make_plan", "sparse_block_attention")
    for hook in hooks:  # an instance attribute over the class's method, removed by undo()
        setattr(impl, hook, wrap(getattr(impl, hook), f"{hook} ({name})"))
    originals = {"full_block_attention": api.full_block_attention, "add_residual": api.add_residual}
    for attr, fn in originals.items():
        setattr(api, attr, wrap(fn, attr))

    def undo():
        for hook in hooks:
            delattr(impl, hook)
        for attr, fn in originals.items():
            setattr(api, attr, fn)

    return undo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=int, default=42840, help="T (C = T)")
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--backends", default="triton,tilelang")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    seq = 2 * args.target
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(1, seq, args.heads, args.head_dim, generator=gen, device="cuda", dtype=torch.bfloat16)
        for _ in range(3)
    )
    alpha = (torch.rand(1, seq, 1, 1, generator=gen, device="cuda") - 0.5) * 0.5
    token_gib = q.numel() * q.element_size() / GIB
    print(
        f"S = {seq}, H = {args.heads}, D = {args.head_dim}, bf16; one [B, S, H, D] bf16 tensor = {token_gib:.3f} GiB"
    )

    results = {"dense SDPA": {"call": measure(dense_attention, q, k, v)[0]}}
    for name in [b.strip() for b in args.backends.split(",") if b.strip()]:
        call = functools.partial(
            editing_sparse_attention, q, k, v, args.target, args.target, alpha=alpha, backend=name
        )
        first, kept = measure(call)
        whole = measure(call)[0]
        stages = {}
        undo = staged(name, stages)
        try:
            call()
        finally:
            undo()
        results[name] = {"first call": first, "kept": kept, "call": whole, **stages}

    rows = sorted(
        {label for r in results.values() for label in r}, key=lambda s: (s not in ("first call", "kept", "call"), s)
    )
    lines = ["| GiB above start | " + " | ".join(results) + " |", "| --- |" + " --- |" * len(results)]
    for label in rows:
        cells = [f"{r[label]:.2f}" if label in r else "" for r in results.values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"seq": seq, "heads": args.heads, "head_dim": args.head_dim, "gib": results, "table": table},
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
