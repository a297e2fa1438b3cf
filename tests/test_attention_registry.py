"""wanx.attention: methods are found by name; a new one plugs into the DiT without touching model.py."""
import pytest
import torch

from in_context_sparse_attention import ISAConfig, dense_attention
from model import WanDiT
from wanx.attention import (
    ISAAttention,
    SelfAttentionMethod,
    TokenLayout,
    attention_names,
    make_attention,
    register_attention,
)


class ScaledDense(SelfAttentionMethod):
    """A toy method: dense attention with every output scaled by a factor; it records what it saw."""

    name = "scaled_dense"

    def __init__(self, options=None):
        self.factor = 1.0 if options is None else float(options)
        self.seen: list[TokenLayout] = []

    def __call__(self, q, k, v, layout, gate=None):
        self.seen.append(layout)
        assert gate is None  # the method did not ask for the gate
        return dense_attention(q, k, v) * self.factor


def inputs():
    torch.manual_seed(0)
    return (torch.randn(1, 16, 1, 8, 8), torch.randn(1, 16, 1, 8, 8), torch.tensor([500.0]),
            [torch.randn(6, 32)])


@torch.no_grad()
def test_a_registered_toy_method_runs_in_the_tiny_dit():
    register_attention("scaled_dense", ScaledDense)
    assert "scaled_dense" in attention_names()
    model = WanDiT.tiny()
    latent, source, timestep, context = inputs()
    dense = model(latent, source, timestep, context)
    model.set_attention("scaled_dense", 1.0)
    same = model(latent, source, timestep, context, step=7)
    torch.testing.assert_close(same, dense, rtol=0, atol=0)
    method = model.attention_method
    assert model.attention_backend == "scaled_dense" and len(method.seen) == model.config.num_layers
    assert method.seen[0] == TokenLayout(target_len=16, grids=((1, 4, 4), (1, 4, 4)), step=7)
    model.set_attention("scaled_dense", 0.0)  # no self-attention at all: the output must change
    assert (model(latent, source, timestep, context) - dense).abs().max() > 1e-4


def test_builtin_methods_and_refusals():
    assert attention_names()[:4] == ("dense", "torch", "triton", "tilelang")
    method = make_attention("torch", ISAConfig(block_size=16))
    assert isinstance(method, ISAAttention) and method.uses_gate and method.config.block_size == 16
    assert not make_attention("dense").uses_gate
    with pytest.raises(ValueError, match="backend must be one of"):
        make_attention("flash")
    with pytest.raises(ValueError, match="non-empty name"):
        register_attention("", ScaledDense)


def test_token_layout_sequence_length():
    assert TokenLayout(target_len=12, grids=((1, 3, 4), (2, 3, 4))).seq_len == 36
