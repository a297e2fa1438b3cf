"""Reading videos (wanx.video): what ffmpeg decodes is accepted, limits are checked on the header alone,
and read_video_resized gives preprocess_frames(read_video(...)) bit for bit while keeping one native frame.

Fixtures are drawn by ffmpeg's lavfi sources (testsrc for video, sine for audio).
"""
import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from wanx import video as wv
from wanx.video import VideoError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ffmpeg(*args):
    import imageio_ffmpeg

    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-v", "error", *map(str, args)], check=True)


def make_clip(path, size="64x48", rate=16, duration=1.0, *extra):
    ffmpeg("-f", "lavfi", "-i", f"testsrc=size={size}:rate={rate}:duration={duration}", *extra,
           "-c:v", "libx264", "-pix_fmt", "yuv420p", path)
    return path


def assert_one_line(err, path):
    message = str(err.value)
    assert "\n" not in message and repr(os.fspath(path)) in message
    return message


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """2 s of testsrc at 25 fps, 96x64 (3:2): a rate that 16 fps does not divide."""
    return make_clip(tmp_path_factory.mktemp("read") / "clip.mp4", "96x64", 25, 2.0)


def test_audio_longer_than_video_is_read(tmp_path):
    path = tmp_path / "long_audio.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=16:duration=1", "-f", "lavfi", "-i",
           "sine=frequency=440:duration=3", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", path)
    info = wv.probe_video(path)
    assert (info.width, info.height, info.fps) == (64, 48, 16.0)
    assert info.duration == pytest.approx(3.0, abs=0.1)  # the container's duration counts the audio
    frames, fps = wv.read_video(path)
    assert frames.shape == (16, 48, 64, 3) and fps == 16
    video, fps, count = wv.read_video_resized(path, (32, 48))
    assert video.shape == (3, 16, 32, 48) and count == 16


def test_1000_fps_clip_is_read(tmp_path):
    path = make_clip(tmp_path / "fast.mp4", "64x48", 1000, 0.05)
    assert wv.probe_video(path).fps == 1000.0  # ffmpeg prints "1k fps"
    frames, fps = wv.read_video(path)
    assert frames.shape[0] == 50 and fps == 1000.0
    resampled, fps = wv.read_video(path, target_fps=200)  # every fifth frame
    assert resampled.shape[0] == 10 and fps == 200
    assert np.array_equal(resampled, frames[::5])


@pytest.mark.parametrize("rate, limit", [("1/2", "MIN_INPUT_FPS"), ("2000", "MAX_INPUT_FPS")])
def test_frame_rate_outside_the_limits_is_refused(tmp_path, rate, limit):
    path = tmp_path / "rate.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=16:duration=0.1", "-r", rate,
           "-c:v", "libx264", "-pix_fmt", "yuv420p", path)
    for call in (wv.probe_video, lambda p: wv.read_video_resized(p, (16, 16))):
        with pytest.raises(VideoError, match=limit) as err:
            call(path)
        assert_one_line(err, path)
    assert wv.read_video(path)[0].shape[0] >= 1  # read_video itself applies no limits


def test_limits_are_documented_constants():
    assert wv.MAX_INPUT_SIDE == 4096
    assert (wv.MIN_INPUT_FPS, wv.MAX_INPUT_FPS) == (1.0, 1000.0)


def test_over_limit_resolution_is_refused_before_any_decoding(tmp_path, monkeypatch):
    path = tmp_path / "huge.mp4"
    ffmpeg("-f", "lavfi", "-i", "color=c=gray:size=8192x8192:rate=1:duration=1", "-frames:v", "1",
           "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", path)
    assert path.stat().st_size < 1_000_000  # a small file of 192 MiB frames

    def no_decoding(*args, **kwargs):
        raise AssertionError("frames were decoded")

    monkeypatch.setattr(wv, "_iter_frames", no_decoding)
    for call in (wv.probe_video, lambda p: wv.read_video_resized(p, (544, 960), max_frames=81, target_fps=16)):
        with pytest.raises(VideoError, match="8192x8192.*MAX_INPUT_SIDE") as err:
            call(path)
        assert_one_line(err, path)


