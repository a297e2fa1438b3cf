"""Fused Triton kernels for the DiT's memory-bound steps, each with its PyTorch reference.

Every op comes in three layers:
- `<op>_torch`: the readable PyTorch path; it runs on CPU and is the reference;
- `<op>_triton`: the host side of the Triton kernel (checks, allocation, launch); it runs on
  CUDA tensors, or on CPU tensors when triton's interpreter (TRITON_INTERPRET=1) was on
  when this module was imported;
- `<op>`: what the model calls: the kernel for CUDA tensors outside autograd (the kernels
  have no backward), the PyTorch path otherwise.

Numerics:
- `rope` is bit-identical to its reference: the rotation is done in float64 in registers,
  products and sums rounded as PyTorch's complex128 multiply rounds them (no fused
  multiply-add: kernels launch with `enable_fp_fusion=False`), then rounded to fp32 and to
  x's dtype, as PyTorch's float64 -> bf16 cast does.
- `gated_residual` is bit-identical too: like torch.addcmul it rounds once (tl.fma).
- `residual_layer_norm` is `gated_residual` then `layer_norm_modulate` in one pass: it equals
  the two kernels run one after the other, and saves reading the new residual stream back.
- `linear_gelu` (a cuBLASLt GEMM with a GELU epilogue, no Triton) rounds once where Wan's
  Linear-then-GELU rounds twice: it matches that path to bf16 rounding.
- `rms_norm` and `layer_norm_modulate` reduce in fp32 in another order than PyTorch, so
  they match it to fp32 rounding (a bf16 output can differ by one bf16 unit in the last
  place where the fp32 value lies at a rounding midpoint).
- Casts to bf16 round to nearest even through integer ops (`_cast`), so that triton's CPU
  interpreter, which truncates, computes what the GPU computes.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ROPE_BLOCK_TOKENS = 16
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def kernels_interpreted() -> bool:
    """Whether this module's kernels were defined under triton's CPU interpreter."""
    return _INTERPRETED


def _use_kernel(x: torch.Tensor, *params: Optional[torch.Tensor]) -> bool:
    """Kernels for CUDA tensors of a supported dtype, unless autograd must track the op."""
    if not x.is_cuda or x.dtype not in KERNEL_DTYPES:
        return False
    tracked = [t for t in (x, *params) if t is not None and t.requires_grad]
    return not (tracked and torch.is_grad_enabled())


def _check_device(x: torch.Tensor) -> None:
    if x.device.type == "cpu" and not _INTERPRETED:
        raise ValueError("the fused kernels need CUDA tensors, "
                         "or TRITON_INTERPRET=1 set before wanx.fused_ops is imported")


def _check_layer_norm_args(x: torch.Tensor, weight, bias, shift, scale) -> None:
    """x [B, S, C] on a kernel device; weight, bias [C] and shift, scale [B, 1, C], each pair both or neither."""
    _check_device(x)
    batch, _, n_cols = x.shape
    if (weight is None) != (bias is None) or (shift is None) != (scale is None):
        raise ValueError("weight and bias, and shift and scale, come in pairs")
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None and param.shape != (n_cols,):
            raise ValueError(f"{name} must be [{n_cols}], got {tuple(param.shape)}")
    for name, param in (("shift", shift), ("scale", scale)):
        if param is not None and param.shape != (batch, 1, n_cols):
            raise ValueError(f"{name} must be [{batch}, 1, {n_cols}], got {tuple(param.shape)}")


def _check_gated_residual_args(x: torch.Tensor, y: torch.Tensor, gate) -> None:
    """x [B, S, C] fp32 on a kernel device, y of its shape, gate [B, 1, C] fp32 or None."""
    _check_device(x)
    batch, _, n_cols = x.shape
    if x.dtype != torch.float32 or y.shape != x.shape:
        raise ValueError(f"x must be fp32 and y of its shape, got x {tuple(x.shape)} {x.dtype}, y {tuple(y.shape)}")
    if gate is not None and (gate.shape != (batch, 1, n_cols) or gate.dtype != torch.float32):
        raise ValueError(f"gate must be [{batch}, 1, {n_cols}] fp32, got {tuple(gate.shape)} {gate.dtype}")


def has_own_hook(module: torch.nn.Module) -> bool:
    """Whether diffusers attached a hook to this very module (leaf-level offloading, layerwise
    casting): its parameters are only valid inside its own forward, so a fused path that reads
    them directly must call the module instead."""
    return hasattr(module, "_diffusers_hook")


def _row_warps(block: int) -> int:
    """Warps for a kernel that holds one row of `block` elements: about 16 per thread."""
    return max(1, min(16, block // 512))


@triton.jit
def _cast(b_x, DTYPE: tl.constexpr):
    """fp32 -> DTYPE, rounding to nearest even. bf16 goes through integer ops because triton's
    CPU interpreter truncates to bf16; on the GPU they give the hardware cast's result."""
    if DTYPE == tl.bfloat16:
        b_bits = b_x.to(tl.uint32, bitcast=True)
        b_rounded = (b_bits + 0x7FFF + ((b_bits >> 16) & 1)) >> 16
        b_rounded = tl.where(b_x != b_x, (b_bits >> 16) | 0x40, b_rounded)  # NaN stays a quiet NaN
        b_out = b_rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        b_out = b_x.to(DTYPE)
    return b_out


