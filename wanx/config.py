"""The pipeline's configuration: its schema, a strict YAML reader, and the range of every value.

    cfg = load_config("inference.yaml", ["sampler.steps=16"], {"attention.backend": "triton"})

Layers, later ones win: the schema's defaults (`PipelineConfig`), the YAML file, the
`key=value` overrides, then `settings` (the CLI's flags). Everything is checked before
anything is loaded, and every refusal is a `ConfigError` with a one-line message:

- the file: at most `MAX_CONFIG_BYTES`, UTF-8, YAML whose top level is a mapping; anchors
  and aliases (which can expand into an exponentially large document), duplicate keys and
  tags that build Python objects are refused, never evaluated;
- every key is known and every value has the schema's type exactly (a boolean is `true` or
  `false`, never `"yes"` or `1`; an integer is not a float);
- every number lies in the range its consumer can use (`validate_config`).
OmegaConf merges the checked file and override layers and resolves their `${...}` references; the
result is plain dataclasses, onto which the flags are set verbatim (a "${" in a prompt stays text).

Why one module of this length: the schema, the strict reader that checks every layer against
it and the ranges are one contract, read together when a key is added.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from in_context_sparse_attention import BACKEND_NAMES as ISA_BACKENDS
from in_context_sparse_attention import ISAConfig
from long_video_sparse_attention import LVSAConfig

from .attention import LVSA_KERNELS, LVSAOptions, attention_names
from .memory import OFFLOAD_MODES, WEIGHT_MODES

# Wan 2.2's default negative prompt (`wan/configs/shared_config.py`, `sample_neg_prompt`).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

DTYPE_NAMES = ("float32", "bfloat16", "float16")
MODEL_KINDS = ("wan", "tiny", "random")

MAX_CONFIG_BYTES = 1 << 20  # a config is a page of text; anything larger is not one
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range
MAX_STEPS = 1000  # beyond the 1000 training timesteps steps repeat timesteps
MAX_FRAMES = 1601  # 100 s at 16 fps: the decoded working video of 1,601 frames at 544x960 is 10 GB of float32
MAX_WORKING_SIDE = 4096  # pixels per side of `video.size`
FPS_RANGE = (1.0, 120.0)  # the rate the input is resampled to and the output written at
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d{1,2})?")
GUIDANCE_MODES = ("batch", "sequential")  # cond and uncond as one DiT batch of 2, or as two batch-1 passes
MEMORY_PROFILES = ("auto", "manual")


@dataclass
class ModelSection:
    """Where the weights come from. kind "wan" loads checkpoints; "tiny" builds small
    random-weight components in code (tests, CPU demo); "random" builds every component at
    its real size with random weights on the device (timing and memory measurements)."""

    kind: str = "wan"
    wan_dir: Optional[str] = None  # the Wan2.2-T2V-A14B folder
    dit: Optional[str] = None  # base DiT weights loaded before `checkpoint` (a Wan expert folder), or null
    checkpoint: Optional[str] = None  # LIVEditor's liveditor_ckpt.bin (a full DiT state dict)
    vae: Optional[str] = None  # Wan2.1_VAE.pth
    text_encoder: Optional[str] = None  # models_t5_umt5-xxl-enc-bf16.pth
    tokenizer: Optional[str] = None  # the google/umt5-xxl folder
    dtype: str = "bfloat16"  # DiT and text encoder
    vae_dtype: str = "float32"  # Wan runs its VAE in float32
    seed: int = 0  # weights of the "tiny" components


@dataclass
class LVSASection:
    """Long-Video Sparse Attention (backend "lvsa"), counted in latent frames; the fields mirror
    `LVSAConfig`, whose defaults they take, plus the kernel that computes the pattern."""

    window: int = LVSAConfig.window
    first_frames: int = LVSAConfig.first_frames
    reference_frames: int = LVSAConfig.reference_frames
    sparsity_scale: float = LVSAConfig.sparsity_scale
    keyframe_interval: Optional[int] = LVSAConfig.keyframe_interval  # null: picked from the clip's length
    rotate: bool = LVSAConfig.rotate
    expand_window: bool = LVSAConfig.expand_window
    kernel: str = "auto"  # auto (gather on CUDA, torch elsewhere) | gather | flex | torch


@dataclass
class AttentionSection:
    """Self-attention method ("dense", an ISA backend or "lvsa"), ISA's hyper-parameters and LVSA's."""

    backend: str = "tilelang"
    # ISA's hyper-parameters default to ISAConfig's own, so the two cannot drift apart
    block_size: int = ISAConfig.block_size
    select_ratio: float = ISAConfig.select_ratio
    sparsity: float = ISAConfig.sparsity
    sharpness_ratio: float = ISAConfig.sharpness_ratio
    flat_ratio: float = ISAConfig.flat_ratio
    lvsa: LVSASection = field(default_factory=LVSASection)


@dataclass
class SamplerSection:
    """Flow-UniPC sampling with classifier-free guidance."""

    steps: int = 32
    shift: float = 6.0
    guidance: float = 2.5
    seed: int = 42
    num_train_timesteps: int = 1000


@dataclass
class VideoSection:
    """Input frames and working resolution; the output is written at `fps` too."""

    max_frames: int = 81
    fps: float = 16.0  # the input is resampled to this rate (Wan's 16 fps)
    size: Optional[list[int]] = None  # [height, width]; null: the closest 540p bucket
    bucket_scale: float = 1.0  # scales the chosen bucket (sides rounded to multiples of 16)
    vae_tiling: bool = False  # spatial tiles in the VAE, to save memory


@dataclass
class ParallelSection:
    """Several GPUs under torchrun (`wanx.parallel`): ulysses_degree x cfg_degree processes."""

    ulysses_degree: int = 1  # ranks sharing one sequence (Ulysses); must divide the 40 heads
    cfg_degree: int = 1  # 2: cond and uncond on different ranks, exchanged each step
    shard_weights: bool = False  # FSDP2: each rank keeps 1 / world size of the DiT's weights
    timeout_s: float = 600.0  # how long a rank waits for a missing one before the run fails


@dataclass
class MemorySection:
    """How an edit fits the GPU (`wanx.memory`, `wanx.planning`): where the weights live, how the
    DiT's are stored and how guidance runs. A value left null is chosen by the profile: "auto" picks
    the fastest tier whose estimated peak fits the free GPU memory, among those that match the values
    set; "manual" takes the values as given and the fastest for the rest (none, bf16, batch)."""

    profile: str = "auto"  # auto | manual
    offload: Optional[str] = None  # none | model (one network on the GPU at a time) | blocks (DiT blocks streamed)
    weights: Optional[str] = None  # bf16 (as loaded) | fp8 (the DiT's block matrices, scaled per channel)
    guidance: Optional[str] = None  # batch (cond and uncond in one DiT pass) | sequential (two batch-1 passes)


@dataclass(frozen=True)
class MemorySetting:
    """One memory tier with every value decided: what `EditingPipeline.load` and `edit` run with."""

    offload: str = "none"
    weights: str = "bf16"
    guidance: str = "batch"

    def describe(self) -> str:
        return f"offload {self.offload}, weights {self.weights}, guidance {self.guidance}"


@dataclass
class PipelineConfig:
    """Everything `inference.py` and `EditingPipeline` read; see inference.yaml for the defaults."""

    model: ModelSection = field(default_factory=ModelSection)
    attention: AttentionSection = field(default_factory=AttentionSection)
    sampler: SamplerSection = field(default_factory=SamplerSection)
    video: VideoSection = field(default_factory=VideoSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    memory: MemorySection = field(default_factory=MemorySection)
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    device: str = "auto"  # "auto" (cuda when present), "cuda", "cuda:N" or "cpu"
    offload_text_encoder: bool = True  # move umT5 to the CPU once the prompts are encoded


class ConfigError(ValueError):
    """A configuration that cannot run; the message is one line."""


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing anchors, aliases and duplicate keys.

    Aliases are refused because a few lines of them can expand into billions of nodes
    (the "billion laughs" document); a config never needs them. Tags that name Python
    objects are already refused by the safe loader (a ConstructorError).
    """

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.MarkedYAMLError(problem="anchors and aliases (& and *) are not allowed in a config",
                                       problem_mark=event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise yaml.MarkedYAMLError(problem="a key must be a plain name, not a list or mapping",
                                           problem_mark=key_node.start_mark)
            if key in seen:
                raise yaml.MarkedYAMLError(problem=f"duplicate key {key!r}", problem_mark=key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml12_scalars(loader: type) -> None:
    """Read scalars as YAML 1.2's core schema does. YAML 1.1 (PyYAML's default) turns yes, no, on
    and off into booleans, 1:30 into 90 (base 60), 0x40 into 64 and 1_0 into 10: classic surprises.
    Here only true/false are booleans, integers are decimal digits, numbers are decimal (with an
    exponent, "1e9" included, or .inf / .nan); everything else is a string, which the schema then
    refuses where a number or a boolean is expected."""
    replaced = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
    loader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in replaced]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                 list("tTfF"))
    loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
    loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
        list("-+0123456789."))


