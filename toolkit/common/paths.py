"""Where runs are written, and the one UTC stamp that names each run's folder.

Everything a run writes goes to ``<runs root>/<subcommand>/<config name>/<UTC stamp>/`` (SPEC
§D2). The runs root is ``$TOOLKIT_RUNS`` when set (tests point it at a temporary folder; an
installed ``toolkit`` script used outside a checkout can point it anywhere), else ``runs/`` of
the checkout this package lives in, else ``runs/`` under the current directory.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

#: The checkout root when the package runs from a clone (an editable install or ``cli.py``).
REPO = Path(__file__).resolve().parents[2]
RUNS_ENV = "TOOLKIT_RUNS"


def in_checkout() -> bool:
    """True when this package is imported from a clone of the repository (not site-packages)."""
    return (REPO / "pyproject.toml").is_file() and (REPO / "toolkit").is_dir()


def runs_root() -> Path:
    """``$TOOLKIT_RUNS``, else the checkout's ``runs/``, else ``./runs``."""
    env = os.environ.get(RUNS_ENV)
    if env:
        return Path(env).expanduser()
    return REPO / "runs" if in_checkout() else Path.cwd() / "runs"


def utc_stamp() -> str:
    """``20261202T180223123456Z``: UTC, sortable, unique per microsecond (runs started together
    in one second, as tests do, get different folders)."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


def run_folder(subcommand: str, name: str) -> Path:
    """``<runs root>/<subcommand>/<name>/<UTC stamp>`` (not created)."""
    return runs_root() / subcommand / name / utc_stamp()
