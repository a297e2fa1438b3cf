"""The LIVEditor-14B diffusion transformer: a Wan 2.2 T2V-A14B expert edited in context.

The noisy target latent and the clean source latent are patch-embedded by two Conv3d
layers (`patch_embedding`, `source_video_embedding_more_memory`) and concatenated into one
sequence [target tokens (T) | source tokens (C)]. Every block self-attends over all
S = T + C tokens (dense, or In-Context Sparse Attention, swappable at run time), then
cross-attends to the text; only the target tokens go through the output head.

Parameter names follow Wan's original `wan/modules/model.py`, so Wan 2.2 expert shards and
LIVEditor's `liveditor_ckpt.bin` load without renaming (see `wanx.dit_loader`).

Precision, as in Wan (each decision is repeated where it happens):
- the residual stream, the modulation and the gates stay fp32;
- RoPE angles and rotations and the sinusoidal time embedding are computed in float64;
- the time embedding, its projection and the output head run in fp32 (Wan runs them in
  fp32 autocast regions, here `Fp32Linear`); every other matmul runs in the model's
  `compute_dtype` (bf16 on GPU), with explicit casts rather than autocast.

Every weight is read inside the forward of the module that owns it, and no dtype is read
from a weight that a storage hook may have recast, so diffusers' hooks work on this model:
`apply_group_offloading` moves a module's weights in just before its forward runs, and
`apply_layerwise_casting` upcasts them (e.g. from fp8 storage) just before; see `wanx.memory`.

The memory-bound steps (RMSNorm, RoPE, LayerNorm + modulation + cast, gated residuals) go
through `wanx.fused_ops`: fused Triton kernels on CUDA, their PyTorch references on CPU;
RoPE and the residuals are bit-identical to the references, the norms agree to fp32 rounding.
"""
from __future__ import annotations

import logging
import math
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from in_context_sparse_attention import ISAConfig, dense_attention
from wanx import fused_ops
from wanx.attention import DenseAttention, SelfAttentionMethod, TokenLayout, make_attention

logger = logging.getLogger(__name__)

ROPE_THETA = 10000.0
ROPE_MAX_POSITIONS = 1024  # Wan's RoPE table has 1024 rows per axis
TIME_THETA = 10000.0

# A small random model for tests and the CPU demo: head_dim 32 splits into RoPE
# dims 12 / 10 / 10 for (frame, height, width).
TINY_CONFIG = dict(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32, freq_dim=32, text_len=512)


def sinusoidal_embedding(dim: int, timesteps: torch.Tensor) -> torch.Tensor:
    """Wan's sinusoidal time embedding, in float64 (cos first).

    Args:
        dim: embedding width (even).
        timesteps: [N] diffusion timesteps (any dtype).
    Returns:
        [N, dim] float64: [cos(t * w_j), sin(t * w_j)] with w_j = 10000^(-j / (dim/2)).
    """
    half = dim // 2
    position = timesteps.to(torch.float64)
    inv_freq = torch.pow(TIME_THETA, -torch.arange(half, dtype=torch.float64, device=position.device) / half)
    angles = torch.outer(position, inv_freq)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Wan's split of head_dim into (frame, height, width) RoPE dims: 44/42/42 for 128."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    sixth = head_dim // 6
    return head_dim - 4 * sixth, 2 * sixth, 2 * sixth


