"""LVSA backend "gather" on the CPU (SDPA underneath): its plans against the frame mask, and
its output against a float64 masked softmax, into NaN-poisoned output buffers so that a row
it never writes fails. The CUDA runs (FlashAttention-3 underneath) are in
test_lvsa_attention.py, marked `gpu`, next to FlexAttention's."""
from __future__ import annotations

import pytest
import torch

from long_video_sparse_attention import (
    GROUP_FRAMES,
    GatherChunk,
    GatherPlan,
    LVSAConfig,
    cached_gather_plan,
    gather_lvsa_attention,
    gather_plan,
    lvsa_attention,
    lvsa_attention_reference,
    lvsa_frame_mask,
)
from test_lvsa_attention import _independent_attention, _packed_qkv, _relative_l2

DEFAULTS = LVSAConfig()


def _slots(runs) -> list[int]:
    return [slot for start, stop in runs for slot in range(start, stop)]


def _nan_like(x: torch.Tensor) -> torch.Tensor:
    return torch.full(x.shape, float("nan"), dtype=x.dtype, device=x.device)


@pytest.mark.parametrize(
    "num_frames, step, config, parts, group_frames",
    [
        (22, 0, DEFAULTS, 2, GROUP_FRAMES),
        (41, 0, DEFAULTS, 2, 1),
        (41, 1, DEFAULTS, 2, 3),
        (81, 0, DEFAULTS, 2, GROUP_FRAMES),
        (25, 4, LVSAConfig(window=0), 2, 2),
        (33, 1, LVSAConfig(keyframe_interval=5), 1, GROUP_FRAMES),
    ],
)
def test_plan_covers_every_query_frame_once_with_its_own_key_frames(num_frames, step, config, parts, group_frames):
    frame_mask = lvsa_frame_mask(num_frames, step, config)
    plan = gather_plan(frame_mask, parts, group_frames)
    assert not plan.dense and plan.num_slots == parts * num_frames
    covered = []
    for chunk in plan.chunks:
        query_slots, key_slots = _slots(chunk.query_runs), _slots(chunk.key_runs)
        assert query_slots == sorted(query_slots) and key_slots == sorted(key_slots)
        assert all(stop < next_start for (_, stop), (next_start, _) in zip(chunk.key_runs, chunk.key_runs[1:]))
        frames = sorted({slot % num_frames for slot in query_slots})
        assert len(frames) <= group_frames
        assert query_slots == [part * num_frames + frame for part in range(parts) for frame in frames]
        for frame in frames:  # every query frame of the chunk attends to exactly the chunk's keys
            expected = [part * num_frames + key for part in range(parts) for key in range(num_frames)
                        if frame_mask[frame, key]]
            assert key_slots == expected
        covered += query_slots
    assert sorted(covered) == list(range(parts * num_frames))
    distinct_rows = torch.unique(frame_mask, dim=0).shape[0]
    assert len(plan.chunks) >= distinct_rows
    assert plan.max_key_slots == parts * int(frame_mask.sum(dim=1).max())


@pytest.mark.parametrize(
    "num_frames, step, chunks, max_query_slots, max_key_slots",
    [
        (41, 0, 21, 2 * 7, 2 * 21),  # rows 0-6 equal; 21 distinct rows (docs/lvsa.md's drawing)
        (41, 1, 20, 2 * 8, 2 * 22),
        (81, 0, 61, 2 * 6, 2 * 21),
        (81, 1, 60, 2 * 7, 2 * 22),
    ],
)
def test_plan_sizes_of_the_benchmarked_clips(num_frames, step, chunks, max_query_slots, max_key_slots):
    plan = cached_gather_plan(num_frames, 2, step, DEFAULTS)
    assert (len(plan.chunks), plan.max_query_slots, plan.max_key_slots) == (chunks, max_query_slots, max_key_slots)
    one_per_frame = cached_gather_plan(num_frames, 2, step, DEFAULTS, group_frames=1)
    assert len(one_per_frame.chunks) == num_frames and one_per_frame.max_query_slots == 2


