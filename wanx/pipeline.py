"""The LIVEditor editing pipeline: source video + instruction -> edited video.

    cfg = wanx.config.load_config("inference.yaml", ["attention.backend=triton"])
    source = read_source(cfg, "in.mp4")
    plan = make_plan(cfg, source, free_gpu_bytes(cfg))    # cheap: loads no weights; picks the memory tier
    pipe = EditingPipeline.load(cfg, memory=plan.memory_setting)   # text encoder, VAE, DiT
    result = pipe.edit(source, "make it snow")            # EditResult: frames, timings, ...

Steps: read the video at 16 fps, keep the largest 4k+1 frames (at most `video.max_frames`),
resize and centre-crop to the closest 540p aspect bucket, scale to [-1, 1]; encode the
prompt and the negative prompt (Wan's Chinese one by default) with umT5; encode the
source with the Wan VAE; sample the target latent from seeded noise with Flow-UniPC and
classifier-free guidance (cond and uncond in one batch of 2 per step, or with guidance
"sequential" as two batch-1 passes, sharing one source latent); decode and return uint8 frames.

The memory tier (`wanx.config.MemorySetting`) decides where the weights are: with offload
"model" and "blocks", umT5 and the VAE are on the GPU only during their stages, and with "model"
the DiT only while it denoises (`wanx.memory.on_device`; on the CPU these moves do nothing); with
"blocks" its hooks stream the DiT's blocks. A CUDA out-of-memory error stops the run with a
`GPUMemoryError` naming the stage and the settings that shrink it.

Under torchrun, `load(cfg, parallel=context)` (`wanx.parallel.ParallelContext`) spreads the DiT
over the processes: Ulysses sequence parallelism, FSDP2 weight sharding, and with cfg_degree 2 the
ranks of cfg index 0 compute cond and those of index 1 uncond (a batch of 1 each), exchanging the
predictions every step so that every rank integrates the same latent. Each stage runs under
`context.stage`, so a failure on one rank stops all of them with the same one-line error.

The configuration (`wanx.config`) is checked whole before anything here runs.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from .components import DTYPES, load_components, resolve_device
from .config import ConfigError, MemorySetting
from .memory import on_device
from .parallel import ParallelContext, parallelize
from .planning import EditPlan, make_plan, memory_setting_without_plan, working_size


@dataclass
class SourceVideo:
    """The source as the model sees it: resampled to `video.fps`, trimmed to 4k+1 frames,
    resized and centre-cropped to the working size, scaled to [-1, 1]."""

    path: str
    video: torch.Tensor  # float32 [3, F, H, W] in [-1, 1], F = 4k+1
    fps: float
    frames_read: int  # before the 4k+1 trim
    source_size: tuple[int, int]  # (h, w) of the input file
    seconds: float = 0.0  # spent reading and resizing

    @classmethod
    def from_frames(cls, cfg, frames: np.ndarray, fps: float = 16.0, path: str = "memory") -> "SourceVideo":
        """A source from uint8 frames [F, h, w, 3] already in memory (F = 4k+1), at `cfg`'s working size."""
        from .video import preprocess_frames

        start = time.perf_counter()
        h, w = frames.shape[1:3]
        video = preprocess_frames(frames, working_size(cfg, h, w))
        return cls(path=path, video=video, fps=fps, frames_read=len(frames), source_size=(h, w),
                   seconds=time.perf_counter() - start)


def read_source(cfg, path: str) -> SourceVideo:
    """Read `path` at `video.fps`, at most `video.max_frames` frames, trimmed to 4k+1.

    The header is read first (an over-large resolution is refused before decoding), then
    every frame is resized as it is decoded, so memory holds the working-size video only.

    Raises:
        wanx.video.VideoError: missing, unreadable, not a video, or beyond the input limits.
    """
    from .video import fit_frame_count, probe_video, read_video_resized

    start = time.perf_counter()
    info = probe_video(path)
    size = working_size(cfg, info.height, info.width)
    video, fps, frames_read = read_video_resized(path, size, max_frames=cfg.video.max_frames,
                                                 target_fps=cfg.video.fps)
    kept = fit_frame_count(frames_read)
    return SourceVideo(path=os.fspath(path), video=video[:, :kept].contiguous(), fps=fps, frames_read=frames_read,
                       source_size=(info.height, info.width), seconds=time.perf_counter() - start)


