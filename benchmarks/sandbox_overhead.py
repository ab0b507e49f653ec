"""What the bubblewrap sandbox costs per HumanEval problem, against running unisolated.

    python benchmarks/sandbox_overhead.py [--problems 40] [--repeats 2]

Scores the canonical solutions of the first N HumanEval problems one at a time (wall clock per
problem, parse to verdict), alternating the two modes problem by problem so that both see the same
machine load: ``unisolated=True`` (same harness and token check, no namespaces: a plain child
interpreter) and the default sandbox (bwrap with user, PID, network, IPC and mount namespaces,
plus the pids cgroup or watchdog). Prints a markdown table and the ratio of the means.
"""

from __future__ import annotations

import argparse
import statistics
import time

from toolkit.tasks import build_task

MODES = {"unisolated": True, "sandboxed": False}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    tasks = {m: build_task("humaneval", limit=args.problems, unisolated=u)
             for m, u in MODES.items()}
    first = tasks["sandboxed"]
    examples = first.examples()
    answers = [first.problems[e.id]["canonical_solution"] for e in examples]
    for mode, task in tasks.items():  # warm-up: imports, the sandbox check, file caches
        assert task.score(examples[0], answers[0]), mode
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(args.repeats):
        for ex, answer in zip(examples, answers):
            for mode, task in tasks.items():
                t0 = time.perf_counter()
                ok = task.score(ex, answer)
                times[mode].append(time.perf_counter() - t0)
                if not ok:
                    raise SystemExit(f"{mode}: the canonical solution of {ex.id} failed")

    print(f"{len(examples)} problems x {args.repeats} repeats, one program at a time\n")
    print("| mode | mean ms | median ms | p95 ms |")
    print("|---|---|---|---|")
    for mode, ts in times.items():
        ms = sorted(t * 1000 for t in ts)
        print(f"| {mode} | {statistics.mean(ms):.0f} | {statistics.median(ms):.0f} | "
              f"{ms[int(0.95 * (len(ms) - 1))]:.0f} |")
    mean = {m: statistics.mean(ts) for m, ts in times.items()}
    print(f"\nsandboxed / unisolated (mean): {mean['sandboxed'] / mean['unisolated']:.2f}x, "
          f"+{(mean['sandboxed'] - mean['unisolated']) * 1000:.0f} ms per problem")


if __name__ == "__main__":
    main()
