"""Backend "triton"'s plan builder (triton_selection.py) against `selection.make_plan`.

The plans must be equal field by field (same values, dtypes and shapes). Every tensor the
builder allocates is poisoned first (NaN, or -1 for indices), so an entry a kernel forgot
to write cannot match by chance. Without CUDA the kernels run on triton's CPU interpreter
(TRITON_INTERPRET=1, set by tests/conftest.py); with CUDA the same tests run compiled,
and the tests marked `gpu` add the 65,536- and 131,072-token sizes.
"""
import math

import pytest
import torch

from in_context_sparse_attention import ISAConfig, editing_sparse_attention, selection, triton_selection
from in_context_sparse_attention.layout import BlockLayout
from in_context_sparse_attention.triton_backend import TritonBackend, interpreting, pool_blocks
from isa_testing import make_qkv, video_like_qkv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(
    DEVICE == "cpu" and not interpreting(), reason="needs CUDA, or TRITON_INTERPRET=1 on the CPU"
)

PLAN_FIELDS = (
    "block_counts", "key_means", "value_sums", "compressed_out",
    "kv_blocks", "full_query_blocks", "sparse_query_blocks", "exact_positions",
)
LAYOUTS = [
    # (T, C, B, H, D)
    pytest.param(100, 90, 2, 3, 64, id="partial-last-block-kept"),
    pytest.param(40, 300, 1, 3, 128, id="T<64"),
    pytest.param(130, 50, 1, 2, 64, id="no-full-source-block"),
    pytest.param(128, 192, 1, 2, 64, id="aligned"),
    pytest.param(1, 63, 1, 1, 64, id="one-block"),
    pytest.param(3000, 3100, 2, 3, 128, id="several-rows-per-program"),  # NB = 96, nT = 46
]
CONFIGS = [
    pytest.param(ISAConfig(), id="defaults"),
    pytest.param(ISAConfig(select_ratio=0.5, sparsity=0.25, sharpness_ratio=0.5), id="busy"),
    pytest.param(ISAConfig(select_ratio=1.0, sparsity=1.0, flat_ratio=0.0), id="all-kept-all-sparse"),
    pytest.param(ISAConfig(select_ratio=1.0, sharpness_ratio=1.0, flat_ratio=1.0), id="all-full"),
]


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty filled with NaN (floating dtypes) or -1 (never a block id or position)."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        out = empty(*args, **kwargs)
        return out.fill_(math.nan if out.is_floating_point() else -1)

    monkeypatch.setattr(torch, "empty", poisoned)


