"""Wan's umT5-XXL text encoder on transformers' `UMT5EncoderModel`.

Wan ships the encoder as `models_t5_umt5-xxl-enc-bf16.pth` in its own naming
(`wan/modules/t5.py`, `T5Encoder` with one relative-position table per block). The
network is exactly transformers' UMT5 encoder: unscaled attention with a per-layer
bucketed relative-position bias (32 buckets, bidirectional, max distance 128),
RMS norms without bias or mean, a GELU(tanh)-gated feed-forward, no biases. Only the
names differ, and no library converter exists, so `convert_wan_t5_state_dict` renames
them (per block; the module also holds the checkpoint preflight and the loader, which read
these names, so it is longer than most):

    norm1.weight               -> layer.0.layer_norm.weight
    attn.{q,k,v,o}.weight      -> layer.0.SelfAttention.{q,k,v,o}.weight
    pos_embedding.embedding.weight -> layer.0.SelfAttention.relative_attention_bias.weight
    norm2.weight               -> layer.1.layer_norm.weight
    ffn.gate.0.weight          -> layer.1.DenseReluDense.wi_0.weight  (the GELU branch)
    ffn.fc1.weight             -> layer.1.DenseReluDense.wi_1.weight  (the linear branch)
    ffn.fc2.weight             -> layer.1.DenseReluDense.wo.weight

plus `token_embedding.weight` -> `shared.weight` (= `encoder.embed_tokens.weight`, tied)
and `norm.weight` -> `encoder.final_layer_norm.weight`.

Wan runs the encoder in bf16 on prompts padded to 512 tokens with a mask, and keeps each
output only up to the prompt's true length (its tokens and `</s>`).

Bad files: `check_text_encoder_checkpoint` and `check_tokenizer_folder` check everything
that needs no tensor data (the checkpoint's format, key names, shapes and dtypes; the
tokenizer folder's files) and `WanTextEncoder.from_wan_checkpoint` runs them first; every
problem is a `wanx.dit_loader.CheckpointError` with a one-line message naming the file.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch

from .dit_loader import CheckpointError, error_line, load_tensor, match_keys, read_entries, require_floating
from .tokenizer import TEXT_LEN, build_tiny_tokenizer, load_tokenizer, tokenize

logger = logging.getLogger(__name__)

_BLOCK_RENAMES = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")
_WAN_BLOCK_NAMES = {hf: wan for wan, hf in _BLOCK_RENAMES.items()}
_HF_BLOCK_KEY = re.compile(r"encoder\.block\.(\d+)\.(.+)")

# google/umt5-xxl's encoder, as Wan's `umt5_xxl()` configures it (relative_attention_max_distance
# is 128 in both). Dropout is irrelevant at inference and set to 0.
UMT5_XXL_CONFIG = dict(
    vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_heads=64, num_layers=24,
    relative_attention_num_buckets=32, relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0,
    is_encoder_decoder=False,
)

# The random encoder of `WanTextEncoder.tiny()`: output dim 32, 4 heads of 8, 2 layers.
TINY_CONFIG = dict(UMT5_XXL_CONFIG, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=2)


def convert_wan_t5_state_dict(state_dict: dict) -> dict:
    """Rename a Wan-named umT5 encoder state dict to `UMT5EncoderModel` names (no copies).

    The token embedding is emitted under both `shared.weight` and
    `encoder.embed_tokens.weight` (one tensor), as transformers ties them.
    Raises ValueError on a key that is not part of Wan's encoder.
    """
    converted, unknown = {}, []
    for name, tensor in state_dict.items():
        block = _BLOCK_KEY.fullmatch(name)
        if name == "token_embedding.weight":
            converted["shared.weight"] = tensor
            converted["encoder.embed_tokens.weight"] = tensor
        elif name == "norm.weight":
            converted["encoder.final_layer_norm.weight"] = tensor
        elif block and block.group(2) in _BLOCK_RENAMES:
            converted[f"encoder.block.{block.group(1)}.{_BLOCK_RENAMES[block.group(2)]}"] = tensor
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(f"{len(unknown)} keys are not part of Wan's umT5 encoder (e.g. {unknown[:3]}); "
                         "expected models_t5_umt5-xxl-enc-bf16.pth naming (token_embedding, blocks.N.*, norm)")
    return converted


def config_from_wan_state_dict(state_dict: dict):
    """The `UMT5Config` matching a Wan-named encoder state dict, read off its shapes.

    For the real checkpoint this gives `UMT5_XXL_CONFIG`; it also fits smaller encoders
    exported to Wan naming (tests). The head count comes from the position table
    [num_buckets, num_heads]. The values may be tensors or anything with a `.shape`
    (`wanx.dit_loader` entries). Raises ValueError when the shapes read cannot describe an
    encoder, or when block numbers have gaps. (A file that lacks only its last blocks
    describes a shallower encoder; nothing in the file alone tells the two apart.)
    """
    from transformers import UMT5Config

    shapes = {}
    for key in ("token_embedding.weight", "blocks.0.ffn.fc1.weight", "blocks.0.attn.q.weight",
                "blocks.0.pos_embedding.embedding.weight"):
        if key not in state_dict:
            raise ValueError(f"not a Wan umT5 encoder state dict: no {key!r}")
        shapes[key] = tuple(state_dict[key].shape)
        if len(shapes[key]) != 2 or 0 in shapes[key]:
            raise ValueError(f"{key} has shape {shapes[key]}, not that of a 2-D weight")
    vocab_size, d_model = shapes["token_embedding.weight"]
    d_ff = shapes["blocks.0.ffn.fc1.weight"][0]
    d_attn = shapes["blocks.0.attn.q.weight"][0]
    num_buckets, num_heads = shapes["blocks.0.pos_embedding.embedding.weight"]
    if d_attn % num_heads:
        raise ValueError(f"blocks.0.attn.q.weight has {d_attn} rows, not a multiple of the {num_heads} heads "
                         "of blocks.0.pos_embedding.embedding.weight")
    blocks = {int(m.group(1)) for m in map(_BLOCK_KEY.fullmatch, state_dict) if m}
    if max(blocks) >= len(blocks):  # then some number below len(blocks) is absent: list those, a bounded range
        gaps = [i for i in range(len(blocks)) if i not in blocks]
        raise ValueError(f"blocks {gaps[:5]} of 0..{max(blocks)} are missing")
    return UMT5Config(**dict(UMT5_XXL_CONFIG, vocab_size=vocab_size, d_model=d_model, d_ff=d_ff,
                             d_kv=d_attn // num_heads, num_heads=num_heads, num_layers=len(blocks),
                             relative_attention_num_buckets=num_buckets))


def build_meta_encoder(config):
    """`UMT5EncoderModel` of `config` on the meta device (shapes only, no memory)."""
    from transformers import UMT5EncoderModel

    with torch.device("meta"):
        return UMT5EncoderModel(config)


def _assign_wan_weights(model, state_dict: dict) -> None:
    """Make a Wan-named state dict's tensors the parameters of a meta `UMT5EncoderModel`, strictly.

    With `assign=True` the model takes the given tensors as its parameters (memory-mapped
    ones stay mapped; meta ones keep it shape-only). Missing, unexpected or wrongly shaped
    keys raise.
    """
    model.load_state_dict(convert_wan_t5_state_dict(state_dict), strict=True, assign=True)
    # assign=True wrapped the one embedding tensor in two Parameters; tie them again so a
    # later .to() converts (and allocates) the 2 GB table once.
    model.set_input_embeddings(model.shared)


def load_wan_t5_into_meta_model(state_dict: dict, config=None):
    """Build `UMT5EncoderModel` on the meta device and load a Wan-named state dict strictly.

    See `_assign_wan_weights`; the config is read off the state dict's shapes unless given.
    """
    model = build_meta_encoder(config if config is not None else config_from_wan_state_dict(state_dict))
    _assign_wan_weights(model, state_dict)
    return model


def _expected_wan_shapes(model) -> dict[str, tuple]:
    """The Wan-named keys and shapes a `UMT5EncoderModel` needs: the renaming table read backwards.

    A model key with no Wan name (none today) is expected under its own name, so that it
    is reported missing rather than skipped.
    """
    expected = {}
    for name, tensor in model.state_dict().items():
        block = _HF_BLOCK_KEY.fullmatch(name)
        if name == "shared.weight":
            expected["token_embedding.weight"] = tuple(tensor.shape)
        elif name == "encoder.final_layer_norm.weight":
            expected["norm.weight"] = tuple(tensor.shape)
        elif block and block.group(2) in _WAN_BLOCK_NAMES:
            expected[f"blocks.{block.group(1)}.{_WAN_BLOCK_NAMES[block.group(2)]}"] = tuple(tensor.shape)
        elif name != "encoder.embed_tokens.weight":  # tied to shared.weight
            expected[name] = tuple(tensor.shape)
    return expected


def _prepare(path: str | os.PathLike):
    """The meta encoder and the checkpoint's checked entries: every check that needs no tensor data.

    `check_text_encoder_checkpoint` runs this alone and `WanTextEncoder.from_wan_checkpoint`
    runs it first.
    """
    path = Path(path)
    what = f"text encoder checkpoint {path}"
    if path.is_dir():
        raise CheckpointError(f"{what} is a folder; expected the file models_t5_umt5-xxl-enc-bf16.pth")
    if not path.exists():
        raise CheckpointError(f"{what} does not exist (expected models_t5_umt5-xxl-enc-bf16.pth)")
    entries = read_entries(path)
    try:
        config = config_from_wan_state_dict(entries)
    except ValueError as error:
        raise CheckpointError(f"{what}: {error_line(error)}") from error
    model = build_meta_encoder(config)
    match_keys(_expected_wan_shapes(model), entries, what)
    require_floating(entries)
    return model, entries


def check_text_encoder_checkpoint(path: str | os.PathLike) -> None:
    """Check Wan's umT5 checkpoint as `WanTextEncoder.from_wan_checkpoint` would load it, without tensor data.

    The file must open as a torch pickle read with weights_only=True (or as safetensors),
    hold a state dict in Wan's naming, and have exactly the keys and shapes of the encoder
    its shapes describe (for Wan's file, umT5-XXL: 24 blocks of width 4096), all floating
    point. Only headers are read: for a zip-format pickle, memory-mapped, the pickle's
    structure; a legacy non-zip pickle is read whole. NaN and Inf need the data:
    `from_wan_checkpoint` refuses them as it loads each tensor.

    Raises:
        CheckpointError: the problem in one line, naming the file.
    """
    _prepare(path)


def _json_object(path: Path, what: str) -> dict:
    """A JSON file that must hold an object, or a one-line CheckpointError naming it."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{what} {path} is not a readable JSON file: {error_line(error)}") from error
    if not isinstance(document, dict):
        raise CheckpointError(f"{what} {path} holds a JSON {type(document).__name__}, not an object")
    return document


