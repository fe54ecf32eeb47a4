"""Atomic file writes for every output of ``training/`` (run logs,
checkpoints, bench and bound results): write a temporary file in the same
folder, flush it to disk, then ``os.replace`` it over the target, so a
reader or a resumed run never sees half a file.  The run lock
(``run_lock``, ``is_locked``): one process at a time writes a run's files.
And their names (``run_files``), in one place for the trainer, the study
driver and the tools that read a trained run."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

try:  # POSIX advisory locks; elsewhere runs are not locked
    import fcntl
except ImportError:  # pragma: no cover (Windows)
    fcntl = None

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_torch_save", "run_lock", "is_locked", "RunFiles",
           "run_files"]

_UMASK = os.umask(0o022)
os.umask(_UMASK)


class RunFiles(NamedTuple):
    """A run's files in its output folder."""

    log: Path  # <run>.jsonl: the JSON-lines log (header, evaluations, final line)
    ckpt: Path  # <run>.ckpt.pt: the last checkpoint (resume)
    best: Path  # <run>.best.pt: the model with the best validation perplexity so far
    lock: Path  # <run>.lock: held by the one process writing the run
    out: Path  # <run>.out: the process's output, when the study driver started it


def run_files(folder, name: str) -> RunFiles:
    """The paths of run ``name``'s files in ``folder`` (``RunFiles``)."""
    folder = Path(folder)
    return RunFiles(*(folder / f"{name}{suffix}" for suffix in (".jsonl", ".ckpt.pt", ".best.pt", ".lock", ".out")))


def _atomic(path: Path, write: Callable) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would make logs unreadable to the group
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic(path, lambda f: f.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: Path) -> None:
    import torch

    _atomic(path, lambda f: torch.save(obj, f))


@contextlib.contextmanager
def run_lock(path: Path, enabled: bool = True) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if missing) while
    the block runs, so two processes never write one run's log and
    checkpoints; a ``DropcheckError`` if another process holds it.  The
    operating system drops the lock when the process ends, however it ends."""
    if not enabled or fcntl is None:
        yield
        return
    from dropcheck import DropcheckError

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DropcheckError(f"{path}: this run is already running in another process") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def is_locked(path: Path) -> bool:
    """Whether another process holds ``run_lock(path)`` now."""
    if fcntl is None or not Path(path).exists():
        return False
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False
