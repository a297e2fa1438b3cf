"""TileLang 0.1.15 kernel builders for ISA: block pooling and the sparse block kernel.

Every builder returns a `T.prim_func`; `tilelang_backend.py` compiles it once per
(head dim, dtype, block size, target) and launches it. Batch, sequence length, heads and
the block counts are dynamic (bound from the tensors' shapes at launch), so one compiled
kernel serves every sequence length: a video's 40 layers x 32 steps, and every test shape,
compile once.

Shapes: B batch, S tokens, H heads, D head dim, b block size, NB = ceil(S / b) blocks,
Ns sparse query blocks, E exact blocks per sparse query block, NKV pruned key/value blocks.
Names follow the kernel convention of docs/isa.md: `s_` shared-memory tiles, `b_` tiles
in registers (fragments), `o_` offsets; kernel arguments (global tensors) are CamelCase.
"""
import math

import tilelang.language as T

LOG2E = 1.4426950408889634
ACCUM = "float32"
INDEX = "int32"


def build_pool_blocks(head_dim: int, dtype: str, block_size: int, threads: int = 128):
    """Block means over the token axis, padding excluded.

    Kernel arguments:
        X: [B, S, H, D] `dtype`.
        Out: [B, H, NB, D] fp32; Out[b, h, j] = mean of X[b, j*b' : min(S, (j+1)*b'), h]
            (b' the block size), so a partial last block is averaged over its real tokens.
    Grid: (H, NB, B), one block of tokens of one head per program; heads vary fastest, so
    programs running together stream neighbouring memory.
    """
    batch, seq_len, heads, num_blocks = T.dynamic("batch, seq_len, heads, num_blocks", INDEX)

    @T.prim_func
    def pool_blocks(
        X: T.Tensor([batch, seq_len, heads, head_dim], dtype),
        Out: T.Tensor([batch, heads, num_blocks, head_dim], ACCUM),
    ):
        with T.Kernel(heads, num_blocks, batch, threads=threads) as (bh, bn, bz):
            b_x = T.alloc_fragment([block_size, head_dim], ACCUM)  # [b, D]
            b_sum = T.alloc_fragment([head_dim], ACCUM)  # [D]
            o_first = bn * block_size
            for i, d in T.Parallel(block_size, head_dim):  # b_x [block_size, head_dim]: padding reads as 0
                b_x[i, d] = T.if_then_else(o_first + i < seq_len, X[bz, o_first + i, bh, d], T.cast(0, dtype))
            T.reduce_sum(b_x, b_sum, dim=0)
            n_valid = T.min(seq_len - o_first, block_size)
            for d in T.Parallel(head_dim):
                Out[bz, bh, bn, d] = b_sum[d] / T.cast(n_valid, ACCUM)

    return pool_blocks


