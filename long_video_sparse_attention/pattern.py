"""The LVSA frame pattern: which key frames each query frame attends to.

`lvsa_frame_mask` is the single definition of the pattern; everything else (token masks,
block masks, the reference and the kernels) is derived from its [F, F] boolean output.

For F latent frames, window W, first frames n and denoising step s:

- anchors G = {0, ..., n-1} together with the periodic keyframes
  {(offset + i * kfi) mod F : 0 <= i < ceil(F / kfi)}, offset = s mod kfi when rotating,
  else 0; wrapping modulo F keeps ceil(F / kfi) keyframes at every offset;
- the local window of query frame f is [max(0, min(f - W, F-1 - 2W)), min(F-1, max(f + W, 2W))]:
  2W + 1 frames centred on f, shifted inwards at the ends of the clip so that it keeps its
  width; with `expand_window` it is widened (one frame left, then one right, and so on)
  until it holds min(2W + 1, F - |G|) frames outside G, so that overlapping anchors do not
  shrink a query frame's budget; W = 0 means no window;
- query frame f attends to the key frames G | window(f).
"""
from __future__ import annotations

import functools
import math
import numbers

import torch

from .config import LVSAConfig
from .layout import check_positive_int


def check_num_frames(num_frames) -> None:
    """Raise a ValueError unless num_frames is a positive int."""
    check_positive_int("num_frames", num_frames)


def check_step(step) -> None:
    """Raise a ValueError unless step is an int >= 0."""
    if not isinstance(step, numbers.Integral) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be an int >= 0 (the denoising step index), got {step!r}")


def _check_config(config) -> None:
    if not isinstance(config, LVSAConfig):
        raise TypeError(f"config must be an LVSAConfig, got {type(config).__name__}")


def anchor_frames(num_frames: int, first_frames: int, interval: int, offset: int) -> tuple[int, ...]:
    """Sorted anchor frames: the first `first_frames` frames and the ceil(F / interval)
    keyframes (offset + i * interval) mod F."""
    anchors = set(range(min(first_frames, num_frames)))
    anchors.update((offset + i * interval) % num_frames for i in range(math.ceil(num_frames / interval)))
    return tuple(sorted(anchors))


