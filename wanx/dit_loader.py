"""Load the LIVEditor / Wan 2.2 DiT weights into `model.WanDiT`, shard by shard.

Accepted checkpoints (SPEC section 4):
- a Wan 2.2 expert folder: `config.json`, `diffusion_pytorch_model-*.safetensors` shards and
  their `diffusion_pytorch_model.safetensors.index.json` (or one unsharded safetensors);
- a single `.safetensors` file;
- a torch pickle (`.bin`, `.pth`, `.pt`, `.ckpt`) such as LIVEditor's `liveditor_ckpt.bin`,
  read with `weights_only=True` (never anything less safe) and memory-mapped;
- a base (usually the folder) with an overlay (usually `liveditor_ckpt.bin`) whose keys
  replace exactly the base's keys of the same name.

Wrapper keys (`state_dict`, `module`, `weights`) and key prefixes (`model.`, `model_ema.`,
`module.`, `wanx_unimodel.guidance_model.feedforward_model.`) are stripped.

Memory: the model is built on the meta device and every tensor is read, converted to the
target dtype and moved to the target device one at a time, so host memory peaks near the
model plus the largest tensor (safetensors and zip-format pickles are memory-mapped).
Everything that can be checked from headers alone (missing keys, shapes, unexpected keys)
is checked before any tensor data is read.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

import torch
from safetensors import SafetensorError, safe_open

from model import WanDiT

logger = logging.getLogger(__name__)

WRAPPER_KEYS = ("state_dict", "module", "weights")
KEY_PREFIXES = ("wanx_unimodel.guidance_model.feedforward_model.", "model_ema.", "model.", "module.")
TORCH_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")
# Carried by LIVEditor checkpoints because upstream's cross-attention class inherits the
# self-attention constructor; unused, so dropped without a warning (SPEC section 3).
SILENTLY_DROPPED = re.compile(r"blocks\.\d+\.cross_attn\.alpha_[12]\.weight")
# Zero-initialised and unused in the forward pass: zeros when a checkpoint lacks it.
ZERO_WHEN_MISSING = re.compile(r"blocks\.\d+\.self_attn\.alpha_2\.weight")
LIVEDITOR_KEYS = re.compile(r"source_video_embedding_more_memory\.|blocks\.\d+\.self_attn\.alpha_[12]\.")
_LISTED = 20  # keys named in an error message before "... and N more"

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into `WanDiT`, with the reason."""


class CheckpointWarning(UserWarning):
    """A checkpoint that loads but carries keys the model does not use."""


@dataclass
class _Entry:
    """Where one model key lives: a file's reader, its name there, its shape and dtype."""

    origin: str
    raw_key: str
    shape: tuple
    read: Callable[[], torch.Tensor]


def _name_keys(keys) -> str:
    """'N key(s): a, b, ...' naming the first _LISTED keys in sorted order."""
    keys = sorted(keys)
    more = f", ... and {len(keys) - _LISTED} more" if len(keys) > _LISTED else ""
    return f"{len(keys)} key(s): {', '.join(keys[:_LISTED])}{more}"


