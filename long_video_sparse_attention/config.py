"""Hyper-parameters of Long-Video Sparse Attention (LVSA)."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class LVSAConfig:
    """LVSA hyper-parameters, all counted in latent frames (defaults are the paper's for Wan).

    Attributes:
        window: W, half-width of each query frame's local window (2W + 1 frames); 0 means
            no window: every query frame attends to the anchor frames only.
        first_frames: n, the leading frames 0..n-1 that are always anchors.
        reference_frames: the length the model was trained on (21 latent frames = Wan's 81
            video frames); with the automatic keyframe interval a query frame attends to
            about reference_frames * sparsity_scale frames, and clips of at most that many
            frames get dense attention.
        sparsity_scale: multiplies the attended-frame budget: < 1 sparser, > 1 denser.
        keyframe_interval: spacing of the periodic anchor keyframes; None picks it from the
            budget (`pattern.keyframe_interval`); 1 makes every frame an anchor (dense).
        rotate: shift the keyframe grid by one frame per denoising step (offset = step mod
            interval), so that over `interval` steps every frame is an anchor once.
        expand_window: widen a window that overlaps anchors until it holds
            min(2W + 1, F - #anchors) frames that are not anchors.
    """

    window: int = 3
    first_frames: int = 1
    reference_frames: int = 21
    sparsity_scale: float = 1.0
    keyframe_interval: int | None = None
    rotate: bool = True
    expand_window: bool = True

    def __post_init__(self):
        if not _is_int(self.window) or self.window < 0:
            raise ValueError(f"LVSAConfig.window must be an int >= 0, got {self.window!r}")
        if not _is_int(self.first_frames) or self.first_frames < 0:
            raise ValueError(f"LVSAConfig.first_frames must be an int >= 0, got {self.first_frames!r}")
        if not _is_int(self.reference_frames) or self.reference_frames < 1:
            raise ValueError(f"LVSAConfig.reference_frames must be an int >= 1, got {self.reference_frames!r}")
        scale = self.sparsity_scale
        if not isinstance(scale, numbers.Real) or isinstance(scale, bool) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"LVSAConfig.sparsity_scale must be a finite number > 0, got {scale!r}")
        interval = self.keyframe_interval
        if interval is not None and (not _is_int(interval) or interval < 1):
            raise ValueError(f"LVSAConfig.keyframe_interval must be None (automatic) or an int >= 1, got {interval!r}")
        for name in ("rotate", "expand_window"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LVSAConfig.{name} must be a bool, got {getattr(self, name)!r}")
