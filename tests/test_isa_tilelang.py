"""Backend "tilelang" against the "torch" and "triton" backends.

CPU (no GPU needed): clear refusals; the host-side block tables obey the sparse kernel's
documented contract (checked by a float64 emulation of that contract against the torch
backend); and, when nvcc is on PATH, every kernel lowers and compiles to an sm_90a cubin.
The kernels take S, the block counts and E as runtime values, so one build per (kernel,
head dim, dtype) covers every length, partial last block and top-k count.

GPU (marker `gpu`): pooling and the sparse kernel alone, and the whole ISA, against the
torch backend (float64 / float32 references) and the Triton backend, in bf16, on random and
video-like inputs, S from 63 to 65,536; every output buffer is NaN-poisoned first. Measured
errors are attached to each test as junit properties
(`pytest -m gpu --junitxml=FILE -o junit_family=xunit1`).
"""
import math
import re
import shutil

import pytest
import torch

from in_context_sparse_attention import ISAConfig, editing_sparse_attention, reference, residual
from in_context_sparse_attention.backends import get_backend
from in_context_sparse_attention.layout import BlockLayout
from in_context_sparse_attention.residual import GatedShortcut
from in_context_sparse_attention.tilelang_backend import compiled_kernel, sparse_kernel_inputs
from isa_testing import (
    assert_within_precision,
    check_written_rows,
    make_qkv,
    max_abs,
    plan_for,
    poisoned_output,
    relative_l2,
    run_sparse,
    slice_heads,
    sparse_rows_mask,
    video_like_qkv,
)

BF16_ULP = 2.0**-7  # spacing of bf16 numbers in [1, 2)
TRITON_REL_L2_BOUND = BF16_ULP  # TileLang vs Triton, relative L2 over the written rows
TRITON_MAX_ABS_ULPS = 4.0  # TileLang vs Triton, max abs in bf16 ulps of the largest output


def emulate_sparse_kernel(q, k, v, inputs, layout, out):
    """The sparse kernel's contract (tilelang_kernels.build_sparse_attention), one program
    at a time in plain float64: exact keys of `exact_blocks` (cut at S) and Taylor terms
    (q . kbar_j, weight n_j, value vbar_j) for the blocks with taylor_counts > 0."""
    seq, dim, bs = q.shape[1], q.shape[-1], layout.block_size
    batch, heads, num_sparse = inputs["query_blocks"].shape
    for b in range(batch):
        for h in range(heads):
            for s in range(num_sparse):
                first = int(inputs["query_blocks"][b, h, s]) * bs
                rows = torch.arange(first, min(seq, first + bs))
                tokens = torch.cat(
                    [torch.arange(j * bs, min(seq, (j + 1) * bs)) for j in inputs["exact_blocks"][b, h, s].tolist()]
                )
                weights = inputs["taylor_counts"][b, h, s].double()  # [NKV]
                taylor = weights > 0
                queries = q[b, rows, h].double()  # [r, D]
                exact_logits = queries @ k[b, tokens, h].double().T / math.sqrt(dim)
                taylor_logits = queries @ inputs["key_means"][b, h, taylor].double().T / math.sqrt(dim)
                top = torch.cat([exact_logits, taylor_logits], dim=-1).amax(-1, keepdim=True)
                exact_w = (exact_logits - top).exp()
                taylor_w = (taylor_logits - top).exp() * weights[taylor]
                numerator = (
                    exact_w @ v[b, tokens, h].double() + taylor_w @ inputs["value_means"][b, h, taylor].double()
                )
                denominator = exact_w.sum(-1, keepdim=True) + taylor_w.sum(-1, keepdim=True)
                out[b, rows, h] = (numerator / denominator).to(out.dtype)


AWKWARD_SIZES = [
    # (T, C, B, H, D): T, C not multiples of 64; T < 64; a source with no full block;
    # a partial last block; batch 2; 3 heads; D 64 and 128
    (100, 90, 2, 3, 64),
    (40, 300, 1, 3, 128),
    (130, 50, 1, 2, 64),
    (128, 192, 1, 2, 64),
    (1, 62, 1, 1, 64),
]