def _strip_prefixes(key: str) -> str:
    """Remove any stack of the known wrapper prefixes (e.g. `module.model.`)."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in KEY_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def _add_entries(entries: dict, raw: Mapping[str, _Entry], origin: str) -> None:
    """Normalise raw keys into `entries`; two raw keys naming one model key is an error."""
    seen: dict[str, str] = {}
    for raw_key, entry in raw.items():
        key = _strip_prefixes(raw_key)
        if key in seen:
            raise CheckpointError(
                f"{origin}: keys {seen[key]!r} and {raw_key!r} both name {key!r} once prefixes are stripped "
                "(e.g. a model and its EMA copy in one file); keep one of them"
            )
        seen[key] = raw_key
        entries[key] = entry


def _safetensors_entries(path: Path) -> dict[str, _Entry]:
    """Headers of one safetensors file; tensors are read lazily, one at a time."""
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from error
    if not shapes:
        raise CheckpointError(f"{path} holds no tensors")

    def reader(key):
        return lambda: handle.get_tensor(key)

    return {key: _Entry(str(path), key, shape, reader(key)) for key, shape in shapes.items()}


def _torch_load(path: Path):
    """torch.load with weights_only=True, memory-mapped for zip-format files."""
    mmap = zipfile.is_zipfile(path)
    if not mmap:
        logger.info("%s is a legacy (non-zip) torch file: it is read into memory whole", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        message = str(error)
        if "Weights only load failed" not in message:
            raise CheckpointError(f"{path} is not a readable torch checkpoint: {message.splitlines()[0]}") from error
        found = re.search(r"GLOBAL (\S+)", message)
        culprit = f" (it needs {found.group(1)})" if found else ""
        raise CheckpointError(
            f"{path} pickles Python objects beyond tensors and plain containers{culprit}, so torch.load "
            "with weights_only=True refuses it. Unpickling such objects can run arbitrary code, so this "
            "loader never falls back to weights_only=False. Re-save only the state dict (a dict of "
            "tensors) from a trusted environment, or convert it to safetensors."
        ) from error
    except Exception as error:  # arbitrary bytes can make the unpickler raise almost anything
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"{path} is not a readable torch checkpoint: {first}") from error


def _unwrap(obj, path: Path) -> Mapping[str, torch.Tensor]:
    """Descend through wrapper keys to the state dict of tensors."""
    while isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"{path} is not a state dict: entries {bad[:_LISTED]} are not tensors, and none of the wrapper "
            f"keys {WRAPPER_KEYS} holds one"
        )
    if not obj:
        raise CheckpointError(f"{path} holds an empty state dict")
    return obj


def _torch_entries(path: Path) -> dict[str, _Entry]:
    state = _unwrap(_torch_load(path), path)
    return {key: _Entry(str(path), key, tuple(t.shape), (lambda t=t: t)) for key, t in state.items()}


def _folder_entries(folder: Path) -> dict[str, _Entry]:
    """All tensors of a Wan expert folder, via its index when sharded."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        preferred = folder / "diffusion_pytorch_model.safetensors.index.json"
        if preferred not in indexes:
            raise CheckpointError(f"{folder} holds several safetensors indexes {[p.name for p in indexes]}; pass a file")
        indexes = [preferred]
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"{indexes[0]} is not a safetensors index (a JSON with a 'weight_map'): {error}") from error
        shards = sorted(set(weight_map.values()))
        missing_files = [name for name in shards if not (folder / name).is_file()]
        if missing_files:
            raise CheckpointError(f"{indexes[0]} lists shard files that {folder} lacks: {missing_files}")
    else:
        shards = sorted(p.name for p in folder.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"{folder} holds no safetensors weights (expected diffusion_pytorch_model*.safetensors)")
    entries: dict[str, _Entry] = {}
    for name in shards:
        shard = _safetensors_entries(folder / name)
        if indexes:
            listed = {k for k, v in weight_map.items() if v == name}
            absent = listed - shard.keys()
            if absent:
                raise CheckpointError(f"{indexes[0].name} places keys in {name} that it lacks: " + _name_keys(absent))
        duplicated = entries.keys() & shard.keys()
        if duplicated:
            raise CheckpointError(f"{folder}: shards repeat " + _name_keys(duplicated))
        entries.update(shard)
    return entries


