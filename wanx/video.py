"""Video input/output and preprocessing for the editing pipeline (docs/pipeline.md, section 3, steps 1 and 5).

Reading and writing run the ffmpeg binary that imageio-ffmpeg ships, as a subprocess driven
from here (not through imageio's reader and writer): so every run's exit status and error
report are checked. Frames travel as uint8 numpy arrays [F, H, W, 3] (RGB) between disk and
the model code, and as float32 tensors [3, F, H, W] in [-1, 1] inside it.

- `probe_video` reads only the header and refuses inputs beyond `MAX_INPUT_SIDE` or outside
  `MIN_INPUT_FPS`..`MAX_INPUT_FPS`; `read_video_resized` (what the pipeline uses) probes
  first, then resizes each frame as it is decoded, so memory holds the working-resolution
  result plus one native frame. `read_video` returns native frames and applies no limits.
- `encode_video` fails unless ffmpeg exits cleanly, reports no error, and the file it wrote
  decodes to the expected frames (`verify_video`); `write_video` publishes it atomically.

The Wan VAE compresses time by 4 with a causal first frame, so it takes 4k+1 frames:
`fit_frame_count` gives the largest such count, and the frames past it are dropped
(never padded: padding would invent content the edit has to reproduce).

Why one module of this length: reading, writing and verifying all drive the same ffmpeg
subprocess wrapper (`_Ffmpeg`) and share its translation of ffmpeg's reports into one-line
`VideoError`s; split apart, each half would need the other's private half.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import math
import os
import re
import signal
import struct
import subprocess
import threading
from collections.abc import Iterator
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F

from .outputs import OutputError, OutputSet

logger = logging.getLogger(__name__)

# The 540p aspect buckets of docs/pipeline.md, as (height, width); each side is a multiple
# of 16 (VAE stride 8 times the DiT's spatial patch 2).
BUCKETS_540P: tuple[tuple[int, int], ...] = (
    (960, 544),  # 9:16 portrait
    (720, 720),  # 1:1
    (544, 960),  # 16:9 landscape
    (960, 480),  # 1:2 portrait
    (480, 960),  # 2:1 landscape
)

MODEL_FPS = 16

# Limits on input videos, checked on the header before any frame is decoded (`probe_video`).
# 4096 pixels per side admits DCI 4K (4096x2160) and UHD (3840x2160), the largest formats
# cameras commonly record; the model works at the 540p buckets, so more pixels only cost
# decoding time and memory (a 4096x4096 frame is 48 MiB as uint8 and 192 MiB as float32
# while it is resized). A larger video should be downscaled first (ffmpeg -vf scale=...).
MAX_INPUT_SIDE = 4096
# 1 to 1000 frames per second: below 1 fps a clip is a slide show (each frame would be
# repeated 16 times or more at the model's 16 fps); 1000 fps is the fastest slow-motion
# mode of consumer cameras, and higher rates are almost always broken timestamps.
MIN_INPUT_FPS = 1.0
MAX_INPUT_FPS = 1000.0


class VideoError(ValueError):
    """A video that cannot be read or written; the message is one line and names the path.

    `reason` is the message without the path (e.g. "no space left on device"), for a caller
    that reports the failure under another name (write_video names the destination, not
    its temporary file).
    """

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = message if reason is None else reason


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What the header of a video says, read without decoding a frame (`probe_video`).

    width and height are those of the decoded frames: a clip whose header asks for a
    rotation by 90 or 270 degrees is decoded upright, so its stored sides are swapped.
    duration is the container's, in seconds (None when unknown); it counts every stream,
    so an audio track longer than the video lengthens it.
    """

    width: int
    height: int
    fps: float  # the stream's average frame rate ("fps"), else its base rate ("tbr")
    duration: float | None
    codec: str  # e.g. "h264"

    @property
    def frame_estimate(self) -> int | None:
        """round(duration * fps): the frame count if the video lasts as long as the container."""
        return None if self.duration is None else round(self.duration * self.fps)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _file_url(path: str) -> str:
    """ffmpeg's name for a local file: "file:" keeps a name with a colon or a leading "-" a file."""
    return "file:" + os.path.abspath(path)


