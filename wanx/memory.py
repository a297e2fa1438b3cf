"""Fitting an edit on 24 GB and 48 GB GPUs: where the DiT's weights live and how they are stored.

Two independent choices, applied once to a freshly loaded `WanDiT` by `apply_memory_mode`:

- `offload`, where the weights live:
    - "none": all of them on the GPU for the whole run (today's behaviour);
    - "model": the DiT on the host, moved to the GPU only while it runs: the pipeline wraps
      the denoising loop in `on_device(dit, device)` (and the text encoder and the VAE in
      their stages likewise), so only one network's weights occupy the GPU at a time;
    - "blocks": the transformer blocks in pinned host memory, each moved in on a side CUDA
      stream while the block before it computes, and moved out after it ran (diffusers'
      `apply_group_offloading`, block level); the other weights (embeddings, time
      projection, head: 0.23 B parameters of 14.3 B) come in for each forward. The GPU holds
      two blocks instead of forty.
- `weights`, how the weights are stored:
    - "bf16": as loaded, in the model's dtype (bf16 on GPU), which is also the compute dtype;
    - "fp8": the q/k/v/o and FFN matrices of every block (98% of the parameters) in
      float8_e4m3fn with one power-of-two scale per output channel, dequantised to the compute
      dtype inside each layer's forward (`Fp8Linear`); embeddings, time projection, head,
      norms, modulation and the ISA gates stay in the model's dtype.

Why scaled fp8 rather than diffusers' `apply_layerwise_casting` (which this model also
supports, `store_fp8(dit, per_channel_scale=False)`): layerwise casting stores w as fp8 with
no scale. The 14 B DiT's matrices have a standard deviation of 0.01 to 0.014 (Xavier at
width 5,120), below fp8 e4m3's smallest normal 2^-6, so 64 to 88% of the weights land on
fp8's subnormals, where fewer than 3 mantissa bits remain: the relative L2 error of a stored
matrix is 4.0% (5120 x 5120) and 5.5% (the FFN's), against 2.7% with a per-output-channel
scale, which brings every row's largest weight into fp8's top binade (Xavier matrices of the
14 B's shapes). A forward of the 14 B's width (2 blocks, random weights at that scale) moved
3.6% from bf16 with layerwise casting, 2.1% with the scale. A power-of-two scale makes the
dequantisation exact in bf16, so an fp8 forward is the bf16 forward of the fp8-rounded weights.

`estimate_peak_gib` gives the GPU memory of each choice for the planner, without a model.
"""
from __future__ import annotations

import importlib.util
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from typing import Iterator, Mapping, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from wanx import fused_ops

OFFLOAD_MODES = ("none", "model", "blocks")
WEIGHT_MODES = ("bf16", "fp8")
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite float8_e4m3fn
# Linear and Conv layers whose names match one of these (re.search) keep the model's dtype in
# fp8 storage: the patch, text and time embeddings, the time projection and the output head
# (Wan computes the last three in fp32) and ISA's gates alpha_1 / alpha_2 (a sigmoid's input).
# Norms and modulation tables are no Linear or Conv layers: neither fp8 path touches them.
FP8_SKIP_PATTERNS = ("embedding", "time_projection", r"^head", r"alpha_\d")
HOST = torch.device("cpu")
GIB = 2.0**30
# The DiT's activations at their peak, in bytes per token (S = target + source) and model channel:
# (per sample, shared by the batch), per weight mode. Measured on H100 and H200 GPUs at 81 frames
# 960x544 (S = 85,680) with the 14 B DiT (26.62 GiB of bf16 weights; docs/benchmarks.md, "The memory
# estimate after the fusions").
# fp8: (25.0, 2.3), fitted to two peaks: one batch-1 forward, 37.8 GiB, and the denoising stage of a
# whole edit, guided batch of 2 with the fp32 VAE (0.47 GiB) also on the GPU, 48.5 GiB; their
# difference, 10.23 GiB, is one more sample, and what the batch-1 peak holds beyond the weights and
# that sample, 0.96 GiB, is shared (the source's fp32 patch embedding and the complex128 RoPE table).
# That was bf16 before the FFN's GELU moved into its GEMM's epilogue, which fp8 layers do not take:
# fp8's batch-1 peak is 24.63 GiB before and after (estimate 24.82).
# bf16: the same two peaks now measure 36.89 and 46.39 GiB, which fit (22.1, 3.05). The per-sample
# term is kept at 25.0 instead, with the shared one refitted to the batch-1 peak (0.15): the batch-2
# estimate then errs 1.2 GiB high (47.6 GiB with the VAE), on the safe side where it decides whether
# a 24 GiB GPU may run the guided batch with its blocks streamed (22.2 GiB estimated against 21.6
# usable), a setting not yet run there.
ACTIVATION_BYTES = {"bf16": (25.0, 0.15), "fp8": (25.0, 2.3)}

