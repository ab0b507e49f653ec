"""Start-up time of the light CLI commands beside a bare interpreter (issue 18, item 5).

    python benchmarks/cli_startup.py [--repeats 5]

Prints, for each command, the median and best wall time of ``--repeats`` fresh processes and
whether the process imported torch or Lightning (it must not: the command table imports a
subcommand's module only when that subcommand runs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMMANDS = {
    "python -c pass": ["-c", "pass"],
    "cli.py --help": ["cli.py", "--help"],
    "cli.py zoo list": ["cli.py", "zoo", "list"],
    "cli.py test --method list": ["cli.py", "test", "--method", "list"],
}
# Runs a command's main() in-process, then reports which heavy packages it imported.
PROBE = ("import json, sys; sys.argv = ['cli.py', *json.loads(sys.argv[1])]\n"
         "from toolkit.cli import main\n"
         "try:\n    main()\nexcept SystemExit:\n    pass\n"
         "print('HEAVY=' + ','.join(m for m in ('torch', 'lightning') if m in sys.modules))")


def timed(args: list[str], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    return times


def heavy_imports(args: list[str]) -> str:
    if args[0] != "cli.py":
        return ""
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(args[1:])], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    return next(ln for ln in out.splitlines() if ln.startswith("HEAVY=")).split("=", 1)[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    print(f"{'command':30} {'median s':>9} {'best s':>8}  imports torch/lightning")
    for name, args in COMMANDS.items():
        times = timed(args, a.repeats)
        heavy = heavy_imports(args)
        print(f"{name:30} {statistics.median(times):9.2f} {min(times):8.2f}  "
              f"{heavy or ('-' if args[0] != 'cli.py' else 'no')}")


if __name__ == "__main__":
    main()
