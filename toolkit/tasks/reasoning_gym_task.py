"""Any procedural family of ``reasoning-gym`` as a task: seeded, offline, ground-truth scored.

In a config: ``{name: reasoning_gym, options: {dataset: basic_arithmetic, seed: 7, size: 200}}``
(``config: {...}`` passes the family's own generator options, e.g. ``{max_terms: 4}``).

Ids are ``<dataset>/<seed>/<index>``, so they are unique across families and seeds, and the
family of a labelled record is the first part of its id. Problem ``i`` does not depend on
``size``: ``size=20`` gives the first 20 problems of ``size=200``. Beware that most families
draw problem ``i`` from ``Random(seed + i)``: seeds 7 and 8 share all but one problem, so seeds
of one family used side by side must lie at least ``size`` apart. A question met twice within a
task is skipped (listed in ``skipped``), so a prompt is labelled once.

The prompt is the question plus one instruction asking for the final answer on its own last
line as ``Answer: ...``. Scoring is exact on the extracted final answer (see ``answers.py``):
a numeric reference is compared as a decimal number (as for GSM-Symbolic); any other reference
goes to reasoning-gym's own ``score_answer``, and only its full score (1.0) counts as correct,
since several families give partial credit to wrong answers.
"""

from __future__ import annotations

import difflib
from typing import Any

from toolkit.tasks.answers import answers_match, extract_answer, extract_text_answer, to_decimal
from toolkit.tasks.base import Example, SkippedRow, Task, TaskError, jsonable

INSTRUCTION = ("\n\nReason step by step, then give the final answer on its own last line as "
               "'Answer: <answer>'.")


def _dataset_names() -> list[str]:
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


class ReasoningGymTask(Task):
    """``size`` problems of one reasoning-gym family, generated with a fixed ``seed``.

    Args:
        dataset: the reasoning-gym family, e.g. "basic_arithmetic", "leg_counting".
        seed: generator seed; part of every example id.
        size: problems generated.
        limit: keep the first N of them (None or 0: all).
        config: the family's own generator options (reasoning-gym's dataset config fields).
        task_name: the task's name (output folder, the records' ``task`` field); default the
            family name. Two seeds of one family in one label run need two names.
    """

    instruction = INSTRUCTION

    def __init__(self, dataset: str, seed: int = 42, size: int = 200, limit: int | None = None,
                 config: dict[str, Any] | None = None, task_name: str | None = None) -> None:
        super().__init__()
        names = _dataset_names()
        if dataset not in names:
            close = difflib.get_close_matches(str(dataset), names, n=3)
            hint = f"did you mean {', '.join(close)}?" if close else f"{len(names)} exist"
            raise TaskError(f"unknown reasoning-gym dataset {dataset!r} ({hint})")
        if not isinstance(seed, int) or not isinstance(size, int) or size < 1 \
                or (limit is not None and limit < 0):
            raise TaskError(f"{dataset}: need an integer seed, size >= 1 and limit >= 0 "
                            f"(got {seed!r}, {size!r}, {limit!r})")
        if config is not None and not isinstance(config, dict):
            raise TaskError(f"{dataset}: config must be a mapping of generator options, "
                            f"got {config!r}")
        self.dataset, self.seed = dataset, seed
        self.name = task_name or dataset
        self.data = _create(dataset, seed, size, config or {})
        self._entries: dict[str, dict[str, Any]] = {}
        self._examples: list[Example] = []
        seen: dict[str, str] = {}
        for i in range(size)[: limit or None]:
            item = self.data[i]
            example_id = f"{dataset}/{seed}/{i}"
            question, answer = item["question"], str(item["answer"]).strip()
            if not answer:  # not expected; never fatal
                self.skipped.append(SkippedRow(str(i), "empty answer"))
                continue
            if question in seen:
                self.skipped.append(SkippedRow(str(i), f"same question as {seen[question]}"))
                continue
            seen[question] = example_id
            self._entries[example_id] = item
            self._examples.append(Example(
                example_id, question + self.instruction, answer,
                {"question": question, **jsonable(item.get("metadata") or {})}))

    def examples(self) -> list[Example]:
        return list(self._examples)

    def score(self, example: Example, completion: str) -> bool | None:
        if example.reference is None:
            return None
        if to_decimal(example.reference) is not None:
            return answers_match(extract_answer(completion), example.reference)
        entry = self._entries.get(example.id) or {  # an example rebuilt from saved outputs
            "question": example.meta.get("question", ""), "answer": example.reference,
            "metadata": {k: v for k, v in example.meta.items() if k != "question"}}
        try:
            reward = self.data.score_answer(extract_text_answer(completion), entry)
        except Exception:  # some scorers raise on malformed answers: those are wrong answers
            return False
        return float(reward) >= 1.0


def _create(dataset: str, seed: int, size: int, config: dict[str, Any]) -> Any:
    """The reasoning-gym dataset; its own complaints about options become one-line errors."""
    import reasoning_gym

    try:
        return reasoning_gym.create_dataset(dataset, seed=seed, size=size, **config)
    except (TypeError, ValueError, AssertionError, KeyError) as err:
        detail = " ".join(str(err).split()) or type(err).__name__
        raise TaskError(f"{dataset}: bad config {config!r}: {detail}") from None
