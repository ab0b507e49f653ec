"""The resumable JSONL writer and atomic writes."""

from __future__ import annotations

import json

import pytest

from toolkit.common.io import JsonlAppender, ResumeMismatchError, atomic_write_json, read_jsonl
from toolkit.common.splits import split_of


def test_partial_line_is_cut_on_reopen(tmp_path):
    path = tmp_path / "out.jsonl"
    w = JsonlAppender(path, "id", {"a": 1})
    w.append([{"id": 0}, {"id": 1}])
    with open(path, "a") as f:  # what a SIGKILL in the middle of a write leaves behind
        f.write('{"id": 2, "text": "cut sho')
    w2 = JsonlAppender(path, "id", {"a": 1})
    assert w2.cut_bytes > 0
    assert w2.done_keys() == {0, 1}
    w2.append([{"id": 2}])
    assert [r["id"] for r in read_jsonl(path)] == [0, 1, 2]
    assert path.read_text().endswith("\n")


def test_resume_with_other_config_is_refused(tmp_path):
    path = tmp_path / "out.jsonl"
    JsonlAppender(path, "id", {"temperature": 0.0}).append([{"id": 0}])
    with pytest.raises(ResumeMismatchError, match="different configuration"):
        JsonlAppender(path, "id", {"temperature": 0.7})
    assert JsonlAppender(path, "id", {"temperature": 0.0}).done_keys() == {0}


def test_composite_keys_and_atomic_json(tmp_path):
    w = JsonlAppender(tmp_path / "x.jsonl", ("id", "stage"))
    w.append([{"id": "a", "stage": 0}, {"id": "a", "stage": 1}])
    assert w.done_keys() == {("a", 0), ("a", 1)}
    atomic_write_json(tmp_path / "r.json", {"x": 1})
    assert json.loads((tmp_path / "r.json").read_text()) == {"x": 1}
    assert not list(tmp_path.glob(".r.json.*"))


def test_split_is_fixed_and_balanced():
    ids = [f"p/{i}" for i in range(3000)]
    splits = [split_of(i) for i in ids]
    assert splits == [split_of(i) for i in ids]
    frac = {s: splits.count(s) / len(ids) for s in ("train", "val", "test")}
    assert abs(frac["train"] - 0.70) < 0.04 and abs(frac["test"] - 0.15) < 0.03
