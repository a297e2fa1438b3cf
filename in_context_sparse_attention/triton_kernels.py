"""Triton kernels of ISA: block pooling and the sparse (exact top-E + Taylor) attention.

Pointer arithmetic and host-built tensor descriptors only (no block pointers), so the
same source runs on triton 3.6 (GPU) and on triton 3.9's CPU interpreter
(TRITON_INTERPRET=1). Host-side launching lives in `triton_backend.py` and
`triton_block_copies.py`: every argument by keyword, an absent optional input as None,
and the compile-time flags that follow from the arguments (HAS_RESIDUAL, INTERPRETER)
derived by `triton.heuristics` rather than passed.

Names follow the kernel convention of docs/isa.md (`b_` tiles in registers, `o_` offsets,
`m_` masks only, `_ptr(s)` / `_desc` pointers and descriptors, upper case constexprs).
Token tensors are [B, S, H, D] with any strides; every softmax works in base 2 with the
scale 1/sqrt(D) * log2(e) folded into one constant.
"""
from __future__ import annotations

import triton
import triton.language as tl


def _has_residual(args: dict) -> bool:
    """HAS_RESIDUAL: whether ISA's residual was passed (shortcut_ptr and gate_ptr, both or
    neither; None stands for an absent one)."""
    has_shortcut, has_gate = args["shortcut_ptr"] is not None, args["gate_ptr"] is not None
    if has_shortcut != has_gate:
        raise ValueError("the residual needs both shortcut_ptr and gate_ptr, or neither (None)")
    return has_shortcut


def _on_interpreter(args: dict) -> bool:
    """INTERPRETER: whether the kernel runs on triton's CPU interpreter (its output is a CPU tensor)."""
    return args["out_ptr"].device.type == "cpu"


# Compile-time flags derived from the arguments, so that a caller cannot pass them wrong.
_FLAGS = triton.heuristics({"HAS_RESIDUAL": _has_residual, "INTERPRETER": _on_interpreter})


