"""Self-attention methods of the DiT, looked up by name: the one place where a new method plugs in.

    from wanx.attention import make_attention, register_attention
    dit.set_attention("triton", ISAConfig())          # by name, with the method's own options
    register_attention("mine", MyAttention)           # a new method; no change to model.py

A method is a `SelfAttentionMethod`: it receives q, k, v [B, S, H, D] (RoPE applied; the S
tokens are the target's followed by the source's), a `TokenLayout` describing that sequence,
and, when it asks for one (`uses_gate`), the per-token residual gate alpha [B, S, 1, 1] fp32.
It returns [B, S, H, D] in q's dtype. `model.py` reaches attention through this module only;
ISA's kernel backends are imported when a method that uses one is made.

Registered here: "dense" (every token to every token: FlashAttention-3 > FlashAttention-2 >
PyTorch SDPA), one ISA method per ISA backend ("torch", "triton", "tilelang") and "lvsa"
(Long-Video Sparse Attention, a frame-level pattern for clips longer than the training length).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from in_context_sparse_attention import BACKEND_NAMES, ISAConfig, dense_attention, editing_sparse_attention
from in_context_sparse_attention.backends import get_backend
from long_video_sparse_attention import BACKEND_NAMES as LVSA_BACKEND_NAMES
from long_video_sparse_attention import LVSAConfig, lvsa_attention

LVSA_KERNELS = ("auto", *LVSA_BACKEND_NAMES)  # "auto": gather on CUDA, the PyTorch reference elsewhere


@dataclass(frozen=True)
class TokenLayout:
    """What a method may know about the sequence beyond q, k and v.

    Attributes:
        target_len: T, the number of noisy target tokens at the front of the sequence.
        grids: the (frames, height, width) token grid of each part: the target's, then the
            source's; each part is frame-major (a frame's tokens are contiguous).
        step: the denoising step (0-based) when the sampler drives the model, else None;
            methods whose pattern changes with the step read it.
    """

    target_len: int
    grids: tuple[tuple[int, int, int], ...]
    step: Optional[int] = None

    @property
    def seq_len(self) -> int:
        return sum(f * h * w for f, h, w in self.grids)


class SelfAttentionMethod:
    """Base class of the self-attention methods (see the module docstring for the contract).

    Subclasses set `name` and implement `__call__`; `uses_gate = True` makes the model
    compute the residual gate and pass it.
    """

    name: str = ""
    uses_gate: bool = False

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout,
                 gate: Optional[torch.Tensor] = None) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        """One line for logs and summaries."""
        return self.name


class DenseAttention(SelfAttentionMethod):
    """Every token attends to every token; the gate is not used."""

    name = "dense"

    def __init__(self, options=None):
        if options is not None:
            raise ValueError("isa_config applies to the ISA backends only, not to 'dense'")

    def __call__(self, q, k, v, layout, gate=None):
        return dense_attention(q, k, v)


class ISAAttention(SelfAttentionMethod):
    """In-Context Sparse Attention with one of its backends; alpha * Oc is its residual."""

    uses_gate = True

    def __init__(self, backend: str, options=None):
        config = ISAConfig() if options is None else options
        if not isinstance(config, ISAConfig):
            raise TypeError(f"isa_config must be an ISAConfig, got {type(config).__name__}")
        get_backend(backend)  # a backend that cannot be imported here fails now, with its reason
        self.name = backend
        self.config = config

    def __call__(self, q, k, v, layout, gate=None):
        return editing_sparse_attention(q, k, v, layout.target_len, q.shape[1] - layout.target_len, alpha=gate,
                                        config=self.config, backend=self.name)

    def describe(self) -> str:
        return f"ISA backend {self.name!r}, {self.config}"


@dataclass(frozen=True)
class LVSAOptions:
    """Options of the "lvsa" method: the pattern's hyper-parameters and the kernel that computes it.

    Attributes:
        config: the `LVSAConfig` (window, anchors, keyframe interval, rotation).
        kernel: "gather" (each query-frame group's keys gathered for one dense FlashAttention
            call; the fastest on the H200, docs/lvsa.md), "flex" (FlexAttention), "torch" (the
            PyTorch reference, which builds the [S, S] mask: small sequences only) or "auto"
            (gather on CUDA, torch elsewhere).
    """

    config: LVSAConfig = LVSAConfig()
    kernel: str = "auto"

    def __post_init__(self):
        if not isinstance(self.config, LVSAConfig):
            raise TypeError(f"LVSAOptions.config must be an LVSAConfig, got {type(self.config).__name__}")
        if self.kernel not in LVSA_KERNELS:
            raise ValueError(f"the LVSA kernel must be one of {', '.join(map(repr, LVSA_KERNELS))}, "
                             f"got {self.kernel!r}")


def lvsa_kernel(kernel: str, device: torch.device) -> str:
    """The LVSA kernel that runs on `device`: `kernel` itself unless it is "auto"."""
    if kernel != "auto":
        return kernel
    return "gather" if device.type == "cuda" else "torch"  # gather: FA3 per query-frame group (docs/lvsa.md)


class LVSAAttention(SelfAttentionMethod):
    """Long-Video Sparse Attention: each latent frame's tokens (target and source) attend to
    the tokens of a few anchor frames and of a local window of frames; the anchors move
    with the denoising step (`layout.step`, None counting as step 0). Exactly dense for clips
    of at most `config.reference_frames * config.sparsity_scale` latent frames. The gate is
    not used: LVSA has no residual branch.
    """

    name = "lvsa"

    def __init__(self, options=None):
        if options is None:
            options = LVSAOptions()
        elif isinstance(options, LVSAConfig):
            options = LVSAOptions(config=options)
        elif not isinstance(options, LVSAOptions):
            raise TypeError(f"'lvsa' options must be an LVSAConfig or an LVSAOptions, got {type(options).__name__}")
        self.config = options.config
        self.kernel = options.kernel

    def __call__(self, q, k, v, layout, gate=None):
        grid = layout.grids[0]
        if any(other != grid for other in layout.grids[1:]):
            raise ValueError(f"'lvsa' needs the target and the source on one token grid (frames, height, width), "
                             f"got {', '.join(map(str, layout.grids))}")
        frames, height, width = grid
        if layout.target_len != frames * height * width:
            raise ValueError(f"'lvsa' needs target_len = frames * height * width of the target grid {grid}, "
                             f"got {layout.target_len}")
        step = 0 if layout.step is None else layout.step
        return lvsa_attention(q, k, v, num_frames=frames, tokens_per_frame=height * width, step=step,
                              config=self.config, backend=lvsa_kernel(self.kernel, q.device),
                              parts=len(layout.grids))

    def describe(self) -> str:
        return f"LVSA, kernel {self.kernel!r}, {self.config}"


_FACTORIES: dict[str, Callable[..., SelfAttentionMethod]] = {}


def register_attention(name: str, factory: Callable[..., SelfAttentionMethod]) -> None:
    """Make `factory(options)` available as `name` to `make_attention` and `WanDiT.set_attention`."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"an attention method needs a non-empty name, got {name!r}")
    _FACTORIES[name] = factory


def attention_names() -> tuple[str, ...]:
    """The registered method names, in registration order."""
    return tuple(_FACTORIES)


def make_attention(name: str, options=None) -> SelfAttentionMethod:
    """The method registered as `name`, built with its options (an ISAConfig for the ISA backends, an
    LVSAConfig or LVSAOptions for "lvsa", None for the defaults).

    Raises:
        ValueError: an unknown name, or options the method refuses.
    """
    if name not in _FACTORIES:
        raise ValueError(f"backend must be one of {', '.join(map(repr, _FACTORIES))}, got {name!r}")
    return _FACTORIES[name](options)


def _register_builtin_methods() -> None:
    register_attention("dense", DenseAttention)
    for backend in BACKEND_NAMES:
        register_attention(backend, lambda options, backend=backend: ISAAttention(backend, options))
    register_attention("lvsa", LVSAAttention)


_register_builtin_methods()
