"""The text a run prints: the plan before it starts (`format_plan`) and the summary after (`format_summary`)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from long_video_sparse_attention import render_frame_mask

from .planning import FIT_MARGIN, EditPlan
from .planning import size_text as _size

if TYPE_CHECKING:
    from .pipeline import EditResult


def _gflops(x: float) -> str:
    return f"{x / 1e12:,.1f} TFLOP" if x >= 1e12 else f"{x / 1e9:,.2f} GFLOP"


MASK_ROWS_SHOWN = 24  # a frame mask of more query frames is shown by a few representative rows


def mask_picture(plan: EditPlan) -> list[str]:
    """LVSA's step-0 frame mask, one row per query frame and one character per key frame
    (`render_frame_mask`); beyond `MASK_ROWS_SHOWN` frames, the first two rows, two in the
    middle and the last two, with "..." where rows are left out."""
    rows = render_frame_mask(plan.lvsa_stats["frames"], 0, plan.lvsa.config).splitlines()
    if len(rows) <= MASK_ROWS_SHOWN:
        return rows
    n = len(rows)
    shown = sorted({0, 1, n // 2 - 1, n // 2, n - 2, n - 1})
    lines = []
    for previous, index in zip([-1, *shown], shown):
        if index > previous + 1:
            lines.append("...")
        lines.append(rows[index])
    return lines


def _lvsa_lines(plan: EditPlan) -> list[str]:
    s = plan.lvsa_stats
    config = plan.lvsa.config
    kernel = s["kernel"] if plan.lvsa.kernel != "auto" else f"{s['kernel']}, picked by auto"
    lines = [f"attention   LVSA (kernel {kernel}): {_gflops(plan.flops_run)} vs dense {_gflops(plan.flops_dense)} "
             f"({plan.flops_dense / plan.flops_run:.2f}x fewer; attended share {s['share']:.3f} averaged over "
             f"the {plan.steps} steps' masks, {s['share_step0']:.3f} at step 0)"]
    attended = (f"{s['attended_min']}" if s["attended_min"] == s["attended_max"]
                else f"{s['attended_min']} to {s['attended_max']}")
    lines.append(f"LVSA        {s['frames']} latent frames, keyframe interval {s['interval']} "
                 f"({'automatic' if s['automatic'] else 'configured'}), window {config.window}, "
                 f"{config.first_frames} first frame(s); each query frame attends to {attended} of "
                 f"{s['frames']} frames{', rotating with the step' if config.rotate and s['interval'] > 1 else ''}")
    if s["dense"]:
        lines.append(f"LVSA mask   dense: every frame is an anchor at {s['frames']} latent frames")
    else:
        lines.append("LVSA mask   step 0; row: query frame, column: key frame; A anchor, w window, . skipped; count")
        lines += [f"            {row}" for row in mask_picture(plan)]
    return lines


def _guidance(plan: EditPlan) -> str:
    if plan.batch == 1:
        return "no CFG"
    if plan.memory_setting.guidance == "sequential":
        return "CFG, cond and uncond as two batch-1 passes"
    return "CFG"


def _memory_lines(plan: EditPlan, all_tiers: bool) -> list[str]:
    """The chosen memory tier, its estimate and the reason; with `all_tiers`, a table of every tier."""
    m = {name: _size(gib) for name, gib in plan.memory.items()}
    vae_work = (f"VAE work space {m['vae_work_space']}" if plan.memory["vae_work_space"]
                else "VAE work space not estimated (video.vae_tiling)")
    lines = [f"memory      {plan.memory_setting.describe()}: about {m['peak_estimate']} on the device at the peak "
             f"(text encoding {m['text_stage']}, denoising {m['denoise_stage']}, VAE {m['vae_stage']}); "
             f"{plan.memory_reason}",
             f"weights     DiT {m['dit_weights']} as stored ({m['dit_resident']} on the GPU while it runs), umT5 "
             f"{m['text_encoder_weights']}, VAE {m['vae_weights']}; DiT activations {m['dit_activations']}; "
             f"{vae_work}"]
    if not all_tiers:
        return lines
    free = ("no GPU limit known" if plan.free_gib is None
            else f"{_size(plan.free_gib * (1 - FIT_MARGIN))} of {_size(plan.free_gib)} free usable")
    lines.append(f"tiers       GiB at the peak (text encoding / denoising / VAE), fastest first; {free}")
    lines.append(f"            {'offload':8} {'weights':8} {'guidance':11} {'peak':>6} {'text':>6} {'denoise':>8} "
                 f"{'VAE':>6}")
    for tier in plan.memory_tiers:
        s = tier.setting
        fits = "" if plan.free_gib is None else (
            "fits" if tier.peak <= plan.free_gib * (1 - FIT_MARGIN) else "too large")
        chosen = "<- chosen" if s == plan.memory_setting else ""
        lines.append(f"            {s.offload:8} {s.weights:8} {s.guidance:11} {tier.peak:6.1f} {tier.text:6.1f} "
                     f"{tier.denoise:8.1f} {tier.vae:6.1f}  {' '.join(filter(None, (fits, chosen)))}".rstrip())
    return lines


def format_plan(plan: EditPlan, all_tiers: bool = False) -> str:
    """The plan as printed by `inference.py`; `all_tiers` (`--dry-run`) adds every memory tier's estimate."""
    h, w = plan.source_size
    lines = [
        f"frames      {plan.frames} at {plan.fps:g} fps (read {plan.frames_read}; the VAE takes 4k+1 frames, "
        f"{plan.frames_read - plan.frames} dropped)",
        f"resolution  {w}x{h} input -> {plan.size[1]}x{plan.size[0]} (resize, centre crop)",
        f"latent      {list(plan.latent_shape)}",
        f"tokens      {plan.target_tokens} target + {plan.source_tokens} source = {plan.seq_len} per sequence; "
        f"text context {plan.text_len} rows",
        f"DiT         {plan.num_layers} layers, {plan.heads} heads x {plan.head_dim}; {plan.steps} steps x batch "
        f"{plan.batch} ({_guidance(plan)})",
    ]
    if plan.lvsa is not None:
        lines += _lvsa_lines(plan)
    elif plan.isa is None:
        counted = "" if plan.backend == "dense" else " (counted as dense)"
        lines.append(f"attention   {plan.backend}: {_gflops(plan.flops_dense)} of self-attention{counted}")
    else:
        s = plan.isa_stats
        lines.append(f"attention   ISA ({plan.backend}): {_gflops(plan.flops_run)} vs dense "
                     f"{_gflops(plan.flops_dense)} ({plan.flops_dense / plan.flops_run:.2f}x fewer)")
        lines.append(f"ISA blocks  {s['blocks']} blocks of {plan.isa.block_size}; {s['full_query_blocks']} "
                     f"({s['full_query_share']:.0%}) query blocks on full attention; {s['source_kept']} of "
                     f"{s['source_candidates']} ({s['source_kept_share']:.1%}) source blocks kept; "
                     f"{s['kv_blocks']} key blocks, {s['exact_blocks']} exact per sparse query block")
    lines += _memory_lines(plan, all_tiers)
    if plan.parallel:
        p = plan.parallel
        heads = p["heads_per_rank"]
        lines.append(f"parallel    {p['world_size']} processes: ulysses {p['ulysses_degree']} x cfg {p['cfg_degree']}"
                     f"{', weights sharded' if p['shard_weights'] else ''}; per GPU {p['tokens_per_rank']} tokens, "
                     f"{heads:g} heads{'' if heads == int(heads) else ' (NOT whole: refused)'}, batch "
                     f"{p['batch_per_rank']}; about {_size(p['peak_per_gpu'])} per GPU (DiT weights "
                     f"{_size(p['dit_weights_per_gpu'])} + activations {_size(p['dit_activations_per_gpu'])} + VAE)")
    lines += [f"warning     {warning}" for warning in plan.warnings]
    return "\n".join(lines)


