"""Safe files: atomic writes and the one resumable JSONL writer every long job uses.

Long jobs (labelling, q* generation, evaluation rows) append JSON lines and may be killed at any
moment, SIGKILL included. ``JsonlAppender`` makes that harmless:

* each batch of rows goes out in a single ``write`` followed by ``fsync``;
* on open, a trailing partial line (a write cut short by a kill) is cut off, so the file only
  ever holds complete rows;
* a sidecar ``<file>.meta.json`` holds a fingerprint of the configuration that produced the
  rows; resuming with a different configuration is refused instead of mixing outputs;
* ``done_keys`` tells the caller which rows exist, so it skips them and writes each row once;
* one writer per output: the appender holds an exclusive advisory lock (``fcntl.flock``) on
  ``<file>.lock`` from opening until ``close()`` (or the end of the process: the OS releases
  the lock of a killed process, so a SIGKILL never leaves the output locked). A second
  *process* opening the same output gets :class:`OutputLockedError` naming the holder's pid,
  instead of both resuming from the same state and writing every row twice. Within one process
  the lock is shared (several appenders on one file are one writer);
* a file that holds a key twice (made before this lock existed, or edited by hand) is refused
  by ``done_keys`` and :func:`read_jsonl_unique` with :class:`DuplicateRowsError`, so no summary
  counts a row twice.

The lock file stays beside the output after the run (it holds the last writer's pid); removing
it while nobody writes is harmless, removing it while a writer runs defeats the lock.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import tempfile
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from toolkit.common.errors import UserError


class ResumeMismatchError(UserError, RuntimeError):
    """An existing output file was made with a different configuration."""


class OutputLockedError(UserError, RuntimeError):
    """Another process is writing the same output file."""


class CorruptRowError(UserError, ValueError):
    """A line of a JSONL file that is not JSON."""


class DuplicateRowsError(UserError, ValueError):
    """An output file holds the same row key more than once."""


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a whole file so that readers see either the old or the new content, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False, default=str) + "\n")


def fingerprint(obj: Any) -> str:
    """A stable hash of a JSON-serialisable configuration."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cut_partial_line(path: Path) -> int:
    """Truncate a trailing line that has no newline (a write cut short); return bytes removed."""
    if not path.exists():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return 0
        # Walk back to the last newline in blocks.
        pos, block = size, 1 << 16
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                keep = start + nl + 1
                break
            pos = start
        else:
            keep = 0
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
        return size - keep


def lock_path(path: str | Path) -> Path:
    """The advisory lock file of an output: ``<file>.lock`` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


class _Held:
    """A lock this process holds: its file descriptor and how many users share it."""

    def __init__(self, fd: int) -> None:
        self.fd, self.users = fd, 0


# Locks held by this process, by (pid, lock file). The pid is part of the key because a child
# made by fork() inherits this dict but is another process: it must take the lock itself (and
# is refused while the parent holds it).
_HELD: dict[tuple[int, str], _Held] = {}
_HELD_GUARD = threading.Lock()


def _holder_pid(lock: Path) -> str:
    try:
        return lock.read_text().split()[0]
    except (OSError, IndexError):
        return "unknown"  # the holder has opened the file but not yet written its pid


class OutputLock:
    """An exclusive, process-wide lock on one output file (see the module docstring).

    Args:
        path: the output file (the lock itself is ``<path>.lock``).
        timeout_s: keep retrying this long while another process holds it (0: refuse at once).
    """

    def __init__(self, path: str | Path, timeout_s: float = 0.0) -> None:
        self.path = Path(path)
        self.lock = lock_path(self.path)
        self._key = (os.getpid(), os.path.realpath(self.lock))
        with _HELD_GUARD:
            held = _HELD.get(self._key)
            if held is None:
                held = _Held(self._acquire(timeout_s))
                _HELD[self._key] = held
            held.users += 1
        # Released when the owner is garbage-collected without close() (e.g. an exception
        # unwound the job holding it); the OS releases it when the process ends.
        self._finalizer = weakref.finalize(self, OutputLock._release_key, self._key)

    def _acquire(self, timeout_s: float) -> int:
        self.lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                    os.close(fd)
                    raise
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise OutputLockedError(
                        f"{self.path} is being written by another process (pid "
                        f"{_holder_pid(self.lock)}, lock {self.lock}); wait for it to finish "
                        "or write elsewhere") from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    @staticmethod
    def _release_key(key: tuple[int, str]) -> None:
        with _HELD_GUARD:
            held = _HELD.get(key)
            if held is None:
                return
            held.users -= 1
            if held.users <= 0:
                del _HELD[key]
                os.close(held.fd)  # closing the last descriptor releases the flock

    @property
    def held(self) -> bool:
        return self._finalizer.alive

    def release(self) -> None:
        """Give the lock up (idempotent); the file stays."""
        self._finalizer()

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Rows of a JSONL file; a final line without newline (cut short) is ignored.

    Raises:
        CorruptRowError: a complete line that is not JSON (the message names file and line).
    """
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.endswith("\n"):
                return
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as err:
                    raise CorruptRowError(f"{path}:{number}: not a JSON row ({err.msg} at "
                                          f"column {err.colno}); fix or delete that line"
                                          ) from None


