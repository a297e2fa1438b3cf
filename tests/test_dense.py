"""Dense attention (`in_context_sparse_attention.dense`): results against float64, and the
choice of kernel (FlashAttention-3 under either import name, its dtype limits, SDPA last)."""
import math
import sys
import types

import pytest
import torch

from in_context_sparse_attention import dense
from in_context_sparse_attention.dense import dense_attention, dense_kernel_name, kernel_for


def attention_float64(q, k, v):
    """softmax(q k^T / sqrt(D)) v in float64; [B, L, H, D] layout."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return (weights @ v).transpose(1, 2)


def relative_l2(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


@pytest.fixture
def fresh_kernel_cache():
    """Forget the import probes before and after a test that fakes the flash modules."""
    dense._flash_attn_3.cache_clear()
    dense._flash_attn_2.cache_clear()
    yield
    dense._flash_attn_3.cache_clear()
    dense._flash_attn_2.cache_clear()


def fake_module(monkeypatch, name: str, **attributes) -> None:
    module = types.ModuleType(name)
    for key, value in attributes.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)


def hide_module(monkeypatch, name: str) -> None:
    monkeypatch.setitem(sys.modules, name, None)  # `import name` then raises ImportError


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_attention_matches_float64(layout, dtype):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, length, 3, 64, generator=gen) for length in (37, 50, 50))
    expected = attention_float64(q, k, v)
    args = [t.to(dtype) for t in (q, k, v)]
    if layout == "bhsd":
        args = [t.transpose(1, 2) for t in args]
    out = dense_attention(*args, layout=layout)
    if layout == "bhsd":
        out = out.transpose(1, 2)
    assert out.dtype == dtype and out.shape == expected.shape
    assert relative_l2(out, expected) < (1e-6 if dtype == torch.float32 else 8e-3)


def test_dense_attention_rejects_unknown_layout():
    q = torch.randn(1, 4, 1, 8)
    with pytest.raises(ValueError, match="layout must be 'bshd' or 'bhsd', got 'bsdh'"):
        dense_attention(q, q, q, layout="bsdh")


def test_cpu_tensors_use_sdpa():
    assert dense_kernel_name(torch.empty(1, 1, 1, 64, dtype=torch.bfloat16)) == "PyTorch SDPA"


def test_full_flash_attention_3_build_is_preferred(monkeypatch, fresh_kernel_cache):
    fake_module(monkeypatch, "flash_attn_interface", flash_attn_func=lambda q, k, v: q)
    fake_module(monkeypatch, "flash_attn", flash_attn_func=lambda q, k, v: q)
    for dtype in (torch.float16, torch.bfloat16):
        assert kernel_for(True, dtype, 128) == "FlashAttention-3"
    assert kernel_for(True, torch.float32, 128) == "PyTorch SDPA"
    assert kernel_for(True, torch.bfloat16, 512) == "PyTorch SDPA"
    assert kernel_for(False, torch.bfloat16, 128) == "PyTorch SDPA"


def test_forward_only_build_without_fp16_falls_back_for_fp16(monkeypatch, fresh_kernel_cache):
    hide_module(monkeypatch, "flash_attn_interface")
    hide_module(monkeypatch, "flash_attn")
    fake_module(monkeypatch, "fa3_fwd_interface", flash_attn_func=lambda q, k, v: q)
    fake_module(monkeypatch, "fa3_fwd_config", CONFIG={"build_flags": {"FLASHATTENTION_DISABLE_FP16": True}})
    assert kernel_for(True, torch.bfloat16, 128) == "FlashAttention-3"
    assert kernel_for(True, torch.float16, 128) == "PyTorch SDPA"


def test_forward_only_build_with_fp16(monkeypatch, fresh_kernel_cache):
    hide_module(monkeypatch, "flash_attn_interface")
    fake_module(monkeypatch, "fa3_fwd_interface", flash_attn_func=lambda q, k, v: q)
    fake_module(monkeypatch, "fa3_fwd_config", CONFIG={"build_flags": {}})
    assert kernel_for(True, torch.float16, 128) == "FlashAttention-3"


def test_flash_attention_2_when_no_version_3(monkeypatch, fresh_kernel_cache):
    hide_module(monkeypatch, "flash_attn_interface")
    hide_module(monkeypatch, "fa3_fwd_interface")
    fake_module(monkeypatch, "flash_attn", flash_attn_func=lambda q, k, v: q)
    assert kernel_for(True, torch.float16, 128) == "FlashAttention-2"
    hide_module(monkeypatch, "flash_attn")
    dense._flash_attn_2.cache_clear()
    assert kernel_for(True, torch.float16, 128) == "PyTorch SDPA"


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lengths", [(1, 1), (63, 200), (1000, 777)])
def test_dense_attention_on_gpu_matches_float64(layout, dtype, lengths):
    """Whichever kernel is installed (printed), against float64: within bf16/fp16 rounding."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    len_q, len_k = lengths
    q = torch.randn(1, len_q, 4, 128, generator=gen, device="cuda")
    k, v = (torch.randn(1, len_k, 4, 128, generator=gen, device="cuda") for _ in range(2))
    expected = attention_float64(q, k, v)
    args = [t.to(dtype) for t in (q, k, v)]
    if layout == "bhsd":
        args = [t.transpose(1, 2).contiguous() for t in args]
    out = dense_attention(*args, layout=layout)
    if layout == "bhsd":
        out = out.transpose(1, 2)
    print(dense_kernel_name(args[0]))
    assert out.dtype == dtype and out.shape == expected.shape
    assert torch.isfinite(out).all()
    bound = 2.0 * 2.0**-8 if dtype == torch.bfloat16 else 2.0 * 2.0**-11
    assert relative_l2(out, expected) < bound


