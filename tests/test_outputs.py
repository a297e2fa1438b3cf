"""wanx.outputs: no output may reach the input, replace a non-file, or be published incomplete."""
import os
import signal

import pytest

from wanx import outputs
from wanx.outputs import OutputError, OutputSet, check_output_paths


@pytest.fixture
def video(tmp_path):
    path = tmp_path / "in" / "clip.mp4"
    path.parent.mkdir()
    path.write_bytes(b"the user's input")
    return path


def no_link(*args, **kwargs):
    """os.link on a file system without hard links."""
    raise OSError(1, "Operation not permitted")


def fail_replace(monkeypatch, fails, error: OSError) -> None:
    """Make `outputs`' os.replace raise `error` for the (src, dst) pairs `fails` accepts."""
    real_replace = os.replace

    def replace(src, dst):
        if fails(os.fspath(src), os.fspath(dst)):
            raise error
        return real_replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", replace)


def publish_new(*paths) -> None:
    """Stage b"new" for every path, then publish them as one OutputSet."""
    with OutputSet([str(path) for path in paths]) as staged:
        for path in paths:
            open(staged.stage(str(path)), "wb").write(b"new")
        staged.publish()


def refusal(paths, input_path, overwrite=False) -> str:
    with pytest.raises(OutputError) as info:
        check_output_paths([str(p) for p in paths], str(input_path), overwrite)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_the_input_itself(video):
    assert "is the input video" in refusal([video], video, overwrite=True)


def test_a_symbolic_link_to_the_input(video, tmp_path):
    link = tmp_path / "link.mp4"
    link.symlink_to(video)
    assert "is the input video" in refusal([link], video, overwrite=True)


def test_a_folder_link_to_the_inputs_folder(video, tmp_path):
    (tmp_path / "out").symlink_to(video.parent)
    assert "is the input video" in refusal([tmp_path / "out" / "clip.mp4"], video, overwrite=True)


def test_a_dotted_path_to_the_input(video):
    dotted = video.parent / ".." / "in" / "clip.mp4"
    assert "is the input video" in refusal([dotted], video, overwrite=True)


def test_a_hard_link_to_the_input(video, tmp_path):
    twin = tmp_path / "twin.mp4"
    os.link(video, twin)
    assert "is the input video" in refusal([twin], video, overwrite=True)


def test_a_derived_output_that_is_the_input(video):
    """--input x_compare.mp4 --output x.mp4 --compare: the comparison video would be the input."""
    compare_input = video.parent / "clip_compare.mp4"
    compare_input.write_bytes(b"input")
    assert "is the input video" in refusal([video.parent / "clip.mp4", compare_input], compare_input,
                                            overwrite=True)


def test_two_outputs_that_are_one_file(video, tmp_path):
    assert "are the same file" in refusal([tmp_path / "a.mp4", tmp_path / "." / "a.mp4"], video)


@pytest.mark.parametrize("make, kind", [
    (lambda p: os.mkfifo(p), "a FIFO"),
    (lambda p: os.mkdir(p), "a folder"),
])
def test_an_existing_non_file_is_never_replaced(make, kind, video, tmp_path):
    target = tmp_path / "out.mp4"
    make(target)
    assert f"is {kind}" in refusal([target], video, overwrite=True)


def test_a_device_is_never_replaced(video):
    assert "is a character device" in refusal(["/dev/null"], video, overwrite=True)


def test_a_link_to_a_device_is_never_replaced(video, tmp_path):
    link = tmp_path / "out.mp4"
    link.symlink_to("/dev/null")
    assert "is a character device" in refusal([link], video, overwrite=True)


def test_an_existing_file_needs_overwrite(video, tmp_path):
    (tmp_path / "out.mp4").write_bytes(b"old")
    assert "pass --overwrite" in refusal([tmp_path / "out.mp4"], video)
    check_output_paths([str(tmp_path / "out.mp4")], str(video), overwrite=True)


def test_a_trailing_separator(video, tmp_path):
    assert "ends with a separator" in refusal([str(tmp_path / "out") + "/"], video)


def test_a_name_too_long_once_the_temporary_suffix_is_added(video, tmp_path):
    name_max = os.pathconf(tmp_path, "PC_NAME_MAX")
    too_long = tmp_path / ("x" * (name_max - 8) + ".mp4")  # fits alone, not with the temporary affixes
    assert "too long" in refusal([too_long], video)


def test_a_folder_below_a_file(video, tmp_path):
    (tmp_path / "file").write_bytes(b"")
    assert "is not a folder" in refusal([tmp_path / "file" / "sub" / "out.mp4"], video)
    assert "is not a folder" in refusal([tmp_path / "file" / "out.mp4"], video)


def test_a_folder_that_cannot_be_written(video):
    assert "not writable" in refusal(["/sys/out.mp4"], video)


def test_a_folder_still_to_be_created_is_fine_and_not_created(video, tmp_path):
    check_output_paths([str(tmp_path / "new" / "deeper" / "out.mp4")], str(video), overwrite=False)
    assert not (tmp_path / "new").exists()
    assert sorted(os.listdir(tmp_path)) == ["in"]  # the probe file is gone


