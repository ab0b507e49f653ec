"""Replay evaluation: baselines on the shipped records through the real CLI, and the math."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO
from toolkit.cascade import replay


def _run(method: str) -> dict:
    proc = subprocess.run([sys.executable, "cli.py", "test", "--method", method], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("results: ")][-1]
    path = line.split(": ", 1)[1].strip()
    results = json.loads(open(path).read())
    results["_dir"] = path.rsplit("/", 1)[0]
    return results


@pytest.fixture(scope="module")
def table():
    return replay.load_prompt_table(REPO / "data" / "cascade")


def test_baselines_through_cli_write_results(table):
    top, oracle = _run("always-top"), _run("oracle")
    for r in (top, oracle):
        assert r["schema_version"] == 1 and r["data"]["n"] == len(table.ids)
        assert set(r["metrics"]["accuracy"]) == {"value", "ci95", "n"}
        assert len(r["models"]) == 3 and all(len(m["sha256"]) == 64 for m in r["models"])
        rows = open(f"{r['_dir']}/examples.jsonl").read().splitlines()
        assert len(rows) == len(table.ids)
        assert [json.loads(x)["id"] for x in rows] == sorted(table.ids.tolist())
    assert top["metrics"]["relative_cost"]["value"] == pytest.approx(1.0)
    assert oracle["metrics"]["accuracy"]["value"] >= top["metrics"]["accuracy"]["value"]
    assert (REPO / top["_dir"] / "plots" / "quality_vs_cost.png").is_file()


def test_fixed_methods_and_random_cost(table):
    n = np.arange(len(table.ids))
    s_or, c_or = replay.fixed_method("oracle", table)
    s_rt, c_rt = replay.fixed_method("oracle-route", table)
    assert (s_or == s_rt).all() and (c_rt <= c_or + 1e-12).all()
    s2, c2 = replay.fixed_method("fixed-2stage", table)
    assert np.allclose(c2, table.C[:, 0] + table.C[:, -1])
    assert (table.Y[n, s_or] >= table.Y[n, -1]).all()  # the oracle is never worse than top
    runs = [replay.random_escalation(table, 0.5, s)[1].mean() for s in range(20)]
    assert abs(np.mean(runs) - 0.5) < 0.1
