"""Backend "gather": LVSA as dense attention over gathered frames (FlashAttention-3 on CUDA).

The LVSA pattern is frame-level: every token of query frame f, target or source, attends to
the target and source tokens of the key frames A(f) = lvsa_frame_mask(...)[f] (about 21 of
F). So for a set of query frames that share one A, the attention is exactly dense attention
of their tokens over the tokens of A: gather those tokens into contiguous buffers, call the
fastest dense kernel (`in_context_sparse_attention.dense.dense_attention`: FlashAttention-3
> FlashAttention-2 > PyTorch SDPA; SDPA on the CPU), and scatter the output rows back. The
softmax runs over exactly the attended tokens, so the result is the masked attention's, not
an approximation, and no tile straddling a frame boundary is wasted.

The sequence [target | source] is seen as `parts * F` *slots* of tokens_per_frame tokens
each, slot p * F + f holding frame f of part p (a view [B, parts * F, tpf, H, D] of the
[B, S, H, D] input, whatever its strides). A set of frames is a few runs of consecutive
slots (anchors every kfi frames, the window in one piece, the last frame of the target
followed by the first of the source), so a gather is one `torch.cat` of slot ranges into a
preallocated buffer (bulk copies of whole frames, tpf * H * D contiguous elements each) and
the scatter one `copy_` per run of query slots. Runs are plain ints: a plan needs no device
and no host synchronisation.

A `GatherPlan` groups the query frames whose mask rows are equal (with the defaults,
consecutive frames often share their window: 41 frames form 21 groups, 81 frames 61) and
splits every group into chunks of at most `group_frames` frames; each chunk is one dense
call. The key/value gathers are the whole overhead: 2 * parts * |A| slots copied per chunk,
against parts * |chunk| * parts * |A| slot pairs of attention, so larger chunks amortise
them over more queries.

Extra memory, reused by every chunk of a call (elements; B batch, H heads, D head dim):
    keys and values:    2 * B * parts * max|A| * tpf * H * D
    queries and output: 2 * B * parts * min(group_frames, largest group) * tpf * H * D
At 544x960 (tpf 2,040), H 40, D 128, bf16, max|A| = 22 and chunks of at most 8 frames:
1.84 GB + 0.67 GB = 2.5 GB, against 3.4 GB for each of q, k, v at 81 frames. A mask that
is all True (clips of at most `reference_frames` frames) runs as one dense call on q, k, v
themselves: no gather, no extra memory.

Forward only (inference): the gathers write into preallocated buffers, which autograd does
not track.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from in_context_sparse_attention.dense import dense_attention

from .config import LVSAConfig
from .layout import check_frame_mask, check_positive_int
from .pattern import keyframe_offset, lvsa_frame_mask

GROUP_FRAMES = 8  # default: at most this many query frames per dense call
_CACHED_PLANS = 64  # a plan is a few hundred ints

Runs = tuple[tuple[int, int], ...]  # ranges [start, stop) of consecutive slots, ascending


def _runs(slots: list[int]) -> Runs:
    """Ascending slots -> the maximal ranges [start, stop) of consecutive ones."""
    runs: list[list[int]] = []
    for slot in slots:
        if runs and runs[-1][1] == slot:
            runs[-1][1] += 1
        else:
            runs.append([slot, slot + 1])
    return tuple((start, stop) for start, stop in runs)


def _count(runs: Runs) -> int:
    """Slots in the runs."""
    return sum(stop - start for start, stop in runs)


@dataclass(frozen=True)
class GatherChunk:
    """One dense call: query slots and the key slots they all attend to, as runs."""

    query_runs: Runs
    key_runs: Runs

    @property
    def query_slots(self) -> int:
        """parts * the chunk's query frames."""
        return _count(self.query_runs)

    @property
    def key_slots(self) -> int:
        """parts * |A|, A the key frames of the chunk's query frames."""
        return _count(self.key_runs)


@dataclass(frozen=True)
class GatherPlan:
    """The dense calls of one frame mask; slot p * F + f is frame f of part p.

    Attributes:
        chunks: one `GatherChunk` per dense call; their query slots cover every slot once.
        num_slots: parts * F, the slots of the sequence.
        dense: the frame mask is all True: one dense call on q, k, v, no gather (chunks empty).
    """

    chunks: tuple[GatherChunk, ...]
    num_slots: int
    dense: bool

    @property
    def max_query_slots(self) -> int:
        """Slots of the largest query chunk: sizes the query buffer (and the dense output)."""
        return max((chunk.query_slots for chunk in self.chunks), default=0)

    @property
    def max_key_slots(self) -> int:
        """Slots of the largest key set: sizes the key and value buffers."""
        return max((chunk.key_slots for chunk in self.chunks), default=0)


