"""Every component at its real size with random weights (`model.kind: random`), reading no file.

For timing and memory measurements of a whole edit where the real weights are absent: the
umT5-XXL encoder (5.7 B parameters), the Wan 2.1 VAE and the 14 B DiT are built on the meta
device (no memory), materialised directly on the target device, then initialised there, so
building them costs seconds on a GPU and never a host copy. Their output is noise.

Initialisation aims at finite, well-scaled activations, not at any trained behaviour:
the DiT uses its own `init_weights`, plus unit norms and small random modulation and head
(Wan's zero head would make every attention method's output identical); the VAE and the
text encoder reset every layer that can reset itself and set norm scales to one.
"""
from __future__ import annotations

from typing import Optional

import torch


def _on_meta(build, dtype: torch.dtype):
    """`build()` on the meta device with `dtype` as the default floating dtype."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            return build()
    finally:
        torch.set_default_dtype(previous)


@torch.no_grad()
def _reset_in_place(model: torch.nn.Module) -> None:
    """Give a materialised (`to_empty`) model finite weights: zeros, layers' own resets, unit norm scales."""
    for parameter in model.parameters():
        parameter.zero_()
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
    for name, parameter in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "gamma" or ("norm" in name and leaf == "weight"):
            parameter.fill_(1.0)


@torch.no_grad()
def random_dit(config: Optional[dict] = None, device="cuda", dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """A `WanDiT` (default: the 14 B configuration) with random weights on `device` in `dtype`."""
    from model import WanDiT

    config = dict(config or {})
    model = _on_meta(lambda: WanDiT(**config), dtype).to_empty(device=device)
    dim = model.config.dim
    torch.manual_seed(seed)
    model.init_weights()
    for block in model.blocks:
        for norm in (block.self_attn.norm_q, block.self_attn.norm_k, block.cross_attn.norm_q, block.cross_attn.norm_k):
            norm.weight.fill_(1.0)
        block.norm3.weight.fill_(1.0)
        block.norm3.bias.zero_()
        block.modulation.normal_(0.0, dim**-0.5)
    model.head.modulation.normal_(0.0, dim**-0.5)
    model.head.head.weight.normal_(0.0, 0.02)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def random_text_encoder(device="cuda", dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                        tokenizer_dir: Optional[str] = None):
    """umT5-XXL's encoder with random weights; the tokenizer from `tokenizer_dir`, else the tiny one.

    The tiny tokenizer's ids are all below umT5's vocabulary size, so it drives the full-size
    embedding table; the encoder's cost does not depend on which ids it reads.
    """
    from transformers import UMT5Config, UMT5EncoderModel

    from .t5 import UMT5_XXL_CONFIG, WanTextEncoder, build_tiny_tokenizer, load_tokenizer

    model = _on_meta(lambda: UMT5EncoderModel(UMT5Config(**UMT5_XXL_CONFIG)), dtype).to_empty(device=device)
    torch.manual_seed(seed)
    _reset_in_place(model)
    for name, parameter in model.named_parameters():  # nn.Linear's default init is far too large for 24 layers
        if name.endswith("weight") and parameter.dim() == 2:
            parameter.normal_(0.0, 0.02)
    tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir else build_tiny_tokenizer()
    return WanTextEncoder(model, tokenizer)


@torch.no_grad()
def random_vae(device="cuda", dtype: torch.dtype = torch.float32, seed: int = 0):
    """The Wan 2.1 VAE (`configs/wan_vae`) with random weights, wrapped as `WanVAE`."""
    from .vae import CONFIG_DIR, WanVAE, build_meta_vae

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = build_meta_vae(CONFIG_DIR).to_empty(device=device)
    finally:
        torch.set_default_dtype(previous)
    torch.manual_seed(seed)
    _reset_in_place(model)
    return WanVAE(model)
