"""Benchmark tasks: prompts plus ground-truth scorers (see base.py).

``build_task("humaneval", limit=20)``, ``build_task("gsm_symbolic", seed=42, size=200)``,
``build_task("reasoning_gym", dataset="leg_counting", seed=7, size=200)`` (any reasoning-gym
family), ``build_task("local", path="data/x.jsonl")`` or simply ``build_task("data/x.jsonl")``.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from toolkit.tasks.base import Example, SkippedRow, Task, TaskError

# name -> (module, class); imported on demand so that e.g. a local file does not pay for
# importing reasoning-gym.
_REGISTRY: dict[str, tuple[str, str]] = {
    "humaneval": ("toolkit.tasks.humaneval", "HumanEvalTask"),
    "gsm_symbolic": ("toolkit.tasks.gsm_symbolic", "GsmSymbolicTask"),
    "reasoning_gym": ("toolkit.tasks.reasoning_gym_task", "ReasoningGymTask"),
    "local": ("toolkit.tasks.local", "LocalTask"),
}
TASKS = tuple(_REGISTRY)
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


def build_task(name: str, **options: Any) -> Task:
    """A task by registry name; a path ending in .jsonl/.json/.parquet means a local file.

    A name with a "/" that is not registered (e.g. "openai/gsm8k") is treated as a local
    path or, failing that, a Hugging Face dataset id (which needs the hub).

    Args:
        name: "humaneval", "gsm_symbolic", "reasoning_gym", "local", or a data file path.
        **options: the task's own arguments (e.g. ``limit``, ``seed``, ``prompt_field``).

    Raises:
        TaskError: unknown task, unknown or missing option, or bad data (one line).
    """
    args: tuple[Any, ...] = ()
    key = name.strip().lower()
    if key not in _REGISTRY:
        if not (name.endswith(FILE_SUFFIXES) or "/" in name):
            raise TaskError(f"unknown task {name!r}; choose from {', '.join(TASKS)} "
                            f"or a {'/'.join(FILE_SUFFIXES)} file")
        key, args = "local", (name,)
    module, cls_name = _REGISTRY[key]
    cls = getattr(importlib.import_module(module), cls_name)
    try:
        inspect.signature(cls).bind(*args, **options)
    except TypeError as err:  # a typo in a config file: name it instead of a traceback
        accepted = ", ".join(p for p in inspect.signature(cls).parameters if not args or
                             p != "path")
        raise TaskError(f"task {name!r}: {err} (options: {accepted})") from None
    return cls(*args, **options)


__all__ = ["Example", "SkippedRow", "Task", "TaskError", "build_task", "TASKS"]
