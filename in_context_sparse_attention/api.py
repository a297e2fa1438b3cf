"""The public entry point: `editing_sparse_attention`."""
from __future__ import annotations

import math
import numbers

import torch

from .backends import get_backend
from .config import ISAConfig
from .full_attention import full_block_attention
from .layout import BlockLayout
from .residual import GatedShortcut, add_residual

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_length(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_inputs(q, k, v, t_seq_len, s_seq_len, alpha, config) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape [B, S, H, D], got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must have shape [B, S, H, D] (4 dims), got {x.dim()} dims: {tuple(x.shape)}")
        if x.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if k.shape != q.shape or v.shape != q.shape:
        shapes = ", ".join(str(tuple(x.shape)) for x in (q, k, v))
        raise ValueError(f"q, k and v must have the same shape [B, S, H, D], got {shapes}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on the same device, got {q.device}, {k.device}, {v.device}")
    if min(q.shape) == 0:
        raise ValueError(f"q, k and v must not be empty, got shape {tuple(q.shape)}")
    _check_length("t_seq_len", t_seq_len)
    _check_length("s_seq_len", s_seq_len)
    if t_seq_len + s_seq_len != q.shape[1]:
        raise ValueError(
            f"t_seq_len + s_seq_len must equal the sequence length S = q.shape[1] = {q.shape[1]}, "
            f"got {t_seq_len} + {s_seq_len} = {t_seq_len + s_seq_len}"
        )
    if not isinstance(config, ISAConfig):
        raise TypeError(f"config must be an ISAConfig, got {type(config).__name__}")
    if isinstance(alpha, torch.Tensor):
        if alpha.device != q.device:
            raise ValueError(f"alpha must be on q's device {q.device}, got {alpha.device}")
        if not alpha.is_floating_point():
            raise ValueError(f"alpha must be a floating-point tensor, got {alpha.dtype}")
        target = (q.shape[0], q.shape[1], 1, 1)
        try:
            shape = torch.broadcast_shapes(alpha.shape, target)
        except RuntimeError:
            shape = None
        if shape != target:
            raise ValueError(
                f"alpha must be broadcastable to [B, S, 1, 1] = {list(target)}, got shape {tuple(alpha.shape)}"
            )
    elif alpha is not None:
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
            raise TypeError(
                f"alpha must be None, a float or a tensor broadcastable to [B, S, 1, 1], got {type(alpha).__name__}"
            )
        try:
            finite = math.isfinite(alpha)
        except OverflowError:  # an int beyond any float
            finite = False
        if not finite:
            raise ValueError(f"alpha must be a finite number, got {alpha!r}")


def editing_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    t_seq_len: int,
    s_seq_len: int,
    alpha=None,
    config: ISAConfig = ISAConfig(),
    backend: str = "torch",
) -> torch.Tensor:
    """In-Context Sparse Attention over [target tokens | source tokens].

    Args:
        q, k, v: [B, S, H, D] with S = t_seq_len + s_seq_len, target tokens first.
        t_seq_len: T, the number of (noisy) target tokens.
        s_seq_len: C, the number of (clean) source tokens.
        alpha: residual gate: None (no residual), a finite float, or a tensor broadcastable
            to [B, S, 1, 1]; each token i gets alpha_i * Oc[block(i)] added to its output.
            A tensor's values are not checked (that would make the host wait for the GPU
            on every call): a non-finite value gives its tokens non-finite outputs.
        config: hyper-parameters (`ISAConfig`).
        backend: "torch" (pure PyTorch, any device), "triton" or "tilelang" (CUDA kernels;
            "triton" also runs on CPU tensors under TRITON_INTERPRET=1).
    Returns:
        [B, S, H, D], q's dtype.
    """
    _check_inputs(q, k, v, t_seq_len, s_seq_len, alpha, config)
    impl = get_backend(backend)
    impl.check_inputs(q, config)
    layout = BlockLayout(seq_len=q.shape[1], target_len=int(t_seq_len), block_size=config.block_size)

    means = [impl.pool_blocks(x, layout) for x in (q, k, v)]
    plan = impl.make_plan(*means, layout, config)
    batch, _, heads, dim = q.shape
    out_padded = torch.empty(batch, layout.padded_len, heads, dim, dtype=q.dtype, device=q.device)
    with_residual = alpha is not None and (isinstance(alpha, torch.Tensor) or alpha != 0)
    fused = with_residual and impl.fuses_residual  # added by the kernels that write the rows
    residual = {"residual": GatedShortcut.of(plan, alpha, q.device)} if fused else {}
    full_block_attention(q, k, v, plan, out_padded, gather=impl.gather_blocks, scatter=impl.scatter_blocks, **residual)
    impl.sparse_block_attention(q, k, v, plan, out_padded, **residual)
    if with_residual and not fused:
        add_residual(out_padded, plan, alpha)
    return out_padded[:, : layout.seq_len].contiguous()