@triton.jit
def _rope_kernel(
    x_ptr, freqs_ptr, out_ptr, seq, heads,
    stride_xb, stride_xs, stride_xh, stride_xd,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """out[b, s, h, 2j:2j+2] = x[b, s, h, 2j:2j+2] rotated by freqs[s, j], in float64.

    Grid: (cdiv(seq, BLOCK_S), batch); each program loads its tokens' cos/sin once and
    walks over the heads. Rows are loaded and stored whole (contiguous when x's last stride
    is 1); the pairs are split and joined in registers. freqs: [seq, HALF, 2] float64
    (cos, sin); out contiguous.
    """
    pid_s = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    o_s = (pid_s * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)  # [BS]
    o_d = tl.arange(0, 2 * HALF_PAD)  # [2HP]: element 2j + c of pair j
    m_row = (o_s < seq)[:, None] & (o_d < 2 * HALF)[None, :]  # [BS, 2HP]
    b_freqs = tl.load(freqs_ptr + o_s[:, None] * (2 * HALF) + o_d[None, :], mask=m_row, other=0.0)  # [BS, 2HP] float64
    b_cos, b_sin = tl.split(tl.reshape(b_freqs, (BLOCK_S, HALF_PAD, 2)))  # [BS, HP] each
    p_x = x_ptr + pid_b * stride_xb + o_s[:, None] * stride_xs + o_d[None, :] * stride_xd
    p_out = out_ptr + (pid_b * seq + o_s[:, None]) * heads * (2 * HALF) + o_d[None, :]
    for h in range(heads):
        b_x = tl.load(p_x + h * stride_xh, mask=m_row, other=0.0).to(tl.float64)  # [BS, 2HP]
        b_re, b_im = tl.split(tl.reshape(b_x, (BLOCK_S, HALF_PAD, 2)))  # [BS, HP] each
        b_out_re = b_re * b_cos - b_im * b_sin
        b_out_im = b_re * b_sin + b_im * b_cos
        b_out = tl.reshape(tl.join(b_out_re, b_out_im), (BLOCK_S, 2 * HALF_PAD))  # [BS, 2HP] float64
        tl.store(p_out + h * (2 * HALF), _cast(b_out.to(tl.float32), out_ptr.dtype.element_ty), mask=m_row)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, n_cols, eps, BLOCK_C: tl.constexpr):
    """One row per program: out = (x * rsqrt(mean(x^2) + eps)).to(x's dtype) * w, fp32 stats."""
    row = tl.program_id(0).to(tl.int64)
    o_c = tl.arange(0, BLOCK_C)
    m_c = o_c < n_cols
    b_x = tl.load(x_ptr + row * n_cols + o_c, mask=m_c, other=0.0).to(tl.float32)  # [BC]
    b_mean_sq = tl.sum(b_x * b_x, axis=0) / n_cols
    b_rstd = 1.0 / tl.sqrt_rn(b_mean_sq + eps)
    b_normed = _cast(b_x * b_rstd, x_ptr.dtype.element_ty).to(tl.float32)
    b_w = tl.load(w_ptr + o_c, mask=m_c, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n_cols + o_c, _cast(b_normed * b_w, out_ptr.dtype.element_ty), mask=m_c)


