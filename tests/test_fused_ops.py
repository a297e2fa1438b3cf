"""The fused Triton kernels of `wanx.fused_ops` against their PyTorch references.

On CPU the kernels run on triton's interpreter, which must be switched on before
`wanx.fused_ops` defines them; `test_kernels_on_the_interpreter` therefore re-runs this file
in a subprocess with TRITON_INTERPRET=1, where the `cpu` cases run (they skip otherwise).
Cases marked `gpu` run the compiled kernels, always against the CPU reference.

What "match" means:
- RoPE and the gated residual: bit-identical (torch.equal).
- RMSNorm and LayerNorm reduce in another order than PyTorch. fp32 outputs: the kernel's
  largest error against a float64 computation is at most twice that of the PyTorch fp32
  path, plus one fp32 unit of the output's scale (the bound E). bf16 outputs of RMSNorm (a
  product, no cancellation): at most one bf16 unit in the last place from the PyTorch path
  (a tie broken the other way after an fp32-level difference). bf16 outputs of LayerNorm
  (the affine bias and the shift can cancel): within half a bf16 unit of the float64 value
  plus E. Either way at most 1% of the bf16 elements may differ from PyTorch's.
"""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import WanDiT, rope_frequencies
from wanx import fused_ops

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not fused_ops.kernels_interpreted(),
                                                 reason="runs in the interpreter subprocess")),
    pytest.param("cuda", marks=pytest.mark.gpu),
]
FP32_EPS = torch.finfo(torch.float32).eps


@pytest.mark.skipif(fused_ops.kernels_interpreted() or torch.cuda.is_available(),
                    reason="this is the subprocess, or a GPU is here")
def test_kernels_on_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).resolve())],
        cwd=root, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout


