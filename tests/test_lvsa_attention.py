"""LVSA attention: the PyTorch reference against independent float64 attention, the
FlexAttention block masks against `create_block_mask`, the FlexAttention path against
the reference (eager and compiled on the CPU, compiled on CUDA), and on CUDA the "gather"
backend too (FlashAttention-3 underneath; its CPU tests are in test_lvsa_gather.py)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask

from long_video_sparse_attention import (
    LVSAConfig,
    block_structure,
    cached_block_mask,
    cached_gather_plan,
    flex_lvsa_attention,
    gather_lvsa_attention,
    lvsa_attention,
    lvsa_attention_reference,
    lvsa_block_mask,
    lvsa_frame_mask,
)

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

DEFAULTS = LVSAConfig()


def _packed_qkv(batch, num_frames, tokens_per_frame, heads, dim, dtype, seed=0, parts=2, device="cpu"):
    """q, k, v [B, S, H, D] as slices of one packed [B, S + 256, 3, H, D] buffer whose rows past S
    are NaN: a kernel that reads past the sequence, or mixes the three up, returns NaN."""
    seq = parts * num_frames * tokens_per_frame
    generator = torch.Generator().manual_seed(seed)
    packed = torch.full((batch, seq + 256, 3, heads, dim), float("nan"), dtype=torch.float64)
    packed[:, :seq] = torch.randn(batch, seq, 3, heads, dim, generator=generator, dtype=torch.float64)
    return packed.to(device=device, dtype=dtype)[:, :seq].unbind(dim=2)


def _independent_attention(q, k, v, frame_mask, tokens_per_frame, parts=2):
    """float64 masked softmax written without the package's token layout: the mask is built by
    repeating every frame index tokens_per_frame times, once per part."""
    num_frames = frame_mask.shape[0]
    frames = torch.arange(num_frames).repeat_interleave(tokens_per_frame).repeat(parts).to(q.device)
    allowed = frame_mask.to(q.device)[frames][:, frames]  # [S, S]
    q64, k64, v64 = (x.to(torch.float64) for x in (q, k, v))
    scores = torch.einsum("bshd,bthd->bhst", q64, k64) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhst,bthd->bshd", scores.softmax(dim=-1), v64)


def _relative_l2(actual, expected):
    actual, expected = actual.to(torch.float64), expected.to(torch.float64)
    return float((actual - expected).norm() / expected.norm())


def test_reference_equals_dense_attention_when_the_mask_is_all_true():
    q, k, v = _packed_qkv(2, 21, 5, 3, 16, torch.float64)
    frame_mask = lvsa_frame_mask(21, 3, DEFAULTS)
    assert frame_mask.all()  # 21 frames: dense
    dense = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    torch.testing.assert_close(lvsa_attention_reference(q, k, v, frame_mask, 5), dense, rtol=0, atol=1e-12)
    torch.testing.assert_close(lvsa_attention(q, k, v, 21, 5, 3, backend="torch"), dense, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "num_frames, tokens_per_frame, step, config, parts",
    [
        (22, 35, 0, DEFAULTS, 2),  # frames of 7 x 5 tokens
        (22, 35, 1, DEFAULTS, 2),
        (41, 6, 2, DEFAULTS, 2),
        (30, 7, 0, LVSAConfig(window=1, first_frames=2), 2),
        (25, 9, 4, LVSAConfig(window=0), 2),
        (33, 8, 1, LVSAConfig(keyframe_interval=5), 1),  # a plain video: one part
    ],
)
def test_reference_equals_independent_float64_attention(num_frames, tokens_per_frame, step, config, parts):
    q, k, v = _packed_qkv(2, num_frames, tokens_per_frame, 2, 32, torch.float64, parts=parts)
    frame_mask = lvsa_frame_mask(num_frames, step, config)
    assert not frame_mask.all()
    expected = _independent_attention(q, k, v, frame_mask, tokens_per_frame, parts)
    out = lvsa_attention_reference(q, k, v, frame_mask, tokens_per_frame, parts)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    out = lvsa_attention(q, k, v, num_frames, tokens_per_frame, step, config, backend="torch", parts=parts)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    dense = _independent_attention(q, k, v, torch.ones_like(frame_mask), tokens_per_frame, parts)
    assert (out - dense).abs().max() > 1e-2  # the mask matters at these sizes


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3), (torch.float32, 1e-6)])
def test_reference_in_lower_precision(dtype, tolerance):
    q, k, v = _packed_qkv(1, 22, 35, 2, 64, dtype)
    frame_mask = lvsa_frame_mask(22, 1, DEFAULTS)
    out = lvsa_attention_reference(q, k, v, frame_mask, 35)
    assert out.dtype == dtype
    assert _relative_l2(out, _independent_attention(q, k, v, frame_mask, 35)) < tolerance


def _tiles(counts: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """[1, 1, NB] counts and [1, 1, NB, NB] indices -> bool [NB, NB]."""
    counts, indices = counts[0, 0].cpu(), indices[0, 0].cpu()
    tiles = torch.zeros(indices.shape, dtype=torch.bool)
    for row in range(indices.shape[0]):
        tiles[row, indices[row, : counts[row]].long()] = True
    return tiles


@pytest.mark.parametrize(
    "num_frames, tokens_per_frame, parts, step, config",
    [
        (22, 35, 2, 0, DEFAULTS),
        (22, 35, 2, 1, DEFAULTS),
        (41, 6, 2, 0, DEFAULTS),  # many frames in one tile
        (8, 128, 2, 1, LVSAConfig(window=1, keyframe_interval=3)),  # frames aligned with the tiles
        (30, 200, 1, 2, LVSAConfig(window=2)),  # frames longer than a tile
    ],
)
def test_block_mask_equals_create_block_mask(num_frames, tokens_per_frame, parts, step, config):
    frame_mask = lvsa_frame_mask(num_frames, step, config)
    frames = torch.arange(num_frames).repeat_interleave(tokens_per_frame).repeat(parts)
    seq = frames.numel()

    def token_mask_mod(batch, head, q_idx, kv_idx):
        return frame_mask[frames[q_idx], frames[kv_idx]]

    expected = create_block_mask(token_mask_mod, None, None, seq, seq, device="cpu", BLOCK_SIZE=128)
    block_mask = lvsa_block_mask(frame_mask, tokens_per_frame, parts)
    assert block_mask.seq_lengths == (seq, seq)
    full = _tiles(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    partial = _tiles(block_mask.kv_num_blocks, block_mask.kv_indices)
    assert torch.equal(full, _tiles(expected.full_kv_num_blocks, expected.full_kv_indices))
    assert torch.equal(partial, _tiles(expected.kv_num_blocks, expected.kv_indices))
    structure = block_structure(frame_mask, tokens_per_frame, parts)
    assert torch.equal(structure.full, full) and torch.equal(structure.partial, partial)
    assert not (full & partial).any()


@pytest.mark.parametrize("step", [0, 1])
def test_flex_eager_equals_the_reference(step):
    # frames of 7 x 5 = 35 tokens: almost every 128-token tile boundary falls inside a frame
    q, k, v = _packed_qkv(2, 22, 35, 3, 64, torch.float32)
    frame_mask = lvsa_frame_mask(22, step, DEFAULTS)
    out = flex_lvsa_attention(q, k, v, lvsa_block_mask(frame_mask, 35), compiled=False)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), _independent_attention(q, k, v, frame_mask, 35), rtol=0, atol=2e-6)


@pytest.mark.slow
def test_flex_compiled_on_the_cpu_equals_the_reference():
    # compiles a FlexAttention CPU kernel: about 10 to 40 s the first time on two cores
    q, k, v = _packed_qkv(2, 22, 35, 3, 64, torch.float32)
    out = lvsa_attention(q, k, v, 22, 35, 1, DEFAULTS, backend="flex")
    assert torch.isfinite(out).all()
    expected = _independent_attention(q, k, v, lvsa_frame_mask(22, 1, DEFAULTS), 35)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-6)


def test_block_masks_are_cached_per_keyframe_offset():
    device = torch.device("cpu")
    first = cached_block_mask(41, 35, 2, 0, DEFAULTS, device)  # kfi 3
    assert cached_block_mask(41, 35, 2, 3, DEFAULTS, device) is first
    assert cached_block_mask(41, 35, 2, 1, DEFAULTS, device) is not first
    assert cached_block_mask(41, 35, 1, 0, DEFAULTS, device) is not first
    fixed = LVSAConfig(rotate=False)
    assert cached_block_mask(41, 35, 2, 1, fixed, device) is cached_block_mask(41, 35, 2, 0, fixed, device)


def _call(q=None, k=None, v=None, num_frames=4, tokens_per_frame=3, step=0, **kwargs):
    base = [torch.randn(1, 24, 2, 16) for _ in range(3)]
    q, k, v = (given if given is not None else default for given, default in zip((q, k, v), base))
    return lvsa_attention(q, k, v, num_frames, tokens_per_frame, step, **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(q=torch.randn(24, 2, 16)), ValueError, r"q must have shape \[B, S, H, D\] \(4 dims\), got 3"),
        (dict(k=torch.randn(1, 24, 2, 8)), ValueError, "q, k and v must have the same shape"),
        (dict(v=torch.randn(1, 24, 2, 16, dtype=torch.float16)), ValueError, "q, k and v must have the same dtype"),
        (dict(k=torch.randn(1, 24, 2, 16, device="meta")), ValueError, "q, k and v must be on the same device"),
        (dict(q=torch.ones(1, 24, 2, 16, dtype=torch.int32)), ValueError, "q must be one of float16, bfloat16"),
        (dict(q=torch.randn(1, 24, 2, 16, dtype=torch.float64)), ValueError, "float64: backend 'torch'"),
        (dict(q=[[1.0]]), TypeError, "q must be a torch.Tensor"),
        (dict(q=torch.randn(1, 24, 0, 16), k=torch.randn(1, 24, 0, 16), v=torch.randn(1, 24, 0, 16)),
         ValueError, "must not be empty"),
        (dict(num_frames=5), ValueError, r"S = q.shape\[1\] must equal .* 2 \* 5 \* 3 = 30, got 24"),
        (dict(parts=1), ValueError, r"1 \* 4 \* 3 = 12, got 24"),
        (dict(num_frames=0), ValueError, "num_frames must be a positive int, got 0"),
        (dict(tokens_per_frame=3.0), ValueError, "tokens_per_frame must be a positive int, got 3.0"),
        (dict(parts=0), ValueError, "parts must be a positive int"),
        (dict(step=-1), ValueError, "step must be an int >= 0"),
        (dict(backend="cuda"), ValueError, "backend must be one of 'flex', 'torch', 'gather', got 'cuda'"),
        (dict(config={"window": 3}), TypeError, "config must be an LVSAConfig"),
        (dict(backend="torch", kernel_options={"BLOCK_M": 64}), ValueError, "kernel_options must be None, a dict"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        _call(**kwargs)


def test_reference_refuses_a_mismatched_sequence_and_an_empty_row():
    q = torch.randn(1, 24, 2, 16)
    with pytest.raises(ValueError, match=r"S = parts \* F \* tokens_per_frame = 2 \* 4 \* 4 = 32"):
        lvsa_attention_reference(q, q, q, torch.ones(4, 4, dtype=torch.bool), 4)
    empty_row = torch.ones(4, 4, dtype=torch.bool)
    empty_row[2] = False
    with pytest.raises(ValueError, match="every query frame at least one key frame"):
        lvsa_attention_reference(q, q, q, empty_row, 3)


def _check_on_cuda(backend, num_frames, tokens_per_frame, heads, dim, step, config, dtype):
    """The backend's error against a float64 oracle is at most twice the error of the PyTorch
    reference at the same precision (which rounds its output to `dtype`), plus a small floor:
    a bound that scales with the dtype instead of a hand-picked tolerance per dtype. The
    "gather" backend writes into a NaN-filled output, so that a row it never writes fails."""
    q, k, v = _packed_qkv(2, num_frames, tokens_per_frame, heads, dim, dtype, device="cuda")
    if backend == "gather":
        plan = cached_gather_plan(num_frames, 2, step, config)
        out = gather_lvsa_attention(q, k, v, plan, out=torch.full_like(q, float("nan")))
    else:
        out = lvsa_attention(q, k, v, num_frames, tokens_per_frame, step, config, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype and torch.isfinite(out).all()
    frame_mask = lvsa_frame_mask(num_frames, step, config)
    reference = lvsa_attention_reference(q, k, v, frame_mask, tokens_per_frame)
    exact = _independent_attention(q, k, v, frame_mask, tokens_per_frame)
    reference_error = _relative_l2(reference, exact)
    assert reference_error < 8 * torch.finfo(dtype).eps  # the reference itself: about one rounding to dtype
    assert _relative_l2(out, exact) <= 2 * reference_error + 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flex", "gather"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_on_cuda_equals_the_reference_in_every_dtype(backend, dtype):
    _check_on_cuda(backend, 22, 35, 3, 64, 1, DEFAULTS, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flex", "gather"])
@pytest.mark.parametrize(
    "num_frames, tokens_per_frame, heads, dim, step, config",
    [
        (41, 130, 2, 128, 2, DEFAULTS),
        (81, 48, 2, 128, 0, DEFAULTS),
        (5, 2040, 1, 128, 1, LVSAConfig(window=1, keyframe_interval=3)),  # Wan's 2,040 tokens per frame at 544x960
        (21, 96, 2, 128, 1, DEFAULTS),  # dense: one dense call for "gather"
    ],
)
def test_on_cuda_equals_the_reference_at_larger_sizes(backend, num_frames, tokens_per_frame, heads, dim, step, config):
    _check_on_cuda(backend, num_frames, tokens_per_frame, heads, dim, step, config, torch.bfloat16)
