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
