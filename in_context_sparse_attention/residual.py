"""ISA step 6's gated residual: out += alpha * Oc[block(token)].

`add_residual` is the PyTorch pass over the finished output, for backends that do not
fuse the residual (the "torch" reference). `GatedShortcut` carries the residual into kernels that add
it while they write their rows (the Triton and TileLang backends' scatter and sparse
kernels), which saves a pass over the whole output; `per_token_gate` prepares alpha for
kernels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .selection import ISAPlan


@dataclass
class GatedShortcut:
    """The residual as kernels read it: row t of head h of batch b gets
    gate[b, t] * shortcut[b, h, t // block_size] added (formed in fp32, rounded once).

    shortcut: [B, H, NB, D] fp32, contiguous (Oc). gate: [B, S] fp32, contiguous.
    """

    shortcut: torch.Tensor
    gate: torch.Tensor

    @classmethod
    def of(cls, plan: ISAPlan, alpha, device: torch.device) -> "GatedShortcut":
        batch = plan.compressed_out.shape[0]
        return cls(plan.compressed_out.contiguous(), per_token_gate(alpha, batch, plan.layout.seq_len, device))


def add_residual(out_padded: torch.Tensor, plan: ISAPlan, alpha) -> None:
    """In place: out_padded[b, t] += alpha[b, t] * Oc[b, :, block(t)] at the real rows.

    Each sum is formed in fp32 and rounded once to out_padded's dtype, with one fp32
    temporary of [B, S, H, D] (the gathered shortcut, scaled in place).

    Args:
        out_padded: [B, NB * b, H, D]; alpha: a float or a tensor broadcastable to [B, S, 1, 1].
    """
    layout = plan.layout
    block_of_token = torch.arange(layout.seq_len, device=out_padded.device) // layout.block_size
    shortcut = plan.compressed_out[:, :, block_of_token].transpose(1, 2)  # [B, S, H, D] fp32, a fresh tensor
    out_padded[:, : layout.seq_len].add_(shortcut.mul_(alpha))


def per_token_gate(alpha, batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """alpha as a contiguous [B, S] fp32 tensor on `device`, for the fused residual kernels.

    A float is filled in on the device: `torch.as_tensor(float, device=cuda)` would copy it
    from the host and make the host wait for the GPU, in the middle of every call.
    Args: alpha: a float or a tensor broadcastable to [B, S, 1, 1].
    """
    if isinstance(alpha, torch.Tensor):
        gate = alpha.to(device=device, dtype=torch.float32).expand(batch, seq_len, 1, 1)
        return gate.reshape(batch, seq_len).contiguous()
    return torch.full((batch, seq_len), float(alpha), dtype=torch.float32, device=device)
