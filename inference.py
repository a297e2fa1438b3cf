"""Edit a video from a text instruction with LIVEditor-14B.

    python inference.py --input in.mp4 --prompt "make it snow" --output out.mp4
    python inference.py --config configs/tiny.yaml --input assets/demo_input.mp4 \\
        --prompt "$(cat assets/demo_prompt.txt)" --output outputs/demo.mp4 --compare
    python inference.py ... --dry-run                    # print the plan, load nothing
    python inference.py ... attention.backend=triton sampler.steps=16   # config overrides
    python inference.py ... memory.offload=blocks memory.guidance=sequential   # fit a 24 GB GPU

Errors are reported on one line (`inference.py: error: ...`) with exit status 2 for bad
arguments, configuration or weight files (all found before any model loads) and 1 for a
failed run. Outputs are published only when all of them are complete and verified; a
failed or interrupted run (Ctrl-C: 130; SIGTERM or SIGHUP: 128 + the signal's number)
leaves no output and no temporary file, and an existing output is replaced only by a
complete new one. README's "Errors" section states the whole contract.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(HERE, "inference.yaml")
TRACEBACK_VARIABLE = "LIVEDITOR_TRACEBACK"


class CliError(Exception):
    """A one-line reason to stop; `status` is the exit code."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


class OneLineParser(argparse.ArgumentParser):
    """argparse, with usage errors reported on one line like every other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The command line; every option that mirrors a config key overrides it."""
    parser = OneLineParser(
        prog="inference.py",
        description="Edit a video from a text instruction with LIVEditor-14B (Wan 2.2 A14B + In-Context Sparse "
                    "Attention).",
        epilog="Trailing key=value arguments override the config (omegaconf dot-list), e.g. "
               "attention.backend=triton sampler.shift=5.0 video.size=[720,720]. Options given as flags win. "
               "GPU memory: memory.profile=auto (default: the fastest tier that fits the free GPU memory) or "
               "manual; memory.offload=none|model|blocks, memory.weights=bf16|fp8, "
               "memory.guidance=batch|sequential fix a value (--dry-run lists every tier's estimate).",
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help="YAML config (default: inference.yaml, the real model)")
    parser.add_argument("--checkpoint", help="LIVEditor checkpoint (liveditor_ckpt.bin); sets model.checkpoint")
    parser.add_argument("--input", required=True, help="source video (mp4 or anything ffmpeg reads)")
    parser.add_argument("--prompt", required=True, help="the editing instruction")
    parser.add_argument("--output", help="edited mp4 to write (required unless --dry-run)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale; sets sampler.guidance (2.5)")
    parser.add_argument("--steps", type=int, help="sampling steps; sets sampler.steps (32)")
    parser.add_argument("--seed", type=int, help="noise seed; sets sampler.seed (42)")
    parser.add_argument("--backend", help="self-attention method registered in wanx.attention: dense, an ISA backend "
                                          "(tilelang, triton, torch) or lvsa (clips beyond 81 frames); "
                                          "sets attention.backend")
    parser.add_argument("--negative-prompt", help="negative prompt; sets negative_prompt (default: Wan's)")
    parser.add_argument("--max-frames", type=int,
                        help="read at most this many frames at 16 fps; sets video.max_frames (81)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--compare", action="store_true",
                        help="also write <output>_compare.mp4: source (resized, cropped) and edit side by side")
    parser.add_argument("--dry-run", action="store_true",
                        help="print frames, resolution, token counts, attention FLOPs and every memory tier's "
                             "estimate with the one chosen; load nothing")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def flag_settings(args) -> dict:
    """The config values that the flags set (applied after the key=value overrides)."""
    pairs = {"model.checkpoint": args.checkpoint, "sampler.guidance": args.guidance,
             "sampler.steps": args.steps, "sampler.seed": args.seed, "attention.backend": args.backend,
             "negative_prompt": args.negative_prompt, "video.max_frames": args.max_frames}
    return {key: value for key, value in pairs.items() if value is not None}


def compare_path(output: str) -> str:
    """Where --compare writes: `<output without extension>_compare.mp4`."""
    return os.path.splitext(output)[0] + "_compare.mp4"


