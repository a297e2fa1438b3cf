"""Every bad input to the public call raises an error that names the argument and what was expected."""
from __future__ import annotations

import ast
import math
import re
from pathlib import Path

import pytest
import torch

from in_context_sparse_attention import BACKEND_NAMES, ISAConfig, editing_sparse_attention
from in_context_sparse_attention.backend_base import ISABackend
from in_context_sparse_attention.backends import get_backend


def _qkv(seq=96, heads=2, dim=64, dtype=torch.float32):
    return [torch.randn(1, seq, heads, dim, dtype=dtype) for _ in range(3)]


def _call(q=None, k=None, v=None, t=40, c=56, **kwargs):
    base = _qkv()
    q = base[0] if q is None else q
    k = base[1] if k is None else k
    v = base[2] if v is None else v
    return editing_sparse_attention(q, k, v, t, c, **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(q=torch.randn(96, 2, 64)), ValueError, r"q must have shape \[B, S, H, D\] \(4 dims\), got 3"),
        (dict(k=torch.randn(1, 96, 2, 32)), ValueError, "same shape"),
        (dict(v=torch.randn(1, 96, 2, 64, dtype=torch.float64)), ValueError, "same dtype"),
        (
            dict(q=torch.ones(1, 96, 2, 64, dtype=torch.int32)),
            ValueError,
            "q must be float16, bfloat16, float32 or float64",
        ),
        (dict(q=[[1.0]]), TypeError, "q must be a torch.Tensor"),
        (dict(t=40, c=50), ValueError, r"t_seq_len \+ s_seq_len must equal .* 96, got 40 \+ 50 = 90"),
        (dict(t=0, c=96), ValueError, "t_seq_len must be a positive int, got 0"),
        (dict(t=96, c=0), ValueError, "s_seq_len must be a positive int, got 0"),
        (dict(t=-4, c=100), ValueError, "t_seq_len must be a positive int"),
        (dict(t=40.0, c=56), ValueError, "t_seq_len must be a positive int, got 40.0"),
        (dict(t=True, c=95), ValueError, "t_seq_len must be a positive int"),
        (dict(backend="cuda"), ValueError, "backend must be one of 'torch', 'triton', 'tilelang', got 'cuda'"),
        (dict(config={"block_size": 64}), TypeError, "config must be an ISAConfig"),
        (dict(alpha=torch.zeros(1, 95, 1, 1)), ValueError, r"alpha must be broadcastable to \[B, S, 1, 1\]"),
        (dict(alpha=torch.zeros(1, 96, 2, 1)), ValueError, r"alpha must be broadcastable to \[B, S, 1, 1\]"),
        (dict(alpha=torch.zeros(1, 96, 1, 1, dtype=torch.int64)), ValueError, "alpha must be a floating-point tensor"),
        (dict(alpha="0.5"), TypeError, "alpha must be None, a float or a tensor"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        _call(**kwargs)


@pytest.mark.parametrize(
    "field, value, interval",
    [
        ("select_ratio", 0.0, r"\(0, 1\]"),
        ("select_ratio", 1.5, r"\(0, 1\]"),
        ("sparsity", -0.1, r"\(0, 1\]"),
        ("sharpness_ratio", 2, r"\(0, 1\]"),
        ("flat_ratio", 1.01, r"\[0, 1\]"),
        ("flat_ratio", -0.5, r"\[0, 1\]"),
        ("sparsity", "0.1", r"\(0, 1\]"),
    ],
)
def test_config_ratios_out_of_range(field, value, interval):
    with pytest.raises(ValueError, match=rf"ISAConfig.{field} must be a number in {interval}, got"):
        ISAConfig(**{field: value})


@pytest.mark.parametrize("block_size", [0, -64, 32.0, True])
def test_config_block_size(block_size):
    with pytest.raises(ValueError, match="ISAConfig.block_size must be a positive int"):
        ISAConfig(block_size=block_size)


@pytest.mark.parametrize("block_size", [4097, 10**9])
def test_config_block_size_has_an_upper_bound(block_size):
    with pytest.raises(
        ValueError, match=rf"ISAConfig.block_size must be a positive int at most 4096, got {block_size}"
    ):
        ISAConfig(block_size=block_size)


@pytest.mark.parametrize("block_size", [1, 64, 4096])
def test_config_block_size_within_the_bound(block_size):
    assert ISAConfig(block_size=block_size).block_size == block_size


@pytest.mark.parametrize("alpha", [math.nan, math.inf, -math.inf, 10**400], ids=["nan", "inf", "-inf", "10**400"])
def test_non_finite_alpha_is_refused(alpha):
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        _call(alpha=alpha)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for CPU tensors on a machine without CUDA")
@pytest.mark.parametrize("backend", ["triton", "tilelang"])
def test_gpu_backends_refuse_cpu_tensors_with_a_hint(backend, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=rf"{backend}.*(CUDA|GPU).*'torch'"):
        _call(backend=backend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs two devices: CPU and CUDA")
@pytest.mark.gpu
def test_mismatched_devices():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="same device"):
        editing_sparse_attention(q.cuda(), k, v, 40, 56)


def test_good_call_still_works():
    out = _call(alpha=0.5)
    assert out.shape == (1, 96, 2, 64) and not out.isnan().any()


def test_every_backend_is_an_isa_backend():
    for name in BACKEND_NAMES:
        backend = get_backend(name)
        assert isinstance(backend, ISABackend) and backend.name == name


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answers of a machine without CUDA")
def test_unsupported_reason_on_a_machine_without_cuda(monkeypatch):
    """None where a backend can run (triton: on the interpreter), else a reason with a hint."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert get_backend("torch").unsupported_reason("cpu", torch.float64) is None
    assert get_backend("triton").unsupported_reason("cpu", torch.bfloat16) is None
    assert re.search(
        r"dtypes float16, bfloat16, float32, got torch.float64; use backend='torch'",
        get_backend("triton").unsupported_reason("cpu", torch.float64),
    )
    assert re.search(r"CUDA GPU.*backend 'torch'", get_backend("tilelang").unsupported_reason("cuda", torch.bfloat16))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert re.search(
        r"backend='torch'.*TRITON_INTERPRET=1", get_backend("triton").unsupported_reason("cpu", torch.float32)
    )


def test_backend_modules_do_not_import_each_other():
    """What the Triton and TileLang backends share lives in modules of its own."""
    package = Path(__file__).resolve().parents[1] / "in_context_sparse_attention"
    for module, other in (("triton_backend", "tilelang_backend"), ("tilelang_backend", "triton_backend")):
        tree = ast.parse((package / f"{module}.py").read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
        imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert not any(other in name for name in imported), f"{module} imports {other}"