def rope_frequencies(grids: Sequence[Sequence[int]], head_dim: int, device=None) -> torch.Tensor:
    """Unit complex rotations for token sequences laid out as (frame, height, width) grids.

    Each grid's positions start again at 0, so the source video's tokens get exactly the
    rotations of the target tokens at the same (frame, height, width) (LIVEditor's shared
    positions). Tokens are ordered frame-major, as Conv3d patch tokens flatten.

    Args:
        grids: one (f, h, w) per concatenated segment, e.g. [target grid, source grid].
        head_dim: D; pairs (2j, 2j+1) of a head are one complex number (interleaved).
    Returns:
        [sum of f*h*w, D / 2] complex128, computed in float64 as Wan does (the angles reach
        1023 radians, which fp32 would round visibly).
    """
    parts = []
    for grid in grids:
        if any(n > ROPE_MAX_POSITIONS for n in grid):
            raise ValueError(f"Wan's RoPE covers {ROPE_MAX_POSITIONS} positions per axis, got grid {tuple(grid)}")
        angles = []
        for axis, (size, axis_dim) in enumerate(zip(grid, rope_axis_dims(head_dim))):
            inv_freq = 1.0 / torch.pow(
                ROPE_THETA, torch.arange(0, axis_dim, 2, dtype=torch.float64, device=device) / axis_dim
            )
            positions = torch.arange(size, dtype=torch.float64, device=device)
            axis_angles = torch.outer(positions, inv_freq)  # [n, axis_dim/2]
            view = [1, 1, 1, axis_dim // 2]
            view[axis] = size
            angles.append(axis_angles.view(view).expand(*grid, axis_dim // 2))
        angles = torch.cat(angles, dim=-1).reshape(-1, head_dim // 2)  # [f*h*w, D/2]
        parts.append(torch.polar(torch.ones_like(angles), angles))
    return torch.cat(parts, dim=0)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x by freqs, in float64 (as Wan does), back to x's dtype.

    One Triton pass on CUDA (float64 in registers), bit-identical to the PyTorch complex128
    path that runs elsewhere (`wanx.fused_ops.rope_torch`).

    Args:
        x: [B, S, H, D]; freqs: [S, D / 2] complex128 from `rope_frequencies`.
    Returns:
        [B, S, H, D], x's dtype.
    """
    return fused_ops.rope(x, freqs)


class Fp32Linear(nn.Linear):
    """A linear layer computed in fp32 whatever its weights' dtype (Wan's fp32 autocast regions).

    The upcast happens in this layer's own forward, after any hook has moved or recast the
    weights. x: [..., in_features] -> [..., out_features] fp32.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias)


class _CastsInput:
    """Mixin for a layer that first moves its input to its weights' device and dtype.

    Read inside the layer's own forward, the weights are where a hook put them (onloaded,
    upcast), so the input follows them rather than a copy read before the hooks ran.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(device=self.weight.device, dtype=self.weight.dtype))


class CastInputLinear(_CastsInput, nn.Linear):
    """`nn.Linear` taking an input of any device and dtype: [..., in_features] -> [..., out_features]."""


class CastInputConv3d(_CastsInput, nn.Conv3d):
    """`nn.Conv3d` taking an input of any device and dtype: [B, C_in, F, H, W] -> [B, C_out, f, h, w]."""


class WanRMSNorm(nn.Module):
    """RMSNorm over the last dim, statistics in fp32, output in x's dtype times `weight`."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., dim] -> [..., dim], x's dtype (one fused pass on CUDA)."""
        return fused_ops.rms_norm(x, self.weight, self.eps)


class WanLayerNorm(nn.Module):
    """LayerNorm over the last dim computed in fp32, optionally modulated and cast on the way.

    Parameters `weight` and `bias` exist only when `elementwise_affine` (Wan's `norm3`).
    """

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False):
        super().__init__()
        self.dim = dim
        self.eps = eps
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(dim))
            self.bias = nn.Parameter(torch.zeros(dim))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(
        self,
        x: torch.Tensor,
        shift: Optional[torch.Tensor] = None,
        scale: Optional[torch.Tensor] = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """LayerNorm(x) in fp32, then shift + norm * (1 + scale) in fp32 when given, cast to dtype.

        Args:
            x: [B, S, dim]; shift, scale: [B, 1, dim] modulation, both or neither.
            dtype: output dtype (fp32 for the residual stream, the weights' for a matmul).
        Returns:
            [B, S, dim] in `dtype` (one fused pass over x on CUDA).
        """
        return fused_ops.layer_norm_modulate(x, self.eps, self.weight, self.bias, shift, scale, dtype)

    def after_residual(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        gate: Optional[torch.Tensor],
        shift: Optional[torch.Tensor] = None,
        scale: Optional[torch.Tensor] = None,
        dtype: torch.dtype = torch.float32,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual update x + float(y) [* gate], then this norm of it, in one pass on CUDA.

        Args:
            x: [B, S, dim] fp32 residual stream; y: [B, S, dim] a layer's output; gate:
                [B, 1, dim] fp32 or None; shift, scale, dtype: as `forward`'s.
        Returns:
            (the new residual stream [B, S, dim] fp32, `forward` of it [B, S, dim] in `dtype`).
        """
        if fused_ops.has_own_hook(self):
            total = fused_ops.gated_residual(x, y, gate)
            return total, self(total, shift, scale, dtype)
        return fused_ops.residual_layer_norm(x, y, gate, self.eps, self.weight, self.bias, shift, scale, dtype)


class WanSelfAttention(nn.Module):
    """Self-attention over [target | source] tokens with 3-D RoPE and a swappable kernel.

    `alpha_1` maps each token's (normed, modulated) input to ISA's residual gate
    alpha = (sigmoid(alpha_1(x)) - 0.5) * 0.5, in (-0.25, 0.25). `alpha_2` is zero-initialised
    and unused: LIVEditor's checkpoints carry it. The method (`wanx.attention`) is chosen by
    `WanDiT.set_attention`, which writes `method` here.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = WanRMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.alpha_1 = nn.Linear(dim, 1, bias=False)
        self.alpha_2 = nn.Linear(dim, 1, bias=False)
        self.method: SelfAttentionMethod = DenseAttention()

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """ISA residual gate per token: x [B, S, dim] in the compute dtype -> alpha [B, S, 1, 1] fp32."""
        return ((torch.sigmoid(self.alpha_1(x).float()) - 0.5) * 0.5).unsqueeze(-1)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """
        Args:
            x: [B, S, dim] normed and modulated tokens in the compute dtype, target tokens first.
            freqs: [S, head_dim / 2] complex128 RoPE rotations.
            layout: T (`target_len`; the remaining S - T tokens are the source video's), the
                token grids and the denoising step, for the attention method.
        Returns:
            [B, S, dim] in the compute dtype.
        """
        batch, seq, _ = x.shape
        q = self.norm_q(self.q(x)).view(batch, seq, self.num_heads, self.head_dim)
        k = self.norm_k(self.k(x)).view(batch, seq, self.num_heads, self.head_dim)
        v = self.v(x).view(batch, seq, self.num_heads, self.head_dim)
        q = apply_rope(q, freqs)
        k = apply_rope(k, freqs)
        out = self.method(q, k, v, layout, gate=self.gate(x) if self.method.uses_gate else None)
        return self.o(out.flatten(2))


class WanCrossAttention(nn.Module):
    """Dense attention from every video token to the text context (no mask, as Wan)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = WanRMSNorm(dim, eps) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: [B, S, dim] video tokens in the compute dtype.
            context: [B, text_len, dim] embedded text in the compute dtype, zero-padded rows included.
        Returns:
            [B, S, dim] in the compute dtype.
        """
        batch = x.shape[0]
        q = self.norm_q(self.q(x)).view(batch, -1, self.num_heads, self.head_dim)
        k = self.norm_k(self.k(context)).view(batch, -1, self.num_heads, self.head_dim)
        v = self.v(context).view(batch, -1, self.num_heads, self.head_dim)
        return self.o(dense_attention(q, k, v).flatten(2))


class WanAttentionBlock(nn.Module):
    """One DiT block: modulated self-attention, cross-attention, modulated FFN (fp32 residual)."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, qk_norm: bool, cross_attn_norm: bool, eps: float):
        super().__init__()
        self.norm1 = WanLayerNorm(dim, eps)
        self.self_attn = WanSelfAttention(dim, num_heads, qk_norm, eps)
        self.norm3 = WanLayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.cross_attn = WanCrossAttention(dim, num_heads, qk_norm, eps)
        self.norm2 = WanLayerNorm(dim, eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)
        self.cross_attn_norm = cross_attn_norm

    def forward(
        self,
        x: torch.Tensor,
        time_mod: torch.Tensor,
        freqs: torch.Tensor,
        layout: TokenLayout,
        context: torch.Tensor,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """
        Args:
            x: [B, S, dim] fp32 residual stream.
            time_mod: [B, 1, 6, dim] fp32 projected time embedding (one timestep per sample,
                so it broadcasts over the tokens).
            freqs: [S, head_dim / 2] complex128; layout: the sequence, for self-attention.
            context: [B, text_len, dim] embedded text in `dtype`.
            dtype: the compute dtype of the matmuls (`WanDiT.compute_dtype`), passed in rather
                than read from a weight, which may be stored in another dtype (fp8).
        Returns:
            [B, S, dim] fp32.
        """
        # modulation in fp32: shift/scale/gate for attention, then for the FFN, each [B, 1, dim]
        modulation = self.modulation.float().unsqueeze(0) + time_mod
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = modulation.unbind(2)
        # LayerNorm, modulation (shift + norm * (1 + scale)) in fp32 and the cast to the matmul
        # dtype are one pass; each residual update x + float(y) * gate is another (fp32), joined
        # to the LayerNorm that reads its result where one follows (`residual_layer_norm`)
        y = self.self_attn(self.norm1(x, shift_sa, scale_sa, dtype), freqs, layout)
        if self.cross_attn_norm:
            x, normed = self.norm3.after_residual(x, y, gate_sa, dtype=dtype)
        else:
            x = fused_ops.gated_residual(x, y, gate_sa)
            normed = x.to(dtype)
        x, normed = self.norm2.after_residual(x, self.cross_attn(normed, context), None, shift_ff, scale_ff, dtype)
        y = self.ffn[2](fused_ops.linear_gelu(normed, self.ffn[0]))  # Linear, GELU, Linear
        return fused_ops.gated_residual(x, y, gate_ff)


class WanHead(nn.Module):
    """Output head: modulated LayerNorm and a linear map to patch_volume * out_dim, in fp32."""

    def __init__(self, dim: int, out_dim: int, patch_size: Sequence[int], eps: float):
        super().__init__()
        self.norm = WanLayerNorm(dim, eps)
        self.head = Fp32Linear(dim, math.prod(patch_size) * out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        """x: [B, T, dim] fp32, time_emb: [B, 1, dim] fp32 -> [B, T, patch_volume * out_dim] fp32."""
        shift, scale = (self.modulation.float().unsqueeze(0) + time_emb.unsqueeze(2)).unbind(2)
        return self.head(self.norm(x) * (1 + scale) + shift)


class WanDiT(ModelMixin, ConfigMixin):
    """LIVEditor's Wan 2.2 A14B expert (defaults: the 14B configuration).

    Keys: Wan's 1,095 (`patch_embedding`, `text_embedding.{0,2}`, `time_embedding.{0,2}`,
    `time_projection.1`, `blocks.N.{self_attn,cross_attn}.{q,k,v,o,norm_q,norm_k}`,
    `blocks.N.norm3`, `blocks.N.ffn.{0,2}`, `blocks.N.modulation`, `head.head`,
    `head.modulation`) plus LIVEditor's `source_video_embedding_more_memory` and
    `blocks.N.self_attn.alpha_{1,2}`.

    `from_pretrained` / `load_config` read Wan's own `config.json` (`model_type` and
    `window_size` are accepted and checked). Self-attention starts dense; switch it with
    `set_attention`. The matmuls run in `compute_dtype`.
    """

    _no_split_modules = ["WanAttentionBlock"]

    @register_to_config
    def __init__(
        self,
        patch_size: Sequence[int] = (1, 2, 2),
        in_dim: int = 16,
        dim: int = 5120,
        ffn_dim: int = 13824,
        freq_dim: int = 256,
        text_dim: int = 4096,
        text_len: int = 512,
        out_dim: int = 16,
        num_heads: int = 40,
        num_layers: int = 40,
        eps: float = 1e-6,
        qk_norm: bool = True,
        cross_attn_norm: bool = True,
        model_type: str = "t2v",
        window_size: Sequence[int] = (-1, -1),
    ):
        super().__init__()
        if model_type != "t2v":
            raise ValueError(f"LIVEditor builds on Wan's text-to-video expert (model_type 't2v'), got {model_type!r}")
        if tuple(window_size) != (-1, -1):
            raise ValueError(f"only global attention is supported (window_size (-1, -1)), got {tuple(window_size)}")
        if dim % num_heads or (dim // num_heads) % 2:
            raise ValueError(f"dim / num_heads must be an even integer, got dim {dim}, num_heads {num_heads}")
        self.patch = tuple(int(p) for p in patch_size)
        self.patch_embedding = CastInputConv3d(in_dim, dim, kernel_size=self.patch, stride=self.patch)
        self.source_video_embedding_more_memory = CastInputConv3d(in_dim, dim, kernel_size=self.patch,
                                                                  stride=self.patch)
        self.text_embedding = nn.Sequential(CastInputLinear(text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(Fp32Linear(freq_dim, dim), nn.SiLU(), Fp32Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), Fp32Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(
            [WanAttentionBlock(dim, ffn_dim, num_heads, qk_norm, cross_attn_norm, eps) for _ in range(num_layers)]
        )
        self.head = WanHead(dim, out_dim, self.patch, eps)
        self._attention: SelfAttentionMethod = DenseAttention()
        self._compute_dtype: Optional[torch.dtype] = None
        self.init_weights()

    @classmethod
    def tiny(cls, seed: int = 0, **overrides) -> "WanDiT":
        """A small random model (`TINY_CONFIG` updated by `overrides`) for tests and demos.

        Wan's initialisation zeroes the head and every bias, which would make a test blind
        to half of the weights; here every parameter is random (alpha_2 stays zero, as in
        LIVEditor). The global RNG is left untouched.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(**{**TINY_CONFIG, **overrides})
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if name.endswith("alpha_2.weight"):
                        continue
                    if name.endswith(("norm_q.weight", "norm_k.weight", "norm3.weight")):
                        param.copy_(1 + 0.1 * torch.randn_like(param))
                    elif name.endswith("bias") or name.endswith("head.head.weight"):
                        param.normal_(0.0, 0.05)
                    elif name.endswith("alpha_1.weight"):
                        param.normal_(0.0, 1.0 / param.shape[1] ** 0.5)
        return model

    def init_weights(self) -> None:
        """Wan's initialisation: Xavier-uniform linears with zero biases, N(0, 0.02) text and
        time embeddings, zero head; LIVEditor's `alpha_2` starts at zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for conv in (self.patch_embedding, self.source_video_embedding_more_memory):
            nn.init.xavier_uniform_(conv.weight.flatten(1))
            nn.init.zeros_(conv.bias)
        for seq in (self.text_embedding, self.time_embedding):
            for module in seq:
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)
        for block in self.blocks:
            nn.init.zeros_(block.self_attn.alpha_2.weight)

    def set_attention(self, backend: Union[str, SelfAttentionMethod] = "dense", isa_config=None) -> None:
        """Choose the self-attention method of every block; weights are untouched.

        Args:
            backend: a name registered in `wanx.attention` ("dense": FlashAttention-3 >
                FlashAttention-2 > SDPA over all S tokens, no gate residual; an ISA backend:
                "torch", "triton", "tilelang"; "lvsa"; any method registered later), or a
                method object.
            isa_config: the named method's options (kept under this name for the ISA callers):
                an `ISAConfig` for the ISA backends (default `ISAConfig()`), an `LVSAConfig` or
                `wanx.attention.LVSAOptions` for "lvsa", None for "dense". Not used with a
                method object.
        Raises:
            ValueError: unknown name, a backend that cannot be imported here, or options the
                method refuses (TypeError for options of the wrong type).
        """
        method = backend if isinstance(backend, SelfAttentionMethod) else make_attention(backend, isa_config)
        for block in self.blocks:
            block.self_attn.method = method
        self._attention = method
        logger.info("WanDiT self-attention: %s", method.describe())

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of every matmul outside the fp32 regions (bf16 on GPU).

        Set it when the weights are stored in another dtype than they compute in (fp8 storage,
        `wanx.memory`). Unset, it is the dtype of the modulation tables: plain parameters that
        every `.to(dtype)` and `wanx.dit_loader.load_dit(dtype=...)` convert with the rest
        and that no storage hook recasts (diffusers' layerwise casting recasts Linear and Conv
        layers only).
        """
        return self._compute_dtype if self._compute_dtype is not None else self.head.modulation.dtype

    @compute_dtype.setter
    def compute_dtype(self, dtype: Optional[torch.dtype]) -> None:
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"compute_dtype must be a floating-point dtype or None, got {dtype}")
        self._compute_dtype = dtype

    @property
    def attention_method(self) -> SelfAttentionMethod:
        """The self-attention method in use (`wanx.attention.SelfAttentionMethod`)."""
        return self._attention

    @property
    def attention_backend(self) -> str:
        """The name of the self-attention method in use: "dense", "torch", "triton", "tilelang", ..."""
        return self._attention.name

    @property
    def isa_config(self) -> Optional[ISAConfig]:
        """The ISA hyper-parameters in use (None when the method is not ISA)."""
        return getattr(self._attention, "config", None) if self._attention.uses_gate else None

    def parameter_report(self) -> dict:
        """Parameter counts: {"total", "wan", "liveditor"} (LIVEditor's additions: the source
        patch embedding and the alpha_1 / alpha_2 gates)."""
        extra = sum(p.numel() for p in self.source_video_embedding_more_memory.parameters())
        extra += sum(p.numel() for b in self.blocks for p in (b.self_attn.alpha_1.weight, b.self_attn.alpha_2.weight))
        total = sum(p.numel() for p in self.parameters())
        return {"total": total, "wan": total - extra, "liveditor": extra}

    def _embed_text(self, context, batch: int) -> torch.Tensor:
        """Zero-pad each prompt's trimmed embedding to text_len rows and embed: -> [B, text_len, dim]."""
        text_len, text_dim = self.config.text_len, self.config.text_dim
        rows = list(context.unbind(0)) if isinstance(context, torch.Tensor) and context.dim() == 3 else list(context)
        if len(rows) != batch:
            raise ValueError(f"context must hold one text embedding per sample ({batch}), got {len(rows)}")
        for row in rows:
            if row.dim() != 2 or row.shape[1] != text_dim or row.shape[0] > text_len:
                raise ValueError(f"each context must be [L <= {text_len}, {text_dim}], got {tuple(row.shape)}")
        padded = torch.stack([F.pad(row, (0, 0, 0, text_len - row.shape[0])) for row in rows])
        return self.text_embedding(padded)  # its first layer moves the rows to its weights' device and dtype

    def _embed_time(self, timestep, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps -> (time embedding [B, 1, dim], projection [B, 1, 6, dim]), both fp32."""
        t = torch.as_tensor(timestep, device=device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
        if t.numel() != batch:
            raise ValueError(f"timestep must be a scalar or have B = {batch} entries, "
                             f"got shape {tuple(torch.as_tensor(timestep).shape)}")
        emb = self.time_embedding(sinusoidal_embedding(self.config.freq_dim, t).float())
        proj = self.time_projection(emb)
        return emb.unsqueeze(1), proj.unflatten(-1, (6, -1)).unsqueeze(1)

    def _patchify(self, conv: CastInputConv3d, video: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """[B, in_dim, F, H, W] on any device -> (tokens [B, f*h*w, dim] fp32 on conv's device, grid (f, h, w))."""
        if video.dim() != 5 or video.shape[1] != self.config.in_dim:
            raise ValueError(f"latents must be [B, {self.config.in_dim}, F, H, W], got {tuple(video.shape)}")
        if any(n % p for n, p in zip(video.shape[2:], self.patch)):
            raise ValueError(f"latent (F, H, W) {tuple(video.shape[2:])} must be divisible by the patch {self.patch}")
        tokens = conv(video)
        grid = tuple(tokens.shape[2:])
        return tokens.flatten(2).transpose(1, 2).float(), grid

    def _unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, f*h*w, prod(patch) * out_dim] -> [B, out_dim, f*pt, h*ph, w*pw]."""
        (f, h, w), (pt, ph, pw) = grid, self.patch
        x = x.view(x.shape[0], f, h, w, pt, ph, pw, self.config.out_dim)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(x.shape[0], self.config.out_dim, f * pt, h * ph, w * pw)

    def forward(
        self,
        latent: torch.Tensor,
        source_latent: torch.Tensor,
        timestep: Union[torch.Tensor, float],
        context: Union[torch.Tensor, Sequence[torch.Tensor]],
        step: Optional[int] = None,
    ) -> torch.Tensor:
        """Flow prediction for the target video.

        Args:
            latent: [B, in_dim, F, H, W] noisy target latent.
            source_latent: [B or 1, in_dim, F', H', W'] clean source latent; batch 1 is shared
                by all samples (CFG: cond and uncond as one batch of 2). Its positions start
                at 0 like the target's (same shape: same RoPE rotations token for token).
            timestep: [B] or a scalar, diffusion timesteps (0..1000).
            context: B text embeddings [L_i <= text_len, text_dim] trimmed to their true
                length (a list, or a tensor [B, L, text_dim]); zero-padded to text_len rows
                and attended without a mask, as Wan does.
            step: the denoising step (0-based), passed to the attention method (whose pattern
                may change with it); None outside a sampling loop.
        Returns:
            [B, out_dim, F, H, W] fp32.
        """
        batch = latent.shape[0]
        if source_latent.shape[0] not in (1, batch):
            raise ValueError(f"source_latent batch must be 1 or {batch}, got {source_latent.shape[0]}")
        target, target_grid = self._patchify(self.patch_embedding, latent)
        source, source_grid = self._patchify(self.source_video_embedding_more_memory, source_latent)
        x = torch.cat([target, source.expand(batch, -1, -1)], dim=1)  # [B, S, dim] fp32 residual stream
        target_len = target.shape[1]
        layout = TokenLayout(target_len=target_len, grids=(target_grid, source_grid), step=step)
        freqs = rope_frequencies([target_grid, source_grid], self.config.dim // self.config.num_heads, device=x.device)
        time_emb, time_mod = self._embed_time(timestep, batch, x.device)
        dtype = self.compute_dtype
        text = self._embed_text(context, batch).to(dtype)  # [B, text_len, dim]; cross-attention's k and v
        for block in self.blocks:
            x = block(x, time_mod, freqs, layout, text, dtype)
        return self._unpatchify(self.head(x[:, :target_len], time_emb), target_grid)
