"""The 14 B DiT's forward per memory mode: peak GPU memory against the planner's estimate, seconds, fp8's error.

    python benchmarks/bench_memory.py --json docs/bench_memory.json        # a CUDA GPU

For each mode (offload none or blocks, weights bf16 or fp8; `wanx.memory.apply_memory_mode`)
the same random 14 B DiT (same seed) is built on the GPU, placed as the mode says, warmed up
(one forward: Triton autotuning, and for "blocks" the trace of the block order), then one
forward per batch size is timed, with the peak memory it allocated. Inputs: 81 frames at
960x544 by default (latent [B, 16, 21, 68, 120], S = 85,680 tokens per sample), one prompt of
120 rows, t = 700. Recorded per mode and batch:

- seconds of the forward and its peak GPU memory (allocated), next to `estimate_peak_gib`;
- for every mode but none/bf16: the relative L2 distance of the output to none/bf16's, and
  whether it is bit-identical to the mode with the same weights and offload none (streaming
  blocks must change no number).

"model" offload is not run: during the DiT's stage it is "none" (the other networks leave
the GPU, which only the whole edit shows: benchmarks/bench_edit.py).
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from in_context_sparse_attention import ISAConfig
from wanx.attention import make_attention
from wanx.memory import GIB, apply_memory_mode, estimate_peak_gib
from wanx.random_weights import random_dit

MODES = ("none/bf16", "none/fp8", "blocks/bf16", "blocks/fp8")


def inputs(batch: int, latent_shape: tuple, text_dim: int, seed: int) -> tuple:
    """Latents, source latents [batch, 16, F, H, W], timesteps [batch] and `batch` prompts on the GPU
    (the same sample repeated, so batch 2's rows equal batch 1's)."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(1, *latent_shape, generator=g)
    source = torch.randn(1, *latent_shape, generator=g)
    context = torch.randn(120, text_dim, generator=g).cuda().to(torch.bfloat16)
    return (latent.expand(batch, *latent_shape).contiguous().cuda(),
            source.expand(batch, *latent_shape).contiguous().cuda(),
            torch.full((batch,), 700.0).cuda(), [context] * batch)


@torch.no_grad()
def timed_forward(model, x) -> tuple[torch.Tensor, float, float]:
    """(output on the host in float32, seconds, peak GiB allocated during the forward)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = model(*x)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return out.float().cpu(), seconds, torch.cuda.max_memory_allocated() / GIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=544)
    parser.add_argument("--width", type=int, default=960)
    parser.add_argument("--backend", default="triton", help="the self-attention method (default: ISA triton)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated offload/weights, of {MODES}")
    parser.add_argument("--batches", default="1,2", help="comma-separated batch sizes to time in every mode")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("this benchmark measures GPU memory: it needs a CUDA GPU")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"--modes: unknown {', '.join(unknown)}; choose from {', '.join(MODES)}")
    batches = [int(b) for b in args.batches.split(",")]
    if (args.frames - 1) % 4 or args.height % 16 or args.width % 16:
        parser.error("--frames must be 4k+1 and --height/--width multiples of 16")
    latent_shape = (16, (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8)
    tokens = 2 * latent_shape[1] * (latent_shape[2] // 2) * (latent_shape[3] // 2)
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(), "torch": torch.__version__, "backend": args.backend,
            "latent_shape": latent_shape, "tokens_per_sample": tokens,
            "command": "python benchmarks/bench_memory.py " + " ".join(sys.argv[1:])}
    print(json.dumps(info), flush=True)

    results, outputs = [], {}
    for mode in modes:
        offload, weights = mode.split("/")
        torch.cuda.empty_cache()
        start = time.perf_counter()
        model = random_dit(device="cuda", seed=args.seed)
        model.set_attention(make_attention(args.backend, None if args.backend == "dense" else ISAConfig()))
        apply_memory_mode(model, offload, weights, "cuda")
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        setup = time.perf_counter() - start
        config = dict(model.config)
        for batch in batches:
            x = inputs(batch, latent_shape, model.config.text_dim, args.seed)
            timed_forward(model, x)  # warm-up: autotuning; for "blocks" the first forward traces the order
            out, seconds, peak = timed_forward(model, x)
            estimate = estimate_peak_gib(config, tokens, batch, offload, weights, 2)["peak"]
            row = {"mode": mode, "batch": batch, "seconds": seconds, "peak_gib": peak, "estimate_gib": estimate,
                   "measured_over_estimate": peak / estimate, "setup_s": setup,
                   "finite": bool(torch.isfinite(out).all())}
            reference = outputs.get(("none/bf16", batch))
            if reference is not None:
                row["rel_l2_vs_none_bf16"] = float((out - reference).norm() / reference.norm())
            resident = outputs.get((f"none/{weights}", batch))
            if offload == "blocks" and resident is not None:
                row["bit_identical_to_offload_none"] = bool(torch.equal(out, resident))
            outputs[(mode, batch)] = out
            results.append(row)
            print(json.dumps(row), flush=True)
            del x
        del model
        if args.json:  # after every mode, so that a run cut short keeps what it measured
            Path(args.json).write_text(json.dumps({"info": info, "results": results}, indent=1))

    lines = ["| offload/weights | batch | s / forward | peak GiB | estimate GiB | peak / estimate | "
             "rel. L2 vs none/bf16 | bit-identical to offload none |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in results:
        error = f"{r['rel_l2_vs_none_bf16']:.4f}" if "rel_l2_vs_none_bf16" in r else "-"
        same = {True: "yes", False: "**no**"}.get(r.get("bit_identical_to_offload_none"), "-")
        lines.append(f"| {r['mode']} | {r['batch']} | {r['seconds']:.2f} | {r['peak_gib']:.1f} | "
                     f"{r['estimate_gib']:.1f} | {r['measured_over_estimate']:.2f} | {error} | {same} |")
    table = "\n".join(lines)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "results": results, "table": table}, indent=1))


if __name__ == "__main__":
    main()