def read_entries(path: PathLike) -> dict[str, _Entry]:
    """Raw (unnormalised) key -> entry for a folder, a safetensors file or a torch file.

    Raises:
        CheckpointError: missing path, unknown format, unreadable or non-checkpoint file.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        return _folder_entries(path)
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"checkpoint {path} is not readable (permissions)")
    if path.suffix == ".safetensors":
        return _safetensors_entries(path)
    if path.suffix in TORCH_SUFFIXES:
        return _torch_entries(path)
    raise CheckpointError(
        f"{path}: unknown checkpoint format; expected a Wan expert folder, a .safetensors file or a torch "
        f"file ({', '.join(TORCH_SUFFIXES)})"
    )


def _resolve_config(path: Path, config) -> dict:
    """The model config: given (dict, folder or config.json), else the folder's, else Wan's A14B."""
    if isinstance(config, Mapping):
        return dict(config)
    source = Path(config) if config is not None else (path / "config.json" if path.is_dir() else None)
    if source is None or (config is None and not source.exists()):
        logger.info("no config given or found next to %s: using the Wan 2.2 A14B defaults", path)
        return {}
    try:
        return dict(WanDiT.load_config(str(source)))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read the model config {source}: {error}") from error


def _check_against(model: WanDiT, entries: Mapping[str, _Entry]) -> None:
    """Missing keys and shape mismatches raise; unexpected keys warn. Headers only."""
    expected = {key: tuple(p.shape) for key, p in model.named_parameters()}
    missing = [k for k in expected if k not in entries and not ZERO_WHEN_MISSING.fullmatch(k)]
    if missing:
        hint = ""
        if all(LIVEDITOR_KEYS.match(k) for k in missing):
            hint = " (only LIVEditor's additions are missing: this looks like a plain Wan 2.2 expert; pass overlay=<liveditor_ckpt.bin>)"
        raise CheckpointError("the checkpoint lacks " + _name_keys(missing) + hint)
    mismatched = [
        f"{key}: expected {expected[key]}, got {entries[key].shape} (from {entries[key].origin})"
        for key in expected
        if key in entries and entries[key].shape != expected[key]
    ]
    if mismatched:
        more = f"\n  ... and {len(mismatched) - _LISTED} more" if len(mismatched) > _LISTED else ""
        raise CheckpointError(
            f"{len(mismatched)} shape mismatch(es) (is the config right?):\n  " + "\n  ".join(mismatched[:_LISTED]) + more
        )
    unexpected = [k for k in entries if k not in expected and not SILENTLY_DROPPED.fullmatch(k)]
    if unexpected:
        warnings.warn("the checkpoint carries keys the model does not use, ignored: " + _name_keys(unexpected), CheckpointWarning, stacklevel=3)


def load_dit(
    path: PathLike,
    overlay: Optional[PathLike] = None,
    dtype: Optional[torch.dtype] = torch.bfloat16,
    device: Union[str, torch.device] = "cpu",
    config=None,
) -> WanDiT:
    """Build `WanDiT` from a checkpoint without ever holding two copies of the weights.

    Args:
        path: a Wan 2.2 expert folder, a `.safetensors` file or a torch `.bin` / `.pth`.
        overlay: an optional second checkpoint (LIVEditor's `liveditor_ckpt.bin`) whose keys
            replace those of `path`; keys it lacks come from `path`.
        dtype: dtype of every floating-point weight (None keeps each tensor's stored dtype).
        device: where the weights go, tensor by tensor.
        config: a config dict, a folder or `config.json` path, or None: the folder's own
            `config.json`, else the Wan 2.2 A14B defaults.
    Returns:
        WanDiT in eval mode with dense self-attention.
    Raises:
        CheckpointError: unreadable or non-checkpoint files, pickles that weights_only=True
            refuses, missing keys (listed), shape mismatches (key, expected, got).
    Warns:
        CheckpointWarning: keys the model does not use (listed); `blocks.N.cross_attn.alpha_*`
            are dropped silently.
    """
    path = Path(path)
    entries: dict[str, _Entry] = {}
    _add_entries(entries, read_entries(path), str(path))
    if overlay is not None:
        overlay_entries: dict[str, _Entry] = {}
        _add_entries(overlay_entries, read_entries(overlay), str(overlay))
        entries.update(overlay_entries)
        logger.info("overlay %s replaces %d of the keys of %s", overlay, len(overlay_entries), path)

    with torch.device("meta"):
        model = WanDiT.from_config(_resolve_config(path, config))
    _check_against(model, entries)

    device = torch.device(device)
    for key, param in list(model.named_parameters()):
        if key in entries:
            tensor = entries[key].read()
            if tensor.is_floating_point() and dtype is not None:
                tensor = tensor.to(dtype=dtype)
            tensor = tensor.to(device=device)
        else:
            tensor = torch.zeros(param.shape, dtype=dtype or param.dtype, device=device)
        owner_name, _, name = key.rpartition(".")
        owner = model.get_submodule(owner_name)
        setattr(owner, name, torch.nn.Parameter(tensor, requires_grad=param.requires_grad))
    return model.eval()