class _Ffmpeg:
    """One run of ffmpeg, with its error report (stderr) collected by a thread.

    The thread drains stderr while the run goes on, so ffmpeg never blocks on a full pipe;
    the first MiB is kept. ffmpeg runs in its own session: a Ctrl-C at the terminal
    reaches only Python, which then stops ffmpeg itself: used as a context manager, a run
    is killed when any exception (KeyboardInterrupt and GeneratorExit included) leaves it.
    """

    _KEEP = 1 << 20

    def __init__(self, args: list[str], path: str, *, stdin: bool = False, stdout: bool = False):
        try:
            self.process = subprocess.Popen(
                [_ffmpeg_exe(), "-hide_banner", *args],
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout else subprocess.DEVNULL,
                stderr=subprocess.PIPE, start_new_session=True)
        except (OSError, RuntimeError) as exc:  # imageio-ffmpeg raises RuntimeError without a binary
            raise VideoError(f"cannot run ffmpeg for {path!r}: {_first_line(exc)}") from exc
        self._report = bytearray()
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def __enter__(self) -> _Ffmpeg:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            self.kill()

    def _collect(self) -> None:
        for chunk in iter(lambda: self.process.stderr.read(4096), b""):
            self._report += chunk[: max(0, self._KEEP - len(self._report))]

    def finish(self) -> tuple[int, list[str]]:
        """Wait for the end; (exit status, non-empty stderr lines). A signal gives -signum."""
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):  # ffmpeg may have closed its end already
                self.process.stdin.close()
        status = self.process.wait()
        self._thread.join()
        self.process.stderr.close()
        if self.process.stdout is not None:
            self.process.stdout.close()
        text = self._report.decode("utf-8", "replace")
        return status, [line.strip() for line in text.splitlines() if line.strip()]

    def kill(self) -> None:
        """Stop ffmpeg now (its report is not needed)."""
        if self.process.poll() is None:
            self.process.kill()
        self.finish()


# Error numbers whose text (strerror) in an ffmpeg report names the reason of a failure.
_ERRNO_REASONS = (
    (errno.ENOSPC, "no space left on device"),
    (errno.EFBIG, "file size limit exceeded (file too large)"),
    (errno.EDQUOT, "disk quota exceeded"),
    (errno.EROFS, "read-only file system"),
    (errno.EACCES, "permission denied"),
    (errno.EIO, "input/output error"),
)


def _clean(line: str) -> str:
    """An ffmpeg report line without its "[component @ 0x...]" prefixes, at most 200 characters."""
    line = re.sub(r"^(\[[^\]]*\]\s*)+", "", line)
    return line if len(line) <= 200 else line[:197] + "..."


def _failure_reason(status: int, lines: list[str]) -> str:
    """Why an ffmpeg run failed, in a few words, from its exit status and report."""
    text = "\n".join(lines)
    for number, reason in _ERRNO_REASONS:
        if os.strerror(number) in text:
            return reason
    if status == -signal.SIGXFSZ:
        return "file size limit exceeded (ffmpeg was killed by SIGXFSZ)"
    if status < 0:
        return f"ffmpeg was killed by {signal.Signals(-status).name}"
    partial = [line for line in lines if "partial file" in line]  # the mp4 demuxer on data cut off
    if partial:
        return "truncated (ffmpeg: " + _clean(partial[0]) + ")"
    if lines:
        return "ffmpeg: " + _clean(lines[0])
    return f"ffmpeg exited with status {status}"


