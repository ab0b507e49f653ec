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


# --------------------------------------------------------------------- one writer per output
# A second writer is a real second process: flock is per open file, and the lock is meant to
# stop another `label` / `generate` / q* evaluation, not another object in this process.

HOLDER = """
import sys, time
from toolkit.common.io import JsonlAppender
w = JsonlAppender(sys.argv[1], "id", {"a": 1})
todo = [i for i in range(int(sys.argv[2])) if i not in w.done_keys()]
print("holding", flush=True)
for i in todo:  # one row per write, slowly: the other process runs while this one writes
    w.append([{"id": i}])
    time.sleep(float(sys.argv[3]))
print("done", flush=True)
time.sleep(600)  # still holding until the test kills it
"""


def _start_holder(path, n: int = 0, pause: float = 0.0):
    import subprocess
    import sys

    from tests.conftest import REPO

    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), str(n), str(pause)],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "holding"
    return proc


def _try_write(path, n: int) -> int:
    """What a second run does: open the output, resume, write what is missing."""
    w = JsonlAppender(path, "id", {"a": 1})
    rows = [{"id": i} for i in range(n) if i not in w.done_keys()]
    w.append(rows)
    w.close()
    return len(rows)


def test_second_process_is_refused_with_the_holders_pid(tmp_path):
    from toolkit.common.errors import UserError
    from toolkit.common.io import OutputLockedError

    path = tmp_path / "out.jsonl"
    proc = _start_holder(path, n=20, pause=0.05)
    try:
        with pytest.raises(OutputLockedError, match=rf"pid {proc.pid}\b") as err:
            _try_write(path, 20)
        assert isinstance(err.value, UserError) and "\n" not in str(err.value)
        assert proc.stdout.readline().strip() == "done"
    finally:
        proc.kill()
        proc.wait()
    # The holder wrote every row; the refused run wrote none: each id exactly once.
    ids = [r["id"] for r in read_jsonl(path)]
    assert sorted(ids) == list(range(20))
    assert _try_write(path, 24) == 4  # after the holder ends, the next run resumes normally
    assert [r["id"] for r in read_jsonl(path)] == list(range(24))


def test_sigkilled_holder_leaves_the_output_writable(tmp_path):
    import signal
    import time

    from toolkit.common.io import OutputLockedError

    path = tmp_path / "out.jsonl"
    proc = _start_holder(path, n=1000, pause=0.01)
    with pytest.raises(OutputLockedError):
        JsonlAppender(path, "id", {"a": 1})
    deadline = time.monotonic() + 30
    while (not path.exists() or path.stat().st_size < 100) and time.monotonic() < deadline:
        time.sleep(0.01)  # kill it mid-run, after some rows
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(list(read_jsonl(path)))
    assert 0 < written < 1000
    assert _try_write(path, 1000) == 1000 - written  # the OS released the dead holder's lock
    ids = [r["id"] for r in read_jsonl(path)]
    assert sorted(ids) == list(range(1000)) and len(set(ids)) == len(ids)


