"""Malformed DiT checkpoints: `check_dit_checkpoint` and `load_dit` refuse each kind of bad file
with one `CheckpointError` whose one-line message names the file and the problem; the check
reads no tensor data; NaN and Inf are refused as the loader reads each tensor."""
import os
import re
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from test_dit_loader import TINY_WAN_CONFIG, random_state, write_folder
from wanx import dit_loader
from wanx.dit_loader import CheckpointError, CheckpointWarning, check_dit_checkpoint, load_dit


def check(path, **kwargs):
    check_dit_checkpoint(path, config=TINY_WAN_CONFIG, **kwargs)


def load(path, **kwargs):
    load_dit(path, config=TINY_WAN_CONFIG, dtype=torch.float32, **kwargs)


BOTH = pytest.mark.parametrize("run", [check, load], ids=["check", "load"])


def assert_refused(run, path, problem, names=None, **kwargs):
    """`run` raises CheckpointError, in one line that names the file and matches `problem`."""
    with pytest.raises(CheckpointError) as caught:
        run(path, **kwargs)
    message = str(caught.value)
    assert "\n" not in message, message
    assert str(names or path) in message, message
    assert re.search(problem, message), message
    return message


def save(state, path):
    """`state` in the format the path's suffix names: safetensors, else a (zip) torch pickle."""
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)


def write_text(path):
    path.write_text("these are not weights\n" * 20)


UNREADABLE = ("text", "random bytes", "truncated")


def write_unreadable(path, kind, state):
    """A file that is no checkpoint: text, random bytes, or `state` saved then cut short by a quarter."""
    if kind == "text":
        write_text(path)
    elif kind == "random bytes":
        noise = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
        path.write_bytes(noise.numpy().tobytes())
    else:
        save(state, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) * 3 // 4])


@BOTH
@pytest.mark.parametrize("kind", UNREADABLE)
@pytest.mark.parametrize("name", ["dit.safetensors", "dit.bin"])
def test_unreadable_files(tmp_path, run, kind, name):
    path = tmp_path / name
    write_unreadable(path, kind, random_state(0))
    assert_refused(run, path, "is not a readable (safetensors file|torch checkpoint)")


@BOTH
def test_truncated_shard_in_an_expert_folder(tmp_path, run):
    folder = write_folder(tmp_path / "expert", random_state(0))
    shard = next(folder.glob("*-00002-of-00003.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])
    assert_refused(run, folder, "is not a readable safetensors file", names=shard)


@BOTH
def test_unreadable_overlay(tmp_path, run):
    folder = write_folder(tmp_path / "expert", random_state(0))
    write_text(tmp_path / "liveditor_ckpt.bin")
    assert_refused(run, folder, "not a readable torch checkpoint", names=tmp_path / "liveditor_ckpt.bin",
                   overlay=tmp_path / "liveditor_ckpt.bin")


NOT_STATE_DICTS = {
    "a list of tensors": ([torch.zeros(2)], "holds a list, not a state dict"),
    "a bare tensor": (torch.zeros(2), "holds a Tensor, not a state dict"),
    "training metadata": ({"step": 3, "lr": 0.1}, "is not a state dict"),
    "an empty dict": ({}, "empty state dict"),
}


@BOTH
@pytest.mark.parametrize("kind", list(NOT_STATE_DICTS))
def test_pickles_that_are_not_state_dicts(tmp_path, run, kind):
    obj, problem = NOT_STATE_DICTS[kind]
    torch.save(obj, tmp_path / "dit.pt")
    assert_refused(run, tmp_path / "dit.pt", problem)


@BOTH
def test_missing_keys(tmp_path, run):
    state = random_state(0)
    del state["blocks.1.ffn.2.bias"]
    save_file(state, str(tmp_path / "dit.safetensors"))
    assert_refused(run, tmp_path / "dit.safetensors", r"lacks 1 key\(s\): blocks\.1\.ffn\.2\.bias")


@BOTH
def test_wrong_shapes_in_one_line(tmp_path, run):
    state = random_state(0)
    state["head.head.weight"] = torch.zeros(5, 64)
    state["blocks.0.ffn.0.weight"] = torch.zeros(128, 63)
    torch.save({"state_dict": state}, tmp_path / "dit.bin")
    message = assert_refused(run, tmp_path / "dit.bin", r"2 shape mismatch\(es\)")
    assert "blocks.0.ffn.0.weight: expected (128, 64), got (128, 63)" in message
    assert "head.head.weight" in message


@BOTH
@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool])
@pytest.mark.parametrize("name", ["dit.safetensors", "dit.pth"])
def test_non_floating_weights(tmp_path, run, dtype, name):
    state = random_state(0)
    state["blocks.0.self_attn.q.weight"] = torch.ones(state["blocks.0.self_attn.q.weight"].shape, dtype=dtype)
    save(state, tmp_path / name)
    dtype_name = str(dtype).removeprefix("torch.")
    assert_refused(run, tmp_path / name, rf"not floating point.*blocks\.0\.self_attn\.q\.weight \({dtype_name}")


