"""The output directory of a run: one owner at a time, files written whole or not at all.

``OutputDir(path)`` is a context manager that creates the directory and holds an
exclusive lock on it while a run writes there. The lock is ``fcntl.flock`` on
``path/.lock``: the kernel drops it when its process dies, however it dies (kill -9
included), so a lock left behind by a dead run is simply taken over, while a live one
refuses the second run with ``OutputLocked`` naming its pid. Where ``flock`` is
missing (Windows) or refused (some network filesystems), the lock file's pid is
checked instead.

``atomic_write(path, data)`` writes through a temporary file of a unique name in the
same directory (``tempfile.mkstemp``: two writers never share one), flushed to disk,
then renamed over ``path``: a reader sees the old file or the new one, never a torn
one, and a failed write (disk full, Ctrl-C) leaves the old file as it was.

``claim(path, outputs=..., resume=..., overwrite=...)`` is the check every command makes
before it writes anything: a directory holding an earlier run is never overwritten
silently (``RunExists``, a ``ValueError``, names the run and the ways forward).
``OutputDir(path, replace=names)`` then removes the earlier run's files once the lock is
held, when ``claim`` answered "overwrite".
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["OutputDir", "OutputLocked", "RunExists", "claim", "found_outputs", "atomic_write",
           "torch_bytes", "LOCK_NAME", "TRAIN_OUTPUTS"]

LOCK_NAME = ".lock"
_TMP_SUFFIX = ".tmp"
_UMASK = os.umask(0)
os.umask(_UMASK)


class OutputLocked(RuntimeError):
    """Another live run holds the output directory."""

    def __init__(self, directory: Path, owner: dict) -> None:
        self.directory = directory
        self.pid = owner.get("pid")
        host = owner.get("host") or "?"
        since = owner.get("since") or "?"
        super().__init__(f"{directory} is in use by another run (pid {self.pid} on {host}, "
                         f"started {since}); wait for it to finish or use another output "
                         f"directory")


# what `rnngrad train` writes into its directory (model.pt last: its presence marks a
# finished run)
TRAIN_OUTPUTS = ("config.json", "metrics.csv", "model.pt", "checkpoint.pt", "curve.png")


class RunExists(ValueError):
    """The output directory holds an earlier run that a command would overwrite.

    ``directory``: the path; ``found``: the earlier run's files that are there.
    """

    def __init__(self, message: str, *, directory: Path, found: list[str]) -> None:
        super().__init__(message)
        self.directory = directory
        self.found = found


def found_outputs(path: str | Path, outputs: Sequence[str]) -> list[str]:
    """The names of ``outputs`` (files or folders) that exist in ``path``, in that order."""
    path = Path(path)
    if not path.is_dir():
        return []
    return [name for name in outputs if (path / name).exists()]


def claim(
    path: str | Path,
    *,
    outputs: Sequence[str] = TRAIN_OUTPUTS,
    resume: bool = False,
    overwrite: bool = False,
    checkpoint: str | None = "checkpoint.pt",
    finished: str | None = "model.pt",
    resumable: bool = True,
) -> str:
    """Check, before anything is written, that a command may write its run into ``path``.

    Creates nothing and writes nothing: call it once every other argument is validated,
    then write inside ``OutputDir(path, replace=outputs if answer == "overwrite" else ())``.

    Args:
        path: the output directory (it need not exist).
        outputs: the names (files or folders) the command writes there; the directory
            "holds a run" when any of them exists. Files of other names are never looked
            at or touched.
        resume: the caller was asked to continue the run that is there.
        overwrite: the caller was asked to replace it (its ``outputs`` are removed).
        checkpoint: the file a resume continues from (None: the caller keeps its own
            record, e.g. a sweep's table, and any earlier run can be resumed).
        finished: the file whose presence marks a finished run (None: not told apart).
        resumable: whether the command has a ``--resume`` at all (``compare`` has not).

    Returns:
        "new" (nothing of an earlier run there), "resume" (continue it), or "overwrite"
        (replace it; also a ``resume`` of an unfinished run that left no checkpoint, which
        can only start afresh: tell the user).

    Raises:
        RunExists: ``path`` holds an earlier run and neither ``resume`` nor
            ``overwrite`` was asked for, or ``resume`` was asked for a finished run
            that left no checkpoint; the one-line message names the run and the ways
            forward (``--resume``, ``--overwrite``, or another output directory).
        ValueError: both ``resume`` and ``overwrite``.
        NotADirectoryError: ``path`` is a file.

    Example (a sweep's directory; its own table records which trials finished)::

        how = claim(out, outputs=("sweep.csv", "trials", "learning_curves.png"),
                    resume=resume, overwrite=overwrite, checkpoint=None, finished=None)
        with OutputDir(out, replace=SWEEP_OUTPUTS if how == "overwrite" else ()) as d:
            ...
    """
    path = Path(path)
    if resume and overwrite:
        raise ValueError("resume (--resume) and overwrite (--overwrite) exclude each other: "
                         "continue the run, or replace it")
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "is a file, not a directory", str(path))
    found = found_outputs(path, outputs)
    if not found:
        return "new"
    if overwrite:
        return "overwrite"
    done = finished is not None and finished in found
    can_resume = resumable and (checkpoint is None or checkpoint in found)
    if resume and can_resume:
        return "resume"
    if resume and resumable and not done:
        return "overwrite"  # an unfinished run with no checkpoint: nothing to continue
    what = "a finished run" if done else ("an unfinished run" if finished else "an earlier run")
    listed = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
    ways = (["continue it with --resume"] if can_resume else []) + [
        "replace it with --overwrite", "give another output directory"]
    why = "" if can_resume or not resume else " and no checkpoint to resume from"
    raise RunExists(f"{path} holds {what} ({listed}){why}: {', '.join(ways[:-1])}, or "
                    f"{ways[-1]}", directory=path, found=found)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _prepare(directory: Path) -> Path:
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "is a file, not a directory", str(directory))
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _owner(text: str) -> dict:
    try:
        owner = json.loads(text)
    except ValueError:
        return {}
    return owner if isinstance(owner, dict) else {}


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    except OSError:
        return False
    return True


class OutputDir:
    """Create ``directory`` and hold its lock for the duration of a ``with`` block.

    Entering also removes temporary files a killed writer left behind (safe: no one
    else writes here while the lock is held), and the names in ``replace`` (an earlier
    run's files, when ``claim`` answered "overwrite"). Raises ``OutputLocked`` if a live
    run holds the directory, and ``NotADirectoryError`` if the path is a file.
    """

    def __init__(self, directory: str | Path, *, replace: Sequence[str] = ()) -> None:
        self.path = Path(directory)
        self.lock_path = self.path / LOCK_NAME
        self.replace = tuple(replace)
        self._fd: int | None = None

    def __enter__(self) -> OutputDir:
        _prepare(self.path)
        self._fd = self._acquire()
        try:
            record = {"pid": os.getpid(), "host": socket.gethostname(),
                      "since": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, json.dumps(record).encode(), 0)
            for leftover in self.path.glob(f".*{_TMP_SUFFIX}"):
                with contextlib.suppress(OSError):
                    leftover.unlink()
            for name in self.replace:
                if name in ("", ".", "..", LOCK_NAME) or Path(name).name != name:
                    raise ValueError(f"replace names files in the directory, got {name!r}")
                _remove(self.path / name)
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._release()

    def _acquire(self) -> int:
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                locked = self._lock(fd)
            except BaseException:
                os.close(fd)
                raise
            if not locked:
                owner = _owner(os.pread(fd, 4096, 0).decode(errors="replace"))
                os.close(fd)
                raise OutputLocked(self.path, owner)
            # the previous owner may have unlinked the file between our open and our lock:
            # then we hold a lock on a file no one else will open; start again
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.lock_path))
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)

    @staticmethod
    def _lock(fd: int) -> bool:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False
            except OSError as e:  # flock not supported here: fall back to the pid check
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
        owner = _owner(os.pread(fd, 4096, 0).decode(errors="replace"))
        same_host = owner.get("host") in (None, socket.gethostname())
        return not (same_host and owner.get("pid") != os.getpid() and _pid_alive(owner.get("pid")))

    def _release(self) -> None:
        if self._fd is None:
            return
        # unlink while still holding the lock, then let it go
        with contextlib.suppress(OSError):
            self.lock_path.unlink()
        os.close(self._fd)
        self._fd = None


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all: a temporary file, then a rename.

    An ``OSError`` (disk full, no permission) is re-raised naming ``path``, and the
    temporary file is removed; ``path`` keeps its previous content.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP_SUFFIX)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None
    try:
        if hasattr(os, "fchmod"):  # mkstemp makes 0600 files; give the usual permissions
            os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None:
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


def torch_bytes(obj: Any) -> bytes:
    """``torch.save(obj)`` into memory, so that a failing disk surfaces as an ``OSError``
    from the plain write in ``atomic_write`` (torch's own writer reports it otherwise)."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()
