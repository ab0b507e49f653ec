"""Run model-written Python in a separate, resource-limited process.

The code comes from a language model, so it is treated as hostile: it runs in a fresh
interpreter (``-I``: no user site-packages, no PYTHON* variables, no cwd on sys.path) inside an
empty temporary directory, with stdin closed and a minimal environment (no PATH), with rlimits on
address space, CPU time and file size, and in its own session so that a wall-clock timeout can
kill it together with any children. This guards against accidents (endless loops, memory
blow-ups, floods of output, stray files); it is not a security boundary against a determined
attacker (network and the rest of the file system stay reachable): run untrusted benchmarks in a
container too.
"""

from __future__ import annotations

import os
import resource  # imported here, not in the child: importing between fork and exec can deadlock
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import IO

MEMORY_BYTES = 2 << 30
"""Address-space limit of the child (RLIMIT_AS)."""
FILE_BYTES = 1 << 20
"""Largest file the child may write, its captured stdout/stderr included (RLIMIT_FSIZE)."""
OUTPUT_CHARS = 2000
"""How much of the end of stdout and stderr is kept in the result."""

# Run the program under a name other than "__main__": model answers often end with an
# `if __name__ == "__main__":` demo that reads input() or prints a lot; it is not part of the test.
_BOOTSTRAP = "import runpy; runpy.run_path('program.py', run_name='__sandbox__')"


@dataclass(frozen=True)
class ExecutionResult:
    """What happened to one program.

    Attributes:
        passed: it exited with status 0 within the time limit.
        status: "passed"; "failed" (it raised, e.g. a test's AssertionError); "timeout" (wall-clock
            or CPU limit); "error" (a resource limit, a signal, or the sandbox could not start it).
        detail: one line: the last line of stderr, or what stopped the program.
        stdout: the end of its standard output.
        stderr: the end of its standard error.
    """

    passed: bool
    status: str
    detail: str
    stdout: str = ""
    stderr: str = ""


def _limit(kind: int, soft: int, hard: int | None = None) -> tuple[int, tuple[int, int]]:
    """(kind, (soft, hard)), never above the hard limit this process already has."""
    hard = soft if hard is None else hard
    ceiling = resource.getrlimit(kind)[1]
    if ceiling != resource.RLIM_INFINITY:
        soft, hard = min(soft, ceiling), min(hard, ceiling)
    return kind, (soft, hard)


def _apply_limits(limits: list[tuple[int, tuple[int, int]]]) -> None:
    # Runs in the child between fork and exec: only C calls, nothing to import or lock.
    for kind, value in limits:
        resource.setrlimit(kind, value)


def run_python(program: str, timeout_s: float = 5.0) -> ExecutionResult:
    """Execute ``program`` in a sandboxed child interpreter and report how it ended.

    Args:
        program: Python source; it is run as a file in an empty temporary directory.
        timeout_s: wall-clock limit; the child's CPU limit is one second more.

    Returns:
        An ``ExecutionResult``; nothing the program does raises here.
    """
    cpu = int(timeout_s) + 1
    # The soft CPU limit sends SIGXCPU; the hard one, a second later, SIGKILL.
    limits = [_limit(resource.RLIMIT_AS, MEMORY_BYTES),
              _limit(resource.RLIMIT_CPU, cpu, cpu + 1),
              _limit(resource.RLIMIT_FSIZE, FILE_BYTES),
              _limit(resource.RLIMIT_CORE, 0)]
    with tempfile.TemporaryDirectory(prefix="sandbox-", ignore_cleanup_errors=True) as tmp, \
            tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        # Output goes to unnamed files, not pipes: RLIMIT_FSIZE then caps it, so a program
        # printing in a loop cannot fill this process's memory.
        with open(os.path.join(tmp, "program.py"), "w", encoding="utf-8") as f:
            f.write(program)
        env = {"HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-B", "-c", _BOOTSTRAP], cwd=tmp, env=env,
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True,
                preexec_fn=lambda: _apply_limits(limits))
        except (OSError, subprocess.SubprocessError) as e:
            return ExecutionResult(False, "error", f"could not start the program: {e}")
        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            # Kill the whole session's group: also whatever the program left running.
            _kill_group(proc)
        stdout, stderr = _tail(out), _tail(err)
    return _verdict(proc.returncode, timed_out, timeout_s, stdout, stderr)


def _verdict(rc: int, timed_out: bool, timeout_s: float, stdout: str,
             stderr: str) -> ExecutionResult:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    last = lines[-1].strip()[:300] if lines else ""
    if timed_out:
        return ExecutionResult(False, "timeout", f"no result within {timeout_s:g} s", stdout,
                               stderr)
    if rc == 0:
        return ExecutionResult(True, "passed", "", stdout, stderr)
    if rc < 0:
        sig = signal.Signals(-rc)
        if sig == signal.SIGXCPU:
            return ExecutionResult(False, "timeout", "CPU time limit exceeded", stdout, stderr)
        why = {signal.SIGXFSZ: f"file size limit ({FILE_BYTES} bytes) exceeded",
               signal.SIGKILL: "killed (CPU or memory limit)"}.get(sig, f"killed by {sig.name}")
        return ExecutionResult(False, "error", why, stdout, stderr)
    # Python ignores SIGXFSZ, so hitting a limit surfaces as an exception: still a limit.
    if last.startswith("MemoryError"):
        return ExecutionResult(False, "error", "MemoryError (memory limit)", stdout, stderr)
    if "File too large" in last:
        return ExecutionResult(False, "error", f"file size limit ({FILE_BYTES} bytes) exceeded",
                               stdout, stderr)
    return ExecutionResult(False, "failed", last or f"exit status {rc}", stdout, stderr)


def _tail(f: IO[bytes]) -> str:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - 4 * OUTPUT_CHARS))
    text = f.read().decode("utf-8", "replace")
    return text[-OUTPUT_CHARS:]


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone
    proc.wait()
