"""Any local JSONL / JSON / parquet file (or, online, a Hugging Face dataset) as a task.

The prompt field is detected unless given: the first of ``PROMPT_FIELDS`` present, else an
OpenAI-style ``messages`` list (its last user message). Rows that are not objects, lack the
prompt, have an empty prompt or are not valid JSON are skipped and counted in ``skipped`` (one
warning line), never fatal. With a reference field, scoring is normalised exact match.
"""

from __future__ import annotations

import json
import logging
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from toolkit.tasks.base import Example, SkippedRow, Task, TaskError, jsonable

log = logging.getLogger(__name__)

PROMPT_FIELDS = ("prompt", "question", "instruction", "problem", "input", "query")
REFERENCE_FIELDS = ("answer", "reference", "solution", "output", "completion", "target")
ID_FIELDS = ("id", "task_id", "uid", "idx")
SUFFIXES = (".jsonl", ".json", ".parquet")

Rows = list[tuple[str, Any]]  # (where the row came from, e.g. "line 3"; the row or its error)


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    start = 3 if raw.startswith(b"\xef\xbb\xbf") else 0  # a UTF-8 byte-order mark is harmless
    try:
        return raw[start:].decode("utf-8")
    except UnicodeDecodeError as err:
        at = start + err.start
        raise TaskError(f"{path} is not UTF-8 (byte 0x{raw[at]:02x} at offset {at})") from None


def _jsonl_rows(text: str) -> Rows:
    rows: Rows = []
    # Split on "\n" only: str.splitlines() would also break at U+2028 and friends, which JSON
    # allows unescaped inside strings.
    for n, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                rows.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError as err:
                rows.append((f"line {n}", err))
    return rows


def _json_rows(path: Path, text: str) -> Rows:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # JSON Lines under a .json name
            return _jsonl_rows(text)
        raise TaskError(f"{path} is not valid JSON ({err})") from None
    if isinstance(data, dict):
        lists = {k: v for k, v in data.items() if isinstance(v, list)}
        if len(lists) != 1:
            raise TaskError(f"{path}: expected a list of rows or an object holding exactly one "
                            f"list; found list keys: {', '.join(lists) or 'none'}")
        data = next(iter(lists.values()))
    if not isinstance(data, list):
        raise TaskError(f"{path}: expected a list of rows, found {type(data).__name__}")
    return [(f"row {i}", r) for i, r in enumerate(data)]


def _parquet_rows(path: Path) -> Rows:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise TaskError(f"{path} is not a readable parquet file ({_first_line(err)})") from None
    return [(f"row {i}", r) for i, r in enumerate(table.to_pylist())]