def test_plan_of_a_hand_written_mask():
    # 4 frames, 2 parts: slots 0-3 target frames 0-3, slots 4-7 source frames 0-3
    frame_mask = torch.tensor(
        [[1, 1, 0, 1], [1, 1, 0, 1], [1, 0, 1, 1], [1, 1, 0, 1]], dtype=torch.bool
    )
    plan = gather_plan(frame_mask, parts=2, group_frames=2)
    assert plan == GatherPlan(
        chunks=(
            GatherChunk(query_runs=((0, 2), (4, 6)), key_runs=((0, 2), (3, 6), (7, 8))),
            GatherChunk(query_runs=((3, 4), (7, 8)), key_runs=((0, 2), (3, 6), (7, 8))),
            GatherChunk(query_runs=((2, 3), (6, 7)), key_runs=((0, 1), (2, 5), (6, 8))),
        ),
        num_slots=8,
        dense=False,
    )
    assert (plan.max_query_slots, plan.max_key_slots) == (4, 6)


def test_plan_of_a_dense_mask_has_no_chunks():
    plan = cached_gather_plan(21, 2, 5, DEFAULTS)  # 21 frames: every frame attends to every frame
    assert plan.dense and plan.chunks == () and plan.max_key_slots == 0


def test_plans_are_cached_per_keyframe_offset():
    first = cached_gather_plan(41, 2, 0, DEFAULTS)  # kfi 3
    assert cached_gather_plan(41, 2, 3, DEFAULTS) is first
    assert cached_gather_plan(41, 2, 1, DEFAULTS) is not first
    assert cached_gather_plan(41, 2, 0, DEFAULTS, group_frames=1) is not first


@pytest.mark.parametrize("group_frames", [0, 2.0, True])
def test_plan_refuses_a_bad_group_size(group_frames):
    with pytest.raises(ValueError, match="group_frames must be a positive int"):
        gather_plan(lvsa_frame_mask(22, 0), 2, group_frames)


CASES = [
    (22, 35, 0, DEFAULTS, 2),  # frames of 7 x 5 tokens
    (22, 35, 1, DEFAULTS, 2),
    (41, 6, 2, DEFAULTS, 2),
    (25, 9, 4, LVSAConfig(window=0), 2),  # anchors only
    (33, 8, 1, LVSAConfig(keyframe_interval=5), 1),  # a plain video: one part
    (21, 5, 3, DEFAULTS, 2),  # dense: one dense call
]


