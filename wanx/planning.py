"""What an edit will cost, worked out before anything loads: shapes, token counts, the
self-attention FLOPs of the chosen method against dense, ISA's block counts or LVSA's frame
pattern, the GPU memory of every memory tier and the one the run takes, and warnings (`make_plan`).

Memory tiers are the combinations of `memory.offload`, `memory.weights` and `memory.guidance`
(`wanx.config.MemorySection`). `make_plan` estimates each one's peak and picks one: with
`memory.profile` "auto", the first in `memory_tiers`' order that matches the values set and whose
peak fits the free GPU memory less `FIT_MARGIN`; with "manual", the first that matches.

Why one module of this length: every figure of the plan (tokens, FLOPs, memory per tier, per
rank) is derived from the same shapes in one pass, and `--dry-run` prints exactly this plan;
split apart, the pieces would each recompute the shapes.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch

from in_context_sparse_attention import ISAConfig
from in_context_sparse_attention.layout import BlockLayout
from long_video_sparse_attention import (
    LVSAConfig,
    attended_fraction,
    keyframe_interval,
    keyframe_offset,
    lvsa_frame_mask,
)

from .attention import LVSAOptions, lvsa_kernel
from .components import DTYPES
from .config import GUIDANCE_MODES, ConfigError, MemorySetting, attention_options
from .memory import GIB, OFFLOAD_MODES, WEIGHT_MODES, estimate_peak_gib

FIT_MARGIN = 0.10  # share of the free GPU memory a tier leaves unplanned (estimate error, allocator fragmentation)
# umT5's work space while it encodes the prompt and the negative prompt (2 x 512 tokens), as a share of
# its weights: measured on the H200 (docs/benchmarks.md, memory tiers): the text stage peaked 2.47 GiB
# above the weights resident then (umT5-XXL, 10.58 GiB of bf16 weights) with offload none and blocks alike
TEXT_ENCODER_WORK_SPACE = 0.235
# The VAE's work space while it decodes (encoding took less: 8.9 against 11.5 GiB), in bytes per pixel of
# one video frame at the working size: 11.5 GiB at 960x544 with the float32 Wan 2.1 VAE, measured on the
# H200 in the same runs with offload none and blocks alike. Diffusers' Wan VAE works through the clip a few
# frames at a time, so the work space is taken to grow with the frame's size and not with the clip's length
# (measured at one size only). Scaled by the VAE dtype's bytes / 4; not estimated with video.vae_tiling.
VAE_WORK_BYTES_PER_PIXEL = 23_750
# Tokens per sample (target + source) from which a GPU runs the CFG pair faster as two batch-1 DiT passes
# than as one batch of 2: H200, ISA triton, one process, interleaved (docs/benchmarks.md, guidance order):
# 15,600 tokens (17 frames 832x480) batch 1.42-1.43 against sequential 1.49 s per step; 34,320 (41 frames)
# 3.75-3.76 against 3.50-3.54; 85,680 (81 frames 960x544) 12.82 against 12.19-12.28 (dense FA3 there: 23.38-23.40
# against 22.85-23.09). Between 15,600 and 34,320 nothing is measured: the threshold keeps batch there.
SEQUENTIAL_GUIDANCE_MIN_TOKENS = 32_768
TRAINING_FRAMES = 81  # the clip length Wan 2.2 and LIVEditor were trained on: 81 video frames = 21 latent frames
LONG_VIDEO_ADVICE = f"beyond the {TRAINING_FRAMES}-frame training length; consider attention.backend=lvsa"

if TYPE_CHECKING:
    from .pipeline import SourceVideo


def working_size(cfg, height: int, width: int) -> tuple[int, int]:
    """(H, W) the model runs at: `video.size`, else the closest 540p bucket times `video.bucket_scale`."""
    from .video import choose_bucket

    if cfg.video.size is not None:
        return int(cfg.video.size[0]), int(cfg.video.size[1])
    bucket_h, bucket_w = choose_bucket(height, width)
    scale = cfg.video.bucket_scale
    return max(16, round(bucket_h * scale / 16) * 16), max(16, round(bucket_w * scale / 16) * 16)


def attention_flops(seq_len: int, target_len: int, heads: int, head_dim: int,
                    config: Optional[ISAConfig]) -> float:
    """Self-attention FLOPs of one layer for one sample (multiply-add = 2 FLOPs).

    Dense: QK^T and PV over all S tokens, 4 S^2 D per head. ISA (docs/isa.md), per head:
    compressed attention over the NB block means (4 NB^2 D); the floor(NB * flat_ratio)
    full query blocks attend to the L tokens of the pruned set (4 b L D each); every other
    query block scores the NKV kept blocks with its mean query (2 NKV D), attends E blocks
    exactly (4 b^2 E D) and the other NKV - E through one mean key each (4 b (NKV - E) D).
    """
    if config is None:
        return 4.0 * seq_len * seq_len * head_dim * heads
    b = config.block_size
    layout = BlockLayout(seq_len=seq_len, target_len=target_len, block_size=b)
    nb = layout.num_blocks
    n_full = layout.num_full_query_blocks(config.flat_ratio)
    nkv = layout.num_kv_blocks(config.select_ratio)
    exact = layout.num_exact_blocks(config.sparsity, config.select_ratio)
    kept_tokens = layout.num_kv_tokens(config.select_ratio)
    compressed = 4.0 * nb * nb * head_dim
    full = 4.0 * n_full * b * kept_tokens * head_dim
    per_query_block = 2.0 * nkv * head_dim + 4.0 * b * b * exact * head_dim + 4.0 * b * (nkv - exact) * head_dim
    sparse = (nb - n_full) * per_query_block
    return heads * (compressed + full + sparse)


@dataclass
class EditPlan:
    """What a run will do, computed without loading any weights."""

    frames: int
    frames_read: int
    fps: float
    source_size: tuple[int, int]  # (h, w) of the input
    size: tuple[int, int]  # (H, W) the model runs at
    latent_shape: tuple[int, int, int, int]  # [16, F', H/8, W/8]
    target_tokens: int  # T
    source_tokens: int  # C
    text_len: int
    batch: int  # 2 with classifier-free guidance, 1 when guidance is 1
    steps: int
    num_layers: int
    heads: int
    head_dim: int
    backend: str
    isa: Optional[ISAConfig]
    flops_dense: float  # self-attention FLOPs of the whole run, dense
    flops_run: float  # the same with the configured backend
    isa_stats: dict[str, Any]
    memory: dict[str, float]  # GiB: weights, activations and stage peaks of the chosen memory tier
    lvsa: Optional[LVSAOptions] = None  # backend "lvsa": its pattern and kernel
    lvsa_stats: dict[str, Any] = field(default_factory=dict)  # `lvsa_statistics`, plus "kernel" as it will run
    warnings: list[str] = field(default_factory=list)  # one line each, printed with the plan
    parallel: dict[str, Any] = field(default_factory=dict)  # `parallel_layout`; empty for one process
    memory_tiers: list["MemoryTier"] = field(default_factory=list)  # every tier this device can run, fastest first
    memory_setting: MemorySetting = field(default_factory=MemorySetting)  # the tier the run takes
    memory_reason: str = ""  # why that tier, one line
    free_gib: Optional[float] = None  # free GPU memory the choice was made against; None: no GPU limit known

    @property
    def seq_len(self) -> int:
        return self.target_tokens + self.source_tokens


def isa_statistics(seq_len: int, target_len: int, config: ISAConfig) -> dict[str, Any]:
    """Block counts ISA works with at this length (identical for every layer, head and step)."""
    layout = BlockLayout(seq_len=seq_len, target_len=target_len, block_size=config.block_size)
    n_full = layout.num_full_query_blocks(config.flat_ratio)
    candidates = layout.num_candidates
    selected = layout.num_selected(config.select_ratio)
    return {
        "blocks": layout.num_blocks,
        "full_query_blocks": n_full,
        "full_query_share": n_full / layout.num_blocks,
        "source_candidates": candidates,
        "source_kept": selected,
        "source_kept_share": selected / candidates if candidates else 0.0,
        "kv_blocks": layout.num_kv_blocks(config.select_ratio),
        "exact_blocks": layout.num_exact_blocks(config.sparsity, config.select_ratio),
    }


def lvsa_statistics(num_frames: int, steps: int, config: LVSAConfig) -> dict[str, Any]:
    """LVSA's frame pattern over a run of `steps` denoising steps on `num_frames` latent frames.

    Step s uses the keyframe offset s mod kfi (0 without rotation), so the run's masks are
    the masks of its distinct offsets, each weighted by its number of steps; every frame
    has the same number of tokens, so a mask's attended share of token pairs is its mean.

    Returns:
        {"frames": F, "interval": kfi, "automatic": kfi picked from F, "attended_min" /
        "attended_max": key frames per query frame over all rows of all the run's masks,
        "share_step0": the attended share at step 0, "share": the attended share averaged
        over the run's steps (self-attention FLOPs against dense), "dense": share == 1}.
    """
    offsets = Counter(keyframe_offset(num_frames, step, config) for step in range(steps))
    masks = {offset: lvsa_frame_mask(num_frames, offset, config) for offset in offsets}
    per_row = torch.cat([mask.sum(dim=1) for mask in masks.values()])
    share = sum(count * attended_fraction(masks[offset]) for offset, count in offsets.items()) / steps
    return {
        "frames": num_frames,
        "interval": keyframe_interval(num_frames, config),
        "automatic": config.keyframe_interval is None,
        "attended_min": int(per_row.min()),
        "attended_max": int(per_row.max()),
        "share_step0": attended_fraction(lvsa_frame_mask(num_frames, 0, config)),
        "share": share,
        "dense": share == 1.0,
    }


def _planned_device_type(cfg) -> str:
    """"cuda" or "cpu": where the run will go, from `cfg.device` (no device is checked or touched)."""
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(cfg.device).type


def _meta_parameter_counts(cfg) -> dict[str, Any]:
    """Parameter counts of the three networks, built on the meta device (no memory, no files)."""
    from transformers import UMT5Config, UMT5EncoderModel

    from model import TINY_CONFIG, WanDiT

    from .t5 import TINY_CONFIG as T5_TINY
    from .t5 import UMT5_XXL_CONFIG
    from .vae import TINY_CONFIG as VAE_TINY
    from .vae import build_meta_vae

    tiny = cfg.model.kind == "tiny"  # "random" has the real sizes
    with torch.device("meta"):
        dit = WanDiT(**TINY_CONFIG) if tiny else WanDiT()
        t5 = UMT5EncoderModel(UMT5Config(**(T5_TINY if tiny else UMT5_XXL_CONFIG)))
        if tiny:
            from diffusers import AutoencoderKLWan

            vae = AutoencoderKLWan(**VAE_TINY)
    if not tiny:
        vae = build_meta_vae()
    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    return {"dit": count(dit), "text_encoder": count(t5), "vae": count(vae), "dit_config": dict(dit.config)}


def parallel_layout(cfg, seq: int, heads: int, batch: int, memory: dict) -> dict[str, Any]:
    """Each rank's share under torchrun (`cfg.parallel`); {} for one process.

    Ulysses gives every rank ceil(S / U) tokens for the token-wise layers and H / U heads of
    all S tokens for self-attention, so the activations shrink by U; cfg_degree 2 leaves each
    rank a batch of 1 instead of 2; shard_weights keeps 1 / world of the DiT's weights per rank
    (each block is gathered whole while it runs: one block more, which this leaves out).
    """
    p = cfg.parallel
    world = p.ulysses_degree * p.cfg_degree
    if world == 1:
        return {}
    batch_per_rank = batch // p.cfg_degree
    weights = memory["dit_weights"] / world if p.shard_weights else memory["dit_weights"]
    activations = memory["dit_activations"] * batch_per_rank / batch / p.ulysses_degree
    return {
        "world_size": world, "ulysses_degree": p.ulysses_degree, "cfg_degree": p.cfg_degree,
        "shard_weights": p.shard_weights, "tokens_per_rank": -(-seq // p.ulysses_degree),
        "heads_per_rank": heads / p.ulysses_degree, "batch_per_rank": batch_per_rank,
        "dit_weights_per_gpu": weights, "dit_activations_per_gpu": activations,
        "peak_per_gpu": weights + memory["vae_weights"] + activations,
    }


@dataclass(frozen=True)
class MemoryTier:
    """One memory setting and its estimated GPU memory in GiB (`memory_tiers`)."""

    setting: MemorySetting
    text: float  # while umT5 encodes the prompts
    denoise: float  # at the peak of a DiT forward
    vae: float  # while the VAE encodes or decodes
    dit: dict[str, float]  # `wanx.memory.estimate_peak_gib` for this setting

    @property
    def peak(self) -> float:
        return max(self.text, self.denoise, self.vae)


def vae_work_space_gib(cfg, frame_pixels: int) -> float:
    """The VAE's estimated work space in GiB for frames of `frame_pixels` (H x W); 0 with video.vae_tiling."""
    if cfg.video.vae_tiling:
        return 0.0
    return frame_pixels * VAE_WORK_BYTES_PER_PIXEL * DTYPES[cfg.model.vae_dtype].itemsize / 4 / GIB


def memory_tiers(cfg, dit_config: dict, seq: int, cfg_batch: bool, weights: dict[str, float],
                 device_type: str, frame_pixels: int) -> list[MemoryTier]:
    """Every memory tier a `device_type` device can run, in the planner's order (fastest first), with its estimate.

    The order: bf16 before fp8, since fp8 storage changes the output (4.3% relative L2 for the
    14 B on the H200) and is no faster (each layer dequantises its matrix in every forward); then
    offload none, model, blocks (data moved per edit: none, each network once, every block once
    per DiT forward; measured on the H200, streaming the blocks cost nothing per step); then the
    guidance mode: on a CUDA GPU with CFG and at least `SEQUENTIAL_GUIDANCE_MIN_TOKENS` tokens per
    sample, sequential before batch (two batch-1 passes measured 1-7% faster on the H200 there, and
    they need fewer activations), else batch before sequential (one DiT pass per step: faster for
    short clips, where a batch of 1 leaves the GPU partly idle; the CPU is not measured).
    Measurements: docs/benchmarks.md, memory tiers and guidance order.

    Stages, per tier (the DiT's figures from `estimate_peak_gib`):
        text: umT5's weights and work space (`TEXT_ENCODER_WORK_SPACE`), plus with offload none the DiT and
            the VAE (on the GPU from loading on);
        denoise: the DiT's resident weights, its largest dequantised matrix and its activations (batch
        2 for guidance "batch" with CFG, else 1), plus with offload none the VAE, and umT5 unless
        `offload_text_encoder`. Offload model and blocks keep umT5 and the VAE on the host outside
        their own stages;
        vae: the VAE's weights and its work space (`VAE_WORK_BYTES_PER_PIXEL` x frame_pixels; zero
        with video.vae_tiling, not estimated), plus what stays resident as for denoise less the
        DiT's activations.
    The CPU has no block streaming (a CUDA stream prefetches the blocks); several processes run
    only the first tier (`wanx.config`).

    Args:
        dit_config: the DiT's config; seq: tokens per sample (target + source); cfg_batch: CFG on;
        weights: GiB of {"text_encoder", "vae"} as loaded; device_type: "cuda" or "cpu";
        frame_pixels: H x W of one video frame at the working size.
    """
    parallel = cfg.parallel.ulysses_degree * cfg.parallel.cfg_degree > 1
    dtype_bytes = DTYPES[cfg.model.dtype].itemsize
    vae_work = vae_work_space_gib(cfg, frame_pixels)
    sequential_first = device_type == "cuda" and cfg_batch and seq >= SEQUENTIAL_GUIDANCE_MIN_TOKENS
    guidance_order = GUIDANCE_MODES[::-1] if sequential_first else GUIDANCE_MODES  # (batch, sequential) or reversed
    tiers = []
    for weight_mode in WEIGHT_MODES:
        for offload in OFFLOAD_MODES:
            for guidance in guidance_order:
                if offload == "blocks" and device_type != "cuda":
                    continue
                setting = MemorySetting(offload, weight_mode, guidance)
                if parallel and setting != MemorySetting():
                    continue
                batch = 2 if cfg_batch and guidance == "batch" else 1
                dit = estimate_peak_gib(dit_config, seq, batch, offload, weight_mode, dtype_bytes)
                text, denoise = weights["text_encoder"] * (1 + TEXT_ENCODER_WORK_SPACE), dit["peak"]
                vae = weights["vae"] + vae_work
                if offload == "none":
                    text += dit["weights_total"] + weights["vae"]
                    denoise += weights["vae"] + (0.0 if cfg.offload_text_encoder else weights["text_encoder"])
                    vae += dit["weights_total"] + (0.0 if cfg.offload_text_encoder else weights["text_encoder"])
                tiers.append(MemoryTier(setting, text, denoise, vae, dit))
    return tiers


def size_text(gib: float) -> str:
    """GiB as text: "26.6 GiB", or "31.4 MiB" below 1 GiB."""
    return f"{gib:.1f} GiB" if gib >= 1 else f"{gib * 1024:.1f} MiB"


def _tier_of(setting: MemorySetting, tiers: list[MemoryTier], device_type: str) -> MemoryTier:
    """The tier of `setting`; ConfigError when this device cannot run it."""
    for tier in tiers:
        if tier.setting == setting:
            return tier
    raise ConfigError(f"memory {setting.describe()} cannot run on this {device_type} device")


def choose_memory_tier(cfg, tiers: list[MemoryTier], device_type: str, free_bytes: Optional[int]
                       ) -> tuple[MemoryTier, str]:
    """The tier a run takes (`cfg.memory`) and why, in one line.

    Args:
        tiers: `memory_tiers`, fastest first.
        device_type: "cuda" or "cpu".
        free_bytes: free memory of the GPU the run will use (`free_gpu_bytes`); None where no
            limit is known (the CPU, no GPU visible, several processes).
    Raises:
        ConfigError: one line: offload "blocks" on a device that is not CUDA; with profile "auto",
            no matching tier fits the free memory less `FIT_MARGIN` (naming the smallest tier's
            estimate and the free memory).
    """
    mem = cfg.memory
    if mem.offload == "blocks" and device_type != "cuda":
        raise ConfigError(f"memory.offload blocks streams the DiT's blocks to a CUDA GPU; the device here is "
                          f"{device_type}")
    wanted = {key: getattr(mem, key) for key in ("offload", "weights", "guidance") if getattr(mem, key) is not None}
    matching = [t for t in tiers if all(getattr(t.setting, key) == value for key, value in wanted.items())]
    if not matching:
        raise ConfigError(f"no memory tier matches {', '.join(f'memory.{k}={v}' for k, v in wanted.items())} here")
    among = f" among those with {', '.join(f'{k} {v}' for k, v in wanted.items())}" if wanted else ""
    if mem.profile == "manual":
        return matching[0], f"memory.profile manual: the fastest tier{among}"
    if free_bytes is None:
        limit = "the CPU has no GPU memory limit" if device_type == "cpu" else "free GPU memory unknown here"
        return matching[0], f"auto: {limit}: the fastest tier{among}"
    free_gib = free_bytes / GIB
    usable = free_gib * (1 - FIT_MARGIN)
    for tier in matching:
        if tier.peak <= usable:
            return tier, (f"auto: the fastest tier{among} whose estimate fits {1 - FIT_MARGIN:.0%} of the "
                          f"{size_text(free_gib)} free")
    smallest = min(matching, key=lambda t: t.peak)
    raise ConfigError(f"no memory tier{among} fits the GPU: the smallest, {smallest.setting.describe()}, needs about "
                      f"{size_text(smallest.peak)} and {size_text(free_gib)} are free ({FIT_MARGIN:.0%} kept as "
                      "margin); free GPU memory, or take a shorter clip (--max-frames) or a smaller video.size")


def free_gpu_bytes(cfg) -> Optional[int]:
    """Free memory of the GPU a single-process run will use (`torch.cuda.mem_get_info`), before it loads.

    None on the CPU, where no GPU is visible, and under several processes: there each rank takes
    the GPU of its LOCAL_RANK, which this process has not chosen yet (asking would open a CUDA
    context on GPU 0 from every rank).
    """
    if cfg.parallel.ulysses_degree * cfg.parallel.cfg_degree > 1:
        return None
    if _planned_device_type(cfg) != "cuda" or not torch.cuda.is_available():
        return None
    device = torch.device("cuda") if cfg.device == "auto" else torch.device(cfg.device)
    return torch.cuda.mem_get_info(device)[0]


def memory_setting_without_plan(cfg, device: torch.device) -> MemorySetting:
    """The memory setting of a pipeline loaded without a plan's (`EditingPipeline.load(cfg)`).

    Profile "manual", and "auto" on a CPU (no GPU limit): the values set, and for the rest the
    first tier of a short clip (none, bf16, batch). For a long clip on a GPU the planner puts
    sequential guidance first (`memory_tiers`): pass `make_plan(...).memory_setting` to load with it.
    Raises:
        ConfigError: profile "auto" on a GPU, whose choice depends on the edit's size.
    """
    mem = cfg.memory
    if mem.profile == "auto" and device.type == "cuda":
        raise ConfigError("memory.profile auto picks the tier from the edit's size: pass "
                          "memory=make_plan(cfg, source, free_gpu_bytes(cfg)).memory_setting to "
                          "EditingPipeline.load, or set memory.profile=manual")
    defaults = MemorySetting()
    return MemorySetting(*(getattr(mem, key) or getattr(defaults, key) for key in ("offload", "weights", "guidance")))


def make_plan(cfg, source: "SourceVideo", free_bytes: Optional[int] = None,
              setting: Optional[MemorySetting] = None) -> EditPlan:
    """The run's shapes, token counts, attention FLOPs, memory tiers and the one it takes; loads nothing.

    Args:
        cfg: the configuration; source: the video (only its shape is read).
        free_bytes: free GPU memory (`free_gpu_bytes`), which profile "auto" fits a tier to; None:
            no limit known, the fastest matching tier.
        setting: a tier already decided (a loaded pipeline's), instead of choosing one.
    Raises:
        ConfigError: a working size that is not a multiple of 16, and what `choose_memory_tier` refuses.
    """
    frames, height, width = source.video.shape[1:]
    h, w = source.source_size
    counts = _meta_parameter_counts(cfg)
    dit_cfg = counts["dit_config"]
    pt, ph, pw = dit_cfg["patch_size"]
    latent = (16, (frames - 1) // 4 + 1, height // 8, width // 8)
    if latent[2] % ph or latent[3] % pw:
        raise ConfigError(f"working size {height}x{width} is not a multiple of 16")
    tokens = (latent[1] // pt) * (latent[2] // ph) * (latent[3] // pw)
    heads, dim, layers = dit_cfg["num_heads"], dit_cfg["dim"], dit_cfg["num_layers"]
    head_dim = dim // heads
    backend = cfg.attention.backend
    options = attention_options(cfg)
    isa = options if isinstance(options, ISAConfig) else None
    lvsa = options if isinstance(options, LVSAOptions) else None
    batch = 1 if cfg.sampler.guidance == 1.0 else 2
    seq = 2 * tokens
    forwards = cfg.sampler.steps * batch * layers
    flops_dense = forwards * attention_flops(seq, tokens, heads, head_dim, None)
    flops_run = forwards * attention_flops(seq, tokens, heads, head_dim, isa)
    stats = isa_statistics(seq, tokens, isa) if isa is not None else {}
    lvsa_stats: dict[str, Any] = {}
    if lvsa is not None:
        lvsa_stats = lvsa_statistics(latent[1] // pt, cfg.sampler.steps, lvsa.config)
        lvsa_stats["kernel"] = lvsa_kernel(lvsa.kernel, torch.device(_planned_device_type(cfg)))
        flops_run = flops_dense * lvsa_stats["share"]  # attended token pairs; partial tiles cost a few % more
    warnings = []
    if frames > TRAINING_FRAMES and (isa is not None or backend == "dense"):
        warnings.append(f"{frames} frames ({latent[1]} latent) with {backend!r} attention: {LONG_VIDEO_ADVICE}")

    device_type = _planned_device_type(cfg)
    weights = {"text_encoder": counts["text_encoder"] * DTYPES[cfg.model.dtype].itemsize / GIB,
               "vae": counts["vae"] * DTYPES[cfg.model.vae_dtype].itemsize / GIB}
    tiers = memory_tiers(cfg, dit_cfg, seq, batch == 2, weights, device_type, frame_pixels=height * width)
    if setting is None:
        tier, reason = choose_memory_tier(cfg, tiers, device_type, free_bytes)
    else:
        tier, reason = _tier_of(setting, tiers, device_type), "as the pipeline was loaded"
    free_gib = None if free_bytes is None else free_bytes / GIB
    if free_gib is not None and tier.peak > free_gib * (1 - FIT_MARGIN):
        warnings.append(f"memory: {tier.setting.describe()} needs about {size_text(tier.peak)}, more than "
                        f"{1 - FIT_MARGIN:.0%} of the {size_text(free_gib)} free: the run may run out of GPU memory")
    memory = {
        "dit_weights": tier.dit["weights_total"],
        "dit_resident": tier.dit["weights_resident"],
        "text_encoder_weights": weights["text_encoder"],
        "vae_weights": weights["vae"],
        "dit_activations": tier.dit["activations"],
        "text_stage": tier.text,
        "denoise_stage": tier.denoise,
        "vae_stage": tier.vae,
        "vae_work_space": vae_work_space_gib(cfg, height * width),
        "peak_estimate": tier.peak,
    }
    layout = parallel_layout(cfg, seq, heads, batch, memory)
    return EditPlan(
        frames=frames, frames_read=source.frames_read, fps=source.fps, source_size=(h, w),
        size=(height, width), latent_shape=latent, target_tokens=tokens, source_tokens=tokens,
        text_len=dit_cfg["text_len"], batch=batch, steps=cfg.sampler.steps, num_layers=layers,
        heads=heads, head_dim=head_dim, backend=backend, isa=isa, flops_dense=flops_dense,
        flops_run=flops_run, isa_stats=stats, memory=memory, lvsa=lvsa, lvsa_stats=lvsa_stats, warnings=warnings,
        parallel=layout, memory_tiers=tiers, memory_setting=tier.setting, memory_reason=reason, free_gib=free_gib,
    )
