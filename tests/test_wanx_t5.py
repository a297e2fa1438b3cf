"""WanTextEncoder and Wan's prompt handling: full-size key check on meta, Wan-naming round
trip, agreement with Wan's encoder math, cleaning and tokenisation on tricky text."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from wanx import t5 as wt5
from wanx.dit_loader import CheckpointError
from wanx.t5 import WanTextEncoder
from wanx.tokenizer import TEXT_LEN, build_tiny_tokenizer, clean_text, load_tokenizer, tokenize

FIXTURES = Path(__file__).resolve().parent / "fixtures"

PROMPTS = ["Turn the dog into a cat", "", "make the sky red &amp;amp; snow at night"]

# transformers name -> Wan name, stated here independently of wanx.t5's table.
HF_TO_WAN_BLOCK = {
    "layer.0.layer_norm.weight": "norm1.weight",
    "layer.0.SelfAttention.q.weight": "attn.q.weight",
    "layer.0.SelfAttention.k.weight": "attn.k.weight",
    "layer.0.SelfAttention.v.weight": "attn.v.weight",
    "layer.0.SelfAttention.o.weight": "attn.o.weight",
    "layer.0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
    "layer.1.layer_norm.weight": "norm2.weight",
    "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",
    "layer.1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",
    "layer.1.DenseReluDense.wo.weight": "ffn.fc2.weight",
}


def export_to_wan_naming(model):
    """A transformers UMT5 encoder's weights under Wan's checkpoint names."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "shared.weight":
            out["token_embedding.weight"] = tensor.clone()
        elif name == "encoder.final_layer_norm.weight":
            out["norm.weight"] = tensor.clone()
        elif name.startswith("encoder.block."):
            index, rest = name[len("encoder.block."):].split(".", 1)
            out[f"blocks.{index}.{HF_TO_WAN_BLOCK[rest]}"] = tensor.clone()
        else:
            assert name == "encoder.embed_tokens.weight"  # tied to shared.weight
    return out


def wan_reference_encode(sd, ids, mask, num_heads, max_dist=128, eps=1e-6):
    """Wan's T5Encoder forward (wan/modules/t5.py), restated on a Wan-named state dict.

    ids, mask: [B, L]. Unscaled attention, one relative-position table per block
    (bidirectional buckets), RMS norms, fc2(fc1(x) * gelu_tanh(gate(x))).
    """
    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def buckets(rel, num_buckets):
        half = num_buckets // 2
        out = (rel > 0).long() * half
        dist = rel.abs()
        exact = half // 2
        large = exact + (torch.log(dist.float() / exact) / torch.log(torch.tensor(max_dist / exact))
                         * (half - exact)).long()
        return out + torch.where(dist < exact, dist, large.clamp(max=half - 1))

    batch, length = ids.shape
    x = sd["token_embedding.weight"][ids]
    positions = torch.arange(length)
    rel = positions[None, :] - positions[:, None]  # key minus query
    key_mask = torch.zeros(batch, 1, 1, length).masked_fill(mask[:, None, None, :] == 0, torch.finfo(x.dtype).min)
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(layers):
        p = f"blocks.{i}."
        table = sd[p + "pos_embedding.embedding.weight"]  # [buckets, heads]
        pos_bias = table[buckets(rel, table.shape[0])].permute(2, 0, 1)[None]  # [1, H, L, L]
        h = rms(x, sd[p + "norm1.weight"])
        q, k, v = (F.linear(h, sd[p + f"attn.{n}.weight"]).view(batch, length, num_heads, -1) for n in "qkv")
        attn = torch.softmax(torch.einsum("bihd,bjhd->bhij", q, k) + pos_bias + key_mask, dim=-1)
        x = x + F.linear(torch.einsum("bhij,bjhd->bihd", attn, v).reshape(batch, length, -1), sd[p + "attn.o.weight"])
        h = rms(x, sd[p + "norm2.weight"])
        gate = F.gelu(F.linear(h, sd[p + "ffn.gate.0.weight"]), approximate="tanh")
        gated = F.linear(h, sd[p + "ffn.fc1.weight"]) * gate
        x = x + F.linear(gated, sd[p + "ffn.fc2.weight"])
    return rms(x, sd["norm.weight"])


