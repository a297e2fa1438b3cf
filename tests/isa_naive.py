"""An independent, deliberately naive float64 ISA written straight from the steps of docs/isa.md.

It loops over batches, heads, blocks and query rows and shares no code with the package,
so that the "torch" backend (and through it every kernel) is checked against the text of
the specification rather than against itself.
"""
from __future__ import annotations

import math

import torch


def _softmax_rows(logits: torch.Tensor) -> torch.Tensor:
    logits = logits - logits.max(dim=-1, keepdim=True).values
    weights = logits.exp()
    return weights / weights.sum(dim=-1, keepdim=True)


def naive_isa(q, k, v, t_seq_len, s_seq_len, alpha=None, *, block_size=64, select_ratio=0.125,
              sparsity=0.0625, sharpness_ratio=0.0625, flat_ratio=0.5):
    """ISA in float64 with Python loops. q, k, v: [B, S, H, D]; returns [B, S, H, D] float64."""
    q, k, v = (x.detach().to(torch.float64).cpu() for x in (q, k, v))
    batch, seq, heads, dim = q.shape
    assert seq == t_seq_len + s_seq_len
    b = block_size
    nb = math.ceil(seq / b)
    bounds = [(j * b, min(seq, (j + 1) * b)) for j in range(nb)]
    last_partial = seq % b != 0
    n_t = max(1, t_seq_len // b)
    target_blocks = math.ceil(t_seq_len / b)
    scale = 1.0 / math.sqrt(dim)
    if alpha is None:
        alpha_tok = torch.zeros(batch, seq)
    elif isinstance(alpha, torch.Tensor):
        alpha_tok = alpha.to(torch.float64).cpu().expand(batch, seq, 1, 1)[:, :, 0, 0]
    else:
        alpha_tok = torch.full((batch, seq), float(alpha), dtype=torch.float64)

    out = torch.zeros(batch, seq, heads, dim, dtype=torch.float64)
    for bi in range(batch):
        for h in range(heads):
            qh, kh, vh = q[bi, :, h], k[bi, :, h], v[bi, :, h]
            qc = torch.stack([qh[s:e].mean(0) for s, e in bounds])
            kc = torch.stack([kh[s:e].mean(0) for s, e in bounds])
            vc = torch.stack([vh[s:e].mean(0) for s, e in bounds])
            probs = _softmax_rows(qc @ kc.T * scale)
            oc = probs @ vc

            candidates = [j for j in range(target_blocks, nb) if not (last_partial and j == nb - 1)]
            k_ctx = math.floor(len(candidates) * select_ratio)
            saliency = {j: probs[:n_t, j].sum().item() for j in candidates}
            selected = sorted(candidates, key=lambda j: -saliency[j])[:k_ctx]
            pruned = set(range(target_blocks)) | set(selected)
            if last_partial:
                pruned.add(nb - 1)
            pruned = sorted(pruned)
            kv_tokens = [t for j in pruned for t in range(*bounds[j])]

            k_s = max(1, math.floor(n_t * sharpness_ratio))
            sharpness = [sorted(probs[i, :n_t].tolist(), reverse=True)[:k_s] for i in range(nb)]
            sharpness = [sum(values) for values in sharpness]
            n_full = math.floor(nb * flat_ratio)
            full = set(sorted(range(nb), key=lambda i: -sharpness[i])[:n_full])
            n_exact = max(1, math.floor(sparsity * len(pruned)))

            for i, (s, e) in enumerate(bounds):
                if i in full:
                    weights = _softmax_rows(qh[s:e] @ kh[kv_tokens].T * scale)
                    rows = weights @ vh[kv_tokens]
                else:
                    block_scores = {j: (qc[i] @ kc[j]).item() for j in pruned}
                    exact = set(sorted(pruned, key=lambda j: -block_scores[j])[:n_exact])
                    exact_tokens = [t for j in pruned if j in exact for t in range(*bounds[j])]
                    taylor = [j for j in pruned if j not in exact]
                    taylor_counts = torch.tensor(
                        [float(bounds[j][1] - bounds[j][0]) for j in taylor], dtype=torch.float64
                    )
                    taylor_sums = (
                        torch.stack([vh[slice(*bounds[j])].sum(0) for j in taylor])
                        if taylor
                        else torch.zeros(0, dim, dtype=torch.float64)
                    )
                    rows = torch.empty(e - s, dim, dtype=torch.float64)
                    for r in range(e - s):
                        query = qh[s + r]
                        exact_logits = kh[exact_tokens] @ query * scale
                        taylor_logits = kc[taylor] @ query * scale if taylor else torch.zeros(0, dtype=torch.float64)
                        top = torch.cat([exact_logits, taylor_logits]).max()
                        exact_w, taylor_w = (exact_logits - top).exp(), (taylor_logits - top).exp()
                        numerator = exact_w @ vh[exact_tokens] + taylor_w @ taylor_sums
                        denominator = exact_w.sum() + taylor_w @ taylor_counts
                        rows[r] = numerator / denominator
                out[bi, s:e, h] = rows + alpha_tok[bi, s:e, None] * oc[i]
    return out
