"""Atomic file writes for every output of ``training/`` (run logs,
checkpoints, bench and bound results): write a temporary file in the same
folder, flush it to disk, then ``os.replace`` it over the target, so a
reader or a resumed run never sees half a file.  The run lock
(``run_lock``, ``is_locked``): one process at a time writes a run's files.
And their names (``run_files``), in one place for the trainer, the study
driver and the tools that read a trained run.

Files from someone else are untrusted:

- ``safe_name``: the one check for every name that becomes a path (a run
  name from a config, the command line or a log header): one plain path
  component, at most ``MAX_NAME`` bytes, no ``..``, no separator.
- ``save_checkpoint`` / ``load_checkpoint``: a checkpoint's SHA-256 is
  recorded beside it in ``<file>.sha256`` and checked before it is read; it
  is read with ``torch.load(..., weights_only=True)``, which refuses
  anything but tensors and plain data, so a checkpoint cannot run code.
- ``append_text`` / ``open_append``: files a run appends to (its log, its
  ``.out``) and its lock are opened with ``O_NOFOLLOW``, so a symlink planted
  in their place is refused rather than followed out of the runs folder."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import os
import pickle
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Optional

try:  # POSIX advisory locks; elsewhere runs are not locked
    import fcntl
except ImportError:  # pragma: no cover (Windows)
    fcntl = None

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_torch_save", "run_lock", "is_locked", "RunFiles",
           "run_files", "MAX_NAME", "safe_name", "digest_path", "save_checkpoint", "load_checkpoint", "open_append",
           "remove_run_outputs", "remove_stale_temporaries"]

MAX_NAME = 128  # bytes of a run name: with ".ckpt.pt.sha256" and a temporary file's affixes, well under 255

_UMASK = os.umask(0o022)
os.umask(_UMASK)


class RunFiles(NamedTuple):
    """A run's files in its output folder."""

    log: Path  # <run>.jsonl: the JSON-lines log (header, evaluations, final line)
    ckpt: Path  # <run>.ckpt.pt: the last checkpoint (resume)
    best: Path  # <run>.best.pt: the model with the best validation perplexity so far
    lock: Path  # <run>.lock: held by the one process writing the run
    out: Path  # <run>.out: the process's output, when the study driver started it


def safe_name(name, what: str = "run name") -> str:
    """``name`` if it can safely become one file name in a folder, else a
    ``DropcheckError``: a non-empty string of at most ``MAX_NAME`` bytes
    (UTF-8), no ``/`` or ``\\``, no ``..``, no control characters, not
    starting with ``.`` (hidden files are the atomic writes' temporaries)."""
    from dropcheck import DropcheckError

    if not isinstance(name, str):
        raise DropcheckError(f"{what}: expected a string, got {type(name).__name__}")
    bad = ("/" in name or "\\" in name or ".." in name or name.startswith(".")
           or any(ord(ch) < 32 or ord(ch) == 127 for ch in name))
    if not name or bad:
        raise DropcheckError(f"{what} {name!r}: must be one plain file name (not empty, no '/', '\\', '..', "
                             "control characters or leading '.')")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME:
        raise DropcheckError(f"{what} {name[:40]!r}...: {len(name.encode('utf-8', 'surrogatepass'))} bytes long, "
                             f"at most {MAX_NAME}")
    return name


def run_files(folder, name: str) -> RunFiles:
    """The paths of run ``name``'s files in ``folder`` (``RunFiles``);
    ``name`` must pass ``safe_name``."""
    folder = Path(folder)
    safe_name(name)
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


