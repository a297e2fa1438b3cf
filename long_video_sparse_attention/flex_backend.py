"""Backend "flex": LVSA on PyTorch FlexAttention, compiled with torch.compile.

FlexAttention runs a block-sparse fused attention kernel from a `BlockMask`: for every
row of 128 query tokens, the list of 128-key tiles it computes without a mask (full) and
those it computes with `mask_mod` applied element by element (partial); the other tiles
are skipped. A frame holds (H/16) * (W/16) tokens, rarely a multiple of 128, so tiles
that straddle a frame boundary (or the target/source boundary) are partial. The tile
lists come straight from the frame pattern (`layout.block_structure`), with no [S, S]
mask ever built; the pattern repeats every kfi denoising steps, so block masks are cached
per (F, tokens_per_frame, parts, config, keyframe offset, device).

Block masks are built for the forward pass only (inference); FlexAttention's backward
would need the transposed (query-block) lists too.
"""
from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .config import LVSAConfig
from .layout import block_structure, check_frame_mask
from .pattern import keyframe_offset, lvsa_frame_mask

BLOCK_SIZE = 128  # tokens per tile side of the block mask
_CACHED_BLOCK_MASKS = 32  # at 81 frames one is ~53 MB of int32 tile lists; kfi = 6 of them per clip


def _tile_lists(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[NB, NB] bool -> (counts int32 [1, 1, NB], indices int32 [1, 1, NB, NB]): for every query
    block the number of selected key blocks and their indices, ascending, first in the row."""
    counts = tiles.sum(dim=1, dtype=torch.int32)
    indices = torch.argsort((~tiles).to(torch.int32), dim=1, stable=True).to(torch.int32)
    return counts[None, None], indices[None, None]


def lvsa_block_mask(frame_mask: torch.Tensor, tokens_per_frame: int, parts: int = 2, device=None) -> BlockMask:
    """FlexAttention BlockMask (one for all batches and heads) of the LVSA pattern.

    Args:
        frame_mask: bool [F, F] from `lvsa_frame_mask`.
        tokens_per_frame: tokens of one latent frame in one part.
        parts: copies of the clip in the sequence (2: [target | source]).
        device: where the kernel runs (frame_mask's device when None).
    Returns:
        A BlockMask over S = parts * F * tokens_per_frame tokens in 128 x 128 tiles, whose
        mask_mod reads the frame mask through token -> frame = (t mod (F * tpf)) // tpf.
    """
    check_frame_mask(frame_mask)
    frame_mask = frame_mask.to(device if device is not None else frame_mask.device)
    structure = block_structure(frame_mask, tokens_per_frame, parts, BLOCK_SIZE)
    part_len = frame_mask.shape[0] * tokens_per_frame
    seq_len = structure.seq_len

    def frame_mask_mod(batch, head, q_idx, kv_idx):
        # indices past S (the padding of the last tile) are refused, and wrap into the clip
        # so that the frame-mask read stays in bounds
        attended = frame_mask[(q_idx % part_len) // tokens_per_frame, (kv_idx % part_len) // tokens_per_frame]
        return attended & (q_idx < seq_len) & (kv_idx < seq_len)

    partial_counts, partial_indices = _tile_lists(structure.partial)
    full_counts, full_indices = _tile_lists(structure.full)
    return BlockMask.from_kv_blocks(
        partial_counts,
        partial_indices,
        full_counts,
        full_indices,
        BLOCK_SIZE=BLOCK_SIZE,
        mask_mod=frame_mask_mod,
        seq_lengths=(seq_len, seq_len),
        compute_q_blocks=False,
    )


@functools.lru_cache(maxsize=_CACHED_BLOCK_MASKS)
def _block_mask_for_offset(num_frames, tokens_per_frame, parts, config, offset, device) -> BlockMask:
    return lvsa_block_mask(lvsa_frame_mask(num_frames, offset, config), tokens_per_frame, parts, device)


def cached_block_mask(
    num_frames: int, tokens_per_frame: int, parts: int, step: int, config: LVSAConfig, device: torch.device
) -> BlockMask:
    """The BlockMask of step `step`, built once per keyframe offset (step mod kfi) and reused."""
    offset = keyframe_offset(num_frames, step, config)  # lvsa_frame_mask(F, offset) == lvsa_frame_mask(F, step)
    return _block_mask_for_offset(int(num_frames), int(tokens_per_frame), int(parts), config, offset, device)


@functools.lru_cache(maxsize=None)
def _compiled_flex_attention():
    return torch.compile(flex_attention, dynamic=False)


def flex_lvsa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    compiled: bool = True,
    kernel_options: dict | None = None,
) -> torch.Tensor:
    """FlexAttention over [B, S, H, D] tensors with an LVSA BlockMask.

    Args:
        q, k, v: [B, S, H, D]; handed to FlexAttention as [B, H, S, D] views.
        block_mask: from `lvsa_block_mask` / `cached_block_mask`, on q's device.
        compiled: run the torch.compile'd fused kernel (the fast path); False runs
            FlexAttention's eager implementation, which materialises the scores and serves
            to check block masks quickly on the CPU.
        kernel_options: FlexAttention's kernel_options, e.g. {"BACKEND": "FLASH"} for its
            experimental CuTe-DSL FlashAttention kernel (needs the flash_attn.cute package).
    Returns:
        [B, S, H, D] contiguous, q's dtype.
    """
    attend = _compiled_flex_attention() if compiled else flex_attention
    out = attend(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask, kernel_options=kernel_options
    )
    return out.transpose(1, 2).contiguous()
