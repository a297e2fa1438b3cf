"""Backend "torch" against the independent float64 ISA of tests/isa_naive.py, and exact properties."""
from __future__ import annotations

import math

import pytest
import torch

from in_context_sparse_attention import ISAConfig, editing_sparse_attention
from in_context_sparse_attention.layout import BlockLayout
from in_context_sparse_attention.selection import select_context_blocks
from isa_naive import naive_isa


def _qkv(batch, seq, heads, dim, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, seq, heads, dim, generator=generator, dtype=torch.float64).to(dtype) for _ in range(3)]


def _dense(q, k, v):
    q, k, v = (x.to(torch.float64).transpose(1, 2) for x in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return (weights @ v).transpose(1, 2)


def _relative_l2(a, b):
    a, b = a.to(torch.float64), b.to(torch.float64)
    return ((a - b).norm() / b.norm()).item()


# (T, C, block size, config): T and C not multiples of the block, T < block, a source with no
# full block, a partial last block, aligned sizes, and ratios large enough that every step
# (selection, split, exact/Taylor mix) has something to do at test sizes.
BUSY = dict(select_ratio=0.5, sparsity=0.3, sharpness_ratio=0.5, flat_ratio=0.5)
CASES = [
    pytest.param(130, 170, 16, BUSY, id="unaligned-b16"),
    pytest.param(10, 150, 16, BUSY, id="T<block"),
    pytest.param(100, 20, 64, {}, id="no-full-source-block"),
    pytest.param(128, 192, 32, BUSY, id="aligned-b32"),
    pytest.param(200, 313, 64, dict(select_ratio=0.5, sparsity=0.25), id="partial-last-b64"),
    pytest.param(640, 700, 64, {}, id="defaults-b64"),
]


@pytest.mark.parametrize("t_len, c_len, block, overrides", CASES)
def test_torch_backend_matches_naive_float64(t_len, c_len, block, overrides):
    config = ISAConfig(block_size=block, **overrides)
    q, k, v = _qkv(2, t_len + c_len, 3, 64)
    alpha = torch.rand(2, t_len + c_len, 1, 1, dtype=torch.float64) - 0.5
    out = editing_sparse_attention(q, k, v, t_len, c_len, alpha=alpha, config=config, backend="torch")
    expected = naive_isa(q, k, v, t_len, c_len, alpha, block_size=block, **overrides)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1.5e-2)])
@pytest.mark.parametrize("dim", [64, 128])
def test_torch_backend_low_precision(dtype, tolerance, dim):
    t_len, c_len = 70, 130
    q, k, v = _qkv(1, t_len + c_len, 2, dim, dtype=dtype, seed=1)
    out = editing_sparse_attention(q, k, v, t_len, c_len, alpha=0.25, config=ISAConfig(block_size=16, **BUSY))
    expected = naive_isa(q, k, v, t_len, c_len, 0.25, block_size=16, **BUSY)
    assert out.dtype == dtype
    assert not out.isnan().any()
    assert _relative_l2(out, expected) < tolerance


@pytest.mark.parametrize("alpha", [None, 0.3, "tensor", "broadcast"])
def test_alpha_forms_and_non_contiguous_inputs(alpha):
    t_len, c_len, heads = 90, 110, 3
    base = _qkv(2, t_len + c_len, heads, 64, seed=2)
    # non-contiguous views with the same values: [B, H, S, D] storage seen as [B, S, H, D]
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in base)
    q = torch.cat([q, q], dim=-1)[..., :64]
    assert not q.is_contiguous() and not k.is_contiguous()
    if alpha == "tensor":
        alpha = torch.linspace(-0.2, 0.2, t_len + c_len, dtype=torch.float64).view(1, -1, 1, 1).expand(2, -1, 1, 1)
    elif alpha == "broadcast":
        alpha = torch.tensor(0.1, dtype=torch.float64)
    out = editing_sparse_attention(q, k, v, t_len, c_len, alpha=alpha, config=ISAConfig(block_size=16, **BUSY))
    expected = naive_isa(*base, t_len, c_len, alpha, block_size=16, **BUSY)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("t_len, c_len", [(1, 1), (63, 65), (113, 1023), (64, 64), (5, 300), (700, 3)])
def test_everything_kept_and_full_equals_dense(t_len, c_len):
    q, k, v = _qkv(1, t_len + c_len, 2, 32, seed=3)
    config = ISAConfig(select_ratio=1.0, flat_ratio=1.0)
    out = editing_sparse_attention(q, k, v, t_len, c_len, config=config)
    torch.testing.assert_close(out, _dense(q, k, v), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("t_blocks, c_blocks", [(3, 5), (1, 1), (6, 2)])
def test_block_constant_keys_make_taylor_exact(t_blocks, c_blocks):
    """Keys equal inside each block: 0-th order Taylor is exact, so the sparse kernel alone is dense."""
    b, heads, dim = 64, 2, 64
    seq = (t_blocks + c_blocks) * b
    q, _, v = _qkv(1, seq, heads, dim, seed=4)
    block_keys = torch.randn(1, t_blocks + c_blocks, 1, heads, dim, dtype=torch.float64)
    k = block_keys.expand(-1, -1, b, -1, -1).reshape(1, seq, heads, dim)
    config = ISAConfig(select_ratio=1.0, flat_ratio=0.0)
    out = editing_sparse_attention(q, k, v, t_blocks * b, c_blocks * b, config=config)
    torch.testing.assert_close(out, _dense(q, k, v), rtol=1e-10, atol=1e-10)


def test_taylor_terms_matter_when_keys_vary():
    """The same setting with varying keys must differ from dense (the property test can fail)."""
    q, k, v = _qkv(1, 8 * 64, 2, 64, seed=5)
    out = editing_sparse_attention(q, k, v, 256, 256, config=ISAConfig(select_ratio=1.0, flat_ratio=0.0))
    assert _relative_l2(out, _dense(q, k, v)) > 1e-3


@pytest.mark.parametrize("t_len, c_len", [(100, 412), (64, 448), (30, 33), (500, 12), (128, 4000)])
def test_pruned_set_has_no_duplicate_or_padding_block(t_len, c_len):
    layout = BlockLayout(seq_len=t_len + c_len, target_len=t_len, block_size=64)
    probs = torch.softmax(torch.randn(2, 3, layout.num_blocks, layout.num_blocks), dim=-1)
    kv = select_context_blocks(probs, layout, 0.5)
    assert kv.shape[-1] == layout.num_kv_blocks(0.5)
    for row in kv.reshape(-1, kv.shape[-1]):
        ids = row.tolist()
        assert len(set(ids)) == len(ids) and ids == sorted(ids)
        assert set(range(layout.num_target_blocks)) <= set(ids)
        assert max(ids) < layout.num_blocks
        if layout.last_block_partial:
            assert layout.num_blocks - 1 in ids
        tokens = [t for j in ids for t in range(j * 64, min(layout.seq_len, (j + 1) * 64))]
        assert len(tokens) == layout.num_kv_tokens(0.5)


def test_straddling_block_tokens_appear_once_in_full_attention():
    """T = 100: block 1 holds target and source tokens; it must be kept whole, once."""
    t_len, c_len = 100, 924
    q, k, v = _qkv(1, t_len + c_len, 1, 32, seed=6)
    config = ISAConfig(select_ratio=0.25, flat_ratio=1.0)
    out = editing_sparse_attention(q, k, v, t_len, c_len, config=config)
    expected = naive_isa(q, k, v, t_len, c_len, None, select_ratio=0.25, flat_ratio=1.0)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
