"""The LIVEditor editing pipeline (SPEC section 4): source video + instruction -> edited video.

    cfg = load_config("inference.yaml", ["attention.backend=triton"])
    plan = make_plan(cfg, read_source(cfg, "in.mp4"))   # cheap: loads no weights
    pipe = EditingPipeline.load(cfg)                      # text encoder, VAE, DiT
    result = pipe.edit(source, "make it snow")            # EditResult: frames, timings, ...

Steps: read the video at 16 fps, keep the largest 4k+1 frames (at most `video.max_frames`),
resize and centre-crop to the closest 540p aspect bucket, scale to [-1, 1]; encode the
prompt and the negative prompt (Wan's Chinese one by default) with umT5; encode the
source with the Wan VAE; sample the target latent from seeded noise with Flow-UniPC and
classifier-free guidance (cond and uncond in one batch of 2 per step, sharing one source
latent); decode and return uint8 frames.

The configuration schema (`PipelineConfig`) is strict: unknown keys and wrongly typed
values are refused when the file or an override is merged.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from in_context_sparse_attention import ISAConfig
from in_context_sparse_attention.layout import BlockLayout

# Wan 2.2's default negative prompt (`wan/configs/shared_config.py`, `sample_neg_prompt`).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

ATTENTION_BACKENDS = ("tilelang", "triton", "torch", "dense")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODEL_KINDS = ("wan", "tiny")


@dataclass
class ModelSection:
    """Where the weights come from. kind "wan" loads checkpoints; "tiny" builds small
    random-weight components in code (tests, CPU demo) and reads no file."""

    kind: str = "wan"
    wan_dir: Optional[str] = None  # the Wan2.2-T2V-A14B folder
    dit: Optional[str] = None  # base DiT weights loaded before `checkpoint` (a Wan expert folder), or null
    checkpoint: Optional[str] = None  # LIVEditor's liveditor_ckpt.bin (a full DiT state dict)
    vae: Optional[str] = None  # Wan2.1_VAE.pth
    text_encoder: Optional[str] = None  # models_t5_umt5-xxl-enc-bf16.pth
    tokenizer: Optional[str] = None  # the google/umt5-xxl folder
    dtype: str = "bfloat16"  # DiT and text encoder
    vae_dtype: str = "float32"  # Wan runs its VAE in float32
    seed: int = 0  # weights of the "tiny" components


@dataclass
class AttentionSection:
    """Self-attention kernel: "dense" or an ISA backend, and ISA's hyper-parameters."""

    backend: str = "tilelang"
    # ISA's hyper-parameters default to ISAConfig's own, so the two cannot drift apart
    block_size: int = ISAConfig.block_size
    select_ratio: float = ISAConfig.select_ratio
    sparsity: float = ISAConfig.sparsity
    sharpness_ratio: float = ISAConfig.sharpness_ratio
    flat_ratio: float = ISAConfig.flat_ratio


@dataclass
class SamplerSection:
    """Flow-UniPC sampling with classifier-free guidance."""

    steps: int = 32
    shift: float = 6.0
    guidance: float = 2.5
    seed: int = 42
    num_train_timesteps: int = 1000


@dataclass
class VideoSection:
    """Input frames and working resolution; the output is written at `fps` too."""

    max_frames: int = 81
    fps: float = 16.0  # the input is resampled to this rate (Wan's 16 fps)
    size: Optional[list[int]] = None  # [height, width]; null: the closest 540p bucket
    bucket_scale: float = 1.0  # scales the chosen bucket (sides rounded to multiples of 16)
    vae_tiling: bool = False  # spatial tiles in the VAE, to save memory


@dataclass
class PipelineConfig:
    """Everything `inference.py` and `EditingPipeline` read; see inference.yaml for the defaults."""

    model: ModelSection = field(default_factory=ModelSection)
    attention: AttentionSection = field(default_factory=AttentionSection)
    sampler: SamplerSection = field(default_factory=SamplerSection)
    video: VideoSection = field(default_factory=VideoSection)
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    device: str = "auto"  # "auto" (cuda when present), "cuda", "cuda:N" or "cpu"
    offload_text_encoder: bool = True  # move umT5 to the CPU once the prompts are encoded


