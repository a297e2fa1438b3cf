"""wanx.dit_loader: every real checkpoint layout round-trips; overlays; clear, early errors."""
import argparse
import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

from model import TINY_CONFIG, WanDiT
from wanx.dit_loader import CheckpointError, CheckpointWarning, load_dit

# A Wan-style config.json for the tiny model (Wan's own keys, Wan's class name).
TINY_WAN_CONFIG = {"_class_name": "WanModel", "_diffusers_version": "0.33.0", "model_type": "t2v",
                   "in_dim": 16, "out_dim": 16, "eps": 1e-06, **TINY_CONFIG}


def random_state(seed):
    """A tiny model's state dict with every tensor random, so that any key mix-up shows."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in WanDiT.tiny().state_dict().items()}


def is_liveditor_key(key):
    return key.startswith("source_video_embedding_more_memory.") or ".alpha_" in key


def write_folder(folder, state, shards=3):
    """A Wan 2.2 expert folder: config.json, sharded safetensors and the index."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(TINY_WAN_CONFIG))
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k].contiguous() for k in keys[i::shards]}
        save_file(part, str(folder / name))
        weight_map.update({k: name for k in part})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def assert_loaded(model, expected, dtype=torch.float32):
    got = model.state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key].dtype == dtype, key
        assert torch.equal(got[key], value.to(dtype)), key


def test_sharded_folder_round_trips_in_bf16(tmp_path):
    state = random_state(0)
    model = load_dit(write_folder(tmp_path / "expert", state))  # default dtype bf16, config from the folder
    assert_loaded(model, state, torch.bfloat16)
    assert model.config.dim == 64 and not model.training and model.attention_backend == "dense"
    assert not any(p.is_meta for p in model.parameters())


def test_loaded_model_computes_what_the_saved_one_did(tmp_path):
    source_model = WanDiT.tiny(seed=5)
    folder = write_folder(tmp_path / "expert", source_model.state_dict(), shards=2)
    loaded = load_dit(folder, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(1, 16, 1, 4, 4, generator=g), torch.randn(1, 16, 1, 4, 4, generator=g), 300.0,
            [torch.randn(3, 32, generator=g)])
    with torch.no_grad():  # same weights; only memory alignment may change float rounding
        torch.testing.assert_close(loaded(*args), source_model(*args), rtol=1e-6, atol=1e-6)


def test_single_safetensors_with_config_dict(tmp_path):
    state = random_state(1)
    save_file(state, str(tmp_path / "dit.safetensors"))
    assert_loaded(load_dit(tmp_path / "dit.safetensors", dtype=torch.float32, config=TINY_WAN_CONFIG), state)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(TINY_WAN_CONFIG))
    config_json = tmp_path / "cfg" / "config.json"
    assert_loaded(load_dit(tmp_path / "dit.safetensors", dtype=torch.float32, config=config_json), state)


