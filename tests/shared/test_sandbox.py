"""The code sandbox against real attacks (issue 17): each one must fail, right answers must pass.

Every attack runs as real code in the real sandbox; the checks look at the host (its files, a
live listener, its process table), not at the sandbox's own report of what it did.
"""

from __future__ import annotations

import json
import os
import platform
import random
import socket
import threading
import time
from pathlib import Path

import pytest

from toolkit.common.errors import UserError
from toolkit.tasks import build_task, sandbox, sandbox_bounds
from toolkit.tasks.sandbox import (
    FILE_BYTES,
    MAX_PROCESSES,
    OUTPUT_CHARS,
    SandboxUnavailableError,
    run_python,
)

FENCE = "```"
ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "data" / "cascade" / "humaneval").glob("stage*.jsonl"))

try:
    sandbox.check_available()
    UNAVAILABLE = ""
except SandboxUnavailableError as err:
    UNAVAILABLE = str(err)
pytestmark = pytest.mark.skipif(bool(UNAVAILABLE), reason=UNAVAILABLE)


@pytest.fixture(scope="module")
def humaneval():
    return build_task("humaneval", limit=3, timeout_s=3.0)


def _marked_processes(marker: str) -> list[int]:
    """Host processes whose command line contains ``marker``."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker.encode() in Path(f"/proc/{entry.name}/cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def test_writes_outside_the_tmpfs_fail(tmp_path):
    targets = [tmp_path / "pwned", Path.home() / f"pwned-{os.getpid()}", ROOT / "pwned",
               Path(sandbox.__file__).with_name("pwned.py")]
    program = "import os\n" + "".join(
        f"try:\n    open({str(t)!r}, 'w').write('x')\n    print('WROTE', {str(t)!r})\n"
        f"except OSError as e:\n    print('denied', type(e).__name__)\n" for t in targets)
    program += "open('inside.txt', 'w').write('ok')\nprint(open('inside.txt').read())\n"
    res = run_python(program, timeout_s=5.0)
    assert res.passed and "WROTE" not in res.stdout and res.stdout.count("denied") == 4, res
    assert res.stdout.endswith("ok\n")  # its own tmpfs is writable
    assert not any(t.exists() for t in targets)


def test_parent_environment_secrets_stay_hidden(monkeypatch):
    secret = f"s3cret-{random.getrandbits(64):x}"
    monkeypatch.setenv("TOOLKIT_TEST_SECRET", secret)
    program = (f"import os\nfor pid in [os.getppid(), 1, {os.getpid()}] + "
               "[int(p) for p in os.listdir('/proc') if p.isdigit()]:\n"
               "    try:\n        print(open(f'/proc/{pid}/environ', 'rb').read())\n"
               "    except OSError as e:\n        print('denied', pid, type(e).__name__)\n"
               "print(dict(os.environ))\n")
    res = run_python(program, timeout_s=5.0)
    assert res.passed, res
    assert secret not in res.stdout and "TOOLKIT_TEST_SECRET" not in res.stdout
    assert f"denied {os.getpid()}" in res.stdout  # the host's pids do not exist in there


def test_no_network_not_even_loopback():
    accepted: list[bytes] = []
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(0.2)
        port = server.getsockname()[1]
        stop = threading.Event()

        def listen() -> None:
            while not stop.is_set():
                try:
                    conn, _ = server.accept()
                except OSError:
                    continue
                accepted.append(conn.recv(100))
                conn.close()

        thread = threading.Thread(target=listen)
        thread.start()
        program = ("import socket\ntry:\n"
                   f"    s = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                   "    s.sendall(b'exfiltrated')\n    print('CONNECTED')\n"
                   "except OSError as e:\n    print('denied', type(e).__name__)\n")
        res = run_python(program, timeout_s=5.0)
        time.sleep(0.3)
        stop.set()
        thread.join()
    assert res.passed and "denied" in res.stdout and "CONNECTED" not in res.stdout, res
    assert accepted == []


def test_setsid_double_fork_does_not_outlive_the_run():
    marker = f"escapee-{random.getrandbits(48):x}"
    program = ("import os, sys\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
               "        os.execv(sys.executable, [sys.executable, '-c', "
               f"'import time; time.sleep(30)  # {marker}'])\n"
               "    os._exit(0)\nimport time\ntime.sleep(0.5)\n")  # let the escapee start
    t0 = time.monotonic()
    res = run_python(program, timeout_s=5.0)
    assert res.passed and time.monotonic() - t0 < 4, res  # scoring did not wait for it
    deadline = time.monotonic() + 2
    while _marked_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _marked_processes(marker) == []


@pytest.mark.parametrize("early_exit", [
    "import os\nos._exit(0)", "import sys\nsys.exit(0)", "raise SystemExit(0)", "exit()",
    "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
    # forging: write anything to every descriptor it might share with the harness, then leave
    "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'0' * 64)\n"
    "    except OSError:\n        pass\nfor p in os.listdir('/proc'):\n    try:\n"
    "        print(os.listdir(f'/proc/{p}/fd'))\n    except OSError:\n        pass\nos._exit(0)",
])
def test_exiting_before_the_checks_never_passes(humaneval, early_exit):
    ex = humaneval.examples()[0]
    wrong = f"{FENCE}python\n{early_exit}\ndef has_close_elements(numbers, threshold):\n" \
            f"    return False\n{FENCE}"
    res = humaneval.run(ex, wrong)
    assert not res.passed and res.status in ("failed", "error"), res
    # the same exit after a correct function: still not a pass, the checks never ran
    right = humaneval.problems[ex.id]
    res = humaneval.run(ex, right["prompt"] + right["canonical_solution"] + "\n" + early_exit)
    assert not res.passed


def test_supervisor_is_out_of_reach():
    # The program's parent inside the sandbox holds the token pipe and the result pipe: neither
    # its descriptors nor its memory may be opened (it is non-dumpable; the program has no caps).
    # (Where the host user is root, the names in /proc/<ppid>/fd can be listed, not opened.)
    program = ("import os\nppid = os.getppid()\nassert ppid != 1\nopened = []\n"
               "paths = [f'/proc/{ppid}/{name}' for name in ('mem', 'environ')]\n"
               "for path in paths + [f'/proc/{ppid}/fd/{n}' for n in range(64)]:\n    try:\n"
               "        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))\n"
               "        opened.append(path)\n    except OSError:\n        pass\n"
               "print('opened', opened)\n")
    res = run_python(program, timeout_s=5.0)
    assert res.passed and res.stdout == "opened []\n", res


def test_right_answers_pass_and_wrong_ones_fail(humaneval):
    exs = humaneval.examples()
    p = humaneval.problems
    assert humaneval.score_many(exs, [p[e.id]["canonical_solution"] for e in exs]) == [True] * 3
    wrong = f"{FENCE}python\ndef has_close_elements(numbers, threshold):\n    return False\n{FENCE}"
    res = humaneval.run(exs[0], wrong)
    assert (res.passed, res.status, res.detail) == (False, "failed", "AssertionError")
    # the environment's packages are importable (read-only)
    res = run_python("import numpy\nassert numpy.arange(3).sum() == 3\n", timeout_s=10.0)
    assert res.passed, res


def test_endless_loop_times_out_and_kills_its_children():
    marker = f"looper-{random.getrandbits(48):x}"
    program = ("import os, sys\nif os.fork() == 0:\n"
               "    os.execv(sys.executable, [sys.executable, '-c', "
               f"'while True: pass  # {marker}'])\n"
               "while True:\n    pass\n")
    t0 = time.monotonic()
    res = run_python(program, timeout_s=1.0)
    assert res.status == "timeout" and time.monotonic() - t0 < 2.5, res
    assert _marked_processes(marker) == []


@pytest.mark.parametrize("bound", ["cgroup", "watchdog", "watchdog-scan"])
def test_process_count_is_bounded(monkeypatch, bound):
    if bound == "cgroup" and sandbox_bounds.cgroup_parent() is None:
        pytest.skip("no writable pids cgroup here: the watchdog bounds processes")
    if bound.startswith("watchdog"):
        monkeypatch.setattr(sandbox_bounds, "cgroup_parent", lambda: None)
    if bound == "watchdog-scan":  # as without /proc/<pid>/task/<tid>/children
        monkeypatch.setattr(sandbox_bounds, "PROC_CHILDREN", False)
    # A bounded fork loop: 3 x MAX_PROCESSES sleeping children at most, whatever the sandbox.
    program = ("import os, time\nn = 0\n"
               f"for _ in range({3 * MAX_PROCESSES}):\n    try:\n        pid = os.fork()\n"
               "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(5)\n"
               "        os._exit(0)\n    n += 1\nprint('forked', n)\n")
    res = run_python(program, timeout_s=4.0)
    if bound == "cgroup":  # fork fails at the limit; the program sees it
        forked = int(res.stdout.split()[-1])
        assert res.passed and forked < MAX_PROCESSES, res
    else:  # the watchdog kills the namespace soon after the limit
        assert (res.passed, res.status, res.detail) == (
            False, "error", f"process limit ({MAX_PROCESSES}) reached"), res


def test_fork_bomb_is_contained():
    if sandbox_bounds.cgroup_parent() is None:
        pytest.skip("an unbounded fork bomb is only run where a pids cgroup holds it")
    marker = f"bomb-{random.getrandbits(48):x}"
    program = (f"import os\nMARK = {marker!r}\nwhile True:\n    try:\n        os.fork()\n"
               "    except OSError:\n        pass\n")
    t0 = time.monotonic()
    res = run_python(program, timeout_s=2.0)
    assert not res.passed and time.monotonic() - t0 < 4, res
    assert not list(Path(sandbox_bounds.cgroup_parent()).glob(f"toolkit-sandbox-{os.getpid()}-*"))


def test_memory_files_and_output_are_capped(monkeypatch):
    res = run_python("x = bytearray(8 << 30)\n", timeout_s=3.0)  # 8 GiB: over the limit
    assert (res.passed, res.status) == (False, "error") and "memory" in res.detail.lower()
    # Many processes, each under its own limit, over the limit in all. (The limit is lowered to
    # 256 MiB here: at a few hundred MB/s of page faults on a loaded machine, 2 GiB takes long.)
    monkeypatch.setattr(sandbox_bounds, "MEMORY_BYTES", 256 << 20)
    program = ("import os, time\nfor _ in range(6):\n    if os.fork() == 0:\n"
               "        x = b'y' * (80 << 20)  # written, so resident\n        time.sleep(30)\n"
               "        os._exit(0)\ntime.sleep(30)\n")
    t0 = time.monotonic()
    res = run_python(program, timeout_s=20.0)
    assert (res.passed, res.status) == (False, "error"), res
    assert res.detail == "memory limit (256 MiB in all) reached"
    assert time.monotonic() - t0 < 15
    monkeypatch.undo()
    res = run_python("open('big.bin', 'wb').write(b'0' * (64 << 20))\n", timeout_s=3.0)
    assert (res.passed, res.status) == (False, "error") and str(FILE_BYTES) in res.detail
    t0 = time.monotonic()
    res = run_python("while True:\n    print('x' * 1000)\n", timeout_s=3.0)
    assert not res.passed and len(res.stdout) <= OUTPUT_CHARS and time.monotonic() - t0 < 4


def test_home_and_project_are_unreadable():
    home_files = [p for p in Path.home().iterdir() if p.is_file()][:3]
    targets = [ROOT / "README.md", ROOT / "pyproject.toml", Path(sandbox.__file__), *home_files]
    program = "import os\n" + "".join(
        f"try:\n    print('READ', len(open({str(t)!r}, 'rb').read()))\n"
        f"except OSError as e:\n    print('denied', type(e).__name__)\n" for t in targets)
    program += (f"for d in [{str(Path.home())!r}, {str(ROOT)!r}]:\n    try:\n"
                "        print('list', d, sorted(os.listdir(d)))\n    except OSError:\n"
                "        print('list', d, 'denied')\n")
    res = run_python(program, timeout_s=5.0)
    assert res.passed and "READ" not in res.stdout and res.stdout.count("denied") >= 3, res
    listed = {ln.split(" ", 2)[1]: ln.split(" ", 2)[2] for ln in res.stdout.splitlines()
              if ln.startswith("list ")}
    # at most the folders on the way to the interpreter and the environment show, no files
    for d, shown in listed.items():
        assert shown == "denied" or not any(f"'{p.name}'" in shown for p in Path(d).iterdir()
                                            if p.is_file()), (d, shown)


def test_clean_environment_and_closed_stdin():
    env_check = ("import os, sys\nassert 'PATH' not in os.environ, os.environ\n"
                 "assert os.listdir('.') == ['program.py'], os.listdir('.')\n"
                 "assert sys.flags.isolated\nprint('ok')\n")
    res = run_python(env_check, timeout_s=3.0)
    assert res.passed and res.stdout == "ok\n", res.stderr
    res = run_python("input()\n", timeout_s=3.0)  # stdin is closed, not inherited
    assert res.status == "failed" and res.detail.startswith("EOFError")
    assert run_python("if __name__ == '__main__':\n    input()\n", timeout_s=3.0).passed


def test_humaneval_runs_at_most_two_programs_at_once(humaneval):
    ex = humaneval.examples()[0]
    problem = humaneval.problems[ex.id]
    answer = f"import time\ntime.sleep(0.5)\n{problem['prompt']}{problem['canonical_solution']}"
    seen: list[int] = []
    done = threading.Event()

    def count_children() -> None:  # the sandboxes are this process's child processes
        me = str(os.getpid())
        while not done.is_set():
            n = 0
            for entry in os.scandir("/proc"):
                try:
                    stat = Path(f"/proc/{entry.name}/stat").read_text()
                except OSError:
                    continue
                n += entry.name.isdigit() and stat.rsplit(")", 1)[1].split()[1] == me
            seen.append(n)
            time.sleep(0.02)

    watcher = threading.Thread(target=count_children)
    watcher.start()
    try:
        assert humaneval.score_many([ex] * 5, [answer] * 5) == [True] * 5
    finally:
        done.set()
        watcher.join()
    assert max(seen) == 2


def _refusal(monkeypatch, bwrap: str) -> str:
    monkeypatch.setattr(sandbox, "bwrap_path", lambda: bwrap)
    sandbox.check_available.cache_clear()
    try:
        with pytest.raises(SandboxUnavailableError) as info:
            run_python("print(1)\n")
    finally:
        sandbox.check_available.cache_clear()
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)
    assert "unisolated=true" in str(info.value)
    return str(info.value)


def test_a_sandbox_that_cannot_start_is_an_error(monkeypatch):
    monkeypatch.setattr(sandbox, "TMPFS_BYTES", 0)  # bwrap refuses a tmpfs of size 0
    res = run_python("print(1)\n")
    assert (res.passed, res.status) == (False, "error"), res
    assert res.detail.startswith("the sandbox could not start: bwrap: --size")


def test_refuses_a_tampered_bwrap(monkeypatch, tmp_path):
    if platform.machine() not in sandbox.BWRAP_BINARY_SHA256:
        pytest.skip(f"no pinned bwrap binary hash for {platform.machine()}")
    tampered = tmp_path / "bwrap"
    tampered.write_bytes(Path(sandbox.bwrap_path()).read_bytes() + b"\0")
    tampered.chmod(0o755)
    assert "sha256 mismatch" in _refusal(monkeypatch, str(tampered))


def test_refuses_without_bubblewrap_and_runs_unisolated_when_asked(monkeypatch, caplog):
    # a bwrap that cannot make namespaces (here: one that always fails)
    monkeypatch.setattr(sandbox, "BWRAP_BINARY_SHA256", {})
    assert "`bwrap --unshare-user true` failed" in _refusal(monkeypatch, "/bin/false")
    # unisolated: off by default, warned about, and still judged by the token
    task = build_task("humaneval", limit=1, unisolated=True)
    assert "WITHOUT a sandbox" in caplog.text
    ex = task.examples()[0]
    assert task.score(ex, task.problems[ex.id]["canonical_solution"])
    assert not task.score(ex, "    import os\n    os._exit(0)\n")
    assert not task.score(ex, "import sys\nsys.exit(0)\n")


def _shipped_records() -> list[dict]:
    return [json.loads(line) for f in SHIPPED for line in f.read_text().splitlines()]


def _rescore(records: list[dict]) -> list[tuple[str, int, bool, bool]]:
    """(id, stage, stored label, new score) for each record."""
    task = build_task("humaneval", workers=2)
    exs = {e.id: e for e in task.examples()}
    scores = task.score_many([exs[r["id"]] for r in records], [r["output"] for r in records])
    return [(r["id"], r["stage"], r["correct"], s) for r, s in zip(records, scores)]


@pytest.mark.skipif(not SHIPPED, reason="data/cascade/humaneval is not in this checkout")
def test_shipped_humaneval_labels_sampled():
    records = _shipped_records()
    rng = random.Random(17)
    sample = (rng.sample([r for r in records if r["correct"]], 6)
              + rng.sample([r for r in records if not r["correct"]], 6))
    assert [(i, st, old) for i, st, old, new in _rescore(sample) if old != new] == []


@pytest.mark.slow
@pytest.mark.skipif(not SHIPPED, reason="data/cascade/humaneval is not in this checkout")
def test_shipped_humaneval_labels_all():
    rows = _rescore(_shipped_records())
    assert len(rows) == 3 * 164
    assert [(i, st, old) for i, st, old, new in rows if old != new] == []
