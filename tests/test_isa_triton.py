"""Backend "triton" against backend "torch".

Without CUDA the kernels run on triton's CPU interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py before any kernel is defined), on awkward sizes small enough for it. Tests marked
`gpu` run the compiled kernels up to 65,536 tokens. Every output buffer is NaN-poisoned
first, so a row the kernel forgot to write (or wrote but should not have) shows.
"""
import math

import pytest
import torch

from in_context_sparse_attention import ISAConfig, editing_sparse_attention, full_attention, reference
from in_context_sparse_attention.backends import get_backend
from in_context_sparse_attention.layout import BlockLayout
from in_context_sparse_attention.triton_backend import interpreting
from isa_testing import (
    assert_within_precision,
    check_written_rows,
    make_qkv,
    plan_for,
    relative_l2,
    run_sparse,
    slice_heads,
    sparse_rows_mask,
    video_like_qkv,
)

needs_interpreter = pytest.mark.skipif(not interpreting(), reason="CPU interpreter tests need TRITON_INTERPRET=1")


AWKWARD_SIZES = [
    # (T, C, B, H, D): T, C not multiples of 64; T < 64; a source with no full block;
    # a partial last block; batch 2; 3 heads; D 64 and 128
    (100, 90, 2, 3, 64),
    (40, 300, 1, 3, 128),
    (130, 50, 1, 2, 64),
    (128, 192, 1, 2, 64),
    (1, 63, 1, 1, 64),
]


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seq, non_contiguous", [(1, False), (63, True), (65, False), (113, True), (256, False)])
@pytest.mark.parametrize("heads, block_size", [(3, 64), (11, 32)])  # 11 heads: a full and a partial group of 8
def test_pool_blocks_matches_torch(seq, non_contiguous, dtype, heads, block_size):
    layout = BlockLayout(seq_len=seq, target_len=max(1, seq // 3), block_size=block_size)
    x = make_qkv(2, seq, heads, 64, dtype, non_contiguous=non_contiguous)[0]
    got = get_backend("triton").pool_blocks(x, layout)
    want = reference.pool_blocks(x, layout)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def check_block_copies(q, k, v, t_len, config):
    """The Triton gather and scatter against the PyTorch ones, for the plan's query and key/value blocks."""
    triton_backend = get_backend("triton")
    plan = plan_for(q, k, v, t_len, config)
    layout = plan.layout
    seq = layout.seq_len
    for x, blocks, num_tokens in (
        (q, plan.full_query_blocks, plan.full_query_blocks.shape[-1] * layout.block_size),
        (k, plan.kv_blocks, layout.real_tokens_in(plan.kv_blocks.shape[-1])),
    ):
        got = triton_backend.gather_blocks(x, blocks, layout.block_size, num_tokens)
        want = full_attention.gather_blocks(x, blocks, layout.block_size, num_tokens)
        assert got.shape == want.shape == (x.shape[0], x.shape[2], num_tokens, x.shape[3])
        real = full_attention.block_token_ids(blocks, layout.block_size)[..., :num_tokens] < seq  # [B, H, L]
        assert torch.equal(got[real], want[real])
        assert (got[~real] == 0).all(), "tokens past S read as 0"
    blocks = plan.full_query_blocks
    rows = torch.randn(q.shape[0], q.shape[2], blocks.shape[-1] * layout.block_size, q.shape[3]).to(q.dtype)
    got, want = (
        torch.full((q.shape[0], layout.padded_len, q.shape[2], q.shape[3]), math.nan, dtype=q.dtype) for _ in range(2)
    )
    triton_backend.scatter_blocks(rows, blocks, got)
    full_attention.scatter_blocks(rows, blocks, want)
    assert torch.equal(got.isnan(), want.isnan()), "the same rows are written"
    assert torch.equal(got.nan_to_num(), want.nan_to_num())
    strided_rows = rows.transpose(1, 2).contiguous().transpose(1, 2)  # the layout FlashAttention returns
    triton_backend.scatter_blocks(strided_rows, blocks, got)
    assert torch.equal(got.nan_to_num(), want.nan_to_num())


@needs_interpreter
@pytest.mark.parametrize("t_len, c_len, batch, heads, dim", AWKWARD_SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_copies_match_torch(t_len, c_len, batch, heads, dim, dtype):
    q, k, v = make_qkv(batch, t_len + c_len, heads, dim, dtype, non_contiguous=(dim == 64), seed=t_len)
    check_block_copies(q, k, v, t_len, ISAConfig(select_ratio=0.5))


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("alpha_kind", ["float", "tensor"])
def test_fused_residual_matches_a_separate_pass(dtype, alpha_kind):
    """The scatter and the sparse kernel add alpha * Oc[block(t)] as they write; the same
    rows as writing first and adding the residual in PyTorch afterwards (a partial last
    block, two batches). bf16: the fused sum is rounded once, the separate pass twice, so
    they may differ by the first rounding (an ulp of the attention output) and the last."""
    from in_context_sparse_attention.residual import GatedShortcut, add_residual

    t_len, c_len = 100, 90
    q, k, v = make_qkv(2, t_len + c_len, 3, 64, dtype, seed=11)
    plan = plan_for(q, k, v, t_len, ISAConfig(select_ratio=0.5, sparsity=0.25))
    alpha = 0.3 if alpha_kind == "float" else torch.rand(2, t_len + c_len, 1, 1) - 0.5
    residual = GatedShortcut.of(plan, alpha, q.device)
    backend = get_backend("triton")
    blocks = plan.full_query_blocks
    dense_rows = torch.randn(2, 3, blocks.shape[-1] * plan.layout.block_size, 64).to(dtype)
    fused, separate = (torch.full((2, plan.layout.padded_len, 3, 64), math.nan, dtype=dtype) for _ in range(2))
    backend.scatter_blocks(dense_rows, blocks, fused, residual=residual)
    backend.sparse_block_attention(q, k, v, plan, fused, residual=residual)
    backend.scatter_blocks(dense_rows, blocks, separate)
    backend.sparse_block_attention(q, k, v, plan, separate)
    without_residual = separate.clone()
    add_residual(separate, plan, alpha)
    real = slice(0, t_len + c_len)
    assert fused[:, real].isfinite().all(), "every real row is written"
    ulp = 0.0 if dtype == torch.float32 else 2.0**-7  # the separate pass rounds the attention output first
    got, want, first = (x[:, real].float() for x in (fused, separate, without_residual))
    assert ((got - want).abs() <= 1e-6 + ulp * (want.abs() + first.abs())).all()
    added = (fused[:, real] - without_residual[:, real]).abs().amax(dim=(2, 3))  # [B, S]: per token
    assert (added > 1e-3).float().mean() > 0.9, "the residual reaches the rows of both writers"


@needs_interpreter
def test_block_copies_with_block_size_32():
    q, k, v = make_qkv(1, 150, 2, 64, torch.float32, seed=3)
    check_block_copies(q, k, v, 70, ISAConfig(block_size=32, select_ratio=0.5))


@needs_interpreter
@pytest.mark.parametrize("t_len, c_len, batch, heads, dim", AWKWARD_SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_kernel_matches_torch(t_len, c_len, batch, heads, dim, dtype):
    q, k, v = make_qkv(batch, t_len + c_len, heads, dim, dtype, non_contiguous=(dim == 64), seed=t_len)
    plan = plan_for(q, k, v, t_len, ISAConfig(select_ratio=0.5, sparsity=0.25))
    triton_out = run_sparse("triton", q, k, v, plan)
    rows = check_written_rows(triton_out, plan)
    reference_out = run_sparse("torch", q.double(), k.double(), v.double(), plan)
    if dtype == torch.float32:
        assert relative_l2(triton_out[rows], reference_out[rows]) < 1e-5
    else:
        torch_out = run_sparse("torch", q, k, v, plan)
        assert_within_precision(triton_out, torch_out, reference_out, rows, floor=1e-3)


@needs_interpreter
def test_sparse_kernel_reads_packed_qkv_in_place():
    """q, k, v as views of one packed [B, S, 3, H, D] projection have (H, D) contiguous,
    so the kernel's tensor descriptors read them in place, with the same result as
    contiguous copies (two batches, each with a partial last block)."""
    from in_context_sparse_attention.triton_backend import _token_descriptor

    gen = torch.Generator().manual_seed(7)
    packed = torch.randn(2, 150, 3, 2, 64, generator=gen).to(torch.bfloat16)
    q, k, v = packed.unbind(2)
    assert all(_token_descriptor(x, 64).base is x for x in (q, k, v))
    plan = plan_for(q, k, v, 70, ISAConfig(select_ratio=1.0, sparsity=0.5, flat_ratio=0.0))
    in_place = run_sparse("triton", q, k, v, plan)
    rows = check_written_rows(in_place, plan)
    copied = run_sparse("triton", q.contiguous(), k.contiguous(), v.contiguous(), plan)
    assert torch.equal(in_place[rows], copied[rows])
    torch_out = run_sparse("torch", q, k, v, plan)
    reference_out = run_sparse("torch", q.double(), k.double(), v.double(), plan)
    assert_within_precision(in_place, torch_out, reference_out, rows, floor=1e-3)


@needs_interpreter
def test_sparse_kernel_ignores_the_stride_of_a_size_one_batch():
    """PyTorch leaves the stride of a size-1 axis arbitrary (here 1 element, which no
    tensor descriptor accepts): the tensor is still read in place, with the same result."""
    from in_context_sparse_attention.triton_backend import _token_descriptor

    q, k, v = make_qkv(1, 150, 2, 64, torch.float32, seed=5)
    odd = [x.as_strided(x.shape, (1, *x.stride()[1:])) for x in (q, k, v)]
    assert all(x.is_contiguous() and _token_descriptor(x, 64).base is x for x in odd)
    plan = plan_for(q, k, v, 70, ISAConfig(select_ratio=1.0, sparsity=0.5))
    assert torch.equal(run_sparse("triton", *odd, plan).nan_to_num(), run_sparse("triton", q, k, v, plan).nan_to_num())


@needs_interpreter
@pytest.mark.parametrize("logit_scale", [1.0, 4.0, 16.0])
def test_sparse_kernel_rescales_everything_when_the_max_grows(logit_scale):
    """Large logits make the running max jump between the Taylor and the exact tiles;
    a Taylor part that missed the rescaling would be off by orders of magnitude."""
    q, k, v = make_qkv(1, 320, 2, 64, torch.float32, scale=logit_scale, seed=7)
    plan = plan_for(q, k, v, 160, ISAConfig(select_ratio=1.0, sparsity=0.2, flat_ratio=0.0))
    triton_out = run_sparse("triton", q, k, v, plan)
    rows = check_written_rows(triton_out, plan)
    reference_out = run_sparse("torch", q.double(), k.double(), v.double(), plan)
    assert relative_l2(triton_out[rows], reference_out[rows]) < 1e-5


@needs_interpreter
@pytest.mark.parametrize(
    "t_len, c_len, alpha_kind, non_contiguous",
    [(100, 90, "none", False), (40, 300, "float", True), (130, 50, "tensor", False), (200, 13, "tensor", True)],
)
def test_end_to_end_matches_torch(t_len, c_len, alpha_kind, non_contiguous):
    q, k, v = make_qkv(2, t_len + c_len, 3, 64, torch.float32, non_contiguous=non_contiguous, seed=c_len)
    alpha = {"none": None, "float": 0.3, "tensor": torch.rand(2, t_len + c_len, 1, 1) - 0.5}[alpha_kind]
    config = ISAConfig(select_ratio=0.5)
    got = editing_sparse_attention(q, k, v, t_len, c_len, alpha=alpha, config=config, backend="triton")
    want = editing_sparse_attention(q, k, v, t_len, c_len, alpha=alpha, config=config, backend="torch")
    assert got.shape == q.shape and got.dtype == q.dtype
    assert relative_l2(got, want) < 1e-5


@needs_interpreter
def test_taylor_term_is_exact_when_keys_are_constant_in_blocks():
    """Keys equal inside each block: every block's mean key is its keys, so ISA with all
    source blocks kept and every query block on the sparse kernel equals dense attention."""
    batch, t_len, c_len, heads, dim = 1, 128, 192, 2, 64
    q, k, v = make_qkv(batch, t_len + c_len, heads, dim, torch.float64, seed=3)
    block_keys = k[:, ::64]  # [B, NB, H, D]
    k = block_keys.repeat_interleave(64, dim=1)
    config = ISAConfig(select_ratio=1.0, sparsity=0.2, flat_ratio=0.0)
    got = editing_sparse_attention(q.float(), k.float(), v.float(), t_len, c_len, config=config, backend="triton")
    dense = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dim), dim=-1)
    want = torch.einsum("bhqk,bkhd->bqhd", dense, v)
    assert relative_l2(got, want) < 1e-5


def test_unsupported_head_dim_is_refused():
    q, k, v = make_qkv(1, 80, 2, 32, torch.float32)
    with pytest.raises(ValueError, match=r"head dims \(64, 128\)"):
        editing_sparse_attention(q, k, v, 40, 40, backend="triton")


def test_unsupported_dtype_is_refused():
    q, k, v = make_qkv(1, 80, 2, 64, torch.float64)
    with pytest.raises(ValueError, match="supports dtypes"):
        editing_sparse_attention(q, k, v, 40, 40, backend="triton")


def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = make_qkv(1, 80, 2, 64, torch.float32)
    with pytest.raises(ValueError, match=r"backend='torch'.*TRITON_INTERPRET=1"):
        editing_sparse_attention(q, k, v, 40, 40, backend="triton")


GPU_CASES = [
    # (T, C, B, H, D)
    (32768, 32768, 1, 40, 128),
    (1000, 1023, 2, 3, 64),
    (4097, 3001, 1, 5, 128),
    (40, 5000, 1, 4, 128),
]
REFERENCE_HEADS = slice(0, 4)  # heads checked against float64 (all heads run)


@pytest.mark.gpu
@pytest.mark.parametrize("t_len, c_len, batch, heads, dim", GPU_CASES)
@pytest.mark.parametrize("inputs", ["random", "video"])
def test_gpu_sparse_kernel_within_bf16_precision(t_len, c_len, batch, heads, dim, inputs):
    if inputs == "video" and (batch, t_len) != (1, 32768):
        pytest.skip("video-like inputs are built for the 65,536-token case")
    if inputs == "video":
        q, k, v = video_like_qkv(8, 64, 64, heads, dim, torch.bfloat16, "cuda")
    else:
        q, k, v = make_qkv(batch, t_len + c_len, heads, dim, torch.bfloat16, device="cuda", seed=t_len)
    plan = plan_for(q, k, v, t_len, ISAConfig())
    triton_out = run_sparse("triton", q, k, v, plan)
    check_written_rows(triton_out, plan)
    part = slice_heads(plan, REFERENCE_HEADS)
    q, k, v = (x[:, :, REFERENCE_HEADS] for x in (q, k, v))
    reference_out = run_sparse("torch", q.double(), k.double(), v.double(), part)
    torch_out = run_sparse("torch", q, k, v, part)
    assert_within_precision(
        triton_out[:, :, REFERENCE_HEADS], torch_out, reference_out, sparse_rows_mask(part), floor=1e-3
    )


@pytest.mark.gpu
@pytest.mark.parametrize("t_len, c_len, batch, heads, dim", GPU_CASES)
def test_gpu_pool_blocks_matches_torch(t_len, c_len, batch, heads, dim):
    layout = BlockLayout(seq_len=t_len + c_len, target_len=t_len, block_size=64)
    x = make_qkv(batch, t_len + c_len, heads, dim, torch.bfloat16, device="cuda", non_contiguous=True)[0]
    torch.testing.assert_close(
        get_backend("triton").pool_blocks(x, layout), reference.pool_blocks(x, layout), rtol=1e-5, atol=1e-5
    )


@pytest.mark.gpu
@pytest.mark.parametrize("t_len, c_len, batch, heads, dim", GPU_CASES)
def test_gpu_end_to_end_within_bf16_precision(t_len, c_len, batch, heads, dim):
    """Both backends in bf16 against the torch backend on the same inputs upcast to fp32
    (same block decisions, fp32 arithmetic throughout)."""
    q, k, v = make_qkv(batch, t_len + c_len, heads, dim, torch.bfloat16, device="cuda", seed=c_len)
    alpha = (torch.rand(batch, t_len + c_len, 1, 1, device="cuda") - 0.5) * 0.5
    run = lambda backend, *qkv: editing_sparse_attention(*qkv, t_len, c_len, alpha=alpha, backend=backend)  # noqa: E731
    triton_out = run("triton", q, k, v)
    assert not triton_out.isnan().any()
    reference_out = run("torch", q.float(), k.float(), v.float())
    torch_out = run("torch", q, k, v)
    every_row = torch.ones(triton_out.shape[:3], dtype=torch.bool, device="cuda")
    assert_within_precision(triton_out, torch_out, reference_out, every_row, floor=1e-3)


def test_residual_flag_is_derived_from_the_arguments():
    """HAS_RESIDUAL comes from whether the residual's tensors are passed (None when absent),
    so a launch cannot pass one without the other, nor claim a residual it lacks."""
    from in_context_sparse_attention.triton_kernels import _has_residual

    tensor = torch.zeros(1)
    assert _has_residual({"shortcut_ptr": tensor, "gate_ptr": tensor}) is True
    assert _has_residual({"shortcut_ptr": None, "gate_ptr": None}) is False
    for half in ({"shortcut_ptr": tensor, "gate_ptr": None}, {"shortcut_ptr": None, "gate_ptr": tensor}):
        with pytest.raises(ValueError, match="both shortcut_ptr and gate_ptr, or neither"):
            _has_residual(half)