LAYOUTS = {
    "bare .pth": ("dit.pth", "", lambda sd: sd),
    "model. in state_dict": ("liveditor_ckpt.bin", "model.", lambda sd: {"state_dict": sd, "epoch": 3}),
    "model_ema. in weights": ("ema.pt", "model_ema.", lambda sd: {"weights": sd}),
    "module. in module": ("ddp.bin", "module.", lambda sd: {"module": sd}),
    "feedforward_model. bare": ("guided.bin", "wanx_unimodel.guidance_model.feedforward_model.", lambda sd: sd),
    "stacked module.model. in state_dict/module": (
        "nested.ckpt", "module.model.", lambda sd: {"state_dict": {"module": sd}}),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_torch_pickle_layouts_round_trip(tmp_path, layout):
    name, prefix, wrap = LAYOUTS[layout]
    state = random_state(2)
    torch.save(wrap({prefix + k: v for k, v in state.items()}), tmp_path / name)
    assert_loaded(load_dit(tmp_path / name, dtype=torch.float32, config=TINY_WAN_CONFIG), state)


def test_legacy_non_zip_pickle_loads(tmp_path):
    state = random_state(3)
    torch.save({"state_dict": state}, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    assert_loaded(load_dit(tmp_path / "old.pth", dtype=torch.float32, config=TINY_WAN_CONFIG), state)


def test_cross_attn_alphas_are_dropped_silently_and_missing_alpha_2_is_zero(tmp_path):
    state = random_state(4)
    extra = {f"blocks.{n}.cross_attn.alpha_{i}.weight": torch.randn(1, 64) for n in range(2) for i in (1, 2)}
    kept = {k: v for k, v in state.items() if not k.endswith("alpha_2.weight")}
    torch.save({"state_dict": {**kept, **extra}}, tmp_path / "liveditor_ckpt.bin")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = load_dit(tmp_path / "liveditor_ckpt.bin", dtype=torch.float32, config=TINY_WAN_CONFIG)
    expected = {k: (torch.zeros_like(v) if k.endswith("alpha_2.weight") else v) for k, v in state.items()}
    assert_loaded(model, expected)


def test_overlay_replaces_exactly_the_keys_it_carries(tmp_path):
    base = random_state(10)
    wan_only = {k: v for k, v in base.items() if not is_liveditor_key(k)}
    folder = write_folder(tmp_path / "Wan2.2-T2V-A14B" / "low_noise_model", wan_only)
    liveditor = random_state(11)
    carried = {k: v for k, v in liveditor.items() if is_liveditor_key(k) or k.startswith("blocks.1.")}
    torch.save({"state_dict": {"model." + k: v for k, v in carried.items()}}, tmp_path / "liveditor_ckpt.bin")
    model = load_dit(folder, overlay=tmp_path / "liveditor_ckpt.bin", dtype=torch.float32)
    expected = {k: carried.get(k, base[k]) for k in base}
    assert_loaded(model, expected)
    assert any(k not in carried for k in base) and any(k in wan_only for k in carried)


def test_missing_keys_are_listed(tmp_path):
    state = random_state(0)
    del state["blocks.1.ffn.2.bias"], state["head.modulation"]
    save_file(state, str(tmp_path / "dit.safetensors"))
    with pytest.raises(CheckpointError, match=r"lacks 2 key\(s\): blocks\.1\.ffn\.2\.bias, head\.modulation"):
        load_dit(tmp_path / "dit.safetensors", config=TINY_WAN_CONFIG)


def test_plain_wan_expert_without_overlay_says_what_is_missing(tmp_path):
    state = {k: v for k, v in random_state(0).items() if not is_liveditor_key(k)}
    with pytest.raises(CheckpointError, match="source_video_embedding_more_memory.bias.*plain Wan 2.2 expert.*overl"):
        load_dit(write_folder(tmp_path / "wan", state))


def test_shape_mismatches_name_key_expected_and_got(tmp_path):
    state = random_state(0)
    folder = write_folder(tmp_path / "expert", state)
    wrong = {**TINY_WAN_CONFIG, "ffn_dim": 96}
    with pytest.raises(CheckpointError, match=r"blocks\.0\.ffn\.0\.weight: expected \(96, 64\), got \(128, 64\)"):
        load_dit(folder, config=wrong)


def test_unexpected_keys_warn_with_their_names(tmp_path):
    state = random_state(0)
    torch.save({**state, "blocks.0.self_attn.extra_gate.weight": torch.ones(3)}, tmp_path / "dit.bin")
    with pytest.warns(CheckpointWarning, match=r"1 key\(s\): blocks\.0\.self_attn\.extra_gate\.weight"):
        model = load_dit(tmp_path / "dit.bin", dtype=torch.float32, config=TINY_WAN_CONFIG)
    assert_loaded(model, state)


def test_pickle_refused_by_weights_only_is_explained_not_loaded(tmp_path):
    state = random_state(0)
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=1e-4)}, tmp_path / "train.bin")
    with pytest.raises(CheckpointError, match="argparse.Namespace.*weights_only=True refuses.*never falls back"):
        load_dit(tmp_path / "train.bin", config=TINY_WAN_CONFIG)


@pytest.mark.parametrize("name", ["notes.bin", "notes.pth", "notes.safetensors"])
def test_non_checkpoint_files_are_refused(tmp_path, name):
    (tmp_path / name).write_text("these are not weights\n" * 20)
    with pytest.raises(CheckpointError, match="not a readable"):
        load_dit(tmp_path / name, config=TINY_WAN_CONFIG)


def test_missing_path_unknown_format_and_non_state_dicts(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_dit(tmp_path / "nowhere.safetensors")
    (tmp_path / "dit.onnx").write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        load_dit(tmp_path / "dit.onnx")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        load_dit(tmp_path / "list.pt", config=TINY_WAN_CONFIG)
    torch.save({"step": 3, "lr": 0.1}, tmp_path / "meta.pt")
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_dit(tmp_path / "meta.pt", config=TINY_WAN_CONFIG)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no safetensors weights"):
        load_dit(tmp_path / "empty")


def test_model_and_ema_copies_in_one_file_are_refused(tmp_path):
    state = random_state(0)
    both = {**{"model." + k: v for k, v in state.items()}, **{"model_ema." + k: v for k, v in state.items()}}
    torch.save(both, tmp_path / "both.bin")
    with pytest.raises(CheckpointError, match="both name"):
        load_dit(tmp_path / "both.bin", config=TINY_WAN_CONFIG)


def test_index_naming_a_missing_shard_is_refused(tmp_path):
    folder = write_folder(tmp_path / "expert", random_state(0))
    next(folder.glob("*-00002-of-00003.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="lists shard files.*00002-of-00003"):
        load_dit(folder)


@pytest.mark.gpu
def test_loads_straight_to_cuda_in_bf16(tmp_path):
    state = random_state(0)
    model = load_dit(write_folder(tmp_path / "expert", state), device="cuda")
    assert all(p.device.type == "cuda" and p.dtype == torch.bfloat16 for p in model.parameters())
    assert_loaded(model.cpu(), state, torch.bfloat16)