@pytest.fixture(scope="module")
def tiny():
    return WanTextEncoder.tiny(seed=0)


def load_fixture_module():
    spec = importlib.util.spec_from_file_location("wan_original_keys", FIXTURES / "wan_original_keys.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_full_size_checkpoint_keys_load_strictly_on_meta():
    document = json.loads((FIXTURES / "umt5_xxl_keys.json").read_text())
    generated = load_fixture_module().fixture_documents()[FIXTURES / "umt5_xxl_keys.json"]
    assert document == json.loads(json.dumps(generated)), "fixture is stale: rerun tests/fixtures/wan_original_keys.py"
    assert document["count"] == len(document["keys"]) == 242

    original = {k: torch.empty(s, dtype=torch.bfloat16, device="meta") for k, s in document["keys"].items()}
    config = wt5.config_from_wan_state_dict(original)
    for key, value in wt5.UMT5_XXL_CONFIG.items():
        assert getattr(config, key) == value, key
    model = wt5.load_wan_t5_into_meta_model(original)  # strict=True inside
    assert model.shared.weight is model.encoder.embed_tokens.weight
    # follow every model parameter back to the original key it was loaded from
    by_id = {id(t): k for k, t in original.items()}
    converted = wt5.convert_wan_t5_state_dict(original)
    state = model.state_dict()
    assert len(state) == 243  # 242 + the tied embedding listed twice
    assert sorted({by_id[id(converted[name])] for name in state}) == sorted(original)
    for name, param in state.items():
        assert param.is_meta and param.dtype == torch.bfloat16
        assert list(param.shape) == document["keys"][by_id[id(converted[name])]], name
    assert sum(p.numel() for p in model.parameters()) == sum(
        torch.Size(s).numel() for s in document["keys"].values())


def test_converter_rejects_foreign_keys():
    with pytest.raises(ValueError, match="not part of Wan's umT5 encoder"):
        wt5.convert_wan_t5_state_dict({"token_embedding.weight": torch.zeros(2, 2), "decoder.x": torch.zeros(1)})
    with pytest.raises(ValueError, match="blocks.0.ffn.fc1.weight"):
        wt5.config_from_wan_state_dict({"token_embedding.weight": torch.zeros(2, 2)})


def test_wan_naming_round_trip_gives_identical_outputs(tiny, tmp_path):
    pth = tmp_path / "models_t5_tiny-enc.pth"
    torch.save(export_to_wan_naming(tiny.model), pth)
    tokenizer_dir = tmp_path / "tokenizer"
    tiny.tokenizer.save_pretrained(tokenizer_dir)

    loaded = WanTextEncoder.from_wan_checkpoint(pth, tokenizer_dir, dtype=torch.float32)
    assert loaded.dim == tiny.dim == 32
    for expected, got in zip(tiny.encode(PROMPTS), loaded.encode(PROMPTS)):
        assert torch.equal(expected, got)


def test_mapping_agrees_with_wan_encoder_math(tiny):
    wan_sd = export_to_wan_naming(tiny.model)
    ids, mask = tokenize(tiny.tokenizer, PROMPTS)
    reference = wan_reference_encode(wan_sd, ids, mask, num_heads=tiny.model.config.num_heads)
    outputs = tiny.encode(PROMPTS)
    for row, (out, n) in enumerate(zip(outputs, mask.sum(1).tolist())):
        assert out.shape == (n, 32)
        torch.testing.assert_close(out, reference[row, :n], atol=1e-5, rtol=1e-5)


def test_bf16_outputs_and_device_moves():
    encoder = WanTextEncoder.tiny(seed=3, dtype=torch.bfloat16)
    outputs = encoder.encode(["a red car", ""])
    assert [o.dtype for o in outputs] == [torch.bfloat16] * 2
    assert outputs[1].shape == (1, 32)
    assert encoder.offload() is encoder and encoder.device.type == "cpu"
    assert encoder.to("cpu").device.type == "cpu"


def test_batch_padding_does_not_change_a_prompt(tiny):
    together = tiny.encode(["a cat", "the dog in the snow at night"])
    alone = tiny.encode(["a cat"])
    torch.testing.assert_close(together[0], alone[0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("raw, cleaned", [
    ("Tom &amp; Jerry", "Tom & Jerry"),
    ("<p> Tom &amp;amp; Jerry &lt;3", "<p> Tom & Jerry <3"),  # ftfy leaves HTML alone; Wan unescapes twice
    ("cafÃ© in Paris", "café in Paris"),                      # mojibake repaired by ftfy
    ("donâ€™t", "don't"),
    ("  a   red\t\tcar\n\n on  the road  ", "a red car on the road"),
    ("", ""),
    (" \n\t ", ""),
])
def test_clean_text_like_wan(raw, cleaned):
    assert clean_text(raw) == cleaned


def test_clean_text_rejects_non_strings():
    with pytest.raises(TypeError, match="prompt must be a str"):
        clean_text(None)
    with pytest.raises(TypeError, match="list of str"):
        tokenize(build_tiny_tokenizer(), "a single string")


def test_tokenizer_pads_masks_and_truncates_like_wan(tmp_path):
    tokenizer = build_tiny_tokenizer()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    tokenizer.save_pretrained(tmp_path)
    reloaded = load_tokenizer(tmp_path)

    long_prompt = "the cat " * 400  # 800 words, far past 512 tokens
    prompts = ["Turn the dog into a cat", "", "  caf&amp;eacute;  ", long_prompt]
    for tok in (tokenizer, reloaded):
        ids, mask = tokenize(tok, prompts)
        assert ids.shape == mask.shape == (4, TEXT_LEN) and ids.dtype == torch.long
        lengths = mask.sum(1).tolist()
        assert lengths[1] == 1 and ids[1, 0] == 1  # empty prompt: just </s>
        assert lengths[3] == TEXT_LEN and ids[3, -1] == 1  # truncated, </s> kept last
        for row, n in enumerate(lengths):
            assert mask[row, :n].all() and not mask[row, n:].any()
            assert ids[row, n - 1] == 1 and (ids[row, n:] == 0).all()
        words = tok.convert_ids_to_tokens(ids[0, :lengths[0]].tolist())
        assert words[-1] == "</s>" and "▁dog" in words and "▁cat" in words
        # the cleaned text is what gets tokenised (here: entity unescaped twice, spaces trimmed)
        assert ids[2, :lengths[2]].tolist() == tok("café")["input_ids"]


def test_encode_trims_to_true_lengths(tiny):
    long_prompt = "a dog " * 400
    outputs = tiny.encode(["a dog", "", long_prompt])
    _, mask = tokenize(tiny.tokenizer, ["a dog", "", long_prompt])
    assert [o.shape[0] for o in outputs] == mask.sum(1).tolist()
    assert [o.shape[0] for o in outputs][1:] == [1, TEXT_LEN]
    assert all(o.shape[1] == 32 and torch.isfinite(o).all() for o in outputs)


def test_loader_errors(tmp_path):
    with pytest.raises(CheckpointError, match="models_t5_umt5-xxl-enc-bf16.pth"):
        WanTextEncoder.from_wan_checkpoint(tmp_path / "missing.pth", tmp_path)
    with pytest.raises(FileNotFoundError, match="google/umt5-xxl"):
        load_tokenizer(tmp_path / "no_tokenizer")
    with pytest.raises(FileNotFoundError, match="text encoder folder"):
        WanTextEncoder.from_pretrained(tmp_path / "nothing")


def test_loads_transformers_folder(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path / "encoder")
    tiny.tokenizer.save_pretrained(tmp_path / "tokenizer")
    loaded = WanTextEncoder.from_pretrained(tmp_path / "encoder", tmp_path / "tokenizer", dtype=torch.float32)
    for expected, got in zip(tiny.encode(PROMPTS), loaded.encode(PROMPTS)):
        assert torch.equal(expected, got)