def gather_plan(frame_mask: torch.Tensor, parts: int = 2, group_frames: int = GROUP_FRAMES) -> GatherPlan:
    """Group the query frames of frame_mask by equal rows, in chunks of at most group_frames.

    Args:
        frame_mask: bool [F, F] from `lvsa_frame_mask` (query frame, key frame).
        parts: copies of the clip in the sequence (2: [target | source]).
        group_frames: the most query frames one dense call takes (1: one call per frame).
    Returns:
        A `GatherPlan`, chunks in the order of their group's first frame.
    """
    check_frame_mask(frame_mask)
    check_positive_int("parts", parts)
    check_positive_int("group_frames", group_frames)
    num_frames = frame_mask.shape[0]
    rows = frame_mask.cpu().tolist()
    if all(all(row) for row in rows):
        return GatherPlan(chunks=(), num_slots=parts * num_frames, dense=True)
    groups: dict[tuple[bool, ...], list[int]] = {}
    for frame, row in enumerate(rows):
        groups.setdefault(tuple(row), []).append(frame)

    def slot_runs(frames: list[int]) -> Runs:
        return _runs([part * num_frames + frame for part in range(parts) for frame in frames])

    chunks = []
    for row, frames in groups.items():
        key_runs = slot_runs([key for key, attended in enumerate(row) if attended])
        for start in range(0, len(frames), group_frames):
            chunks.append(GatherChunk(query_runs=slot_runs(frames[start : start + group_frames]), key_runs=key_runs))
    return GatherPlan(chunks=tuple(chunks), num_slots=parts * num_frames, dense=False)


@functools.lru_cache(maxsize=_CACHED_PLANS)
def _plan_for_offset(num_frames, parts, config, offset, group_frames) -> GatherPlan:
    return gather_plan(lvsa_frame_mask(num_frames, offset, config), parts, group_frames)


def cached_gather_plan(
    num_frames: int, parts: int, step: int, config: LVSAConfig, group_frames: int = GROUP_FRAMES
) -> GatherPlan:
    """The GatherPlan of step `step`, built once per keyframe offset (step mod kfi) and reused."""
    offset = keyframe_offset(num_frames, step, config)  # lvsa_frame_mask(F, offset) == lvsa_frame_mask(F, step)
    return _plan_for_offset(int(num_frames), int(parts), config, offset, group_frames)


def _gather(source: torch.Tensor, runs: Runs, buffer: torch.Tensor) -> torch.Tensor:
    """The slot runs of source [B, num_slots, tpf, H, D], copied contiguously to the start of
    the flat buffer: [B, slots * tpf, H, D]."""
    shape = (source.shape[0], _count(runs), *source.shape[2:])
    gathered = buffer[: math.prod(shape)].view(shape)
    torch.cat([source[:, start:stop] for start, stop in runs], dim=1, out=gathered)
    return gathered.flatten(1, 2)


def _attend_chunk(chunk: GatherChunk, q_slots, k_slots, v_slots, out_slots, buffers) -> None:
    """Dense attention of one chunk's query slots over its key slots, written into out_slots.

    A function of its own so that the dense output is freed before the next chunk's."""
    query_buffer, key_buffer, value_buffer = buffers
    attended = dense_attention(
        _gather(q_slots, chunk.query_runs, query_buffer),
        _gather(k_slots, chunk.key_runs, key_buffer),
        _gather(v_slots, chunk.key_runs, value_buffer),
    ).unflatten(1, (chunk.query_slots, -1))  # [B, query slots, tpf, H, D]
    position = 0
    for start, stop in chunk.query_runs:
        out_slots[:, start:stop].copy_(attended[:, position : position + stop - start])
        position += stop - start


def gather_lvsa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: GatherPlan,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """LVSA by dense attention over gathered frames, one dense call per chunk of the plan.

    Args:
        q, k, v: [B, S, H, D], S = plan.num_slots * tokens_per_frame, same shape, dtype and
            device, any strides with a unit last one (e.g. views of a packed qkv tensor).
        plan: from `gather_plan` / `cached_gather_plan`.
        out: optional [B, S, H, D] tensor (q's dtype and device) to write the result into;
            every row is written. None allocates a contiguous one.
    Returns:
        [B, S, H, D] in q's dtype: `out` when given, else a new contiguous tensor.
    """
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        raise ValueError("the 'gather' backend is forward only: call it under torch.no_grad() or inference_mode()")
    if q.shape[1] % plan.num_slots:
        raise ValueError(f"the sequence length {q.shape[1]} is not a multiple of the plan's {plan.num_slots} slots")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device):
        raise ValueError(
            f"out must match q: {tuple(q.shape)} {q.dtype} on {q.device}, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
    if plan.dense:
        result = dense_attention(q, k, v)
        return out.copy_(result) if out is not None else result.contiguous()
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    q_slots, k_slots, v_slots, out_slots = (x.unflatten(1, (plan.num_slots, -1)) for x in (q, k, v, out))
    slot_elements = q.shape[0] * q_slots.shape[2] * q.shape[2] * q.shape[3]  # B * tpf * H * D
    buffers = tuple(
        torch.empty(slots * slot_elements, dtype=q.dtype, device=q.device)
        for slots in (plan.max_query_slots, plan.max_key_slots, plan.max_key_slots)
    )
    for chunk in plan.chunks:
        _attend_chunk(chunk, q_slots, k_slots, v_slots, out_slots, buffers)
    return out