@pytest.mark.parametrize("t_len, c_len, batch, heads, dim", AWKWARD_SIZES)
@pytest.mark.parametrize("sparsity", [0.0625, 0.25, 1.0])
def test_kernel_inputs_follow_the_kernel_contract(t_len, c_len, batch, heads, dim, sparsity):
    """Block tables and Taylor operands, read as the kernel reads them, give the torch
    backend's sparse result (float64), for several top-k counts E."""
    q, k, v = make_qkv(batch, t_len + c_len, heads, dim, torch.float64, seed=t_len)
    plan = plan_for(q, k, v, t_len, ISAConfig(select_ratio=0.5, sparsity=sparsity))
    inputs = sparse_kernel_inputs(plan, torch.float64)
    num_sparse, num_exact = plan.exact_positions.shape[-2:]
    assert (
        inputs["exact_blocks"].shape == (batch, heads, num_sparse, num_exact)
        and inputs["exact_blocks"].dtype == torch.int32
    )
    assert inputs["taylor_counts"].shape == (batch, heads, num_sparse, plan.kv_blocks.shape[-1])
    emulated = poisoned_output(q, plan.layout)
    emulate_sparse_kernel(q, k, v, inputs, plan.layout, emulated)
    want = run_sparse("torch", q, k, v, plan)
    rows = check_written_rows(emulated, plan)
    assert relative_l2(emulated[rows], want[rows]) < 1e-12


def test_cpu_tensors_are_refused_clearly():
    q, k, v = make_qkv(1, 80, 2, 64, torch.bfloat16)
    with pytest.raises(ValueError, match="the tilelang backend needs a CUDA GPU.*backend 'torch'"):
        editing_sparse_attention(q, k, v, 40, 40, backend="tilelang")


UNSUPPORTED = [
    (32, torch.bfloat16, ISAConfig(), r"head dims \(64, 128\), got 32"),
    (64, torch.float32, ISAConfig(), "dtypes float16, bfloat16, got torch.float32"),
    (64, torch.bfloat16, ISAConfig(block_size=32), r"block sizes \(64,\), got 32"),
]


@pytest.mark.parametrize("dim, dtype, config, message", UNSUPPORTED)
def test_unsupported_inputs_have_a_clear_reason(dim, dtype, config, message):
    limits_reason = get_backend("tilelang").limits_reason
    assert re.search(message, limits_reason(dim, dtype, config.block_size))
    assert limits_reason(128, torch.bfloat16, 64) is None


@pytest.mark.gpu
@pytest.mark.parametrize("dim, dtype, config, message", UNSUPPORTED)
def test_gpu_unsupported_inputs_are_refused_clearly(dim, dtype, config, message):
    q, k, v = make_qkv(1, 80, 2, dim, dtype, device="cuda")
    with pytest.raises(ValueError, match=message + ".*backend 'torch'"):
        editing_sparse_attention(q, k, v, 40, 40, config=config, backend="tilelang")


def _tilelang_importable() -> bool:
    try:
        import tilelang  # noqa: F401
    except ImportError:
        return False
    return True


needs_compiler = pytest.mark.skipif(
    shutil.which("nvcc") is None or not _tilelang_importable(),
    reason="building TileLang kernels needs nvcc on PATH and the tilelang package",
)

BUILDS = [
    ("pool", 64, "bfloat16"),
    ("pool", 128, "bfloat16"),
    ("sparse", 64, "bfloat16"),
    ("sparse", 128, "bfloat16"),
    ("sparse", 128, "float16"),
]
RUNTIME_SIZES = {
    "pool": ("batch", "seq_len", "heads", "num_blocks"),
    "sparse": ("seq_len", "num_sparse", "num_exact", "num_kv", "num_blocks", "padded_len"),
}


@needs_compiler
@pytest.mark.slow
@pytest.mark.parametrize("kind, dim, dtype", BUILDS)
def test_kernel_compiles_to_sm90a(kind, dim, dtype, monkeypatch):
    """Lowering and nvcc for sm_90a, with tilelang's disk cache off so that nvcc really
    runs; S, the block counts and E are runtime parameters of the one build, so partial
    last blocks and every top-k count use it."""
    monkeypatch.setenv("TILELANG_DISABLE_CACHE", "1")
    compiled_kernel.cache_clear()
    kernel = compiled_kernel(kind, dim, dtype, 64, "sm_90a")
    source = kernel.get_kernel_source()
    signature = source[source.index("__global__") : source.index("{")]
    for name in RUNTIME_SIZES[kind]:
        assert f"int {name}" in signature, f"{name} should be a runtime argument of the {kind} kernel"
    if kind == "sparse":
        assert "wgmma" in source, "the sparse kernel should use Hopper's wgmma"
    assert compiled_kernel(kind, dim, dtype, 64, "sm_90a") is kernel, "compiled kernels are cached per process"


