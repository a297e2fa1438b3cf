"""Video input/output and preprocessing for the editing pipeline (SPEC section 4, steps 1 and 5).

Reading and writing go through imageio's ffmpeg plugin (imageio-ffmpeg ships the ffmpeg
binary). Frames travel as uint8 numpy arrays [F, H, W, 3] (RGB) between disk and the
model code, and as float32 tensors [3, F, H, W] in [-1, 1] inside it.

The Wan VAE compresses time by 4 with a causal first frame, so it takes 4k+1 frames:
`fit_frame_count` gives the largest such count, and the frames past it are dropped
(never padded: padding would invent content the edit has to reproduce).
"""
from __future__ import annotations

import logging
import math
import os
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

# The 540p aspect buckets of SPEC section 4, as (height, width); each side is a multiple
# of 16 (VAE stride 8 times the DiT's spatial patch 2).
BUCKETS_540P: tuple[tuple[int, int], ...] = (
    (960, 544),  # 9:16 portrait
    (720, 720),  # 1:1
    (544, 960),  # 16:9 landscape
    (960, 480),  # 1:2 portrait
    (480, 960),  # 2:1 landscape
)

MODEL_FPS = 16


class VideoError(ValueError):
    """A video that cannot be read or written; the message is one line and names the path."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _open_failure(path: str, exc: BaseException) -> VideoError:
    """Turn imageio's multi-line ffmpeg report into a one-line reason."""
    text = str(exc)
    if "Stream #" in text and "Video:" not in text:
        reason = "it has no video stream, so no frames"
    elif "moov atom not found" in text or "Invalid data found" in text:
        reason = "ffmpeg found no valid video data: not a video, or a corrupt or truncated file"
    else:
        reason = _first_line(exc)
    return VideoError(f"cannot read video {path!r}: {reason}")


def _check_input_file(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise VideoError(f"video not found: {path!r}")
    if os.path.isdir(path):
        raise VideoError(f"expected a video file, got a directory: {path!r}")
    if os.path.getsize(path) == 0:
        raise VideoError(f"video file is empty (0 bytes): {path!r}")
    return path


def read_video(
    path: str | os.PathLike,
    max_frames: int | None = None,
    target_fps: float | None = None,
) -> tuple[np.ndarray, float]:
    """Decode a video file into RGB frames.

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
            decode (not a video, corrupt or truncated), or a video with no frames.
    """
    import imageio.v2 as iio

    path = _check_input_file(path)
    if max_frames is not None and max_frames < 1:
        raise VideoError(f"max_frames must be a positive integer or None, got {max_frames!r}")
    if target_fps is not None and not target_fps > 0:
        raise VideoError(f"target_fps must be a positive number or None, got {target_fps!r}")

    try:
        reader = iio.get_reader(path, format="FFMPEG")
    except Exception as exc:  # imageio raises OSError, RuntimeError or IndexError here
        raise _open_failure(path, exc) from exc

    frames: list[np.ndarray] = []
    decoded = 0  # source frames decoded
    capped = False  # stopped early because max_frames was reached
    try:
        meta = reader.get_meta_data()
        src_fps = float(meta.get("fps") or 0.0)
        if not src_fps > 0:
            raise VideoError(f"cannot read video {path!r}: it reports no frame rate")
        out_fps = float(target_fps) if target_fps is not None else src_fps
        next_out = 0  # index of the next output frame to fill
        for i, frame in enumerate(reader):
            decoded = i + 1
            if target_fps is None:
                take = 1
            else:
                # Output frame k shows source frame floor(k * src_fps / target_fps).
                last_out = math.floor((i + 1) * out_fps / src_fps - 1e-9)
                take = max(0, last_out - next_out + 1)
            for _ in range(take):
                if max_frames is not None and len(frames) >= max_frames:
                    break
                frames.append(np.asarray(frame, dtype=np.uint8)[..., :3])
                next_out += 1
            if max_frames is not None and len(frames) >= max_frames:
                capped = True
                break
    except VideoError:
        raise
    except Exception as exc:
        raise VideoError(f"cannot read video {path!r}: corrupt or truncated ({_first_line(exc)})") from exc
    finally:
        reader.close()

    if not frames:
        raise VideoError(f"cannot read video {path!r}: it has no frames")
    # A file cut short after its header (moov atom first) decodes without an error but
    # yields fewer frames than its header announces. Allow 10% (audio may outlast video).
    announced = round(float(meta.get("duration") or 0.0) * src_fps)
    if not capped and decoded < 0.9 * announced - 1:
        raise VideoError(f"cannot read video {path!r}: truncated (decoded {decoded} of the "
                         f"{announced} frames its header announces)")
    logger.info("read %d frames (%dx%d) at %.3g fps from %s", len(frames),
                frames[0].shape[1], frames[0].shape[0], out_fps, path)
    return np.stack(frames), out_fps


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
    _, h, w, _ = frames.shape
    scale = max(out_h / h, out_w / w)
    new_h, new_w = max(out_h, round(h * scale)), max(out_w, round(w * scale))
    top, left = (new_h - out_h) // 2, (new_w - out_w) // 2

    pieces = []
    for start in range(0, frames.shape[0], chunk):
        x = torch.from_numpy(frames[start:start + chunk]).permute(0, 3, 1, 2).float()  # [f, 3, h, w]
        if (new_h, new_w) != (h, w):
            x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
        x = x[:, :, top:top + out_h, left:left + out_w]
        pieces.append((x / 127.5 - 1.0).clamp_(-1.0, 1.0))  # bicubic overshoots past [0, 255]
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


def _current_umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_video(
    path: str | os.PathLike,
    frames_uint8: np.ndarray,
    fps: float = MODEL_FPS,
    quality: float = 8.0,
) -> str:
    """Write frames to an H.264 mp4 atomically.

    The video is encoded into a hidden temporary file in the destination folder and
    moved over `path` with os.replace only once complete, so readers never see a partial
    file and a failure leaves nothing behind (an existing file at `path` is untouched).

    Args:
        path: destination; its folder must exist and be writable.
        frames_uint8: uint8 [F, H, W, 3] RGB, H and W even (yuv420p needs it).
        fps: frame rate written into the file.
        quality: imageio's 0-10 scale (10 is best).

    Returns:
        The destination path as a string.
    """
    import imageio.v2 as iio

    path = os.fspath(path)
    frames = np.asarray(frames_uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise VideoError(f"frames_uint8 must be an array [F, H, W, 3] with F >= 1, got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise VideoError(f"frames_uint8 must be uint8, got {frames.dtype}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise VideoError(f"frame height and width must be even for H.264 yuv420p, got {frames.shape[1]}x{frames.shape[2]}")
    if not fps > 0:
        raise VideoError(f"fps must be positive, got {fps!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise VideoError(f"output folder does not exist or is not a folder: {folder!r}")
    if os.path.isdir(path):
        raise VideoError(f"output path is a directory: {path!r}")

    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp.mp4")
    except OSError as exc:
        raise VideoError(f"output folder is not writable: {folder!r} ({_first_line(exc)})") from exc
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes it private (0600); a video is not
        writer = iio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264",
                                quality=quality, pixelformat="yuv420p", macro_block_size=1,
                                ffmpeg_log_level="error")
        try:
            for frame in frames:
                writer.append_data(frame)
        finally:
            writer.close()
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(exc, Exception) and not isinstance(exc, VideoError):
            raise VideoError(f"could not write video {path!r}: {_first_line(exc)}") from exc
        raise
    logger.info("wrote %d frames (%dx%d) at %.3g fps to %s", frames.shape[0],
                frames.shape[2], frames.shape[1], fps, path)
    return path
