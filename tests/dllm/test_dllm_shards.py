"""Decoding over several processes: whole decode batches round robin (toolkit/dllm/shards.py),
and the stand-alone benchmark over 2 Fabric processes equal to 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from toolkit.dllm.shards import cut_batches, gather_sorted, rank_batches
from toolkit.dllm.tasks_data import make_problems

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def test_ranks_share_whole_batches_once_each():
    problems = (make_problems("worked_sum", "val", 5) + make_problems("string_ops", "val", 3)
                + make_problems("worked_sum", "test", 2))
    batches = cut_batches(problems, 2)
    # Per family, in first-seen order, never mixing families; worked_sum holds 7 problems.
    assert [len(b) for b in batches] == [2, 2, 2, 1, 2, 1]
    assert all(len({p.family for p in b}) == 1 for b in batches)
    for world in (1, 2, 3, 7):
        shares = [rank_batches(problems, 2, r, world) for r in range(world)]
        flat = [p.id for share in shares for b in share for p in b]
        assert sorted(flat) == sorted(p.id for p in problems)  # each exactly once
        assert shares[0][0] == batches[0]
    with pytest.raises(ValueError, match="rank 2 is not in a world of 2"):
        rank_batches(problems, 2, 2, 2)
    # One process: gathering only sorts (and keeps one row per key).
    rows = [{"id": "b", "x": 1}, {"id": "a", "x": 2}, {"id": "b", "x": 3}]
    assert gather_sorted(rows) == [{"id": "a", "x": 2}, {"id": "b", "x": 3}]


def _untimed(obj):
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if k not in ("wall", "tok_s", "processes")}
    return obj


@pytest.mark.slow
def test_benchmark_over_two_fabric_processes_equals_one(tmp_path: Path):
    """`benchmarks/dllm_policies.py --devices 2` (Fabric, ddp on CPU) reports the accuracy
    and NFE of 1 process, wall times aside. ~31 s for both runs on the 2-core machine."""
    out = {}
    for devices in (1, 2):
        path = tmp_path / f"d{devices}.json"
        proc = subprocess.run(
            [sys.executable, "benchmarks/dllm_policies.py", "--n", "3", "--families",
             "chain_sum", "worked_sum", "--devices", str(devices), "--json", str(path)],
            cwd=REPO, capture_output=True, text=True, timeout=600, env=ENV)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[devices] = json.loads(path.read_text())
    assert out[1]["processes"] == 1 and out[2]["processes"] == 2
    assert _untimed(out[2]) == _untimed(out[1])
    assert set(out[1]["per_family"]) == {"chain_sum", "worked_sum"}