def _check_input_file(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise VideoError(f"video not found: {path!r}", "not found")
    if os.path.isdir(path):
        raise VideoError(f"expected a video file, got a directory: {path!r}", "it is a directory")
    if os.path.getsize(path) == 0:
        raise VideoError(f"video file is empty (0 bytes): {path!r}", "the file is empty (0 bytes)")
    return path


def _open_failure(path: str, lines: list[str]) -> VideoError:
    """The one-line error for a file ffmpeg cannot open as a video, from its report."""
    text = "\n".join(lines)
    if "moov atom not found" in text or "Invalid data found" in text:
        reason = "ffmpeg found no valid video data: not a video, or a corrupt or truncated file"
    elif os.strerror(errno.EACCES) in text:
        reason = "permission denied"
    else:
        reason = "ffmpeg cannot open it" + (f" ({_clean(lines[0])})" if lines else "")
    return VideoError(f"cannot read video {path!r}: {reason}", reason)


_VIDEO_STREAM = re.compile(r"^Stream #0:(\d+)\S*: Video: (.*)$")
_SIZE = re.compile(r", (\d+)x(\d+)(?=[\s,\[]|$)")
# ffmpeg prints rates with two decimals ("29.97 fps"), as integers ("25 fps"), or in
# thousands when they are multiples of 1000 ("1k fps").
_RATE = r"(\d+(?:\.\d+)?)(k?) {}"
_ROTATION = re.compile(r"rotation of (-?\d+(?:\.\d+)?) degrees|^rotate\s*:\s*(-?\d+)", re.IGNORECASE)
_DURATION = re.compile(r"Duration: (\d+):(\d+):(\d+(?:\.\d+)?)")


def _rate(description: str, unit: str) -> float:
    match = re.search(_RATE.format(unit), description)
    if match is None:
        return 0.0
    return float(match.group(1)) * (1000.0 if match.group(2) else 1.0)


def _read_header(path: str) -> tuple[VideoInfo, int]:
    """Parse the header ffmpeg prints for `path` (no frame is decoded): (info, stream index).

    The stream is the first video stream that is not an attached picture (cover art).
    Applies no limits. Raises VideoError when ffmpeg cannot open the file or finds no video.
    """
    with _Ffmpeg(["-nostdin", "-i", _file_url(path)], path) as run:
        _, lines = run.finish()  # status 1 always: no output file was given
    if not any(line.startswith("Input #0") for line in lines):
        errors = [line for line in lines if not line.startswith("At least one output file")]
        raise _open_failure(path, errors)
    for i, line in enumerate(lines):
        match = _VIDEO_STREAM.match(line)
        if match is None or "(attached pic)" in line:
            continue
        description = match.group(2)
        size = _SIZE.search(description)
        if size is None:
            raise VideoError(f"cannot read video {path!r}: ffmpeg reports no frame size for its video stream")
        width, height = int(size.group(1)), int(size.group(2))
        for follow in lines[i + 1:]:
            if follow.startswith("Stream #"):
                break
            rotation = _ROTATION.search(follow)
            if rotation is not None and round(float(rotation.group(1) or rotation.group(2))) % 180 == 90:
                width, height = height, width
        duration = _DURATION.search("\n".join(lines))
        seconds = None if duration is None else (
            int(duration.group(1)) * 3600 + int(duration.group(2)) * 60 + float(duration.group(3)))
        fps = _rate(description, "fps") or _rate(description, "tbr")
        return VideoInfo(width, height, fps, seconds, description.split()[0]), int(match.group(1))
    reason = "it has no video stream, so no frames"
    raise VideoError(f"cannot read video {path!r}: {reason}", reason)


def _checked_header(path: str | os.PathLike) -> tuple[VideoInfo, int]:
    """`_read_header` of an existing, non-empty file, checked against the input limits."""
    path = _check_input_file(path)
    info, stream = _read_header(path)
    if max(info.width, info.height) > MAX_INPUT_SIDE:
        raise VideoError(f"cannot read video {path!r}: its frames are {info.width}x{info.height}, above the "
                         f"limit of {MAX_INPUT_SIDE} pixels per side (MAX_INPUT_SIDE); downscale it first")
    if not info.fps > 0:
        raise VideoError(f"cannot read video {path!r}: it reports no frame rate")
    if not MIN_INPUT_FPS <= info.fps <= MAX_INPUT_FPS:
        raise VideoError(f"cannot read video {path!r}: its frame rate {info.fps:g} fps is outside "
                         f"{MIN_INPUT_FPS:g} to {MAX_INPUT_FPS:g} fps (MIN_INPUT_FPS, MAX_INPUT_FPS)")
    return info, stream


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Read a video's header only (nothing is decoded) and check it against the input limits.

    Raises:
        VideoError: missing path, a directory, an empty file, a file ffmpeg cannot open or
            that has no video stream, no frame rate, frames wider or taller than
            MAX_INPUT_SIDE, or a frame rate outside MIN_INPUT_FPS..MAX_INPUT_FPS.
    """
    return _checked_header(path)[0]


def _read_exactly(stream, buffer: memoryview) -> int:
    """Fill `buffer` from `stream`; the number of bytes read (less only at the end of the stream)."""
    filled = 0
    while filled < len(buffer):
        count = stream.readinto(buffer[filled:])
        if not count:
            break
        filled += count
    return filled


def _iter_frames(path: str, stream: int) -> Iterator[np.ndarray]:
    """Decode video stream `stream` of `path` frame by frame: uint8 [h, w, 3] RGB arrays.

    ffmpeg sends each frame as a PPM image (a short header with its size, then the RGB
    bytes), the same pixels as raw rgb24 but with no need to guess the size of what it
    outputs (a rotated clip is decoded upright). The output format (image2pipe) is the one
    imageio's reader used, so the frames, frame-rate conversion included, are the same.

    Only a run read to its end is checked: a non-zero exit status, or a "partial file"
    report (data cut off after an index at the front of the file), raises VideoError.
    A consumer that stops early (closing the generator) stops ffmpeg, and damage past the
    frames it took goes unnoticed. Other decoding errors ffmpeg survives (it conceals them,
    as players do) are accepted.
    """
    short = False
    with _Ffmpeg(["-nostdin", "-v", "error", "-i", _file_url(path), "-map", f"0:{stream}", "-an", "-sn",
                  "-dn", "-pix_fmt", "rgb24", "-c:v", "ppm", "-f", "image2pipe", "-"], path, stdout=True) as run:
        out = run.process.stdout
        while True:
            magic = out.readline()
            if not magic:
                break
            dims, depth = out.readline().split(), out.readline().strip()
            if magic.strip() != b"P6" or len(dims) != 2 or depth != b"255":
                raise VideoError(f"cannot read video {path!r}: unexpected output from ffmpeg")
            width, height = int(dims[0]), int(dims[1])
            frame = np.empty((height, width, 3), np.uint8)
            if _read_exactly(out, memoryview(frame).cast("B")) < frame.nbytes:
                short = True
                break
            yield frame
        status, lines = run.finish()
    partial = [line for line in lines if "partial file" in line]
    if partial:
        raise VideoError(f"cannot read video {path!r}: truncated (ffmpeg: {_clean(partial[0])})")
    if status != 0:
        raise VideoError(f"cannot read video {path!r}: corrupt or truncated ({_failure_reason(status, lines)})")
    if short:
        raise VideoError(f"cannot read video {path!r}: ffmpeg's output ended within a frame")


def _check_read_arguments(path: str, max_frames: int | None, target_fps: float | None) -> None:
    if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, (int, np.integer))
                                   or max_frames < 1):
        raise VideoError(f"cannot read video {path!r}: max_frames must be a positive integer or None, "
                         f"got {max_frames!r}")
    if target_fps is not None and not (target_fps > 0 and math.isfinite(target_fps)):
        raise VideoError(f"cannot read video {path!r}: target_fps must be a positive number or None, "
                         f"got {target_fps!r}")


def _resampled(
    path: str,
    stream: int,
    src_fps: float,
    max_frames: int | None,
    target_fps: float | None,
) -> Iterator[tuple[np.ndarray, int]]:
    """The decoded frames resampled in time: (frame, copies), each frame shown `copies` >= 1 times.

    Output frame k shows source frame floor(k * src_fps / target_fps), the last one on
    screen at time k / target_fps (no blending, so no ghosting); at most `max_frames`
    output frames in all. Raises VideoError for a video with no frames.
    """
    shown = 0  # output frames so far
    with contextlib.closing(_iter_frames(path, stream)) as frames:
        for i, frame in enumerate(frames):
            if target_fps is None:
                copies = 1
            else:
                last = math.floor((i + 1) * target_fps / src_fps - 1e-9)  # last output frame showing frame i
                copies = max(0, last - shown + 1)
            if max_frames is not None:
                copies = min(copies, max_frames - shown)
            if copies:
                yield frame, copies
                shown += copies
            if max_frames is not None and shown >= max_frames:
                break
    if not shown:
        raise VideoError(f"cannot read video {path!r}: it has no frames")


def read_video(
    path: str | os.PathLike,
    max_frames: int | None = None,
    target_fps: float | None = None,
) -> tuple[np.ndarray, float]:
    """Decode a video file into RGB frames at their native size (applies no input limits).

    Every frame is kept at full size: for model inputs use `read_video_resized`, which
    checks the limits first and keeps only the resized frames.

    Args:
        path: an mp4 (or any container ffmpeg reads).
        max_frames: keep at most this many frames (after fps resampling); None keeps all.
        target_fps: resample in time to this rate by taking, for output frame k, the last
            source frame shown at time k / target_fps (no blending, so no ghosting).
            None keeps the source rate.

    Returns:
        (frames, fps): frames is uint8 [F, H, W, 3]; fps is the rate of the returned
        frames (target_fps when given, else the file's).

    Raises:
        VideoError: missing path, a directory, an empty file, a file ffmpeg cannot
            decode (not a video, corrupt or truncated), no frame rate, or no frames.
    """
    path = _check_input_file(path)
    _check_read_arguments(path, max_frames, target_fps)
    info, stream = _read_header(path)
    if not info.fps > 0:
        raise VideoError(f"cannot read video {path!r}: it reports no frame rate")
    frames: list[np.ndarray] = []
    with contextlib.closing(_resampled(path, stream, info.fps, max_frames, target_fps)) as resampled:
        for frame, copies in resampled:
            frames.extend([frame] * copies)
    if len({frame.shape for frame in frames}) > 1:
        raise VideoError(f"cannot read video {path!r}: its frame size changes midway")
    out_fps = float(target_fps) if target_fps is not None else info.fps
    logger.info("read %d frames (%dx%d) at %.3g fps from %s", len(frames),
                frames[0].shape[1], frames[0].shape[0], out_fps, path)
    return np.stack(frames), out_fps


def read_video_resized(
    path: str | os.PathLike,
    size: tuple[int, int],
    max_frames: int | None = None,
    target_fps: float | None = None,
) -> tuple[torch.Tensor, float, int]:
    """Read a video straight to the model's working resolution, one native frame at a time.

    The header is checked first (`probe_video`: size and frame-rate limits), so an
    over-limit file is refused before anything is decoded. Each frame is resized and
    centre-cropped as soon as it is decoded, so memory holds the result plus one native
    frame (and its float32 copies while it is resized). The result equals
    `preprocess_frames(read_video(path, max_frames, target_fps)[0], size)` bit for bit
    (that function also resizes every frame independently).

    Args:
        path: the source video.
        size: (H, W) of the output, e.g. from `choose_bucket`.
        max_frames, target_fps: as in `read_video`.

    Returns:
        (video, fps, frames_read): video is float32 [3, F, H, W] in [-1, 1]; fps as in
        `read_video`; frames_read = F, the frames after resampling and the max_frames cap
        (the pipeline trims to 4k+1 afterwards).

    Raises:
        VideoError: as `probe_video` and `read_video`, or a frame size that changes midway.
    """
    path = os.fspath(path)
    if len(size) != 2 or min(size) < 1:
        raise VideoError(f"cannot read video {path!r}: size must be (height, width) with positive entries, "
                         f"got {size!r}")
    _check_read_arguments(path, max_frames, target_fps)
    info, stream = _checked_header(path)
    out_h, out_w = int(size[0]), int(size[1])
    pieces: list[torch.Tensor | None] = []  # [3, H, W] per output frame (repeated frames share one)
    first_shape = None
    with contextlib.closing(_resampled(path, stream, info.fps, max_frames, target_fps)) as resampled:
        for frame, copies in resampled:
            if first_shape is None:
                first_shape = frame.shape
            elif frame.shape != first_shape:
                raise VideoError(f"cannot read video {path!r}: its frame size changes midway")
            pieces.extend([_resize_crop(frame[None], out_h, out_w)[0]] * copies)
    video = torch.empty((3, len(pieces), out_h, out_w), dtype=torch.float32)
    for i in range(len(pieces)):
        video[:, i] = pieces[i]
        pieces[i] = None  # freed as it is copied: the two never coexist in full
    out_fps = float(target_fps) if target_fps is not None else info.fps
    logger.info("read %d frames (%dx%d, resized to %dx%d) at %.3g fps from %s", video.shape[1],
                first_shape[1], first_shape[0], out_w, out_h, out_fps, path)
    return video, out_fps, video.shape[1]


def fit_frame_count(n: int) -> int:
    """Largest 4k+1 that is <= n: the Wan VAE's frame rule (time stride 4, causal first frame).

    The pipeline keeps the first `fit_frame_count(n)` frames and drops the rest
    (at most 3); the drop is logged.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"frame count must be a positive integer, got {n!r}")
    kept = (int(n) - 1) // 4 * 4 + 1
    if kept != n:
        logger.info("keeping %d of %d frames (the VAE needs 4k+1); the last %d are dropped",
                    kept, n, n - kept)
    return kept


def choose_bucket(height: int, width: int) -> tuple[int, int]:
    """The 540p bucket (height, width) whose aspect ratio is closest to height x width.

    Closeness is measured on log(width / height), so 2:1 and 1:2 are symmetric.
    """
    if not (height > 0 and width > 0):
        raise ValueError(f"height and width must be positive, got {height!r} x {width!r}")
    aspect = math.log(width / height)
    return min(BUCKETS_540P, key=lambda hw: abs(math.log(hw[1] / hw[0]) - aspect))


def _resize_crop(frames: np.ndarray, out_h: int, out_w: int) -> torch.Tensor:
    """uint8 [f, h, w, 3] -> float32 [f, 3, out_h, out_w] in [-1, 1]: cover, then centre-crop.

    Each frame is resized on its own (interpolation never mixes frames), so one call on f
    frames equals f calls on one frame, value for value.
    """
    _, h, w, _ = frames.shape
    scale = max(out_h / h, out_w / w)
    new_h, new_w = max(out_h, round(h * scale)), max(out_w, round(w * scale))
    top, left = (new_h - out_h) // 2, (new_w - out_w) // 2
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # [f, 3, h, w]
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    x = x[:, :, top:top + out_h, left:left + out_w]
    return (x / 127.5 - 1.0).clamp_(-1.0, 1.0)  # bicubic overshoots past [0, 255]


def preprocess_frames(
    frames: np.ndarray,
    size: tuple[int, int],
    chunk: int = 16,
) -> torch.Tensor:
    """Resize (keeping aspect) and centre-crop frames to `size`, scaled to [-1, 1].

    The frames are scaled by max(H / h, W / w), so the resized picture covers the target,
    with bicubic antialiased interpolation (antialias matters when shrinking 1080p to
    540p), then the centre is cut out.

    Args:
        frames: uint8 [F, h, w, 3] RGB.
        size: (H, W) of the output, e.g. from `choose_bucket`.
        chunk: frames resized at a time, to bound the float32 working memory.

    Returns:
        float32 [3, F, H, W] in [-1, 1].
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"frames must be an array [F, H, W, 3] with F >= 1, got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be (height, width) with positive entries, got {size!r}")
    out_h, out_w = int(size[0]), int(size[1])
    pieces = [_resize_crop(frames[start:start + chunk], out_h, out_w) for start in range(0, frames.shape[0], chunk)]
    return torch.cat(pieces).permute(1, 0, 2, 3).contiguous()


def frames_to_uint8(video: torch.Tensor) -> np.ndarray:
    """Inverse of the value mapping of `preprocess_frames`: [3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3].

    Values outside [-1, 1] are clamped; rounding is to nearest.
    """
    if not isinstance(video, torch.Tensor) or video.ndim != 4 or video.shape[0] != 3:
        shape = tuple(video.shape) if hasattr(video, "shape") else type(video).__name__
        raise ValueError(f"video must be a tensor [3, F, H, W], got {shape}")
    x = (video.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5
    return x.round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


def _cannot_write(path: str, reason: str) -> VideoError:
    return VideoError(f"cannot write video {path!r}: {reason}", reason)


def _check_frames(path: str, frames_uint8: np.ndarray) -> np.ndarray:
    """The frames as a uint8 array [F, H, W, 3], F >= 1, H and W even (yuv420p needs it)."""
    frames = np.asarray(frames_uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise _cannot_write(path, f"frames must be an array [F, H, W, 3] with F >= 1, got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise _cannot_write(path, f"frames must be uint8, got {frames.dtype}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise _cannot_write(path, f"frame height and width must be even for H.264 yuv420p, "
                                  f"got {frames.shape[1]}x{frames.shape[2]}")
    return frames


def _check_encoding(path: str, fps: float, quality: float) -> None:
    def number(value) -> bool:
        return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))

    if not (number(fps) and fps > 0 and math.isfinite(fps)):
        raise _cannot_write(path, f"fps must be a positive number, got {fps!r}")
    if not (number(quality) and 1 <= quality <= 10):
        raise _cannot_write(path, f"quality must be a number from 1 to 10, got {quality!r}")


def encode_video(
    path: str | os.PathLike,
    frames_uint8: np.ndarray,
    fps: float = MODEL_FPS,
    quality: float = 8.0,
) -> None:
    """Encode frames into exactly `path` as an H.264 mp4, then verify the file.

    ffmpeg reads raw RGB frames on its stdin. The write fails unless ffmpeg exits with
    status 0 and reports no error (it runs at log level "error", where a clean encode says
    nothing), and the file then decodes to exactly the frames given (`verify_video`): a
    full disk, a file-size limit or a killed encoder leaves a file no player opens, and is
    an error here, never a success. `path` is written in place (no rename: it is typically
    a temporary file the caller chose) and, on failure, left to the caller to delete.

    Args:
        path: the file to write (replaced if it exists); mp4 whatever its name.
        frames_uint8: uint8 [F, H, W, 3] RGB, H and W even (yuv420p needs it).
        fps: frame rate written into the file.
        quality: imageio's scale from 1 to 10 (10 is best), as x264's crf = int((1 - quality / 10) * 51).

    Raises:
        VideoError: bad frames or arguments, or a failed encode or verification; one line
            naming `path` and the reason (e.g. "no space left on device"), also in `.reason`.
    """
    path = os.fspath(path)
    frames = _check_frames(path, frames_uint8)
    _check_encoding(path, fps, quality)
    try:
        _encode(path, frames, fps, quality)
    except VideoError as exc:
        raise VideoError(f"could not write video {path!r}: {exc.reason}", exc.reason) from exc
    try:
        verify_video(path, frames.shape[0], frames.shape[1], frames.shape[2])
    except VideoError as exc:
        reason = f"the written file failed verification: {exc.reason}"
        raise VideoError(f"could not write video {path!r}: {reason}", reason) from exc


def _encode(path: str, frames: np.ndarray, fps: float, quality: float) -> None:
    """Run the encoder (the command imageio's writer used); VideoError(reason) unless it succeeds."""
    count, height, width, _ = frames.shape
    rate = Fraction(float(fps)).limit_denominator()  # a rational keeps 24000/1001 exact
    crf = int((1 - quality / 10.0) * 51)
    sent = 0
    with _Ffmpeg(["-y", "-v", "error", "-f", "rawvideo", "-vcodec", "rawvideo", "-s", f"{width}x{height}",
                  "-pix_fmt", "rgb24", "-r", str(rate), "-i", "-", "-an", "-vcodec", "libx264",
                  "-pix_fmt", "yuv420p", "-crf", str(crf), "-f", "mp4", _file_url(path)], path, stdin=True) as run:
        for frame in frames:
            try:
                run.process.stdin.write(np.ascontiguousarray(frame).data)
            except OSError:  # ffmpeg stopped reading: its status and report say why
                break
            sent += 1
        status, lines = run.finish()
    if status != 0 or lines:
        raise VideoError(_failure_reason(status, lines))
    if sent < count:
        raise VideoError(f"ffmpeg stopped reading after {sent} of {count} frames")


def _mp4_structure_problem(path: str) -> str | None:
    """What is wrong with the top-level boxes of an mp4 file (None when they tile it exactly).

    An mp4 (ISO base media file) is a sequence of boxes, each starting with its size; a
    file cut short ends inside its last box. ffmpeg does not always notice: a cut through
    the metadata at the end of the index (moov) decodes without a word. Files that do not
    start with an "ftyp" box are not mp4 and are not checked here.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if f.read(8)[4:8] != b"ftyp":
            return None
        position = 0
        while position < size:
            f.seek(position)
            header = f.read(16)
            if len(header) < 8:
                return f"it ends inside a box header at byte {position} (truncated)"
            length, kind = struct.unpack(">I4s", header[:8])
            if length == 1:  # a 64-bit size follows the type
                if len(header) < 16:
                    return f"it ends inside a box header at byte {position} (truncated)"
                length = struct.unpack(">Q", header[8:16])[0]
            elif length == 0:  # the box runs to the end of the file
                length = size - position
            if length < 8:
                return f"invalid box size {length} at byte {position}"
            if position + length > size:
                name = kind.decode("latin-1")
                return f"its {name!r} box ends {position + length - size} bytes past the end of the file (truncated)"
            position += length
    return None


def verify_video(path: str | os.PathLike, frames: int, height: int, width: int) -> None:
    """Check that a video file decodes completely to `frames` frames of `height` x `width`.

    An mp4 must first consist of whole top-level boxes (a cut file ends inside one). Then
    the header gives the frame size, and the whole video stream is decoded without keeping
    a frame (ffmpeg's null output, which neither drops nor repeats frames) to count the
    frames; any error ffmpeg reports while decoding fails the check (a truncated or damaged
    file). Memory stays at about one frame, inside ffmpeg; the time is one decode.

    Raises:
        VideoError: the file is missing, cut short or cannot be opened, its frames have
            another size, decoding reports an error, or it holds another number of frames;
            one line naming `path`, the reason also in `.reason`.
    """
    path = os.fspath(path)
    for name, value in (("frames", frames), ("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise VideoError(f"cannot verify video {path!r}: frames, height and width must be positive integers, "
                             f"got {name}={value!r}")

    def fail(reason: str) -> VideoError:
        return VideoError(f"video {path!r} failed verification: {reason}", reason)

    try:
        _check_input_file(path)
        problem = _mp4_structure_problem(path)
        if problem is not None:
            raise VideoError(problem)
        info, stream = _read_header(path)
    except VideoError as exc:
        raise fail(exc.reason) from exc
    if (info.width, info.height) != (width, height):
        raise fail(f"its frames are {info.width}x{info.height}, expected {width}x{height}")
    with _Ffmpeg(["-nostdin", "-v", "error", "-progress", "pipe:1", "-nostats", "-i", _file_url(path),
                  "-map", f"0:{stream}", "-f", "null", "-"], path, stdout=True) as run:
        progress = run.process.stdout.read().decode("ascii", "replace")
        status, lines = run.finish()
    if status != 0 or lines:
        raise fail(f"it cannot be decoded completely ({_failure_reason(status, lines)})")
    counts = re.findall(r"^frame=(\d+)\s*$", progress, re.MULTILINE)
    decoded = int(counts[-1]) if counts else 0
    if decoded != frames:
        raise fail(f"it decodes to {decoded} frames, expected {frames}")


def write_video(
    path: str | os.PathLike,
    frames_uint8: np.ndarray,
    fps: float = MODEL_FPS,
    quality: float = 8.0,
) -> str:
    """Write frames to an H.264 mp4 atomically, verified before it is published.

    The video is encoded and verified (`encode_video`) in a hidden temporary file in the
    destination folder and moved over `path` only then (`wanx.outputs.OutputSet`), so readers
    never see a partial file; on any failure, Ctrl-C included, the temporary file is removed
    and an existing file at `path` is untouched.

    Args:
        path: destination; its folder must exist and be writable.
        frames_uint8: uint8 [F, H, W, 3] RGB, H and W even (yuv420p needs it).
        fps: frame rate written into the file.
        quality: imageio's scale from 1 to 10 (10 is best).

    Returns:
        The destination path as a string.

    Raises:
        VideoError: as `encode_video`, naming `path` (not the temporary file), or a
            destination that cannot be written.
    """
    path = os.fspath(path)
    frames = _check_frames(path, frames_uint8)
    _check_encoding(path, fps, quality)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise _cannot_write(path, f"its folder does not exist or is not a folder: {folder!r}")
    if os.path.isdir(path):
        raise _cannot_write(path, "the output path is a directory")

    try:
        with OutputSet([path]) as staged:  # the temporary file, its removal and the rename: one mechanism
            try:
                encode_video(staged.stage(path), frames, fps, quality)
            except VideoError as exc:
                raise VideoError(f"could not write video {path!r}: {exc.reason}", exc.reason) from exc
            staged.publish()
    except OutputError as exc:
        raise _cannot_write(path, _first_line(exc)) from exc
    except OSError as exc:  # the temporary file could not be made
        raise _cannot_write(path, f"its folder is not writable: {folder!r} ({_first_line(exc)})") from exc
    logger.info("wrote %d frames (%dx%d) at %.3g fps to %s", frames.shape[0],
                frames.shape[2], frames.shape[1], fps, path)
    return path
