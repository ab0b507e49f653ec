"""Run model-written Python in an isolated child process with hard limits.

The code comes from a language model, so it is treated as hostile: it runs in a fresh
interpreter (``-I``: no user site, no PYTHON* variables, no cwd on sys.path) inside an empty
temporary directory, with a wall-clock timeout that kills its whole process group, and with
rlimits on memory, CPU time, file size and process count. This is isolation against accidents
(loops, memory blow-ups, stray files), not a security boundary against a determined attacker:
run untrusted benchmarks in a container as well.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

MEMORY_BYTES = 2 << 30
FILE_BYTES = 1 << 20


@dataclass(frozen=True)
class ExecutionResult:
    passed: bool
    status: str  # "passed" | "failed" | "timeout" | "error"
    detail: str


def _limits(timeout_s: float) -> None:  # runs in the child before exec
    import resource

    os.setsid()
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
    cpu = int(timeout_s) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_BYTES, FILE_BYTES))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_python(program: str, timeout_s: float = 5.0) -> ExecutionResult:
    """Execute ``program``; passed means exit status 0 within the time limit."""
    with tempfile.TemporaryDirectory(prefix="sandbox-") as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(program)
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8"}
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", path], cwd=tmp, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=lambda: _limits(timeout_s))
        try:
            _, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return ExecutionResult(False, "timeout", f"no result within {timeout_s:g} s")
        finally:
            _kill_group(proc)  # also reaps anything the program left running in its group
    tail = err.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
    if proc.returncode == 0:
        return ExecutionResult(True, "passed", "")
    status = "failed" if "AssertionError" in tail[0] or proc.returncode == 1 else "error"
    return ExecutionResult(False, status, tail[0][:300])


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
