"""Malformed text encoder checkpoints and tokenizer folders: `check_text_encoder_checkpoint`,
`check_tokenizer_folder` and `WanTextEncoder.from_wan_checkpoint` refuse each kind of bad file
with one `CheckpointError` whose one-line message names the file and the problem; the check
reads no tensor data and holds the real file's keys to umT5-XXL."""
import json
from pathlib import Path

import pytest
import torch

from test_checkpoint_dit import UNREADABLE, assert_refused, save, write_unreadable
from test_wanx_t5 import export_to_wan_naming
from wanx import t5 as wt5
from wanx.t5 import WanTextEncoder, check_text_encoder_checkpoint, check_tokenizer_folder

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="module")
def tiny():
    """The tiny encoder and its weights under Wan's names."""
    encoder = WanTextEncoder.tiny(seed=0)
    return encoder, export_to_wan_naming(encoder.model)


@pytest.fixture
def tokenizer_dir(tiny, tmp_path):
    tiny[0].tokenizer.save_pretrained(tmp_path / "tokenizer")
    return tmp_path / "tokenizer"


@pytest.fixture(params=["check", "load"])
def run(request, tokenizer_dir):
    if request.param == "check":
        return check_text_encoder_checkpoint
    return lambda path: WanTextEncoder.from_wan_checkpoint(path, tokenizer_dir, dtype=torch.float32)


PTH = "models_t5_umt5-xxl-enc-bf16.pth"


@pytest.mark.parametrize("kind", UNREADABLE)
@pytest.mark.parametrize("name", [PTH, "t5.safetensors"])
def test_unreadable_files(tiny, tmp_path, run, kind, name):
    write_unreadable(tmp_path / name, kind, tiny[1])
    assert_refused(run, tmp_path / name, "is not a readable (safetensors file|torch checkpoint)")


@pytest.mark.parametrize("obj, problem", [
    ([torch.zeros(2)], "holds a list, not a state dict"),
    ({"step": 3, "optimizer": "adam"}, "is not a state dict"),
], ids=["list", "metadata"])
def test_pickles_that_are_not_state_dicts(tmp_path, run, obj, problem):
    torch.save(obj, tmp_path / PTH)
    assert_refused(run, tmp_path / PTH, problem)


@pytest.mark.parametrize("change, problem", [
    ({"blocks.1.attn.k.weight": None}, r"1 missing \(e\.g\. \['blocks\.1\.attn\.k\.weight'\]\)"),
    ({"norm.weight": None}, r"1 missing \(e\.g\. \['norm\.weight'\]\)"),
    ({"token_embedding.weight": None}, "not a Wan umT5 encoder state dict: no 'token_embedding.weight'"),
    ({f"blocks.0.{k}": None for k in wt5._BLOCK_RENAMES}, r"no 'blocks\.0\."),
    ({"blocks.3.norm1.weight": torch.ones(32)}, r"blocks \[2\] of 0\.\.3 are missing"),
    ({"decoder.final_layer_norm.weight": torch.ones(32)}, r"1 unexpected .*decoder\.final_layer_norm\.weight"),
    ({"blocks.1.attn.q.weight": torch.ones(32, 31)},
     r"1 with the wrong shape \(e\.g\. blocks\.1\.attn\.q\.weight: \(32, 31\) vs \(32, 32\)\)"),
    ({"token_embedding.weight": torch.ones(100)}, r"token_embedding\.weight has shape \(100,\)"),
    ({"blocks.0.pos_embedding.embedding.weight": torch.ones(32, 5)}, "not a multiple of the 5 heads"),
], ids=["block key", "final norm", "embedding", "block 0", "gap", "unexpected", "shape", "1-D", "heads"])
def test_wrong_keys_and_shapes(tiny, tmp_path, run, change, problem):
    state = {**tiny[1], **change}
    save({k: v for k, v in state.items() if v is not None}, tmp_path / PTH)
    assert_refused(run, tmp_path / PTH, problem)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
@pytest.mark.parametrize("name", [PTH, "t5.safetensors"])
def test_non_floating_weights(tiny, tmp_path, run, dtype, name):
    state = dict(tiny[1])
    state["blocks.0.ffn.fc2.weight"] = torch.ones(state["blocks.0.ffn.fc2.weight"].shape, dtype=dtype)
    save(state, tmp_path / name)
    dtype_name = str(dtype).removeprefix("torch.")
    assert_refused(run, tmp_path / name, rf"not floating point.*blocks\.0\.ffn\.fc2\.weight \({dtype_name}")


def test_a_folder_is_not_the_checkpoint(tmp_path, run):
    assert_refused(run, tmp_path, "is a folder; expected the file models_t5_umt5-xxl-enc-bf16.pth")
    assert_refused(run, tmp_path / PTH, "does not exist")


def test_non_finite_weights_are_refused_as_they_load(tiny, tmp_path, tokenizer_dir):
    state = {key: value.clone() for key, value in tiny[1].items()}
    state["token_embedding.weight"][7, 3] = float("inf")
    torch.save(state, tmp_path / PTH)
    check_text_encoder_checkpoint(tmp_path / PTH)  # headers only: the values are not seen
    assert_refused(lambda p: WanTextEncoder.from_wan_checkpoint(p, tokenizer_dir), tmp_path / PTH,
                   r"tensor token_embedding\.weight holds NaN or Inf")


