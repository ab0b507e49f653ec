"""`python cli.py label` for real on tiny models: files, fields, and a SIGKILL mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import yaml

from tests.conftest import REPO
from toolkit.common.io import read_jsonl

N_PROMPTS = 24


def _write_config(tmp_path, tiny_lm, tiny_lm_b, max_new_tokens=24):
    tmp_path.mkdir(parents=True, exist_ok=True)
    prompts = tmp_path / "prompts.jsonl"
    with open(prompts, "w") as f:
        for i in range(N_PROMPTS):
            f.write(json.dumps({"id": f"q{i}", "question": f"What is {i} + {i}?",
                                "answer": str(2 * i)}) + "\n")
        f.write(json.dumps({"id": "bad", "question": "   "}) + "\n")  # empty prompt: counted
    cfg = {
        "stages": [{"model": str(tiny_lm)}, {"model": str(tiny_lm_b)}],
        "tasks": [{"name": str(prompts), "options": {}}],
        "decoding": {"max_new_tokens": max_new_tokens},
        "out_dir": str(tmp_path / "out"), "batch_size": 4, "threads": 1,
    }
    path = tmp_path / "label.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _records(out):
    rows = {}
    for f in sorted(out.glob("*/stage*.jsonl")):
        for r in read_jsonl(f):
            key = (r["id"], r["stage"])
            assert key not in rows, f"duplicate record {key}"
            rows[key] = r
    return rows


def test_label_writes_every_record_with_its_fields(tmp_path, tiny_lm, tiny_lm_b):
    cfg = _write_config(tmp_path, tiny_lm, tiny_lm_b, max_new_tokens=8)
    proc = subprocess.run([sys.executable, "cli.py", "label", "--config", str(cfg)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _records(tmp_path / "out")
    assert len(rows) == 2 * N_PROMPTS
    r = rows[("prompts/q3", 0)]
    for field in ("output", "correct", "agreement_bleu", "agreement_chrf", "prompt_tokens",
                  "generated_tokens", "stop_reason", "decoding", "backend", "model",
                  "model_sha256", "quantisation", "batch_size", "batch_wall_s", "cost_flops",
                  "split", "tokens"):
        assert field in r, field
    t = r["tokens"]
    assert len(t["token_ids"]) == r["generated_tokens"] == len(t["entropies"])
    assert len(t["top_logprobs"][0]) == 5
    assert rows[("prompts/q3", 1)]["agreement_bleu"] == 1.0  # the top stage agrees with itself
    assert r["cost_flops"] == 2 * r["non_embedding_params"] * (
        r["prompt_tokens"] + r["generated_tokens"])
    skipped = json.loads(next((tmp_path / "out").glob("*/skipped.json")).read_text())
    assert len(skipped) == 1 and "empty" in skipped[0]["reason"]
    assert "| task | stage |" in proc.stdout
    assert f"records written to {(tmp_path / 'out').resolve()}/" in proc.stdout  # issue 18.6


def test_label_survives_sigkill(tmp_path, tiny_lm, tiny_lm_b):
    """Kill the labeller mid-run with SIGKILL, run again: every record exactly once."""
    cfg = _write_config(tmp_path, tiny_lm, tiny_lm_b, max_new_tokens=48)
    out = tmp_path / "out"
    cmd = [sys.executable, "cli.py", "label", "--config", str(cfg)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:  # wait for the first records
        if sum(1 for f in out.glob("*/stage*.jsonl") for _ in open(f)) >= 6:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "labeller finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = len(_records(out))
    assert 0 < partial < 2 * N_PROMPTS
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _records(out)
    assert len(rows) == 2 * N_PROMPTS
    # Same content as an uninterrupted run (greedy, fixed batches by prompt order).
    ref_cfg = _write_config(tmp_path / "ref", tiny_lm, tiny_lm_b, max_new_tokens=48)
    subprocess.run([sys.executable, "cli.py", "label", "--config", str(ref_cfg)], cwd=REPO,
                   capture_output=True, check=True, timeout=300)
    ref = _records(tmp_path / "ref" / "out")
    assert {k: v["output"] for k, v in rows.items()} == {k: v["output"] for k, v in ref.items()}