@functools.lru_cache(maxsize=None)
def _automatic_interval(num_frames: int, window: int, first_frames: int, reference_frames: int, scale: float) -> int:
    budget = max(first_frames + 1, math.floor(reference_frames * scale))  # attended frames per query frame
    if num_frames <= budget:
        return 1  # every frame is an anchor: dense
    # (a) the sparsest grid that still has enough anchors to fill the budget next to a full window
    wanted_anchors = max(first_frames, budget - min(2 * window + 1, num_frames))
    by_anchor_count = next(
        interval
        for interval in range(num_frames, 0, -1)
        if len(anchor_frames(num_frames, first_frames, interval, 0)) >= wanted_anchors
    )  # interval 1 makes all F > budget >= wanted_anchors frames anchors, so one is always found
    # (b) the frames beyond the mandatory ones (window and first frames), scaled from the budget
    # to the clip: max(F - m, budget - m) = F - m here, since F > budget
    mandatory = 2 * window + first_frames
    by_ratio = -(-(num_frames - mandatory) // max(budget - mandatory, 1))
    return max(by_anchor_count, by_ratio)


def keyframe_interval(num_frames: int, config: LVSAConfig = LVSAConfig()) -> int:
    """The keyframe interval kfi for a clip of num_frames latent frames.

    The configured one, or, when config.keyframe_interval is None, the automatic one: with
    budget = max(n + 1, floor(reference_frames * sparsity_scale)), 1 (dense) when F <= budget,
    else the larger (sparser) of
      (a) the largest kfi whose anchors at offset 0 number at least max(n, budget - min(2W + 1, F)),
      (b) ceil((F - m) / max(budget - m, 1)) with m = 2W + n.
    """
    check_num_frames(num_frames)
    _check_config(config)
    if config.keyframe_interval is not None:
        return int(config.keyframe_interval)
    return _automatic_interval(
        int(num_frames), config.window, config.first_frames, config.reference_frames, float(config.sparsity_scale)
    )


def keyframe_offset(num_frames: int, step: int, config: LVSAConfig = LVSAConfig()) -> int:
    """Offset of the keyframe grid at denoising step `step`: step mod kfi when rotating, else 0.
    The pattern of step s equals that of step s + kfi."""
    check_step(step)
    return int(step) % keyframe_interval(num_frames, config) if config.rotate else 0


def window_bounds(
    frame: int, num_frames: int, window: int, anchors: frozenset, expand: bool
) -> tuple[int, int] | None:
    """Inclusive bounds [lo, hi] of query frame `frame`'s local window, or None when window = 0."""
    if window == 0:
        return None
    lo = max(0, min(frame - window, num_frames - 1 - 2 * window))
    hi = min(num_frames - 1, max(frame + window, 2 * window))
    if not expand:
        return lo, hi
    wanted = min(2 * window + 1, num_frames - len(anchors))
    free = sum(1 for f in range(lo, hi + 1) if f not in anchors)
    while free < wanted and (lo > 0 or hi < num_frames - 1):
        if lo > 0:
            lo -= 1
            free += lo not in anchors
        if free < wanted and hi < num_frames - 1:
            hi += 1
            free += hi not in anchors
    return lo, hi


@functools.lru_cache(maxsize=256)
def _frame_mask(num_frames: int, offset: int, config: LVSAConfig) -> torch.Tensor:
    interval = keyframe_interval(num_frames, config)
    anchors = anchor_frames(num_frames, config.first_frames, interval, offset)
    anchor_set = frozenset(anchors)
    mask = torch.zeros(num_frames, num_frames, dtype=torch.bool)
    mask[:, list(anchors)] = True
    for frame in range(num_frames):
        bounds = window_bounds(frame, num_frames, config.window, anchor_set, config.expand_window)
        if bounds is not None:
            mask[frame, bounds[0] : bounds[1] + 1] = True
    return mask


def lvsa_frame_mask(num_frames: int, step: int, config: LVSAConfig = LVSAConfig()) -> torch.Tensor:
    """The LVSA pattern at one denoising step: a new bool tensor [F, F] on the CPU whose
    entry [f, g] says whether query frame f attends to key frame g (see the module docstring).

    A pure function of its arguments; every row holds at least one True (the anchors).
    """
    check_num_frames(num_frames)
    _check_config(config)
    return _frame_mask(int(num_frames), keyframe_offset(num_frames, step, config), config).clone()


def lvsa_anchor_frames(num_frames: int, step: int, config: LVSAConfig = LVSAConfig()) -> tuple[int, ...]:
    """The sorted anchor frames G at denoising step `step` (every query frame attends to them)."""
    check_num_frames(num_frames)
    _check_config(config)
    interval = keyframe_interval(num_frames, config)
    return anchor_frames(int(num_frames), config.first_frames, interval, keyframe_offset(num_frames, step, config))


def attended_fraction(frame_mask: torch.Tensor) -> float:
    """Share of the (query, key) token pairs attended: the mean of the frame mask, since every
    frame has the same number of tokens in every part of the sequence."""
    return float(frame_mask.float().mean())


def render_frame_mask(num_frames: int, step: int, config: LVSAConfig = LVSAConfig()) -> str:
    """The pattern as text, one row per query frame and one character per key frame:
    'A' anchor, 'w' local window only, '.' not attended; each row ends with its count."""
    mask = lvsa_frame_mask(num_frames, step, config)
    anchors = set(lvsa_anchor_frames(num_frames, step, config))
    width = len(str(num_frames - 1))
    rows = []
    for frame in range(num_frames):
        marks = "".join(
            "A" if key in anchors else ("w" if mask[frame, key] else ".") for key in range(num_frames)
        )
        rows.append(f"{frame:>{width}} {marks} {int(mask[frame].sum())}")
    return "\n".join(rows)