@triton.jit
def _residual_row(x_ptr, y_ptr, gate_ptr, row, seq, n_cols, o_c, m_c, HAS_GATE: tl.constexpr):
    """x[row] + float(y[row]) [* gate[row // seq]] in fp32 ([BLOCK_C], masked by m_c); the gated
    sum rounds once, as torch.addcmul does (tl.fma)."""
    b_x = tl.load(x_ptr + row * n_cols + o_c, mask=m_c, other=0.0)  # [BC] fp32
    b_y = tl.load(y_ptr + row * n_cols + o_c, mask=m_c, other=0.0).to(tl.float32)
    if HAS_GATE:
        b_gate = tl.load(gate_ptr + (row // seq) * n_cols + o_c, mask=m_c, other=0.0)
        b_sum = tl.fma(b_y, b_gate, b_x)
    else:
        b_sum = b_x + b_y
    return b_sum


@triton.jit
def _layer_norm_row(b_x, m_c, o_c, row, seq, n_cols, eps, w_ptr, b_ptr, shift_ptr, scale_ptr,
                    HAS_AFFINE: tl.constexpr, HAS_MODULATION: tl.constexpr):
    """fp32 LayerNorm of one row [BLOCK_C] (masked by m_c) [* w + b] [then shift + . * (1 + scale)].

    shift, scale: [batch, n_cols] fp32, row `row` belongs to batch row // seq.
    """
    b_mean = tl.sum(b_x, axis=0) / n_cols
    b_centred = tl.where(m_c, b_x - b_mean, 0.0)
    b_var = tl.sum(b_centred * b_centred, axis=0) / n_cols
    b_y = b_centred * (1.0 / tl.sqrt_rn(b_var + eps))
    if HAS_AFFINE:
        b_w = tl.load(w_ptr + o_c, mask=m_c, other=0.0).to(tl.float32)  # [BLOCK_C]
        b_b = tl.load(b_ptr + o_c, mask=m_c, other=0.0).to(tl.float32)  # [BLOCK_C]
        b_y = b_y * b_w + b_b
    if HAS_MODULATION:
        o_mod = (row // seq) * n_cols + o_c
        b_shift = tl.load(shift_ptr + o_mod, mask=m_c, other=0.0)
        b_scale = tl.load(scale_ptr + o_mod, mask=m_c, other=0.0)
        b_y = tl.fma(b_y, 1.0 + b_scale, b_shift)  # as torch.addcmul rounds: once
    return b_y


@triton.jit
def _layer_norm_modulate_kernel(
    x_ptr, w_ptr, b_ptr, shift_ptr, scale_ptr, out_ptr, seq, n_cols, eps,
    HAS_AFFINE: tl.constexpr, HAS_MODULATION: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One row per program: `_layer_norm_row` of x's row, cast to out's dtype."""
    row = tl.program_id(0).to(tl.int64)
    o_c = tl.arange(0, BLOCK_C)
    m_c = o_c < n_cols
    b_x = tl.load(x_ptr + row * n_cols + o_c, mask=m_c, other=0.0).to(tl.float32)  # [BC]
    b_y = _layer_norm_row(b_x, m_c, o_c, row, seq, n_cols, eps, w_ptr, b_ptr, shift_ptr, scale_ptr,
                          HAS_AFFINE, HAS_MODULATION)
    tl.store(out_ptr + row * n_cols + o_c, _cast(b_y, out_ptr.dtype.element_ty), mask=m_c)


@triton.jit
def _residual_layer_norm_kernel(
    x_ptr, y_ptr, gate_ptr, w_ptr, b_ptr, shift_ptr, scale_ptr, sum_ptr, out_ptr, seq, n_cols, eps,
    HAS_GATE: tl.constexpr, HAS_AFFINE: tl.constexpr, HAS_MODULATION: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One row per program: sum = x + float(y) [* gate] (fp32, stored), then `_layer_norm_row`
    of that sum cast to out's dtype: the residual update and the next LayerNorm in one pass."""
    row = tl.program_id(0).to(tl.int64)
    o_c = tl.arange(0, BLOCK_C)
    m_c = o_c < n_cols
    b_sum = _residual_row(x_ptr, y_ptr, gate_ptr, row, seq, n_cols, o_c, m_c, HAS_GATE)
    tl.store(sum_ptr + row * n_cols + o_c, b_sum, mask=m_c)
    b_out = _layer_norm_row(b_sum, m_c, o_c, row, seq, n_cols, eps, w_ptr, b_ptr, shift_ptr, scale_ptr,
                            HAS_AFFINE, HAS_MODULATION)
    tl.store(out_ptr + row * n_cols + o_c, _cast(b_out, out_ptr.dtype.element_ty), mask=m_c)


@triton.jit
def _gated_residual_kernel(x_ptr, y_ptr, gate_ptr, out_ptr, seq, n_cols,
                           HAS_GATE: tl.constexpr, BLOCK_C: tl.constexpr):
    """One row per program: out = x + float(y) [* gate[row // seq]], fp32."""
    row = tl.program_id(0).to(tl.int64)
    o_c = tl.arange(0, BLOCK_C)
    m_c = o_c < n_cols
    tl.store(out_ptr + row * n_cols + o_c, _residual_row(x_ptr, y_ptr, gate_ptr, row, seq, n_cols, o_c, m_c, HAS_GATE),
             mask=m_c)


# The row kernels on a GPU: warps per row tuned once per (row width, variant, dtypes) on the
# first call, since a row of 5,120 wants fewer warps than the 16 `_row_warps` gives it (more
# rows in flight per SM hide the load -> reduce -> store latency; docs/benchmarks.md, "Measurements
# behind the code"). The interpreter runs the untuned kernels with `_row_warps`.
_ROW_TUNING_CONFIGS = [triton.Config({}, num_warps=warps) for warps in (4, 8, 16)]
_rms_norm_kernel_tuned = triton.autotune(configs=_ROW_TUNING_CONFIGS, key=["n_cols"])(_rms_norm_kernel)
_layer_norm_modulate_kernel_tuned = triton.autotune(
    configs=_ROW_TUNING_CONFIGS, key=["n_cols", "HAS_AFFINE", "HAS_MODULATION"])(_layer_norm_modulate_kernel)
_residual_layer_norm_kernel_tuned = triton.autotune(
    configs=_ROW_TUNING_CONFIGS, key=["n_cols", "HAS_GATE", "HAS_AFFINE", "HAS_MODULATION"]
)(_residual_layer_norm_kernel)


def _launch_row_kernel(kernel, tuned, rows: int, *args, BLOCK_C: int, **constexprs) -> None:
    """Launch a one-row-per-program kernel over `rows` rows: the tuned variant on a GPU, the plain
    one with `_row_warps` warps under the interpreter; fp fusion off (products round as PyTorch's)."""
    if _INTERPRETED:
        kernel[(rows,)](*args, BLOCK_C=BLOCK_C, **constexprs, num_warps=_row_warps(BLOCK_C), enable_fp_fusion=False)
    else:
        tuned[(rows,)](*args, BLOCK_C=BLOCK_C, **constexprs, enable_fp_fusion=False)


def rope_torch(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x by freqs in complex128, back to x's dtype (the reference).

    Args:
        x: [B, S, H, D]; freqs: [S, D / 2] complex128.
    Returns:
        [B, S, H, D], x's dtype.
    """
    batch, seq, heads, dim = x.shape
    pairs = torch.view_as_complex(x.to(torch.float64).reshape(batch, seq, heads, dim // 2, 2))
    return torch.view_as_real(pairs * freqs[None, :, None, :]).flatten(3).to(x.dtype)


def rope_triton(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """`rope_torch` as one Triton pass (float64 in registers); same args, bit-identical result.

    x may have any strides; the output is contiguous.
    """
    _check_device(x)
    batch, seq, heads, dim = x.shape
    if x.dtype not in KERNEL_DTYPES or freqs.dtype != torch.complex128 or freqs.shape != (seq, dim // 2) or dim % 2:
        raise ValueError(f"rope_triton needs x [B, S, H, even D] in {KERNEL_DTYPES} and freqs [S, D/2] complex128, "
                         f"got x {tuple(x.shape)} {x.dtype}, freqs {tuple(freqs.shape)} {freqs.dtype}")
    cos_sin = torch.view_as_real(freqs.contiguous())  # [S, D/2, 2] float64
    out = torch.empty(batch, seq, heads, dim, dtype=x.dtype, device=x.device)
    _rope_kernel[(triton.cdiv(seq, _ROPE_BLOCK_TOKENS), batch)](
        x, cos_sin, out, seq, heads, *x.stride(),
        HALF=dim // 2, HALF_PAD=triton.next_power_of_2(dim // 2), BLOCK_S=_ROPE_BLOCK_TOKENS,
        num_warps=4, enable_fp_fusion=False,
    )
    return out


def rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Float64 RoPE: x [B, S, H, D], freqs [S, D / 2] complex128 -> [B, S, H, D] in x's dtype."""
    return rope_triton(x, freqs) if _use_kernel(x) else rope_torch(x, freqs)


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Wan's RMSNorm (the reference): x [..., C], weight [C] -> [..., C].

    Statistics in fp32; the normalised x is rounded to x's dtype before the weight
    multiplies it; the result has the promoted dtype of x and weight.
    """
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return normed.to(x.dtype) * weight


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rms_norm_torch` in one pass (one row in registers per program); same args."""
    _check_device(x)
    n_cols = x.shape[-1]
    if weight.shape != (n_cols,):
        raise ValueError(f"weight must be [{n_cols}], got {tuple(weight.shape)}")
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    _launch_row_kernel(_rms_norm_kernel, _rms_norm_kernel_tuned, x.numel() // n_cols,
                       x, weight.contiguous(), out, n_cols, eps, BLOCK_C=triton.next_power_of_2(n_cols))
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, fp32 statistics: x [..., C], weight [C] -> [..., C]."""
    return rms_norm_triton(x, weight, eps) if _use_kernel(x, weight) else rms_norm_torch(x, weight, eps)


def layer_norm_modulate_torch(
    x: torch.Tensor,
    eps: float,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """LayerNorm in fp32, optionally modulated, cast to `dtype` (the reference).

    Args:
        x: [B, S, C]; eps: LayerNorm epsilon.
        weight, bias: [C] affine parameters, or None.
        shift, scale: [B, 1, C] modulation, both or neither: shift + norm * (1 + scale).
        dtype: output dtype (default fp32).
    Returns:
        [B, S, C] in `dtype`.
    """
    weight = None if weight is None else weight.float()
    bias = None if bias is None else bias.float()
    out = torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), weight, bias, eps)
    if shift is not None:
        out = torch.addcmul(shift.float(), out, 1 + scale.float())
    return out.to(dtype or torch.float32)


def layer_norm_modulate_triton(
    x: torch.Tensor,
    eps: float,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """`layer_norm_modulate_torch` in one pass over x (fp32); same args, x [B, S, C]."""
    _check_layer_norm_args(x, weight, bias, shift, scale)
    batch, seq, n_cols = x.shape
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=dtype or torch.float32, device=x.device)
    shift = None if shift is None else shift.float().contiguous()
    scale = None if scale is None else scale.float().contiguous()
    _launch_row_kernel(
        _layer_norm_modulate_kernel, _layer_norm_modulate_kernel_tuned, batch * seq,
        x, weight, bias, shift, scale, out, seq, n_cols, eps,
        HAS_AFFINE=weight is not None, HAS_MODULATION=shift is not None, BLOCK_C=triton.next_power_of_2(n_cols),
    )
    return out


def layer_norm_modulate(
    x: torch.Tensor,
    eps: float,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """fp32 LayerNorm [affine] [then shift + norm * (1 + scale)], cast to `dtype`.

    x: [B, S, C]; weight, bias: [C] or None; shift, scale: [B, 1, C] or None -> [B, S, C].
    """
    if _use_kernel(x, weight, bias, shift, scale):
        return layer_norm_modulate_triton(x, eps, weight, bias, shift, scale, dtype)
    return layer_norm_modulate_torch(x, eps, weight, bias, shift, scale, dtype)


def residual_layer_norm_torch(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: Optional[torch.Tensor],
    eps: float,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`gated_residual_torch(x, y, gate)`, then `layer_norm_modulate_torch` of the sum (the reference).

    Args: as the two ops': x [B, S, C] fp32, y [B, S, C], gate [B, 1, C] fp32 or None, the rest
        the LayerNorm's.
    Returns:
        (the new residual stream [B, S, C] fp32, its LayerNorm [B, S, C] in `dtype`).
    """
    total = gated_residual_torch(x, y, gate)
    return total, layer_norm_modulate_torch(total, eps, weight, bias, shift, scale, dtype)


def residual_layer_norm_triton(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: Optional[torch.Tensor],
    eps: float,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`residual_layer_norm_torch` in one pass: the sum is bit-identical to `gated_residual`'s, the
    LayerNorm computed as `layer_norm_modulate_triton` computes it; same args."""
    _check_gated_residual_args(x, y, gate)
    _check_layer_norm_args(x, weight, bias, shift, scale)
    batch, seq, n_cols = x.shape
    x, y = x.contiguous(), y.contiguous()
    total = torch.empty_like(x)
    out = torch.empty(x.shape, dtype=dtype or torch.float32, device=x.device)
    shift = None if shift is None else shift.float().contiguous()
    scale = None if scale is None else scale.float().contiguous()
    _launch_row_kernel(
        _residual_layer_norm_kernel, _residual_layer_norm_kernel_tuned, batch * seq,
        x, y, None if gate is None else gate.contiguous(), weight, bias, shift, scale, total, out, seq, n_cols, eps,
        HAS_GATE=gate is not None, HAS_AFFINE=weight is not None, HAS_MODULATION=shift is not None,
        BLOCK_C=triton.next_power_of_2(n_cols),
    )
    return total, out


def residual_layer_norm(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: Optional[torch.Tensor],
    eps: float,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual update x + float(y) [* gate] and the next LayerNorm [affine] [modulation] of
    it, in one pass over memory on CUDA: -> (new residual [B, S, C] fp32, normed [B, S, C] `dtype`)."""
    if _use_kernel(x, y, gate, weight, bias, shift, scale):
        return residual_layer_norm_triton(x, y, gate, eps, weight, bias, shift, scale, dtype)
    return residual_layer_norm_torch(x, y, gate, eps, weight, bias, shift, scale, dtype)


def gated_residual_torch(x: torch.Tensor, y: torch.Tensor, gate: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x + float(y) * gate (or x + float(y) without a gate), fp32 (the reference).

    Args:
        x: [B, S, C] fp32 residual stream; y: [B, S, C] any float dtype; gate: [B, 1, C] fp32.
    Returns:
        [B, S, C] fp32, a new tensor.
    """
    return x + y.float() if gate is None else torch.addcmul(x, y.float(), gate)


def gated_residual_triton(x: torch.Tensor, y: torch.Tensor, gate: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`gated_residual_torch` in one pass; same args. Out of place: the same memory traffic
    as in place, and the caller's x stays untouched."""
    _check_gated_residual_args(x, y, gate)
    batch, seq, n_cols = x.shape
    x, y = x.contiguous(), y.contiguous()
    out = torch.empty_like(x)
    block = triton.next_power_of_2(n_cols)
    _gated_residual_kernel[(batch * seq,)](
        x, y, None if gate is None else gate.contiguous(), out, seq, n_cols,
        HAS_GATE=gate is not None, BLOCK_C=block, num_warps=_row_warps(block), enable_fp_fusion=False,
    )
    return out


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The fp32 residual update x + float(y) [* gate]: x, y [B, S, C], gate [B, 1, C] -> [B, S, C]."""
    return gated_residual_triton(x, y, gate) if _use_kernel(x, y, gate) else gated_residual_torch(x, y, gate)


def linear_gelu(x: torch.Tensor, linear: torch.nn.Linear) -> torch.Tensor:
    """GELU (tanh approximation) of `linear(x)`: x [..., in] -> [..., out] in x's dtype.

    On CUDA, for a plain `nn.Linear` with a bias whose weights share x's dtype and device (no
    hook recasts or moves them), one cuBLASLt GEMM applies the bias and the GELU in its epilogue
    (`torch._addmm_activation`), so the FFN's wide hidden activations are written once instead of
    written, read and written again. The epilogue applies GELU to the fp32 accumulator before the
    one rounding to x's dtype, where the unfused path rounds before and after the GELU. Anything
    else (fp8 or hooked layers, CPU, autograd) takes `F.gelu(linear(x))`.
    """
    weight, bias = linear.weight, linear.bias
    fusable = (type(linear) is torch.nn.Linear and not has_own_hook(linear) and bias is not None
               and weight.is_cuda and weight.dtype == x.dtype == bias.dtype)
    if fusable and _use_kernel(x, weight, bias):
        hidden = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t(), use_gelu=True)
        return hidden.view(*x.shape[:-1], hidden.shape[-1])
    return F.gelu(linear(x), approximate="tanh")
