"""Load the LIVEditor / Wan 2.2 DiT weights into `model.WanDiT`, shard by shard.

Accepted checkpoints (docs/pipeline.md, section 2):
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

Errors: everything that can be checked from headers alone (readable files, state dicts,
missing keys, shapes, unexpected keys, floating-point dtypes) is checked before any tensor
data is read, by the code path that `check_dit_checkpoint` runs alone as a preflight; NaN
and Inf are refused as each tensor is loaded. Every problem with a file is a
`CheckpointError` with a one-line message naming the file. `wanx.vae` and `wanx.t5` read
their checkpoints with this module's `read_entries` and `load_tensor` and raise the same
error class.

Why one module of this length: the header reading, the key normalisation and matching, the
preflight and the load are one pipeline over the same `_Entry` records; the preflight is
that pipeline stopped before any tensor is read, which is what keeps the two from drifting.
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
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Optional, Union

import torch
from safetensors import SafetensorError, safe_open

if TYPE_CHECKING:
    from model import WanDiT

logger = logging.getLogger(__name__)

WRAPPER_KEYS = ("state_dict", "module", "weights")
KEY_PREFIXES = ("wanx_unimodel.guidance_model.feedforward_model.", "model_ema.", "model.", "module.")
TORCH_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")
# Carried by LIVEditor checkpoints because upstream's cross-attention class inherits the
# self-attention constructor; unused, so dropped without a warning (docs/pipeline.md, section 1).
SILENTLY_DROPPED = re.compile(r"blocks\.\d+\.cross_attn\.alpha_[12]\.weight")
# Zero-initialised and unused in the forward pass: zeros when a checkpoint lacks it.
ZERO_WHEN_MISSING = re.compile(r"blocks\.\d+\.self_attn\.alpha_2\.weight")
LIVEDITOR_KEYS = re.compile(r"source_video_embedding_more_memory\.|blocks\.\d+\.self_attn\.alpha_[12]\.")
_LISTED = 20  # keys named in an error message before "... and N more"
_FINITE_CHUNK = 1 << 24  # elements tested for NaN / Inf at a time: bounds the temporary mask at 16 MiB
# dtype names in safetensors headers; a name missing here is one torch cannot load.
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "BOOL": torch.bool, "C64": torch.complex64,
}

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A weight file or folder that cannot be loaded, with the reason in one line.

    Raised by every loader and preflight check of `wanx` (this module for the DiT, `wanx.vae`,
    `wanx.t5` for the text encoder and its tokenizer), so that a caller catches one class. The
    message names the file and the problem and never spans lines, so that a command line can
    print it as it is. A `ValueError` because the problem lies in the data that was passed.
    """


class CheckpointWarning(UserWarning):
    """A checkpoint that loads but carries keys the model does not use."""


@dataclass
class _Entry:
    """Where one model key lives: its file, its name there, its shape and dtype (from headers) and its reader."""

    origin: str
    raw_key: str
    shape: tuple
    dtype: torch.dtype
    read: Callable[[], torch.Tensor]


def error_line(error: BaseException) -> str:
    """The first line of an exception's message (libraries' messages can span lines), or its class name."""
    lines = str(error).strip().splitlines()
    return lines[0].strip() if lines else type(error).__name__


def name_keys(keys: Iterable[str]) -> str:
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
    """Headers of one safetensors file; tensors are read lazily, one at a time.

    Opening the file parses its header and checks that the data it announces fits the file,
    so text, random bytes and truncated files fail here, before any tensor is read.
    """
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
        slices = {key: handle.get_slice(key) for key in handle.keys()}
        headers = {key: (tuple(part.get_shape()), part.get_dtype()) for key, part in slices.items()}
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file: {error_line(error)}") from error
    if not headers:
        raise CheckpointError(f"{path} holds no tensors")
    unknown = sorted(f"{key} ({name})" for key, (_, name) in headers.items() if name not in _SAFETENSORS_DTYPES)
    if unknown:
        raise CheckpointError(f"{path} holds tensors of dtypes torch cannot load: {', '.join(unknown[:_LISTED])}")

    def reader(key):
        return lambda: handle.get_tensor(key)

    return {
        key: _Entry(str(path), key, shape, _SAFETENSORS_DTYPES[name], reader(key))
        for key, (shape, name) in headers.items()
    }