def side_by_side(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Two uint8 videos [F, H, W, 3] of one shape, left | right: [F, H, 2W, 3]."""
    if left.shape != right.shape:
        raise ValueError(f"videos to compare must have the same shape, got {left.shape} and {right.shape}")
    return np.concatenate([left, right], axis=2)


@dataclass
class EditResult:
    """An edited video and how it was made."""

    video: np.ndarray  # uint8 [F, H, W, 3], the edit
    source: np.ndarray  # uint8 [F, H, W, 3], the input as the model saw it (resized, cropped)
    fps: float
    plan: EditPlan
    timings: dict[str, float]  # seconds per stage
    backend: str  # the self-attention backend the DiT ran with
    dense_kernel: str  # the dense kernel behind "dense" and ISA's full-attention part
    step_seconds: list[float] = field(default_factory=list)  # each denoising step, in order
    peak_memory: dict[str, float] = field(default_factory=dict)  # GiB allocated at the peak of each stage (CUDA)


class _StageClock:
    """`with clock("name"):` records the stage's seconds in `timings` and, on CUDA, its peak
    allocated memory (GiB) in `peaks`; the device is synchronised at the end so that the
    seconds include the stage's queued kernels."""

    def __init__(self, device: torch.device, timings: dict, peaks: dict):
        self.device, self.timings, self.peaks = device, timings, peaks

    @contextmanager
    def __call__(self, name: str):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        yield
        if cuda:
            torch.cuda.synchronize(self.device)
            self.peaks[name] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.timings[name] = time.perf_counter() - start


def _progress(enabled: bool, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(disable=not enabled, dynamic_ncols=True, leave=True, **kwargs)


class GPUMemoryError(RuntimeError):
    """The GPU ran out of memory in a stage: the run stops and writes nothing. One line."""


class EditingPipeline:
    """umT5 text encoder + Wan VAE + LIVEditor DiT, with the Flow-UniPC sampler.

    Build it with `load(cfg, memory=...)`; `edit(source, prompt)` runs one edit.
    """

    def __init__(self, cfg, text_encoder, vae, dit, device: torch.device, load_seconds: float = 0.0,
                 parallel: Optional[ParallelContext] = None, memory: Optional[MemorySetting] = None):
        self.cfg = cfg
        self.text_encoder = text_encoder
        self.vae = vae
        self.dit = dit
        self.device = device
        self.load_seconds = load_seconds
        self.parallel = ParallelContext() if parallel is None else parallel
        self.memory = MemorySetting() if memory is None else memory

    @classmethod
    def load(cls, cfg, progress: bool = True, parallel: Optional[ParallelContext] = None,
             memory: Optional[MemorySetting] = None) -> "EditingPipeline":
        """Load (or, for kinds "tiny" and "random", build) the three networks, placed as the memory tier says.

        With a multi-process `parallel` context, every rank loads them, then the DiT is parallelised
        (`wanx.parallel.parallelize`); only rank 0 shows progress.

        Args:
            memory: the tier, `make_plan(...).memory_setting`; None: `memory_setting_without_plan`
                (the values of `cfg.memory` and the fastest for the rest; refused for profile
                "auto" on a GPU, where the choice needs the edit's plan).
        Raises:
            ConfigError: missing weight files, an attention backend that cannot run here, a memory
                tier this device or these processes cannot run, or components that do not fit together.
            GPUMemoryError: the GPU ran out of memory while loading.
            wanx.dit_loader.CheckpointError: a weight file that cannot be loaded.
            wanx.parallel.ParallelError: (several processes) any failure, on every rank.
        """
        parallel = ParallelContext() if parallel is None else parallel
        device = resolve_device(cfg)
        if memory is None:
            memory = memory_setting_without_plan(cfg, device)
        if parallel.world_size > 1 and memory != MemorySetting():
            raise ConfigError(f"memory {memory.describe()}: under several processes only offload none, weights "
                              "bf16 and guidance batch run")
        start = time.perf_counter()
        with parallel.stage("loading"), _progress(progress and parallel.is_main, total=3, desc="loading",
                                                  unit="model") as bar:
            with _out_of_memory("loading the models", _advice(cfg, memory, parallel, "loading", device)):
                text_encoder, vae, dit, device = load_components(cfg, memory, on_component=bar.set_postfix_str,
                                                                 on_loaded=bar.update)
            parallelize(dit, parallel)
        return cls(cfg, text_encoder, vae, dit, device, time.perf_counter() - start, parallel, memory)

    def _resident(self, module: torch.nn.Module, offloads: tuple[str, ...] = ("model", "blocks")):
        """A context in which `module` is on the device, when the tier's offload (one of `offloads`)
        keeps it on the host between stages; otherwise it stays where it is."""
        return on_device(module, self.device) if self.memory.offload in offloads else nullcontext()

    def _oom(self, stage: str, key: str):
        """`_out_of_memory` for `stage`, with the settings that shrink stage `key` under this pipeline's tier."""
        return _out_of_memory(stage, _advice(self.cfg, self.memory, self.parallel, key, self.device))

    def _encode_text(self, prompts: list[str]) -> list[torch.Tensor]:
        with self._resident(self.text_encoder.model):
            context = self.text_encoder.encode(prompts)
        if self.memory.offload == "none" and self.cfg.offload_text_encoder and self.device.type == "cuda":
            self.text_encoder.offload()
        return [c.to(self.device) for c in context]

    def _observe_decoder(self, bar):
        """Tick `bar` once per latent frame the VAE decoder processes (diffusers decodes frame by frame)."""
        decoder = getattr(self.vae.model, "decoder", None)
        if decoder is None:
            return None

        def tick(*_):
            bar.update()

        return decoder.register_forward_hook(tick)

    @torch.no_grad()
    def edit(self, source: SourceVideo, prompt: str, negative_prompt: Optional[str] = None,
             progress: bool = True) -> EditResult:
        """Edit `source` as `prompt` asks.

        Args:
            source: from `read_source`.
            prompt: the editing instruction (must not be empty).
            negative_prompt: None for `cfg.negative_prompt` (Wan's by default).
            progress: show tqdm bars on stderr (rank 0 only, under torchrun).
        Raises:
            ConfigError: an empty prompt; cfg_degree 2 without guidance (nothing to split).
            NonFiniteError: a stage produced NaN or Inf.
            GPUMemoryError: the GPU ran out of memory; the message names the stage and what to set.
            wanx.parallel.ParallelError: (several processes) any failure, on every rank.
        """
        from scheduler import FlowUniPCSampler

        from .tokenizer import visible_text
        from .video import frames_to_uint8

        if not visible_text(prompt):
            raise ConfigError("the prompt is empty")
        cfg = self.cfg
        negative_prompt = cfg.negative_prompt if negative_prompt is None else negative_prompt
        plan = make_plan(cfg, source, setting=self.memory)
        timings = {"load": self.load_seconds, "preprocess": source.seconds}  # preprocess: read and resize
        peaks: dict[str, float] = {}
        stage = _StageClock(self.device, timings, peaks)
        guidance = float(cfg.sampler.guidance)
        cfg_batch = plan.batch == 2
        parallel = self.parallel
        cfg_split = parallel.cfg_degree == 2  # this rank computes cond (cfg rank 0) or uncond (1), batch 1
        if cfg_split and not cfg_batch:
            raise ConfigError("parallel.cfg_degree 2 needs classifier-free guidance (sampler.guidance != 1)")
        progress = progress and parallel.is_main
        prompts = [prompt, negative_prompt] if cfg_batch else [prompt]
        if cfg_split:
            prompts = prompts[parallel.cfg_rank:parallel.cfg_rank + 1]
        dit_batch = len(prompts)
        sequential = self.memory.guidance == "sequential" and dit_batch == 2  # cond, then uncond, batch 1 each

        video = source.video.unsqueeze(0)  # [1, 3, F, H, W]
        with stage("text"), parallel.stage("text encoding"), self._oom("encoding the prompt", "text"):
            context = self._encode_text(prompts)
            for features in context:
                require_finite(features, "the text encoder's output")

        with stage("vae_encode"), parallel.stage("VAE encoding"), self._oom("encoding the source video", "vae"):
            with self._resident(self.vae.model):
                source_latent = self.vae.encode(video).to(self.device)  # [1, 16, F', H/8, W/8] fp32
            require_finite(source_latent, "the VAE's encoding of the source video")

        generator = torch.Generator(device=self.device).manual_seed(int(cfg.sampler.seed))
        noise = torch.randn((1, *plan.latent_shape), generator=generator, device=self.device, dtype=torch.float32)
        sampler = FlowUniPCSampler(cfg.sampler.steps, cfg.sampler.shift, cfg.sampler.num_train_timesteps)

        steps_done = [0]

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            timestep = t.to(self.device)
            if sequential:
                flow = torch.cat([self.dit(x, source_latent, timestep.expand(1), [features], step=steps_done[0])
                                  for features in context]).float()
            else:
                batch = x.expand(dit_batch, -1, -1, -1, -1)
                flow = self.dit(batch, source_latent, timestep.expand(dit_batch), context, step=steps_done[0]).float()
            flow = parallel.gather_cfg(flow)  # cfg_degree 2: [cond, uncond] from the two cfg ranks
            require_finite(flow, f"the DiT's prediction at denoising step {steps_done[0] + 1} of {sampler.num_steps}")
            if not cfg_batch:
                return flow
            cond, uncond = flow.chunk(2)
            return uncond + guidance * (cond - uncond)

        step_seconds: list[float] = []
        step_start = [0.0]

        def step_done(_: int) -> None:
            now = time.perf_counter()  # the finiteness check above synchronised the device
            step_seconds.append(now - step_start[0])
            step_start[0] = now
            steps_done[0] += 1
            bar.update()

        with stage("denoise"), parallel.stage("denoising"), self._oom("denoising", "denoise"), _progress(
                progress, total=sampler.num_steps, desc="denoising", unit="step") as bar:
            with self._resident(self.dit, offloads=("model",)):
                step_start[0] = time.perf_counter()
                latent = sampler.sample(velocity, noise, callback=step_done)
            require_finite(latent, "the denoised latent")

        with stage("vae_decode"), parallel.stage("VAE decoding"), self._oom("decoding the edit", "vae"), _progress(
                progress, total=None if cfg.video.vae_tiling else plan.latent_shape[1], desc="decoding",
                unit="frame") as bar:
            hook = self._observe_decoder(bar)
            try:
                with self._resident(self.vae.model):
                    decoded = self.vae.decode(latent)
            finally:
                if hook is not None:
                    hook.remove()
            require_finite(decoded, "the VAE's decoding of the edit")
            edited = frames_to_uint8(decoded[0])

        from in_context_sparse_attention import dense_kernel_name

        probe = torch.empty(1, 1, 1, plan.head_dim, device=self.device, dtype=DTYPES[cfg.model.dtype])
        return EditResult(video=edited, source=frames_to_uint8(video[0]), fps=source.fps, plan=plan,
                          timings=timings, backend=self.dit.attention_backend,
                          dense_kernel=dense_kernel_name(probe), step_seconds=step_seconds, peak_memory=peaks)


def _advice(cfg, memory: MemorySetting, parallel: ParallelContext, stage: str, device: torch.device) -> str:
    """What to try after the GPU ran out of memory in `stage` ("loading", "text", "vae" or "denoise"):
    the settings not in use yet that shrink that stage (one process: `memory.*`, exact ones first;
    several: `parallel.*`), then a smaller edit, which always helps."""
    offload, fp8 = memory.offload, memory.weights == "fp8"
    cfg_batch = cfg.sampler.guidance != 1.0 and memory.guidance == "batch"
    if parallel.world_size > 1:
        sharding = stage in ("loading", "denoise") and not cfg.parallel.shard_weights
        tries = ["parallel.shard_weights=true"] if sharding else []
    else:
        candidates = {
            "loading": [("memory.offload=model", offload == "none"), ("memory.weights=fp8", not fp8)],
            "text": [("memory.offload=model", offload == "none")],
            "vae": [("video.vae_tiling=true", not cfg.video.vae_tiling), ("memory.offload=model", offload == "none")],
            "denoise": [("memory.guidance=sequential", cfg_batch),
                        ("memory.offload=blocks", offload != "blocks" and device.type == "cuda"),
                        ("memory.weights=fp8", not fp8)],
        }
        tries = [setting for setting, useful in candidates[stage] if useful]
    return ", ".join([*tries, "a shorter clip (--max-frames) or a smaller video.size"])


@contextmanager
def _out_of_memory(stage: str, advice: str):
    """Turn a CUDA out-of-memory error in the body into a one-line `GPUMemoryError` naming `stage` and `advice`."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:
        raise GPUMemoryError(f"the GPU ran out of memory while {stage}; try {advice}; nothing was written") from exc


class NonFiniteError(RuntimeError):
    """A stage produced NaN or infinite values: the run stops and writes nothing."""


def require_finite(x: torch.Tensor, stage: str) -> None:
    """Raise NonFiniteError naming `stage` unless every value of `x` is finite.

    One reduction and one host synchronisation per call; the pipeline calls it once per
    stage and once per denoising step, which costs nothing beside a DiT forward, and it
    turns a silent black video (NaN weights, an overflowing setting) into a clear stop.
    """
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError(f"{stage} holds NaN or infinite values (a checkpoint holding them, or settings "
                             "that overflow); nothing was written")
