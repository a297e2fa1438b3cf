"""From the frame pattern to tokens and to blocks of tokens.

The sequence is `parts` copies of the clip, one after the other: in the in-context
sequence of this project parts = 2, [target tokens | source tokens]. Each part is
frame-major, frame f's tokens_per_frame tokens being contiguous, so token t belongs to
frame (t mod (F * tokens_per_frame)) // tokens_per_frame. The source shares the target's
frame positions, so a token of frame f (target or source) attends to every token (target
and source) of every key frame that f attends to.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch


def check_positive_int(name: str, value) -> None:
    """Raise a ValueError unless value is a positive int."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_frame_mask(frame_mask) -> None:
    """Raise unless frame_mask is a square bool tensor in which every query frame attends to some key frame."""
    if not isinstance(frame_mask, torch.Tensor):
        raise TypeError(f"frame_mask must be a torch.Tensor, got {type(frame_mask).__name__}")
    if frame_mask.dtype != torch.bool or frame_mask.dim() != 2 or frame_mask.shape[0] != frame_mask.shape[1]:
        raise ValueError(f"frame_mask must be a bool tensor [F, F], got {frame_mask.dtype} {tuple(frame_mask.shape)}")
    if frame_mask.shape[0] == 0 or not bool(frame_mask.any(dim=1).all()):
        raise ValueError("frame_mask must give every query frame at least one key frame")


def token_frame_index(num_frames: int, tokens_per_frame: int, parts: int = 2, device=None) -> torch.Tensor:
    """Frame of every token: int64 [S], S = parts * num_frames * tokens_per_frame."""
    for name, value in (("num_frames", num_frames), ("tokens_per_frame", tokens_per_frame), ("parts", parts)):
        check_positive_int(name, value)
    tokens = torch.arange(parts * num_frames * tokens_per_frame, device=device)
    return (tokens % (num_frames * tokens_per_frame)) // tokens_per_frame


def lvsa_token_mask(frame_mask: torch.Tensor, tokens_per_frame: int, parts: int = 2) -> torch.Tensor:
    """Token-level mask: bool [S, S] (query token, key token) on frame_mask's device.

    S * S booleans: meant for small sequences (the reference and the tests).
    """
    check_frame_mask(frame_mask)
    frames = token_frame_index(frame_mask.shape[0], tokens_per_frame, parts, device=frame_mask.device)
    return frame_mask[frames[:, None], frames[None, :]]


@dataclass(frozen=True)
class BlockStructure:
    """The pattern on a grid of block_size x block_size tiles of the [S, S] score matrix,
    blocks laid from token 0 (NB = ceil(S / block_size), the last one possibly partial).

    Attributes:
        full: bool [NB, NB], every (query, key) pair of the tile is attended: computed
            without a mask. Tiles of the last block row or column, when S is not a multiple
            of block_size, are never full (they hold padding past S).
        partial: bool [NB, NB], some but not all pairs are attended: computed with the
            token-level mask (tiles that straddle a frame boundary).
        Tiles in neither are never touched.
    """

    full: torch.Tensor
    partial: torch.Tensor
    block_size: int
    seq_len: int

    @property
    def computed_fraction(self) -> float:
        """Share of the tiles a block-sparse kernel computes (full or partial)."""
        return float((self.full | self.partial).float().mean())


def block_structure(frame_mask: torch.Tensor, tokens_per_frame: int, parts: int = 2, block_size: int = 128):
    """Classify every tile of the score matrix as full, partial or empty, exactly, from the
    frames each block of tokens touches (no [S, S] mask is built).

    Returns:
        `BlockStructure` with [NB, NB] tensors on frame_mask's device.
    """
    check_frame_mask(frame_mask)
    check_positive_int("block_size", block_size)
    num_frames = frame_mask.shape[0]
    frames = token_frame_index(num_frames, tokens_per_frame, parts, device=frame_mask.device)
    seq_len = frames.numel()
    num_blocks = -(-seq_len // block_size)
    block_of_token = torch.arange(seq_len, device=frame_mask.device) // block_size
    # [NB, F]: 1 where the block holds at least one token of the frame (in any part)
    touches = torch.zeros(num_blocks, num_frames, dtype=torch.float64, device=frame_mask.device)
    touches[block_of_token, frames] = 1.0
    # attended[i, j]: how many (query frame, key frame) pairs of tile (i, j) are attended,
    # out of pairs[i, j]; small integers, exact in float64
    attended = touches @ frame_mask.to(torch.float64) @ touches.T
    frames_per_block = touches.sum(dim=1)
    pairs = frames_per_block[:, None] * frames_per_block[None, :]
    full = attended == pairs
    if seq_len % block_size:  # the last block row and column reach past S: their padding is never attended
        full[-1, :] = False
        full[:, -1] = False
    partial = (attended > 0) & ~full
    return BlockStructure(full=full, partial=partial, block_size=block_size, seq_len=seq_len)