@BOTH
def test_non_floating_weight_in_the_overlay_names_the_overlay(tmp_path, run):
    folder = write_folder(tmp_path / "expert", random_state(0))
    torch.save({"model.head.modulation": torch.zeros(1, 2, 64, dtype=torch.int32)}, tmp_path / "ckpt.bin")
    assert_refused(run, folder, r"head\.modulation \(int32, in .*ckpt\.bin\)", names=tmp_path / "ckpt.bin",
                   overlay=tmp_path / "ckpt.bin")


def test_check_warns_of_unexpected_keys_as_the_loader_does(tmp_path):
    state = random_state(0)
    torch.save({**state, "blocks.0.self_attn.extra_gate.weight": torch.ones(3)}, tmp_path / "dit.bin")
    for run in (check, load):
        with pytest.warns(CheckpointWarning, match=r"dit\.bin carries .* 1 key\(s\): blocks\.0\.self_attn\.extra"):
            run(tmp_path / "dit.bin")


def test_check_accepts_every_loadable_layout(tmp_path):
    state = random_state(0)
    folder = write_folder(tmp_path / "expert", state)
    torch.save({"state_dict": {"model." + k: v for k, v in state.items()}}, tmp_path / "ckpt.bin")
    torch.save(state, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    check_dit_checkpoint(folder)
    check_dit_checkpoint(folder, overlay=tmp_path / "ckpt.bin")
    check(tmp_path / "ckpt.bin")
    check(tmp_path / "old.pth")  # legacy pickle: read whole, still checked


def test_check_reads_no_tensor_data(tmp_path, monkeypatch):
    """Every entry's reader and every safetensors tensor read fail: the check still passes."""
    state = random_state(0)
    folder = write_folder(tmp_path / "expert", state)
    torch.save({"state_dict": state}, tmp_path / "ckpt.bin")

    def refuse():
        raise AssertionError("the check read tensor data")

    read_entries, real_safe_open = dit_loader.read_entries, dit_loader.safe_open

    def entries_without_data(path):
        entries = read_entries(path)
        for entry in entries.values():
            entry.read = refuse
        return entries

    class HeadersOnly:
        def __init__(self, *args, **kwargs):
            self.handle = real_safe_open(*args, **kwargs)

        def keys(self):
            return self.handle.keys()

        def get_slice(self, key):
            return self.handle.get_slice(key)

        def get_tensor(self, key):
            refuse()

    monkeypatch.setattr(dit_loader, "read_entries", entries_without_data)
    monkeypatch.setattr(dit_loader, "safe_open", HeadersOnly)
    check_dit_checkpoint(folder, overlay=tmp_path / "ckpt.bin")
    with pytest.raises(AssertionError, match="read tensor data"):  # the loader reads through the patched entries
        load_dit(folder, overlay=tmp_path / "ckpt.bin")


def nan_state(value):
    state = random_state(0)
    state["blocks.1.cross_attn.k.weight"][3, 5] = value
    return state


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name", ["dit.safetensors", "dit.bin"])
def test_non_finite_weights_are_refused_as_they_load(tmp_path, value, name):
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_file(nan_state(value), str(path))
    else:
        torch.save({"state_dict": nan_state(value)}, path)
    check(path)  # headers only: the values are not seen
    assert_refused(load, path, r"tensor blocks\.1\.cross_attn\.k\.weight holds NaN or Inf")


def test_non_finite_in_an_expert_shard_names_the_shard(tmp_path):
    folder = write_folder(tmp_path / "expert", nan_state(float("nan")))
    shard = next(p for p in folder.glob("*.safetensors") if "blocks.1.cross_attn.k.weight" in
                 dit_loader.read_entries(p))
    assert_refused(lambda p: load_dit(p), folder, "cross_attn.k.weight holds NaN or Inf", names=shard)


def test_overflow_to_the_target_dtype_is_refused(tmp_path):
    state = random_state(0)
    state["head.head.weight"][0, 0] = 1e6  # finite in float32, Inf in float16
    save_file(state, str(tmp_path / "dit.safetensors"))
    load_dit(tmp_path / "dit.safetensors", config=TINY_WAN_CONFIG, dtype=torch.bfloat16)
    with pytest.raises(CheckpointError, match=r"dit\.safetensors: tensor head\.head\.weight overflows torch\.float16"):
        load_dit(tmp_path / "dit.safetensors", config=TINY_WAN_CONFIG, dtype=torch.float16)


def test_zip_checkpoints_are_memory_mapped_legacy_ones_read_whole(tmp_path, monkeypatch):
    """The pickle's structure alone is read for a zip file (mmap); a legacy pickle cannot be mapped."""
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("mmap"))
        return real_load(*args, **kwargs)

    state = random_state(0)
    torch.save(state, tmp_path / "zip.bin")
    torch.save(state, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    assert zipfile.is_zipfile(tmp_path / "zip.bin") and not zipfile.is_zipfile(tmp_path / "legacy.bin")
    monkeypatch.setattr(torch, "load", recording_load)
    check(tmp_path / "zip.bin")
    check(tmp_path / "legacy.bin")
    assert calls == [True, False]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_permissions(tmp_path):
    save_file(random_state(0), str(tmp_path / "dit.safetensors"))
    (tmp_path / "dit.safetensors").chmod(0)
    assert_refused(check, tmp_path / "dit.safetensors", r"not readable \(permissions\)")
