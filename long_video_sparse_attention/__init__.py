"""Long-Video Sparse Attention (LVSA, arXiv 2605.31057): a training-free frame-level pattern.

    from long_video_sparse_attention import lvsa_attention, LVSAConfig
    out = lvsa_attention(q, k, v, num_frames, tokens_per_frame, step, config=LVSAConfig(), backend="flex")
    # backend: "flex" (FlexAttention), "gather" (gathered frames on dense FlashAttention-3), "torch" (reference)

Each latent frame attends to a few anchor frames (the first frames and periodic keyframes
that move with the denoising step) and to a local window of frames around it.
"""
from .api import BACKEND_NAMES, lvsa_attention
from .config import LVSAConfig
from .flex_backend import cached_block_mask, flex_lvsa_attention, lvsa_block_mask
from .gather_backend import (
    GROUP_FRAMES,
    GatherChunk,
    GatherPlan,
    cached_gather_plan,
    gather_lvsa_attention,
    gather_plan,
)
from .layout import BlockStructure, block_structure, lvsa_token_mask, token_frame_index
from .pattern import (
    attended_fraction,
    keyframe_interval,
    keyframe_offset,
    lvsa_anchor_frames,
    lvsa_frame_mask,
    render_frame_mask,
)
from .reference import lvsa_attention_reference

__all__ = [
    "BACKEND_NAMES",
    "BlockStructure",
    "GROUP_FRAMES",
    "GatherChunk",
    "GatherPlan",
    "LVSAConfig",
    "attended_fraction",
    "block_structure",
    "cached_block_mask",
    "cached_gather_plan",
    "flex_lvsa_attention",
    "gather_lvsa_attention",
    "gather_plan",
    "keyframe_interval",
    "keyframe_offset",
    "lvsa_anchor_frames",
    "lvsa_attention",
    "lvsa_attention_reference",
    "lvsa_block_mask",
    "lvsa_frame_mask",
    "lvsa_token_mask",
    "render_frame_mask",
    "token_frame_index",
]
