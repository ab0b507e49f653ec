"""Benchmark tasks and scorers on real data, known right and wrong answers, bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from toolkit.tasks import Example, TaskError, build_task
from toolkit.tasks.agreement import bleu, chrf
from toolkit.tasks.gsm_symbolic import extract_answer
from toolkit.tasks.humaneval import extract_code

FENCE = "```"


@pytest.fixture(scope="module")
def humaneval():
    return build_task("humaneval", limit=3, timeout_s=3.0)


def _whole_function(problem: dict) -> str:
    """A chat-style answer: prose, then only the entry-point function in a python fence."""
    src = problem["prompt"]
    start = src.index(f"def {problem['entry_point']}")
    return (f"Sure, here it is:\n{FENCE}python\n{src[start:]}{problem['canonical_solution']}"
            f"{FENCE}\nThis runs in O(n^2).")


def test_humaneval_canonical_right_wrong_and_fenced(humaneval):
    exs = humaneval.examples()
    assert [e.id for e in exs] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert "```python" in exs[0].prompt and "def has_close_elements(" in exs[0].prompt
    p = humaneval.problems
    assert humaneval.score_many(exs, [p[e.id]["canonical_solution"] for e in exs]) == [True] * 3
    fenced = [_whole_function(p[e.id]) for e in exs]
    assert humaneval.score_many(exs, fenced) == [True] * 3
    wrong = f"{FENCE}python\ndef has_close_elements(numbers, threshold):\n    return False\n{FENCE}"
    res = humaneval.run(exs[0], wrong)
    assert (res.passed, res.status, res.detail) == (False, "failed", "AssertionError")
    assert humaneval.score(exs[1], "    return []\n") is False
    assert humaneval.score(exs[2], "this is not code") is False
    with pytest.raises(ValueError, match="3 examples but 2 completions"):
        humaneval.score_many(exs, ["", ""])


def test_humaneval_helper_from_prompt_and_saved_example():
    # HumanEval/10's solution calls is_palindrome, defined only in the problem prompt.
    task = build_task("humaneval", offset=10, limit=1)
    ex = task.examples()[0]
    assert ex.id == "HumanEval/10" and task.score(ex, _whole_function(task.problems[ex.id]))
    # An example rebuilt from saved outputs (id unknown to this task) is scored from its meta.
    other = build_task("humaneval", limit=1)
    saved = Example("saved/10", ex.prompt, ex.reference, json.loads(json.dumps(ex.meta)))
    assert other.score(saved, ex.reference) is True
    assert other.score(saved, "    return string\n") is False
    with pytest.raises(TaskError, match="not a HumanEval example"):
        other.score(Example("x", "p"), "pass")


def test_extract_code_picks_first_python_block():
    text = (f"{FENCE}text\nnot code\n{FENCE}\nthen\n{FENCE}python\nx = 1\n{FENCE}\n"
            f"{FENCE}\ny\n{FENCE}")
    assert extract_code(text) == "x = 1\n"
    assert extract_code(f"intro\n{FENCE}\nz = 2\n") == "z = 2\n"  # cut off: no closing fence
    assert extract_code("def f():\n    return 1\n") == "def f():\n    return 1\n"


# The sandbox itself (attacks, limits, concurrency) is tested in test_sandbox.py.


def test_gsm_symbolic_ids_and_scoring():
    a, b = build_task("gsm_symbolic", size=40), build_task("gsm_symbolic", size=40)
    assert [(e.id, e.prompt) for e in a.examples()] == [(e.id, e.prompt) for e in b.examples()]
    other = build_task("gsm_symbolic", seed=7, size=3).examples()
    assert other[0].id == "gsm_symbolic/7/0" and other[0].prompt != a.examples()[0].prompt
    ex = a.examples()[0]
    assert ex.id == "gsm_symbolic/42/0" and ex.reference == "70" and "Answer:" in ex.prompt
    assert ex.meta["answer_cot"].endswith("#### 70")
    json.dumps([e.meta for e in a.examples()])  # meta is JSON-serialisable
    assert a.score(ex, "12 + 24 + 34 = 70 students.\nAnswer: 70")
    assert a.score(ex, "The total is $70.00.")
    assert not a.score(ex, "Answer: 71")
    assert not a.score(ex, "70 would be wrong; the answer is 68")
    assert not a.score(ex, "I do not know.")
    big = next(e for e in a.examples() if int(e.reference) >= 1000)
    n = int(big.reference)
    chatty = f"First, {n - 1} + 1 ... so the answer is\nAnswer: {n:,}"
    assert a.score(big, chatty) and not a.score(big, f"Answer: {n + 1:,}")


@pytest.mark.parametrize("text,expected", [
    ("so the answer is\nAnswer: 1,200", "1200"), ("\\boxed{42}", "42"), ("#### 7", "7"),
    ("3 apples and 4 pears make 7.", "7"), ("Answer: -2.5", "-2.5"), ("no digits", None),
    ("**Answer:** $1,200.00", "1200"), ("**Answer**: 70 students", "70"),
    ("Answer: 5\nCheck: 2 + 2 = 4", "5"), ("Answer: 9 ... \\boxed{8}", "9"),
    ("so $\\boxed{1{,}234}$ #### 9", "1234"), ("\\boxed{\\frac{3}{4}}", "0.75"),
    ("#### 12\nthen 13", "12"), ("from 3-4 hours", "4"), ("Final answer: 0.50", "0.5"),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def _write(path: Path, rows: list) -> Path:
    # ensure_ascii=False: the file holds raw non-ASCII text, as files in the wild do.
    lines = (r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_local_prompt_field_detection_and_scoring(tmp_path):
    for field in ("prompt", "problem"):
        task = build_task(str(_write(tmp_path / f"{field}.jsonl",
                                     [{field: "2+2?", "answer": "4", "level": 1}])))
        ex = task.examples()[0]
        assert (ex.id, ex.prompt, ex.reference, ex.meta) == (f"{field}/1", "2+2?", "4",
                                                             {"level": 1})
        assert task.score(ex, " 4 ") and task.score(ex, "4.0") and not task.score(ex, "5")
    msgs = [{"messages": [{"role": "system", "content": "be brief"},
                          {"role": "user", "content": "hi there"},
                          {"role": "assistant", "content": "hello"},
                          {"role": "user", "content": "second\u2028turn"}]}]
    task = build_task("local", path=str(_write(tmp_path / "chat.jsonl", msgs)))
    ex = task.examples()[0]
    assert ex.prompt == "second\u2028turn" and task.score(ex, "x") is None
    rows = [{"id": "q1", "question": "Total?", "target": "1,200"}]
    task = build_task(str(_write(tmp_path / "num.jsonl", rows)))
    ex = task.examples()[0]
    assert ex.id == "num/q1" and task.score(ex, "1200") and task.score(ex, " Total? ") is False
    task = build_task(str(_write(tmp_path / "t.jsonl", [{"input": "Hi", "output": "Hi  There"}])))
    assert task.score_many(task.examples(), ["hi there\n"]) == [True]


def test_local_bad_rows_are_counted_not_fatal(tmp_path, caplog):
    rows = [{"question": "ok 1"}, {"other": "no prompt"}, {"question": "  "}, "{not json",
            "[1, 2]", {"question": "ok 2"}]
    with caplog.at_level(logging.WARNING, logger="toolkit.tasks.local"):
        task = build_task(str(_write(tmp_path / "mixed.jsonl", rows)))
    assert [(e.id, e.prompt) for e in task.examples()] == [("mixed/1", "ok 1"), ("mixed/6", "ok 2")]
    got = [(s.row, s.reason.split(":")[0].split(" (")[0]) for s in task.skipped]
    assert got == [("line 2", "no 'question' field"), ("line 3", "empty prompt"),
                   ("line 4", "invalid JSON"), ("line 5", "not a JSON object")]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 4 bad row(s)" in warnings[0]
    # An id column given by the user: rows repeating an id are skipped, not merged.
    dup = _write(tmp_path / "dup.jsonl", [{"k": "a", "prompt": "x"}, {"k": "a", "prompt": "y"}])
    task = build_task(str(dup), id_field="k")
    assert [e.prompt for e in task.examples()] == ["x"] and "duplicate id" in task.skipped[0].reason


def test_local_errors_name_the_problem(tmp_path):
    with pytest.raises(TaskError, match="no prompt field found .* columns: colour, size"):
        build_task(str(_write(tmp_path / "x.jsonl", [{"colour": "red", "size": 1}])))
    with pytest.raises(TaskError, match="prompt field 'text' not found; columns: colour"):
        build_task(str(tmp_path / "x.jsonl"), prompt_field="text")
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(TaskError, match=r"latin1.jsonl is not UTF-8 \(byte 0xe9 at offset 32\)"):
        build_task(str(bad))
    with pytest.raises(TaskError, match="missing.jsonl: no such file"):
        build_task(str(tmp_path / "missing.jsonl"))
    (tmp_path / "two.json").write_text(json.dumps({"a": [], "b": []}))
    with pytest.raises(TaskError, match="exactly one list; found list keys: a, b"):
        build_task(str(tmp_path / "two.json"))
    with pytest.raises(TaskError, match="no usable rows"):
        build_task(str(_write(tmp_path / "empty.jsonl", [{"prompt": ""}])))
    with pytest.raises(TaskError, match="unknown task 'humanevel'"):
        build_task("humanevel")
    with pytest.raises(TaskError, match="unexpected keyword argument 'sise'"):
        build_task("gsm_symbolic", sise=3)


def test_local_parquet_and_json(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["a", "b"], "instruction": ["x", "y"],
                             "solution": ["1", "2"], "tags": [["t"], []]}),
                   tmp_path / "t.parquet")
    task = build_task(str(tmp_path / "t.parquet"))
    exs = task.examples()
    assert [(e.id, e.prompt, e.reference, e.meta) for e in exs] == [
        ("t/a", "x", "1", {"id": "a", "tags": ["t"]}), ("t/b", "y", "2", {"id": "b", "tags": []})]
    assert task.score_many(exs, ["1", "1"]) == [True, False]
    (tmp_path / "d.json").write_bytes(b"\xef\xbb\xbf" + json.dumps({"data": [{"query": "q"}]})
                                      .encode())
    assert build_task(str(tmp_path / "d.json")).examples()[0].prompt == "q"
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(TaskError, match="bad.parquet is not a readable parquet file"):
        build_task(str(tmp_path / "bad.parquet"))


def test_agreement():
    s = "def add(a, b):\n    return a + b"
    assert bleu(s, s) == 1.0 and chrf(s, s) == 1.0 and bleu("a", "a") == 1.0
    assert bleu("the cat sat on the mat", "quantum flux capacitor x") < 0.05
    assert chrf("aaaa bbbb", "xyz qrs") < 0.05
    near = bleu("the cat sat on the mat", "the cat sat on a mat")
    assert 0.2 < near < 1.0 and 0.2 < chrf("the cat sat on the mat", "the cat sat on a mat") < 1.0
    assert bleu("", "") == 1.0 and chrf("", "") == 1.0
    assert bleu("", "x") == 0.0 and chrf("x", "") == 0.0 and bleu(" ", "x") == 0.0


def test_sft_eval_problems_overlap_the_sft_set_once():
    """README's claim: of configs/qstar/sft_eval.yaml's 64 problems (seed 43), one is also
    among the 100 prompts of the q* SFT set `small` (the first 100 of seed 42)."""
    from toolkit.tasks import build_task

    train = {e.prompt for e in build_task("gsm_symbolic").examples()[:100]}
    held_out = build_task("gsm_symbolic", seed=43).examples()[:64]
    assert sum(e.prompt in train for e in held_out) == 1
