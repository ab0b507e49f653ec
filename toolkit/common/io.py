"""Safe files: atomic writes and the one resumable JSONL writer every long job uses.

Long jobs (labelling, q* generation, evaluation rows) append JSON lines and may be killed at any
moment, SIGKILL included. ``JsonlAppender`` makes that harmless:

* each batch of rows goes out in a single ``write`` followed by ``fsync``;
* on open, a trailing partial line (a write cut short by a kill) is cut off, so the file only
  ever holds complete rows;
* a sidecar ``<file>.meta.json`` holds a fingerprint of the configuration that produced the
  rows; resuming with a different configuration is refused instead of mixing outputs;
* ``done_keys`` tells the caller which rows exist, so it skips them and writes each row once.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


class ResumeMismatchError(RuntimeError):
    """An existing output file was made with a different configuration."""


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


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Rows of a JSONL file; a final line without newline (cut short) is ignored."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                return
            if line.strip():
                yield json.loads(line)


class JsonlAppender:
    """Append-only, resumable JSONL output (see the module docstring).

    Args:
        path: the output file.
        key: the field (or fields) that identify a row; ``done_keys`` returns their values.
        config: the configuration that produces the rows (its fingerprint guards resuming).
    """

    def __init__(self, path: str | Path, key: str | tuple[str, ...],
                 config: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.key = (key,) if isinstance(key, str) else key
        self.path.parent.mkdir(parents=True, exist_ok=True)
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

    def _row_key(self, row: dict[str, Any]) -> Any:
        vals = tuple(row[k] for k in self.key)
        return vals[0] if len(vals) == 1 else vals

    def rows(self) -> Iterator[dict[str, Any]]:
        if self.path.exists():
            yield from read_jsonl(self.path)

    def done_keys(self) -> set[Any]:
        return {self._row_key(r) for r in self.rows()}

    def append(self, rows: Iterable[dict[str, Any]]) -> int:
        lines = "".join(json.dumps(r, ensure_ascii=False, default=json_default) + "\n"
                        for r in rows)
        if not lines:
            return 0
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
