"""Triton kernels of ISA's block-level selections: the top-k steps of `selection.make_plan`.

Every selection here is "the k largest of a row, as ascending positions". Instead of a
sort, each row's k-th largest value is found by a binary search on the bits of an
order-preserving int32 image of the fp32 values (one count per bit, top bit first, which
stops once the count is exactly k); the positions at or above it are then written in
ascending order through a prefix sum. That is about 3 integer operations per element and
bit, against ~6 per element and stage of a bitonic sort (45 stages for 512 columns).
Only the k_s sharpness terms of a row are put in descending order (by counting), so
that PyTorch sums them in `selection`'s order.

Pointer arithmetic only (no block pointers), so the same source runs on triton 3.6 (GPU)
and on triton 3.9's CPU interpreter (TRITON_INTERPRET=1). Host-side launching lives in
`triton_selection.py`.

Names follow the kernel convention of docs/isa.md (`b_` tiles in registers, `o_` offsets,
`m_` masks only, `_ptr(s)` pointers, upper case constexprs). Padding lanes carry the key
INT32_MIN, below the key of every fp32 value but NaN.
"""
from __future__ import annotations

import triton
import triton.language as tl

_INT32_MIN = tl.constexpr(-(2**31))


@triton.jit
def _order_key(b_x):
    """fp32 -> int32 with the same order (-0.0 just below +0.0): a negative float's
    magnitude bits are flipped, so that a larger magnitude gives a smaller key. The map
    is its own inverse on the bits (the sign bit is kept)."""
    b_bits = b_x.to(tl.int32, bitcast=True)
    return b_bits ^ ((b_bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _top_k_mask(b_keys, k):
    """[ROWS, N] int32 keys -> [ROWS, N] bool: the k largest keys of each row (0 <= k <=
    the row's real keys); among equal keys at the threshold, the leftmost ones.

    Binary search for the threshold t, bit by bit from the top, keeping the invariant
    count(keys >= t) >= k. The sign bit first: two's complement orders the other 31 bits
    the same way for either sign. Once every row's count is exactly k, {keys >= t} is
    its top k and the remaining bits are skipped. A row of padding only has count 0 and
    selects nothing real (the caller masks its stores).
    """
    b_count = tl.sum((b_keys >= 0).to(tl.int32), axis=1)  # [ROWS]
    b_real = tl.sum((b_keys > _INT32_MIN).to(tl.int32), axis=1)  # [ROWS]
    b_threshold = tl.where(b_count >= k, 0, _INT32_MIN)  # [ROWS]
    b_count_at = tl.where(b_count >= k, b_count, b_real)  # [ROWS] count(keys >= b_threshold)
    for i in range(31):
        if tl.max(b_count_at, axis=0) > k:
            b_candidate = b_threshold | (1 << (30 - i))
            b_count_candidate = tl.sum((b_keys >= b_candidate[:, None]).to(tl.int32), axis=1)
            m_take = b_count_candidate >= k
            b_threshold = tl.where(m_take, b_candidate, b_threshold)
            b_count_at = tl.where(m_take, b_count_candidate, b_count_at)
    m_above = b_keys > b_threshold[:, None]
    m_at = b_keys == b_threshold[:, None]
    b_room = k - tl.sum(m_above.to(tl.int32), axis=1)  # [ROWS] ties to take at the threshold
    return m_above | (m_at & (tl.cumsum(m_at.to(tl.int32), axis=1) <= b_room[:, None]))


@triton.jit
def sharpness_terms_kernel(
    probs_ptr,  # [R, row_stride] fp32, contiguous rows: P of all (batch, head, query block)
    terms_ptr,  # [R, nT] fp32, contiguous: out, columns [0, k_s) only
    num_rows,  # R = B * H * NB
    row_stride,  # NB
    num_cols,  # nT: the target key blocks that count
    num_terms,  # k_s
    ROWS: tl.constexpr,  # rows per program
    COLS: tl.constexpr,  # power of two >= nT
    TERMS: tl.constexpr,  # power of two >= k_s
    CHUNK: tl.constexpr,  # terms compared with all TERMS at once (power of two <= TERMS)
):
    """terms[r, :k_s] = the k_s largest of P[r, :nT] in descending order, for ROWS rows
    per program (the first k_s columns of a descending sort of the row).

    The k_s largest are found by the bit search and written in column order; after a
    barrier (the program reads back its own rows) each one's place in descending order is
    counted against the others, CHUNK at a time (k_s^2 compares, ~1k a row at 65,536
    tokens), and after a second barrier it is written there.
    """
    o_row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    o_col = tl.arange(0, COLS)
    m_row = o_row < num_rows
    m_p = m_row[:, None] & (o_col < num_cols)[None, :]
    p_ptrs = probs_ptr + o_row.to(tl.int64)[:, None] * row_stride + o_col[None, :]
    b_keys = tl.where(m_p, _order_key(tl.load(p_ptrs, mask=m_p, other=0.0)), _INT32_MIN)  # [ROWS, COLS]
    m_top = _top_k_mask(b_keys, num_terms) & m_row[:, None]
    b_rank = tl.cumsum(m_top.to(tl.int32), axis=1) - 1  # [ROWS, COLS]
    terms_row_ptrs = terms_ptr + o_row.to(tl.int64)[:, None] * num_cols  # [ROWS, 1]
    # the probabilities back from their keys, so that only the keys stay live in registers
    tl.store(terms_row_ptrs + b_rank, _order_key(b_keys).to(tl.float32, bitcast=True), mask=m_top)
    tl.debug_barrier()

    o_term = tl.arange(0, TERMS)
    m_term = m_row[:, None] & (o_term < num_terms)[None, :]
    b_terms = tl.load(terms_row_ptrs + o_term[None, :], mask=m_term, other=-1.0)  # [ROWS, TERMS]
    b_place = tl.zeros([ROWS, TERMS], dtype=tl.int32)  # terms before each one in descending order
    for start in range(0, num_terms, CHUNK):
        o_other = start + tl.arange(0, CHUNK)
        m_other = m_row[:, None] & (o_other < num_terms)[None, :]
        b_other = tl.load(terms_row_ptrs + o_other[None, :], mask=m_other, other=-1.0)[:, None, :]  # [ROWS, 1, CHUNK]
        b_mine = b_terms[:, :, None]  # [ROWS, TERMS, 1]
        m_before = (b_other > b_mine) | ((b_other == b_mine) & (o_other[None, None, :] < o_term[None, :, None]))
        b_place += tl.sum(m_before.to(tl.int32), axis=2)
    tl.debug_barrier()
    tl.store(terms_row_ptrs + b_place, b_terms, mask=m_term)


@triton.jit
def split_query_blocks_kernel(
    sharpness_ptr,  # [B * H, NB] fp32, contiguous
    full_ptr,  # [B * H, Nf] int64: out, ascending
    sparse_ptr,  # [B * H, NB - Nf] int64: out, ascending
    num_blocks,  # NB
    num_full,  # Nf
    BLOCKS: tl.constexpr,  # power of two >= NB
):
    """One program per (batch * head): the Nf sharpest query blocks and the rest, each as
    ascending block ids. Equal sharpness goes to the lower block id first, as a stable
    descending argsort does."""
    batch_head = tl.program_id(0)
    o_block = tl.arange(0, BLOCKS)
    m_block = o_block < num_blocks
    b_sharpness = tl.load(sharpness_ptr + batch_head * num_blocks + o_block, mask=m_block, other=0.0)  # [BLOCKS]
    b_keys = tl.where(m_block, _order_key(b_sharpness), _INT32_MIN)[None, :]  # [1, BLOCKS]
    m_full = _top_k_mask(b_keys, num_full)
    m_sparse = m_block[None, :] & ~m_full
    b_ids = o_block.to(tl.int64)[None, :]  # [1, BLOCKS]
    b_full_rank = tl.cumsum(m_full.to(tl.int32), axis=1) - 1  # [1, BLOCKS]
    b_sparse_rank = tl.cumsum(m_sparse.to(tl.int32), axis=1) - 1  # [1, BLOCKS]
    tl.store(full_ptr + batch_head * num_full + b_full_rank, b_ids, mask=m_full)
    tl.store(sparse_ptr + batch_head * (num_blocks - num_full) + b_sparse_rank, b_ids, mask=m_sparse)


@triton.jit
def select_context_kernel(
    saliency_ptr,  # [B * H, n_cand] fp32, contiguous
    kv_blocks_ptr,  # [B * H, NKV] int64: out, ascending
    num_candidates,  # n_cand
    num_selected,  # K_ctx
    first_candidate,  # block id of candidate 0 (= number of target blocks)
    num_kv,  # NKV
    num_blocks,  # NB
    CANDIDATES: tl.constexpr,  # power of two >= n_cand
    TARGET_TILE: tl.constexpr,  # target block ids written per step
    EXTRA_LAST: tl.constexpr,  # whether the partial last block is kept
):
    """One program per (batch * head): the pruned key/value set as ascending block ids.

    The set is [0, first_candidate) (every block holding a target token), then the K_ctx
    most salient candidates, then the partial last block if EXTRA_LAST; the three ranges
    are disjoint and increasing, so writing them one after the other keeps the order.
    """
    batch_head = tl.program_id(0)
    kv_row_ptr = kv_blocks_ptr + batch_head * num_kv
    for start in range(0, first_candidate, TARGET_TILE):
        o_target = start + tl.arange(0, TARGET_TILE)
        tl.store(kv_row_ptr + o_target, o_target.to(tl.int64), mask=o_target < first_candidate)
    o_cand = tl.arange(0, CANDIDATES)
    m_cand = o_cand < num_candidates
    b_saliency = tl.load(saliency_ptr + batch_head * num_candidates + o_cand, mask=m_cand, other=0.0)  # [CANDIDATES]
    b_keys = tl.where(m_cand, _order_key(b_saliency), _INT32_MIN)[None, :]  # [1, CANDIDATES]
    m_kept = _top_k_mask(b_keys, num_selected)
    b_rank = tl.cumsum(m_kept.to(tl.int32), axis=1) - 1  # [1, CANDIDATES]
    b_ids = (first_candidate + o_cand).to(tl.int64)[None, :]  # [1, CANDIDATES]
    tl.store(kv_row_ptr + first_candidate + b_rank, b_ids, mask=m_kept)
    if EXTRA_LAST:
        o_last = tl.arange(0, 1)
        tl.store(kv_row_ptr + num_kv - 1 + o_last, (o_last + num_blocks - 1).to(tl.int64))


@triton.jit
def exact_blocks_kernel(
    scores_ptr,  # [R, NKV] fp32, contiguous: qbar . kbar_j of all (batch, head, sparse block)
    exact_ptr,  # [R, E] int64: out, ascending positions into kv_blocks
    num_rows,  # R = B * H * Ns
    num_kv,  # NKV
    num_exact,  # E
    ROWS: tl.constexpr,  # rows per program
    KV: tl.constexpr,  # power of two >= NKV
):
    """The positions of the E highest scores of each row, ascending, for ROWS rows per program."""
    o_row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    o_kv = tl.arange(0, KV)
    m_row = o_row < num_rows
    m_scores = m_row[:, None] & (o_kv < num_kv)[None, :]
    o_row_wide = o_row.to(tl.int64)[:, None]  # [ROWS, 1]: row offsets past 2^31 elements
    b_scores = tl.load(scores_ptr + o_row_wide * num_kv + o_kv[None, :], mask=m_scores, other=0.0)  # [ROWS, KV]
    b_keys = tl.where(m_scores, _order_key(b_scores), _INT32_MIN)
    m_exact = _top_k_mask(b_keys, num_exact) & m_row[:, None]
    b_rank = tl.cumsum(m_exact.to(tl.int32), axis=1) - 1  # [ROWS, KV]
    tl.store(exact_ptr + o_row_wide * num_exact + b_rank, o_kv.to(tl.int64)[None, :], mask=m_exact)
