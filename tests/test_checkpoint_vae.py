"""Malformed VAE checkpoints: `check_vae_checkpoint` and `WanVAE.from_checkpoint` refuse each kind
of bad file with one `CheckpointError` whose one-line message names the file and the problem;
the check reads no tensor data and holds the real file's keys to the shipped Wan config."""
import json
from pathlib import Path

import pytest
import torch

from test_checkpoint_dit import UNREADABLE, assert_refused, save, write_text, write_unreadable
from test_wanx_vae import wan_named_state_dict
from wanx import vae as wvae
from wanx.vae import WanVAE, check_vae_checkpoint

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="module")
def tiny():
    """The tiny VAE, its weights under Wan's names, and its diffusers config folder."""
    vae = WanVAE.tiny(seed=0)
    return vae, wan_named_state_dict(vae)


@pytest.fixture
def config_dir(tiny, tmp_path):
    tiny[0].model.save_config(tmp_path / "config")
    return tmp_path / "config"


@pytest.fixture(params=["check", "load"])
def run(request, config_dir):
    if request.param == "check":
        return lambda path: check_vae_checkpoint(path, config=config_dir)
    return lambda path: WanVAE.from_checkpoint(path, config=config_dir)


@pytest.mark.parametrize("kind", UNREADABLE)
@pytest.mark.parametrize("name", ["Wan2.1_VAE.pth", "vae.safetensors"])
def test_unreadable_files(tiny, tmp_path, run, kind, name):
    write_unreadable(tmp_path / name, kind, tiny[1])
    assert_refused(run, tmp_path / name, "is not a readable (safetensors file|torch checkpoint)")


@pytest.mark.parametrize("obj, problem", [
    ([torch.zeros(2)], "holds a list, not a state dict"),
    ({"step": 3, "optimizer": "adam"}, "is not a state dict"),
], ids=["list", "metadata"])
def test_pickles_that_are_not_state_dicts(tmp_path, run, obj, problem):
    torch.save(obj, tmp_path / "Wan2.1_VAE.pth")
    assert_refused(run, tmp_path / "Wan2.1_VAE.pth", problem)


def test_missing_unexpected_and_misshapen_keys(tiny, tmp_path, run):
    state = dict(tiny[1])
    del state["decoder.head.2.weight"]
    save(state, tmp_path / "Wan2.1_VAE.pth")
    assert_refused(run, tmp_path / "Wan2.1_VAE.pth", r"does not match the model: 1 missing .*decoder\.conv_out\.w")

    state = {**tiny[1], "decoder.extra.weight": torch.zeros(2)}
    save(state, tmp_path / "vae.safetensors")
    assert_refused(run, tmp_path / "vae.safetensors", r"1 unexpected .*decoder\.extra\.weight")

    state = {**tiny[1], "encoder.conv1.bias": torch.zeros(7)}
    save(state, tmp_path / "Wan2.1_VAE.pth")
    assert_refused(run, tmp_path / "Wan2.1_VAE.pth", r"1 with the wrong shape .*encoder\.conv_in\.bias: \(7,\) vs \(8")


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
@pytest.mark.parametrize("name", ["Wan2.1_VAE.pth", "vae.safetensors"])
def test_non_floating_weights(tiny, tmp_path, run, dtype, name):
    state = dict(tiny[1])
    state["decoder.head.2.bias"] = torch.ones(state["decoder.head.2.bias"].shape, dtype=dtype)
    save(state, tmp_path / name)
    dtype_name = str(dtype).removeprefix("torch.")
    assert_refused(run, tmp_path / name, rf"not floating point.*decoder\.head\.2\.bias \({dtype_name}")


@pytest.mark.parametrize("name", ["Wan2.1_VAE.pth", "vae.safetensors"])
def test_non_finite_weights_are_refused_as_they_load(tiny, tmp_path, config_dir, name):
    state = {key: value.clone() for key, value in tiny[1].items()}
    state["encoder.head.2.weight"].view(-1)[5] = float("nan")
    save(state, tmp_path / name)
    check_vae_checkpoint(tmp_path / name, config=config_dir)  # headers only: the values are not seen
    assert_refused(lambda p: WanVAE.from_checkpoint(p, config=config_dir), tmp_path / name,
                   r"tensor encoder\.head\.2\.weight holds NaN or Inf")


@pytest.mark.parametrize("load", [False, True], ids=["check", "load"])
def test_diffusers_folder_with_a_bad_config_or_bad_weights(tiny, tmp_path, load):
    run = WanVAE.from_checkpoint if load else check_vae_checkpoint
    folder = tmp_path / "vae"
    tiny[0].model.save_pretrained(folder)
    run(folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-64])
    assert_refused(run, folder, "is not a readable safetensors file", names=weights)
    weights.write_bytes(data)
    write_text(folder / "config.json")
    assert_refused(run, folder, "not a readable AutoencoderKLWan config", names=folder)
    assert_refused(run, tmp_path / "missing", "does not exist")


def test_check_reads_no_tensor_data(tiny, tmp_path, config_dir, monkeypatch):
    save(tiny[1], tmp_path / "Wan2.1_VAE.pth")
    read_entries = wvae.read_entries

    def entries_without_data(path):
        entries = read_entries(path)
        for entry in entries.values():
            entry.read = lambda: pytest.fail("the check read tensor data")
        return entries

    monkeypatch.setattr(wvae, "read_entries", entries_without_data)
    check_vae_checkpoint(tmp_path / "Wan2.1_VAE.pth", config=config_dir)


def full_size_state(drop=None, reshape=None):
    """The real Wan2.1_VAE.pth's keys and shapes (fixture), each tensor one zero broadcast (a tiny file)."""
    document = json.loads((FIXTURES / "wan_vae_keys.json").read_text())
    shapes = {key: shape for key, shape in document["keys"].items() if key != drop}
    shapes.update(reshape or {})
    return {key: torch.zeros(()).expand(shape) for key, shape in shapes.items()}


def test_full_size_keys_pass_the_check_against_the_shipped_config(tmp_path):
    torch.save(full_size_state(), tmp_path / "Wan2.1_VAE.pth")
    check_vae_checkpoint(tmp_path / "Wan2.1_VAE.pth")  # configs/wan_vae, the real model
    torch.save(full_size_state(reshape={"decoder.head.2.weight": [3, 96, 3, 3, 1]}), tmp_path / "Wan2.1_VAE.pth")
    assert_refused(check_vae_checkpoint, tmp_path / "Wan2.1_VAE.pth",
                   r"1 with the wrong shape \(e\.g\. decoder\.conv_out\.weight: \(3, 96, 3, 3, 1\) vs \(3, 96, 3, 3")
    torch.save(full_size_state(drop="encoder.conv1.bias"), tmp_path / "Wan2.1_VAE.pth")
    assert_refused(check_vae_checkpoint, tmp_path / "Wan2.1_VAE.pth", r"1 missing .*encoder\.conv_in\.bias")
