"""Benchmark tasks: a list of prompts plus a ground-truth scorer.

A task turns a data source into ``Example`` rows (id, user prompt, reference) and says whether
a model's completion is correct. Bad source rows are never fatal: they are counted in
``Task.skipped`` with the reason, and reported by whoever runs the task.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


class TaskError(ValueError):
    """Bad task input the user can fix (one line naming the problem)."""


@dataclass(frozen=True)
class Example:
    id: str
    """Stable and unique within the task, e.g. 'HumanEval/0', 'gsm_symbolic/42/7'."""
    prompt: str
    """The user message sent to a chat model (the backend applies the chat template)."""
    reference: str | None = None
    """Ground-truth answer, if any."""
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    """The rest of the source row (JSON-serialisable)."""


@dataclass(frozen=True)
class SkippedRow:
    row: str
    reason: str


class Task(ABC):
    name: str = "task"

    def __init__(self) -> None:
        self.skipped: list[SkippedRow] = []

    @abstractmethod
    def examples(self) -> list[Example]:
        """The task's examples in a fixed order."""

    @abstractmethod
    def score(self, example: Example, completion: str) -> bool | None:
        """True/False against the ground truth; None when the task has none."""

    def score_many(self, examples: Sequence[Example],
                   completions: Sequence[str]) -> list[bool | None]:
        return [self.score(e, c) for e, c in zip(examples, completions)]