def check_arguments(args) -> list[str]:
    """Validate what needs no loading; returns the output paths this run will write (checked
    later by `check_outputs`, once the config names every file the run reads)."""
    from wanx.attention import attention_names
    from wanx.tokenizer import visible_text

    if not visible_text(args.prompt):
        raise CliError("the prompt is empty (it has no visible characters)")
    if args.backend is not None and args.backend not in attention_names():
        raise CliError(f"unknown backend {args.backend!r}: choose one of {', '.join(attention_names())}")
    if args.checkpoint is not None and not os.path.exists(args.checkpoint):
        raise CliError(f"checkpoint not found: {args.checkpoint!r}")
    try:
        os.stat(args.input)
    except FileNotFoundError:
        raise CliError(f"input video not found: {args.input!r}") from None
    except OSError as exc:
        raise CliError(f"input video cannot be opened: {args.input!r} ({exc.strerror or exc})") from None
    if not os.path.isfile(args.input):
        raise CliError(f"input is not a file: {args.input!r}")
    if not os.access(args.input, os.R_OK):
        raise CliError(f"input video is not readable: {args.input!r}")
    if args.dry_run:
        return []
    if not args.output:
        raise CliError("--output is required (unless --dry-run)")
    return [args.output] + ([compare_path(args.output)] if args.compare else [])


def check_outputs(args, cfg, outputs: list[str]) -> None:
    """No output may damage a file the run reads (the input, the config, any weight file) or fail
    to be written (`wanx.outputs.check_output_paths`)."""
    from wanx import components
    from wanx.outputs import OutputError, check_output_paths

    others = {args.config: "the config file"}
    for role, path in components.weight_paths(cfg).items():
        if path is not None:
            others[path] = f"model.{role}"
    try:
        check_output_paths(outputs, args.input, args.overwrite, others)
    except OutputError as exc:
        raise CliError(str(exc)) from exc


def check_weights(cfg) -> None:
    """Every weight file present and, read from its header alone, of the right keys, shapes and dtypes."""
    from wanx import components
    from wanx.dit_loader import CheckpointError

    problems = components.missing_weights(cfg)
    if problems:
        raise CliError("; ".join(problems))
    try:
        components.check_weight_files(cfg)
    except CheckpointError as exc:
        raise CliError(str(exc)) from exc


def is_main_process() -> bool:
    """Rank 0 under torchrun (RANK), or the only process: the one that prints and writes."""
    return os.environ.get("RANK", "0") == "0"


# The outputs this process has published: a signal held back during the renames is delivered
# just after them, and the message it ends with must then say the files were written.
PUBLISHED: list[str] = []


def write_outputs(outputs: list[str], videos: dict, fps: float, overwrite: bool) -> None:
    """Encode, verify and publish every output together (`wanx.outputs.OutputSet`); CliError on failure."""
    from wanx.outputs import OutputError, OutputSet
    from wanx.video import VideoError, encode_video

    try:
        with OutputSet(outputs, overwrite=overwrite) as staged:
            for path, frames in videos.items():
                encode_video(staged.stage(path), frames, fps=fps)
            try:
                staged.publish()
            finally:
                if staged.published:
                    PUBLISHED[:] = outputs
    except (VideoError, OutputError) as exc:
        raise CliError(f"{exc} (nothing was written)", status=1) from exc
    except OSError as exc:
        raise CliError(f"cannot write the output: {exc.strerror or exc} (nothing was written)", status=1) from exc


