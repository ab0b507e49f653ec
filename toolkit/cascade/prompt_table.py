"""The prompt × stage table: every fully labelled prompt's records, as aligned arrays.

One loader serves every consumer of labelled records that needs whole prompts: replay
evaluation (``test --method …``), the fit-time replay callback and the bundle builder. A
prompt enters the table only when every stage of the cascade has a scored record for it.

Which records make the stages: by default a record's own ``stage`` field; with ``slugs`` the
record's model slug picks its stage (``slugs[k]`` is stage k), so a bundle can take any subset
or reordering of the labelled ladder. ``expect`` checks each kept record against the bundle's
model hashes and decoding settings.

Nothing here imports torch or Lightning.
"""

from __future__ import annotations

import glob
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.cascade.features import CascadeInputError, FeatureSchema, build_schema, record_features
from toolkit.cascade.stopping import prompt_key
from toolkit.common.io import read_jsonl


def record_files(data_dir: str | Path) -> list[Path]:
    """The stage record files (``<data_dir>/<task>/stage<k>-….jsonl``) made by ``label``."""
    files = sorted(Path(p) for p in glob.glob(str(Path(data_dir) / "*" / "stage*.jsonl")))
    if not files:
        raise CascadeInputError(f"no stage records (*/stage*.jsonl) under {data_dir}; make "
                                "them with `python cli.py label`")
    return files


@dataclass
class PromptTable:
    """All stages of every fully labelled prompt. Arrays are [N] or [N, L] (prompt, stage)."""

    ids: np.ndarray  # prompt ids, sorted
    tasks: np.ndarray  # task of each prompt (a prompt-only feature)
    splits: np.ndarray  # train / val / test split of each prompt (``label`` fixes it)
    keys: np.ndarray  # ``prompt_key`` of each prompt (fixes its side of a MixedPolicy)
    correct: np.ndarray  # [N, L] ground-truth correctness of each stage's answer (0/1)
    agree: np.ndarray  # [N, L] BLEU with the top stage's answer > threshold (0/1)
    flops: np.ndarray  # [N, L] cost of each stage's call in FLOPs (SPEC §D2)
    wall_s: np.ndarray  # [N, L] recorded seconds of each stage's call while labelling
    schema: FeatureSchema | None = None
    features: np.ndarray | None = None  # [N, L, F] predictor features (None: not computed)
    max_new_tokens: list[int] = field(default_factory=list)  # the records' generation caps

    @property
    def num_stages(self) -> int:
        return self.correct.shape[1]

    @cached_property
    def cost(self) -> np.ndarray:
        """[N, L] cost of each stage's call in units of the mean top-stage call."""
        return self.flops / self.flops[:, -1].mean()

    def subset(self, rows: np.ndarray) -> PromptTable:
        """The table restricted to some prompts (a boolean mask or indices). Its ``cost`` is
        relative to the subset's own mean top-stage call."""
        features = None if self.features is None else self.features[rows]
        return PromptTable(self.ids[rows], self.tasks[rows], self.splits[rows], self.keys[rows],
                           self.correct[rows], self.agree[rows], self.flops[rows],
                           self.wall_s[rows], self.schema, features, self.max_new_tokens)


def load_prompt_table(data_dir: str | Path, schema: str | FeatureSchema | None = "topk",
                      num_stages: int = 3, slugs: list[str] | None = None,
                      bleu_threshold: float = 0.8,
                      expect: Callable[[Path, dict[str, Any], int], None] | None = None
                      ) -> PromptTable:
    """Read the labelled records under ``data_dir`` into a :class:`PromptTable`.

    Args:
        data_dir: the output folder of ``label``.
        schema: feature schema (name or object) to compute features with; None skips them
            (counting prompts must not pay for features).
        num_stages: stages of the cascade (ignored when ``slugs`` is given).
        slugs: model slug of each stage; records of other models are ignored.
        bleu_threshold: the agreement label is BLEU with the top stage's answer > this.
        expect: called as ``expect(path, record, stage)`` on each kept record; raises to
            refuse records made with other weights or decoding settings.
    """
    L = len(slugs) if slugs is not None else num_stages
    stage_of_slug = {s: k for k, s in enumerate(slugs)} if slugs is not None else None
    by_id: dict[str, dict[int, dict[str, Any]]] = {}
    for path in record_files(data_dir):
        for r in read_jsonl(path):
            k = int(r["stage"]) if stage_of_slug is None else stage_of_slug.get(r["model"])
            if k is None or k >= L or r.get("correct") is None:
                continue
            if expect is not None:
                expect(path, r, k)
            by_id.setdefault(r["id"], {})[k] = r
    ids = sorted(i for i, st in by_id.items() if len(st) == L)
    if not ids:
        raise CascadeInputError(f"no prompt under {data_dir} has scored records for all {L} "
                                "stages")
    rows = [[by_id[i][k] for k in range(L)] for i in ids]
    sch = build_schema(schema, L) if isinstance(schema, str) else schema
    features = None
    if sch is not None:
        features = np.stack([np.stack([record_features({**s, "stage": k}, sch)
                                       for k, s in enumerate(row)]) for row in rows])
    return PromptTable(
        ids=np.array(ids), tasks=np.array([row[0]["task"] for row in rows]),
        splits=np.array([row[0]["split"] for row in rows]),
        keys=np.array([prompt_key(row[0]["prompt"]) for row in rows]),
        correct=np.array([[float(s["correct"]) for s in row] for row in rows]),
        agree=np.array([[float(s["agreement_bleu"] > bleu_threshold) for s in row]
                        for row in rows]),
        flops=np.array([[float(s["cost_flops"]) for s in row] for row in rows]),
        wall_s=np.array([[float(s.get("wall_s", np.nan)) for s in row] for row in rows]),
        schema=sch, features=features,
        max_new_tokens=sorted({int(row[0]["decoding"]["max_new_tokens"]) for row in rows}))


def count_prompts(data_dir: str | Path, num_stages: int = 3) -> int:
    """How many prompts are labelled at every stage (no features computed)."""
    return len(load_prompt_table(data_dir, None, num_stages).ids)
