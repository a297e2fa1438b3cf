"""Backend "torch": ISA's pooling and sparse kernel in plain, vectorised PyTorch.

It runs on any device and is the reference the Triton and TileLang kernels are tested
against, so it favours clarity: work is done in fp32 (fp64 for fp64 inputs), in chunks of
heads so that memory stays bounded at 65k tokens.
"""
from __future__ import annotations

import math

import torch

from .backend_base import ISABackend
from .full_attention import block_token_ids, gather_tokens
from .layout import BlockLayout
from .selection import ISAPlan

_CHUNK_ELEMENTS = 1 << 28  # per-chunk budget for the gathered exact keys (1 GiB in fp32)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def pool_blocks(x: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Mean of x over each block, padding excluded: [B, S, H, D] -> [B, H, NB, D] fp32."""
    batch, seq, heads, dim = x.shape
    pad = layout.padded_len - seq
    xp = torch.nn.functional.pad(x.to(_compute_dtype(x.dtype)), (0, 0, 0, 0, 0, pad))
    sums = xp.view(batch, layout.num_blocks, layout.block_size, heads, dim).sum(dim=2)  # [B, NB, H, D]
    counts = layout.block_counts(x.device).to(sums.dtype)
    return (sums / counts[:, None, None]).transpose(1, 2).contiguous()


def sparse_block_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: ISAPlan, out_padded: torch.Tensor
) -> None:
    """Exact top-E blocks plus 0-th order Taylor terms for the diffuse query blocks.

    For a query q of block i and the pruned blocks j (n_j tokens, mean key kbar_j, value
    sum Vsum_j), with E_i the exact blocks of block i:
        out = (sum_{j in E_i} sum_{t in j} e^{q.k_t/sqrt(D)} v_t + sum_{j not in E_i} e^{q.kbar_j/sqrt(D)} Vsum_j)
            / (sum_{j in E_i} sum_{t in j} e^{q.k_t/sqrt(D)}     + sum_{j not in E_i} n_j e^{q.kbar_j/sqrt(D)})
    One max over both parts keeps the exponentials finite.

    Args:
        q, k, v: [B, S, H, D]; out_padded: [B, NB * b, H, D], written at the sparse blocks' rows.
    """
    layout = plan.layout
    seq, bs = layout.seq_len, layout.block_size
    batch, _, heads, dim = q.shape
    num_sparse = plan.sparse_query_blocks.shape[-1]
    if num_sparse == 0:
        return
    num_exact = plan.exact_positions.shape[-1]
    cdtype = _compute_dtype(q.dtype)
    scale = 1.0 / math.sqrt(dim)

    exact_blocks = torch.gather(plan.kv_blocks[:, :, None, :].expand(-1, -1, num_sparse, -1), 3, plan.exact_positions)
    q_ids = block_token_ids(plan.sparse_query_blocks, bs)  # [B, H, Ns * b]
    kv_ids = block_token_ids(exact_blocks, bs)  # [B, H, Ns, E * b]
    kv_valid = kv_ids < seq
    key_means = torch.gather(plan.key_means, 2, plan.kv_blocks[..., None].expand(-1, -1, -1, dim))  # [B, H, NKV, D]
    value_sums = torch.gather(plan.value_sums, 2, plan.kv_blocks[..., None].expand(-1, -1, -1, dim))
    counts = plan.block_counts[plan.kv_blocks].to(cdtype)  # [B, H, NKV]
    is_exact = torch.zeros(
        plan.kv_blocks.shape[:2] + (num_sparse, plan.kv_blocks.shape[-1]), dtype=torch.bool, device=q.device
    )
    is_exact.scatter_(3, plan.exact_positions, True)  # [B, H, Ns, NKV]

    qt, kt, vt, ot = (x.transpose(1, 2) for x in (q, k, v, out_padded))  # [B, H, S, D] views
    heads_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, num_sparse * num_exact * bs * dim))
    for b in range(batch):
        for h0 in range(0, heads, heads_per_chunk):
            hs = slice(h0, min(heads, h0 + heads_per_chunk))
            sel = (slice(b, b + 1), hs)
            n_h = hs.stop - hs.start
            rows = gather_tokens(qt[sel], q_ids[sel].clamp(max=seq - 1)).to(cdtype)
            rows = rows.view(1, n_h, num_sparse, bs, dim)
            ids = kv_ids[sel].flatten(-2).clamp(max=seq - 1)  # [1, h, Ns * E * b]
            keys = gather_tokens(kt[sel], ids).to(cdtype).view(1, n_h, num_sparse, num_exact * bs, dim)
            vals = gather_tokens(vt[sel], ids).to(cdtype).view(1, n_h, num_sparse, num_exact * bs, dim)

            exact_logits = torch.matmul(rows, keys.transpose(-1, -2)) * scale  # [1, h, Ns, b, E*b]
            exact_logits = exact_logits.masked_fill(~kv_valid[sel][..., None, :], -math.inf)
            taylor_keys = key_means[sel][:, :, None].to(cdtype)  # [1, h, 1, NKV, D]
            taylor_logits = torch.matmul(rows, taylor_keys.transpose(-1, -2)) * scale  # [1, h, Ns, b, NKV]
            taylor_logits = taylor_logits.masked_fill(is_exact[sel][..., None, :], -math.inf)
            row_max = torch.maximum(exact_logits.amax(-1, keepdim=True), taylor_logits.amax(-1, keepdim=True))
            exact_w = torch.exp(exact_logits - row_max)
            taylor_w = torch.exp(taylor_logits - row_max)
            numerator = torch.matmul(exact_w, vals) + torch.matmul(taylor_w, value_sums[sel][:, :, None].to(cdtype))
            denominator = exact_w.sum(-1, keepdim=True) + torch.matmul(taylor_w, counts[sel][:, :, None, :, None])
            result = (numerator / denominator).reshape(1, n_h, num_sparse * bs, dim)
            ot[sel].scatter_(2, q_ids[sel][..., None].expand(-1, -1, -1, dim), result.to(out_padded.dtype))


class TorchBackend(ISABackend):
    """Pure PyTorch: any device, any float dtype, any head dim and block size; the
    selection and block copies are `ISABackend`'s PyTorch defaults."""

    name = "torch"
    pool_blocks = staticmethod(pool_blocks)
    sparse_block_attention = staticmethod(sparse_block_attention)