def format_summary(result: "EditResult", outputs: list[str]) -> str:
    """The closing summary: outputs, time per stage, the attention method and its statistics (ISA, LVSA)."""
    t = result.timings
    plan = result.plan
    total = sum(t.values())
    stages = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in t.items())
    per_step = t.get("denoise", 0.0) / max(1, plan.steps)
    lines = [f"wrote       {', '.join(outputs)}" if outputs else "wrote       nothing",
             f"video       {result.video.shape[0]} frames, {result.video.shape[2]}x{result.video.shape[1]}, "
             f"{result.fps:g} fps",
             f"time        {total:.1f}s: {stages} ({per_step:.2f}s per step)"]
    peaks = ", ".join(f"{name} {gib:.1f}" for name, gib in result.peak_memory.items())
    lines.append(f"memory      {plan.memory_setting.describe()}"
                 + (f"; GiB allocated at each stage's peak: {peaks}" if peaks else ""))
    if result.backend != plan.backend:  # the DiT's method was switched after planning: no statistics for it
        lines.append(f"attention   {result.backend}")
    elif plan.lvsa is not None:
        s = plan.lvsa_stats
        lines.append(f"attention   LVSA, {s['kernel']} kernel; {s['frames']} latent frames, keyframe interval "
                     f"{s['interval']}; {plan.flops_dense / plan.flops_run:.2f}x fewer self-attention FLOPs than "
                     f"dense (attended share {s['share']:.3f})")
    elif plan.isa is None:
        kernel = f" on {result.dense_kernel}" if result.backend == "dense" else ""
        lines.append(f"attention   {result.backend}{kernel}")
    else:
        s = plan.isa_stats
        lines.append(f"attention   ISA, {result.backend} backend (full-attention part on {result.dense_kernel}); "
                     f"{plan.flops_dense / plan.flops_run:.2f}x fewer self-attention FLOPs than dense")
        lines.append(f"ISA         {s['full_query_share']:.0%} of query blocks on full attention "
                     f"({s['full_query_blocks']}/{s['blocks']}), {s['source_kept_share']:.1%} of source blocks kept "
                     f"({s['source_kept']}/{s['source_candidates']}), {s['exact_blocks']} of {s['kv_blocks']} key "
                     "blocks exact per sparse query block")
    return "\n".join(lines)
