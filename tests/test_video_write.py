"""Writing videos (wanx.video): the encoder's failures are errors, and a file is verified before it is published.

The failing writes run in a child Python process, so that a file-size limit or a private
mount namespace with a tiny tmpfs touches nothing else.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from wanx import video as wv
from wanx.video import VideoError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Writes noise (which H.264 cannot compress) with write_video or encode_video under a limit set by
# the caller, and prints what happened and what the folder holds afterwards as one JSON line.
CHILD = textwrap.dedent("""
    import json, os, resource, signal, sys
    sys.path.insert(0, {repo!r})
    import numpy as np
    from wanx import video as wv

    folder, how, fsize, block = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "block"
    if fsize:
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    if block:  # a blocked SIGXFSZ is inherited by ffmpeg, whose write() then fails with EFBIG
        signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGXFSZ}})
    frames = np.random.default_rng(0).integers(0, 256, (24, 128, 128, 3), dtype=np.uint8)
    target = os.path.join(folder, "out.mp4")
    try:
        (wv.write_video if how == "write" else wv.encode_video)(target, frames)
        error = None
    except wv.VideoError as exc:
        error = str(exc)
    print(json.dumps({{"error": error, "left": sorted(os.listdir(folder))}}))
""").format(repo=REPO)


def run_child(tmp_path, folder, how="write", fsize=0, block=False, wrapper=()):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.run([*wrapper, sys.executable, str(script), str(folder), how, str(fsize),
                           "block" if block else "default"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def pattern(n, height=48, width=64):
    """n frames of a moving gradient (cheap to encode, easy to compare)."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([np.stack([(x * 4 + i * 9) % 256, (y * 5) % 256, np.full_like(x, 90)], -1)
                     for i in range(n)]).astype(np.uint8)


@pytest.mark.parametrize("block", [False, True], ids=["ffmpeg-killed-by-SIGXFSZ", "ffmpeg-sees-EFBIG"])
def test_file_size_limit_fails_write_video_and_leaves_nothing(tmp_path, block):
    folder = tmp_path / "out"
    folder.mkdir()
    result = run_child(tmp_path, folder, fsize=20_000, block=block)
    assert result["error"] is not None, "a write cut short by RLIMIT_FSIZE was reported as success"
    message = result["error"]
    assert "\n" not in message and os.path.join(str(folder), "out.mp4") in message
    assert "file size limit exceeded" in message
    assert result["left"] == [] and os.listdir(folder) == []


def test_file_size_limit_fails_encode_video_naming_its_path(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    result = run_child(tmp_path, folder, how="encode", fsize=20_000)
    assert result["error"] is not None
    assert repr(os.path.join(str(folder), "out.mp4")) in result["error"]
    assert "file size limit exceeded" in result["error"]
    assert result["left"] == ["out.mp4"]  # encode_video leaves its (temporary) path to the caller


def _can_mount_tmpfs(tmp_path):
    if shutil.which("unshare") is None:
        return False
    probe = tmp_path / "probe"
    probe.mkdir()
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           f"mount -t tmpfs -o size=64k none '{probe}'"], capture_output=True)
    probe.rmdir()
    return proc.returncode == 0


def test_disk_full_fails_write_video_and_leaves_nothing(tmp_path):
    """A 256 KiB tmpfs in a private mount namespace (needs root or user namespaces)."""
    if not _can_mount_tmpfs(tmp_path):
        pytest.skip("cannot mount a tmpfs in a private mount namespace here (the RLIMIT_FSIZE tests cover the path)")
    folder = tmp_path / "small"
    folder.mkdir()
    wrapper = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               f"mount -t tmpfs -o size=256k none '{folder}' && exec \"$@\"", "sh"]
    result = run_child(tmp_path, folder, wrapper=wrapper)
    assert result["error"] is not None, "a write to a full disk was reported as success"
    assert "\n" not in result["error"] and "no space left on device" in result["error"]
    assert repr(os.path.join(str(folder), "out.mp4")) in result["error"]
    assert result["left"] == []


def test_encode_video_writes_a_file_that_verifies(tmp_path):
    frames = pattern(9)
    path = tmp_path / "exact.name"  # no mp4 suffix: the caller's temporary name is used as it is
    assert wv.encode_video(path, frames, fps=16) is None
    assert os.listdir(tmp_path) == ["exact.name"]
    wv.verify_video(path, 9, 48, 64)
    got, fps = wv.read_video(path)
    assert got.shape == frames.shape and fps == 16
    assert np.abs(got.astype(int) - frames.astype(int)).mean() < 6


def _assert_refused(path, *args, match):
    with pytest.raises(VideoError, match=match) as err:
        wv.verify_video(path, *args)
    message = str(err.value)
    assert "\n" not in message and repr(os.fspath(path)) in message