def test_env_pins_sdpa_even_with_flash_attention_installed(monkeypatch, fresh_kernel_cache):
    fake_module(monkeypatch, "flash_attn_interface", flash_attn_func=lambda q, k, v: q)
    fake_module(monkeypatch, "flash_attn", flash_attn_func=lambda q, k, v: q)
    monkeypatch.setenv("ISA_DENSE_KERNEL", "sdpa")
    assert kernel_for(True, torch.bfloat16, 128) == "PyTorch SDPA"
    monkeypatch.setenv("ISA_DENSE_KERNEL", "fa2")
    assert kernel_for(True, torch.bfloat16, 128) == "FlashAttention-2"
    monkeypatch.setenv("ISA_DENSE_KERNEL", "FA3")
    assert kernel_for(True, torch.bfloat16, 128) == "FlashAttention-3"


def test_env_pinning_a_missing_kernel_is_a_clear_error(monkeypatch, fresh_kernel_cache):
    hide_module(monkeypatch, "flash_attn_interface")
    hide_module(monkeypatch, "fa3_fwd_interface")
    hide_module(monkeypatch, "flash_attn")
    monkeypatch.setenv("ISA_DENSE_KERNEL", "fa3")
    with pytest.raises(ValueError, match="ISA_DENSE_KERNEL=fa3 but FlashAttention-3 is not installed"):
        kernel_for(True, torch.bfloat16, 128)
    monkeypatch.setenv("ISA_DENSE_KERNEL", "fa2")
    with pytest.raises(ValueError, match="ISA_DENSE_KERNEL=fa2 but FlashAttention-2 is not installed"):
        kernel_for(True, torch.bfloat16, 128)
    monkeypatch.setenv("ISA_DENSE_KERNEL", "cudnn")
    with pytest.raises(ValueError, match="ISA_DENSE_KERNEL must be one of auto, fa3, fa2, sdpa, got 'cudnn'"):
        kernel_for(True, torch.bfloat16, 128)
