"""Benchmark tasks and scorers on real data, known right and wrong answers, bad input."""

from __future__ import annotations

import json
import time

import pytest

from toolkit.tasks import TaskError, build_task
from toolkit.tasks.agreement import bleu, chrf
from toolkit.tasks.gsm_symbolic import extract_answer
from toolkit.tasks.sandbox import run_python


@pytest.fixture(scope="module")
def humaneval():
    return build_task("humaneval", limit=3, timeout_s=3.0)


def test_humaneval_canonical_right_wrong_and_fenced(humaneval):
    exs = humaneval.examples()
    p = humaneval.problems
    canonical = [p[e.id]["canonical_solution"] for e in exs]
    assert humaneval.score_many(exs, canonical) == [True, True, True]
    fenced = [f"Here you go:\n```python\n{p[e.id]['prompt']}{p[e.id]['canonical_solution']}```"
              for e in exs]
    assert humaneval.score_many(exs, fenced) == [True, True, True]
    wrong = "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```"
    assert humaneval.score(exs[0], wrong) is False


def test_sandbox_stops_loops_and_contains_damage(tmp_path):
    t0 = time.monotonic()
    res = run_python("while True:\n    pass\n", timeout_s=1.0)
    assert res.status == "timeout" and time.monotonic() - t0 < 4
    res = run_python("x = bytearray(8 << 30)\n", timeout_s=3.0)  # 8 GiB: over the limit
    assert not res.passed
    res = run_python("open('big.bin', 'wb').write(b'0' * (64 << 20))\n", timeout_s=3.0)
    assert not res.passed
    res = run_python(f"import os\nassert os.getcwd() != {str(tmp_path)!r}\n", timeout_s=3.0)
    assert res.passed


def test_gsm_symbolic_ids_and_scoring():
    a, b = build_task("gsm_symbolic", size=5), build_task("gsm_symbolic", size=5)
    assert [e.prompt for e in a.examples()] == [e.prompt for e in b.examples()]
    ex = a.examples()[0]
    assert ex.id == "gsm_symbolic/42/0" and ex.reference == "70"
    assert a.score(ex, "12 + 24 + 34 = 70 students.\nAnswer: 70")
    assert a.score(ex, "The total is $70.00.")
    assert not a.score(ex, "Answer: 71")
    assert not a.score(ex, "I do not know.")


@pytest.mark.parametrize("text,expected", [
    ("so the answer is\nAnswer: 1,200", "1200"), ("\\boxed{42}", "42"), ("#### 7", "7"),
    ("3 apples and 4 pears make 7.", "7"), ("Answer: -2.5", "-2.5"), ("no digits", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_local_prompt_field_detection(tmp_path):
    for field in ("prompt", "problem"):
        task = build_task(str(_write(tmp_path / f"{field}.jsonl",
                                     [{field: "2+2?", "answer": "4"}])))
        ex = task.examples()[0]
        assert ex.prompt == "2+2?" and task.score(ex, " 4 ") and not task.score(ex, "5")
    msgs = [{"messages": [{"role": "system", "content": "be brief"},
                          {"role": "user", "content": "hi there"}]}]
    task = build_task(str(_write(tmp_path / "chat.jsonl", msgs)))
    assert task.examples()[0].prompt == "hi there" and task.score(task.examples()[0], "x") is None


def test_local_bad_rows_are_counted_not_fatal(tmp_path):
    rows = [{"question": "ok 1"}, {"other": "no prompt"}, {"question": "  "}, "{not json",
            {"question": "ok 2"}]
    task = build_task(str(_write(tmp_path / "mixed.jsonl", rows)))
    assert [e.prompt for e in task.examples()] == ["ok 1", "ok 2"]
    reasons = sorted(s.reason.split(":")[0] for s in task.skipped)
    assert reasons == ["empty prompt", "invalid JSON", "no 'question' field"]


def test_local_errors_name_the_problem(tmp_path):
    with pytest.raises(TaskError, match="no prompt field found .* columns: colour, size"):
        build_task(str(_write(tmp_path / "x.jsonl", [{"colour": "red", "size": 1}])))
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(TaskError, match=r"not UTF-8 \(byte 0xe9 at offset 15\)"):
        build_task(str(bad))
    with pytest.raises(TaskError, match="no such file"):
        build_task(str(tmp_path / "missing.jsonl"))


def test_local_parquet_and_json(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["a", "b"], "instruction": ["x", "y"]}), tmp_path / "t.parquet")
    task = build_task(str(tmp_path / "t.parquet"))
    assert [e.id for e in task.examples()] == ["t/a", "t/b"]
    (tmp_path / "d.json").write_text(json.dumps({"data": [{"query": "q"}]}))
    assert build_task(str(tmp_path / "d.json")).examples()[0].prompt == "q"


def test_agreement():
    s = "def add(a, b):\n    return a + b"
    assert bleu(s, s) == pytest.approx(1.0) and chrf(s, s) == pytest.approx(1.0)
    assert bleu("the cat sat on the mat", "quantum flux capacitor x") < 0.1
    assert bleu("", "") == 1.0 and bleu("", "x") == 0.0 and chrf("x", "") == 0.0