def _key_of(row: dict[str, Any], key: tuple[str, ...]) -> Any:
    vals = tuple(row[k] for k in key)
    return vals[0] if len(vals) == 1 else vals


def unique_keys(rows: Iterable[dict[str, Any]], key: str | tuple[str, ...],
                source: str | Path) -> set[Any]:
    """The rows' keys; :class:`DuplicateRowsError` naming ``source`` if one appears twice."""
    key = (key,) if isinstance(key, str) else key
    seen: dict[Any, int] = {}
    for n, row in enumerate(rows, 1):
        k = _key_of(row, key)
        if k in seen:
            raise DuplicateRowsError(
                f"{source}: {'/'.join(key)} {k!r} appears twice (rows {seen[k]} and {n}); "
                "two writers ran on this file at once: keep one row per key before using it")
        seen[k] = n
    return set(seen)


def read_jsonl_unique(path: str | Path, key: str | tuple[str, ...]) -> list[dict[str, Any]]:
    """All rows of a JSONL file, refusing it (:class:`DuplicateRowsError`) if a key repeats."""
    rows = list(read_jsonl(path))
    unique_keys(rows, key, path)
    return rows


class JsonlAppender:
    """Append-only, resumable JSONL output, one writer at a time (see the module docstring).

    Args:
        path: the output file.
        key: the field (or fields) that identify a row; ``done_keys`` returns their values.
        config: the configuration that produces the rows (its fingerprint guards resuming).
        lock_timeout_s: wait this long for another process's lock before refusing (0: at once).

    Raises:
        OutputLockedError: another process holds the output.
        ResumeMismatchError: the file was made with another configuration.
    """

    def __init__(self, path: str | Path, key: str | tuple[str, ...],
                 config: dict[str, Any] | None = None, lock_timeout_s: float = 0.0) -> None:
        self.path = Path(path)
        self.key = (key,) if isinstance(key, str) else key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Before anything reads or changes the file: a second writer must not even resume.
        self.lock = OutputLock(self.path, lock_timeout_s)
        meta_path = self.path.with_name(self.path.name + ".meta.json")
        if config is not None:
            fp = fingerprint(config)
            if meta_path.exists():
                old = json.loads(meta_path.read_text())
                if old.get("fingerprint") != fp and self.path.exists() and self.path.stat().st_size:
                    raise ResumeMismatchError(
                        f"{self.path} was made with a different configuration "
                        f"(fingerprint {old.get('fingerprint')} != {fp}); use a new output path "
                        "or delete the old file")
            if not meta_path.exists() or json.loads(meta_path.read_text()).get(
                    "fingerprint") != fp:
                atomic_write_json(meta_path, {"fingerprint": fp, "config": config})
        self.cut_bytes = cut_partial_line(self.path)

    def close(self) -> None:
        """Release the output's lock (idempotent); ``append`` is refused afterwards."""
        self.lock.release()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def rows(self) -> Iterator[dict[str, Any]]:
        if self.path.exists():
            yield from read_jsonl(self.path)

    def done_keys(self) -> set[Any]:
        """Keys of the rows written so far; refuses a file that holds a key twice."""
        return unique_keys(self.rows(), self.key, self.path)

    def append(self, rows: Iterable[dict[str, Any]]) -> int:
        lines = "".join(json.dumps(r, ensure_ascii=False, default=json_default) + "\n"
                        for r in rows)
        if not lines:
            return 0
        if not self.lock.held:
            raise RuntimeError(f"{self.path}: append after close()")
        # One write, then fsync: a kill can only leave a cut-off last line, removed on reopen.
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())
        return lines.count("\n")


def json_default(obj: Any) -> Any:
    """``json.dumps(default=...)`` for numpy scalars/arrays and paths."""
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
