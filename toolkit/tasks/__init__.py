"""Benchmark tasks: prompts plus ground-truth scorers (see base.py)."""

from __future__ import annotations

from typing import Any

from toolkit.tasks.base import Example, SkippedRow, Task, TaskError

TASKS = ("humaneval", "gsm_symbolic", "local")


def build_task(name: str, **options: Any) -> Task:
    """A task by name; a path ending in .jsonl/.json/.parquet means a local file."""
    if name == "humaneval":
        from toolkit.tasks.humaneval import HumanEvalTask

        return HumanEvalTask(**options)
    if name == "gsm_symbolic":
        from toolkit.tasks.gsm_symbolic import GsmSymbolicTask

        return GsmSymbolicTask(**options)
    from toolkit.tasks.local import LocalTask

    if name == "local":
        return LocalTask(**options)
    if name.endswith((".jsonl", ".json", ".parquet")) or "/" in name:
        return LocalTask(name, **options)
    raise TaskError(f"unknown task {name!r}; choose from {', '.join(TASKS)} or a file path")


__all__ = ["Example", "SkippedRow", "Task", "TaskError", "build_task", "TASKS"]
