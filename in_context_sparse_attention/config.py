"""Hyper-parameters of In-Context Sparse Attention (ISA)."""
from __future__ import annotations

from dataclasses import dataclass

# Largest block size accepted: far above any useful block (the paper uses 64, the kernels
# at most 128), low enough that a mistyped size fails here rather than as one block
# padded to millions of rows.
MAX_BLOCK_SIZE = 4096


@dataclass(frozen=True)
class ISAConfig:
    """ISA hyper-parameters (defaults are the paper's).

    Attributes:
        block_size: tokens per block of the global grid laid from token 0 (b), 1 to
            MAX_BLOCK_SIZE (4096); each backend runs a few of these (`ISABackend.block_sizes`).
        select_ratio: share of the candidate source blocks kept by context pre-selection
            ("SRR"): K_ctx = floor(n_candidates * select_ratio).
        sparsity: share of the pruned key/value blocks attended exactly by each diffuse
            query block ("SAR"): E = max(1, floor(sparsity * NKV)); the rest are 0-th
            order Taylor terms.
        sharpness_ratio: k_s = max(1, floor(nT * sharpness_ratio)) target blocks summed
            into a query block's sharpness.
        flat_ratio: share of all query blocks (the sharpest) sent to full attention:
            floor(NB * flat_ratio). It may be 0 (every query block through the sparse
            kernel); the other ratios must be in (0, 1].
    """

    block_size: int = 64
    select_ratio: float = 0.125
    sparsity: float = 0.0625
    sharpness_ratio: float = 0.0625
    flat_ratio: float = 0.5

    def __post_init__(self):
        size = self.block_size
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_BLOCK_SIZE:
            raise ValueError(f"ISAConfig.block_size must be a positive int at most {MAX_BLOCK_SIZE}, got {size!r}")
        for name in ("select_ratio", "sparsity", "sharpness_ratio", "flat_ratio"):
            value = getattr(self, name)
            zero_allowed = name == "flat_ratio"
            is_number = not isinstance(value, bool) and isinstance(value, (int, float))
            if not is_number or not (value >= 0.0 if zero_allowed else value > 0.0) or value > 1.0:
                interval = "[0, 1]" if zero_allowed else "(0, 1]"
                raise ValueError(f"ISAConfig.{name} must be a number in {interval}, got {value!r}")