def triton_available() -> bool:
    try:
        get_backend("triton")
    except ValueError:
        return False
    return True


def compare_with_triton(tilelang_out, triton_out, rows, record_property):
    """TileLang and Triton agree to within bf16 rounding on the written rows."""
    err = relative_l2(tilelang_out[rows], triton_out[rows])
    worst = max_abs(tilelang_out[rows], triton_out[rows])
    scale = triton_out[rows].abs().max().item()
    record_property("rel_l2_vs_triton", err)
    record_property("max_abs_vs_triton", worst)
    assert err <= TRITON_REL_L2_BOUND, err
    assert worst <= TRITON_MAX_ABS_ULPS * BF16_ULP * scale, (worst, scale)


GPU_CASES = [
    # (T, C, B, H, D): S = 63, 113, 1023, 2023, 7098, 5040, 65536
    (1, 62, 1, 2, 64),
    (33, 80, 2, 3, 128),
    (500, 523, 1, 3, 64),
    (1000, 1023, 2, 3, 64),
    (4097, 3001, 1, 5, 128),
    (40, 5000, 1, 4, 128),
    (32768, 32768, 1, 40, 128),
]
REFERENCE_HEADS = slice(0, 4)  # heads checked against float64 (all heads run)


@pytest.mark.gpu
@pytest.mark.parametrize("t_len, c_len, batch, heads, dim", GPU_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_pool_blocks(t_len, c_len, batch, heads, dim, dtype):
    if dtype == torch.float16 and t_len + c_len > 10_000:
        pytest.skip("float16 pooling is checked on the smaller cases")
    layout = BlockLayout(seq_len=t_len + c_len, target_len=t_len, block_size=64)
    x = make_qkv(batch, t_len + c_len, heads, dim, dtype, device="cuda", seed=c_len)[0]
    got = get_backend("tilelang").pool_blocks(x, layout)
    torch.testing.assert_close(got, reference.pool_blocks(x, layout), rtol=1e-5, atol=1e-5)
    if triton_available():
        torch.testing.assert_close(got, get_backend("triton").pool_blocks(x, layout), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("t_len, c_len, batch, heads, dim", GPU_CASES)
@pytest.mark.parametrize("inputs", ["random", "video"])
def test_gpu_sparse_kernel(t_len, c_len, batch, heads, dim, inputs, record_property):
    if inputs == "video" and t_len != 32768:
        pytest.skip("video-like inputs are built for the 65,536-token case")
    if inputs == "video":
        q, k, v = video_like_qkv(8, 64, 64, heads, dim, torch.bfloat16, "cuda")
    else:
        q, k, v = make_qkv(batch, t_len + c_len, heads, dim, torch.bfloat16, device="cuda", seed=t_len)
    plan = plan_for(q, k, v, t_len, ISAConfig())
    tilelang_out = run_sparse("tilelang", q, k, v, plan)
    rows = check_written_rows(tilelang_out, plan)
    if triton_available():
        compare_with_triton(tilelang_out, run_sparse("triton", q, k, v, plan), rows, record_property)
    part = slice_heads(plan, REFERENCE_HEADS)
    q, k, v = (x[:, :, REFERENCE_HEADS] for x in (q, k, v))
    reference_out = run_sparse("torch", q.double(), k.double(), v.double(), part)
    torch_out = run_sparse("torch", q, k, v, part)
    got = tilelang_out[:, :, REFERENCE_HEADS]
    assert_within_precision(got, torch_out, reference_out, sparse_rows_mask(part), 1e-3, record_property)


@pytest.mark.gpu
@pytest.mark.parametrize("logit_scale", [1.0, 4.0, 16.0])
@pytest.mark.parametrize("sparsity", [0.0625, 0.2, 1.0])
def test_gpu_sparse_kernel_rescales_everything_when_the_max_grows(logit_scale, sparsity, record_property):
    """Large logits make the running max jump between exact and Taylor tiles; a Taylor
    part left out of the rescaling would be off by orders of magnitude. sparsity 1.0
    makes every pruned block exact (no Taylor term left)."""
    q, k, v = make_qkv(1, 1337, 3, 128, torch.bfloat16, device="cuda", scale=logit_scale, seed=7)
    plan = plan_for(q, k, v, 600, ISAConfig(select_ratio=1.0, sparsity=sparsity, flat_ratio=0.0))
    tilelang_out = run_sparse("tilelang", q, k, v, plan)
    rows = check_written_rows(tilelang_out, plan)
    reference_out = run_sparse("torch", q.double(), k.double(), v.double(), plan)
    torch_out = run_sparse("torch", q, k, v, plan)
    assert_within_precision(tilelang_out, torch_out, reference_out, rows, 1e-3, record_property)


@pytest.mark.gpu
def test_gpu_taylor_term_is_exact_when_keys_are_constant_in_blocks(record_property):
    """Keys equal inside each block: with all source blocks kept and every query block on
    the sparse kernel, ISA equals dense attention (up to bf16 inputs)."""
    t_len, c_len, heads, dim = 1000, 1100, 4, 128
    q, k, v = make_qkv(1, t_len + c_len, heads, dim, torch.float64, device="cuda", seed=3)
    k = k[:, ::64].repeat_interleave(64, dim=1)[:, : t_len + c_len]
    q, k, v = (x.to(torch.bfloat16) for x in (q, k, v))
    config = ISAConfig(select_ratio=1.0, sparsity=0.2, flat_ratio=0.0)
    got = editing_sparse_attention(q, k, v, t_len, c_len, config=config, backend="tilelang")
    torch_out = editing_sparse_attention(q, k, v, t_len, c_len, config=config, backend="torch")
    logits = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(dim)
    dense = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(logits, dim=-1), v.double())
    every_row = torch.ones(got.shape[:3], dtype=torch.bool, device="cuda")
    assert_within_precision(got, torch_out, dense, every_row, 1e-3, record_property)


@pytest.mark.gpu
@pytest.mark.parametrize("t_len, c_len, batch, heads, dim", GPU_CASES[:-1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("alpha_kind", ["float", "per token"])
def test_gpu_fused_residual_matches_a_separate_pass(t_len, c_len, batch, heads, dim, dtype, alpha_kind):
    """The sparse kernel adds alpha * Oc[block(t)] to the rows it writes: the same as
    writing first and adding the residual in PyTorch afterwards, up to the separate
    pass's extra rounding; nothing else is written."""
    seq = t_len + c_len
    q, k, v = make_qkv(batch, seq, heads, dim, dtype, device="cuda", seed=seq)
    plan = plan_for(q, k, v, t_len, ISAConfig())
    alpha = 0.3 if alpha_kind == "float" else torch.rand(batch, seq, 1, 1, device="cuda") - 0.5
    backend = get_backend("tilelang")
    fused = poisoned_output(q, plan.layout)
    backend.sparse_block_attention(q, k, v, plan, fused, residual=GatedShortcut.of(plan, alpha, q.device))
    rows = check_written_rows(fused, plan)
    without_residual = run_sparse("tilelang", q, k, v, plan)
    separate = without_residual.clone()
    residual.add_residual(separate, plan, alpha)
    got, want, first = (x[rows].float() for x in (fused, separate, without_residual))
    assert ((got - want).abs() <= 1e-6 + 2.0**-7 * (want.abs() + first.abs())).all()
    assert ((got - first).abs().amax(dim=-1) > 1e-3).float().mean() > 0.9, "the residual was added"


@pytest.mark.gpu
@pytest.mark.parametrize("t_len, c_len, batch, heads, dim", GPU_CASES)
def test_gpu_end_to_end(t_len, c_len, batch, heads, dim, record_property):
    """The whole ISA in bf16 against the torch backend on the same inputs upcast to fp32,
    and against the Triton backend in bf16."""
    q, k, v = make_qkv(batch, t_len + c_len, heads, dim, torch.bfloat16, device="cuda", seed=c_len)
    alpha = (torch.rand(batch, t_len + c_len, 1, 1, device="cuda") - 0.5) * 0.5
    run = lambda backend, *qkv: editing_sparse_attention(*qkv, t_len, c_len, alpha=alpha, backend=backend)  # noqa: E731
    got = run("tilelang", q, k, v)
    assert got.shape == q.shape and got.dtype == q.dtype and got.isfinite().all()
    every_row = torch.ones(got.shape[:3], dtype=torch.bool, device="cuda")
    if triton_available():
        compare_with_triton(got, run("triton", q, k, v), every_row, record_property)
    assert_within_precision(
        got, run("torch", q, k, v), run("torch", q.float(), k.float(), v.float()), every_row, 1e-3, record_property
    )
