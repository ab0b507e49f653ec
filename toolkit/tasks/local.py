"""Any local JSONL / JSON / parquet file (or a hub dataset, online) as a task.

The prompt field is detected automatically unless given: the first of ``PROMPT_FIELDS``, or an
OpenAI ``messages`` list (its last user message). Rows that are not objects, lack the prompt
field, have an empty prompt or are not valid JSON are skipped and counted, never fatal.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from toolkit.tasks.base import Example, SkippedRow, Task, TaskError

PROMPT_FIELDS = ("prompt", "question", "instruction", "problem", "input", "query")
REFERENCE_FIELDS = ("answer", "reference", "solution", "output", "completion", "target")
ID_FIELDS = ("id", "task_id", "uid", "idx")


def _read_rows(path: Path) -> list[tuple[str, Any]]:
    """(row label, parsed row or an Exception) for every row of the file."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TaskError(f"{path} is not UTF-8 (byte 0x{raw[err.start]:02x} at offset "
                        f"{err.start})") from None
    if path.suffix == ".jsonl":
        rows: list[tuple[str, Any]] = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((f"line {n}", json.loads(line)))
                except json.JSONDecodeError as err:
                    rows.append((f"line {n}", err))
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise TaskError(f"{path} is not valid JSON: {err}") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise TaskError(f"{path}: expected a list of rows, or an object holding one list")
        data = lists[0]
    if not isinstance(data, list):
        raise TaskError(f"{path}: expected a list of rows")
    return [(f"row {i}", r) for i, r in enumerate(data)]


def _prompt_of(row: dict[str, Any], field: str) -> Any:
    if field == "messages":
        users = [m.get("content") for m in row.get("messages") or []
                 if isinstance(m, dict) and m.get("role") == "user"]
        return users[-1] if users else None
    return row.get(field)


class LocalTask(Task):
    """Prompts (and optional references) from a local file or a hub dataset id.

    Args:
        path: a .jsonl/.json/.parquet file, or a hub dataset id (needs the hub: online only).
        prompt_field: the prompt column; detected when None.
        reference_field: the reference column; detected when None (absent: no scoring).
        id_field: the id column; row numbers when None and no id-like column exists.
        split: split of a hub dataset.
        limit: keep the first N valid rows.
    """

    def __init__(self, path: str, prompt_field: str | None = None,
                 reference_field: str | None = None, id_field: str | None = None,
                 split: str = "test", limit: int | None = None) -> None:
        super().__init__()
        p = Path(path)
        self.name = p.stem if p.suffix else path.replace("/", "--")
        rows = self._load(p, path, split)
        objs = [r for _, r in rows if isinstance(r, dict)]
        columns = sorted({k for r in objs for k in r})
        if prompt_field is None:
            prompt_field = next((f for f in (*PROMPT_FIELDS, "messages") if f in columns), None)
            if prompt_field is None:
                raise TaskError(f"{path}: no prompt field found (looked for "
                                f"{', '.join((*PROMPT_FIELDS, 'messages'))}); columns: "
                                f"{', '.join(columns) or 'none'}; pass prompt_field")
        if reference_field is None:
            reference_field = next((f for f in REFERENCE_FIELDS if f in columns), None)
        if id_field is None:
            id_field = next((f for f in ID_FIELDS if f in columns), None)
        self._examples: list[Example] = []
        for label, row in rows:
            reason = self._problem(row, prompt_field)
            if reason:
                self.skipped.append(SkippedRow(label, reason))
                continue
            rid = str(row[id_field]) if id_field and id_field in row else label.split()[-1]
            ref = row.get(reference_field) if reference_field else None
            meta = {k: v for k, v in row.items() if k not in (prompt_field, reference_field)}
            self._examples.append(Example(f"{self.name}/{rid}", str(_prompt_of(row, prompt_field)),
                                          None if ref is None else str(ref), meta))
        self._examples = self._examples[: limit or None]
        if self.skipped:
            print(f"{self.name}: skipped {len(self.skipped)} bad row(s) "
                  f"(first: {self.skipped[0].row}: {self.skipped[0].reason})", file=sys.stderr)
        if not self._examples:
            raise TaskError(f"{path}: no usable rows ({len(self.skipped)} skipped)")

    @staticmethod
    def _problem(row: Any, field: str) -> str | None:
        if isinstance(row, Exception):
            return f"invalid JSON: {row}"
        if not isinstance(row, dict):
            return "not a JSON object"
        prompt = _prompt_of(row, field)
        if prompt is None:
            return f"no {field!r} field"
        if not str(prompt).strip():
            return "empty prompt"
        return None

    @staticmethod
    def _load(p: Path, path: str, split: str) -> list[tuple[str, Any]]:
        if p.suffix in (".jsonl", ".json"):
            if not p.is_file():
                raise TaskError(f"{path}: no such file")
            return _read_rows(p)
        if p.suffix == ".parquet":
            if not p.is_file():
                raise TaskError(f"{path}: no such file")
            import pyarrow.parquet as pq

            return [(f"row {i}", r) for i, r in enumerate(pq.read_table(p).to_pylist())]
        try:
            from datasets import load_dataset

            ds = load_dataset(path, split=split)
        except Exception as err:  # offline, unknown id, ...: one line, not a traceback
            raise TaskError(f"could not load dataset {path!r} (hub datasets need internet; "
                            f"use a local .jsonl/.json/.parquet): {str(err).splitlines()[0]}"
                            ) from None
        return [(f"row {i}", r) for i, r in enumerate(ds)]

    def examples(self) -> list[Example]:
        return list(self._examples)

    def score(self, example: Example, completion: str) -> bool | None:
        if example.reference is None:
            return None
        return _normalise(completion) == _normalise(example.reference) or _same_number(
            completion, example.reference)


def _normalise(text: str) -> str:
    return " ".join(text.strip().casefold().split())


def _same_number(a: str, b: str) -> bool:
    try:
        return abs(float(a.strip().replace(",", "")) - float(b.strip().replace(",", ""))) < 1e-9
    except ValueError:
        return False