def _torch_load(path: Path):
    """torch.load with weights_only=True, memory-mapped for zip-format files.

    For a zip-format file this reads only the pickle (the structure: names, shapes, dtypes,
    storage offsets); tensor data stays on disk until a tensor is used. A legacy (non-zip)
    pickle interleaves the two, so it is read into memory whole.
    """
    mmap = zipfile.is_zipfile(path)
    if not mmap:
        logger.info("%s is a legacy (non-zip) torch file: it is read into memory whole", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        message = str(error)
        if "Weights only load failed" not in message:
            raise CheckpointError(f"{path} is not a readable torch checkpoint: {error_line(error)}") from error
        opcode = re.search(r"Unsupported operand (\d+)", message)
        if opcode:  # a byte that is no pickle instruction: random bytes, or a pickle cut or damaged
            raise CheckpointError(
                f"{path} is not a readable torch checkpoint: byte {opcode.group(1)} is not a pickle instruction "
                "that torch.load with weights_only=True accepts (not a torch file, or a damaged one)"
            ) from error
        found = re.search(r"GLOBAL (\S+)", message)
        culprit = f" (it needs {found.group(1)})" if found else ""
        raise CheckpointError(
            f"{path} pickles Python objects beyond tensors and plain containers{culprit}, so torch.load "
            "with weights_only=True refuses it. Unpickling such objects can run arbitrary code, so this "
            "loader never falls back to weights_only=False. Re-save only the state dict (a dict of "
            "tensors) from a trusted environment, or convert it to safetensors."
        ) from error
    except Exception as error:  # arbitrary bytes make the unpickler raise almost anything (KeyError, IndexError...)
        raise CheckpointError(
            f"{path} is not a readable torch checkpoint ({type(error).__name__}: {error_line(error)})"
        ) from error


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
    return {key: _Entry(str(path), key, tuple(t.shape), t.dtype, (lambda t=t: t)) for key, t in state.items()}


def _folder_entries(folder: Path) -> dict[str, _Entry]:
    """All tensors of a Wan expert folder, via its index when sharded."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        preferred = folder / "diffusion_pytorch_model.safetensors.index.json"
        if preferred not in indexes:
            names = [p.name for p in indexes]
            raise CheckpointError(f"{folder} holds several safetensors indexes {names}; pass a file")
        indexes = [preferred]
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(
                f"{indexes[0]} is not a safetensors index (a JSON with a 'weight_map'): {error_line(error)}"
            ) from error
        missing_files = [name for name in shards if not (folder / str(name)).is_file()]
        if missing_files:
            raise CheckpointError(f"{indexes[0]} lists shard files that {folder} lacks: {missing_files}")
    else:
        shards = sorted(p.name for p in folder.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(
                f"{folder} holds no safetensors weights (expected diffusion_pytorch_model*.safetensors)"
            )
    entries: dict[str, _Entry] = {}
    for name in shards:
        shard = _safetensors_entries(folder / name)
        if indexes:
            listed = {k for k, v in weight_map.items() if v == name}
            absent = listed - shard.keys()
            if absent:
                raise CheckpointError(f"{indexes[0]} places keys in {name} that it lacks: " + name_keys(absent))
        duplicated = entries.keys() & shard.keys()
        if duplicated:
            raise CheckpointError(f"{folder}: shards repeat " + name_keys(duplicated))
        entries.update(shard)
    return entries


def read_entries(path: PathLike) -> dict[str, _Entry]:
    """Raw (unnormalised) key -> entry for a folder, a safetensors file or a torch file.

    Reads headers only (see `_torch_load` for legacy pickles); each entry's `read()` reads its tensor.

    Raises:
        CheckpointError: missing path, unknown format, unreadable or non-checkpoint file,
            an object that is not a state dict.
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
        f"{path}: unknown checkpoint format; expected a .safetensors file, a torch file "
        f"({', '.join(TORCH_SUFFIXES)}) or a folder of safetensors shards (a Wan expert folder)"
    )


