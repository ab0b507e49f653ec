"""Shared fixtures: tiny random-weight models (plumbing only) and the repo root."""

from __future__ import annotations

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