def pooled_means(batch, heads, layout, dim, spread, seed=0):
    """Random pooled q, k, v [B, H, NB, D] fp32; spread 1/8 is what pooling 64 unit-normal
    tokens gives (P close to uniform, near-equal sharpness), larger spreads peak P."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return [(torch.randn(batch, heads, layout.num_blocks, dim, generator=gen) * spread).to(DEVICE) for _ in range(3)]


def assert_same_plan(got: selection.ISAPlan, want: selection.ISAPlan) -> None:
    for name in PLAN_FIELDS:
        a, b = getattr(got, name), getattr(want, name)
        assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, a.dtype, b.shape, b.dtype)
        assert torch.equal(a, b), name
    assert got.layout == want.layout


@needs_kernels
@pytest.mark.parametrize("spread", [0.125, 2.0])
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("t_len, c_len, batch, heads, dim", LAYOUTS)
def test_plan_matches_selection(t_len, c_len, batch, heads, dim, config, spread, poisoned_empty):
    layout = BlockLayout(seq_len=t_len + c_len, target_len=t_len, block_size=config.block_size)
    means = pooled_means(batch, heads, layout, dim, spread, seed=t_len)
    assert_same_plan(triton_selection.make_plan(*means, layout, config), selection.make_plan(*means, layout, config))


@needs_kernels
@pytest.mark.parametrize("sharpness_ratio", [0.0625, 0.5, 1.0])
def test_sharpness_is_bit_identical(sharpness_ratio, poisoned_empty):
    """The split is only exact if the sharpness is: neighbours in the order can be ~1 ulp apart."""
    layout = BlockLayout(seq_len=6100, target_len=3000, block_size=64)
    probs, _ = selection.compressed_attention(*pooled_means(2, 3, layout, 64, 0.125))
    got = triton_selection.query_sharpness(probs, layout, sharpness_ratio)
    num_cols, num_terms = layout.num_target_query_blocks, layout.num_sharpness_terms(sharpness_ratio)
    want = probs[..., :num_cols].sort(dim=-1, descending=True).values[..., :num_terms].sum(dim=-1)
    assert torch.equal(got, want)


@needs_kernels
def test_split_breaks_sharpness_ties_like_a_stable_sort(poisoned_empty):
    """Query blocks equal in pairs have equal sharpness; Nf = 5 of 10 cuts through a pair,
    and the lower block id must go to full attention first, as in a stable argsort."""
    layout = BlockLayout(seq_len=640, target_len=320, block_size=64)
    config = ISAConfig(flat_ratio=0.5)
    query_means, key_means, value_means = pooled_means(1, 3, layout, 64, 1.0)
    query_means = query_means[:, :, ::2].repeat_interleave(2, dim=2)
    probs, _ = selection.compressed_attention(query_means, key_means, value_means)
    sharpness = triton_selection.query_sharpness(probs, layout, config.sharpness_ratio)
    assert torch.equal(sharpness[..., ::2], sharpness[..., 1::2])  # the ties are there
    got = triton_selection.split_query_blocks(probs, layout, config)
    want = selection.split_query_blocks(probs, layout, config)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def assert_top_set(positions: torch.Tensor, values: torch.Tensor, count: int) -> None:
    """positions [..., count]: ascending, distinct, and holding `count` largest of values [..., N]."""
    assert positions.shape[-1] == count
    assert (positions.diff(dim=-1) > 0).all()
    chosen = torch.zeros_like(values, dtype=torch.bool).scatter_(-1, positions, True)
    lowest_chosen = values.masked_fill(~chosen, math.inf).amin(dim=-1)
    highest_other = values.masked_fill(chosen, -math.inf).amax(dim=-1)
    assert (lowest_chosen >= highest_other).all()


@needs_kernels
def test_tied_scores_still_give_top_sets(poisoned_empty):
    """Key blocks equal in pairs tie both the saliency and the block scores; ties may be
    broken either way, but each selection must still be a top set of the right size."""
    layout = BlockLayout(seq_len=2000, target_len=700, block_size=64)
    config = ISAConfig(select_ratio=0.5, sparsity=0.3, flat_ratio=0.25)
    query_means, key_means, value_means = pooled_means(2, 3, layout, 64, 1.0, seed=5)
    key_means = key_means[:, :, ::2].repeat_interleave(2, dim=2)[:, :, : layout.num_blocks]
    plan = triton_selection.make_plan(query_means, key_means, value_means, layout, config)
    probs, _ = selection.compressed_attention(query_means, key_means, value_means)

    first, end = layout.candidate_range
    saliency = probs[:, :, : layout.num_target_query_blocks, first:end].sum(dim=2)
    kv_blocks = plan.kv_blocks
    assert torch.equal(kv_blocks[..., :first], torch.arange(first, device=DEVICE).expand(2, 3, -1))
    assert (kv_blocks[..., -1] == layout.num_blocks - 1).all() and layout.extra_last_block
    assert_top_set(kv_blocks[..., first:-1] - first, saliency, layout.num_selected(config.select_ratio))

    dim = query_means.shape[-1]
    qbar = torch.gather(query_means, 2, plan.sparse_query_blocks[..., None].expand(-1, -1, -1, dim))
    kbar = torch.gather(key_means, 2, kv_blocks[..., None].expand(-1, -1, -1, dim))
    scores = qbar @ kbar.transpose(-1, -2)
    assert (scores[..., ::2] == scores[..., 1::2]).any()  # the ties are there
    assert_top_set(plan.exact_positions, scores, layout.num_exact_blocks(config.sparsity, config.select_ratio))


@needs_kernels
def test_attention_uses_the_backend_plan_builder(monkeypatch):
    calls = []

    def spy(*args):
        calls.append(args[3])
        return triton_selection.make_plan(*args)

    monkeypatch.setattr(TritonBackend, "make_plan", staticmethod(spy))
    q, k, v = make_qkv(1, 200, 2, 64, torch.float32, device=DEVICE)
    editing_sparse_attention(q, k, v, 120, 80, backend="triton")
    assert [layout.seq_len for layout in calls] == [200]


@pytest.mark.gpu
@pytest.mark.parametrize("seq_len, inputs", [(65536, "random"), (65536, "video"), (131072, "random")])
def test_gpu_plan_matches_selection_at_scale(seq_len, inputs):
    heads, dim = 40, 128
    layout = BlockLayout(seq_len=seq_len, target_len=seq_len // 2, block_size=64)
    if inputs == "video":
        qkv = video_like_qkv(8, 64, 64, heads, dim, torch.bfloat16, "cuda")
    else:
        qkv = make_qkv(1, seq_len, heads, dim, torch.bfloat16, device="cuda", seed=seq_len)
    means = [pool_blocks(x, layout) for x in qkv]
    del qkv
    config = ISAConfig()
    assert_same_plan(triton_selection.make_plan(*means, layout, config), selection.make_plan(*means, layout, config))
