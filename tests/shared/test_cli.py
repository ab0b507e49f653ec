"""The CLI itself: the command table, help, errors, every shipped config, `test --method`."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, copy_shipped_records
from toolkit import cli

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
# SPEC §D2's subcommands: the table may grow, but none of these may disappear from it.
SPEC_SUBCOMMANDS = {"fit", "validate", "test", "predict", "zoo list", "zoo pull", "generate",
                    "label", "export", "serve", "analyze", "report"}
FUNCTION_ROWS = [n for n, c in cli.COMMANDS.items() if c.target != cli.LIGHTNING]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "cli.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=env)


def test_table_holds_every_spec_subcommand_and_help_lists_the_table():
    assert SPEC_SUBCOMMANDS <= set(cli.COMMANDS)
    out = _cli("--help").stdout
    for name, command in cli.COMMANDS.items():
        assert f"  {name}" in out and command.help in out


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_subcommand_has_help(name, capsys):
    """Each row's target exists and documents itself: `<name> --help` prints usage, exits 0."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*name.split(), "--help"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    prog = f"python cli.py {name}" if name in FUNCTION_ROWS else f"python cli.py [options] {name}"
    assert out.startswith(f"usage: {prog}"), out[:200]


_NO_TORCH = textwrap.dedent("""
    import json, sys
    from toolkit.cli import main
    try:
        main(json.loads(sys.argv[1]))
    except SystemExit:
        pass
    heavy = sorted(m for m in ("torch", "lightning", "transformers") if m in sys.modules)
    print("HEAVY=" + ",".join(heavy))
""")
LIGHT_CASES = [["--help"], ["zoo", "list"], ["zoo", "--help"], ["test", "--method", "list"],
               ["frobnicate"], ["test", "--method", "nope"]]
LIGHT_CASES += [[*n.split(), "--help"] for n in FUNCTION_ROWS]
LIGHT_CASES += [[*n.split(), "--no_such_option", "1"] for n in FUNCTION_ROWS]


@pytest.mark.parametrize("args", LIGHT_CASES,
                         ids=" ".join)
def test_light_commands_import_neither_torch_nor_lightning(args):
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH, json.dumps(args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("HEAVY=")]
    assert line == ["HEAVY="], (proc.stdout[-500:], proc.stderr[-2000:])


def test_unknown_subcommand_and_method():
    proc = _cli("frobnicate")
    assert proc.returncode == 2 and "unknown subcommand 'frobnicate'" in proc.stderr
    proc = _cli("test", "--method", "nope")
    assert proc.returncode == 2 and "unknown test method 'nope'" in proc.stderr
    proc = _cli("zoo", "frob")
    assert proc.returncode == 2 and "unknown zoo command 'frob'" in proc.stderr


def test_method_list_names_every_test_config():
    out = _cli("test", "--method", "list").stdout
    for path in (REPO / "configs" / "test").glob("*.yaml"):
        assert any(line.split()[:1] == [path.stem] for line in out.splitlines()), path.stem


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "test").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_every_test_config_names_its_method(path):
    """`test --method NAME` runs configs/test/NAME.yaml; its results must say NAME."""
    assert yaml.safe_load(path.read_text())["model"]["init_args"]["method"] == path.stem


def test_method_expands_to_config_first(tmp_path, monkeypatch):
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "demo.yaml").write_text("# a demo method\ntrainer: {}\n")
    monkeypatch.setattr(cli, "CONFIGS", tmp_path)
    args = cli.expand_method(["test", "--trainer.max_epochs", "1", "--method", "demo"])
    assert args == ["test", "--config", str(tmp_path / "test" / "demo.yaml"),
                    "--trainer.max_epochs", "1"]
    assert cli.expand_method(["test", "--method=demo"])[1:] == [
        "--config", str(tmp_path / "test" / "demo.yaml")]


