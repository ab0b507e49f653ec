"""README's quick start and CI stay in step."""

from __future__ import annotations

import re

from tests.conftest import REPO


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, re.DOTALL)]


def test_ci_runs_readme_test_command_verbatim():
    blocks = _bash_blocks((REPO / "README.md").read_text())
    assert len(blocks) >= 2, "README's quick start must have two commands"
    test_cmd = blocks[1]
    assert "pytest" in test_cmd and test_cmd.count("\n") == 0
    ci = (REPO / ".ci" / "run").read_text()
    assert test_cmd in ci.splitlines()


def test_quick_start_pins_torch_first():
    for cmd in _bash_blocks((REPO / "README.md").read_text())[:2]:
        assert "torch==2.13.0" in cmd and "install -q -e" in cmd or "install -e" in cmd
        assert cmd.index("torch==2.13.0") < cmd.index("-e '.[cpu,test]'")


def test_data_card_table_matches_the_records():
    from toolkit.cascade.labelling import summarize

    card = (REPO / "data" / "cascade" / "README.md").read_text()
    table = card.split("<!-- table:begin -->")[1].split("<!-- table:end -->")[0].strip()
    assert table == summarize(REPO / "data" / "cascade").strip()


def test_readme_result_tables_match_their_snapshots():
    """Each <!-- report:NAME --> block is `python cli.py report docs/results/NAME.json`."""
    from toolkit.evaluation.report import BLOCK, SNAPSHOTS, render

    text = (REPO / "README.md").read_text()
    blocks = list(BLOCK.finditer(text))
    assert blocks, "README has no report blocks"
    for m in blocks:
        snap = SNAPSHOTS / f"{m['name']}.json"
        assert snap.is_file(), f"README block {m['name']} has no snapshot {snap}"
        import json

        assert m["body"] == render(json.loads(snap.read_text())), (
            f"README block {m['name']} differs from its snapshot: run "
            "`python cli.py report --update_readme_blocks true`")


def test_report_renders_cascade_and_plain_results(tmp_path):
    import json
    import subprocess
    import sys

    r = {"method": "x", "command": "python cli.py test --method x", "git": {"sha": "abc"},
         "data": {"n": 2}, "metrics": {"accuracy": {"value": 0.5, "ci95": [0.0, 1.0], "n": 2},
                                       "by_family": {"a": {"value": 1.0}}}}
    (tmp_path / "results.json").write_text(json.dumps(r))
    proc = subprocess.run([sys.executable, "cli.py", "report", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| accuracy | 0.500 [0.000, 1.000] | 2 |" in proc.stdout
    assert "by_family" not in proc.stdout
    (tmp_path / "bad.json").write_text("{oops")
    proc = subprocess.run([sys.executable, "cli.py", "report", str(tmp_path / "bad.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "bad.json" in proc.stderr


def _run_dir(root, method, correct, ids=None, alpha=None):
    import json

    d = root / method
    d.mkdir()
    ids = ids or [f"t/{i}" for i in range(len(correct))]
    m = {"accuracy": {"value": sum(correct) / len(correct), "ci95": [0.0, 1.0], "n": len(correct)}}
    if alpha is not None:
        m["alpha_mean"] = {"value": alpha, "n": len(correct)}
    from toolkit.evaluation.results import ids_hash

    (d / "results.json").write_text(json.dumps({
        "method": method, "command": f"python cli.py test --method {method}",
        "git": {"sha": "abc"}, "data": {"n": len(ids), "ids_hash": ids_hash(ids)}, "metrics": m}))
    (d / "examples.jsonl").write_text("".join(
        json.dumps({"id": i, "correct": c}) + "\n" for i, c in zip(ids, correct)))
    return str(d)


def test_report_compares_runs_side_by_side_with_paired_differences(tmp_path):
    import json
    import subprocess
    import sys

    import pytest

    from toolkit.evaluation.report import ReportError, compare_runs, render

    a = _run_dir(tmp_path, "base", [1, 0, 0, 1])
    b = _run_dir(tmp_path, "qstar", [1, 1, 0, 1], alpha=0.5)
    c = _run_dir(tmp_path, "teacher", [1, 1, 1, 1])
    proc = subprocess.run([sys.executable, "cli.py", "report", a, b, c, "--compare", "true",
                           "--baselines=[base, teacher]"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| metric | base | qstar | teacher |" in proc.stdout
    assert "| alpha_mean | – | 0.500 | – |" in proc.stdout
    assert "| qstar − base | 0.250 [" in proc.stdout
    assert "| qstar − teacher | -0.250 [" in proc.stdout
    assert "| teacher − base | 0.500 [" in proc.stdout and "base − teacher" not in proc.stdout
    assert "base − base" not in proc.stdout
    assert "--baselines '[\"base\", \"teacher\"]'" in proc.stdout
    comp = compare_runs([a, b])
    assert list(comp["paired"]) == ["qstar − base"] and render(json.loads(json.dumps(comp)))
    other = _run_dir(tmp_path, "other", [1, 1, 1, 1], ids=["t/0", "t/1", "t/2", "t/9"])
    with pytest.raises(ReportError, match="different examples"):
        compare_runs([a, other])
    with pytest.raises(ReportError, match="not among the runs"):
        compare_runs([a, b], baselines=["teacher"])


def test_report_labels_name_runs_of_the_same_method(tmp_path):
    import pytest

    from toolkit.evaluation.report import ReportError, compare_runs

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    before = _run_dir(tmp_path / "a", "base", [1, 0, 0, 1])
    after = _run_dir(tmp_path / "b", "base", [1, 1, 0, 1])
    with pytest.raises(ReportError, match="given twice"):
        compare_runs([before, after])
    comp = compare_runs([before, after], labels=["base", "base+sft"])
    assert comp["methods"] == ["base", "base+sft"]
    assert comp["paired"]["base+sft − base"]["value"] == 0.25
    assert "--labels" in comp["command"]
    with pytest.raises(ReportError, match="2 runs"):
        compare_runs([before, after], labels=["one"])


def test_every_test_file_readme_names_exists():
    """README points readers at test files by path; a move of the tests must update it."""
    text = (REPO / "README.md").read_text()
    named = set(re.findall(r"tests/[\w/]+\.(?:py|toml)", text))
    assert named, "README names no test file"
    missing = sorted(p for p in named if not (REPO / p).is_file())
    assert not missing, f"README names test files that do not exist: {missing}"
