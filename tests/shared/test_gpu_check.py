"""`benchmarks/gpu_check.py --dry_run`: the GPU check's code paths on tiny shapes, on CPU.

It runs as the GPU machine would run it: a separate process with ``PYTHONPATH=.`` and a bare
environment, and with lightning, jsonargparse, fastapi and pytest made unimportable (that
machine has none of them), so an import of any of them anywhere on the check's paths fails here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO
from toolkit.generation.conformance import CHECKS

BLOCKED = ("lightning", "jsonargparse", "fastapi", "pytest")

# Runs the script with a meta-path finder that refuses the modules the GPU machine lacks.
RUNNER = f"""
import runpy, sys
BLOCKED = {BLOCKED!r}

class Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED or name == "lightning_fabric":
            raise ImportError(f"{{name}} is not installed on the GPU machine")
        return None

sys.meta_path.insert(0, Missing())
sys.argv = ["benchmarks/gpu_check.py", *sys.argv[1:]]
runpy.run_path("benchmarks/gpu_check.py", run_name="__main__")
"""


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {k: os.environ[k] for k in ("PATH", "HOME", "TMPDIR") if k in os.environ}
    env["PYTHONPATH"] = "."  # and nothing else: the script sets what it needs
    return subprocess.run([sys.executable, "-c", RUNNER, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_blocker_blocks():
    """The runner's finder really makes a blocked module unimportable."""
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": "."}
    probe = RUNNER.replace('runpy.run_path("benchmarks/gpu_check.py", run_name="__main__")',
                           "import jsonargparse")
    bad = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode != 0 and "not installed on the GPU machine" in bad.stderr


def test_dry_run_writes_a_sane_report(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = _run("--dry_run", "--out", str(out))
    r = json.loads(out.read_text()) if out.exists() else {}
    failures = {k: v.get("traceback") or v for k, v in r.items()
                if isinstance(v, dict) and v.get("status") not in (None, "ok")}
    assert proc.returncode == 0, (proc.stderr[-3000:], failures)
    assert f"wrote {out}" in proc.stdout
    assert r["environment"]["dry_run"] is True and r["environment"]["device"] == "cpu"
    for name in ("conformance", "generation", "qstar", "dllm"):
        assert r[name]["status"] == "ok", r[name]
        assert r[name]["seconds"] > 0
    assert 0 < sum(r[n]["seconds"] for n in ("conformance", "generation", "qstar", "dllm")) \
        <= r["total_seconds"]

    conf = r["conformance"]
    assert conf["all_passed"] is True and set(conf["checks"]) == set(CHECKS)

    gen = r["generation"]
    assert "speed only" in gen["note"] and gen["dtype"] == "bfloat16"
    assert set(gen["batches"]) == {"1", "8"}
    for b in gen["batches"].values():
        assert b["ours_tokens_per_s"] > 0 and b["model_generate_tokens_per_s"] > 0
        assert b["ours_over_generate"] == pytest.approx(
            b["ours_tokens_per_s"] / b["model_generate_tokens_per_s"])
    assert gen["model"]["params"] > gen["model"]["non_embedding_params"] > 0

    q = r["qstar"]
    assert q["batch"] == 8 and "speed only" in q["note"]
    assert set(q["tokens_per_s"]) == {"forwards", "fixed", "kl_symmetry"}
    assert all(v > 0 for v in q["tokens_per_s"].values())
    solve = q["alpha_solve"]
    assert solve["fixed"]["iterations"] == 0 and solve["kl_symmetry"]["iterations"] >= 1
    assert solve["fixed"]["ms_per_solve"] > 0 and solve["kl_symmetry"]["ms_per_solve"] > 0
    assert solve["vocab"] == q["t"]["shape"]["vocab_size"]

    d = r["dllm"]
    gen_length = d["gen_length"]
    for batch in d["batches"].values():
        pol = batch["policies"]
        # The reference decodes one token per full forward: gen_length forwards, none cached.
        assert pol["llada"]["batch_forwards_full"] == gen_length
        assert pol["llada"]["batch_forwards_cached"] == 0
        for name in batch["cache_speedup"]:
            assert pol[name]["batch_forwards_cached"] > 0 and pol[name]["cache_hit_rate"] > 0
            assert batch["cache_speedup"][name] > 0
        for p in pol.values():
            assert p["wall_s"] > 0 and p["ms_per_forward"] > 0 and p["answer_tokens_per_s"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="there is a GPU here")
def test_without_cuda_it_says_so_in_one_line(tmp_path):
    proc = _run("--out", str(tmp_path / "x.json"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "gpu_check: no CUDA device here; --dry_run checks the code paths on CPU"]
    assert not (tmp_path / "x.json").exists()
