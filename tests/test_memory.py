"""wanx.memory and the DiT under diffusers' hooks: streaming blocks, fp8 storage, model offload, the estimate.

On the CPU the blocks are "onloaded" to the CPU itself (no stream): the hooks run as on a
GPU, but a weight read outside its group's onload would go unnoticed, since it sits on the
right device anyway. `poison_offloaded_weights` makes it visible: every offloaded weight
holds NaN until its group is onloaded, so an early read turns the output into NaN.
"""
import math

import pytest
import torch
from diffusers.hooks import apply_group_offloading
from diffusers.hooks.group_offloading import _GROUP_OFFLOADING

from dit_testing import inputs
from model import TINY_CONFIG, WanDiT
from wanx import memory
from wanx.memory import (
    Fp8Linear,
    apply_memory_mode,
    check_memory_mode,
    dit_parameter_counts,
    estimate_peak_gib,
    offload_blocks,
    on_device,
    quantize_fp8,
    store_fp8,
)

# The tiny model's fp8 (scaled) forward moved 0.58% (relative L2) from its bf16 forward when
# this was written. Bound: 2.7%, the relative RMS error of one fp8-rounded matrix (3 mantissa
# bits; 2.66% measured in test_scaled_fp8_beats_unscaled_at_the_14b_scale): each matmul
# inherits about that error, and the blocks add their gated outputs to an fp32 residual
# stream that also carries the unquantised embeddings, so the output moves less than one
# matmul does.
FP8_MATRIX_RMS = 0.027
FP8_FORWARD_BOUND = FP8_MATRIX_RMS


def tiny(dtype=torch.float32, **overrides):
    return WanDiT.tiny(**overrides).to(dtype).eval().requires_grad_(False)


def relative_l2(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def groups_of(module):
    """The distinct diffusers ModuleGroups of a group-offloaded module."""
    found = {}
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        hook = registry.get_hook(_GROUP_OFFLOADING) if registry is not None else None
        if hook is not None:
            found[id(hook.group)] = hook.group
    return list(found.values())


def poison_offloaded_weights(module):
    """Make each group's offload fill its tensors with NaN and its onload restore them; start offloaded."""
    for group in groups_of(module):
        tensors = [t for m in group.modules for t in (*m.parameters(), *m.buffers())]
        tensors = list(dict.fromkeys([*tensors, *group.parameters, *group.buffers]))  # a group may list one twice
        kept = {}

        def offload(tensors=tensors, kept=kept):
            for t in tensors:
                kept[t] = t.data
                t.data = torch.full_like(t.data, float("nan"))

        def onload(tensors=tensors, kept=kept):
            for t in tensors:
                t.data = kept.pop(t)

        group.offload_, group.onload_ = offload, onload
        offload()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("blocks_per_group", [1, 2])
@torch.no_grad()
def test_streamed_blocks_are_bit_identical(dtype, blocks_per_group):
    model = tiny(dtype, num_layers=3)
    reference = model(*inputs())
    offload_blocks(model, "cpu", use_stream=False, blocks_per_group=blocks_per_group)
    assert len(groups_of(model)) > 3  # the blocks, the Sequential embeddings' layers, the rest
    for _ in range(2):
        assert torch.equal(model(*inputs()), reference)


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
@torch.no_grad()
def test_every_weight_is_read_while_its_group_is_onloaded(offload_type):
    model = tiny(torch.bfloat16)
    model.set_attention("torch")  # ISA reads the alpha_1 gate too
    reference = model(*inputs())
    apply_group_offloading(model, onload_device="cpu", offload_type=offload_type, num_blocks_per_group=1)
    poison_offloaded_weights(model)
    assert all(torch.isnan(p).all() for p in model.parameters())
    assert torch.equal(model(*inputs()), reference)
    assert all(torch.isnan(p).all() for p in model.parameters())  # every group went back out


def test_fp8_layers_are_the_block_matrices():
    model = tiny()
    names = store_fp8(model)
    per_block = [f"{attn}.{p}" for attn in ("self_attn", "cross_attn") for p in "qkvo"] + ["ffn.0", "ffn.2"]
    assert names == [f"blocks.{n}.{p}" for n in range(2) for p in per_block]
    fp8 = {name for name, p in model.named_parameters() if p.dtype == memory.FP8_DTYPE}
    assert fp8 == {f"{name}.weight" for name in names}
    assert all(isinstance(model.get_submodule(name), Fp8Linear) for name in names)
    assert model.compute_dtype == torch.float32 and model.head.head.weight.dtype == torch.float32


def test_quantize_fp8_round_trip_within_half_a_unit():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 300, generator=g) * torch.tensor([1e-3, 0.014, 1.0, 1e3, 0.0, 5e-5])[:, None]
    weight[5, 7] = 2.0  # an outlier in an otherwise tiny row
    fp8, scale = quantize_fp8(weight)
    assert fp8.dtype == memory.FP8_DTYPE and scale.shape == (6, 1) and scale[4, 0] == 1.0
    assert torch.equal(torch.exp2(torch.log2(scale).round()), scale)  # powers of two
    amax = fp8.float().abs().amax(dim=1)[[0, 1, 2, 3, 5]]
    assert ((amax > 224) & (amax <= 448)).all()  # every non-zero row uses fp8's top binade
    restored = fp8.float() * scale
    assert torch.isfinite(restored).all() and torch.equal(restored[4], weight[4])
    assert ((restored - weight).abs() <= torch.maximum(weight.abs() * 2**-4, scale * 2**-10)).all()
    assert torch.equal((fp8.to(torch.bfloat16) * scale.to(torch.bfloat16)).float(), restored)  # exact in bf16


