"""Every component at its real size with random weights (`model.kind: random`), reading no file.

For timing and memory measurements of a whole edit where the real weights are absent: the
umT5-XXL encoder (5.7 B parameters), the Wan 2.1 VAE and the 14 B DiT are built on the meta
device (no memory), then materialised and initialised a part at a time (`_materialise_in_parts`):
on the target device, or, when the target is the host and a CUDA GPU is visible (the memory
tiers that keep weights on the host), on the GPU and then moved to the host, one block at a
time. The host's random number generators run on one core: building the 14 B DiT there takes
minutes; on a GPU it takes seconds, and one block at a time fits any card that can run the
tier. Their output is noise.

Initialisation aims at finite, well-scaled activations, not at any trained behaviour:
the DiT uses its own `init_weights`, plus unit norms and small random modulation and head
(Wan's zero head would make every attention method's output identical); the VAE and the
text encoder reset every layer that can reset itself and set norm scales to one.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn


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


def _work_device(device) -> torch.device:
    """Where to initialise weights bound for `device`: a CUDA GPU in place of the host when one is visible."""
    device = torch.device(device)
    return torch.device("cuda") if device.type == "cpu" and torch.cuda.is_available() else device


@torch.no_grad()
def _materialise_in_parts(model: nn.Module, part_lists: list[nn.ModuleList], device, seed: int,
                          initialise_rest: Callable[[nn.Module], None],
                          initialise_part: Callable[[nn.Module], None]) -> nn.Module:
    """Give the meta `model` memory on `device` and random weights, one part at a time.

    The entries of each ModuleList in `part_lists` (the repeated blocks) are the parts; the rest of
    the model is one more, initialised first with `initialise_rest(model)` while the lists are
    empty. Each part is materialised on `_work_device(device)`, initialised there
    (`initialise_part(part)`), then moved to `device`: the work device holds one part at a time.
    The random stream is seeded once with `seed`, so a seed gives the same weights wherever they
    are initialised on the same kind of device.
    """
    work = _work_device(device)
    parts = [list(module_list) for module_list in part_lists]
    for module_list in part_lists:
        del module_list[:]
    torch.manual_seed(seed)
    model.to_empty(device=work)
    initialise_rest(model)
    model.to(device)
    for module_list, entries in zip(part_lists, parts):
        for entry in entries:
            entry.to_empty(device=work)
            initialise_part(entry)
            module_list.append(entry.to(device))
    return model


@torch.no_grad()
def random_dit(config: Optional[dict] = None, device="cuda", dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """A `WanDiT` (default: the 14 B configuration) with random weights on `device` in `dtype`.

    Wan's `init_weights` for the embeddings and the head, the same per block (Xavier-uniform
    linears, zero biases, zero `alpha_2`), then unit norms, modulation ~ N(0, 1 / dim) and a head
    ~ N(0, 0.02).
    """
    from model import WanDiT

    config = dict(config or {})
    model = _on_meta(lambda: WanDiT(**config), dtype)
    dim = model.config.dim

    def rest(dit):
        dit.init_weights()  # the blocks are set apart: embeddings, time projection and head
        dit.head.modulation.normal_(0.0, dim**-0.5)
        dit.head.head.weight.normal_(0.0, 0.02)

    def block(b):
        for module in b.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.zeros_(b.self_attn.alpha_2.weight)
        for norm in (b.self_attn.norm_q, b.self_attn.norm_k, b.cross_attn.norm_q, b.cross_attn.norm_k):
            norm.weight.fill_(1.0)
        b.norm3.weight.fill_(1.0)
        b.norm3.bias.zero_()
        b.modulation.normal_(0.0, dim**-0.5)

    _materialise_in_parts(model, [model.blocks], device, seed, rest, block)
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

    def initialise(module):
        _reset_in_place(module)
        for name, parameter in module.named_parameters():  # nn.Linear's default init is far too large for 24 layers
            if name.endswith("weight") and parameter.dim() == 2:
                parameter.normal_(0.0, 0.02)

    model = _on_meta(lambda: UMT5EncoderModel(UMT5Config(**UMT5_XXL_CONFIG)), dtype)
    _materialise_in_parts(model, [model.encoder.block], device, seed, initialise, initialise)
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