def test_lock_is_shared_within_a_process_and_released_on_close(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    path = tmp_path / "out.jsonl"
    probe = ("import sys\nfrom toolkit.common.io import JsonlAppender, OutputLockedError\n"
             "try:\n    JsonlAppender(sys.argv[1], 'id')\nexcept OutputLockedError:\n"
             "    sys.exit(3)\n")

    def other_process_can_open() -> bool:
        rc = subprocess.run([sys.executable, "-c", probe, str(path)], cwd=REPO).returncode
        assert rc in (0, 3)
        return rc == 0

    a = JsonlAppender(path, "id")
    b = JsonlAppender(path, "id")  # same process: one writer, no self-deadlock
    a.close()
    assert not other_process_can_open()  # b still holds it
    b.close()
    assert other_process_can_open()
    with pytest.raises(RuntimeError, match="after close"):
        b.append([{"id": 0}])


def test_duplicated_rows_are_refused(tmp_path):
    from toolkit.cascade.labelling import summarize
    from toolkit.common.errors import UserError
    from toolkit.common.io import DuplicateRowsError, read_jsonl_unique

    # What two unlocked label runs left behind: every row twice.
    row = {"id": "humaneval/0", "task": "humaneval", "stage": 0, "model": "m", "correct": 1.0,
           "agreement_bleu": 1.0, "batch_id": 0, "batch_wall_s": 1.0, "generated_tokens": 5}
    f = tmp_path / "humaneval" / "stage0-m.jsonl"
    f.parent.mkdir()
    f.write_text(json.dumps(row) + "\n" + json.dumps({**row, "id": "humaneval/1"}) + "\n")
    assert "| humaneval | 0 | m | 2 |" in summarize(tmp_path)
    with open(f, "a") as out:
        out.write(json.dumps(row) + "\n")
    with pytest.raises(DuplicateRowsError, match=r"stage0-m\.jsonl.*'humaneval/0'.*rows 1 and 3"):
        summarize(tmp_path)
    with pytest.raises(DuplicateRowsError):
        read_jsonl_unique(f, "id")
    with pytest.raises(UserError):  # resuming on such a file is refused too
        JsonlAppender(f, "id").done_keys()


def test_label_and_generate_refuse_an_output_another_process_writes(tmp_path, tiny_lm, tiny_lm_b):
    """The real jobs take the lock before reading or loading anything."""
    from toolkit.cascade.labelling import StageSpec, TaskSpec, label, stage_file
    from toolkit.common.io import OutputLockedError
    from toolkit.qstar.generate_data import generate

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "question": f"{i} + 1?",
                                           "answer": str(i + 1)}) + "\n" for i in range(4)))
    out = tmp_path / "gen.jsonl"
    proc = _start_holder(out)
    try:
        with pytest.raises(OutputLockedError, match=rf"gen\.jsonl .*pid {proc.pid}\b"):
            generate(str(prompts), str(out), model=str(tiny_lm))
        held = stage_file(tmp_path / "label", "prompts", 1, tiny_lm_b.name)
        proc2 = _start_holder(held)
        try:
            with pytest.raises(OutputLockedError, match=rf"pid {proc2.pid}\b"):
                label([StageSpec(str(tiny_lm)), StageSpec(str(tiny_lm_b))],
                      [TaskSpec(str(prompts))], out_dir=str(tmp_path / "label"))
        finally:
            proc2.kill()
            proc2.wait()
    finally:
        proc.kill()
        proc.wait()
    assert not out.exists()  # the refused run wrote nothing (the holder had nothing to write)


def test_second_resumable_qstar_evaluation_is_refused(tmp_path, tiny_lm, tiny_lm_b, capsys):
    from toolkit import cli

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "p0", "prompt": "1 + 1 =", "answer": "2"}) + "\n")
    proc = _start_holder(tmp_path / "resume" / "qstar-entropy.rows.jsonl")
    try:
        with pytest.raises(SystemExit) as exit_:
            cli.main(["test", "--method", "qstar-entropy",
                      "--model.init_args.model_theta", str(tiny_lm),
                      "--model.init_args.model_t", str(tiny_lm_b),
                      "--model.init_args.resume_dir", str(tmp_path / "resume"),
                      "--data.init_args.task", str(prompts), "--data.init_args.limit", "1",
                      "--trainer.default_root_dir", str(tmp_path / "runs")])
    finally:
        proc.kill()
        proc.wait()
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any(f"pid {proc.pid}" in line and "qstar-entropy.rows.jsonl" in line for line in err)


@pytest.mark.slow
def test_two_label_commands_on_one_output(tmp_path, tiny_lm, tiny_lm_b):
    """The issue's case through the real CLI: the second `label` is refused, rows stay single."""
    import subprocess
    import sys
    import time

    import yaml

    from tests.conftest import REPO
    from toolkit.cascade.labelling import summarize

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "question": f"What is {i} + {i}?",
                                           "answer": str(2 * i)}) + "\n" for i in range(12)))
    cfg = tmp_path / "label.yaml"
    cfg.write_text(yaml.safe_dump({
        "stages": [{"model": str(tiny_lm)}, {"model": str(tiny_lm_b)}],
        "tasks": [{"name": str(prompts), "options": {}}], "decoding": {"max_new_tokens": 48},
        "out_dir": str(tmp_path / "out"), "batch_size": 2, "chunk_size": 2, "threads": 1}))
    cmd = [sys.executable, "cli.py", "label", "--config", str(cfg)]
    first = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    lock = tmp_path / "out" / "prompts" / f"stage0-{tiny_lm.name}.jsonl.lock"
    deadline = time.monotonic() + 240
    while first.poll() is None and time.monotonic() < deadline and not (
            lock.exists() and lock.read_text().strip() == str(first.pid)):
        time.sleep(0.1)
    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert first.poll() is None, "the first run ended before the second started"
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and f"pid {first.pid}" in lines[0], second.stderr[-2000:]
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    for f in (tmp_path / "out" / "prompts").glob("stage*.jsonl"):
        ids = [r["id"] for r in read_jsonl(f)]
        assert len(ids) == len(set(ids)) == 12
    assert summarize(tmp_path / "out").count("| 12 |") == 2
