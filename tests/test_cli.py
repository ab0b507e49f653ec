"""The CLI itself: help, every shipped config parses, `test --method` plumbing."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO
from toolkit import cli

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def test_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "cli.py", "--help"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    for sub in ("fit", "validate", "test", "predict", "zoo list", "zoo pull", "label"):
        assert sub in out


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_parses(path, capsys):
    """Each config is parsed by the subcommand it belongs to, without running anything."""
    rel = path.relative_to(REPO / "configs")
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict) and data
    sub = {"label": "label", "test": "test", "generate": "generate",
           "serve": "serve"}.get(rel.parts[0], "fit")
    with pytest.raises(SystemExit) as exit_info:  # --print_config prints and exits 0
        cli.main([sub, "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed


def test_unknown_subcommand_and_method():
    proc = subprocess.run([sys.executable, "cli.py", "frobnicate"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown subcommand 'frobnicate'" in proc.stderr
    proc = subprocess.run([sys.executable, "cli.py", "test", "--method", "nope"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown test method 'nope'" in proc.stderr


def test_method_expands_to_config_first(tmp_path, monkeypatch):
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "demo.yaml").write_text("# a demo method\ntrainer: {}\n")
    monkeypatch.setattr(cli, "CONFIGS", tmp_path)
    args = cli.expand_method(["test", "--trainer.max_epochs", "1", "--method", "demo"])
    assert args == ["test", "--config", str(tmp_path / "test" / "demo.yaml"),
                    "--trainer.max_epochs", "1"]
