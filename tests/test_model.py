"""WanDiT: Wan 2.2 A14B key layout, LIVEditor's additions, RoPE, gate, CFG batching, precision."""
import json
import math

import pytest
import torch

import model as model_module
import wanx.attention
from dit_testing import inputs
from in_context_sparse_attention import ISAConfig, dense_attention
from model import WanDiT, apply_rope, rope_axis_dims, rope_frequencies, sinusoidal_embedding

# Wan 2.2 T2V-A14B expert's config.json, as shipped (high_noise_model / low_noise_model).
WAN_A14B_CONFIG = {
    "_class_name": "WanModel",
    "_diffusers_version": "0.33.0",
    "dim": 5120,
    "eps": 1e-06,
    "ffn_dim": 13824,
    "freq_dim": 256,
    "in_dim": 16,
    "model_type": "t2v",
    "num_heads": 40,
    "num_layers": 40,
    "out_dim": 16,
    "text_len": 512,
}


def wan_expert_shapes(dim=5120, ffn=13824, freq=256, text=4096, layers=40, in_dim=16, out_dim=16):
    """Key -> shape of Wan's original WanModel (t2v, qk_norm, cross_attn_norm), written out by hand."""
    shapes = {
        "patch_embedding.weight": (dim, in_dim, 1, 2, 2),
        "patch_embedding.bias": (dim,),
        "text_embedding.0.weight": (dim, text),
        "text_embedding.0.bias": (dim,),
        "text_embedding.2.weight": (dim, dim),
        "text_embedding.2.bias": (dim,),
        "time_embedding.0.weight": (dim, freq),
        "time_embedding.0.bias": (dim,),
        "time_embedding.2.weight": (dim, dim),
        "time_embedding.2.bias": (dim,),
        "time_projection.1.weight": (6 * dim, dim),
        "time_projection.1.bias": (6 * dim,),
        "head.head.weight": (4 * out_dim, dim),
        "head.head.bias": (4 * out_dim,),
        "head.modulation": (1, 2, dim),
    }
    for n in range(layers):
        block = f"blocks.{n}."
        for attn in ("self_attn", "cross_attn"):
            for proj in "qkvo":
                shapes[f"{block}{attn}.{proj}.weight"] = (dim, dim)
                shapes[f"{block}{attn}.{proj}.bias"] = (dim,)
            shapes[f"{block}{attn}.norm_q.weight"] = (dim,)
            shapes[f"{block}{attn}.norm_k.weight"] = (dim,)
        shapes[f"{block}norm3.weight"] = (dim,)
        shapes[f"{block}norm3.bias"] = (dim,)
        shapes[f"{block}ffn.0.weight"] = (ffn, dim)
        shapes[f"{block}ffn.0.bias"] = (ffn,)
        shapes[f"{block}ffn.2.weight"] = (dim, ffn)
        shapes[f"{block}ffn.2.bias"] = (dim,)
        shapes[f"{block}modulation"] = (1, 6, dim)
    return shapes


def liveditor_shapes(dim=5120, layers=40, in_dim=16):
    shapes = {
        "source_video_embedding_more_memory.weight": (dim, in_dim, 1, 2, 2),
        "source_video_embedding_more_memory.bias": (dim,),
    }
    for n in range(layers):
        shapes[f"blocks.{n}.self_attn.alpha_1.weight"] = (1, dim)
        shapes[f"blocks.{n}.self_attn.alpha_2.weight"] = (1, dim)
    return shapes


@pytest.fixture(scope="module")
def full_meta():
    with torch.device("meta"):
        return WanDiT()


def test_full_size_model_has_wan_a14b_keys_plus_liveditor_additions(full_meta):
    wan = wan_expert_shapes()
    extra = liveditor_shapes()
    assert len(wan) == 1095 and len(extra) == 82
    got = {key: tuple(t.shape) for key, t in full_meta.state_dict().items()}
    assert got == {**wan, **extra}
    assert all(p.is_meta for p in full_meta.parameters())