Device = Union[str, torch.device]


def _fp8_layer_names(dit: nn.Module) -> list[str]:
    """Names of the Linear layers that fp8 storage converts: every one no `FP8_SKIP_PATTERNS` matches."""
    return [name for name, module in dit.named_modules()
            if isinstance(module, nn.Linear) and not any(re.search(p, name) for p in FP8_SKIP_PATTERNS)]


def _has_hooks(module: nn.Module) -> bool:
    return any(fused_ops.has_own_hook(m) for m in module.modules())


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel fp8 of a matrix: weight [out, in] -> (fp8 [out, in], scale [out, 1] fp32).

    scale is the power of two that brings the row's largest |w| into (224, 448], so that no
    value overflows, the row uses fp8's top binade, and fp8 * scale is exact in bf16 and fp32
    (a power of two only shifts the exponent; both have fp32's exponent range). An all-zero
    row gets scale 1.
    Reconstruction `fp8.to(dtype) * scale.to(dtype)`; its error is at most half an fp8 unit:
    |w| * 2^-4 on normals, scale * 2^-10 on subnormals.
    """
    w = weight.float()
    amax = w.abs().amax(dim=1, keepdim=True)
    exponent = torch.ceil(torch.log2(amax / FP8_MAX))
    scale = torch.where(amax > 0, torch.exp2(exponent), torch.ones_like(amax))
    return (w / scale).to(FP8_DTYPE), scale


class Fp8Linear(nn.Module):
    """A linear layer stored as per-output-channel scaled fp8 and computed in its input's dtype.

    Parameters `weight` [out, in] float8_e4m3fn and `bias` [out] (the model's dtype) and the
    buffer `weight_scale` [out, 1] fp32 (powers of two) live in this module and are read in
    its own forward, so diffusers' group offloading moves them like any others. The
    dequantised weight exists only during the forward (one layer at a time).
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("weight_scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, work_device: Device | None = None) -> "Fp8Linear":
        """Quantise `linear` (on `work_device` when given: a GPU is much faster than the host); the
        result lives where `linear`'s weight was."""
        home = linear.weight.device
        weight, scale = quantize_fp8(linear.weight.detach().to(work_device or home))
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(weight.to(home), scale.to(home), bias)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The stored weight in `dtype`: [out, in], exact (fp8 values times powers of two)."""
        return self.weight.to(dtype) * self.weight_scale.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in] in the compute dtype -> [..., out] in x's dtype."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 per-channel scale"


def store_fp8(dit: nn.Module, per_channel_scale: bool = True, work_device: Device | None = None) -> list[str]:
    """Store the block matrices of `dit` in fp8 and compute them in `dit.compute_dtype`.

    Args:
        dit: a `WanDiT` without hooks; its compute dtype (its dtype as loaded) is pinned first,
            since its weights no longer carry it.
        per_channel_scale: True swaps each layer for an `Fp8Linear` (scaled; `weights="fp8"`);
            False applies diffusers' `apply_layerwise_casting` (unscaled fp8 storage, the layer
            upcast to the compute dtype just before its forward) with `FP8_SKIP_PATTERNS`.
        work_device: where the scaled quantisation computes (the GPU when there is one).
    Returns:
        The names of the layers now stored in fp8.
    """
    from diffusers.hooks import apply_layerwise_casting

    names = _fp8_layer_names(dit)
    dit.compute_dtype = dit.compute_dtype  # pinned: from now on no parameter's dtype tells it
    if per_channel_scale:
        for name in names:
            owner_name, _, leaf = name.rpartition(".")
            owner = dit.get_submodule(owner_name)
            setattr(owner, leaf, Fp8Linear.from_linear(getattr(owner, leaf), work_device))
    else:
        apply_layerwise_casting(dit, storage_dtype=FP8_DTYPE, compute_dtype=dit.compute_dtype,
                                skip_modules_pattern=FP8_SKIP_PATTERNS)
    return names


def offload_blocks(dit: nn.Module, onload_device: Device, use_stream: bool = True, blocks_per_group: int = 1) -> None:
    """Keep `dit`'s blocks on the host and move each group in for its forward (diffusers' group offloading).

    The lower-level form of `apply_memory_mode(offload="blocks")`, which always streams to a
    CUDA device. Every weight ends on the host (pinned when streaming); from then on a
    forward takes its inputs anywhere and returns on `onload_device`.

    Args:
        dit: a `WanDiT` (with fp8 storage already applied, if wanted).
        onload_device: where the blocks compute.
        use_stream: prefetch the next block on a side CUDA stream while one computes (CUDA only;
            the first forward traces the order of the blocks and loads without overlap).
            False moves each group in when it is needed (any device, e.g. the CPU for tests).
        blocks_per_group: blocks moved together; streaming moves one at a time.
    Raises:
        ValueError: a stream for a device that is not CUDA, or with more than one block per group.
        ImportError: accelerate is not installed.
    """
    from diffusers.hooks import apply_group_offloading

    if importlib.util.find_spec("accelerate") is None:
        raise ImportError("offloading blocks needs accelerate (pip install accelerate): diffusers' group "
                          "offloading moves each forward's inputs with it")
    onload_device = torch.device(onload_device)
    if blocks_per_group < 1:
        raise ValueError(f"blocks_per_group must be at least 1, got {blocks_per_group}")
    if use_stream and onload_device.type != "cuda":
        raise ValueError(f"streaming blocks needs a CUDA device, got {onload_device}")
    if use_stream and blocks_per_group != 1:
        raise ValueError(f"streaming moves one block at a time (diffusers), got blocks_per_group {blocks_per_group}")
    apply_group_offloading(dit, onload_device=onload_device, offload_device=HOST, offload_type="block_level",
                           num_blocks_per_group=blocks_per_group, use_stream=use_stream)


@dataclass(frozen=True)
class MemoryMode:
    """What `apply_memory_mode` did (for the run's report)."""

    offload: str  # "none", "model" or "blocks"
    weights: str  # "bf16" or "fp8"
    device: torch.device  # where the DiT computes
    compute_dtype: torch.dtype
    fp8_layers: int  # layers stored in fp8 (0 for "bf16")


def check_memory_mode(offload: str, weights: str, device: Device) -> torch.device:
    """Validate a memory mode before anything loads (the planner and the CLI call it).

    Returns:
        The device as a torch.device.
    Raises:
        ValueError: one line: an unknown offload or weights value, or offload "blocks" on a
            device that is not CUDA (its prefetching runs on a CUDA stream).
    """
    if offload not in OFFLOAD_MODES:
        raise ValueError(f"offload must be one of {', '.join(OFFLOAD_MODES)}; got {offload!r}")
    if weights not in WEIGHT_MODES:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_MODES)}; got {weights!r}")
    device = torch.device(device)
    if offload == "blocks" and device.type != "cuda":
        raise ValueError(f"offload 'blocks' streams the DiT's blocks to a CUDA GPU; the device is {device}")
    return device