def check_tokenizer_folder(path: str | os.PathLike) -> None:
    """Check the umT5 tokenizer folder (`google/umt5-xxl`) without building the tokenizer.

    The folder must hold `tokenizer_config.json` (a JSON object: without it transformers
    builds a tokenizer with no pad token, and Wan pads every prompt) and a vocabulary:
    `tokenizer.json`, parsed as JSON and holding a "model", or else a non-empty
    sentencepiece `spiece.model`. What the files say beyond that shows only when they are
    built, so `from_wan_checkpoint` turns any error of the build into a CheckpointError too.

    Raises:
        CheckpointError: the problem in one line, naming the folder or file.
    """
    folder = Path(path)
    if not folder.exists():
        raise CheckpointError(f"tokenizer folder {folder} does not exist (expected the google/umt5-xxl folder)")
    if not folder.is_dir():
        raise CheckpointError(f"tokenizer folder {folder} is not a folder (expected the google/umt5-xxl folder)")
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        raise CheckpointError(f"tokenizer folder {folder} has no tokenizer_config.json")
    _json_object(config, "tokenizer config")
    fast, sentencepiece = folder / "tokenizer.json", folder / "spiece.model"
    if fast.is_file():
        if "model" not in _json_object(fast, "tokenizer file"):
            raise CheckpointError(f"tokenizer file {fast} has no \"model\": not a tokenizers file")
    elif not sentencepiece.is_file():
        raise CheckpointError(f"tokenizer folder {folder} holds neither tokenizer.json nor spiece.model")
    elif sentencepiece.stat().st_size == 0:
        raise CheckpointError(f"tokenizer file {sentencepiece} is empty")