def test_full_size_parameter_count_is_reported(full_meta):
    wan = sum(math.prod(s) for s in wan_expert_shapes().values())
    extra = sum(math.prod(s) for s in liveditor_shapes().values())
    report = full_meta.parameter_report()
    assert report == {"total": wan + extra, "wan": wan, "liveditor": extra}
    assert report["total"] == 14_289_233_984 == full_meta.num_parameters()


def test_reads_wan_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(WAN_A14B_CONFIG))
    config = WanDiT.load_config(str(tmp_path))
    with torch.device("meta"):
        model = WanDiT.from_config(config)
    c = model.config
    assert (c.dim, c.num_layers, c.num_heads, c.ffn_dim) == (5120, 40, 40, 13824)
    assert tuple(model.config.patch_size) == (1, 2, 2) and model.config.text_dim == 4096
    with pytest.raises(ValueError, match="t2v"), torch.device("meta"):
        WanDiT.from_config({**WAN_A14B_CONFIG, "model_type": "i2v", "in_dim": 36})


def test_tiny_config():
    model = WanDiT.tiny()
    assert (model.config.dim, model.config.ffn_dim, model.config.num_heads, model.config.num_layers) == (64, 128, 2, 2)
    assert (model.config.text_dim, model.config.freq_dim, model.config.text_len) == (32, 32, 512)
    assert rope_axis_dims(64 // 2) == (12, 10, 10)
    assert not torch.equal(WanDiT.tiny(seed=0).head.head.weight, WanDiT.tiny(seed=1).head.head.weight)
    assert torch.equal(WanDiT.tiny(seed=3).head.head.weight, WanDiT.tiny(seed=3).head.head.weight)


@torch.no_grad()
def test_forward_dense_and_isa_torch():
    model = WanDiT.tiny()
    latent, source, timestep, context = inputs()
    assert model.attention_backend == "dense" and model.isa_config is None
    dense = model(latent, source, timestep, context)
    config = ISAConfig(block_size=16)
    model.set_attention("torch", config)
    assert model.attention_backend == "torch" and model.isa_config == config
    isa = model(latent, source, timestep, context)
    assert dense.shape == isa.shape == latent.shape and dense.dtype == torch.float32
    assert torch.isfinite(dense).all() and torch.isfinite(isa).all()
    assert (isa - dense).abs().max() > 1e-4  # the sparse kernel really ran
    model.set_attention("dense")
    assert torch.equal(model(latent, source, timestep, context), dense)


@torch.no_grad()
def test_isa_keeping_everything_with_zero_gate_equals_dense():
    model = WanDiT.tiny()
    latent, source, timestep, context = inputs()
    dense = model(latent, source, timestep, context)
    model.set_attention("torch", ISAConfig(block_size=16, select_ratio=1.0, flat_ratio=1.0))
    gated = model(latent, source, timestep, context)
    for block in model.blocks:
        block.self_attn.alpha_1.weight.zero_()  # sigmoid(0) - 0.5 = 0: no residual
    isa = model(latent, source, timestep, context)
    torch.testing.assert_close(isa, dense, rtol=1e-5, atol=1e-5)
    assert (gated - dense).abs().max() > 1e-4  # with a live gate the residual Oc term shows


@torch.no_grad()
def test_isa_receives_target_source_split_and_gate(monkeypatch):
    model = WanDiT.tiny()
    latent, source, timestep, context = inputs(batch=1)
    seen = []

    def spy(q, k, v, t_seq_len, s_seq_len, alpha=None, config=None, backend=None):
        seen.append((q.shape, t_seq_len, s_seq_len, alpha, config, backend))
        return dense_attention(q, k, v)

    monkeypatch.setattr(wanx.attention, "editing_sparse_attention", spy)
    config = ISAConfig(block_size=16)
    model.set_attention("torch", config)
    model(latent, source, timestep, context)
    assert len(seen) == model.config.num_layers
    tokens = 2 * 8 * 8
    for q_shape, t_len, s_len, alpha, cfg, backend in seen:
        assert q_shape == (1, 2 * tokens, 2, 32) and (t_len, s_len) == (tokens, tokens)
        assert cfg is config and backend == "torch"
        assert alpha.shape == (1, 2 * tokens, 1, 1) and alpha.dtype == torch.float32
        assert alpha.abs().max() < 0.25 and alpha.abs().max() > 0.0


def test_gate_formula():
    attn = WanDiT.tiny().blocks[0].self_attn
    x = torch.randn(2, 7, 64)
    expected = (torch.sigmoid(x @ attn.alpha_1.weight.T) - 0.5) * 0.5
    torch.testing.assert_close(attn.gate(x), expected.unsqueeze(-1))


def test_sinusoidal_embedding_is_float64_cos_first():
    emb = sinusoidal_embedding(4, torch.tensor([1.0, 250.0]))
    assert emb.dtype == torch.float64
    t = torch.tensor([1.0, 250.0], dtype=torch.float64)[:, None]
    w = torch.tensor([1.0, 0.01], dtype=torch.float64)  # 10000^(-j / 2)
    torch.testing.assert_close(emb, torch.cat([torch.cos(t * w), torch.sin(t * w)], dim=1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("head_dim,split", [(128, (44, 42, 42)), (32, (12, 10, 10))])
def test_rope_split_and_angles(head_dim, split):
    assert rope_axis_dims(head_dim) == split
    grid = (3, 4, 5)
    freqs = rope_frequencies([grid], head_dim)
    assert freqs.dtype == torch.complex128 and freqs.shape == (60, head_dim // 2)
    for token in (0, 7, 33, 59):
        pos = (token // 20, token // 5 % 4, token % 5)
        angles = []
        for p, d in zip(pos, split):
            angles += [p * 10000.0 ** (-2 * j / d) for j in range(d // 2)]
        expected = torch.polar(torch.ones(head_dim // 2, dtype=torch.float64),
                               torch.tensor(angles, dtype=torch.float64))
        torch.testing.assert_close(freqs[token], expected, rtol=0, atol=1e-12)


def test_rope_gives_source_token_i_the_rotation_of_target_token_i():
    grid = (2, 3, 4)
    freqs = rope_frequencies([grid, grid], 128)
    assert freqs.shape == (48, 64)
    assert torch.equal(freqs[24:], freqs[:24])
    x = torch.randn(1, 24, 3, 128, dtype=torch.float64)
    rotated = apply_rope(torch.cat([x, x], dim=1), freqs)
    assert torch.equal(rotated[:, 24:], rotated[:, :24])
    assert not torch.allclose(rotated[:, :24], x)
    pairs = lambda t: t.view(*t.shape[:-1], 64, 2).norm(dim=-1)  # noqa: E731
    torch.testing.assert_close(pairs(rotated), pairs(torch.cat([x, x], dim=1)))


@torch.no_grad()
def test_model_applies_shared_positions(monkeypatch):
    model = WanDiT.tiny()
    latent, source, timestep, context = inputs(batch=1)
    seen = []
    real = model_module.apply_rope

    def spy(x, freqs):
        seen.append(freqs)
        return real(x, freqs)

    monkeypatch.setattr(model_module, "apply_rope", spy)
    model(latent, source, timestep, context)
    assert len(seen) == 2 * model.config.num_layers  # q and k of every self-attention
    tokens = 2 * 8 * 8
    assert seen[0].shape == (2 * tokens, 16)
    assert torch.equal(seen[0][tokens:], seen[0][:tokens])


@pytest.mark.parametrize("backend", ["dense", "torch"])
@torch.no_grad()
def test_cfg_batch_of_two_equals_two_single_calls(backend):
    model = WanDiT.tiny()
    if backend != "dense":
        model.set_attention(backend, ISAConfig(block_size=16))
    latent, source, timestep, context = inputs(batch=2)
    both = model(latent, source, timestep, context)
    for i in range(2):
        one = model(latent[i : i + 1], source, timestep[i : i + 1], context[i : i + 1])
        torch.testing.assert_close(both[i : i + 1], one, rtol=1e-5, atol=1e-5)
    per_sample_source = model(latent, source.expand(2, -1, -1, -1, -1), timestep, context)
    torch.testing.assert_close(per_sample_source, both, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_context_padding_scalar_timestep_and_source_influence():
    model = WanDiT.tiny()
    latent, source, _, context = inputs(batch=2)
    as_list = model(latent, source, 500.0, context)
    padded = torch.zeros(2, 512, 32)
    for i, c in enumerate(context):
        padded[i, : c.shape[0]] = c
    torch.testing.assert_close(model(latent, source, torch.tensor([500.0, 500.0]), padded), as_list)
    other_source = model(latent, source + 1.0, 500.0, context)
    assert (other_source - as_list).abs().max() > 1e-4  # the source tokens take part
    smaller_source = model(latent, source[:, :, :1, :8, :8], 500.0, context)
    assert smaller_source.shape == latent.shape  # only target tokens reach the head


@torch.no_grad()
def test_bf16_weights_keep_fp32_residual_and_output():
    model = WanDiT.tiny()
    latent, source, timestep, context = inputs(batch=1)
    reference = model(latent, source, timestep, context)
    out = model.to(torch.bfloat16)(latent, source, timestep, context)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - reference).abs().max() < 0.05 * reference.abs().max()


def test_bad_inputs_and_backends_are_refused():
    model = WanDiT.tiny()
    latent, source, timestep, context = inputs(batch=2)
    with pytest.raises(ValueError, match="backend must be one of"):
        model.set_attention("flash")
    with pytest.raises(ValueError, match="ISA backends only"):
        model.set_attention("dense", ISAConfig())
    with pytest.raises(TypeError, match="ISAConfig"):
        model.set_attention("torch", {"block_size": 64})
    assert model.attention_backend == "dense"
    with pytest.raises(ValueError, match="source_latent batch"):
        model(latent, torch.cat([source] * 3), timestep, context)
    with pytest.raises(ValueError, match="one text embedding per sample"):
        model(latent, source, timestep, context[:1])
    with pytest.raises(ValueError, match="L <= 512"):
        model(latent, source, timestep, [torch.randn(513, 32)] * 2)
    with pytest.raises(ValueError, match="divisible by the patch"):
        model(latent[..., :15], source, timestep, context)
    with pytest.raises(ValueError, match="timestep"):
        model(latent, source, torch.tensor([1.0, 2.0, 3.0]), context)


def cuda_isa_backends():
    from in_context_sparse_attention.backends import get_backend

    available = []
    for name in ("triton", "tilelang"):
        try:
            get_backend(name)
        except ValueError:
            continue
        available.append(name)
    return available


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_bf16_isa_kernels_match_dense_and_torch_reference():
    """head_dim 128 (the 14B model's) on CUDA in bf16, for every ISA kernel that imports here."""
    model = WanDiT.tiny(dim=256, num_heads=2, ffn_dim=256).to("cuda", torch.bfloat16)
    latent, source, timestep, context = (x.cuda() if isinstance(x, torch.Tensor) else x
                                         for x in inputs(batch=2, frames=3, size=32))
    context = [c.cuda() for c in context]
    dense = model(latent, source, timestep, context)
    config = ISAConfig(block_size=64)
    model.set_attention("torch", config)
    reference = model(latent, source, timestep, context)
    backends = cuda_isa_backends()
    assert backends, "no CUDA ISA backend imports"
    for backend in backends:
        model.set_attention(backend, config)
        out = model(latent, source, timestep, context)
        assert torch.isfinite(out).all()
        # bf16 kernels against the fp32 reference, through selection
        assert (out - reference).norm() <= 0.05 * reference.norm(), backend
        model.set_attention(backend, ISAConfig(select_ratio=1.0, flat_ratio=1.0))
        gate = [b.self_attn.alpha_1.weight.clone() for b in model.blocks]
        for b in model.blocks:
            b.self_attn.alpha_1.weight.zero_()
        everything = model(latent, source, timestep, context)
        for b, w in zip(model.blocks, gate):
            b.self_attn.alpha_1.weight.copy_(w)
        assert (everything - dense).norm() <= 0.02 * dense.norm(), backend