def apply_memory_mode(dit: nn.Module, offload: str = "none", weights: str = "bf16", device: Device = "cuda"
                      ) -> MemoryMode:
    """Place and store a freshly loaded `WanDiT` as the memory mode says (see the module docstring).

    Load the DiT on the host for "model" and "blocks" (and for fp8 when its bf16 weights would
    not fit the GPU): the weights are quantised layer by layer on `device`, then placed:
    "none" on `device`, "model" on the host (wrap the DiT's stage in `on_device(dit, device)`),
    "blocks" in pinned host memory with streaming hooks.

    Raises:
        ValueError: what `check_memory_mode` refuses, or a DiT that already has hooks.
    """
    device = check_memory_mode(offload, weights, device)
    if _has_hooks(dit):
        raise ValueError("the DiT already has diffusers hooks: apply a memory mode once, to a freshly loaded DiT")
    names = store_fp8(dit, work_device=device) if weights == "fp8" else []
    if offload == "none":
        dit.to(device)
    elif offload == "model":
        dit.to(HOST)
    else:
        offload_blocks(dit, device)
    return MemoryMode(offload=offload, weights=weights, device=device, compute_dtype=dit.compute_dtype,
                      fp8_layers=len(names))


@contextmanager
def on_device(module: nn.Module, device: Device) -> Iterator[nn.Module]:
    """Inside the block, `module`'s parameters and buffers are on `device`; after it (also on an
    error) each is back on the device it was on before, the same Parameter objects.

    The "model" tier: one network on the GPU at a time. Moving the 14 B DiT costs seconds, once
    per edit (it stays in for all the denoising steps).

    Raises:
        ValueError: `module` is group offloaded (its hooks place its weights themselves).
    """
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    if _is_group_offload_enabled(module):
        raise ValueError(f"{type(module).__name__} is group offloaded: its hooks place its weights, "
                         "on_device would break them")
    homes = {name: t.device for name, t in chain(module.named_parameters(), module.named_buffers())}
    module.to(device)
    try:
        yield module
    finally:
        for name, home in homes.items():
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            if leaf in owner._parameters:
                owner._parameters[leaf].data = owner._parameters[leaf].data.to(home)
            else:
                owner._buffers[leaf] = owner._buffers[leaf].to(home)