def require_floating(entries: Mapping[str, _Entry]) -> None:
    """Refuse integer, bool or complex tensors among `entries` (from headers: no data is read).

    Every weight of the networks loaded here is floating point; an integer tensor of the
    right shape would otherwise be cast silently (or fail inside torch with a traceback).
    """
    bad = sorted(f"{e.raw_key} ({str(e.dtype).removeprefix('torch.')}, in {e.origin})"
                 for e in entries.values() if not e.dtype.is_floating_point)
    if bad:
        more = f", ... and {len(bad) - _LISTED} more" if len(bad) > _LISTED else ""
        raise CheckpointError(f"{len(bad)} tensor(s) are not floating point, as weights must be: "
                              + ", ".join(bad[:_LISTED]) + more)


def match_keys(expected: Mapping[str, tuple], entries: Mapping[str, _Entry], what: str) -> None:
    """Refuse unless `entries` have exactly the `expected` keys and shapes (headers only).

    Args:
        expected: key -> shape the model needs.
        entries: key -> entry, in the same naming.
        what: the start of the message, naming the checkpoint (e.g. "VAE checkpoint x.pth").
    """
    got = {key: tuple(entry.shape) for key, entry in entries.items()}
    missing = sorted(expected.keys() - got.keys())
    unexpected = sorted(got.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & got.keys() if tuple(expected[k]) != got[k])
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} with the wrong shape (e.g. {k}: {got[k]} vs {tuple(expected[k])})")
    if parts:
        raise CheckpointError(f"{what} does not match the model: " + "; ".join(parts))


def _all_finite(tensor: torch.Tensor) -> bool:
    """True when no element is NaN or +-Inf, tested in chunks to keep the boolean mask small."""
    return all(bool(torch.isfinite(chunk).all()) for chunk in tensor.reshape(-1).split(_FINITE_CHUNK))


def load_tensor(entry: _Entry, dtype: Optional[torch.dtype], device: Union[str, torch.device]) -> torch.Tensor:
    """Read one tensor, convert it to `dtype` (None keeps its own), move it to `device`; refuse NaN or Inf.

    Non-finite weights are looked for here, as each tensor is loaded, and not in the
    preflight checks: finding them needs the tensor data, which the checks never read
    (reading it is the cost of loading), whereas here the data has just been read and the
    test is one more pass over it, small beside the read (and on a GPU, beside the copy).
    Testing after the conversion also catches finite values that overflow the target dtype
    (1e5 in float16). A NaN weight would otherwise turn every output into NaN: a black video.

    Raises:
        CheckpointError: the tensor cannot be read, or holds NaN or Inf, naming the key and the file.
    """
    try:
        stored = entry.read()
    except (SafetensorError, OSError, RuntimeError) as error:
        raise CheckpointError(f"{entry.origin}: cannot read {entry.raw_key}: {error_line(error)}") from error
    tensor = stored.to(dtype=dtype) if dtype is not None else stored
    tensor = tensor.to(device=device)
    if not _all_finite(tensor):
        where = "holds NaN or Inf values" if not _all_finite(stored) else f"overflows {dtype} (Inf once converted)"
        raise CheckpointError(f"{entry.origin}: tensor {entry.raw_key} {where}")
    return tensor


def _resolve_config(path: Path, config) -> dict:
    """The model config: given (dict, folder or config.json), else the folder's, else Wan's A14B."""
    from model import WanDiT

    if isinstance(config, Mapping):
        return dict(config)
    source = Path(config) if config is not None else (path / "config.json" if path.is_dir() else None)
    if source is None or (config is None and not source.exists()):
        logger.info("no config given or found next to %s: using the Wan 2.2 A14B defaults", path)
        return {}
    try:
        return dict(WanDiT.load_config(str(source)))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read the model config {source}: {error_line(error)}") from error


def _check_against(model: WanDiT, entries: Mapping[str, _Entry], source: str) -> None:
    """Missing keys, shape mismatches and non-float dtypes raise; unexpected keys warn. Headers only."""
    expected = {key: tuple(p.shape) for key, p in model.named_parameters()}
    missing = [k for k in expected if k not in entries and not ZERO_WHEN_MISSING.fullmatch(k)]
    if missing:
        hint = ""
        if all(LIVEDITOR_KEYS.match(k) for k in missing):
            hint = (" (only LIVEditor's additions are missing: this looks like a plain Wan 2.2 expert; "
                    "pass overlay=<liveditor_ckpt.bin>)")
        raise CheckpointError(f"{source} lacks " + name_keys(missing) + hint)
    mismatched = [
        f"{key}: expected {expected[key]}, got {entries[key].shape} (from {entries[key].origin})"
        for key in expected
        if key in entries and entries[key].shape != expected[key]
    ]
    if mismatched:
        more = f"; ... and {len(mismatched) - _LISTED} more" if len(mismatched) > _LISTED else ""
        raise CheckpointError(
            f"{source}: {len(mismatched)} shape mismatch(es) (is the config right?): "
            + "; ".join(mismatched[:_LISTED]) + more
        )
    require_floating({key: entries[key] for key in expected if key in entries})
    unexpected = [k for k in entries if k not in expected and not SILENTLY_DROPPED.fullmatch(k)]
    if unexpected:
        warnings.warn(f"{source} carries keys the model does not use, ignored: " + name_keys(unexpected),
                      CheckpointWarning, stacklevel=4)