_yaml12_scalars(_StrictLoader)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """'problem at line L, column C' from a PyYAML error, on one line."""
    if isinstance(exc, yaml.MarkedYAMLError):
        problem = " ".join(str(exc.problem or exc.context or "invalid YAML").split())
        mark = exc.problem_mark or exc.context_mark
        if mark is not None:
            return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
        return problem
    return " ".join(str(exc).split()) or type(exc).__name__


def parse_yaml(text: str, origin: str) -> Any:
    """Parse YAML `text` with the strict loader; `origin` names it in errors."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin} is not valid YAML: {_yaml_problem(exc)}") from exc
    except RecursionError as exc:
        raise ConfigError(f"{origin} nests too deeply to be a config") from exc
    except (ValueError, TypeError) as exc:  # e.g. an integer of more digits than Python converts
        raise ConfigError(f"{origin} holds a value that cannot be read: {one_line(exc)[:200]}") from exc


def read_config_file(path: str) -> dict:
    """The YAML mapping in `path`, read strictly (see the module docstring); {} for an empty file."""
    if not os.path.exists(path):
        raise ConfigError(f"config file not found: {path!r}")
    if not os.path.isfile(path):
        raise ConfigError(f"config path is not a file: {path!r}")
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path!r}: {exc.strerror or exc}") from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path!r} is larger than {MAX_CONFIG_BYTES} bytes: not a config")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path!r} is not UTF-8 text (invalid byte at offset {exc.start})") from exc
    data = parse_yaml(text, f"config file {path!r}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of sections (model:, attention:, ...) "
                          f"at its top level, not a {_yaml_type(data)}")
    return data


def _yaml_type(value: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "mapping",
             type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _is_interpolation(value: Any) -> bool:
    """Whether `value` uses `${...}`. Only references to other keys are allowed (`${model.wan_dir}`):
    a resolver (`${oc.env:X}`, `${oc.decode:...}`) would bring in text that no check has seen."""
    if not isinstance(value, str) or "${" not in value:
        return False
    for inner in re.findall(r"\$\{([^}]*)\}", value):
        if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", inner):
            raise ConfigError(f"bad configuration: interpolation ${{{inner}}} is not a plain reference to another "
                              "key (resolvers such as oc.env are not allowed)")
    return True


def _check_value(key: str, value: Any, annotation: Any) -> None:
    """Raise ConfigError unless `value` has exactly the type `annotation` asks for."""
    if _is_interpolation(value):
        return  # resolved by OmegaConf, which then checks the resolved value's type
    origin = typing.get_origin(annotation)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        origin = typing.get_origin(annotation)
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {_yaml_type(value)} {value!r}")
        for i, element in enumerate(value):
            _check_value(f"{key}[{i}]", element, item)
        return
    expected = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}[annotation]
    if isinstance(value, bool) and annotation is not bool or not isinstance(value, expected):
        noun = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[annotation]
        raise ConfigError(f"{key} must be {noun}, got {_yaml_type(value)} {value!r}")


def check_layer(data: dict, schema: type = PipelineConfig, prefix: str = "") -> None:
    """Raise ConfigError for an unknown key or a wrongly typed value anywhere in `data`."""
    hints = typing.get_type_hints(schema)
    for key, value in data.items():
        name = f"{prefix}{key}"
        if not isinstance(key, str) or key not in hints:
            known = ", ".join(f.name for f in dataclasses.fields(schema))
            raise ConfigError(f"bad configuration: unknown key {name!r} (known here: {known})")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            if not isinstance(value, dict):
                raise ConfigError(f"bad configuration: {name} must be a section (a mapping), got {_yaml_type(value)}")
            check_layer(value, annotation, f"{name}.")
        else:
            try:
                _check_value(name, value, annotation)
            except ConfigError as exc:
                raise ConfigError(f"bad configuration: {exc}") from None


def _nest(dotted: str, value: Any) -> dict:
    """{"a": {"b": value}} from "a.b"."""
    for part in reversed(dotted.split(".")):
        value = {part: value}
    return value


def parse_override(item: str) -> dict:
    """A `key=value` override as a nested mapping; the value is read as YAML ("" stays a string)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", key):
        raise ConfigError(f"config override must be key=value with a dotted key such as sampler.steps=16, "
                          f"got {item!r}")
    value = "" if text == "" else parse_yaml(text, f"the value of override {key!r}")
    return _nest(key, value)


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None,
                settings: Optional[dict[str, Any]] = None):
    """Schema defaults, then the YAML file, then `key=value` overrides, then `settings`.

    Args:
        path: a YAML file, or None for the schema defaults alone.
        overrides: items such as "sampler.steps=16" (values parsed as YAML).
        settings: {dotted key: Python value}, set as they are (the CLI's flags).

    Returns:
        A `PipelineConfig` (plain dataclasses), interpolations resolved, every value checked.

    Raises:
        ConfigError: an unreadable or malformed file, an unknown key, a wrongly typed or
            out-of-range value.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    layers = [read_config_file(path)] if path is not None else []
    layers += [parse_override(item) for item in overrides or []]
    flags = [_nest(key, value) for key, value in (settings or {}).items()]
    for layer in layers + flags:
        check_layer(layer)
    merged = OmegaConf.structured(PipelineConfig)
    try:
        for layer in layers:
            merged = OmegaConf.merge(merged, layer)
        cfg = OmegaConf.to_object(merged)  # interpolations resolved; plain dataclasses from here on
    except OmegaConfBaseException as exc:
        raise ConfigError(f"bad configuration: {one_line(exc)}") from exc
    for flag in flags:  # verbatim: a "${" in a prompt or a path given as a flag is text
        _set_values(cfg, flag)
    validate_config(cfg)
    return cfg


def _set_values(target, layer: dict) -> None:
    """Write a checked nested mapping onto the dataclass `target`, section by section."""
    for key, value in layer.items():
        if isinstance(value, dict):
            _set_values(getattr(target, key), value)
        else:
            setattr(target, key, float(value) if isinstance(getattr(target, key), float) else value)


def one_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (its type's name when it has none)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _in_range(value: float, low: float, high: float) -> bool:
    return math.isfinite(value) and low <= value <= high


def validate_config(cfg) -> None:
    """Raise ConfigError for a value outside the range its consumer can use."""
    m, a, s, v = cfg.model, cfg.attention, cfg.sampler, cfg.video
    checks = [
        (m.kind in MODEL_KINDS, f"model.kind must be one of {MODEL_KINDS}, got {m.kind!r}"),
        (m.dtype in DTYPE_NAMES, f"model.dtype must be one of {DTYPE_NAMES}, got {m.dtype!r}"),
        (m.vae_dtype in DTYPE_NAMES, f"model.vae_dtype must be one of {DTYPE_NAMES}, got {m.vae_dtype!r}"),
        (0 <= m.seed <= MAX_SEED, f"model.seed must be in [0, 2**64 - 1], got {m.seed}"),
        (a.backend in attention_names(),
         f"unknown attention backend {a.backend!r}: choose one of {', '.join(attention_names())}"),
        (1 <= s.num_train_timesteps <= 100_000,
         f"sampler.num_train_timesteps must be in [1, 100000], got {s.num_train_timesteps}"),
        (1 <= s.steps <= min(MAX_STEPS, s.num_train_timesteps),
         f"sampler.steps must be in [1, {min(MAX_STEPS, s.num_train_timesteps)}], got {s.steps}"),
        (_in_range(s.shift, 1e-3, 1000.0), f"sampler.shift must be a finite number in [0.001, 1000], got {s.shift}"),
        (_in_range(s.guidance, 0.0, 100.0), f"sampler.guidance must be a finite number in [0, 100], got {s.guidance}"),
        (0 <= s.seed <= MAX_SEED, f"sampler.seed must be in [0, 2**64 - 1], got {s.seed}"),
        (1 <= v.max_frames <= MAX_FRAMES, f"video.max_frames must be in [1, {MAX_FRAMES}], got {v.max_frames}"),
        (_in_range(v.fps, *FPS_RANGE), f"video.fps must be a number in [{FPS_RANGE[0]:g}, {FPS_RANGE[1]:g}], "
                                       f"got {v.fps}"),
        (_in_range(v.bucket_scale, 0.01, 4.0),
         f"video.bucket_scale must be a number in [0.01, 4], got {v.bucket_scale}"),
        (DEVICE_PATTERN.fullmatch(cfg.device) is not None,
         f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {cfg.device!r}"),
    ]
    p = cfg.parallel
    checks += [
        (1 <= p.ulysses_degree <= 64, f"parallel.ulysses_degree must be in [1, 64], got {p.ulysses_degree}"),
        (p.cfg_degree in (1, 2), f"parallel.cfg_degree must be 1 or 2 (cond and uncond), got {p.cfg_degree}"),
        (p.cfg_degree == 1 or s.guidance != 1.0,
         "parallel.cfg_degree 2 needs classifier-free guidance (sampler.guidance != 1)"),
        (_in_range(p.timeout_s, 10.0, 86_400.0), f"parallel.timeout_s must be in [10, 86400], got {p.timeout_s}"),
        (not p.shard_weights or p.ulysses_degree * p.cfg_degree > 1,
         "parallel.shard_weights needs several processes (ulysses_degree x cfg_degree > 1)"),
        (p.ulysses_degree * p.cfg_degree == 1 or cfg.device in ("auto", "cuda", "cpu"),
         f"under torchrun each process takes the GPU of its LOCAL_RANK: device must be 'auto' or 'cuda', "
         f"got {cfg.device!r}"),
    ]
    checks += _memory_checks(cfg)
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    for role in ("wan_dir", "dit", "checkpoint", "vae", "text_encoder", "tokenizer"):
        value = getattr(m, role)
        if value is not None and (not value.strip() or "\0" in value):
            raise ConfigError(f"model.{role} must be a path or null, got {value!r}")
    size = v.size
    if size is not None and (len(size) != 2 or any(not 16 <= s <= MAX_WORKING_SIDE or s % 16 for s in size)):
        raise ConfigError(f"video.size must be [height, width], multiples of 16 in [16, {MAX_WORKING_SIDE}], "
                          f"got {list(size)}")
    isa_config(cfg)
    lvsa_options(cfg)


def _memory_checks(cfg) -> list[tuple[bool, str]]:
    """(ok, message) for `cfg.memory`: known values, and none that another section rules out.

    Sequential guidance and cfg_degree 2 both split cond from uncond (in time, or across ranks):
    together there is nothing left to split. Under several processes the weights are spread by
    `parallel` (FSDP2, Ulysses), whose hooks and DTensors the offloading hooks and fp8 layers
    were never run with: only the default tier is allowed there.
    """
    mem, p = cfg.memory, cfg.parallel
    checks = [(mem.profile in MEMORY_PROFILES,
               f"memory.profile must be one of {', '.join(MEMORY_PROFILES)}, got {mem.profile!r}")]
    for key, allowed in (("offload", OFFLOAD_MODES), ("weights", WEIGHT_MODES), ("guidance", GUIDANCE_MODES)):
        value = getattr(mem, key)
        checks.append((value is None or value in allowed,
                       f"memory.{key} must be one of {', '.join(allowed)} (or null: the profile picks), "
                       f"got {value!r}"))
    checks.append((mem.guidance != "sequential" or p.cfg_degree == 1,
                   "memory.guidance sequential cannot be combined with parallel.cfg_degree 2 (the cfg ranks "
                   "already run cond and uncond apart): set one of them"))
    defaults = MemorySetting()
    chosen = {key: getattr(mem, key) for key in ("offload", "weights", "guidance")}
    others = [f"memory.{key}={value}" for key, value in chosen.items()
              if value is not None and value != getattr(defaults, key)]
    checks.append((p.ulysses_degree * p.cfg_degree == 1 or not others,
                   f"{', '.join(others)}: under several processes only offload none, weights bf16 and guidance "
                   "batch run (parallel.shard_weights spreads the DiT's weights instead)"))
    return checks


def isa_config(cfg) -> ISAConfig:
    """The ISAConfig of `cfg.attention` (raises ConfigError when out of range)."""
    a = cfg.attention
    try:
        return ISAConfig(block_size=a.block_size, select_ratio=a.select_ratio, sparsity=a.sparsity,
                         sharpness_ratio=a.sharpness_ratio, flat_ratio=a.flat_ratio)
    except ValueError as exc:
        raise ConfigError(f"attention: {one_line(exc)}") from exc


def lvsa_options(cfg) -> LVSAOptions:
    """The LVSAOptions (LVSAConfig and kernel) of `cfg.attention.lvsa` (raises ConfigError when out of range)."""
    section = cfg.attention.lvsa
    if section.kernel not in LVSA_KERNELS:
        raise ConfigError(f"attention.lvsa.kernel must be one of {', '.join(LVSA_KERNELS)}, got {section.kernel!r}")
    try:
        config = LVSAConfig(window=section.window, first_frames=section.first_frames,
                            reference_frames=section.reference_frames, sparsity_scale=section.sparsity_scale,
                            keyframe_interval=section.keyframe_interval, rotate=section.rotate,
                            expand_window=section.expand_window)
    except ValueError as exc:
        raise ConfigError(f"attention.lvsa: {one_line(exc)}") from exc
    return LVSAOptions(config=config, kernel=section.kernel)


def attention_options(cfg):
    """The options `cfg.attention.backend` is built with (`wanx.attention.make_attention`): an ISAConfig
    for an ISA backend, an LVSAOptions for "lvsa", None for "dense" and any other registered method."""
    backend = cfg.attention.backend
    if backend in ISA_BACKENDS:
        return isa_config(cfg)
    if backend == "lvsa":
        return lvsa_options(cfg)
    return None
