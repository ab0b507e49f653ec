"""Versioned feature vectors for the quality predictor, computed from a stage record only.

A record (see ``labelling.py``) keeps the per-token arrays of a stage's answer; every feature
here is a function of those arrays plus the record's counts, so a new feature never needs the
models to run again. A ``FeatureSchema`` names its features and carries a version; the schema
travels with every checkpoint and inside the ONNX file, and a model is refused when the schema
it was trained with differs from the one it is fed.

Schemas:

* ``topk-v1`` (default): only what a vLLM backend can also return (chosen-token log-prob and
  the top-5 log-probs of each position). Length-robust statistics: quantiles rather than plain
  means, which are biased by answer length (Gupta et al., ICLR 2024).
* ``full-v1``: ``topk-v1`` plus statistics of the full-distribution entropy. Transformers
  backend only (vLLM cannot give the full distribution's entropy).
* ``no_entropy-v1``, ``no_logprobs-v1``, ``minimal-v1``: the seed's feature-set ablations
  carved out of ``full-v1``: without any entropy statistic; without chosen-token log-prob and
  margin statistics (entropies only; transformers only); lengths and stage only.
* ``seed-v1``: the seed's five features (entropy of the last 32 tokens, prompt-length ratio,
  output length, mean top-1 log-prob, stage id). Needs the full entropy too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from toolkit.common.errors import UserError

QUANTILES = (0.05, 0.25, 0.5, 0.75)
TAIL = 32


class CascadeInputError(UserError, ValueError):
    """Bad cascade input (records, settings): a ValueError for library callers, one
    ``error: ...`` line from ``cli.py``."""


class FeatureSchemaError(UserError, ValueError):
    """A model and its input disagree on the feature schema."""


@dataclass(frozen=True)
class FeatureSchema:
    name: str
    version: int
    names: tuple[str, ...]
    needs_full_entropy: bool
    num_stages: int

    @property
    def id(self) -> str:
        return f"{self.name}-v{self.version}"

    @property
    def dim(self) -> int:
        return len(self.names)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "names": list(self.names),
                "needs_full_entropy": self.needs_full_entropy, "num_stages": self.num_stages}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureSchema:
        return cls(d["name"], int(d["version"]), tuple(d["names"]), bool(d["needs_full_entropy"]),
                   int(d["num_stages"]))

    def check_compatible(self, other: FeatureSchema | dict[str, Any]) -> None:
        other = other if isinstance(other, FeatureSchema) else FeatureSchema.from_dict(other)
        if other != self:
            raise FeatureSchemaError(
                f"feature schema mismatch: model expects {self.id} ({self.dim} features, "
                f"{self.num_stages} stages), input is {other.id} ({other.dim} features, "
                f"{other.num_stages} stages)")


def _stat_names(prefix: str) -> list[str]:
    return [f"{prefix}_q{int(q * 100):02d}" for q in QUANTILES] + [f"{prefix}_tail{TAIL}_mean"]


def _common_names(num_stages: int) -> list[str]:
    return ([f"stage_{i}" for i in range(num_stages)]
            + ["log_prompt_tokens", "log_generated_tokens", "hit_length_limit"])


def build_schema(name: str = "topk", num_stages: int = 3) -> FeatureSchema:
    if name == "seed":
        names = ["entropy_tail32", "prompt_length_ratio", "output_length", "mean_top1_logprob",
                 "stage_id"]
        return FeatureSchema("seed", 1, tuple(names), True, num_stages)
    topk = (_common_names(num_stages) + _stat_names("chosen_logprob")
            + ["frac_chosen_below_-1", "frac_chosen_below_-3"] + _stat_names("top1_margin")
            + _stat_names("top5_entropy"))
    full = topk + _stat_names("entropy")
    entropic = set(_stat_names("top5_entropy") + _stat_names("entropy"))
    common = _common_names(num_stages)
    subsets = {"topk": (topk, False), "full": (full, True),
               "no_entropy": ([n for n in full if n not in entropic], False),
               "no_logprobs": ([n for n in full if n in common or n in entropic], True),
               "minimal": (common, False)}
    if name not in subsets:
        raise FeatureSchemaError(f"unknown feature schema {name!r}; choose one of "
                                 f"{sorted([*subsets, 'seed'])}")
    names, needs_entropy = subsets[name]
    return FeatureSchema(name, 1, tuple(names), needs_entropy, num_stages)


def _stats(x: np.ndarray) -> list[float]:
    if x.size == 0:
        return [0.0] * (len(QUANTILES) + 1)
    return [*np.quantile(x, QUANTILES).tolist(), float(x[-TAIL:].mean())]


def _top5_entropy(top_lp: np.ndarray) -> np.ndarray:
    """Entropy of the top-5 distribution with the rest of the mass as one extra outcome.

    A lower bound on the full entropy that any backend returning top-5 log-probs can compute.
    """
    p = np.exp(top_lp)
    rest = np.clip(1.0 - p.sum(-1, keepdims=True), 1e-12, 1.0)
    q = np.concatenate([p, rest], axis=-1)
    return -(q * np.log(np.clip(q, 1e-12, 1.0))).sum(-1)


def record_features(rec: dict[str, Any], schema: FeatureSchema) -> np.ndarray:
    """The schema's feature vector (float32) for one stage record."""
    tok = rec["tokens"]
    stage = int(rec["stage"])
    if stage >= schema.num_stages:
        raise FeatureSchemaError(f"record of stage {stage} but schema has {schema.num_stages}")
    if schema.needs_full_entropy and "entropies" not in tok:
        raise FeatureSchemaError(f"schema {schema.id} needs full-distribution entropies, which "
                                 f"this record's backend ({rec.get('backend')}) does not give")
    n_prompt, n_gen = int(rec["prompt_tokens"]), int(rec["generated_tokens"])
    if schema.name == "seed":
        ent = np.asarray(tok["entropies"], dtype=np.float64)
        top1 = np.asarray(tok["top1_logprobs"], dtype=np.float64)
        feats = [ent[-TAIL:].mean() if ent.size else 0.0, n_prompt / max(n_prompt + n_gen, 1),
                 float(n_gen), top1.mean() if top1.size else 0.0, float(stage)]
        return np.asarray(feats, dtype=np.float32)
    chosen = np.asarray(tok["token_logprobs"], dtype=np.float64)
    top = np.asarray(tok["top_logprobs"], dtype=np.float64).reshape(len(chosen), -1)
    onehot = [0.0] * schema.num_stages
    onehot[stage] = 1.0
    margin = top[:, 0] - top[:, 1] if top.shape[1] > 1 else np.zeros(len(chosen))
    feats = onehot + [np.log1p(n_prompt), np.log1p(n_gen),
                      float(rec.get("stop_reason") == "length")]
    feats += _stats(chosen)
    feats += [float((chosen < -1).mean()) if chosen.size else 0.0,
              float((chosen < -3).mean()) if chosen.size else 0.0]
    feats += _stats(margin) + _stats(_top5_entropy(top) if top.size else np.zeros(0))
    names = list(build_schema("topk", schema.num_stages).names)
    if schema.needs_full_entropy:
        feats += _stats(np.asarray(tok["entropies"], dtype=np.float64))
        names += _stat_names("entropy")
    by_name = dict(zip(names, feats))
    out = np.asarray([by_name[n] for n in schema.names], dtype=np.float32)
    if out.shape != (schema.dim,):
        raise AssertionError(f"schema {schema.id} has {schema.dim} names, built {out.shape}")
    if not np.isfinite(out).all():
        raise CascadeInputError(f"non-finite feature in record {rec.get('id')} stage {stage}")
    return out