def run(args) -> int:
    """Plan, and unless --dry-run, load, edit and write; raises CliError on failure.

    Under torchrun every process runs this: all check the same input (so all refuse it alike,
    before any process group starts), only rank 0 prints and writes, and a failure on any rank
    stops every rank with one line (`wanx.parallel`)."""
    from wanx import components, pipeline, planning, report
    from wanx.config import ConfigError, load_config, one_line
    from wanx.dit_loader import CheckpointError
    from wanx.parallel import ParallelContext, ParallelError, check_layout
    from wanx.video import VideoError

    main = is_main_process()
    say = print if main else (lambda *_, **__: None)
    outputs = check_arguments(args)
    try:
        cfg = load_config(args.config, list(args.overrides), flag_settings(args))
    except ConfigError as exc:
        raise CliError(str(exc)) from exc
    try:
        device = components.resolve_device(cfg)
    except ConfigError as exc:
        raise CliError(str(exc)) from exc
    if not args.dry_run:
        check_outputs(args, cfg, outputs)
        check_weights(cfg)
    try:
        source = pipeline.read_source(cfg, args.input)
        plan = planning.make_plan(cfg, source, planning.free_gpu_bytes(cfg))
        # a dry run plans for the layout as if launched with it; a run must be launched with it
        p = cfg.parallel
        world_size = p.ulysses_degree * p.cfg_degree if args.dry_run else int(os.environ.get("WORLD_SIZE", "1"))
        check_layout(p.ulysses_degree, p.cfg_degree, world_size, num_heads=plan.heads)
    except (VideoError, ConfigError) as exc:
        raise CliError(str(exc)) from exc
    say(report.format_plan(plan, all_tiers=args.dry_run), flush=True)
    if args.dry_run:
        for role, path in components.weight_paths(cfg).items():
            state = "not set" if path is None else ("found" if os.path.exists(path) else "MISSING")
            say(f"weights     model.{role}: {path} ({state})")
        say("dry run: nothing loaded, nothing written")
        return 0

    try:
        context = ParallelContext.from_environment(
            p.ulysses_degree, p.cfg_degree, p.shard_weights, device_type=device.type,
            num_heads=plan.heads, timeout_s=p.timeout_s)
    except ConfigError as exc:
        raise CliError(str(exc)) from exc
    try:
        if cfg.model.kind in ("tiny", "random"):
            say(f"NOTE: the {cfg.model.kind!r} model has RANDOM weights: the pipeline runs end to end, but the "
                "output is noise-like, not an edit.", flush=True)
        try:
            pipe = pipeline.EditingPipeline.load(cfg, progress=not args.quiet, parallel=context,
                                                 memory=plan.memory_setting)
        except ConfigError as exc:
            raise CliError(str(exc)) from exc
        except (CheckpointError, OSError) as exc:
            raise CliError(f"cannot load the model: {one_line(exc)}", status=1) from exc
        except pipeline.GPUMemoryError as exc:
            raise CliError(str(exc), status=1) from exc
        try:
            result = pipe.edit(source, args.prompt, progress=not args.quiet)
        except ConfigError as exc:
            raise CliError(str(exc)) from exc
        except (pipeline.NonFiniteError, pipeline.GPUMemoryError) as exc:
            raise CliError(str(exc), status=1) from exc
        except OSError as exc:
            raise CliError(f"the edit failed: {one_line(exc)} (nothing was written)", status=1) from exc

        start = time.perf_counter()
        videos = {args.output: result.video}
        if args.compare:
            videos[compare_path(args.output)] = pipeline.side_by_side(result.source, result.video)
        with context.stage("write"):
            if context.is_main:
                write_outputs(outputs, videos, result.fps, args.overwrite)
        result.timings["write"] = time.perf_counter() - start
        say(report.format_summary(result, outputs), flush=True)
        if context.world_size > 1:
            say(f"parallel    {context.describe()}", flush=True)
        return 0
    except ParallelError as exc:
        raise CliError(str(exc), status=2 if exc.error_type == "ConfigError" else 1) from exc
    finally:
        context.close()


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: unwind like Ctrl-C, so that every temporary file is removed."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, _frame):
    raise Terminated(signum)


def _install_signal_handlers() -> dict:
    """SIGTERM and SIGHUP raise `Terminated` (unless ignored); returns the handlers they replaced."""
    previous = {}
    for name in ("SIGTERM", "SIGHUP"):
        signum = getattr(signal, name, None)
        if signum is not None and signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, _raise_terminated)
    return previous


def _unexpected(exc: BaseException) -> str:
    """One line for an error no stage anticipated, with a pointer to the full traceback."""
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):  # outside the pipeline's stages, which name themselves
        return ("the GPU ran out of memory; try memory.offload=blocks, memory.weights=fp8, a shorter clip "
                "(--max-frames), a smaller video.size or video.vae_tiling=true; nothing was written")
    text = " ".join(str(exc).split())
    return (f"unexpected {type(exc).__name__}: {text[:300] or 'no message'} (nothing was written; "
            f"set {TRACEBACK_VARIABLE}=1 for the traceback)")


def main(argv: list[str] | None = None) -> int:
    """Entry point: returns the exit status (0 ok, 1 failed run, 2 bad input, 130 interrupted,
    128 + N when stopped by signal N)."""
    args = build_parser().parse_intermixed_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    previous_handlers = _install_signal_handlers()
    PUBLISHED.clear()
    try:
        return run(args)
    except CliError as exc:
        print(f"inference.py: error: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        print(f"\ninference.py: interrupted: {_what_was_written()}", file=sys.stderr)
        return 130
    except Terminated as exc:
        print(f"\ninference.py: stopped by {signal.Signals(exc.signum).name}: {_what_was_written()}",
              file=sys.stderr)
        return 128 + exc.signum
    except Exception as exc:
        if os.environ.get(TRACEBACK_VARIABLE) == "1":
            raise
        print(f"inference.py: error: {_unexpected(exc)}", file=sys.stderr)
        return 1
    finally:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)


def _what_was_written() -> str:
    """For a stop by a signal: whether the outputs had already been published when it came."""
    if PUBLISHED:
        return f"the outputs were already complete and written ({', '.join(PUBLISHED)})"
    return "no output written"


if __name__ == "__main__":
    sys.exit(main())
