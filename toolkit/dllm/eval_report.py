"""Plots of a diffusion-decoding test run (rows and metrics from ``eval_module``)."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")  # files and TensorBoard only; never a window
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def _pick_examples(rows: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """Up to ``k`` rows, one family after another, so different families are shown."""
    by_family: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_family.setdefault(r["family"], []).append(r)
    picked: list[dict[str, Any]] = []
    depth = 0
    while len(picked) < k and any(depth < len(v) for v in by_family.values()):
        for family in sorted(by_family):
            if depth < len(by_family[family]) and len(picked) < k:
                picked.append(by_family[family][depth])
        depth += 1
    return picked


def nfe_over_answer_plot(rows: list[dict[str, Any]], k: int, method: str) -> Figure:
    """Top: the forward (NFE) that committed each answer position. Bottom: the size of the
    block each position was decoded in. One line per example."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for r in _pick_examples(rows, k):
        # Up to the longer of the decoded and the reference answer, so a wrong early EOS
        # still shows what happened where the answer should have been.
        n = min(r["gen_length"], max(r["answer_tokens"], r["reference_tokens"]))
        label = f"{r['id']} ({'ok' if r['correct'] else 'wrong'})"
        top.plot(range(n), r["commit_nfe"][:n], ".-", drawstyle="steps-mid", label=label)
        sizes: list[int] = []
        for b in r["block_sizes"]:
            sizes += [b] * b
        sizes += [sizes[-1] if sizes else 0] * n  # the EOS stop may end before a block does
        bottom.plot(range(n), sizes[:n], ".-", drawstyle="steps-mid", label=label)
    top.set_ylabel("NFE at commit")
    top.set_title(f"{method}: decoding over the answer (0 = filled by the EOS stop)")
    top.legend(fontsize=7)
    bottom.set_ylabel("block size")
    bottom.set_xlabel("answer position (tokens)")
    fig.tight_layout()
    return fig


def accuracy_vs_nfe_plot(metrics: dict[str, Any], method: str) -> Figure:
    """Accuracy against mean NFE per family and overall; the NFE lower bound as a tick.

    Speed-only families (not trained at this generation length) are drawn at the bottom with
    an ``x``: they have an NFE but no accuracy.
    """
    fig, ax = plt.subplots(figsize=(6, 4.5))
    points = {**metrics["by_family"], "all": metrics}
    for name, m in points.items():
        nfe, bound = m["nfe"]["value"], m["lower_bound"]["value"]
        acc = m["accuracy"]["value"]
        y = acc if acc is not None else 0.0
        marker = "x" if acc is None else ("*" if name == "all" else "o")
        (line,) = ax.plot(nfe, y, marker, markersize=11 if name == "all" else 7,
                          label=name + (" (speed only)" if acc is None else ""))
        ax.plot([bound, nfe], [y, y], ":", color=line.get_color(), linewidth=1)
        ax.plot(bound, y, "|", color=line.get_color(), markersize=12)
    ax.legend(fontsize=7)
    ax.set_xlabel("NFE per problem (mean); | = lower bound ceil(L_eff/B)")
    ax.set_ylabel("accuracy (exact match)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(f"{method}: accuracy vs NFE")
    fig.tight_layout()
    return fig