def test_loaded_encoder_keeps_one_embedding_table(tiny, tmp_path, tokenizer_dir):
    torch.save(tiny[1], tmp_path / PTH)
    loaded = WanTextEncoder.from_wan_checkpoint(tmp_path / PTH, tokenizer_dir, dtype=torch.bfloat16)
    assert loaded.model.shared.weight is loaded.model.encoder.embed_tokens.weight
    assert all(p.dtype == torch.bfloat16 and not p.is_meta for p in loaded.model.parameters())


def test_check_reads_no_tensor_data(tiny, tmp_path, monkeypatch):
    torch.save(tiny[1], tmp_path / PTH)
    read_entries = wt5.read_entries

    def entries_without_data(path):
        entries = read_entries(path)
        for entry in entries.values():
            entry.read = lambda: pytest.fail("the check read tensor data")
        return entries

    monkeypatch.setattr(wt5, "read_entries", entries_without_data)
    check_text_encoder_checkpoint(tmp_path / PTH)


def full_size_state(reshape=None):
    """The real umT5-XXL file's keys and shapes (fixture), each tensor one zero broadcast (a tiny file)."""
    shapes = json.loads((FIXTURES / "umt5_xxl_keys.json").read_text())["keys"]
    shapes.update(reshape or {})
    return {key: torch.zeros((), dtype=torch.bfloat16).expand(shape) for key, shape in shapes.items()}


def test_full_size_keys_pass_the_check(tmp_path):
    torch.save(full_size_state(), tmp_path / PTH)
    check_text_encoder_checkpoint(tmp_path / PTH)
    torch.save(full_size_state({"blocks.17.ffn.gate.0.weight": [10240, 4000]}), tmp_path / PTH)
    assert_refused(check_text_encoder_checkpoint, tmp_path / PTH,
                   r"1 with the wrong shape \(e\.g\. blocks\.17\.ffn\.gate\.0\.weight: \(10240, 4000\) vs \(10240, 40")


@pytest.fixture(params=["check", "load"])
def run_tokenizer(request, tiny, tmp_path):
    if request.param == "check":
        return check_tokenizer_folder
    torch.save(tiny[1], tmp_path / PTH)
    return lambda folder: WanTextEncoder.from_wan_checkpoint(tmp_path / PTH, folder, dtype=torch.float32)


@pytest.mark.parametrize("kind", UNREADABLE)
@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_unreadable_tokenizer_files(tokenizer_dir, run_tokenizer, kind, name):
    path = tokenizer_dir / name
    if kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) * 3 // 4])
    else:
        write_unreadable(path, kind, None)
    assert_refused(run_tokenizer, tokenizer_dir, "is not a readable JSON file", names=path)


def test_tokenizer_folder_structure(tokenizer_dir, tmp_path, run_tokenizer):
    run_tokenizer(tokenizer_dir)
    assert_refused(run_tokenizer, tmp_path / "nowhere", "does not exist")
    (tmp_path / "empty").mkdir()
    assert_refused(run_tokenizer, tmp_path / "empty", "has no tokenizer_config.json")
    (tmp_path / "empty" / "tokenizer_config.json").write_text("{}")
    assert_refused(run_tokenizer, tmp_path / "empty", "holds neither tokenizer.json nor spiece.model")
    (tmp_path / "empty" / "spiece.model").write_bytes(b"")
    assert_refused(run_tokenizer, tmp_path / "empty", "is empty", names=tmp_path / "empty" / "spiece.model")
    assert_refused(run_tokenizer, tmp_path / "empty" / "spiece.model", "is not a folder")
    (tokenizer_dir / "tokenizer_config.json").write_text("[1, 2]")
    assert_refused(run_tokenizer, tokenizer_dir, "holds a JSON list, not an object",
                   names=tokenizer_dir / "tokenizer_config.json")
    (tokenizer_dir / "tokenizer_config.json").write_text("{}")
    (tokenizer_dir / "tokenizer.json").write_text('{"version": "1.0"}')
    assert_refused(run_tokenizer, tokenizer_dir, 'has no "model"', names=tokenizer_dir / "tokenizer.json")


def test_tokenizer_errors_past_the_check_are_one_line_too(tiny, tokenizer_dir, tmp_path):
    """Files that pass the structural check but do not build, or build without a pad token."""
    torch.save(tiny[1], tmp_path / PTH)
    tokenizer = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    (tokenizer_dir / "tokenizer.json").write_text(json.dumps({"model": tokenizer["model"]}))
    check_tokenizer_folder(tokenizer_dir)
    assert_refused(lambda d: WanTextEncoder.from_wan_checkpoint(tmp_path / PTH, d), tokenizer_dir, "does not load")
    (tokenizer_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
    (tokenizer_dir / "tokenizer_config.json").write_text("{}")
    check_tokenizer_folder(tokenizer_dir)
    assert_refused(lambda d: WanTextEncoder.from_wan_checkpoint(tmp_path / PTH, d), tokenizer_dir,
                   "lacks a pad or an end-of-sequence token")
