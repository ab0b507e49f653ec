"""``python cli.py analyze --files "[A.diagnostics.jsonl, B...]"``: the seed's analysis.

For every diagnostics file written by ``python cli.py generate`` (one row per sample with
``alpha_mean``, ``ess_ratio_mean``, ``kl_theta_mean``, ``kl_t_mean`` and, from the sampler, the
per-token ``frac_meets_*``): statistics of each per-sample quantity (mean, median, std over
samples; infinite values, e.g. an ESS ratio with ESS_t = 0, are counted and left out), the
seed's theoretical conditions (ESS ratio in [0.8, 1.2]; |KL_θ − KL_t| < 0.05; α in [0.2, 0.8])
as fractions of samples (on the sample means) and of tokens (token-weighted ``frac_meets_*``),
distribution plots, and all files side by side in one markdown table. Each file is labelled by
its α method when the generation's ``.meta.json`` is beside it; the meta also gives
``max_new_tokens``, so the samples that reached it (cut, or ended exactly there) are counted.

When the rows carry sequence log importance weights (``log_weight`` = Σ log π_θ/q, written when
sampling), their mean and std, the mean per token (its expectation is −KL(q‖π_θ) per token, a
check of the weights against the KL column) and the self-normalised ESS of the weights over
the whole file as a fraction of its samples (how many samples a weighted fit really uses).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.common.errors import UserError
from toolkit.common.paths import runs_root, utc_stamp
from toolkit.qstar.conditions import ALPHA_RANGE, ESS_RATIO_RANGE, KL_GAP_MAX

QUANTITIES = ("alpha_mean", "ess_ratio_mean", "kl_theta_mean", "kl_t_mean")
CONDITIONS = ("meets_ess", "meets_kl", "meets_alpha")


class AnalyzeError(UserError, ValueError):
    """A file that cannot be analysed; the message is one line naming it and why."""


def load_diagnostics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of one diagnostics file, validated.

    Raises:
        AnalyzeError: missing, empty, not JSONL, or not a q* diagnostics file.
    """
    p = Path(path)
    if not p.is_file():
        raise AnalyzeError(f"{p}: no such file")
    rows = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise AnalyzeError(f"{p}: line {n} is not JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise AnalyzeError(f"{p}: line {n} is not a JSON object")
        rows.append(row)
    if not rows:
        raise AnalyzeError(f"{p}: empty file (no samples)")
    missing = [q for q in QUANTITIES if q not in rows[0]]
    if missing:
        hint = ""
        beside = p.with_name(p.stem + ".diagnostics.jsonl")
        if beside.is_file():
            hint = f"; did you mean {beside}?"
        raise AnalyzeError(f"{p}: not a q* diagnostics file (no {', '.join(missing)}; fields: "
                           f"{', '.join(sorted(rows[0]))}){hint}")
    return rows


def _generation_config(path: Path) -> dict[str, Any]:
    """The generation's config from the .meta.json beside its output ({} if there is none)."""
    meta = path.with_name(path.name.replace(".diagnostics.jsonl", ".jsonl.meta.json"))
    try:
        config = json.loads(meta.read_text())["config"]
        return config if isinstance(config, dict) else {}
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return {}


def _label(path: Path) -> str:
    """The generation's α method (from its .meta.json) and the file's name."""
    method = _generation_config(path).get("alpha_method")
    return f"{method} ({path.name})" if method else path.name


def _log_weight_stats(rows: list[dict[str, Any]]) -> dict[str, float] | None:
    lw = np.array([float(r["log_weight"]) for r in rows if r.get("log_weight") is not None])
    if not len(lw):
        return None
    tokens = sum(int(r.get("tokens", 0)) for r in rows if r.get("log_weight") is not None)
    w = np.exp(lw - lw.max())
    w /= w.sum()
    return {"mean": float(lw.mean()), "std": float(lw.std()),
            "per_token": float(lw.sum() / tokens) if tokens else math.nan,
            "ess_fraction": float(1.0 / np.sum(w ** 2) / len(lw))}


def _stats(values: np.ndarray) -> dict[str, float | int]:
    finite = values[np.isfinite(values)]
    if not len(finite):
        return {"mean": math.nan, "median": math.nan, "std": math.nan,
                "non_finite": int(len(values))}
    return {"mean": float(finite.mean()), "median": float(np.median(finite)),
            "std": float(finite.std()), "non_finite": int(len(values) - len(finite))}


def summarize_file(rows: list[dict[str, Any]], max_new_tokens: int | None = None
                   ) -> dict[str, Any]:
    """Statistics and condition fractions of one file's samples (see the module docstring)."""
    cols = {q: np.array([float(r.get(q, math.nan)) for r in rows]) for q in QUANTITIES}
    out: dict[str, Any] = {"samples": len(rows),
                           "tokens": int(sum(int(r.get("tokens", 0)) for r in rows))}
    out.update({q: _stats(cols[q]) for q in QUANTITIES})
    ratio, a = cols["ess_ratio_mean"], cols["alpha_mean"]
    with np.errstate(invalid="ignore"):
        gap = np.abs(cols["kl_theta_mean"] - cols["kl_t_mean"])
    out["samples_meeting"] = {
        "ess": float(np.mean((ratio >= ESS_RATIO_RANGE[0]) & (ratio <= ESS_RATIO_RANGE[1]))),
        "kl": float(np.mean(np.nan_to_num(gap, nan=np.inf) < KL_GAP_MAX)),
        "alpha": float(np.mean((a >= ALPHA_RANGE[0]) & (a <= ALPHA_RANGE[1])))}
    tokens = np.array([float(r.get("tokens", 0)) for r in rows])
    per_token = {}
    for cond in CONDITIONS:
        fr = np.array([float(r.get(f"frac_{cond}", math.nan)) for r in rows])
        ok = np.isfinite(fr)
        if ok.any() and tokens[ok].sum() > 0:
            per_token[cond.removeprefix("meets_")] = float((fr[ok] * tokens[ok]).sum()
                                                           / tokens[ok].sum())
    out["tokens_meeting"] = per_token
    out["log_weight"] = _log_weight_stats(rows)
    if max_new_tokens:
        out["at_token_limit"] = float(np.mean(tokens >= max_new_tokens))
    return out


def markdown_table(summaries: dict[str, dict[str, Any]]) -> str:
    """All files side by side: one column per file, one line per statistic."""
    labels = list(summaries)
    lines = ["| statistic | " + " | ".join(labels) + " |",
             "|---|" + "---:|" * len(labels)]

    def add(name: str, get: Any, fmt: str = "{:.4f}") -> None:
        cells = []
        for lab in labels:
            v = get(summaries[lab])
            cells.append("–" if v is None else fmt.format(v))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    add("samples", lambda s: s["samples"], "{}")
    add("tokens", lambda s: s["tokens"], "{}")
    for q in QUANTITIES:
        for stat in ("mean", "median", "std"):
            add(f"{q.removesuffix('_mean')} {stat}", lambda s, q=q, st=stat: s[q][st])
    names = {"ess": f"ESS ratio in {list(ESS_RATIO_RANGE)}", "kl": f"|KL_θ−KL_t| < {KL_GAP_MAX}",
             "alpha": f"α in {list(ALPHA_RANGE)}"}
    for key, text in names.items():
        add(f"samples: {text}", lambda s, k=key: s["samples_meeting"][k], "{:.1%}")
    for key, text in names.items():
        add(f"tokens: {text}", lambda s, k=key: s["tokens_meeting"].get(k), "{:.1%}")
    add("samples at max_new_tokens", lambda s: s.get("at_token_limit"), "{:.1%}")
    for key, text in (("mean", "log_weight mean"), ("std", "log_weight std"),
                      ("per_token", "log_weight per token"),
                      ("ess_fraction", "weights' ESS / samples")):
        add(text, lambda s, k=key: (s.get("log_weight") or {}).get(k))
    return "\n".join(lines)


def plot_distributions(columns: dict[str, dict[str, np.ndarray]], path: Path) -> Path:
    """Histograms of the four per-sample quantities, every file overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, q in zip(axes.flat, QUANTITIES):
        for label, cols in columns.items():
            v = cols[q][np.isfinite(cols[q])]
            if len(v):
                ax.hist(v, bins=30, alpha=0.5, label=label)
        ax.set_title(q)
    axes.flat[0].axvspan(*ALPHA_RANGE, color="tab:green", alpha=0.1)
    axes.flat[1].axvspan(*ESS_RATIO_RANGE, color="tab:green", alpha=0.1)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def analyze_files(files: list[str | Path], out_dir: str | Path | None = None,
                  plots: bool = True) -> dict[str, Any]:
    """Analyse diagnostics files; write summary.json, summary.md and plots into ``out_dir``.

    Raises:
        AnalyzeError: no files, or a file that cannot be analysed.
    """
    if not files:
        raise AnalyzeError("give at least one diagnostics file")
    if out_dir is None:
        out_dir = runs_root() / "analyze" / utc_stamp()
    out = Path(out_dir)
    summaries: dict[str, dict[str, Any]] = {}
    columns: dict[str, dict[str, np.ndarray]] = {}
    for f in files:
        rows = load_diagnostics(f)
        label = _label(Path(f))
        while label in summaries:  # the same file twice, or two files with one name
            label += "'"
        limit = _generation_config(Path(f)).get("decoding", {}).get("max_new_tokens")
        summaries[label] = {"file": str(f), **summarize_file(rows, limit)}
        columns[label] = {q: np.array([float(r.get(q, math.nan)) for r in rows])
                          for q in QUANTITIES}
    table = markdown_table(summaries)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summaries, indent=2, default=str))
    (out / "summary.md").write_text(table + "\n")
    plot = str(plot_distributions(columns, out / "plots" / "distributions.png")) if plots \
        else None
    return {"out_dir": str(out), "table": table, "summaries": summaries, "plot": plot}


def analyze(files: list[str] | str, out_dir: str | None = None, plots: bool = True
            ) -> dict[str, Any]:
    """Statistics, the seed's condition checks and plots of q* diagnostics files, side by side.

    Args:
        files: diagnostics files (<output>.diagnostics.jsonl from `generate`); a list
            (--files '[a.jsonl, b.jsonl]') or one path.
        out_dir: where summary.json, summary.md and plots/ go (default runs/analyze/<UTC>).
        plots: write the distribution plots.
    """
    paths = [files] if isinstance(files, str) else list(files)
    result = analyze_files(paths, out_dir, plots)  # AnalyzeError: one line from the CLI
    print(result["table"])
    print(f"\nwritten: {result['out_dir']}")
    return result
