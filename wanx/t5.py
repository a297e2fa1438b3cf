"""Wan's umT5-XXL text encoder on transformers' `UMT5EncoderModel`.

Wan ships the encoder as `models_t5_umt5-xxl-enc-bf16.pth` in its own naming
(`wan/modules/t5.py`, `T5Encoder` with one relative-position table per block). The
network is exactly transformers' UMT5 encoder: unscaled attention with a per-layer
bucketed relative-position bias (32 buckets, bidirectional, max distance 128),
RMS norms without bias or mean, a GELU(tanh)-gated feed-forward, no biases. Only the
names differ, and no library converter exists, so `convert_wan_t5_state_dict` renames
them (per block):

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
"""
from __future__ import annotations

import logging
import os
import re

import torch

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
    [num_buckets, num_heads].
    """
    from transformers import UMT5Config

    try:
        vocab_size, d_model = state_dict["token_embedding.weight"].shape
        d_ff = state_dict["blocks.0.ffn.fc1.weight"].shape[0]
        d_attn = state_dict["blocks.0.attn.q.weight"].shape[0]
        num_buckets, num_heads = state_dict["blocks.0.pos_embedding.embedding.weight"].shape
    except KeyError as exc:
        raise ValueError(f"not a Wan umT5 encoder state dict: no {exc.args[0]!r}") from None
    num_layers = 1 + max(int(m.group(1)) for m in map(_BLOCK_KEY.fullmatch, state_dict) if m)
    return UMT5Config(**dict(UMT5_XXL_CONFIG, vocab_size=vocab_size, d_model=d_model, d_ff=d_ff,
                             d_kv=d_attn // num_heads, num_heads=num_heads, num_layers=num_layers,
                             relative_attention_num_buckets=num_buckets))


def load_wan_t5_into_meta_model(state_dict: dict, config=None):
    """Build `UMT5EncoderModel` on the meta device and load a Wan-named state dict strictly.

    With `assign=True` the model takes the given tensors as its parameters (memory-mapped
    ones stay mapped; meta ones keep it shape-only). Missing, unexpected or wrongly shaped
    keys raise.
    """
    from transformers import UMT5EncoderModel

    config = config if config is not None else config_from_wan_state_dict(state_dict)
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    model.load_state_dict(convert_wan_t5_state_dict(state_dict), strict=True, assign=True)
    # assign=True wrapped the one embedding tensor in two Parameters; tie them again so a
    # later .to() converts (and allocates) the 2 GB table once.
    model.set_input_embeddings(model.shared)
    return model


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

        The file is memory-mapped (`weights_only=True, mmap=True`) and its tensors become
        the model's parameters directly, so loading costs no extra copy on the CPU.
        """
        pth_path = os.fspath(pth_path)
        if not os.path.isfile(pth_path):
            raise FileNotFoundError(f"text encoder checkpoint not found: {pth_path!r} "
                                    "(expected models_t5_umt5-xxl-enc-bf16.pth)")
        tokenizer = load_tokenizer(tokenizer_dir)
        logger.info("loading umT5 encoder %s", pth_path)
        state_dict = torch.load(pth_path, map_location="cpu", weights_only=True, mmap=True)
        model = load_wan_t5_into_meta_model(state_dict)
        return cls(model.to(device=device, dtype=dtype), tokenizer)

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