def randn(*shape, seed=0, scale=1.0, shift=0.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale + shift


def bf16_ulps(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """|out - ref| in units of bf16's last place at ref (8 significant bits)."""
    ref = ref.float()
    _, exponent = torch.frexp(ref)
    ulp = torch.ldexp(torch.ones_like(ref), exponent - 8)
    return (out.float() - ref).abs() / ulp


def assert_bf16_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    ulps = bf16_ulps(out.cpu(), ref)
    assert ulps.max() <= 1.0, f"{ulps.max()} bf16 ulps"
    assert (ulps > 0).float().mean() <= 0.01, f"{(ulps > 0).float().mean():.3%} of the elements differ"


def assert_fp32_as_good_as_torch(out: torch.Tensor, torch_out: torch.Tensor, exact: torch.Tensor) -> float:
    """The kernel's max error against the float64 result <= 2x the PyTorch fp32 path's + 1 ulp
    of the output's scale; returns that bound."""
    kernel_error = (out.cpu().double() - exact).abs().max()
    bound = 2 * (torch_out.double() - exact).abs().max() + FP32_EPS * exact.abs().max()
    assert kernel_error <= bound, (kernel_error, bound)
    return bound.item()


def assert_bf16_rounds_the_exact_value(out: torch.Tensor, torch_out: torch.Tensor, exact: torch.Tensor,
                                       bound: float) -> None:
    """bf16 `out` within half a bf16 ulp (at |exact| + bound) plus `bound` of `exact`, and equal
    to PyTorch's bf16 output on at least 99% of the elements."""
    _, exponent = torch.frexp(exact.abs() + bound)
    half_ulp = torch.ldexp(torch.ones_like(exact), exponent - 9)
    assert ((out.cpu().double() - exact).abs() <= half_ulp + bound).all()
    assert (out.cpu() != torch_out).float().mean() <= 0.01


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim,heads,strided", [(32, 3, False), (128, 2, False), (128, 3, True)])
def test_rope_is_bit_identical(device, dtype, head_dim, heads, strided):
    grid = (2, 3, 5)
    freqs = rope_frequencies([grid, grid], head_dim)  # [60, D/2] complex128
    seq = freqs.shape[0]
    if strided:  # views into a [B, H, S, 2D] buffer: strided on every axis
        x = randn(2, heads, seq, 2 * head_dim, scale=4.0)[..., ::2].transpose(1, 2)
    else:
        x = randn(2, seq, heads, head_dim, scale=4.0)
    x = x.to(dtype)
    out = fused_ops.rope_triton(x.to(device), freqs.to(device))
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out.cpu(), fused_ops.rope_torch(x, freqs))


@pytest.mark.gpu
def test_rope_is_bit_identical_at_model_width_gpu():
    grid = (3, 34, 60)
    freqs = rope_frequencies([grid, grid], 128)  # angles up to 59 rad
    x = randn(1, freqs.shape[0], 40, 128, scale=3.0).to(torch.bfloat16)
    out = fused_ops.rope(x.cuda(), freqs.cuda())
    assert torch.equal(out.cpu(), fused_ops.rope_torch(x, freqs))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_cols", [64, 96, 5120])
def test_rms_norm(device, n_cols):
    x = randn(2, 37, n_cols, scale=3.0, shift=0.5)
    weight = randn(n_cols, seed=1, scale=0.1, shift=1.0)
    exact = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * weight.double()
    out = fused_ops.rms_norm_triton(x.to(device), weight.to(device), 1e-6)
    assert out.dtype == torch.float32
    assert_fp32_as_good_as_torch(out, fused_ops.rms_norm_torch(x, weight, 1e-6), exact)
    x16, weight16 = x.bfloat16(), weight.bfloat16()
    out = fused_ops.rms_norm_triton(x16.to(device), weight16.to(device), 1e-6)
    assert out.dtype == torch.bfloat16
    assert_bf16_close(out, fused_ops.rms_norm_torch(x16, weight16, 1e-6))


def layer_norm_case(n_cols: int, variant: str) -> dict:
    """LayerNorm parameters of a variant: plain, affine (weight, bias) or modulated (shift, scale [2, 1, C])."""
    if variant == "affine":
        return dict(weight=randn(n_cols, seed=1, scale=0.2, shift=1.0), bias=randn(n_cols, seed=2, scale=0.1))
    if variant == "modulated":  # a different modulation per sample
        return dict(shift=randn(2, 1, n_cols, seed=3), scale=randn(2, 1, n_cols, seed=4, scale=0.5))
    return {}


def layer_norm_exact(x: torch.Tensor, params: dict) -> torch.Tensor:
    """The variant's LayerNorm of x in float64."""
    exact = F.layer_norm(x.double(), (x.shape[-1],), eps=1e-6)
    if "weight" in params:
        exact = exact * params["weight"].double() + params["bias"].double()
    if "shift" in params:
        exact = params["shift"].double() + exact * (1 + params["scale"].double())
    return exact


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_cols", [64, 96, 5120])
@pytest.mark.parametrize("variant", ["plain", "affine", "modulated"])
def test_layer_norm_modulate(device, n_cols, variant):
    x = randn(2, 37, n_cols, scale=4.0, shift=1.0)
    params = layer_norm_case(n_cols, variant)
    exact = layer_norm_exact(x, params)
    on_device = {k: v.to(device) for k, v in params.items()}
    out = fused_ops.layer_norm_modulate_triton(x.to(device), 1e-6, **on_device)
    assert out.dtype == torch.float32
    bound = assert_fp32_as_good_as_torch(out, fused_ops.layer_norm_modulate_torch(x, 1e-6, **params), exact)
    out = fused_ops.layer_norm_modulate_triton(x.to(device), 1e-6, **on_device, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    torch_out = fused_ops.layer_norm_modulate_torch(x, 1e-6, **params, dtype=torch.bfloat16)
    assert_bf16_rounds_the_exact_value(out, torch_out, exact, bound)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_cols", [96, 5120])
@pytest.mark.parametrize("variant", ["plain", "affine", "modulated"])
@pytest.mark.parametrize("gated", [True, False])
def test_residual_layer_norm(device, n_cols, variant, gated):
    """The sum bit-identical to `gated_residual`; its LayerNorm as good as `layer_norm_modulate`'s
    (and, on the interpreter, bit-identical to that kernel run on the sum)."""
    x = randn(2, 37, n_cols, scale=4.0, shift=1.0)
    y = randn(2, 37, n_cols, seed=5).bfloat16()
    gate = randn(2, 1, n_cols, seed=6) if gated else None
    params = layer_norm_case(n_cols, variant)
    on_device = {k: v.to(device) for k, v in params.items()}
    args = (x.to(device), y.to(device), None if gate is None else gate.to(device), 1e-6)
    total = fused_ops.gated_residual_torch(x, y, gate)
    exact = layer_norm_exact(total, params)
    out_total, out = fused_ops.residual_layer_norm_triton(*args, **on_device)
    assert torch.equal(out_total.cpu(), total)
    assert out.dtype == torch.float32
    bound = assert_fp32_as_good_as_torch(out, fused_ops.layer_norm_modulate_torch(total, 1e-6, **params), exact)
    out_total, out = fused_ops.residual_layer_norm_triton(*args, **on_device, dtype=torch.bfloat16)
    assert torch.equal(out_total.cpu(), total) and out.dtype == torch.bfloat16
    torch_out = fused_ops.layer_norm_modulate_torch(total, 1e-6, **params, dtype=torch.bfloat16)
    assert_bf16_rounds_the_exact_value(out, torch_out, exact, bound)
    if device == "cpu":  # the interpreter: both kernels reduce in the same order
        two_passes = fused_ops.layer_norm_modulate_triton(total, 1e-6, **params, dtype=torch.bfloat16)
        assert torch.equal(out, two_passes)


def test_linear_gelu_is_linear_then_gelu_on_cpu():
    linear = torch.nn.Linear(48, 80)
    x = randn(2, 5, 48)
    expected = F.gelu(linear(x), approximate="tanh")
    assert torch.equal(fused_ops.linear_gelu(x, linear), expected)


@pytest.mark.gpu
@torch.no_grad()
def test_linear_gelu_epilogue_gpu():
    """The GEMM + GELU epilogue against float64 from the same bf16 operands: no worse than
    Linear-then-GELU (which rounds twice), and within one bf16 unit of it on all but 1% of the
    elements; a hooked layer takes the unfused path."""
    linear = torch.nn.Linear(512, 1536).cuda().bfloat16()
    x = randn(3, 301, 512).cuda().bfloat16()
    fused = fused_ops.linear_gelu(x, linear)
    unfused = F.gelu(linear(x), approximate="tanh")
    pre = x.double() @ linear.weight.double().t() + linear.bias.double()
    exact = 0.5 * pre * (1 + torch.tanh(math.sqrt(2 / math.pi) * (pre + 0.044715 * pre**3)))
    fused_error, unfused_error = (fused.double() - exact).abs(), (unfused.double() - exact).abs()
    assert fused.shape == unfused.shape and fused.dtype == torch.bfloat16
    assert fused_error.mean() <= unfused_error.mean()
    assert fused_error.max() <= unfused_error.max() * 1.01
    assert (bf16_ulps(fused.cpu(), unfused.cpu()) > 1).float().mean() <= 0.01
    linear._diffusers_hook = object()  # what diffusers' hooks leave on a layer
    assert torch.equal(fused_ops.linear_gelu(x, linear), unfused)


def test_ops_use_pytorch_on_cpu():
    x = randn(1, 12, 2, 32).bfloat16()
    freqs = rope_frequencies([(1, 3, 4)], 32)
    assert torch.equal(fused_ops.rope(x, freqs), fused_ops.rope_torch(x, freqs))
    weight = torch.ones(64, requires_grad=True)
    out = fused_ops.rms_norm(x.float().flatten(2), weight, 1e-6)
    out.sum().backward()
    assert weight.grad is not None


@pytest.mark.gpu
def test_ops_fall_back_under_autograd_gpu():
    weight = torch.ones(64, device="cuda", requires_grad=True)
    fused_ops.rms_norm(randn(3, 64).cuda(), weight, 1e-6).sum().backward()
    assert weight.grad is not None


@pytest.mark.gpu
@torch.no_grad()
def test_tiny_model_same_with_and_without_kernels_gpu(monkeypatch):
    model = WanDiT.tiny().cuda()
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(2, 16, 2, 8, 8, generator=gen).cuda()
    source = torch.randn(1, 16, 2, 8, 8, generator=gen).cuda()
    context = torch.randn(2, 7, 32, generator=gen).cuda()
    fused = model(latent, source, torch.tensor([500.0, 20.0]), context)
    monkeypatch.setattr(fused_ops, "_use_kernel", lambda *tensors: False)
    reference = model(latent, source, torch.tensor([500.0, 20.0]), context)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