def _hub_rows(name: str, split: str, config: str | None) -> Rows:
    try:
        from datasets import load_dataset

        ds = load_dataset(name, config, split=split)
    except Exception as err:  # offline, unknown id, bad split: one line, not a traceback
        raise TaskError(f"{name!r} is not a local {'/'.join(SUFFIXES)} file, and loading it as "
                        f"a Hugging Face dataset failed (that needs the hub): "
                        f"{_first_line(err)}") from None
    return [(f"row {i}", r) for i, r in enumerate(ds)]


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def _text_of(value: Any) -> str | None:
    """Text of a prompt value: a string, a number, or an OpenAI message list / content parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        if any("role" in m for m in value):  # messages: the last user turn is the prompt
            users = [m.get("content") for m in value if m.get("role") == "user"]
            return _text_of(users[-1]) if users else None
        # content parts, e.g. [{"type": "text", "text": "..."}]
        texts = [p["text"] for p in value if isinstance(p.get("text"), str)]
        return "\n".join(texts) if texts else None
    return None


class LocalTask(Task):
    """Prompts (and optional references) from a local file, or a hub dataset id when online.

    Args:
        path: a .jsonl/.json/.parquet file, or a Hugging Face dataset id (needs the hub).
        prompt_field: the prompt column; detected when None.
        reference_field: the reference column; detected when None (none: not scored).
        id_field: the id column; detected when None (falls back to line / row numbers).
        limit: keep the first N usable rows (None or 0: all).
        split: split of a hub dataset.
        config: configuration of a hub dataset.
    """

    def __init__(self, path: str | Path, prompt_field: str | None = None,
                 reference_field: str | None = None, id_field: str | None = None,
                 limit: int | None = None, split: str = "test",
                 config: str | None = None) -> None:
        super().__init__()
        if limit is not None and limit < 0:
            raise TaskError(f"{path}: limit must be >= 0 (got {limit})")
        path = str(path)
        p = Path(path)
        self.name = p.stem if p.suffix in SUFFIXES else path.replace("/", "--")
        rows = self._load(p, split, config)
        columns = sorted({k for _, r in rows if isinstance(r, dict) for k in r})
        prompt_field = self._field(path, "prompt", prompt_field,
                                   (*PROMPT_FIELDS, "messages"), columns, required=True)
        reference_field = self._field(path, "reference", reference_field, REFERENCE_FIELDS,
                                      columns)
        id_given = id_field is not None
        id_field = self._field(path, "id", id_field, ID_FIELDS, columns)

        good: list[tuple[str, dict[str, Any], str]] = []
        for where, row in rows:
            prompt, reason = self._prompt(row, prompt_field)
            if reason:
                self.skipped.append(SkippedRow(where, reason))
            else:
                good.append((where, row, prompt))
        ids = self._ids(good, id_field, id_given)
        self._examples: list[Example] = []
        for (_, row, prompt), rid in zip(good, ids):
            if rid is None:
                continue  # recorded in skipped by _ids
            ref = row.get(reference_field) if reference_field else None
            if ref is not None and not isinstance(ref, str):
                ref = json.dumps(jsonable(ref), ensure_ascii=False)
            meta = {k: jsonable(v) for k, v in row.items()
                    if k not in (prompt_field, reference_field)}
            self._examples.append(Example(f"{self.name}/{rid}", prompt, ref, meta))
        self._examples = self._examples[: limit or None]
        if self.skipped:
            first = self.skipped[0]
            log.warning("%s: skipped %d bad row(s) (first: %s: %s)", path, len(self.skipped),
                        first.row, first.reason)
        if not self._examples:
            raise TaskError(f"{path}: no usable rows ({len(rows)} read, "
                            f"{len(self.skipped)} skipped)")

    @staticmethod
    def _load(p: Path, split: str, config: str | None) -> Rows:
        if p.suffix in SUFFIXES:
            if not p.is_file():
                raise TaskError(f"{p}: no such file")
            if p.suffix == ".parquet":
                return _parquet_rows(p)
            text = _decode(p)
            return _jsonl_rows(text) if p.suffix == ".jsonl" else _json_rows(p, text)
        if p.is_file():
            raise TaskError(f"{p}: unsupported file type {p.suffix or '(none)'}; "
                            f"use {', '.join(SUFFIXES)}")
        return _hub_rows(str(p), split, config)

    @staticmethod
    def _field(path: str, what: str, given: str | None, candidates: tuple[str, ...],
               columns: list[str], required: bool = False) -> str | None:
        """The column to use for ``what``: the given one (which must exist) or the first found."""
        found = ", ".join(columns) or "none"
        if given is not None:
            if given not in columns:
                raise TaskError(f"{path}: {what} field {given!r} not found; columns: {found}")
            return given
        chosen = next((c for c in candidates if c in columns), None)
        if chosen is None and required:
            raise TaskError(f"{path}: no {what} field found (looked for {', '.join(candidates)});"
                            f" columns: {found}; pass {what}_field")
        return chosen

    @staticmethod
    def _prompt(row: Any, field: str) -> tuple[str, str | None]:
        """(prompt text, None) or ("", why the row is skipped)."""
        if isinstance(row, json.JSONDecodeError):
            return "", f"invalid JSON: {row}"
        if not isinstance(row, dict):
            return "", f"not a JSON object ({type(row).__name__})"
        if row.get(field) is None:
            return "", f"no {field!r} field"
        text = _text_of(row[field])
        if text is None:
            return "", f"{field!r} holds no text"
        if not text.strip():
            return "", "empty prompt"
        return text, None

    def _ids(self, good: list[tuple[str, dict[str, Any], str]], field: str | None,
             given: bool) -> list[str | None]:
        """One unique id per usable row, or None for a row skipped for its id."""
        if field and not given:
            values = [row.get(field) for _, row, _ in good]
            # A detected id column is only trusted when it identifies every row.
            if None in values or len({str(v) for v in values}) != len(values):
                field = None
        ids: list[str | None] = []
        seen: dict[str, str] = {}
        for where, row, _ in good:
            if field is None:
                rid = where.split()[-1]  # line number (JSONL) or row index
            elif row.get(field) is None:
                self.skipped.append(SkippedRow(where, f"no {field!r} field"))
                ids.append(None)
                continue
            else:
                rid = str(row[field])
            if rid in seen:
                self.skipped.append(SkippedRow(where, f"duplicate id {rid!r} "
                                                      f"(first at {seen[rid]})"))
                ids.append(None)
                continue
            seen[rid] = where
            ids.append(rid)
        return ids

    def examples(self) -> list[Example]:
        return list(self._examples)

    def score(self, example: Example, completion: str) -> bool | None:
        if example.reference is None:
            return None
        a, b = _normalise(completion), _normalise(example.reference)
        if a == b:
            return True
        x, y = _as_number(a), _as_number(b)
        return x is not None and y is not None and x == y


def _normalise(text: str) -> str:
    return " ".join(text.strip().casefold().split())


_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|[-+]?\.\d+")


def _as_number(text: str) -> Decimal | None:
    """The value of ``text`` if it is exactly one number ("1,200", "70.0"), else None."""
    if not _NUMBER.fullmatch(text):
        return None
    try:
        return Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None
