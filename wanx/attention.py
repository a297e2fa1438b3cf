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
PyTorch SDPA) and one ISA method per ISA backend ("torch", "triton", "tilelang").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from in_context_sparse_attention import BACKEND_NAMES, ISAConfig, dense_attention, editing_sparse_attention
from in_context_sparse_attention.backends import get_backend


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
    """The method registered as `name`, built with its options (e.g. an ISAConfig, or None for defaults).

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


_register_builtin_methods()
