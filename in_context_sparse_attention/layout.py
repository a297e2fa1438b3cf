"""The global block grid that ISA lays over the sequence [target tokens | source tokens]."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockLayout:
    """Blocks of `block_size` tokens laid from token 0 over S = T + C tokens.

    The last block may be partial (`last_block_size` < `block_size`); its padding never
    enters a mean or a softmax.
    """

    seq_len: int  # S
    target_len: int  # T
    block_size: int  # b

    @property
    def num_blocks(self) -> int:
        """NB = ceil(S / b)."""
        return math.ceil(self.seq_len / self.block_size)

    @property
    def last_block_size(self) -> int:
        return self.seq_len - (self.num_blocks - 1) * self.block_size

    @property
    def last_block_partial(self) -> bool:
        return self.last_block_size < self.block_size

    @property
    def padded_len(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_target_query_blocks(self) -> int:
        """nT = max(1, floor(T / b)): target blocks whose saliency and sharpness count."""
        return max(1, self.target_len // self.block_size)

    @property
    def num_target_blocks(self) -> int:
        """ceil(T / b): blocks holding at least one target token (always kept as keys)."""
        return math.ceil(self.target_len / self.block_size)

    @property
    def candidate_range(self) -> tuple[int, int]:
        """[first, end) of the candidate source blocks: full blocks wholly in the source."""
        end = self.num_blocks - 1 if self.last_block_partial else self.num_blocks
        first = self.num_target_blocks
        return first, max(first, end)

    @property
    def num_candidates(self) -> int:
        first, end = self.candidate_range
        return end - first

    def num_selected(self, select_ratio: float) -> int:
        """K_ctx = floor(n_candidates * select_ratio)."""
        return int(math.floor(self.num_candidates * select_ratio))

    @property
    def extra_last_block(self) -> bool:
        """Whether the partial last block is kept on top of the target blocks."""
        return self.last_block_partial and self.num_blocks - 1 >= self.num_target_blocks

    def num_kv_blocks(self, select_ratio: float) -> int:
        """NKV: blocks in the pruned key/value set (the same for every head)."""
        return self.num_target_blocks + self.num_selected(select_ratio) + int(self.extra_last_block)

    def num_kv_tokens(self, select_ratio: float) -> int:
        """L: real tokens in the pruned key/value set."""
        return self.real_tokens_in(self.num_kv_blocks(select_ratio))

    def real_tokens_in(self, num_kv_blocks: int) -> int:
        """Real tokens in a pruned key/value set of `num_kv_blocks` blocks: only the partial
        last block, always kept when there is one, carries padding."""
        return num_kv_blocks * self.block_size - (self.padded_len - self.seq_len)

    def num_full_query_blocks(self, flat_ratio: float) -> int:
        return int(math.floor(self.num_blocks * flat_ratio))

    def num_exact_blocks(self, sparsity: float, select_ratio: float) -> int:
        """E = max(1, floor(sparsity * NKV))."""
        return max(1, int(math.floor(sparsity * self.num_kv_blocks(select_ratio))))

    def num_sharpness_terms(self, sharpness_ratio: float) -> int:
        """k_s = max(1, floor(nT * sharpness_ratio))."""
        return max(1, int(math.floor(self.num_target_query_blocks * sharpness_ratio)))

    def block_counts(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Real tokens per block: [NB] int32."""
        counts = torch.full((self.num_blocks,), self.block_size, dtype=torch.int32, device=device)
        counts[-1:].fill_(self.last_block_size)  # a fill kernel: `counts[-1] = n` would copy n from the host and wait
        return counts