def test_probe_reports_the_header(clip):
    info = wv.probe_video(clip)
    assert (info.width, info.height, info.fps, info.codec) == (96, 64, 25.0, "h264")
    assert info.duration == pytest.approx(2.0, abs=0.05) and info.frame_estimate == 50
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.width = 1  # frozen


def test_probe_reports_the_displayed_size_of_a_rotated_clip(tmp_path, clip):
    import imageio_ffmpeg

    rotated = tmp_path / "rotated.mp4"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-display_rotation", "90", "-i", str(clip),
                    "-c", "copy", str(rotated)], check=True)
    info = wv.probe_video(rotated)
    assert (info.width, info.height) == (64, 96)  # ffmpeg turns the frames upright when decoding
    frames, _ = wv.read_video(rotated)
    assert frames.shape == (50, 96, 64, 3)


@pytest.mark.parametrize("bad, match", [("missing", "not found"), ("text", "not a video"),
                                        ("audio", "no video stream"), ("dir", "directory")])
def test_probe_refuses_what_is_not_a_video(tmp_path, bad, match):
    path = tmp_path / "input.mp4"
    if bad == "text":
        path.write_text("not a video\n" * 50)
    elif bad == "audio":
        ffmpeg("-f", "lavfi", "-i", "sine=duration=0.2", "-c:a", "aac", path)
    elif bad == "dir":
        path.mkdir()
    with pytest.raises(VideoError, match=match) as err:
        wv.probe_video(path)
    assert_one_line(err, path)


def test_read_video_decodes_like_imageio(clip):
    """The frames are the ones imageio's ffmpeg reader (used before) returns, bit for bit."""
    import imageio.v2 as iio

    reader = iio.get_reader(clip, format="FFMPEG")
    try:
        expected = np.stack([np.asarray(frame) for frame in reader])
    finally:
        reader.close()
    frames, fps = wv.read_video(clip)
    assert fps == 25.0 and np.array_equal(frames, expected)


@pytest.mark.parametrize("size, max_frames, target_fps", [
    *[(size, max_frames, target_fps) for size in ((32, 32), (64, 96), (96, 176))
      for max_frames, target_fps in ((None, None), (None, 16), (9, 16), (5, None), (70, 40))],
    ((544, 960), 9, 16),  # the 16:9 bucket, upscaled
])
def test_read_video_resized_equals_preprocess_of_read_video(clip, size, max_frames, target_fps):
    frames, fps = wv.read_video(clip, max_frames, target_fps)
    expected = wv.preprocess_frames(frames, size)
    video, got_fps, count = wv.read_video_resized(clip, size, max_frames, target_fps)
    assert got_fps == fps and count == frames.shape[0] == video.shape[1]
    assert video.dtype == torch.float32 and video.is_contiguous()
    assert torch.equal(video, expected)


def test_read_video_resized_validates_arguments(clip):
    for kwargs, match in (({"size": (0, 16)}, "size"), ({"size": (16, 16), "max_frames": 0}, "max_frames"),
                          ({"size": (16, 16), "target_fps": 0}, "target_fps")):
        with pytest.raises(VideoError, match=match) as err:
            wv.read_video_resized(clip, **kwargs)
        assert_one_line(err, clip)


def test_read_video_resized_keeps_one_native_frame(tmp_path):
    """Peak memory: 24 native 1440x1440 frames take 142 MiB; the resized ones 3 MiB.

    Measured in a child process as the growth of its peak resident set (ru_maxrss) across the
    call, after a warm-up call on a small clip has loaded everything once. Decoding everything
    first and resizing after (what the pipeline used to do) grows it by well over 300 MiB.
    """
    big = make_clip(tmp_path / "big.mp4", "1440x1440", 24, 1.0, "-preset", "ultrafast")
    small = make_clip(tmp_path / "small.mp4", "64x64", 24, 0.2)
    script = textwrap.dedent(f"""
        import json, resource, sys
        sys.path.insert(0, {REPO!r})
        from wanx import video as wv
        wv.read_video_resized({str(small)!r}, (180, 180))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        video, fps, count = wv.read_video_resized({str(big)!r}, (180, 180))
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"count": count, "growth_mib": (after - before) / 1024}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["count"] == 24
    assert result["growth_mib"] < 120, result
