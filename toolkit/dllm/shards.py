"""Decoding held-out problems over several processes with the same rows as one process.

Used by the fit-time decode callback (the Trainer's ranks) and by the stand-alone benchmark
(``benchmarks/dllm_policies.py --devices N``, ranks launched by Lightning Fabric). The unit of
work is a decode *batch*: the problems are cut into the batches one process would decode (per
family, ``batch_size`` at a time, in order) and rank r takes batches r, r + W, ... A batch's
results may depend on its composition (left padding, forwards shared by rows), so sharding
whole batches keeps every row what it is in one process. The rows are then gathered on every
rank with :func:`toolkit.evaluation.results.gather_rows` (the collective ``cli.py test`` uses)
and sorted, so every rank holds the one-process rows in one order.
"""

from __future__ import annotations

from typing import Any

from toolkit.dllm.tasks_data import Problem
from toolkit.evaluation.results import gather_rows


def cut_batches(problems: list[Problem], batch_size: int) -> list[list[Problem]]:
    """The decode batches one process would run: per family (first-seen order),
    ``batch_size`` problems at a time; a batch never mixes families (generation lengths)."""
    out: list[list[Problem]] = []
    for family in dict.fromkeys(p.family for p in problems):
        mine = [p for p in problems if p.family == family]
        out += [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    return out


def rank_batches(problems: list[Problem], batch_size: int, rank: int,
                 world_size: int) -> list[list[Problem]]:
    """This rank's share of :func:`cut_batches`: batches ``rank::world_size``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    return cut_batches(problems, batch_size)[rank::world_size]


def gather_sorted(rows: list[dict[str, Any]], keys: tuple[str, ...] = ("id",)
                  ) -> list[dict[str, Any]]:
    """Every rank's rows on every rank, one per ``keys`` value, sorted by it.

    Collective under torch.distributed: every rank must call it (a rank that skips it hangs
    the others); in one process it only sorts.
    """
    merged = {tuple(r[k] for k in keys): r for r in gather_rows(rows)}
    return [merged[k] for k in sorted(merged)]