def test_publish_moves_every_staged_file_and_leaves_no_temporary(tmp_path):
    a, b = str(tmp_path / "a.mp4"), str(tmp_path / "b.mp4")
    with OutputSet([a, b]) as staged:
        for path in (a, b):
            with open(staged.stage(path), "wb") as handle:
                handle.write(path.encode())
        staged.publish()
    assert sorted(os.listdir(tmp_path)) == ["a.mp4", "b.mp4"]
    assert open(a, "rb").read() == a.encode() and staged.published


def test_an_error_before_publishing_removes_the_temporaries_and_keeps_old_files(tmp_path):
    a, b = tmp_path / "a.mp4", tmp_path / "b.mp4"
    a.write_bytes(b"old a")
    with pytest.raises(RuntimeError):
        with OutputSet([str(a), str(b)]) as staged:
            open(staged.stage(str(a)), "wb").write(b"new a")
            raise RuntimeError("the second encode failed")
    assert sorted(os.listdir(tmp_path)) == ["a.mp4"]
    assert a.read_bytes() == b"old a"


def test_a_failed_rename_restores_every_old_file(tmp_path, monkeypatch):
    a, b = tmp_path / "a.mp4", tmp_path / "b.mp4"
    a.write_bytes(b"old a")
    b.write_bytes(b"old b")
    fail_replace(monkeypatch, lambda src, dst: dst == str(b) and ".partial" in src,
                 OSError(28, "No space left on device", str(b)))
    with pytest.raises(OutputError, match="no output was changed"):
        publish_new(a, b)
    assert a.read_bytes() == b"old a" and b.read_bytes() == b"old b"
    assert sorted(os.listdir(tmp_path)) == ["a.mp4", "b.mp4"]


def test_old_files_survive_without_hard_links(tmp_path, monkeypatch):
    """On a file system without hard links the old file is moved aside, and moved back on failure."""
    a, b = tmp_path / "a.mp4", tmp_path / "b.mp4"
    a.write_bytes(b"old a")
    monkeypatch.setattr(outputs.os, "link", no_link)
    fail_replace(monkeypatch, lambda src, dst: dst == str(b), OSError(5, "Input/output error", str(b)))
    with pytest.raises(OutputError):
        publish_new(a, b)
    assert a.read_bytes() == b"old a"
    assert sorted(os.listdir(tmp_path)) == ["a.mp4"]


def test_signals_wait_until_the_renames_are_done(tmp_path):
    """A SIGTERM arriving during publish is delivered after it: all new files are in place."""
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        a, b = str(tmp_path / "a.mp4"), str(tmp_path / "b.mp4")
        with OutputSet([a, b]) as staged:
            for path in (a, b):
                open(staged.stage(path), "wb").write(b"new")
            real_replace = os.replace

            def replace_and_signal(src, dst):
                real_replace(src, dst)
                if dst == a:
                    os.kill(os.getpid(), signal.SIGTERM)
                    assert received == []  # held back while the set is half published

            outputs.os.replace = replace_and_signal
            try:
                staged.publish()
            finally:
                outputs.os.replace = real_replace
        assert received == [signal.SIGTERM]
        assert sorted(os.listdir(tmp_path)) == ["a.mp4", "b.mp4"]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_stage_refuses_a_path_outside_the_set(tmp_path):
    with OutputSet([str(tmp_path / "a.mp4")]) as staged:
        with pytest.raises(ValueError, match="not one of"):
            staged.stage(str(tmp_path / "b.mp4"))


def test_an_output_may_not_be_another_input_file(video, tmp_path):
    config = tmp_path / "my.yaml"
    config.write_text("sampler: {steps: 2}\n")
    message = refusal_with_others([tmp_path / "my.yaml"], video, {str(config): "the config file"})
    assert "is the config file" in message


def refusal_with_others(paths, input_path, others) -> str:
    with pytest.raises(OutputError) as info:
        check_output_paths([str(p) for p in paths], str(input_path), True, others)
    return str(info.value)


def test_without_overwrite_a_file_that_appears_later_is_not_replaced(tmp_path):
    out = tmp_path / "out.mp4"
    with pytest.raises(OutputError, match="appeared after the output was checked"):
        with OutputSet([str(out)], overwrite=False) as staged:
            open(staged.stage(str(out)), "wb").write(b"new")
            out.write_bytes(b"someone else's file")  # between the check and the publish
            staged.publish()
    assert out.read_bytes() == b"someone else's file"
    assert os.listdir(tmp_path) == ["out.mp4"]


def test_folders_made_for_a_failed_set_are_removed(tmp_path):
    deep = tmp_path / "new" / "deeper" / "out.mp4"
    with pytest.raises(RuntimeError):
        with OutputSet([str(deep)]) as staged:
            staged.stage(str(deep))
            raise RuntimeError("the encoder failed")
    assert os.listdir(tmp_path) == []


def test_a_backup_that_cannot_be_put_back_is_kept_and_named(tmp_path, monkeypatch):
    a, b = tmp_path / "a.mp4", tmp_path / "b.mp4"
    a.write_bytes(b"old a")
    monkeypatch.setattr(outputs.os, "link", no_link)  # the old a.mp4 is moved aside, not linked
    fail_replace(monkeypatch, lambda src, dst: dst == str(b) or src.endswith(".old"),
                 OSError(5, "Input/output error", str(b)))
    with pytest.raises(OutputError, match="the old file is kept as"):
        publish_new(a, b)
    kept = [name for name in os.listdir(tmp_path) if name.endswith(".old")]
    assert len(kept) == 1 and (tmp_path / kept[0]).read_bytes() == b"old a"