def _prepare(path: PathLike, overlay: Optional[PathLike], config) -> tuple[WanDiT, dict[str, _Entry]]:
    """The model on the meta device and its checked entries: every check that needs no tensor data.

    `check_dit_checkpoint` runs this alone and `load_dit` runs it first, so the two refuse
    exactly the same files. `model` is imported here rather than at the top so that
    `wanx.vae` and `wanx.t5`, which read checkpoints with this module, do not import the DiT.
    """
    from model import WanDiT

    path = Path(path)
    entries: dict[str, _Entry] = {}
    _add_entries(entries, read_entries(path), str(path))
    source = str(path)
    if overlay is not None:
        overlay_entries: dict[str, _Entry] = {}
        _add_entries(overlay_entries, read_entries(overlay), str(overlay))
        entries.update(overlay_entries)
        source = f"{path} with overlay {overlay}"
        logger.info("overlay %s replaces %d of the keys of %s", overlay, len(overlay_entries), path)

    resolved = _resolve_config(path, config)
    try:
        with torch.device("meta"):
            model = WanDiT.from_config(resolved)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"the config for {path} does not describe a WanDiT: {error_line(error)}") from error
    _check_against(model, entries, source)
    return model, entries


def check_dit_checkpoint(path: PathLike, overlay: Optional[PathLike] = None, config=None) -> None:
    """Check a DiT checkpoint as `load_dit` would load it, without reading any tensor data.

    Takes `load_dit`'s `path`, `overlay` and `config` (same conventions) and runs the very
    checks `load_dit` runs before it reads a tensor: every file opens as what its name says
    (Wan expert folder with its index, safetensors, torch pickle read with
    weights_only=True), holds a state dict, and together the files have every key the model
    needs, with the right shapes and floating-point dtypes. It reads headers only: a
    safetensors header; for a zip-format torch pickle, memory-mapped, only the pickle's
    structure. A legacy (non-zip) torch pickle cannot be read in parts: it is read whole
    (as large as the checkpoint), and still checked. NaN and Inf cannot be found without
    the data: `load_dit` refuses them as it loads each tensor.

    Raises:
        CheckpointError: the problem in one line, naming the file.
    Warns:
        CheckpointWarning: keys the model does not use, as `load_dit` warns.
    """
    _prepare(path, overlay, config)


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
        dtype: dtype of every weight (None keeps each tensor's stored dtype).
        device: where the weights go, tensor by tensor.
        config: a config dict, a folder or `config.json` path, or None: the folder's own
            `config.json`, else the Wan 2.2 A14B defaults.
    Returns:
        WanDiT in eval mode with dense self-attention.
    Raises:
        CheckpointError: everything `check_dit_checkpoint` refuses (unreadable or
            non-checkpoint files, pickles that weights_only=True refuses, missing keys,
            shape mismatches, non-float dtypes), checked before any tensor is read; then a
            tensor that cannot be read or holds NaN or Inf (see `load_tensor`).
    Warns:
        CheckpointWarning: keys the model does not use (listed); `blocks.N.cross_attn.alpha_*`
            are dropped silently.
    """
    model, entries = _prepare(path, overlay, config)
    device = torch.device(device)
    for key, param in list(model.named_parameters()):
        if key in entries:
            tensor = load_tensor(entries[key], dtype, device)
        else:
            tensor = torch.zeros(param.shape, dtype=dtype or param.dtype, device=device)
        owner_name, _, name = key.rpartition(".")
        owner = model.get_submodule(owner_name)
        setattr(owner, name, torch.nn.Parameter(tensor, requires_grad=param.requires_grad))
    return model.eval()