def test_verify_video_refuses_wrong_counts_sizes_and_truncated_copies(tmp_path):
    path = tmp_path / "good.mp4"
    wv.write_video(path, pattern(9), fps=16)
    wv.verify_video(path, 9, 48, 64)
    _assert_refused(path, 10, 48, 64, match="9 frames, expected 10")
    _assert_refused(path, 9, 64, 48, match="64x48, expected 48x64")
    data = path.read_bytes()
    for name, keep in (("half.mp4", len(data) // 2), ("tail_cut.mp4", len(data) - 40)):
        cut = tmp_path / name
        cut.write_bytes(data[:keep])
        _assert_refused(cut, 9, 48, 64, match="failed verification: .*(truncated|cannot be decoded)")
    _assert_refused(tmp_path / "missing.mp4", 9, 48, 64, match="not found")


def test_verify_video_refuses_a_cut_file_whose_index_comes_first(tmp_path):
    """With the index first (+faststart) the header survives the cut: the box sizes show it, and
    when they are patched to hide it, decoding still finds the data missing."""
    import imageio_ffmpeg

    whole = tmp_path / "faststart.mp4"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i",
                    "testsrc=size=64x48:rate=16:duration=3", "-c:v", "libx264", "-pix_fmt", "yuv420p",
                    "-movflags", "+faststart", str(whole)], check=True)
    wv.verify_video(whole, 48, 48, 64)
    data = bytearray(whole.read_bytes()[: int(whole.stat().st_size * 0.6)])
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data)
    _assert_refused(cut, 48, 48, 64, match="'mdat' box ends .* past the end of the file")
    mdat = data.index(b"mdat") - 4
    data[mdat:mdat + 4] = (len(data) - mdat).to_bytes(4, "big")
    cut.write_bytes(data)
    _assert_refused(cut, 48, 48, 64, match="cannot be decoded completely .*partial file")


def test_verify_video_validates_its_arguments(tmp_path):
    path = tmp_path / "good.mp4"
    wv.write_video(path, pattern(1), fps=16)
    for bad in ((0, 48, 64), (1, 0, 64), (1, 48, -1), (1.5, 48, 64)):
        _assert_refused(path, *bad, match="positive integers")


def test_interrupt_during_verification_removes_the_temporary_file(tmp_path, monkeypatch):
    destination = tmp_path / "out.mp4"
    destination.write_bytes(b"previous result")
    calls = []

    def interrupted(path, *args):
        calls.append(os.path.basename(path))
        raise KeyboardInterrupt

    monkeypatch.setattr(wv, "verify_video", interrupted)
    with pytest.raises(KeyboardInterrupt):
        wv.write_video(destination, pattern(3))
    assert calls and calls[0].startswith(".out.mp4.")  # the hidden temporary file was being verified
    assert os.listdir(tmp_path) == ["out.mp4"] and destination.read_bytes() == b"previous result"


def test_a_file_that_fails_verification_is_not_published(tmp_path, monkeypatch):
    """An encoder that exits 0 after dropping a frame (a wrapper around the real ffmpeg) is caught."""
    import imageio_ffmpeg

    real = imageio_ffmpeg.get_ffmpeg_exe()
    wrapper = tmp_path / "bin" / "ffmpeg"
    wrapper.parent.mkdir()
    wrapper.write_text(f"#!{sys.executable}\n"
                       "import os, sys\n"
                       "args = sys.argv[1:]\n"
                       "if 'rawvideo' in args:  # encoding: keep all but the last frame\n"
                       "    args = args[:-1] + ['-frames:v', '2'] + args[-1:]\n"
                       f"os.execv({real!r}, [{real!r}] + args)\n")
    wrapper.chmod(0o755)
    monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", lambda: str(wrapper))
    destination = tmp_path / "out.mp4"
    with pytest.raises(VideoError, match="verification: it decodes to 2 frames, expected 3|stopped reading") as err:
        wv.write_video(destination, pattern(3))
    assert "\n" not in str(err.value) and repr(str(destination)) in str(err.value)
    assert sorted(os.listdir(tmp_path)) == ["bin"]


@pytest.mark.parametrize("call", ["write_video", "encode_video"])
def test_argument_errors_are_one_line_and_name_the_path(tmp_path, call):
    path = tmp_path / "out.mp4"
    for frames, kwargs, match in ((np.zeros((1, 9, 8, 3), np.uint8), {}, "even"),
                                  (np.zeros((1, 8, 8, 3), np.float32), {}, "uint8"),
                                  (np.zeros((1, 8, 8), np.uint8), {}, r"\[F, H, W, 3\]"),
                                  (pattern(1), {"fps": 0}, "fps"),
                                  (pattern(1), {"quality": 11}, "quality")):
        with pytest.raises(VideoError, match=match) as err:
            getattr(wv, call)(path, frames, **kwargs)
        assert "\n" not in str(err.value) and repr(str(path)) in str(err.value)
    assert os.listdir(tmp_path) == []
