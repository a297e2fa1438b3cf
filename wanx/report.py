"""The text a run prints: the plan before it starts (`format_plan`) and the summary after (`format_summary`)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .planning import EditPlan

if TYPE_CHECKING:
    from .pipeline import EditResult


def _gflops(x: float) -> str:
    return f"{x / 1e12:,.1f} TFLOP" if x >= 1e12 else f"{x / 1e9:,.2f} GFLOP"


def _size(gib: float) -> str:
    return f"{gib:.1f} GiB" if gib >= 1 else f"{gib * 1024:.1f} MiB"


def format_plan(plan: EditPlan) -> str:
    """The plan as printed by `inference.py` (and by `--dry-run` alone)."""
    h, w = plan.source_size
    lines = [
        f"frames      {plan.frames} at {plan.fps:g} fps (read {plan.frames_read}; the VAE takes 4k+1 frames, "
        f"{plan.frames_read - plan.frames} dropped)",
        f"resolution  {w}x{h} input -> {plan.size[1]}x{plan.size[0]} (resize, centre crop)",
        f"latent      {list(plan.latent_shape)}",
        f"tokens      {plan.target_tokens} target + {plan.source_tokens} source = {plan.seq_len} per sequence; "
        f"text context {plan.text_len} rows",
        f"DiT         {plan.num_layers} layers, {plan.heads} heads x {plan.head_dim}; {plan.steps} steps x batch "
        f"{plan.batch} ({'CFG' if plan.batch == 2 else 'no CFG'})",
    ]
    if plan.isa is None:
        lines.append(f"attention   dense: {_gflops(plan.flops_dense)} of self-attention")
    else:
        s = plan.isa_stats
        lines.append(f"attention   ISA ({plan.backend}): {_gflops(plan.flops_run)} vs dense {_gflops(plan.flops_dense)} "
                     f"({plan.flops_dense / plan.flops_run:.2f}x fewer)")
        lines.append(f"ISA blocks  {s['blocks']} blocks of {plan.isa.block_size}; {s['full_query_blocks']} "
                     f"({s['full_query_share']:.0%}) query blocks on full attention; {s['source_kept']} of "
                     f"{s['source_candidates']} ({s['source_kept_share']:.1%}) source blocks kept; "
                     f"{s['kv_blocks']} key blocks, {s['exact_blocks']} exact per sparse query block")
    m = {name: _size(gib) for name, gib in plan.memory.items()}
    lines.append(f"memory      about {m['peak_estimate']} on the device: DiT weights {m['dit_weights']} + VAE weights {m['vae_weights']} "
                 f"+ DiT activations {m['dit_activations']}; umT5 weights {m['text_encoder_weights']} "
                 "(freed from the GPU after encoding when offload_text_encoder); VAE work space not included")
    return "\n".join(lines)


def format_summary(result: "EditResult", outputs: list[str]) -> str:
    """The closing summary: outputs, time per stage, attention backend and ISA statistics."""
    t = result.timings
    plan = result.plan
    total = sum(t.values())
    stages = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in t.items())
    per_step = t.get("denoise", 0.0) / max(1, plan.steps)
    lines = [f"wrote       {', '.join(outputs)}" if outputs else "wrote       nothing",
             f"video       {result.video.shape[0]} frames, {result.video.shape[2]}x{result.video.shape[1]}, "
             f"{result.fps:g} fps",
             f"time        {total:.1f}s: {stages} ({per_step:.2f}s per step)"]
    if result.backend == "dense":
        lines.append(f"attention   dense on {result.dense_kernel}")
    else:
        s = plan.isa_stats
        lines.append(f"attention   ISA, {result.backend} backend (full-attention part on {result.dense_kernel}); "
                     f"{plan.flops_dense / plan.flops_run:.2f}x fewer self-attention FLOPs than dense")
        lines.append(f"ISA         {s['full_query_share']:.0%} of query blocks on full attention "
                     f"({s['full_query_blocks']}/{s['blocks']}), {s['source_kept_share']:.1%} of source blocks kept "
                     f"({s['source_kept']}/{s['source_candidates']}), {s['exact_blocks']} of {s['kv_blocks']} key "
                     "blocks exact per sparse query block")
    return "\n".join(lines)