def dit_parameter_counts(dit_config: Mapping) -> dict[str, int]:
    """Parameters of a `WanDiT` from its config, without building it.

    Returns:
        {"block": one block's parameters, "block_fp8": those of them stored in fp8 (the q/k/v/o
        and FFN weight matrices), "block_fp8_rows": their output channels (one fp8 scale each),
        "other": everything outside the blocks, "total"}.
    """
    dim, ffn, layers = dit_config["dim"], dit_config["ffn_dim"], dit_config["num_layers"]
    patch = math.prod(dit_config.get("patch_size", (1, 2, 2)))
    in_dim, out_dim = dit_config.get("in_dim", 16), dit_config.get("out_dim", 16)
    qk_norm = 2 * dim if dit_config.get("qk_norm", True) else 0
    norm3 = 2 * dim if dit_config.get("cross_attn_norm", True) else 0
    fp8 = 8 * dim * dim + 2 * dim * ffn
    fp8_rows = 8 * dim + ffn + dim
    # q/k/v/o biases of both attentions, alpha_1/alpha_2, qk norms of both, norm3, FFN biases, modulation
    block = fp8 + 8 * dim + 2 * dim + 2 * qk_norm + norm3 + ffn + dim + 6 * dim
    other = (2 * (in_dim * patch * dim + dim)  # the two patch embeddings
             + dit_config["text_dim"] * dim + dim + dim * dim + dim  # text embedding
             + dit_config["freq_dim"] * dim + dim + dim * dim + dim  # time embedding
             + 6 * dim * dim + 6 * dim  # time projection
             + dim * patch * out_dim + patch * out_dim + 2 * dim)  # head and its modulation
    return {"block": block, "block_fp8": fp8, "block_fp8_rows": fp8_rows, "other": other,
            "total": layers * block + other}


def estimate_peak_gib(dit_config: Mapping, tokens: int, batch: int, offload: str, weights: str,
                      dtype_bytes: int) -> dict[str, float]:
    """GPU memory of the DiT's stage in GiB, per memory mode, for the planner (no model is built).

    Args:
        dit_config: the DiT's config (dim, ffn_dim, num_layers, text_dim, freq_dim, ...).
        tokens: S, the sequence one sample's forward reads (target + source tokens).
        batch: samples per forward (2 for guidance as one batch, 1 for sequential guidance).
        offload, weights: the memory mode (`check_memory_mode`'s values).
        dtype_bytes: bytes per value of the model's (compute) dtype, 2 for bf16.
    Returns:
        {"weights_total": the DiT's weights as stored, wherever they live,
         "weights_resident": those on the GPU during a forward,
         "weights_transient": the largest dequantised matrix (fp8: one FFN matrix in the compute dtype),
         "activations": the planner's activation term,
         "peak": weights_resident + weights_transient + activations,
         "host_pinned": pinned host memory ("blocks": every block)}.

    Formulas (P: `dit_parameter_counts`, b = dtype_bytes, L = num_layers):
        block bytes: bf16: P_block * b; fp8: P_block_fp8 * 1 + rows_fp8 * 4 + (P_block - P_block_fp8) * b;
        weights_total = L * block + P_other * b;
        weights_resident: "none" and "model": weights_total (the DiT runs whole on the GPU; "model"
            differs in that the other networks leave the GPU, which the planner accounts for);
            "blocks": 2 blocks (the one computing and the one prefetched) + P_other * b;
        activations = S * dim * (batch * per_sample * b / 2 + shared), (per_sample, shared) =
            ACTIVATION_BYTES[weights]: bytes per token and model channel, measured (see the
            constant; fp8 differs by its unfused GELU). The per-sample part was
            measured in bf16 and is scaled by b / 2 for other dtypes, which overstates fp32 a
            little (its fp32 residual stream does not double).
    """
    check_memory_mode(offload, weights, "cuda")
    counts = dit_parameter_counts(dit_config)
    dim, ffn, layers = dit_config["dim"], dit_config["ffn_dim"], dit_config["num_layers"]
    if weights == "fp8":
        block = (counts["block_fp8"] + 4 * counts["block_fp8_rows"]
                 + (counts["block"] - counts["block_fp8"]) * dtype_bytes)
        transient = dim * ffn * dtype_bytes
    else:
        block, transient = counts["block"] * dtype_bytes, 0
    other = counts["other"] * dtype_bytes
    total = layers * block + other
    resident = 2 * block + other if offload == "blocks" else total
    per_sample, shared = ACTIVATION_BYTES[weights]
    activations = tokens * dim * (batch * per_sample * dtype_bytes / 2 + shared)
    return {
        "weights_total": total / GIB,
        "weights_resident": resident / GIB,
        "weights_transient": transient / GIB,
        "activations": activations / GIB,
        "peak": (resident + transient + activations) / GIB,
        "host_pinned": layers * block / GIB if offload == "blocks" else 0.0,
    }
