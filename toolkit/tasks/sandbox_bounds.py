"""The sandbox's bounds on the whole of it, not per process: processes and resident memory.

A pids cgroup bounds processes where one is writable (root ignores ``RLIMIT_NPROC``, and these
machines run as root). A watchdog thread polls the sandbox's processes every 20 ms and kills the
namespace above ``MEMORY_BYTES`` resident in all (always: rlimits bound each process only) or
above ``MAX_PROCESSES`` (without the cgroup). Used by sandbox.py.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import threading
import time
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

MEMORY_BYTES = 2 << 30
"""Address space of each sandboxed process (RLIMIT_AS), and resident memory of all together."""
MAX_PROCESSES = 64
"""Processes and threads the sandbox may hold at once, bwrap's own included."""


@cache
def cgroup_parent() -> str | None:
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
# (CONFIGPROC_CHILDREN), the watchdog scans every process for the sandbox's PID namespace.
PROC_CHILDREN = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")
_PAGE = os.sysconf("SC_PAGE_SIZE")


class Bounds:
    """MAX_PROCESSES and MEMORY_BYTES for the whole sandbox, not per process.

    A pids cgroup bounds processes where one is writable; a watchdog thread polls the sandbox's
    processes every 20 ms and kills the namespace above MEMORY_BYTES of resident memory in all
    (always: rlimits bound each process only) or above MAX_PROCESSES (without the cgroup).
    """

    def __init__(self) -> None:
        parent = cgroup_parent()
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
        walk = PROC_CHILDREN  # read each run, so that tests can try both ways
        try:
            ns = os.readlink(f"/proc/{init_pid}/ns/pid")
        except OSError:
            return  # the sandbox is already gone
        while not self._stop.wait(0.02):
            tasks, rss = measure(descendants(init_pid) if walk else in_namespace(ns))
            if self.cgroup is None and tasks > MAX_PROCESSES:
                self.exceeded = f"process limit ({MAX_PROCESSES}) reached"
            elif rss > MEMORY_BYTES:
                self.exceeded = f"memory limit ({MEMORY_BYTES >> 20} MiB in all) reached"
            else:
                continue
            kill(init_pid, init_fd)
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
                    kill(int(pid))
                os.rmdir(self.cgroup)
                return
            except OSError:
                time.sleep(0.01)
        log.warning("could not remove the sandbox cgroup %s", self.cgroup)


def descendants(init_pid: int) -> list[int]:
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


def in_namespace(ns: str) -> list[int]:
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


def measure(pids: list[int]) -> tuple[int, int]:
    """(threads, resident bytes) of these processes; ones gone meanwhile count as nothing."""
    tasks = rss = 0
    for pid in pids:
        try:
            tasks += len(os.listdir(f"/proc/{pid}/task"))
            rss += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
        except (OSError, ValueError, IndexError):
            pass
    return tasks, rss


def kill(pid: int, pidfd: int | None = None) -> None:
    """SIGKILL through ``pidfd`` if given (immune to pid reuse), else to ``pid``."""
    try:
        if pidfd is None:
            os.kill(pid, signal.SIGKILL)
        else:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # already gone