def test_scaled_fp8_beats_unscaled_at_the_14b_scale():
    """Rows of a Xavier-initialised 5120 x 5120 matrix (std 0.014, the 14 B's scale): most
    values fall on fp8's subnormals without a scale."""
    bound = math.sqrt(6 / (2 * 5120))
    weight = torch.empty(256, 5120).uniform_(-bound, bound, generator=torch.Generator().manual_seed(0))
    fp8, scale = quantize_fp8(weight)
    scaled = relative_l2(fp8.float() * scale, weight)
    unscaled = relative_l2(weight.to(memory.FP8_DTYPE).float(), weight)
    assert scaled < FP8_MATRIX_RMS < 0.035 < unscaled


@torch.no_grad()
def test_fp8_forward_is_the_bf16_forward_of_the_rounded_weights():
    model = tiny(torch.bfloat16)
    reference = model(*inputs())
    rounded = tiny(torch.bfloat16)
    names = store_fp8(model)
    for name in names:
        rounded.get_submodule(name).weight.copy_(model.get_submodule(name).dequantized(torch.bfloat16))
    out = model(*inputs())
    assert torch.equal(out, rounded(*inputs()))
    assert 1e-3 < relative_l2(out, reference) < FP8_FORWARD_BOUND


@torch.no_grad()
def test_diffusers_layerwise_casting_stores_fp8_and_round_trips():
    model = tiny(torch.bfloat16)
    reference = model(*inputs())
    names = store_fp8(model, per_channel_scale=False)
    stored = {n: p.clone() for n, p in model.named_parameters() if p.dtype == memory.FP8_DTYPE}
    assert set(stored) == {f"{name}.{p}" for name in names for p in ("weight", "bias")}
    assert model.compute_dtype == torch.bfloat16
    out = model(*inputs())
    assert 1e-3 < relative_l2(out, reference) < FP8_FORWARD_BOUND
    after = dict(model.named_parameters())
    assert all(after[n].dtype == memory.FP8_DTYPE and torch.equal(after[n], p) for n, p in stored.items())
    assert torch.equal(model(*inputs()), out)


@pytest.mark.parametrize("per_channel_scale", [True, False])
@torch.no_grad()
def test_fp8_with_streamed_blocks_is_bit_identical(per_channel_scale):
    model = tiny(torch.bfloat16)
    store_fp8(model, per_channel_scale=per_channel_scale)
    reference = model(*inputs())
    offload_blocks(model, "cpu", use_stream=False)
    poison_offloaded_weights(model)
    assert torch.equal(model(*inputs()), reference)


@torch.no_grad()
def test_apply_memory_mode_on_the_cpu():
    reference = tiny(torch.bfloat16)(*inputs())
    model = tiny(torch.bfloat16)
    mode = apply_memory_mode(model, offload="model", weights="fp8", device="cpu")
    assert (mode.offload, mode.weights, mode.fp8_layers) == ("model", "fp8", 20)
    assert mode.device == torch.device("cpu") and mode.compute_dtype == torch.bfloat16
    with on_device(model, mode.device):
        out = model(*inputs())
    assert 1e-3 < relative_l2(out, reference) < FP8_FORWARD_BOUND
    model = tiny(torch.bfloat16)
    assert apply_memory_mode(model, "none", "bf16", "cpu").fp8_layers == 0
    assert torch.equal(model(*inputs()), reference)


def test_on_device_restores_the_same_parameters_even_on_error():
    model = tiny()
    model.register_buffer("table", torch.arange(3.0))
    before = {n: (p, p.clone()) for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="stage failed"), on_device(model, "cpu") as inside:
        assert inside is model
        raise RuntimeError("stage failed")
    for name, p in model.named_parameters():
        assert p is before[name][0] and torch.equal(p, before[name][1]) and p.device.type == "cpu"
    assert torch.equal(model.table, torch.arange(3.0))


@pytest.mark.gpu
def test_on_device_moves_to_the_gpu_and_back_where_each_was():
    model = tiny()
    model.head.to("cuda")  # a mixed placement is restored tensor by tensor
    homes = {n: p.device for n, p in model.named_parameters()}
    with on_device(model, "cuda"):
        assert all(p.is_cuda for p in model.parameters())
    assert {n: p.device for n, p in model.named_parameters()} == homes