class ConfigError(ValueError):
    """A configuration that cannot run; the message is one line."""


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None,
                settings: Optional[dict[str, Any]] = None):
    """Schema defaults, then the YAML file, then `key=value` overrides, then `settings`.

    Args:
        path: a YAML file, or None for the schema defaults alone.
        overrides: omegaconf dot-list items such as "sampler.steps=16" (values parsed as YAML).
        settings: {dotted key: Python value}, set as they are (the CLI's flags).

    Raises:
        ConfigError: an unreadable file, an unknown key, a wrongly typed or invalid value.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    cfg = OmegaConf.structured(PipelineConfig)
    try:
        if path is not None:
            if not os.path.isfile(path):
                raise ConfigError(f"config file not found: {path!r}")
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"config override must be key=value, got {item!r}")
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        for key, value in (settings or {}).items():
            OmegaConf.update(cfg, key, value, merge=False)
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"bad configuration: {_one_line(exc)}") from exc
    validate_config(cfg)
    return cfg


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def validate_config(cfg) -> None:
    """Raise ConfigError for values the schema's types cannot catch."""
    checks = [
        (cfg.model.kind in MODEL_KINDS, f"model.kind must be one of {MODEL_KINDS}, got {cfg.model.kind!r}"),
        (cfg.model.dtype in DTYPES, f"model.dtype must be one of {tuple(DTYPES)}, got {cfg.model.dtype!r}"),
        (cfg.model.vae_dtype in DTYPES, f"model.vae_dtype must be one of {tuple(DTYPES)}, got {cfg.model.vae_dtype!r}"),
        (cfg.attention.backend in ATTENTION_BACKENDS,
         f"unknown attention backend {cfg.attention.backend!r}: choose one of {', '.join(ATTENTION_BACKENDS)}"),
        (cfg.sampler.steps >= 1, f"sampler.steps must be at least 1, got {cfg.sampler.steps}"),
        (cfg.sampler.shift > 0, f"sampler.shift must be positive, got {cfg.sampler.shift}"),
        (math.isfinite(cfg.sampler.guidance), f"sampler.guidance must be a finite number, got {cfg.sampler.guidance}"),
        (cfg.video.max_frames >= 1, f"video.max_frames must be at least 1, got {cfg.video.max_frames}"),
        (cfg.video.fps > 0, f"video.fps must be positive, got {cfg.video.fps}"),
        (cfg.video.bucket_scale > 0, f"video.bucket_scale must be positive, got {cfg.video.bucket_scale}"),
        (cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda"),
         f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {cfg.device!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    size = cfg.video.size
    if size is not None and (len(size) != 2 or any(s < 16 or s % 16 for s in size)):
        raise ConfigError(f"video.size must be [height, width], multiples of 16, got {list(size)}")
    isa_config(cfg)


def isa_config(cfg) -> ISAConfig:
    """The ISAConfig of `cfg.attention` (raises ConfigError when out of range)."""
    a = cfg.attention
    try:
        return ISAConfig(block_size=a.block_size, select_ratio=a.select_ratio, sparsity=a.sparsity,
                         sharpness_ratio=a.sharpness_ratio, flat_ratio=a.flat_ratio)
    except ValueError as exc:
        raise ConfigError(f"attention: {_one_line(exc)}") from exc


def resolve_device(cfg) -> torch.device:
    """The configured device; "auto" is CUDA when available, else the CPU."""
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {cfg.device!r} requested but CUDA is not available here")
    return device


def weight_paths(cfg) -> dict[str, Optional[str]]:
    """The files a "wan" run reads: {role: path or None}; empty for "tiny" without a checkpoint."""
    m = cfg.model
    if m.kind == "tiny":
        return {"checkpoint": m.checkpoint} if m.checkpoint else {}
    return {"dit": m.dit, "checkpoint": m.checkpoint, "vae": m.vae,
            "text_encoder": m.text_encoder, "tokenizer": m.tokenizer}


def missing_weights(cfg) -> list[str]:
    """One line per weight path that is unset or absent (nothing is opened)."""
    problems = []
    for role, path in weight_paths(cfg).items():
        if role == "dit" and path is None:
            continue  # optional: the LIVEditor checkpoint alone is a full DiT
        if path is None:
            problems.append(f"model.{role} is not set")
        elif not os.path.exists(path):
            problems.append(f"model.{role} not found: {path!r}")
    if cfg.model.kind == "wan" and cfg.model.dit is None and cfg.model.checkpoint is None:
        problems.append("neither model.dit nor model.checkpoint is set: no DiT weights")
    return problems


@dataclass
class SourceVideo:
    """Input frames after fps resampling and the 4k+1 trim."""

    path: str
    frames: np.ndarray  # uint8 [F, h, w, 3], F = 4k+1
    fps: float
    frames_read: int  # before the 4k+1 trim


def read_source(cfg, path: str) -> SourceVideo:
    """Read `path` at `video.fps`, at most `video.max_frames` frames, trimmed to 4k+1.

    Raises:
        wanx.video.VideoError: missing, unreadable or not a video.
    """
    from .video import fit_frame_count, read_video

    frames, fps = read_video(path, max_frames=cfg.video.max_frames, target_fps=cfg.video.fps)
    kept = fit_frame_count(len(frames))
    return SourceVideo(path=os.fspath(path), frames=frames[:kept], fps=fps, frames_read=len(frames))


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

    Dense: QK^T and PV over all S tokens, 4 S^2 D per head. ISA (SPEC section 2), per head:
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
    sparse = (nb - n_full) * (2.0 * nkv * head_dim + 4.0 * b * b * exact * head_dim + 4.0 * b * (nkv - exact) * head_dim)
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
    memory: dict[str, float]  # GiB: weights and activation estimates

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


def _meta_parameter_counts(cfg) -> dict[str, Any]:
    """Parameter counts of the three networks, built on the meta device (no memory, no files)."""
    from transformers import UMT5Config, UMT5EncoderModel

    from model import TINY_CONFIG, WanDiT

    from .t5 import TINY_CONFIG as T5_TINY, UMT5_XXL_CONFIG
    from .vae import TINY_CONFIG as VAE_TINY, build_meta_vae

    tiny = cfg.model.kind == "tiny"
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


def make_plan(cfg, source: SourceVideo) -> EditPlan:
    """The run's shapes, token counts, attention FLOPs and a GPU memory estimate; loads nothing."""
    frames, (h, w) = len(source.frames), source.frames.shape[1:3]
    height, width = working_size(cfg, h, w)
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
    isa = None if backend == "dense" else isa_config(cfg)
    batch = 1 if cfg.sampler.guidance == 1.0 else 2
    seq = 2 * tokens
    forwards = cfg.sampler.steps * batch * layers
    flops_dense = forwards * attention_flops(seq, tokens, heads, head_dim, None)
    flops_run = forwards * attention_flops(seq, tokens, heads, head_dim, isa)
    stats = isa_statistics(seq, tokens, isa or ISAConfig()) if isa is not None else {}

    gib = 2.0 ** 30
    weight_bytes = DTYPES[cfg.model.dtype].itemsize
    ffn = dit_cfg["ffn_dim"]
    # Peak inside one block: fp32 residual and normed copy, q/k/v/out in the weights' dtype,
    # the FFN hidden layer and its activation, and the float64 RoPE rotations of q and k
    # (complex128, 8 bytes per channel); ISA's block tables are small beside these.
    # Measured for calibration (docs/benchmarks.md): 42.4 GiB peak for one batch-1 forward
    # at S = 85,680, against 26.6 + 17.5 GiB by this formula.
    activations = batch * seq * (2 * dim * 4 + 4 * dim * weight_bytes + 2 * ffn * weight_bytes + 2 * dim * 8)
    memory = {
        "dit_weights": counts["dit"] * weight_bytes / gib,
        "text_encoder_weights": counts["text_encoder"] * weight_bytes / gib,
        "vae_weights": counts["vae"] * DTYPES[cfg.model.vae_dtype].itemsize / gib,
        "dit_activations": activations / gib,
    }
    resident_text = 0.0 if cfg.offload_text_encoder else memory["text_encoder_weights"]
    memory["peak_estimate"] = (memory["dit_weights"] + memory["vae_weights"] + resident_text
                               + memory["dit_activations"])
    return EditPlan(
        frames=frames, frames_read=source.frames_read, fps=source.fps, source_size=(h, w),
        size=(height, width), latent_shape=latent, target_tokens=tokens, source_tokens=tokens,
        text_len=dit_cfg["text_len"], batch=batch, steps=cfg.sampler.steps, num_layers=layers,
        heads=heads, head_dim=head_dim, backend=backend, isa=isa, flops_dense=flops_dense,
        flops_run=flops_run, isa_stats=stats, memory=memory,
    )


def _gflops(x: float) -> str:
    return f"{x / 1e12:,.1f} TFLOP" if x >= 1e12 else f"{x / 1e9:,.2f} GFLOP"


def side_by_side(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Two uint8 videos [F, H, W, 3] of one shape, left | right: [F, H, 2W, 3]."""
    if left.shape != right.shape:
        raise ValueError(f"videos to compare must have the same shape, got {left.shape} and {right.shape}")
    return np.concatenate([left, right], axis=2)


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


@dataclass
class EditResult:
    """An edited video and how it was made."""

    video: np.ndarray  # uint8 [F, H, W, 3], the edit
    source: np.ndarray  # uint8 [F, H, W, 3], the input as the model saw it (resized, cropped)
    fps: float
    plan: EditPlan
    timings: dict[str, float]  # seconds per stage
    backend: str  # the self-attention backend the DiT ran with
    dense_kernel: str  # the dense kernel behind "dense" and ISA's full-attention part


def _progress(enabled: bool, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(disable=not enabled, dynamic_ncols=True, leave=True, **kwargs)


class EditingPipeline:
    """umT5 text encoder + Wan VAE + LIVEditor DiT, with the Flow-UniPC sampler.

    Build it with `load(cfg)`; `edit(source, prompt)` runs one edit.
    """

    def __init__(self, cfg, text_encoder, vae, dit, device: torch.device, load_seconds: float = 0.0):
        self.cfg = cfg
        self.text_encoder = text_encoder
        self.vae = vae
        self.dit = dit
        self.device = device
        self.load_seconds = load_seconds

    @classmethod
    def load(cls, cfg, progress: bool = True) -> "EditingPipeline":
        """Load (or, for kind "tiny", build) the three networks onto the configured device.

        Raises:
            ConfigError: missing weight files, an attention backend that cannot run here,
                or components that do not fit together.
        """
        from model import TINY_CONFIG, WanDiT

        from .dit_loader import load_dit
        from .t5 import WanTextEncoder
        from .vae import WanVAE

        problems = missing_weights(cfg)
        if problems:
            raise ConfigError("; ".join(problems))
        device = resolve_device(cfg)
        check_backend(cfg, device)
        m = cfg.model
        dtype, vae_dtype = DTYPES[m.dtype], DTYPES[m.vae_dtype]
        start = time.perf_counter()
        with _progress(progress, total=3, desc="loading", unit="model") as bar:
            bar.set_postfix_str("text encoder")
            if m.kind == "tiny":
                text_encoder = WanTextEncoder.tiny(seed=m.seed, dtype=dtype, device=device)
            else:
                text_encoder = WanTextEncoder.from_wan_checkpoint(m.text_encoder, m.tokenizer, dtype=dtype, device=device)
            bar.update()
            bar.set_postfix_str("VAE")
            if m.kind == "tiny":
                vae = WanVAE.tiny(seed=m.seed, dtype=vae_dtype, device=device)
            else:
                vae = WanVAE.from_checkpoint(m.vae, dtype=vae_dtype, device=device)
            if cfg.video.vae_tiling:
                vae.enable_tiling()
            bar.update()
            bar.set_postfix_str("DiT")
            if m.kind == "tiny" and m.checkpoint is None:
                dit = WanDiT.tiny(seed=m.seed).to(device)
                if dtype != torch.float32:
                    dit = dit.to(dtype=dtype)
            elif m.kind == "tiny":
                dit = load_dit(m.checkpoint, dtype=dtype, device=device, config=dict(TINY_CONFIG))
            elif m.dit is not None:
                dit = load_dit(m.dit, overlay=m.checkpoint, dtype=dtype, device=device)
            else:
                dit = load_dit(m.checkpoint, dtype=dtype, device=device)
            dit.eval().requires_grad_(False)
            bar.update()
        if dit.config.text_dim != text_encoder.dim:
            raise ConfigError(f"the DiT expects {dit.config.text_dim}-dim text features, the text encoder gives "
                              f"{text_encoder.dim}")
        backend = cfg.attention.backend
        dit.set_attention(backend, None if backend == "dense" else isa_config(cfg))
        return cls(cfg, text_encoder, vae, dit, device, time.perf_counter() - start)

    def _encode_text(self, prompt: str, negative_prompt: str, cfg_batch: bool) -> list[torch.Tensor]:
        prompts = [prompt, negative_prompt] if cfg_batch else [prompt]
        context = self.text_encoder.encode(prompts)
        if self.cfg.offload_text_encoder and self.device.type == "cuda":
            self.text_encoder.offload()
        return [c.to(self.device) for c in context]

    def _observe_decoder(self, bar):
        """Tick `bar` once per latent frame the VAE decoder processes (diffusers decodes frame by frame)."""
        decoder = getattr(self.vae.model, "decoder", None)
        if decoder is None:
            return None

        def tick(*_):
            bar.update()

        return decoder.register_forward_hook(tick)

    @torch.no_grad()
    def edit(self, source: SourceVideo, prompt: str, negative_prompt: Optional[str] = None,
             progress: bool = True) -> EditResult:
        """Edit `source` as `prompt` asks.

        Args:
            source: from `read_source`.
            prompt: the editing instruction (must not be empty).
            negative_prompt: None for `cfg.negative_prompt` (Wan's by default).
            progress: show tqdm bars on stderr.
        """
        from scheduler import FlowUniPCSampler

        from .video import frames_to_uint8, preprocess_frames

        if not prompt or not prompt.strip():
            raise ConfigError("the prompt is empty")
        cfg = self.cfg
        negative_prompt = cfg.negative_prompt if negative_prompt is None else negative_prompt
        plan = make_plan(cfg, source)
        timings = {"load": self.load_seconds}
        guidance = float(cfg.sampler.guidance)
        cfg_batch = plan.batch == 2

        start = time.perf_counter()
        video = preprocess_frames(source.frames, plan.size).unsqueeze(0)  # [1, 3, F, H, W]
        timings["preprocess"] = time.perf_counter() - start

        start = time.perf_counter()
        context = self._encode_text(prompt, negative_prompt, cfg_batch)
        timings["text"] = time.perf_counter() - start

        start = time.perf_counter()
        source_latent = self.vae.encode(video).to(self.device)  # [1, 16, F', H/8, W/8] fp32
        timings["vae_encode"] = time.perf_counter() - start

        generator = torch.Generator(device=self.device).manual_seed(int(cfg.sampler.seed))
        noise = torch.randn((1, *plan.latent_shape), generator=generator, device=self.device, dtype=torch.float32)
        sampler = FlowUniPCSampler(cfg.sampler.steps, cfg.sampler.shift, cfg.sampler.num_train_timesteps)

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            batch = x.expand(plan.batch, -1, -1, -1, -1)
            timestep = t.to(self.device).expand(plan.batch)
            flow = self.dit(batch, source_latent, timestep, context).float()
            if not cfg_batch:
                return flow
            cond, uncond = flow.chunk(2)
            return uncond + guidance * (cond - uncond)

        start = time.perf_counter()
        with _progress(progress, total=sampler.num_steps, desc="denoising", unit="step") as bar:
            latent = sampler.sample(velocity, noise, callback=lambda _: bar.update())
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        timings["denoise"] = time.perf_counter() - start

        start = time.perf_counter()
        with _progress(progress, total=None if cfg.video.vae_tiling else plan.latent_shape[1],
                       desc="decoding", unit="frame") as bar:
            hook = self._observe_decoder(bar)
            try:
                decoded = self.vae.decode(latent)
            finally:
                if hook is not None:
                    hook.remove()
        edited = frames_to_uint8(decoded[0])
        timings["vae_decode"] = time.perf_counter() - start

        from in_context_sparse_attention import dense_kernel_name

        probe = torch.empty(1, 1, 1, plan.head_dim, device=self.device, dtype=DTYPES[cfg.model.dtype])
        return EditResult(video=edited, source=frames_to_uint8(video[0]), fps=source.fps, plan=plan,
                          timings=timings, backend=self.dit.attention_backend,
                          dense_kernel=dense_kernel_name(probe))


def check_backend(cfg, device: torch.device) -> None:
    """Run the configured attention backend once on a small input on `device`, before any loading.

    Raises:
        ConfigError: the backend cannot be imported or cannot run on this device, with its reason.
    """
    from in_context_sparse_attention import dense_attention, editing_sparse_attention

    backend = cfg.attention.backend
    dtype = DTYPES[cfg.model.dtype] if device.type == "cuda" else torch.float32
    q = torch.randn(1, 3 * cfg.attention.block_size, 2, 64, device=device, dtype=dtype)
    try:
        if backend == "dense":
            dense_attention(q, q, q)
        else:
            editing_sparse_attention(q, q, q, cfg.attention.block_size, 2 * cfg.attention.block_size,
                                     config=isa_config(cfg), backend=backend)
    except (ImportError, RuntimeError, ValueError, TypeError) as exc:
        raise ConfigError(f"attention backend {backend!r} cannot run on {device}: {_one_line(exc)}") from exc


def format_summary(result: EditResult, outputs: list[str]) -> str:
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
