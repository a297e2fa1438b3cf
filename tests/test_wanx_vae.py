"""WanVAE: full-size key check on the meta device, tiny random round trips, loaders, errors."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from wanx import vae as wvae
from wanx.dit_loader import CheckpointError
from wanx.vae import WanVAE

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def load_fixture_module():
    spec = importlib.util.spec_from_file_location("wan_original_keys", FIXTURES / "wan_original_keys.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny():
    return WanVAE.tiny(seed=0)


def test_shipped_config_is_wan21_with_wans_constants():
    config = json.loads((wvae.CONFIG_DIR / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKLWan"
    assert (config["base_dim"], config["z_dim"], config["num_res_blocks"]) == (96, 16, 2)
    assert config["dim_mult"] == [1, 2, 4, 4] and config["temperal_downsample"] == [False, True, True]
    assert config["latents_mean"] == list(wvae.WAN21_LATENTS_MEAN)
    assert config["latents_std"] == list(wvae.WAN21_LATENTS_STD)
    assert len(wvae.WAN21_LATENTS_MEAN) == len(wvae.WAN21_LATENTS_STD) == 16


def test_full_size_checkpoint_keys_load_strictly_on_meta():
    document = json.loads((FIXTURES / "wan_vae_keys.json").read_text())
    generated = load_fixture_module().fixture_documents()[FIXTURES / "wan_vae_keys.json"]
    assert document == json.loads(json.dumps(generated)), "fixture is stale: rerun tests/fixtures/wan_original_keys.py"
    assert document["count"] == len(document["keys"]) == 194

    original = {k: torch.empty(shape, device="meta") for k, shape in document["keys"].items()}
    converted = wvae.convert_wan_vae_state_dict(original)
    assert len(converted) == 194
    model = wvae.build_meta_vae()  # configs/wan_vae
    wvae.check_vae_keys(converted, model)
    result = model.load_state_dict(converted, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    # every original tensor landed somewhere, with its shape
    by_id = {id(t): k for k, t in original.items()}
    for name, param in model.state_dict().items():
        assert list(param.shape) == document["keys"][by_id[id(converted[name])]]
    assert sum(p.numel() for p in model.parameters()) == sum(
        torch.Size(s).numel() for s in document["keys"].values())


def test_key_check_names_what_is_wrong():
    document = json.loads((FIXTURES / "wan_vae_keys.json").read_text())
    original = {k: torch.empty(shape, device="meta") for k, shape in document["keys"].items()}
    model = wvae.build_meta_vae()
    broken = dict(original)
    del broken["decoder.head.2.weight"]
    broken["encoder.conv1.bias"] = torch.empty(7, device="meta")
    broken["extra.weight"] = torch.empty(1, device="meta")
    with pytest.raises(ValueError) as err:
        wvae.check_vae_keys(wvae.convert_wan_vae_state_dict(broken), model)
    message = str(err.value)
    assert "1 missing" in message and "decoder.conv_out.weight" in message
    assert "1 unexpected" in message and "extra.weight" in message
    assert "wrong shape" in message and "encoder.conv_in.bias" in message


def test_round_trip_shapes(tiny):
    assert tiny.z_dim == 16
    for batch, frames, height, width in [(2, 5, 16, 24), (1, 1, 8, 8)]:
        video = torch.rand(batch, 3, frames, height, width) * 2 - 1
        latents = tiny.encode(video)
        assert latents.shape == (batch, 16, (frames - 1) // 4 + 1, height // 8, width // 8)
        assert latents.shape[1:] == tiny.latent_shape(frames, height, width)
        assert latents.dtype == torch.float32
        decoded = tiny.decode(latents)
        assert decoded.shape == video.shape and decoded.dtype == torch.float32
        assert decoded.min() >= -1 and decoded.max() <= 1


def test_normalisation_constants_are_applied_exactly(tiny):
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    mean = torch.tensor(wvae.WAN21_LATENTS_MEAN).view(1, 16, 1, 1, 1)
    std = torch.tensor(wvae.WAN21_LATENTS_STD).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        dist = tiny.model.encode(video).latent_dist
        mode = dist.mode()
        assert torch.equal(mode, dist.mean)  # the mode of a Gaussian, no sampling
        expected = (mode - mean) * (1.0 / std)  # Wan: scale = [mean, 1 / std]
        latents = tiny.encode(video)
        assert torch.equal(latents, expected)

        z = torch.randn(1, 16, 2, 2, 2)
        raw = tiny.model.decode(z / (1.0 / std) + mean).sample
        assert torch.equal(tiny.decode(z), raw.clamp(-1, 1))


def test_decode_clamps_to_the_video_range():
    vae = WanVAE.tiny(seed=1)
    with torch.no_grad():
        vae.model.decoder.conv_out.bias.add_(1.5)  # push the raw output past 1
        z = torch.randn(1, 16, 1, 2, 2)
        raw = vae.model.decode(z / vae.latents_inv_std + vae.latents_mean).sample
    decoded = vae.decode(z)
    assert decoded.max() == 1 and decoded.min() >= -1  # saturated, not past 1
    assert torch.equal(decoded, raw.clamp(-1, 1))


def test_encode_rejects_bad_shapes(tiny):
    with pytest.raises(ValueError, match="4k\\+1"):
        tiny.encode(torch.zeros(1, 3, 8, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        tiny.encode(torch.zeros(1, 3, 5, 20, 16))
    with pytest.raises(ValueError, match=r"\[B, 3, F, H, W\]"):
        tiny.encode(torch.zeros(3, 5, 16, 16))
    with pytest.raises(ValueError, match=r"\[B, 16, F, H, W\]"):
        tiny.decode(torch.zeros(1, 4, 2, 2, 2))


def test_tiling_keeps_shapes(tiny):
    video = torch.rand(1, 3, 1, 32, 32) * 2 - 1
    tiny.enable_tiling(tile_sample_min_height=16, tile_sample_min_width=16,
                       tile_sample_stride_height=16, tile_sample_stride_width=16)
    try:
        assert tiny.model.use_tiling
        latents = tiny.encode(video)
        assert latents.shape == (1, 16, 1, 4, 4)
        assert tiny.decode(latents).shape == video.shape
    finally:
        tiny.disable_tiling()
    assert not tiny.model.use_tiling


def wan_named_state_dict(vae):
    """The tiny VAE's weights under original Wan names.

    Wan names come from the fixture module's derivation for the tiny widths; diffusers'
    converter maps each to its diffusers name, which must cover the model one to one.
    """
    config = vae.model.config
    names = load_fixture_module().wan_vae_keys(
        dim=config.base_dim, z_dim=config.z_dim, dim_mult=config.dim_mult,
        num_res_blocks=config.num_res_blocks, attn_scales=config.attn_scales,
        temperal_downsample=config.temperal_downsample)
    to_diffusers = wvae.convert_wan_vae_state_dict({name: name for name in names})
    diffusers_sd = vae.model.state_dict()
    assert sorted(to_diffusers) == sorted(diffusers_sd)
    return {wan: diffusers_sd[diff].clone() for diff, wan in to_diffusers.items()}


def test_loads_original_checkpoint_offline(tiny, tmp_path):
    state_dict = wan_named_state_dict(tiny)
    assert "decoder.middle.0.residual.0.gamma" in state_dict and "encoder.downsamples.0.residual.0.gamma" in state_dict
    pth = tmp_path / "Wan2.1_VAE_tiny.pth"
    torch.save(state_dict, pth)
    config_dir = tmp_path / "config"
    tiny.model.save_config(config_dir)

    loaded = WanVAE.from_checkpoint(pth, config=config_dir)
    for name, tensor in tiny.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    assert torch.equal(loaded.encode(video), tiny.encode(video))

    del state_dict["decoder.head.2.weight"]
    torch.save(state_dict, pth)
    with pytest.raises(ValueError, match="1 missing"):
        WanVAE.from_checkpoint(pth, config=config_dir)


def test_loads_diffusers_folder(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path / "vae")
    for path in (tmp_path / "vae", tmp_path):  # the folder itself or a pipeline root
        loaded = WanVAE.from_checkpoint(path)
        z = torch.randn(1, 16, 1, 2, 2)
        assert torch.equal(loaded.decode(z), tiny.decode(z))


def test_loader_errors(tmp_path):
    with pytest.raises(CheckpointError, match="Wan2.1_VAE.pth"):
        WanVAE.from_checkpoint(tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="config.json"):
        WanVAE.from_checkpoint(tmp_path)
