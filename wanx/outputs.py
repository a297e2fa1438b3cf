"""The files a run writes: checked before anything loads, published together or not at all.

A user's files are never damaged:

- `check_output_paths` refuses, before any model loads, an output that resolves (through
  symbolic links, `..` or hard links) to the input or to another output, an existing output
  that is not a regular file (a folder, a FIFO, a device: refused even with `overwrite`), an
  existing file without `overwrite`, a path ending in a separator, a name too long for the
  file system once the temporary suffix is added, and a folder that cannot be created or
  written to (found by creating and removing a probe file, the only reliable test: root
  passes every permission check, a read-only mount fails them all).
- `OutputSet` stages every output as a hidden temporary file beside its destination, and
  `publish` renames all of them into place only when every one is complete. Existing files
  are kept as hard-linked backups until the last rename has succeeded and restored if one
  fails. Signals are held back during those few renames (still two moments: a reader in
  between may see the new edit beside the old comparison video). Leaving the `with` block by
  any path (an error, Ctrl-C, SIGTERM turned into an exception by the CLI) removes every
  temporary file, backup and folder it created.
"""
from __future__ import annotations

import errno
import os
import secrets
import signal
import stat
import tempfile
import threading
from contextlib import contextmanager
from typing import Iterator, Optional

TEMP_PREFIX = "."
TEMP_SUFFIX = ".partial.mp4"  # ffmpeg picks the container from the extension: keep .mp4 last
TEMP_RANDOM = 8  # characters tempfile adds
HELD_SIGNALS = tuple(s for s in (signal.SIGINT, getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None))
                     if s is not None)


class OutputError(ValueError):
    """An output that must not or cannot be written; the message is one line."""


def _temp_name_length(path: str) -> int:
    return len(os.fsencode(_temp_prefix(path) + TEMP_RANDOM * "x" + TEMP_SUFFIX))


def _temp_prefix(path: str) -> str:
    """`.<name>.`: a temporary file is `.<name>.<random>.partial.mp4` beside its destination."""
    return f"{TEMP_PREFIX}{os.path.basename(path)}."


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _existing_ancestor(folder: str) -> str:
    while not os.path.exists(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return folder


def _probe_folder(folder: str, name_length: int, label: str) -> None:
    """Create and remove a file named like the temporary output in `folder` (which exists)."""
    if not os.path.isdir(folder):
        raise OutputError(f"cannot write {label}: {folder!r} is not a folder")
    stem = "x" * max(1, name_length - len(TEMP_PREFIX) - TEMP_RANDOM - len(TEMP_SUFFIX) - 1)
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f"{TEMP_PREFIX}{stem}.", suffix=TEMP_SUFFIX)
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise OutputError(f"the file name of {label} is too long for its folder's file system "
                              f"({name_length} bytes with the temporary suffix)") from exc
        raise OutputError(f"cannot write {label}: folder {folder!r} is not writable "
                          f"({exc.strerror or exc})") from exc
    os.close(fd)
    os.remove(probe)


def _same_file(path: str, other: str) -> bool:
    """Whether `path` names `other` once links and `..` are resolved, or is a hard link to it."""
    if os.path.realpath(path) == os.path.realpath(other):
        return True
    try:
        return os.path.exists(path) and os.path.exists(other) and os.path.samefile(path, other)
    except OSError:
        return False


def check_output_paths(outputs: list[str], input_path: str, overwrite: bool,
                       other_inputs: Optional[dict[str, str]] = None) -> None:
    """Refuse outputs that would damage a file or fail to be written (see the module docstring).

    Args:
        outputs: the paths this run will write (the edit, and the comparison video).
        input_path: the source video, which no output may reach.
        other_inputs: {path: what it is} of the other files the run reads (the config file,
            the checkpoint), which no output may reach either.
        overwrite: whether existing regular files may be replaced.

    Raises:
        OutputError: with a one-line reason naming the path.
    """
    seen: dict[str, str] = {}
    for path in outputs:
        label = f"output {path!r}"
        if not path or path.endswith(os.sep) or (os.altsep and path.endswith(os.altsep)):
            raise OutputError(f"{label} is a folder name (it ends with a separator): give a file name")
        if os.path.basename(path) in (".", ".."):
            raise OutputError(f"{label} is a folder name: give a file name")
        real = os.path.realpath(path)
        if _same_file(path, input_path):
            raise OutputError(f"{label} is the input video {input_path!r} (after resolving links): "
                              "choose another output")
        for other, what in (other_inputs or {}).items():
            if _same_file(path, other):
                raise OutputError(f"{label} is {what} {other!r} (after resolving links): choose another output")
        if real in seen:
            raise OutputError(f"{label} and output {seen[real]!r} are the same file")
        seen[real] = path
        if os.path.lexists(path):
            try:
                mode = os.stat(path).st_mode
            except OSError:
                mode = stat.S_IFREG  # a dangling symbolic link: the link itself is replaced
            if not stat.S_ISREG(mode):
                raise OutputError(f"{label} exists and is {_kind(mode)}: it is never replaced, even with "
                                  "--overwrite")
            if not overwrite:
                raise OutputError(f"output exists: {path!r} (pass --overwrite to replace it)")
        folder = os.path.dirname(os.path.abspath(path))
        ancestor = _existing_ancestor(folder)
        _probe_folder(ancestor, _temp_name_length(path), label)


@contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP back until the block ends, so a few renames finish together.

    The handlers are swapped for ones that only remember the signal, then restored, and the
    remembered signals are raised again. (Blocking with pthread_sigmask would not do: a
    process-directed signal goes to any thread that does not block it, and torch runs several.)
    Outside the main thread, where handlers cannot be set, nothing is held.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {}
    for signum in HELD_SIGNALS:
        previous[signum] = signal.getsignal(signum)
        if previous[signum] not in (signal.SIG_IGN, None):
            signal.signal(signum, lambda received, _frame: pending.append(received))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            if handler is not None:
                signal.signal(signum, handler)
        for signum in pending:
            signal.raise_signal(signum)


class OutputSet:
    """Stage several outputs as temporary files, then publish all of them or none.

        with OutputSet([out, compare], overwrite=False) as outputs:
            encode_video(outputs.stage(out), frames, fps)      # verified complete
            encode_video(outputs.stage(compare), frames2, fps)
            outputs.publish()

    Without `overwrite`, a file that appeared at a destination after the paths were checked
    is not replaced: publishing then fails and changes nothing. Folders that `stage` created
    are removed again (when empty) unless the set was published.
    """

    def __init__(self, destinations: list[str], overwrite: bool = True):
        self.destinations = [os.fspath(d) for d in destinations]
        self.overwrite = overwrite
        self.staged: dict[str, str] = {}
        self.published = False
        self._leftovers: set[str] = set()
        self._created_folders: list[str] = []

    def __enter__(self) -> "OutputSet":
        return self

    def __exit__(self, *exc_info) -> None:
        for path in self._leftovers:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
        if not self.published:
            for folder in reversed(self._created_folders):  # deepest first
                try:
                    os.rmdir(folder)
                except OSError:
                    break  # not empty (or gone): leave it and its parents

    def stage(self, destination: str) -> str:
        """A fresh hidden temporary path beside `destination` (created empty), removed on exit."""
        if destination not in self.destinations:
            raise ValueError(f"{destination!r} is not one of this set's destinations {self.destinations}")
        folder = os.path.dirname(os.path.abspath(destination))
        self._make_folders(folder)
        fd, temp = tempfile.mkstemp(dir=folder, prefix=_temp_prefix(destination),
                                    suffix=TEMP_SUFFIX)
        os.close(fd)
        self._leftovers.add(temp)
        os.chmod(temp, 0o666 & ~_umask())  # mkstemp makes it private (0600); a video is not
        self.staged[destination] = temp
        return temp

    def _make_folders(self, folder: str) -> None:
        """os.makedirs, remembering each folder it creates (outermost first)."""
        missing = []
        while not os.path.exists(folder):
            missing.append(folder)
            folder = os.path.dirname(folder)
        for path in reversed(missing):
            os.mkdir(path)
            self._created_folders.append(path)

    def publish(self) -> None:
        """Move every staged file onto its destination, all or none (signals held meanwhile).

        Raises:
            OutputError: a destination was not staged, one exists without `overwrite`, or a
                rename failed (the old files are back in place and the new ones removed; a
                backup that could not be put back is kept and named).
        """
        missing = [d for d in self.destinations if d not in self.staged]
        if missing:
            raise OutputError(f"nothing was written for {missing}")
        with signals_held():
            backups: dict[str, str] = {}
            replaced: list[str] = []
            kept: list[str] = []
            try:
                for destination in self.destinations:
                    if os.path.lexists(destination):
                        if not self.overwrite:
                            raise FileExistsError(errno.EEXIST, "it appeared after the output was checked "
                                                  "(pass --overwrite to replace it)", destination)
                        backups[destination] = self._backup(destination)
                for destination in self.destinations:
                    self._move(self.staged[destination], destination)
                    self._leftovers.discard(self.staged[destination])
                    replaced.append(destination)
            except OSError as exc:
                kept = self._roll_back(replaced, backups)
                detail = f"; the old file is kept as {kept}" if kept else "; no output was changed"
                raise OutputError(f"could not publish {exc.filename or self.destinations[0]!r}: "
                                  f"{exc.strerror or exc}{detail}") from exc
            finally:
                for backup in backups.values():
                    if backup not in kept and os.path.lexists(backup):
                        os.remove(backup)
                    self._leftovers.discard(backup)
            self.published = True

    def _move(self, temp: str, destination: str) -> None:
        """Rename `temp` onto `destination`; without `overwrite`, never onto an existing file."""
        if self.overwrite:
            os.replace(temp, destination)
            return
        try:
            os.link(temp, destination)  # fails with EEXIST if a file appeared there meanwhile
        except FileExistsError:
            raise
        except OSError as exc:
            if os.path.lexists(destination):  # a file system without hard links: check, then rename
                raise FileExistsError(errno.EEXIST, "it appeared after the output was checked", destination) from exc
            os.replace(temp, destination)
            return
        os.remove(temp)

    def _roll_back(self, replaced: list[str], backups: dict[str, str]) -> list[str]:
        """Undo a partial publish: remove new files that had no predecessor, put every backup back.
        Returns the backups that could not be put back (kept on disk, so nothing is lost)."""
        kept = []
        for destination in replaced:
            if destination not in backups:
                try:
                    os.remove(destination)
                except OSError:
                    pass
        for destination, backup in backups.items():
            if destination in replaced or not os.path.lexists(destination):
                try:
                    os.replace(backup, destination)
                except OSError:
                    kept.append(backup)
        return kept

    def _backup(self, destination: str) -> str:
        """A hidden second name for the existing `destination`: a hard link, else the file moved aside."""
        folder = os.path.dirname(os.path.abspath(destination))
        backup = os.path.join(folder, f"{TEMP_PREFIX}{os.path.basename(destination)}.{secrets.token_hex(4)}.old")
        self._leftovers.add(backup)
        try:
            os.link(destination, backup, follow_symlinks=False)
        except OSError:
            os.replace(destination, backup)  # no hard links here: the rename below puts a file back at once
        return backup


def _umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
