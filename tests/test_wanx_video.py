"""Video I/O and preprocessing (wanx.video): round trips, buckets, frame rule, bad input."""
import logging
import os
import subprocess

import numpy as np
import pytest
import torch

from wanx import video as wv
from wanx.video import VideoError


def gray_levels(n, height=32, width=48, step=15):
    """n flat frames, frame i at gray level i * step (easy to recognise after H.264)."""
    levels = (np.arange(n) * step).astype(np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (n, height, width, 3)).copy()


def frame_levels(frames):
    return frames.reshape(frames.shape[0], -1).mean(axis=1)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A 16-frame 32x48 clip at 32 fps with a smooth pattern, and its source frames."""
    y, x = np.mgrid[0:32, 0:48]
    frames = np.stack([np.stack([(x * 5 + i * 8) % 256, (y * 7) % 256, np.full_like(x, 128)], -1)
                       for i in range(16)]).astype(np.uint8)
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    wv.write_video(path, frames, fps=32)
    return path, frames


def test_round_trip_keeps_frames_fps_and_size(tmp_path):
    frames = gray_levels(9)
    path = tmp_path / "out.mp4"
    assert wv.write_video(path, frames, fps=16) == str(path)
    got, fps = wv.read_video(path)
    assert got.dtype == np.uint8 and got.shape == (9, 32, 48, 3)
    assert fps == 16
    np.testing.assert_allclose(frame_levels(got), frame_levels(frames), atol=3)
    assert os.listdir(tmp_path) == ["out.mp4"]  # no temporary file left behind


def test_read_pattern_survives_h264(clip):
    path, frames = clip
    got, fps = wv.read_video(path)
    assert got.shape == frames.shape and fps == 32
    assert np.abs(got.astype(int) - frames.astype(int)).mean() < 6


def test_fps_resampling_and_frame_cap(tmp_path):
    path = tmp_path / "levels.mp4"
    wv.write_video(path, gray_levels(16), fps=32)

    half, fps = wv.read_video(path, target_fps=16)  # every second frame: 0, 2, 4, ...
    assert fps == 16 and half.shape[0] == 8
    np.testing.assert_allclose(frame_levels(half), np.arange(0, 16, 2) * 15, atol=3)

    double, fps = wv.read_video(path, target_fps=64)  # each frame shown twice
    assert fps == 64 and double.shape[0] == 32
    np.testing.assert_allclose(frame_levels(double), np.repeat(np.arange(16), 2) * 15, atol=3)

    capped, fps = wv.read_video(path, target_fps=16, max_frames=5)
    assert fps == 16 and capped.shape[0] == 5
    np.testing.assert_allclose(frame_levels(capped), np.arange(0, 10, 2) * 15, atol=3)

    with pytest.raises(VideoError, match="max_frames"):
        wv.read_video(path, max_frames=0)
    with pytest.raises(VideoError, match="target_fps"):
        wv.read_video(path, target_fps=-1)


@pytest.mark.parametrize("height, width, bucket", [
    (1080, 1920, (544, 960)),   # 16:9
    (720, 1280, (544, 960)),
    (1920, 1080, (960, 544)),   # 9:16
    (500, 500, (720, 720)),     # 1:1
    (480, 1000, (480, 960)),    # about 2:1
    (1000, 480, (960, 480)),    # about 1:2
    (400, 1600, (480, 960)),    # 4:1, beyond the widest bucket
    (1000, 1100, (720, 720)),   # nearly square
])
def test_choose_bucket(height, width, bucket):
    assert wv.choose_bucket(height, width) == bucket


def test_buckets_fit_the_model_strides():
    for h, w in wv.BUCKETS_540P:
        assert h % 16 == 0 and w % 16 == 0
        assert wv.choose_bucket(h, w) == (h, w)
    with pytest.raises(ValueError, match="positive"):
        wv.choose_bucket(0, 10)


@pytest.mark.parametrize("n, kept", [(1, 1), (4, 1), (5, 5), (8, 5), (9, 9), (81, 81), (100, 97)])
def test_fit_frame_count(n, kept):
    assert wv.fit_frame_count(n) == kept
    assert (kept - 1) % 4 == 0 and kept <= n < kept + 4


def test_fit_frame_count_logs_the_drop_and_rejects_nonsense(caplog):
    with caplog.at_level(logging.INFO, logger="wanx.video"):
        wv.fit_frame_count(84)
    assert "81 of 84" in caplog.text and "dropped" in caplog.text
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            wv.fit_frame_count(bad)


def test_preprocess_resizes_covers_and_centre_crops():
    # 2:1 frame: red, green, blue vertical bands of widths 20, 40, 20. Scaled by 0.5 to
    # 20x40, the centre 20x20 crop is the green band.
    frame = np.zeros((1, 40, 80, 3), np.uint8)
    frame[:, :, :20, 0] = 255
    frame[:, :, 20:60, 1] = 255
    frame[:, :, 60:, 2] = 255
    out = wv.preprocess_frames(frame, size=(20, 20))
    assert out.shape == (3, 1, 20, 20) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    inner = out[:, 0, :, 2:-2]
    torch.testing.assert_close(inner[1], torch.ones_like(inner[1]), atol=0.02, rtol=0)
    torch.testing.assert_close(inner[0], -torch.ones_like(inner[0]), atol=0.02, rtol=0)

    portrait = wv.preprocess_frames(np.zeros((3, 100, 60, 3), np.uint8), size=(96, 48))
    assert portrait.shape == (3, 3, 96, 48)
    torch.testing.assert_close(portrait, -torch.ones_like(portrait))


def test_value_mapping_is_exact_without_resize():
    frames = np.random.default_rng(0).integers(0, 256, (5, 8, 12, 3), dtype=np.uint8)
    video = wv.preprocess_frames(frames, size=(8, 12))
    assert video.shape == (3, 5, 8, 12)
    assert np.array_equal(wv.frames_to_uint8(video), frames)
    assert np.array_equal(wv.frames_to_uint8(torch.full((3, 1, 2, 2), 7.0))[..., 0], np.full((1, 2, 2), 255))


def test_preprocess_and_frames_to_uint8_validate_input():
    with pytest.raises(ValueError, match=r"\[F, H, W, 3\]"):
        wv.preprocess_frames(np.zeros((4, 4, 3), np.uint8), size=(4, 4))
    with pytest.raises(ValueError, match="uint8"):
        wv.preprocess_frames(np.zeros((1, 4, 4, 3), np.float32), size=(4, 4))
    with pytest.raises(ValueError, match=r"\[3, F, H, W\]"):
        wv.frames_to_uint8(torch.zeros(1, 3, 4, 4))


# Bad input: each case gives a one-line VideoError naming the file and the reason.

def _assert_one_line(err, path):
    message = str(err.value)
    assert "\n" not in message and os.fspath(path) in message
    return message


def test_missing_path(tmp_path):
    with pytest.raises(VideoError, match="not found") as err:
        wv.read_video(tmp_path / "nope.mp4")
    _assert_one_line(err, tmp_path / "nope.mp4")


def test_directory(tmp_path):
    with pytest.raises(VideoError, match="directory") as err:
        wv.read_video(tmp_path)
    _assert_one_line(err, tmp_path)


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.mp4"
    path.touch()
    with pytest.raises(VideoError, match="empty") as err:
        wv.read_video(path)
    _assert_one_line(err, path)


def test_text_file_named_mp4(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("this is not a video\n" * 20)
    with pytest.raises(VideoError, match="not a video") as err:
        wv.read_video(path)
    _assert_one_line(err, path)


def test_video_without_frames(tmp_path):
    import imageio_ffmpeg

    path = tmp_path / "audio_only.mp4"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi",
                    "-i", "anullsrc=r=8000:cl=mono", "-t", "0.2", "-c:a", "aac", str(path)], check=True)
    with pytest.raises(VideoError, match="no video stream, so no frames") as err:
        wv.read_video(path)
    _assert_one_line(err, path)


def test_truncated_and_corrupt_files(tmp_path, clip):
    data = clip[0].read_bytes()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: len(data) // 2])  # index (moov) at the end: lost
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(data[:64] + np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    for path in (truncated, corrupt):
        with pytest.raises(VideoError, match="corrupt or truncated") as err:
            wv.read_video(path)
        _assert_one_line(err, path)


def test_truncated_after_a_leading_index(tmp_path):
    """With the index first (+faststart) ffmpeg decodes a cut file quietly; we still refuse it."""
    import imageio.v2 as iio

    frames = np.random.default_rng(0).integers(0, 256, (40, 64, 64, 3), dtype=np.uint8)
    whole = tmp_path / "faststart.mp4"
    writer = iio.get_writer(whole, format="FFMPEG", fps=16, codec="libx264", macro_block_size=1,
                            output_params=["-movflags", "+faststart"], ffmpeg_log_level="error")
    for frame in frames:
        writer.append_data(frame)
    writer.close()
    assert wv.read_video(whole)[0].shape[0] == 40
    cut = tmp_path / "cut.mp4"
    data = whole.read_bytes()
    cut.write_bytes(data[: int(len(data) * 0.6)])
    with pytest.raises(VideoError, match="truncated") as err:
        wv.read_video(cut)
    _assert_one_line(err, cut)
    assert wv.read_video(cut, max_frames=10)[0].shape[0] == 10  # the intact head is still usable


def test_unwritable_output_folder(tmp_path):
    frames = gray_levels(1, 8, 8)
    with pytest.raises(VideoError, match="does not exist"):
        wv.write_video(tmp_path / "missing" / "out.mp4", frames)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(VideoError, match="not a folder"):
        wv.write_video(a_file / "out.mp4", frames)
    with pytest.raises(VideoError, match="not writable"):
        wv.write_video("/proc/out.mp4", frames)  # no one, root included, creates files there
    if os.geteuid() != 0:  # root ignores permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(VideoError, match="not writable"):
            wv.write_video(locked / "out.mp4", frames)
    assert sorted(os.listdir(tmp_path)) == ["file.txt"] + (["locked"] if os.geteuid() != 0 else [])


def test_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path, monkeypatch):
    """An encoder that reads two frames, reports an error and exits 1 (a stand-in for ffmpeg)."""
    import imageio_ffmpeg

    fake = tmp_path / "bin" / "ffmpeg"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nhead -c 1536 >/dev/null\necho 'Error writing frame: disk full' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", lambda: str(fake))
    destination = tmp_path / "out.mp4"
    destination.write_bytes(b"previous result")
    with pytest.raises(VideoError, match="disk full") as err:
        wv.write_video(destination, gray_levels(5, 16, 16))
    _assert_one_line(err, destination)
    assert sorted(os.listdir(tmp_path)) == ["bin", "out.mp4"]
    assert destination.read_bytes() == b"previous result"


def test_write_validates_frames(tmp_path):
    with pytest.raises(VideoError, match="even"):
        wv.write_video(tmp_path / "odd.mp4", np.zeros((1, 9, 8, 3), np.uint8))
    with pytest.raises(VideoError, match="uint8"):
        wv.write_video(tmp_path / "float.mp4", np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(VideoError, match=r"\[F, H, W, 3\]"):
        wv.write_video(tmp_path / "gray.mp4", np.zeros((1, 8, 8), np.uint8))
    assert os.listdir(tmp_path) == []


def test_written_file_follows_the_umask_not_the_private_temporary_mode(tmp_path):
    old_mask = os.umask(0o022)
    try:
        path = wv.write_video(tmp_path / "out.mp4", np.zeros((5, 16, 16, 3), np.uint8))
    finally:
        os.umask(old_mask)
    assert os.stat(path).st_mode & 0o777 == 0o644