def build_sparse_attention(
    head_dim: int,
    dtype: str,
    block_size: int,
    tile_blocks: int = 1,
    threads: int = 128,
):
    """Exact top-E blocks plus 0-th order Taylor terms for the other pruned blocks.

    One program handles one diffuse query block (b queries) of one (batch, head). With one
    online-softmax state (running max b_max, denominator b_sum, numerator b_acc) it runs, over key
    tiles of `tile_blocks` * b columns,
      1. the E exact blocks, `tile_blocks` per tile, read through `ExactBlocks` from the
         original K, V; keys past S (only in a partial last block) and slots past E get
         weight 0 and logit -inf;
      2. the pruned blocks, `tile_blocks` * b per tile: logit q . kbar_j, weight n_j, value
         vbar_j (so the value term is n_j e^(logit) vbar_j = e^(logit) Vsum_j). Blocks with
         `TaylorCounts` 0 (the exact ones, and positions past NKV) get logit -inf;
    and rescales b_acc and b_sum whenever b_max grows, so both parts share one normaliser.
    Every column's term is weight * e^(logit - b_max): weight 1 for an exact key, n_j for a
    block mean.
    Each row written also gets ISA's residual Gate[b, t] * Shortcut[b, h, block] (formed
    in fp32, rounded once; a zero gate when there is none), saving a pass over the output.
    One block per tile (the default) ran faster than two on the H100 (docs/benchmarks.md).

    Kernel arguments:
        Q, K, V: [B, S, H, D] `dtype`.
        QueryBlocks: [B, H, Ns] int32, the query block of each program.
        ExactBlocks: [B, H, Ns, E] int32, original block ids of the exact blocks (E >= 1).
        KeyMeans, ValueMeans: [B, H, NKV, D] `dtype`, kbar_j and vbar_j of the pruned blocks.
        TaylorCounts: [B, H, Ns, NKV] fp32, n_j, or 0 where block j is exact for that query block.
        Shortcut: [B, H, NB, D] fp32, Oc (the residual shortcut of each block).
        Gate: [B, S] fp32, the residual's per-token gate.
        Out: [B, NB * b, H, D] `dtype`; the real rows (< S) of each query block are
            written, nothing else.
    Grid: (Ns, H, B).
    """
    batch, seq_len, heads, padded_len = T.dynamic("batch, seq_len, heads, padded_len", INDEX)
    num_sparse, num_exact, num_kv, num_blocks = T.dynamic("num_sparse, num_exact, num_kv, num_blocks", INDEX)
    scale_log2 = LOG2E / math.sqrt(head_dim)
    rows, cols = block_size, tile_blocks * block_size

    @T.macro
    def softmax_step(s_q, s_k, s_v, s_w, b_scores, b_p, b_acc, b_max, b_max_prev, b_rescale, b_tile_sum, b_sum):
        """Fold one key tile (keys s_k [cols, head_dim], values s_v [cols, head_dim], column
        weights s_w [cols]) into (b_max, b_sum, b_acc)."""
        T.clear(b_scores)
        T.gemm(s_q, s_k, b_scores, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
        for i, j in T.Parallel(rows, cols):
            b_scores[i, j] = T.if_then_else(s_w[j] > 0, b_scores[i, j], -T.infinity(ACCUM))
        T.copy(b_max, b_max_prev)
        T.reduce_max(b_scores, b_max, dim=1, clear=False)
        for i in T.Parallel(rows):
            b_rescale[i] = T.exp2(b_max_prev[i] * scale_log2 - b_max[i] * scale_log2)
        for i, j in T.Parallel(rows, cols):
            b_scores[i, j] = T.exp2(b_scores[i, j] * scale_log2 - b_max[i] * scale_log2) * s_w[j]
        T.reduce_sum(b_scores, b_tile_sum, dim=1)
        for i in T.Parallel(rows):
            b_sum[i] = b_sum[i] * b_rescale[i] + b_tile_sum[i]
        T.copy(b_scores, b_p)
        for i, d in T.Parallel(rows, head_dim):
            b_acc[i, d] *= b_rescale[i]
        T.gemm(b_p, s_v, b_acc, policy=T.GemmWarpPolicy.FullRow)

    @T.prim_func
    def sparse_attention(
        Q: T.Tensor([batch, seq_len, heads, head_dim], dtype),
        K: T.Tensor([batch, seq_len, heads, head_dim], dtype),
        V: T.Tensor([batch, seq_len, heads, head_dim], dtype),
        QueryBlocks: T.Tensor([batch, heads, num_sparse], INDEX),
        ExactBlocks: T.Tensor([batch, heads, num_sparse, num_exact], INDEX),
        KeyMeans: T.Tensor([batch, heads, num_kv, head_dim], dtype),
        ValueMeans: T.Tensor([batch, heads, num_kv, head_dim], dtype),
        TaylorCounts: T.Tensor([batch, heads, num_sparse, num_kv], ACCUM),
        Shortcut: T.Tensor([batch, heads, num_blocks, head_dim], ACCUM),
        Gate: T.Tensor([batch, seq_len], ACCUM),
        Out: T.Tensor([batch, padded_len, heads, head_dim], dtype),
    ):
        with T.Kernel(num_sparse, heads, batch, threads=threads) as (bx, by, bz):
            s_q = T.alloc_shared([rows, head_dim], dtype)
            s_k = T.alloc_shared([cols, head_dim], dtype)
            s_v = T.alloc_shared([cols, head_dim], dtype)
            s_kbar = T.alloc_shared([cols, head_dim], dtype)
            s_vbar = T.alloc_shared([cols, head_dim], dtype)
            s_o = T.alloc_shared([rows, head_dim], dtype)
            s_w = T.alloc_shared([cols], ACCUM)  # column weights of the current tile
            b_scores = T.alloc_fragment([rows, cols], ACCUM)  # logits, then weights
            b_p = T.alloc_fragment([rows, cols], dtype)
            b_acc = T.alloc_fragment([rows, head_dim], ACCUM)
            b_max = T.alloc_fragment([rows], ACCUM)
            b_max_prev = T.alloc_fragment([rows], ACCUM)
            b_rescale = T.alloc_fragment([rows], ACCUM)
            b_tile_sum = T.alloc_fragment([rows], ACCUM)
            b_sum = T.alloc_fragment([rows], ACCUM)

            query_block = QueryBlocks[bz, by, bx]
            o_q = query_block * block_size
            for i, d in T.Parallel(rows, head_dim):  # s_q [rows, head_dim]: rows past S read as 0
                s_q[i, d] = T.if_then_else(o_q + i < seq_len, Q[bz, o_q + i, by, d], T.cast(0, dtype))
            T.fill(b_acc, 0)
            T.fill(b_sum, 0)
            T.fill(b_max, -T.infinity(ACCUM))

            # One stage: deeper cp.async pipelines over a run-time loop count do not compile
            # under tilelang 0.1.15; several programs per SM hide the load latency instead.
            for t in T.Pipelined(T.ceildiv(num_exact, tile_blocks), num_stages=1):
                for u in T.serial(tile_blocks):
                    o_kv = ExactBlocks[bz, by, bx, T.min(t * tile_blocks + u, num_exact - 1)] * block_size
                    # [block_size, head_dim] into rows [u * b, (u + 1) * b) of s_k, s_v [cols, head_dim]
                    T.copy(K[bz, o_kv : o_kv + block_size, by, :], s_k[u * block_size : (u + 1) * block_size, :])
                    T.copy(V[bz, o_kv : o_kv + block_size, by, :], s_v[u * block_size : (u + 1) * block_size, :])
                for j in T.Parallel(cols):  # s_w [cols]
                    slot = t * tile_blocks + j // block_size
                    token = ExactBlocks[bz, by, bx, T.min(slot, num_exact - 1)] * block_size + j % block_size
                    s_w[j] = T.if_then_else(slot < num_exact and token < seq_len, T.cast(1, ACCUM), T.cast(0, ACCUM))
                softmax_step(s_q, s_k, s_v, s_w, b_scores, b_p, b_acc, b_max, b_max_prev, b_rescale, b_tile_sum, b_sum)

            for c in T.serial(T.ceildiv(num_kv, cols)):
                o_c = c * cols
                T.copy(KeyMeans[bz, by, o_c : o_c + cols, :], s_kbar)  # [cols, head_dim]
                T.copy(ValueMeans[bz, by, o_c : o_c + cols, :], s_vbar)  # [cols, head_dim]
                for j in T.Parallel(cols):  # s_w [cols]
                    s_w[j] = T.if_then_else(o_c + j < num_kv, TaylorCounts[bz, by, bx, o_c + j], T.cast(0, ACCUM))
                softmax_step(
                    s_q, s_kbar, s_vbar, s_w, b_scores, b_p, b_acc, b_max, b_max_prev, b_rescale, b_tile_sum, b_sum
                )

            for i, d in T.Parallel(rows, head_dim):
                gate = T.if_then_else(o_q + i < seq_len, Gate[bz, o_q + i], T.cast(0, ACCUM))
                s_o[i, d] = b_acc[i, d] / b_sum[i] + gate * Shortcut[bz, by, query_block, d]
            for i, d in T.Parallel(rows, head_dim):
                if o_q + i < seq_len:
                    Out[bz, o_q + i, by, d] = s_o[i, d]

    return sparse_attention
