"""Inputs and checks shared by the kernel tests (Triton and TileLang against "torch")."""
from __future__ import annotations

import math

import torch

from in_context_sparse_attention import reference
from in_context_sparse_attention.backends import get_backend
from in_context_sparse_attention.layout import BlockLayout
from in_context_sparse_attention.selection import ISAPlan, make_plan


def relative_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def max_abs(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref.double()).abs().max().item()


def make_qkv(batch, seq, heads, dim, dtype, device="cpu", scale=1.0, non_contiguous=False, seed=0):
    """Standard normal q, k, v [B, S, H, D]; q scaled by `scale` (logits grow with it).

    non_contiguous: views into a [B, H, S, 2D] buffer (strided on every axis)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    tensors = []
    for i in range(3):
        if non_contiguous:
            x = torch.randn(batch, heads, seq, 2 * dim, generator=gen)[..., ::2].transpose(1, 2)
        else:
            x = torch.randn(batch, seq, heads, dim, generator=gen)
        x = x * (scale if i == 0 else 1.0)
        tensors.append(x.to(device=device, dtype=dtype))
    return tensors


def video_like_qkv(frames, height, width, heads, dim, dtype, device, seed=0):
    """Smooth random fields over a (frame, height, width) grid for the target and a copy
    with 10% noise for the source: q, k, v [1, 2 * frames * height * width, H, D]."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    tensors = []
    for _ in range(3):
        coarse = torch.randn(
            1, heads * dim, max(2, frames // 4), max(2, height // 8), max(2, width // 8), generator=gen
        )
        field = torch.nn.functional.interpolate(
            coarse, size=(frames, height, width), mode="trilinear", align_corners=False
        )
        target = field.flatten(2).transpose(1, 2).reshape(1, -1, heads, dim) * 2.0
        source = target + 0.1 * torch.randn(target.shape, generator=gen)
        tensors.append(torch.cat([target, source], dim=1).to(device=device, dtype=dtype))
    return tensors


def plan_for(q, k, v, t_len, config):
    """Block decisions from the torch backend's pooling, shared by every backend compared."""
    layout = BlockLayout(seq_len=q.shape[1], target_len=t_len, block_size=config.block_size)
    return make_plan(*[reference.pool_blocks(x, layout) for x in (q, k, v)], layout, config)


def poisoned_output(q, layout):
    """[B, NB * b, H, D] of NaN: a row a kernel forgets to write stays NaN."""
    return torch.full(
        (q.shape[0], layout.padded_len, q.shape[2], q.shape[3]), math.nan, dtype=q.dtype, device=q.device
    )


def sparse_rows_mask(plan: ISAPlan) -> torch.Tensor:
    """[B, NB * b, H] True at the real rows of each head's diffuse query blocks."""
    layout = plan.layout
    batch, heads, _ = plan.sparse_query_blocks.shape
    is_sparse = torch.zeros(batch, heads, layout.num_blocks, dtype=torch.bool, device=plan.block_counts.device)
    is_sparse.scatter_(2, plan.sparse_query_blocks, True)
    rows = is_sparse.repeat_interleave(layout.block_size, dim=2).transpose(1, 2).clone()
    rows[:, layout.seq_len :] = False
    return rows


def run_sparse(backend_name, q, k, v, plan):
    """The sparse kernel of one backend alone, into a NaN-poisoned buffer."""
    out = poisoned_output(q, plan.layout)
    get_backend(backend_name).sparse_block_attention(q, k, v, plan, out)
    return out


def check_written_rows(out, plan):
    """Every real row of the diffuse blocks is written and finite; nothing else is written."""
    rows = sparse_rows_mask(plan)
    assert out[rows].isfinite().all(), "a diffuse query row was not written (or is not finite)"
    assert out[~rows].isnan().all(), "the sparse kernel wrote outside the diffuse blocks' real rows"
    return rows


def slice_heads(plan: ISAPlan, heads: slice) -> ISAPlan:
    """The plan restricted to a range of heads."""
    per_head = (
        "key_means",
        "value_sums",
        "compressed_out",
        "kv_blocks",
        "full_query_blocks",
        "sparse_query_blocks",
        "exact_positions",
    )
    return ISAPlan(
        layout=plan.layout,
        block_counts=plan.block_counts,
        **{name: getattr(plan, name)[:, heads] for name in per_head},
    )


def assert_within_precision(got, torch_out, reference_out, rows, floor, record_property=None):
    """The kernel's error against a wider reference is at most twice the torch backend's
    error at the same precision, plus a small floor: a bound that follows the scale of the
    inputs and of the precision, so no test size needs a tolerance of its own.

    record_property: pytest's fixture, to attach the measured errors to the test report.
    """
    err = relative_l2(got[rows], reference_out[rows])
    torch_err = relative_l2(torch_out[rows], reference_out[rows])
    if record_property is not None:
        record_property("rel_l2_vs_reference", err)
        record_property("torch_bf16_rel_l2_vs_reference", torch_err)
        record_property("max_abs_vs_reference", max_abs(got[rows], reference_out[rows]))
    assert err <= 2.0 * torch_err + floor, (err, torch_err)
