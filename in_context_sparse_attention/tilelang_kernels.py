"""TileLang 0.1.15 kernel builders for ISA: block pooling and the sparse block kernel.

Every builder returns a `T.prim_func`; `tilelang_backend.py` compiles it once per
(head dim, dtype, block size, target) and launches it. Batch, sequence length, heads and
the block counts are dynamic (bound from the tensors' shapes at launch), so one compiled
kernel serves every sequence length: a video's 40 layers x 32 steps, and every test shape,
compile once.

Shapes: B batch, S tokens, H heads, D head dim, b block size, NB = ceil(S / b) blocks,
Ns sparse query blocks, E exact blocks per sparse query block, NKV pruned key/value blocks.
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
            for i, d in T.Parallel(block_size, head_dim):
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
    online-softmax state (running max m, running sum l, accumulator acc) it runs, over key
    tiles of `tile_blocks` * b columns,
      1. the E exact blocks, `tile_blocks` per tile, read through `ExactBlocks` from the
         original K, V; keys past S (only in a partial last block) and slots past E get
         weight 0 and logit -inf;
      2. the pruned blocks, `tile_blocks` * b per tile: logit q . kbar_j, weight n_j, value
         vbar_j (so the value term is n_j e^(logit) vbar_j = e^(logit) Vsum_j). Blocks with
         `TaylorCounts` 0 (the exact ones, and positions past NKV) get logit -inf;
    and rescales acc and l whenever m grows, so both parts share one normaliser. Every
    column's term is weight * e^(logit - m): weight 1 for an exact key, n_j for a block mean.
    Each row written also gets ISA's residual Gate[b, t] * Shortcut[b, h, block] (formed
    in fp32, rounded once; a zero gate when there is none), saving a pass over the output.
    On the H100 at 65,536 tokens one block per tile (5.46 ms) beat two (5.90 ms).

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
    def softmax_step(b_q, b_k, b_v, b_w, b_s, b_p, b_acc, b_m, b_m_prev, b_rescale, b_rowsum, b_l):
        """Fold one key tile (keys b_k, values b_v, column weights b_w) into (m, l, acc)."""
        T.clear(b_s)
        T.gemm(b_q, b_k, b_s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
        for i, j in T.Parallel(rows, cols):
            b_s[i, j] = T.if_then_else(b_w[j] > 0, b_s[i, j], -T.infinity(ACCUM))
        T.copy(b_m, b_m_prev)
        T.reduce_max(b_s, b_m, dim=1, clear=False)
        for i in T.Parallel(rows):
            b_rescale[i] = T.exp2(b_m_prev[i] * scale_log2 - b_m[i] * scale_log2)
        for i, j in T.Parallel(rows, cols):
            b_s[i, j] = T.exp2(b_s[i, j] * scale_log2 - b_m[i] * scale_log2) * b_w[j]
        T.reduce_sum(b_s, b_rowsum, dim=1)
        for i in T.Parallel(rows):
            b_l[i] = b_l[i] * b_rescale[i] + b_rowsum[i]
        T.copy(b_s, b_p)
        for i, d in T.Parallel(rows, head_dim):
            b_acc[i, d] *= b_rescale[i]
        T.gemm(b_p, b_v, b_acc, policy=T.GemmWarpPolicy.FullRow)

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
            b_q = T.alloc_shared([rows, head_dim], dtype)
            b_k = T.alloc_shared([cols, head_dim], dtype)
            b_v = T.alloc_shared([cols, head_dim], dtype)
            b_kbar = T.alloc_shared([cols, head_dim], dtype)
            b_vbar = T.alloc_shared([cols, head_dim], dtype)
            b_o = T.alloc_shared([rows, head_dim], dtype)
            b_w = T.alloc_shared([cols], ACCUM)  # column weights of the current tile
            b_s = T.alloc_fragment([rows, cols], ACCUM)  # logits, then weights
            b_p = T.alloc_fragment([rows, cols], dtype)
            b_acc = T.alloc_fragment([rows, head_dim], ACCUM)
            b_m = T.alloc_fragment([rows], ACCUM)
            b_m_prev = T.alloc_fragment([rows], ACCUM)
            b_rescale = T.alloc_fragment([rows], ACCUM)
            b_rowsum = T.alloc_fragment([rows], ACCUM)
            b_l = T.alloc_fragment([rows], ACCUM)

            query_block = QueryBlocks[bz, by, bx]
            o_q = query_block * block_size
            for i, d in T.Parallel(rows, head_dim):
                b_q[i, d] = T.if_then_else(o_q + i < seq_len, Q[bz, o_q + i, by, d], T.cast(0, dtype))
            T.fill(b_acc, 0)
            T.fill(b_l, 0)
            T.fill(b_m, -T.infinity(ACCUM))

            # One stage: deeper cp.async pipelines over a run-time loop count do not compile
            # under tilelang 0.1.15; several programs per SM hide the load latency instead.
            for t in T.Pipelined(T.ceildiv(num_exact, tile_blocks), num_stages=1):
                for u in T.serial(tile_blocks):
                    o_kv = ExactBlocks[bz, by, bx, T.min(t * tile_blocks + u, num_exact - 1)] * block_size
                    T.copy(K[bz, o_kv : o_kv + block_size, by, :], b_k[u * block_size : (u + 1) * block_size, :])
                    T.copy(V[bz, o_kv : o_kv + block_size, by, :], b_v[u * block_size : (u + 1) * block_size, :])
                for j in T.Parallel(cols):
                    slot = t * tile_blocks + j // block_size
                    token = ExactBlocks[bz, by, bx, T.min(slot, num_exact - 1)] * block_size + j % block_size
                    b_w[j] = T.if_then_else(slot < num_exact and token < seq_len, T.cast(1, ACCUM), T.cast(0, ACCUM))
                softmax_step(b_q, b_k, b_v, b_w, b_s, b_p, b_acc, b_m, b_m_prev, b_rescale, b_rowsum, b_l)

            for c in T.serial(T.ceildiv(num_kv, cols)):
                o_c = c * cols
                T.copy(KeyMeans[bz, by, o_c : o_c + cols, :], b_kbar)
                T.copy(ValueMeans[bz, by, o_c : o_c + cols, :], b_vbar)
                for j in T.Parallel(cols):
                    b_w[j] = T.if_then_else(o_c + j < num_kv, TaylorCounts[bz, by, bx, o_c + j], T.cast(0, ACCUM))
                softmax_step(b_q, b_kbar, b_vbar, b_w, b_s, b_p, b_acc, b_m, b_m_prev, b_rescale, b_rowsum, b_l)

            for i, d in T.Parallel(rows, head_dim):
                gate = T.if_then_else(o_q + i < seq_len, Gate[bz, o_q + i], T.cast(0, ACCUM))
                b_o[i, d] = b_acc[i, d] / b_l[i] + gate * Shortcut[bz, by, query_block, d]
            for i, d in T.Parallel(rows, head_dim):
                if o_q + i < seq_len:
                    Out[bz, o_q + i, by, d] = b_o[i, d]

    return sparse_attention