def test_bad_memory_modes_are_refused_in_one_line():
    cases = [
        (("disk", "bf16", "cuda"), "offload must be one of none, model, blocks; got 'disk'"),
        (("none", "int4", "cuda"), "weights must be one of bf16, fp8; got 'int4'"),
        (("blocks", "bf16", "cpu"), "offload 'blocks' streams the DiT's blocks to a CUDA GPU; the device is cpu"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError) as error:
            check_memory_mode(*args)
        assert str(error.value) == message
        with pytest.raises(ValueError, match="must be one of|CUDA GPU"):
            apply_memory_mode(tiny(), *args)
    with pytest.raises(ValueError, match="must be one of"):
        estimate_peak_gib(TINY_CONFIG, 100, 1, "blocks", "fp4", 2)
    model = tiny()
    with pytest.raises(ValueError, match="streaming blocks needs a CUDA device, got cpu"):
        offload_blocks(model, "cpu")
    with pytest.raises(ValueError, match="blocks_per_group must be at least 1"):
        offload_blocks(model, "cpu", use_stream=False, blocks_per_group=0)
    with pytest.raises(ValueError, match="one block at a time"):
        offload_blocks(model, "cuda", blocks_per_group=2)
    offload_blocks(model, "cpu", use_stream=False)
    with pytest.raises(ValueError, match="already has diffusers hooks"):
        apply_memory_mode(model, "none", "bf16", "cpu")
    with pytest.raises(ValueError, match="group offloaded"), on_device(model, "cpu"):
        pass
    with pytest.raises(ValueError, match="floating-point"):
        model.compute_dtype = torch.int8


def test_compute_dtype_follows_the_model_unless_pinned():
    model = tiny()
    assert model.compute_dtype == torch.float32
    model.to(torch.bfloat16)
    assert model.compute_dtype == torch.bfloat16
    model.compute_dtype = torch.float32
    assert model.compute_dtype == torch.float32
    model.compute_dtype = None
    assert model.compute_dtype == torch.bfloat16


@pytest.mark.parametrize("overrides", [{}, {"qk_norm": False, "cross_attn_norm": False}, {"patch_size": (1, 1, 1)}])
def test_parameter_counts_match_the_model(overrides):
    for config in ({**TINY_CONFIG, **overrides}, overrides):  # the tiny model and the 14 B
        with torch.device("meta"):
            model = WanDiT(**config)
        counts = dit_parameter_counts(dict(model.config))
        block = model.blocks[0]
        fp8 = [m.weight for n, m in block.named_modules() if n.endswith((".q", ".k", ".v", ".o", "ffn.0", "ffn.2"))]
        assert counts["block"] == sum(p.numel() for p in block.parameters())
        assert counts["block_fp8"] == sum(p.numel() for p in fp8)
        assert counts["block_fp8_rows"] == sum(p.shape[0] for p in fp8)
        assert counts["total"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("weights", ["bf16", "fp8"])
def test_weight_estimate_is_the_bytes_of_the_stored_model(weights):
    model = tiny(torch.bfloat16)
    if weights == "fp8":
        store_fp8(model)
    stored = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    block = sum(t.numel() * t.element_size() for t in (*model.blocks[0].parameters(), *model.blocks[0].buffers()))
    estimate = estimate_peak_gib(dict(model.config), tokens=512, batch=1, offload="none", weights=weights,
                                 dtype_bytes=2)
    assert estimate["weights_total"] * memory.GIB == stored
    blocks = estimate_peak_gib(dict(model.config), tokens=512, batch=1, offload="blocks", weights=weights,
                               dtype_bytes=2)
    assert blocks["weights_resident"] * memory.GIB == stored - (model.config.num_layers - 2) * block
    assert blocks["host_pinned"] * memory.GIB == model.config.num_layers * block


def test_estimate_for_an_81_frame_edit_of_the_14b():
    with torch.device("meta"):
        config = dict(WanDiT().config)
    seq = 2 * 21 * 34 * 60  # target + source tokens of 81 frames at 960x544
    dim, ffn = 5120, 13824
    tiers = {(offload, weights, batch): estimate_peak_gib(config, seq, batch, offload, weights, 2)
             for offload in ("none", "model", "blocks") for weights in ("bf16", "fp8") for batch in (1, 2)}
    none = tiers["none", "bf16", 2]
    assert 26.5 < none["weights_total"] < 26.7  # the README's 26.6 GiB
    per_sample, shared = memory.ACTIVATION_BYTES["bf16"]
    assert none["activations"] == seq * dim * (2 * per_sample + shared) / memory.GIB
    assert none == tiers["model", "bf16", 2]
    fp8 = tiers["none", "fp8", 2]
    per_sample, shared = memory.ACTIVATION_BYTES["fp8"]  # fp8 layers compute the GELU apart
    assert fp8["activations"] == seq * dim * (2 * per_sample + shared) / memory.GIB
    assert 13.4 < fp8["weights_total"] < 13.7 and fp8["weights_transient"] == dim * ffn * 2 / memory.GIB
    blocks = tiers["blocks", "bf16", 1]
    assert blocks["weights_resident"] < 2.0 and blocks["host_pinned"] > 25.0
    assert blocks["peak"] < 24 * 10**9 / memory.GIB  # a 24 GB GPU: blocks + sequential guidance
    assert tiers["none", "fp8", 1]["peak"] < 48 * 10**9 / memory.GIB < none["peak"]