@triton.jit
def pool_blocks_kernel(
    x_ptr,  # [B, S, H, D], any strides
    out_ptr,  # [B, H, NB, D] fp32, contiguous
    seq_len,
    heads,
    num_blocks,
    stride_xb,
    stride_xs,
    stride_xh,
    stride_xd,
    BLOCK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """One program per (batch * head, block): the mean of the block's real tokens.
    Neighbouring programs read neighbouring heads, so a block's rows stream contiguously.

    Contract: a partial last block is averaged over its `seq_len - block * BLOCK` real
    tokens; padding positions are never loaded.
    """
    batch_head = tl.program_id(0)
    block = tl.program_id(1)
    batch = batch_head // heads
    head = batch_head % heads
    o_tok = block * BLOCK + tl.arange(0, BLOCK)
    o_d = tl.arange(0, HEAD_DIM)
    m_tok = o_tok < seq_len
    x_ptrs = x_ptr + batch * stride_xb + head * stride_xh + o_tok[:, None] * stride_xs + o_d[None, :] * stride_xd
    b_x = tl.load(x_ptrs, mask=m_tok[:, None], other=0.0).to(tl.float32)  # [BLOCK, HEAD_DIM]
    count = tl.minimum(seq_len - block * BLOCK, BLOCK)
    b_mean = tl.sum(b_x, axis=0) / count  # [HEAD_DIM]
    tl.store(out_ptr + (batch_head * num_blocks + block) * HEAD_DIM + o_d, b_mean)


@triton.jit
def _dot(b_a, b_b, INTERPRETER: tl.constexpr):
    """b_a @ b_b with fp32 accumulation. On the CPU interpreter the (already rounded)
    operands are upcast first: triton 3.9's interpreter mis-reads 16-bit float operands."""
    if INTERPRETER:
        return tl.dot(b_a.to(tl.float32), b_b.to(tl.float32))
    return tl.dot(b_a, b_b)


@triton.jit
def _round_to(b_x, dtype: tl.constexpr, INTERPRETER: tl.constexpr):
    """fp32 b_x rounded to `dtype` to nearest even, as the GPU does; triton 3.9's
    interpreter truncates fp32 -> bf16, so there the rounding is done on the bits."""
    if INTERPRETER and dtype == tl.bfloat16:
        b_bits = b_x.to(tl.uint32, bitcast=True)
        b_bits = (b_bits + 0x7FFF + ((b_bits >> 16) & 1)) & 0xFFFF0000
        return b_bits.to(tl.float32, bitcast=True).to(dtype)
    return b_x.to(dtype)


@triton.jit
def _online_softmax_step(b_scores, b_max, b_sum, b_acc, b_weights, b_values, INTERPRETER: tl.constexpr):
    """Fold one tile of base-2 logits into the running state: b_max [BLOCK] the running
    max, b_sum [BLOCK] the running denominator, b_acc [BLOCK, D] the running numerator.

    b_scores: [BLOCK, N] base-2 logits, -inf where a column does not take part.
    b_weights: [N] multiplicity of each column in the denominator (token count of a
    Taylor block, 1 for an exact key). b_values: [N, D] what each column adds.
    Whenever the running max grows, everything accumulated so far is rescaled.
    """
    b_max_new = tl.maximum(b_max, tl.max(b_scores, axis=1))  # [BLOCK]
    b_shift = tl.where(b_max_new == float("-inf"), 0.0, b_max_new)  # a row with nothing yet stays at 0
    b_rescale = tl.exp2(b_max - b_shift)  # [BLOCK]
    b_p = tl.exp2(b_scores - b_shift[:, None])  # [BLOCK, N]
    b_sum = b_sum * b_rescale + tl.sum(b_p * b_weights[None, :], axis=1)
    b_acc = b_acc * b_rescale[:, None] + _dot(_round_to(b_p, b_values.dtype, INTERPRETER), b_values, INTERPRETER)
    return b_max_new, b_sum, b_acc


@triton.jit
def _with_residual(
    b_out,
    shortcut_ptr,
    gate_ptr,
    batch,
    batch_head,
    block,
    seq_len,
    num_blocks,
    BLOCK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """b_out [BLOCK, D] fp32 (the rows of one block of one head) plus ISA's residual
    gate[b, t] * Oc[b, h, block]; rows past S get nothing (their gate reads as 0)."""
    o_tok = block * BLOCK + tl.arange(0, BLOCK)
    b_gate = tl.load(gate_ptr + batch * seq_len + o_tok, mask=o_tok < seq_len, other=0.0)  # [BLOCK]
    o_d = tl.arange(0, HEAD_DIM)
    b_shortcut = tl.load(shortcut_ptr + (batch_head * num_blocks + block) * HEAD_DIM + o_d)  # [HEAD_DIM]
    return b_out + b_gate[:, None] * b_shortcut[None, :]


@_FLAGS
@triton.jit
def sparse_block_attention_kernel(
    q_desc,  # descriptor of q viewed as [B, S, H * D], block [1, BLOCK, HEAD_DIM]
    k_desc,  # the same for k
    v_desc,  # the same for v
    out_ptr,  # [B, NB * BLOCK, H, D], any strides
    taylor_keys_desc,  # of [B * H, NKV, D] (q's dtype), block [1, TAYLOR_TILE, HEAD_DIM]: kbar of each pruned block
    taylor_values_desc,  # the same for Vsum of each pruned block
    taylor_counts_ptr,  # [B, H, NKV] fp32, contiguous: n_j of each pruned block
    sparse_blocks_ptr,  # [B, H, Ns] int32, contiguous: diffuse query block ids
    exact_positions_ptr,  # [B, H, Ns, E] int32, contiguous: positions into kv_blocks
    exact_blocks_ptr,  # [B, H, Ns, E] int32, contiguous: the same as original block ids
    shortcut_ptr,  # [B, H, NB, D] fp32, contiguous: Oc; None without the residual
    gate_ptr,  # [B, S] fp32, contiguous: the residual's per-token gate; None without it
    seq_len,
    heads,
    num_blocks,
    num_kv,
    num_sparse,
    num_exact,
    qk_scale_log2,  # 1/sqrt(D) * log2(e)
    stride_ob,
    stride_os,
    stride_oh,
    stride_od,
    BLOCK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    TAYLOR_TILE: tl.constexpr,  # pruned blocks per Taylor tile
    EXACT_PAD: tl.constexpr,  # power of two >= E
    TAYLOR_STAGES: tl.constexpr,  # software-pipeline depth of the Taylor loop
    HAS_RESIDUAL: tl.constexpr,  # derived (_FLAGS): add gate * Oc to every row written (_with_residual)
    INTERPRETER: tl.constexpr,  # derived (_FLAGS): True on the CPU interpreter (see _dot, _round_to)
):
    """One program per (diffuse query block, batch * head).

    q, k, v and the Taylor operands are read through tensor descriptors (TMA on Hopper):
    no per-element addresses in registers, and rows past the end of a tensor read as
    zeros. The Taylor operands are laid out per pruned block (NKV rows per head: 12 MB in
    all at 65,536 tokens, 40 heads) and already rounded to the operand dtype; k and v
    are read in place. fp32 inputs: tl.dot runs in TF32 on the GPU (exact fp32 on the CPU).

    out_q = (sum_{j in E} sum_{t in j} 2^{s_qt} v_t + sum_{j not in E} 2^{s_qj} Vsum_j)
          / (sum_{j in E} sum_{t in j} 2^{s_qt}     + sum_{j not in E} n_j 2^{s_qj})
    with s_qt = q.k_t * qk_scale_log2 and s_qj = q.kbar_j * qk_scale_log2, in one
    online-softmax state over the Taylor tiles and then the exact blocks.

    Contract: a partial key block (only the last block of the grid) contributes its
    n_j real tokens, the others get logit -inf; padding rows of a partial query block
    read as zeros and are never stored, so out's padding rows are left as they were.
    Every row sees E >= 1 exact blocks, each with at least one real token, so the
    denominator is positive.
    """
    sparse_index = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = batch_head // heads
    head = batch_head % heads
    column = head * HEAD_DIM  # of this head in the [B, S, H * D] views

    query_block = tl.load(sparse_blocks_ptr + batch_head * num_sparse + sparse_index)  # scalar
    b_q = tl.reshape(q_desc.load([batch, query_block * BLOCK, column]), [BLOCK, HEAD_DIM])  # [BLOCK, HEAD_DIM]

    b_max = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    b_sum = tl.zeros([BLOCK], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)

    table_row = (batch_head * num_sparse + sparse_index) * num_exact
    o_e = tl.arange(0, EXACT_PAD)
    b_exact_positions = tl.load(exact_positions_ptr + table_row + o_e, mask=o_e < num_exact, other=-1)  # [EXACT_PAD]

    # Taylor terms: every pruned block that is not exact, through its mean key.
    for kv_start in tl.range(0, num_kv, TAYLOR_TILE, num_stages=TAYLOR_STAGES):
        o_kv = kv_start + tl.arange(0, TAYLOR_TILE)
        m_kv = o_kv < num_kv
        m_exact = tl.sum((o_kv[:, None] == b_exact_positions[None, :]).to(tl.int32), axis=1) > 0  # [TAYLOR_TILE]
        m_taylor = m_kv & (m_exact == 0)
        # [TAYLOR_TILE, HEAD_DIM] each: kbar and Vsum of the tile's pruned blocks
        b_kbar = tl.reshape(taylor_keys_desc.load([batch_head, kv_start, 0]), [TAYLOR_TILE, HEAD_DIM])
        b_vsum = tl.reshape(taylor_values_desc.load([batch_head, kv_start, 0]), [TAYLOR_TILE, HEAD_DIM])
        b_counts = tl.load(taylor_counts_ptr + batch_head * num_kv + o_kv, mask=m_kv, other=0.0)  # [TAYLOR_TILE]
        b_scores = _dot(b_q, tl.trans(b_kbar), INTERPRETER) * qk_scale_log2  # [BLOCK, TAYLOR_TILE]
        b_scores = tl.where(m_taylor[None, :], b_scores, float("-inf"))
        b_max, b_sum, b_acc = _online_softmax_step(b_scores, b_max, b_sum, b_acc, b_counts, b_vsum, INTERPRETER)

    # Exact blocks: their real tokens, read from the original k and v through the table.
    b_ones = tl.full([BLOCK], 1.0, dtype=tl.float32)
    for e in range(0, num_exact):
        key_block = tl.load(exact_blocks_ptr + table_row + e)  # scalar
        b_k = tl.reshape(k_desc.load([batch, key_block * BLOCK, column]), [BLOCK, HEAD_DIM])  # [BLOCK, HEAD_DIM]
        b_v = tl.reshape(v_desc.load([batch, key_block * BLOCK, column]), [BLOCK, HEAD_DIM])  # [BLOCK, HEAD_DIM]
        m_k = key_block * BLOCK + tl.arange(0, BLOCK) < seq_len
        b_scores = _dot(b_q, tl.trans(b_k), INTERPRETER) * qk_scale_log2  # [BLOCK, BLOCK]
        b_scores = tl.where(m_k[None, :], b_scores, float("-inf"))
        b_max, b_sum, b_acc = _online_softmax_step(b_scores, b_max, b_sum, b_acc, b_ones, b_v, INTERPRETER)

    b_out = b_acc / b_sum[:, None]
    if HAS_RESIDUAL:
        b_out = _with_residual(
            b_out, shortcut_ptr, gate_ptr, batch, batch_head, query_block, seq_len, num_blocks, BLOCK, HEAD_DIM
        )
    o_q = query_block * BLOCK + tl.arange(0, BLOCK)
    o_d = tl.arange(0, HEAD_DIM)
    out_ptrs = out_ptr + batch * stride_ob + head * stride_oh + o_q[:, None] * stride_os + o_d[None, :] * stride_od
    tl.store(out_ptrs, _round_to(b_out, out_ptr.dtype.element_ty, INTERPRETER), mask=(o_q < seq_len)[:, None])


SPARSE_TUNING_CONFIGS = [
    triton.Config({"TAYLOR_STAGES": taylor_stages}, num_warps=4, num_stages=stages)
    for taylor_stages in (1, 2)
    for stages in (2, 3)
]
# GPU entry: tuned once per (head dim, block size, NKV, E) on the first call.
sparse_block_attention_kernel_tuned = triton.autotune(
    configs=SPARSE_TUNING_CONFIGS, key=["num_kv", "num_exact", "HEAD_DIM", "BLOCK"]
)(sparse_block_attention_kernel)


@triton.jit
def gather_blocks_kernel(
    x_ptr,  # [B, S, H, D], any strides
    blocks_ptr,  # [B, H, N] int64, contiguous: the block id of each slot
    out_ptr,  # [B, H, L, D], contiguous: written
    seq_len,
    heads,
    num_slots,  # N
    num_tokens,  # L <= N * BLOCK
    stride_xb,
    stride_xs,
    stride_xh,
    stride_xd,
    BLOCK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """One program per (batch * head, slot): out[b, h, slot * BLOCK + r] = x[b, block * BLOCK + r, h]
    for the rows below L; a token past S (only in a partial last block) is written as 0.
    Heads vary fastest, so programs running together read neighbouring memory."""
    batch_head = tl.program_id(0)
    slot = tl.program_id(1)
    batch = batch_head // heads
    head = batch_head % heads
    block = tl.load(blocks_ptr + batch_head * num_slots + slot)  # scalar
    o_r = tl.arange(0, BLOCK)
    o_d = tl.arange(0, HEAD_DIM)
    o_tok = block * BLOCK + o_r
    o_row = slot * BLOCK + o_r
    x_ptrs = x_ptr + batch * stride_xb + head * stride_xh + o_tok[:, None] * stride_xs + o_d[None, :] * stride_xd
    b_x = tl.load(x_ptrs, mask=(o_tok < seq_len)[:, None], other=0.0)  # [BLOCK, HEAD_DIM]
    tl.store(
        out_ptr + (batch_head * num_tokens + o_row[:, None]) * HEAD_DIM + o_d[None, :],
        b_x,
        mask=(o_row < num_tokens)[:, None],
    )


@_FLAGS
@triton.jit
def scatter_blocks_kernel(
    rows_ptr,  # [B, H, N * BLOCK, D], any strides
    blocks_ptr,  # [B, H, N] int64, contiguous: the block id of each slot
    out_ptr,  # [B, NB * BLOCK, H, D], contiguous: written at the slots' blocks
    shortcut_ptr,  # [B, H, NB, D] fp32, contiguous: Oc; None without the residual
    gate_ptr,  # [B, S] fp32, contiguous: the residual's per-token gate; None without it
    seq_len,  # S, the gate's row length; None without the residual
    heads,
    num_slots,  # N
    num_blocks,  # NB
    stride_rb,
    stride_rh,
    stride_rs,
    stride_rd,
    BLOCK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,  # derived (_FLAGS): add gate * Oc to every row written (_with_residual)
    INTERPRETER: tl.constexpr,  # derived (_FLAGS): True on the CPU interpreter (see _round_to)
):
    """One program per (batch * head, slot): out[b, block * BLOCK + r, h] = rows[b, h, slot * BLOCK + r]
    for every r (out has the padding rows of a partial last block), plus the residual."""
    batch_head = tl.program_id(0)
    slot = tl.program_id(1)
    batch = batch_head // heads
    head = batch_head % heads
    block = tl.load(blocks_ptr + batch_head * num_slots + slot)  # scalar
    o_r = tl.arange(0, BLOCK)
    o_d = tl.arange(0, HEAD_DIM)
    rows_ptrs = (
        rows_ptr
        + batch * stride_rb
        + head * stride_rh
        + (slot * BLOCK + o_r[:, None]) * stride_rs
        + o_d[None, :] * stride_rd
    )
    b_rows = tl.load(rows_ptrs)  # [BLOCK, HEAD_DIM]
    if HAS_RESIDUAL:
        b_out = b_rows.to(tl.float32)
        b_out = _with_residual(
            b_out, shortcut_ptr, gate_ptr, batch, batch_head, block, seq_len, num_blocks, BLOCK, HEAD_DIM
        )
        b_rows = _round_to(b_out, out_ptr.dtype.element_ty, INTERPRETER)
    o_out_row = batch * num_blocks * BLOCK + block * BLOCK + o_r
    tl.store(
        out_ptr + (o_out_row[:, None] * heads + head) * HEAD_DIM + o_d[None, :], b_rows.to(out_ptr.dtype.element_ty)
    )