def test_fit_default_config_only_without_config(capsys, tmp_path):
    """SPEC §D2: `fit` alone uses configs/cascade/fit.yaml; any --config replaces it."""
    with pytest.raises(SystemExit):
        cli.main(["fit", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].endswith("QualityPredictor")
    assert printed["trainer"]["max_epochs"] == yaml.safe_load(
        (REPO / "configs/cascade/fit.yaml").read_text())["trainer"]["max_epochs"]
    own = tmp_path / "own.yaml"
    own.write_text("model:\n  class_path: toolkit.cascade.predictor_module.QualityPredictor\n"
                   "data:\n  class_path: toolkit.cascade.records_datamodule."
                   "CascadeRecordsDataModule\ntrainer:\n  max_epochs: 2\n")
    with pytest.raises(SystemExit):
        cli.main(["fit", "--config", str(own), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["max_epochs"] == 2
    assert not printed["trainer"].get("callbacks")  # fit.yaml's callbacks did not leak in


def test_test_help_mentions_method_and_model_options():
    out = _cli("test", "--help").stdout
    assert "--method NAME" in out and "--model.help" in out


def test_wrong_argument_type_is_one_error_and_a_hint():
    proc = _cli("fit", "--trainer.max_epochs", "abc")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and "trainer.max_epochs" in lines[0]
    assert lines[1:] == ["(see `python cli.py fit --help`)"]
    assert "usage:" not in proc.stderr


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_parses(path, capsys):
    """Each config is parsed by the subcommand it belongs to, without running anything."""
    rel = path.relative_to(REPO / "configs")
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict) and data
    sub = {"label": "label", "test": "test", "generate": "generate",
           "serve": "serve"}.get(rel.parts[0], "fit")
    # A stacked config holds only what differs from its base (first line `# stacks on: BASE`)
    # and is parsed given after it, as its users run it.
    first = path.read_text().splitlines()[0]
    base = [str(REPO / first.split(":", 1)[1].strip())] if first.startswith("# stacks on:") \
        else []
    configs = [a for b in base for a in ("--config", b)]
    with pytest.raises(SystemExit) as exit_info:  # --print_config prints and exits 0
        cli.main([sub, *configs, "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed
    if base:  # a section the stacked file leaves out comes whole from the base; one it sets
        base_data = yaml.safe_load(Path(base[0]).read_text())  # wins, key by key
        for section in ("model", "data"):
            # the stacked file's values where it sets them, the base's everywhere else
            expected = {**base_data[section].get("init_args", {}),
                        **data.get(section, {}).get("init_args", {})}
            got = printed[section]["init_args"]
            assert {k: got[k] for k in expected} == expected, section


def test_runs_root_follows_toolkit_runs(tmp_path, runs_root):
    from toolkit.common.paths import run_folder

    env = {**os.environ, "TOOLKIT_RUNS": str(tmp_path / "elsewhere")}
    code = "from toolkit.common.paths import run_folder; print(run_folder('test', 'x'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=REPO).stdout.strip()
    assert out.startswith(str(tmp_path / "elsewhere" / "test" / "x") + os.sep)
    assert run_folder("a", "b").parent == runs_root / "a" / "b"  # conftest's session root


def test_library_never_imports_the_cli():
    """No module under toolkit/ except toolkit/cli.py imports toolkit.cli (no import cycles)."""
    offenders = []
    for path in (REPO / "toolkit").rglob("*.py"):
        if path == REPO / "toolkit" / "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            if any(n == "toolkit.cli" or n.startswith("toolkit.cli.") for n in names):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders


# ----------------------------------------------------------- records: one option, one line
@pytest.fixture(scope="module")
def small_records(tmp_path_factory) -> Path:
    """The shipped records cut to 6 prompts per split and task (every stage of each prompt)."""
    return copy_shipped_records(tmp_path_factory.mktemp("records"), per_split=6)


def _one_line_error(*args: str) -> str:
    """Run the real CLI; it must fail with status 2 and one ``error:`` line, no traceback."""
    proc = _cli(*args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: "), proc.stderr[-3000:]
    assert "💡 Tip" not in proc.stderr + proc.stdout  # filtered at the entry point (18.10)
    return errors[0]


def _tasks(records: Path) -> int:
    return len([p for p in records.iterdir() if list(p.glob("stage*.jsonl"))])


def test_model_data_dir_alone_moves_the_data_module_too(small_records, runs_root, capsys):
    """18.1: `--model.data_dir X` without `--data.data_dir` runs on X (it used to end in a
    Lightning traceback about merging hparams)."""
    cli.main(["test", "--method", "always-top", "--model.data_dir", str(small_records)])
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("run directory")]
    run = Path(line[-1].split(": ", 1)[1].strip())
    results = json.loads((run / "results.json").read_text())
    assert results["data"]["name"] == str(small_records)
    assert results["data"]["n"] == 18 * _tasks(small_records)  # 6 per split and task
    assert results["command"] == ("python cli.py test --method always-top --model.data_dir "
                                  f"{small_records}")
    last = _one_line_error("test", "--method", "always-top", "--model.data_dir",
                           str(small_records), "--data.data_dir", str(runs_root))
    assert "differ" in last


def test_corrupt_record_line_is_one_line_naming_file_and_line(small_records, tmp_path,
                                                             runs_root):
    """18.2, and 18.9: the failed run leaves no folder behind."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(small_records, bad)
    target = sorted(bad.glob("*/stage0-*.jsonl"))[0]
    lines = target.read_text().splitlines()
    lines[2] = lines[2][: len(lines[2]) // 2]  # a row cut in the middle
    target.write_text("\n".join(lines) + "\n")
    before = set(runs_root.rglob("*"))
    last = _one_line_error("fit", "--data.data_dir", str(bad), "--trainer.max_epochs", "1")
    assert f"{target}:3: not a JSON row" in last
    assert not [p for p in set(runs_root.rglob("*")) - before if p.is_file()]


def test_missing_records_dir_is_one_line(tmp_path):
    last = _one_line_error("fit", "--data.data_dir", str(tmp_path / "nowhere"))
    assert f"no stage records (*/stage*.jsonl) under {tmp_path / 'nowhere'}" in last
