"""Shared fixtures: tiny random-weight models (plumbing only) and the repo root."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Tests never touch the Hugging Face hub: everything they load ships in packages or the repo.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# Every run a test starts (in process, or in a subprocess, which inherits the environment)
# writes under this session's temporary folder, never into the clone's runs/. Set at import,
# before test modules build subprocess environments from os.environ.
os.environ["TOOLKIT_RUNS"] = tempfile.mkdtemp(prefix="toolkit-test-runs-")


@pytest.fixture(scope="session")
def runs_root() -> Path:
    """The runs root of this test session (``$TOOLKIT_RUNS``)."""
    return Path(os.environ["TOOLKIT_RUNS"])


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(os.environ["TOOLKIT_RUNS"], ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from toolkit.models.tiny import make_tiny_causal_lm

    return make_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "tiny-a", seed=0)


@pytest.fixture(scope="session")
def tiny_lm_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from toolkit.models.tiny import make_tiny_causal_lm

    return make_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "tiny-b", seed=1, hidden=48)


SHIPPED_RECORDS = REPO / "data" / "cascade"


def copy_shipped_records(dst: Path, per_task: int | None = None,
                         per_split: int | None = None) -> Path:
    """A cut of the shipped cascade records in ``dst``: the first ``per_task`` prompts of each
    task (or the first ``per_split`` of each split), every stage of each, in file order, with
    the prompt-embedding sidecar beside them (it may hold more ids than the cut; loading picks
    the cut's). Tests that replay through the real CLI read a cut, so the default test run's
    time does not grow with the labelled set."""
    for task_dir in sorted(p for p in SHIPPED_RECORDS.iterdir() if p.is_dir()):
        files = sorted(task_dir.glob("stage*.jsonl"))
        if not files:
            if task_dir.name == "prompt_embeddings":
                shutil.copytree(task_dir, dst / task_dir.name)
            continue
        counts: dict[str, int] = {}
        keep: set[str] = set()
        for line in files[0].read_text().splitlines():
            row = json.loads(line)
            key = row["split"] if per_split else ""
            if counts.get(key, 0) < (per_split or per_task or 10**9):
                keep.add(row["id"])
                counts[key] = counts.get(key, 0) + 1
        (dst / task_dir.name).mkdir(parents=True)
        for f in files:
            rows = [ln for ln in f.read_text().splitlines() if json.loads(ln)["id"] in keep]
            (dst / task_dir.name / f.name).write_text("\n".join(rows) + "\n")
            shutil.copy(f"{f}.meta.json", dst / task_dir.name / f"{f.name}.meta.json")
    return dst
