"""``python cli.py report``: markdown tables from ``results.json`` files, and README's copies.

Every table of results in README.md sits between ``<!-- report:NAME -->`` and
``<!-- /report:NAME -->`` and is the output of ``render`` on the committed snapshot
``docs/results/NAME.json`` (a ``results.json`` copied from the run that made it, which names
its own command and git sha). ``report --update_readme true`` rewrites those blocks from the
snapshots; ``tests/shared/test_readme.py`` fails if README and snapshots disagree, so a number in
README can always be traced to a file and that file to a command.

``report --compare true RUN...`` puts several methods' runs on the same examples side by side
(one column per method) with paired bootstrap differences of a per-example score against the
baseline runs; its snapshot holds every run's provenance and renders like any other.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from toolkit.common.errors import UserError
from toolkit.common.io import atomic_write_json, read_jsonl
from toolkit.evaluation.results import paired_difference

REPO = Path(__file__).resolve().parents[2]
SNAPSHOTS = REPO / "docs" / "results"
BLOCK = re.compile(r"(<!-- report:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)"
                   r"(<!-- /report:(?P=name) -->)", re.S)


class ReportError(UserError, ValueError):
    """A path that holds no readable results.json."""


def _load(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    p = p / "results.json" if p.is_dir() else p
    if not p.is_file():
        raise ReportError(f"no results.json at {path}")
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ReportError(f"{p} is not a results.json file: {err}") from None


def _num(v: Any, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "–"
    return f"{100 * v:.1f}%" if pct else (f"{v:.3f}" if isinstance(v, float) else str(v))


def _ci(m: dict[str, Any], pct: bool = False) -> str:
    s = _num(m["value"], pct)
    if m.get("ci95"):
        lo, hi = m["ci95"]
        s += f" [{_num(lo, pct)}, {_num(hi, pct)}]"
    return s


def _metrics_table(r: dict[str, Any]) -> list[str]:
    out = ["| metric | value [95% CI] | n |", "|---|---|---|"]
    for k, v in r["metrics"].items():
        if isinstance(v, dict) and "value" in v:
            out.append(f"| {k} | {_ci(v)} | {v.get('n', '')} |")
        elif isinstance(v, dict) and any(isinstance(x, dict) for x in v.values()):
            continue  # nested breakdowns (e.g. by family) stay in results.json
        elif isinstance(v, dict):
            out.append(f"| {k} | {', '.join(f'{a}={_num(b)}' for a, b in v.items())} | |")
        else:
            out.append(f"| {k} | {_num(v) if not isinstance(v, list) else v} | |")
    return out


def _cascade_tables(r: dict[str, Any]) -> list[str]:
    c = r["comparison"]
    out = ["| method | accuracy [95% CI] | relative cost [95% CI] |", "|---|---|---|"]
    for m in ("cascade", "threshold", "random", "always-top", "always-first", "fixed-2stage",
              "oracle", "oracle-route"):
        if m in c:
            out.append(f"| {m} | {_ci(c[m]['accuracy'], True)} | {_ci(c[m]['relative_cost'])} |")
    out += ["", "| cascade − other (accuracy, paired) | difference [95% CI] |", "|---|---|"]
    for k, v in c.items():
        if k.startswith("cascade_minus_"):
            out.append(f"| {k.removeprefix('cascade_minus_').removesuffix('_accuracy')} | "
                       f"{_ci(v, True)} |")
    if r.get("budgets"):
        out += ["", "| budget | cascade acc / cost | threshold acc / cost | random acc / cost | "
                "cascade − threshold [95% CI] | cascade − random [95% CI] |",
                "|---|---|---|---|---|---|"]
        for b in r["budgets"]:
            cells = [f"{_num(b[m]['accuracy']['value'], True)} / "
                     f"{_num(b[m]['relative_cost']['value'])}"
                     for m in ("cascade", "threshold", "random")]
            diffs = [_ci(b[f"cascade_minus_{m}_accuracy"], True) for m in ("threshold", "random")]
            mixed = [q for q in b.get("mix_q") or [] if q is not None]
            label = str(b["budget"])
            if mixed:
                label += f" (mixed, mean q {sum(mixed) / len(mixed):.2f})"
            out.append(f"| {label} | " + " | ".join(cells + diffs) + " |")
    if "top_minus_2_points" in c:
        t = c["top_minus_2_points"]
        out += ["", f"Reaching always-top − 2 points ({_num(t['target_accuracy'], True)}): "
                f"cascade at relative cost {_num(t['cascade_cost'])} (λ = "
                f"{_num(t['cascade_lambda'])}); a routing oracle needs "
                f"{_num(t['oracle_cost'])}."]
    if r.get("routing"):
        out += _routing_tables(r)
    if r.get("predictor_auroc"):
        a = r["predictor_auroc"]
        per = "; ".join(f"stage {k}: {_num(v['mlp'])} vs {_num(v['logistic_regression'])}"
                        for k, v in a["per_stage"].items())
        out += ["", f"Out-of-fold AUROC ({a['features']}, all stages pooled): MLP "
                f"{_num(a['mlp'])}, logistic regression {_num(a['logistic_regression'])}, "
                f"difference {_ci(a['difference'])} ({per})."]
    return out


def _routing_tables(r: dict[str, Any]) -> list[str]:
    """Methods that read the prompt first, held to each budget, beside the focus method."""
    g = r["routing"]
    out: list[str] = []
    for b in g["budgets"]:
        focus = b["focus"]
        out += ["", f"Budget {b['budget']} (relative cost incl. the router's forward; "
                f"{focus} − other, paired):", "",
                f"| method | accuracy | relative cost | {focus} − method [95% CI] |",
                "|---|---|---|---|"]
        for m, v in b["methods"].items():
            diff = _ci(b["focus_minus"][m], True) if m in b.get("focus_minus", {}) else "—"
            out.append(f"| {m} | {_num(v['accuracy']['value'], True)} | "
                       f"{_num(v['relative_cost']['value'])} | {diff} |")
    costs = r.get("cost_at_top_minus_1pt") or {}
    if costs:
        cells = ", ".join(f"{m} {_num(v) if v is not None else 'never'}"
                          for m, v in costs.items())
        out += ["", f"Least relative cost within 1 point of always-top on each λ curve: {cells}."]
    auroc = "; ".join(f"{k} " + " / ".join(_num(a) if a is not None else "—" for a in v)
                      for k, v in g["router_auroc"].items())
    c = g["cells"]
    cells = (f"route cells (the route-only pick at λ){', final entries' * c['final_entry']}"
             if c.get("rule") == "route" else
             f"cells over stages {c['stages']} × {c['bins']} bins")
    out += ["", f"Router: {g['router']} {cells}; prompt embedding by {g['router_model']} costs "
            f"{_num(g['embed_relative_cost'])} of a top-stage call per prompt. Out-of-fold "
            f"router AUROC per stage (0 / 1 / 2): {auroc}."]
    return out


def compare_runs(paths: list[str], metrics: list[str] | None = None,
                 baselines: list[str] | None = None, score: str = "correct",
                 labels: list[str] | None = None) -> dict[str, Any]:
    """Several methods' runs on the same examples as one comparison (see module doc).

    ``labels`` name the runs (default: each run's method); give them when two runs share a
    method, e.g. one model before and after fine-tuning.
    """
    if labels is not None and len(labels) != len(paths):
        raise ReportError(f"--labels gives {len(labels)} names for {len(paths)} runs")
    runs, rows = [], {}
    for j, path in enumerate(paths):
        r = _load(path)
        name = labels[j] if labels else r["method"]
        d = Path(path) if Path(path).is_dir() else Path(path).parent
        if not (d / "examples.jsonl").is_file():
            raise ReportError(f"{d} has no examples.jsonl beside results.json")
        if name in rows:
            raise ReportError(f"method {name!r} is given twice (name the runs with --labels)")
        rows[name] = {str(x["id"]): x for x in read_jsonl(d / "examples.jsonl")}
        runs.append((name, r))
    if len(runs) < 2:
        raise ReportError("--compare needs at least two runs")
    ids = {m: (r["data"]["n"], r["data"]["ids_hash"]) for m, r in runs}
    if len(set(ids.values())) > 1:
        raise ReportError(f"the runs are on different examples (n, ids_hash): {ids}")
    methods = [m for m, _ in runs]
    baselines = baselines or methods[:1]
    if missing := [b for b in baselines if b not in rows]:
        raise ReportError(f"baseline(s) {missing} are not among the runs {methods}")
    names = metrics or list(dict.fromkeys(
        k for _, r in runs for k, v in r["metrics"].items()
        if isinstance(v, dict) and "value" in v))
    order = sorted(rows[methods[0]])
    try:
        scores = {m: [float(rows[m][i][score]) for i in order] for m in methods}
    except KeyError as err:
        raise ReportError(f"examples.jsonl rows have no per-example {score!r} field "
                          f"(or lack example {err})") from None
    return {
        "schema_version": 1, "kind": "comparison", "methods": methods, "score": score,
        "command": " ".join(["python cli.py report", *paths, "--compare true",
                             f"--baselines '{json.dumps(baselines)}'",
                             *([f"--metrics '{json.dumps(metrics)}'"] if metrics else []),
                             *([f"--labels '{json.dumps(labels)}'"] if labels else [])]),
        "data": runs[0][1]["data"],
        "metrics": {k: {m: r["metrics"].get(k) for m, r in runs} for k in names},
        # each pair once: a baseline is compared with the baselines listed after it only
        "paired": {f"{m} − {b}": paired_difference(scores[m], scores[b])
                   for j, b in enumerate(baselines) for m in methods
                   if m != b and m not in baselines[:j]},
        "runs": {m: {k: r.get(k) for k in ("command", "git", "config", "models",
                                           "packages", "threads", "timings")}
                 for m, r in runs},
    }


def _comparison_tables(c: dict[str, Any]) -> list[str]:
    ms = c["methods"]
    out = ["| metric | " + " | ".join(ms) + " |", "|---" * (len(ms) + 1) + "|"]
    for k, by in c["metrics"].items():
        out.append(f"| {k} | " + " | ".join(_ci(by[m]) if by.get(m) else "–" for m in ms) + " |")
    out += ["", f"| paired difference in {c['score']} | mean [95% CI] |", "|---|---|"]
    out += [f"| {k} | {_ci(v)} |" for k, v in c["paired"].items()]
    return out


def render(results: dict[str, Any]) -> str:
    """Markdown for one results.json: the method comparison for cascade runs, else metrics."""
    if results.get("kind") == "comparison":
        lines = _comparison_tables(results)
    elif "comparison" in results and results["comparison"].get("cascade"):
        lines = _cascade_tables(results)
    else:
        lines = _metrics_table(results)
    cmd = results.get("command")
    cmd = " ".join(cmd) if isinstance(cmd, list) else cmd
    sha = (results.get("git") or {}).get("sha", "")[:10]
    method = f"method {results.get('method')}"
    if results.get("kind") == "comparison":
        shas = {m: (r.get("git") or {}).get("sha", "")[:10] for m, r in results["runs"].items()}
        sha = ", ".join(dict.fromkeys(shas.values())) if len(set(shas.values())) == 1 else \
            ", ".join(f"{m} {v}" for m, v in shas.items())
        method = "runs " + ", ".join(f"{m}: `{r.get('command')}`"
                                     for m, r in results["runs"].items())
    lines += ["", f"<sub>`{cmd}` · {method} · git {sha} · "
              f"n = {results.get('data', {}).get('n')}</sub>"]
    return "\n".join(lines) + "\n"


def update_readme(readme: Path = REPO / "README.md", snapshots: Path = SNAPSHOTS) -> list[str]:
    """Rewrite every report block of README from its snapshot; returns the block names."""
    text, names = readme.read_text(), []

    def sub(m: re.Match) -> str:
        names.append(m["name"])
        return m.group(1) + render(_load(snapshots / f"{m['name']}.json")) + m.group(4)

    readme.write_text(BLOCK.sub(sub, text))
    return names


def report(paths: list[str], format: str = "md", snapshot: str | None = None,
           update_readme_blocks: bool = False, compare: bool = False,
           metrics: list[str] | None = None, baselines: list[str] | None = None,
           labels: list[str] | None = None) -> str:
    """Print markdown tables for results.json files (or run directories).

    Args:
        paths: results.json files or run directories (runs/test/<method>/<time>/).
        format: md (markdown) or json (the metrics only).
        snapshot: copy the (single) results file to docs/results/<snapshot>.json, the file a
            README block <!-- report:<snapshot> --> is rendered from.
        update_readme_blocks: rewrite README's report blocks from docs/results/.
        compare: one side-by-side table of the runs (same examples, one method each), with
            paired differences of the per-example score against ``baselines``.
        metrics: with compare, the metrics to show (default: every metric with a value).
        baselines: with compare, the methods the others are paired with (default: the first).
        labels: with compare, a name per run (default: its method); needed when two runs
            share a method (one model before and after fine-tuning).
    """
    if format not in ("md", "json"):
        raise ValueError(f"format must be md or json, got {format!r}")
    out = []
    if compare:
        c = compare_runs(paths, metrics, baselines, labels=labels)
        out.append(render(c) if format == "md" else json.dumps(c["metrics"], indent=1))
        if snapshot:
            atomic_write_json(SNAPSHOTS / f"{snapshot}.json", c)
        paths, snapshot = [], None
    for path in paths:
        r = _load(path)
        out.append(render(r) if format == "md" else json.dumps(r["metrics"], indent=1))
        if snapshot:
            SNAPSHOTS.mkdir(parents=True, exist_ok=True)
            src = Path(path) / "results.json" if Path(path).is_dir() else Path(path)
            shutil.copyfile(src, SNAPSHOTS / f"{snapshot}.json")
    if update_readme_blocks:
        out.append(f"README blocks rewritten: {update_readme()}")
    text = "\n".join(out)
    print(text)
    return text
