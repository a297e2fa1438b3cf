"""The three networks of an edit (umT5 text encoder, Wan VAE, LIVEditor DiT): where their weights
come from, the checks that run before any of them loads, and loading them onto the device.

`model.kind` picks the source: "wan" reads the checkpoints named in `model.*`; "tiny" builds
small random-weight networks in code (tests, the CPU demo); "random" builds every network at
its real size with random weights directly on the device (`wanx.random_weights`: timing and
memory measurements without the real weights). Only "wan" reads weight files (and "tiny"
its optional `model.checkpoint`).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .config import ConfigError, MemorySetting, attention_options, one_line
from .memory import HOST, apply_memory_mode, check_memory_mode

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(cfg) -> torch.device:
    """The configured device; "auto" is CUDA when available, else the CPU."""
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {cfg.device!r} requested but CUDA is not available here")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {cfg.device!r} requested but this machine has {torch.cuda.device_count()} "
                          "CUDA device(s)")
    return device


def weight_paths(cfg) -> dict[str, Optional[str]]:
    """The files a run reads: {role: path or None}. "tiny": its optional checkpoint; "random":
    its optional tokenizer folder; "wan": every file."""
    m = cfg.model
    if m.kind == "tiny":
        return {"checkpoint": m.checkpoint} if m.checkpoint else {}
    if m.kind == "random":
        return {"tokenizer": m.tokenizer} if m.tokenizer else {}
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


def check_weight_files(cfg) -> None:
    """Check every weight file's keys, shapes and dtypes from its header, reading no tensor data.

    Runs before anything loads, so that a wrong or damaged file is refused in seconds, not
    after the text encoder and the VAE have loaded for minutes.

    Raises:
        wanx.dit_loader.CheckpointError: the first bad file, on one line.
    """
    from model import TINY_CONFIG

    from .dit_loader import check_dit_checkpoint
    from .t5 import check_text_encoder_checkpoint, check_tokenizer_folder
    from .vae import check_vae_checkpoint

    m = cfg.model
    if m.kind == "tiny":
        if m.checkpoint is not None:
            check_dit_checkpoint(m.checkpoint, config=dict(TINY_CONFIG))
        return
    if m.kind == "random":
        if m.tokenizer is not None:
            check_tokenizer_folder(m.tokenizer)
        return
    check_tokenizer_folder(m.tokenizer)
    check_text_encoder_checkpoint(m.text_encoder)
    check_vae_checkpoint(m.vae)
    if m.dit is not None:
        check_dit_checkpoint(m.dit, overlay=m.checkpoint)
    else:
        check_dit_checkpoint(m.checkpoint)


def check_backend(cfg, device: torch.device) -> None:
    """Build the configured attention method and run it once on a small input on `device`, before any loading.

    The input: a target and a source of two frames of `attention.block_size` tokens each.

    Raises:
        ConfigError: the method cannot be imported or cannot run on this device, with its reason.
    """
    from .attention import TokenLayout, make_attention

    backend = cfg.attention.backend
    dtype = DTYPES[cfg.model.dtype] if device.type == "cuda" else torch.float32
    grid = (2, 1, cfg.attention.block_size)
    layout = TokenLayout(target_len=2 * cfg.attention.block_size, grids=(grid, grid), step=0)
    q = torch.randn(1, layout.seq_len, 2, 64, device=device, dtype=dtype)
    try:
        method = make_attention(backend, attention_options(cfg))
        gate = torch.zeros(1, layout.seq_len, 1, 1, device=device) if method.uses_gate else None
        method(q, q, q, layout, gate=gate)
    except (ImportError, RuntimeError, ValueError, TypeError) as exc:
        raise ConfigError(f"attention backend {backend!r} cannot run on {device}: {one_line(exc)}") from exc


def load_components(cfg, memory: MemorySetting, on_component=lambda name: None, on_loaded=lambda: None):
    """Build or load the text encoder, the VAE and the DiT of `cfg.model`, placed as `memory` says.

    Offload "none": all three on the configured device. "model" and "blocks": umT5 and the VAE
    on the host (the pipeline moves each to the device for its stage). The DiT loads on the host
    whenever the tier is not none/bf16 (its bf16 weights need not fit the GPU), then
    `wanx.memory.apply_memory_mode` stores it (fp8: quantised layer by layer on the device) and
    places it: on the device ("none"), on the host ("model") or streamed block by block ("blocks").

    Args:
        cfg: the configuration (`wanx.config`).
        memory: the memory tier (`wanx.planning.make_plan`'s choice).
        on_component: called with each component's name before it loads (progress bars).
        on_loaded: called after each of the three has loaded.

    Returns:
        (text_encoder `WanTextEncoder`, vae `WanVAE`, dit `WanDiT` in eval mode with the
        configured attention method, device).

    Raises:
        ConfigError: missing weight files, an attention backend that cannot run on the
            device, a memory tier the device cannot run (blocks off CUDA): all before anything
            loads; or components that do not fit together.
        wanx.dit_loader.CheckpointError: a weight file that cannot be loaded.
    """
    from model import TINY_CONFIG, WanDiT

    from . import random_weights
    from .dit_loader import load_dit
    from .t5 import WanTextEncoder
    from .vae import WanVAE

    problems = missing_weights(cfg)
    if problems:
        raise ConfigError("; ".join(problems))
    device = resolve_device(cfg)
    try:
        check_memory_mode(memory.offload, memory.weights, device)
    except ValueError as exc:
        raise ConfigError(f"memory: {exc}") from exc
    check_backend(cfg, device)
    m = cfg.model
    dtype, vae_dtype = DTYPES[m.dtype], DTYPES[m.vae_dtype]
    home = device if memory.offload == "none" else HOST  # of umT5 and the VAE between their stages
    dit_home = device if (memory.offload, memory.weights) == ("none", "bf16") else HOST

    on_component("text encoder")
    if m.kind == "tiny":
        text_encoder = WanTextEncoder.tiny(seed=m.seed, dtype=dtype, device=home)
    elif m.kind == "random":
        text_encoder = random_weights.random_text_encoder(home, dtype, seed=m.seed, tokenizer_dir=m.tokenizer)
    else:
        text_encoder = WanTextEncoder.from_wan_checkpoint(m.text_encoder, m.tokenizer, dtype=dtype, device=home)
    on_loaded()

    on_component("VAE")
    if m.kind == "tiny":
        vae = WanVAE.tiny(seed=m.seed, dtype=vae_dtype, device=home)
    elif m.kind == "random":
        vae = random_weights.random_vae(home, vae_dtype, seed=m.seed)
    else:
        vae = WanVAE.from_checkpoint(m.vae, dtype=vae_dtype, device=home)
    if cfg.video.vae_tiling:
        vae.enable_tiling()
    on_loaded()

    on_component("DiT")
    if m.kind == "tiny" and m.checkpoint is None:
        dit = WanDiT.tiny(seed=m.seed).to(dit_home)
        if dtype != torch.float32:
            dit = dit.to(dtype=dtype)
    elif m.kind == "tiny":
        dit = load_dit(m.checkpoint, dtype=dtype, device=dit_home, config=dict(TINY_CONFIG))
    elif m.kind == "random":
        dit = random_weights.random_dit(device=dit_home, dtype=dtype, seed=m.seed)
    elif m.dit is not None:
        dit = load_dit(m.dit, overlay=m.checkpoint, dtype=dtype, device=dit_home)
    else:
        dit = load_dit(m.checkpoint, dtype=dtype, device=dit_home)
    dit.eval().requires_grad_(False)
    if dit.config.text_dim != text_encoder.dim:
        raise ConfigError(f"the DiT expects {dit.config.text_dim}-dim text features, the text encoder gives "
                          f"{text_encoder.dim}")
    dit.set_attention(cfg.attention.backend, attention_options(cfg))
    apply_memory_mode(dit, memory.offload, memory.weights, device)
    on_loaded()
    return text_encoder, vae, dit, device