def digest_path(path: Path) -> Path:
    """``<file>.sha256``: the SHA-256 record of checkpoint ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def _read_digests(path: Path) -> Optional[list]:
    """The digests ``<file>.sha256`` accepts for ``path``, None without a record."""
    from dropcheck import DropcheckError

    side = digest_path(path)
    if not side.exists():
        return None
    try:
        rec = json.loads(side.read_text(encoding="utf-8"))
        digests = [rec["sha256"]] + ([rec["previous"]] if rec.get("previous") else [])
        if not all(isinstance(d, str) for d in digests):
            raise ValueError("not a string")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise DropcheckError(f"checkpoint {path}: its SHA-256 record {side} is unreadable ({exc}); "
                             "refusing to load an unverifiable checkpoint") from None
    return digests


_WRITTEN: dict = {}  # checkpoint path -> the SHA-256 this process last put there (saves re-reading it)


def save_checkpoint(obj: Any, path: Path) -> None:
    """``torch.save(obj)`` to ``path`` atomically, its SHA-256 in ``<file>.sha256``.

    Order, so that a kill at any instant leaves a checkpoint its record
    accepts: the new file is written beside the old one, then the record is
    replaced by ``{"sha256": new, "previous": old}``, then the new file
    replaces the old (a kill between the two leaves the old file, which the
    record still names)."""
    import torch

    path = Path(path)
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    previous = None
    if path.is_file():  # what is on disk now: the digest this process wrote there last, else read it
        previous = _WRITTEN.get(str(path.resolve())) or hashlib.sha256(path.read_bytes()).hexdigest()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        record = {"sha256": hashlib.sha256(data).hexdigest(), "previous": previous, "file": path.name}
        atomic_write_text(digest_path(path), json.dumps(record) + "\n")
        os.replace(tmp, path)
        _WRITTEN[str(path.resolve())] = record["sha256"]
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: Path, what: str = "checkpoint") -> dict:
    """A checkpoint written by ``save_checkpoint``, verified and safe to read.

    A ``DropcheckError`` naming the file, in one line, for a file whose
    SHA-256 its record does not list (bit rot, an edit), for one holding
    anything but tensors and plain data (a pickled callable: ``torch.load``
    with ``weights_only=True`` refuses it before anything runs), and for an
    empty, truncated or foreign file.  A checkpoint without a record (written
    before dropcheck kept them) is read with a warning."""
    import torch
    from dropcheck import DropcheckError

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DropcheckError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    digests = _read_digests(path)
    got = hashlib.sha256(data).hexdigest()
    if digests is None:
        print(f"warning: {what} {path} has no SHA-256 record ({digest_path(path).name}; written before dropcheck "
              "kept them, or removed): it cannot be verified", file=sys.stderr)
    elif got not in digests:
        raise DropcheckError(f"{what} {path} is damaged or was changed: its SHA-256 {got[:16]}... is not the one "
                             f"recorded in {digest_path(path).name} ({digests[0][:16]}...); refusing to load it")
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        if not data:
            first = "empty file"
        raise DropcheckError(f"{what} {path} refused: it holds something other than tensors and plain data "
                             f"(e.g. a pickled callable, which would run code when loaded): {first[:200]}") from None
    except Exception as exc:  # truncated, random, empty: torch's reader raises RuntimeError, EOFError, ...
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else "empty or truncated file"
        raise DropcheckError(f"{what} {path} is not a readable torch checkpoint ({type(exc).__name__}: "
                             f"{text[:200]})") from None
    if not isinstance(obj, dict):
        raise DropcheckError(f"{what} {path}: expected a dict of checkpoint fields, got {type(obj).__name__}")
    return obj


def _open_nofollow(path: Path, flags: int):
    """``os.open`` that refuses a symlink at ``path`` (``O_NOFOLLOW``)."""
    from dropcheck import DropcheckError

    path = Path(path)
    try:
        return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as exc:
        if path.is_symlink():
            raise DropcheckError(f"{path} is a symbolic link: a run's files are never written through one "
                                 "(remove it)") from None
        raise DropcheckError(f"cannot open {path}: {exc.strerror or exc}") from None


def open_append(path: Path):
    """``open(path, "a")`` in text mode, refusing a symlink at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _open_nofollow(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    return os.fdopen(fd, "a", encoding="utf-8")


def remove_run_outputs(files: RunFiles) -> None:
    """Remove an old run's log, checkpoint and best model with their SHA-256
    records (``--overwrite``; never its lock, held by the caller, nor its
    ``.out``, which the driver has opened for the new run), and stale
    temporary files of killed atomic writes of them."""
    for p in _outputs(files):
        if p.is_symlink() or p.exists():
            p.unlink()
    remove_stale_temporaries(files)


def _outputs(files: RunFiles) -> list:
    return [files.log, files.ckpt, files.best, digest_path(files.ckpt), digest_path(files.best)]


def remove_stale_temporaries(files: RunFiles) -> list:
    """Remove the temporary files that killed atomic writes of the run's
    outputs left (``.<file>.<random>.tmp``, up to a checkpoint's size each);
    only under the run's lock, when no other process writes them.  Returns
    the paths removed."""
    gone = []
    for p in _outputs(files):
        for tmp in p.parent.glob(f".{glob.escape(p.name)}.*.tmp"):
            if tmp.is_file() and not tmp.is_symlink():
                tmp.unlink()
                gone.append(tmp)
    return gone


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
    with os.fdopen(_open_nofollow(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND), "a") as f:
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
    if fcntl is None or not Path(path).exists() or Path(path).is_symlink():
        return False
    with os.fdopen(_open_nofollow(path, os.O_WRONLY | os.O_APPEND), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False