@pytest.mark.parametrize("group_frames", [1, 3, GROUP_FRAMES])
@pytest.mark.parametrize("num_frames, tokens_per_frame, step, config, parts", CASES)
def test_gather_equals_float64_attention(num_frames, tokens_per_frame, step, config, parts, group_frames):
    q, k, v = _packed_qkv(2, num_frames, tokens_per_frame, 3, 64, torch.float64, parts=parts)
    frame_mask = lvsa_frame_mask(num_frames, step, config)
    out = _nan_like(q)
    result = gather_lvsa_attention(q, k, v, gather_plan(frame_mask, parts, group_frames), out=out)
    assert result is out
    torch.testing.assert_close(out, _independent_attention(q, k, v, frame_mask, tokens_per_frame, parts),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("num_frames, tokens_per_frame, step, config, parts", CASES[:4])
def test_gather_error_is_at_most_twice_the_references(num_frames, tokens_per_frame, step, config, parts, dtype):
    """Against the float64 oracle, at most twice the error of the PyTorch reference at the same
    precision plus a small floor (the bound of FlexAttention's CUDA tests)."""
    q, k, v = _packed_qkv(2, num_frames, tokens_per_frame, 3, 64, dtype, parts=parts)
    frame_mask = lvsa_frame_mask(num_frames, step, config)
    out = gather_lvsa_attention(q, k, v, cached_gather_plan(num_frames, parts, step, config), out=_nan_like(q))
    assert out.dtype == dtype and torch.isfinite(out).all()
    exact = _independent_attention(q, k, v, frame_mask, tokens_per_frame, parts)
    reference_error = _relative_l2(lvsa_attention_reference(q, k, v, frame_mask, tokens_per_frame, parts), exact)
    assert _relative_l2(out, exact) <= 2 * reference_error + 1e-6


def test_the_check_sees_a_wrong_key_set():
    q, k, v = _packed_qkv(1, 22, 35, 2, 32, torch.float64)
    exact = _independent_attention(q, k, v, lvsa_frame_mask(22, 0), 35)
    other_step = gather_lvsa_attention(q, k, v, gather_plan(lvsa_frame_mask(22, 1)))
    assert _relative_l2(other_step, exact) > 1e-2
    plan = gather_plan(lvsa_frame_mask(22, 0))
    first = plan.chunks[0]
    short = GatherChunk(query_runs=first.query_runs, key_runs=first.key_runs[:-1])  # one key run left out
    dropped = GatherPlan(chunks=(short, *plan.chunks[1:]), num_slots=plan.num_slots, dense=False)
    assert _relative_l2(gather_lvsa_attention(q, k, v, dropped), exact) > 1e-3
    unwritten = GatherPlan(chunks=plan.chunks[1:], num_slots=plan.num_slots, dense=False)  # a chunk left out
    assert torch.isnan(gather_lvsa_attention(q, k, v, unwritten, out=_nan_like(q))).any()


def test_gather_writes_into_a_strided_out_and_allocates_a_contiguous_one():
    q, k, v = _packed_qkv(2, 22, 35, 3, 16, torch.float32)
    plan = cached_gather_plan(22, 2, 1, DEFAULTS)
    packed_out = torch.full((2, q.shape[1] + 8, 2, 3, 16), float("nan"))
    out = packed_out[:, : q.shape[1], 1]  # [B, S, H, D] with the strides of a packed buffer
    gather_lvsa_attention(q, k, v, plan, out=out)
    allocated = gather_lvsa_attention(q, k, v, plan)
    assert allocated.is_contiguous() and allocated.shape == q.shape
    assert torch.equal(allocated, out)
    assert torch.isnan(packed_out[:, q.shape[1] :]).all() and torch.isnan(packed_out[:, :, 0]).all()
    dense_plan = cached_gather_plan(21, 2, 0, DEFAULTS)
    q, k, v = _packed_qkv(1, 21, 5, 2, 16, torch.float32)
    dense = gather_lvsa_attention(q, k, v, dense_plan)
    assert dense.is_contiguous()
    torch.testing.assert_close(gather_lvsa_attention(q, k, v, dense_plan, out=_nan_like(q)), dense, rtol=0, atol=0)


def test_lvsa_attention_runs_the_gather_backend():
    q, k, v = _packed_qkv(2, 41, 6, 2, 32, torch.float32)
    expected = _independent_attention(q, k, v, lvsa_frame_mask(41, 1), 6)
    for options in (None, {"group_frames": 1}, {"group_frames": 5}):
        out = lvsa_attention(q, k, v, 41, 6, 1, DEFAULTS, backend="gather", kernel_options=options)
        torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize(
    "kernel_options",
    [{"group_frames": 0}, {"BLOCK_M": 64}, [("group_frames", 2)]],
)
def test_lvsa_attention_refuses_bad_gather_options(kernel_options):
    q = torch.randn(1, 2 * 22 * 3, 2, 16)
    with pytest.raises(ValueError, match="kernel_options"):
        lvsa_attention(q, q, q, 22, 3, 0, backend="gather", kernel_options=kernel_options)


def test_gather_refuses_gradients_and_mismatched_tensors():
    plan = cached_gather_plan(22, 2, 0, DEFAULTS)
    q = torch.randn(1, 2 * 22 * 3, 2, 16)
    with pytest.raises(ValueError, match="forward only"):
        gather_lvsa_attention(q.requires_grad_(), q, q, plan)
    q = q.detach()
    with pytest.raises(ValueError, match="not a multiple of the plan's 44 slots"):
        gather_lvsa_attention(q[:, 1:], q[:, 1:], q[:, 1:], plan)
    with pytest.raises(ValueError, match="out must match q"):
        gather_lvsa_attention(q, q, q, plan, out=torch.empty(1, 2 * 22 * 3, 2, 16, dtype=torch.float64))