def _load_checked_tokenizer(path: str | os.PathLike):
    """`load_tokenizer` after `check_tokenizer_folder`, with every error of the build as a CheckpointError.

    The whole `Exception` is caught: transformers raises OSError, ValueError, KeyError or
    TypeError on malformed files, and the `tokenizers` library raises bare `Exception`.
    """
    check_tokenizer_folder(path)
    try:
        tokenizer = load_tokenizer(path)
    except Exception as error:
        raise CheckpointError(f"tokenizer folder {path} does not load ({type(error).__name__}: "
                              f"{error_line(error)})") from error
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise CheckpointError(f"tokenizer folder {path} lacks a pad or an end-of-sequence token (umT5: <pad>, </s>)")
    return tokenizer


class WanTextEncoder:
    """Prompts -> umT5 hidden states, Wan style.

    Holds `.model` (`UMT5EncoderModel`, eval, no gradients) and `.tokenizer`. Build it with
    `from_wan_checkpoint`, `from_pretrained` or `tiny`.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, text_len: int = TEXT_LEN):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_len = text_len

    @classmethod
    def from_wan_checkpoint(
        cls,
        pth_path: str | os.PathLike,
        tokenizer_dir: str | os.PathLike,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
    ) -> "WanTextEncoder":
        """Load Wan's `models_t5_umt5-xxl-enc-bf16.pth` and the `google/umt5-xxl` tokenizer folder.

        Both are checked first (`check_text_encoder_checkpoint`, `check_tokenizer_folder`).
        The file is memory-mapped (`weights_only=True, mmap=True`); each tensor is converted
        to `dtype` on `device`, refused if it holds NaN or Inf
        (`wanx.dit_loader.load_tensor`), and becomes a parameter of the model built on the
        meta device, so loading costs no extra copy.

        Raises:
            CheckpointError: any problem with the checkpoint or the tokenizer folder, in one
                line naming the file.
        """
        model, entries = _prepare(pth_path)
        tokenizer = _load_checked_tokenizer(tokenizer_dir)
        logger.info("loading umT5 encoder %s", pth_path)
        state_dict = {name: load_tensor(entry, dtype, device) for name, entry in entries.items()}
        try:
            _assign_wan_weights(model, state_dict)
        except (RuntimeError, ValueError) as error:
            raise CheckpointError(f"text encoder checkpoint {pth_path} does not load: {error_line(error)}") from error
        return cls(model, tokenizer)

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        tokenizer_dir: str | os.PathLike | None = None,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
    ) -> "WanTextEncoder":
        """Load a transformers `UMT5EncoderModel` folder; the tokenizer from `tokenizer_dir` or the same folder."""
        from transformers import UMT5EncoderModel

        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"text encoder folder not found: {folder!r}")
        tokenizer = load_tokenizer(tokenizer_dir if tokenizer_dir is not None else folder)
        model = UMT5EncoderModel.from_pretrained(folder, dtype=dtype, local_files_only=True)
        return cls(model.to(device), tokenizer)

    @classmethod
    def tiny(
        cls,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> "WanTextEncoder":
        """A random small UMT5 encoder (`TINY_CONFIG`: output dim 32) with `build_tiny_tokenizer()`."""
        from transformers import UMT5Config, UMT5EncoderModel

        tokenizer = build_tiny_tokenizer()
        config = UMT5Config(**dict(TINY_CONFIG, vocab_size=len(tokenizer)))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = UMT5EncoderModel(config)
        return cls(model.to(device=device, dtype=dtype), tokenizer)

    @property
    def dim(self) -> int:
        """Width of the hidden states (4096 for umT5-XXL, 32 for `tiny`)."""
        return int(self.model.config.d_model)

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    def to(self, device: str | torch.device) -> "WanTextEncoder":
        self.model.to(device)
        return self

    def offload(self) -> "WanTextEncoder":
        """Move the weights to the CPU and release cached GPU memory (the encoder runs once per edit)."""
        self.model.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return self

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        """Encode prompts; each output is trimmed to its prompt's true length.

        Args:
            prompts: B strings; cleaned as Wan does (`wanx.tokenizer.clean_text`). An
                empty prompt is valid (it is just `</s>`: length 1).

        Returns:
            B tensors [L_i, dim] in the model's dtype on its device, L_i <= 512 the
            number of real tokens (`</s>` included). The DiT zero-pads them back to 512.
        """
        ids, mask = tokenize(self.tokenizer, prompts, self.text_len)
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, 512, dim]
        lengths = mask.sum(dim=1).tolist()
        return [h[:n] for h, n in zip(hidden, lengths)]
