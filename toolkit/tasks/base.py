"""Benchmark tasks: a list of prompts plus a ground-truth scorer.

A task turns a data source into ``Example`` rows (id, user prompt, reference) and says whether
a model's completion is correct. Bad source rows are never fatal: they are counted in
``Task.skipped`` with the reason, and reported by whoever runs the task. Mistakes the user can
fix (a missing file, an unknown option, no prompt column) raise ``TaskError`` with one line.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from toolkit.common.errors import UserError


class TaskError(UserError, ValueError):
    """Bad task input the user can fix; the message is one line naming the problem."""


@dataclass(frozen=True)
class Example:
    """One prompt of a task, with its ground truth when the task has one."""

    id: str
    """Stable and unique within the task, e.g. 'HumanEval/0', 'gsm_symbolic/42/7'."""
    prompt: str
    """The user message sent to a chat model (the caller applies the chat template)."""
    reference: str | None = None
    """Ground-truth answer, if any (for display and exact match)."""
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    """The rest of the source row (JSON-serialisable), kept in outputs."""


@dataclass(frozen=True)
class SkippedRow:
    """A source row that was not loaded: where it was (e.g. 'line 7') and why."""

    row: str
    reason: str


class Task(ABC):
    """A benchmark: ``examples()`` in a fixed order and a ``score()`` for completions.

    Attributes:
        name: short name, used for output folders and reports.
        skipped: bad rows seen while loading (never fatal).
    """

    name: str = "task"

    def __init__(self) -> None:
        self.skipped: list[SkippedRow] = []

    @abstractmethod
    def examples(self) -> list[Example]:
        """The task's examples, in the same order on every call and every run."""

    @abstractmethod
    def score(self, example: Example, completion: str) -> bool | None:
        """Whether ``completion`` answers ``example`` correctly.

        Returns:
            True/False against the ground truth; None when the example has none.
        """

    def score_many(self, examples: Sequence[Example],
                   completions: Sequence[str]) -> list[bool | None]:
        """``score`` for each (example, completion) pair, in order.

        Raises:
            ValueError: the two sequences differ in length (zip would hide the mismatch).
        """
        check_same_length(examples, completions)
        return [self.score(e, c) for e, c in zip(examples, completions)]


def check_same_length(examples: Sequence[Example], completions: Sequence[str]) -> None:
    """Raise ValueError unless there is exactly one completion per example."""
    if len(examples) != len(completions):
        raise ValueError(f"{len(examples)} examples but {len(completions)} completions")


def jsonable(value: Any) -> Any:
    """``value`` made JSON-serialisable (odd types such as Fraction or datetime become text)."""
    return json.loads(json.dumps(value, default=str, ensure_ascii=False))
