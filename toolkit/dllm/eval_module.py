"""``python cli.py test --method dllm-<policy>``: decode held-out problems with one policy.

The DataModule yields indices of held-out problems (the Trainer's sampler shards them over
ranks); each test step decodes its batch (one :func:`~toolkit.dllm.decoding.decode` call per
family, since families differ in generation length) and keeps one row per problem. At epoch
end the rows of every rank are gathered, de-duplicated and sorted by id, and rank 0 computes
every metric once and writes results.json, examples.jsonl, plots and TensorBoard entries.

Rows of a family the checkpoint was not trained on at this generation length (e.g. the
long-context case at 2048 for a model trained at 512) are labelled ``speed_only``: their NFE,
wall time and throughput are reported, their accuracy is not.
"""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from toolkit.dllm.adaptive_policy import AdaptivePolicy
from toolkit.dllm.decoding import decode
from toolkit.dllm.eval_report import accuracy_vs_nfe_plot, nfe_over_answer_plot
from toolkit.dllm.policies import DecodeInputError, Policy
from toolkit.dllm.registry import make_policy
from toolkit.dllm.tasks_data import (
    LONG_FAMILY,
    SHORT_FAMILIES,
    CharTokenizer,
    Problem,
    get_family,
    make_problems,
    score,
    step_score,
)
from toolkit.evaluation.harness import EvaluationModule
from toolkit.evaluation.results import RunReport, metric

REPO = Path(__file__).resolve().parents[2]


def bound_block(policy: Policy) -> int:
    """The largest block a policy can open: NFE ≥ ceil(L_eff / B) with this B.

    Every step commits only inside the current block, so a row needs at least one forward
    per block; an adaptive policy's blocks never exceed ``max_block_size``.
    """
    if isinstance(policy, AdaptivePolicy):
        return policy.max_block_size if policy.dynamic_block else policy.base_block_size
    return int(policy.block_length)  # type: ignore[attr-defined]


def decode_problems(model: Any, tok: CharTokenizer, problems: list[Problem], policy: Policy,
                    gen_length: int, batch_size: int = 1, temperature: float = 0.0,
                    seed: int = 0) -> list[dict[str, Any]]:
    """Decode ``problems`` (one family) in batches and return one scored row per problem."""
    rows = []
    block = bound_block(policy)
    for i in range(0, len(problems), batch_size):
        chunk = problems[i:i + batch_size]
        res = decode(model, [tok.encode_prompt(p.prompt) for p in chunk], gen_length, policy,
                     temperature=temperature, seed=seed)
        for r, p in enumerate(chunk):
            text = tok.decode(res.answers[r].tolist())
            n_ans = res.answer_tokens[r]
            steps = res.tokens_per_step[r]
            computed, cached = res.positions_computed[r], res.positions_cached[r]
            rows.append({
                "id": p.id, "family": p.family, "kind": get_family(p.family).kind,
                "prompt": p.prompt, "reference": p.answer, "completion": text,
                # A mask left before the EOS is part of the answer (the tokenizer drops it).
                "correct": 0.0 if res.masks_left[r] else float(score(p, text)),
                "gen_length": gen_length, "masks_left": res.masks_left[r],
                "stalled": float(res.stalled[r]),
                "nfe": res.nfe[r], "nfe_full": res.nfe_full[r], "nfe_cached": res.nfe_cached[r],
                "answer_tokens": n_ans, "reference_tokens": len(p.answer) + 1,
                "block_for_bound": block, "lower_bound": math.ceil(n_ans / block),
                "blocks_opened": len(res.block_sizes[r]),
                "mean_block_size": float(np.mean(res.block_sizes[r])),
                "block_sizes": list(res.block_sizes[r]),
                "tokens_per_step": sum(steps) / max(len(steps), 1),
                "adaptations": res.adaptations[r], "stopped_at_eos": res.stopped_at_eos[r],
                "positions_computed": computed, "positions_cached": cached,
                "commit_nfe": res.commit_nfe[r].tolist(),
                # A batch's wall time is shared equally by its rows (batch 1: the row's own).
                "wall_s": res.wall_time_s / len(chunk), "decode_batch": len(chunk),
            })
            steps = step_score(p, text)
            if steps is not None:  # only families that write steps (multiblock) have the key
                # Partial credit: a mask left in a step drops a character, so that step is
                # wrong, the others still count.
                rows[-1]["step_accuracy"] = steps
    return rows


def ratio_metric(num: list[float], den: list[float], seed: int = 0) -> dict[str, Any]:
    """Σnum / Σden with a bootstrap interval over examples (rates such as tokens per second)."""
    a, b = np.asarray(num, np.float64), np.asarray(den, np.float64)
    if len(a) == 0 or b.sum() <= 0:
        return {"value": None, "ci95": None, "n": int(len(a))}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(2000, len(a)))
    boots = a[idx].sum(1) / np.maximum(b[idx].sum(1), 1e-12)
    return {"value": float(a.sum() / b.sum()),
            "ci95": [float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))],
            "n": int(len(a))}


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Every metric of a set of rows (accuracy only over rows that are not speed-only).

    ``step_accuracy`` (the mean fraction of intermediate steps right) is there only when some
    scored row has one, i.e. for families that write their steps out.
    """
    scored = [r["correct"] for r in rows if not r["speed_only"]]
    stepped = [r["step_accuracy"] for r in rows
               if not r["speed_only"] and r.get("step_accuracy") is not None]
    out: dict[str, Any] = {
        "accuracy": metric(scored) if scored else {"value": None, "ci95": None, "n": 0},
        **({"step_accuracy": metric(stepped)} if stepped else {}),
        "tokens_per_s": ratio_metric([r["answer_tokens"] for r in rows],
                                     [r["wall_s"] for r in rows]),
        "cache_hit_rate": ratio_metric([r["positions_cached"] for r in rows],
                                       [r["positions_cached"] + r["positions_computed"]
                                        for r in rows]),
        "speed_only": not scored,
    }
    for key in ("nfe", "nfe_full", "nfe_cached", "lower_bound", "mean_block_size",
                "tokens_per_step", "answer_tokens", "adaptations", "wall_s", "stalled"):
        out[key] = metric([r[key] for r in rows])
    out["nfe_over_lower_bound"] = metric([r["nfe"] / max(r["lower_bound"], 1) for r in rows])
    return out


class DiffusionEvalDataModule(LightningDataModule):
    """Held-out problems to decode (indices; map-style, so the Trainer shards them).

    Args:
        families: task families (default: the short ones); ignored when ``long_context``.
        n_per_family: problems per family.
        split: ``test`` (or ``val``).
        seed: data seed (as in training; the split is also fixed by a prompt hash).
        long_context: decode only ``long_family`` at ``long_gen_length`` (the seed's
            ``--long-context`` case).
        long_family: the family with long answers.
        long_gen_length: generation length of the long-context case (≥ 512).
        batch_size: problems per decode call (1 gives per-problem wall times).
    """

    def __init__(self, families: list[str] | None = None, n_per_family: int = 50,
                 split: str = "test", seed: int = 0, long_context: bool = False,
                 long_family: str = LONG_FAMILY, long_gen_length: int = 512,
                 batch_size: int = 1) -> None:
        super().__init__()
        if long_context and long_gen_length < 512:
            raise ValueError(f"long_gen_length must be ≥ 512, got {long_gen_length}")
        if n_per_family < 1 or batch_size < 1:
            raise ValueError("n_per_family and batch_size must be ≥ 1")
        families = list(families or SHORT_FAMILIES)
        for f in [*families, long_family]:
            get_family(f)
        self.save_hyperparameters({"families": families, "n_per_family": n_per_family,
                                   "split": split, "seed": seed, "long_context": long_context,
                                   "long_family": long_family,
                                   "long_gen_length": long_gen_length, "batch_size": batch_size})
        self.problems: list[Problem] = []
        self.gen_lengths: dict[str, int] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.problems:
            return
        hp = self.hparams
        if hp.long_context:
            self.gen_lengths = {hp.long_family: hp.long_gen_length}
        else:
            self.gen_lengths = {f: get_family(f).gen_length for f in hp.families}
        self.problems = [p for f, g in self.gen_lengths.items()
                         for p in make_problems(f, hp.split, hp.n_per_family, hp.seed,
                                                gen_length=g)]

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(list(range(len(self.problems))), batch_size=self.hparams.batch_size)


def _resolve(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() or p.exists() else REPO / p


class DiffusionDecodeEval(EvaluationModule):
    """Decode held-out problems with one policy from a ``cli.py fit`` checkpoint.

    Args:
        checkpoint: the trained model (``.ckpt`` of ``configs/dllm/train.yaml``); loaded in
            ``setup``, so configs parse before it exists.
        method: name of this method in results and TensorBoard (e.g. ``dllm-adaptive``).
        policy: ``llada``, ``fastdllm`` or ``adaptive``.
        policy_args: the policy's settings (see ``toolkit/dllm/policies.py``).
        temperature: Gumbel-max temperature (0: greedy).
        seed: decoding seed (only used when sampling).
        plot_examples: examples drawn in the NFE/block-size-over-answer plot.
    """

    def __init__(self, checkpoint: str = "checkpoints/dllm/small/model.ckpt",
                 method: str = "dllm-adaptive", policy: str = "adaptive",
                 policy_args: dict[str, Any] | None = None, temperature: float = 0.0,
                 seed: int = 0, plot_examples: int = 4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.policy = make_policy(policy, **(policy_args or {}))
        self.net: torch.nn.Module | None = None

    def setup(self, stage: str | None = None) -> None:
        from toolkit.dllm.train_module import load_diffusion_checkpoint_with_meta

        if self.net is not None:
            return
        t0 = time.perf_counter()
        path = _resolve(self.hparams.checkpoint)
        self.net, self.tok, self.meta = load_diffusion_checkpoint_with_meta(path)
        self.net.requires_grad_(False)
        self.trained_context = self.net.config.max_sequence_length
        self.ckpt_path = path
        self.ckpt_sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        self.load_s = time.perf_counter() - t0
        # Refuse bad lengths/steps before decoding anything (one line from the CLI).
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "gen_lengths"):
            dm.setup("test")
            for gen in sorted(set(dm.gen_lengths.values())):
                self.policy.validate(gen)
            for family, gen in dm.gen_lengths.items():
                need = max((len(self.tok.encode_prompt(p.prompt)) + gen for p in dm.problems
                            if p.family == family), default=0)
                if need > self.trained_context and not dm.hparams.long_context:
                    raise DecodeInputError(
                        f"{family}: prompt + gen_length {gen} reaches {need} tokens, beyond "
                        f"the model's context of {self.trained_context} (max_sequence_length); "
                        "only --data.init_args.long_context true may go past it (speed-only)")

    def test_step(self, batch: torch.Tensor, _: int) -> None:
        dm = self.trainer.datamodule
        trained = self.meta["families"]
        by_family: dict[str, list[Problem]] = {}
        for i in batch.tolist():
            by_family.setdefault(dm.problems[i].family, []).append(dm.problems[i])
        self.net.eval()
        for family, problems in by_family.items():
            gen = dm.gen_lengths[family]
            extended = self._fit_context(problems, gen, bool(dm.hparams.long_context))
            rows = decode_problems(self.net, self.tok, problems, self.policy, gen,
                                   batch_size=len(problems),
                                   temperature=self.hparams.temperature, seed=self.hparams.seed)
            for r in rows:
                r["speed_only"] = extended or trained.get(family) != gen
                r["trained_gen_length"] = trained.get(family)
                r["context_extended"] = extended
            self.rows += rows

    def _fit_context(self, problems: list[Problem], gen_length: int, long_context: bool) -> bool:
        """Whether the model's context had to be extended for these problems.

        Only the long-context case may go past the trained context: rotary positions have no
        learnt table, so the network runs, but it never saw such positions, so the rows are
        speed-only. Anywhere else ``decode`` refuses with a clear error.
        """
        need = max(len(self.tok.encode_prompt(p.prompt)) for p in problems) + gen_length
        if need <= self.trained_context or not long_context:
            return False  # beyond the context outside long_context: decode() raises clearly
        cfg = self.net.config
        cfg.max_sequence_length = max(cfg.max_sequence_length, need)
        return True

    def build_report(self, rows_sorted: list[dict[str, Any]]) -> RunReport:
        hp, dm = self.hparams, self.trainer.datamodule
        metrics = summarise(rows_sorted)
        families = sorted({r["family"] for r in rows_sorted})
        metrics["by_family"] = {f: summarise([r for r in rows_sorted if r["family"] == f])
                                for f in families}
        metrics["speed_only_families"] = [f for f in families
                                          if metrics["by_family"][f]["speed_only"]]
        extra = {"policy": self.policy.config(),
                 "lower_bound": {"block": bound_block(self.policy),
                                 "rule": "NFE >= ceil(L_eff / B), L_eff = answer tokens "
                                         "(EOS included) rounded up to a block"},
                 "checkpoint": {"path": str(self.ckpt_path), "sha256": self.ckpt_sha256,
                                "trained_families": self.meta["families"],
                                "data_seed": self.meta["data_seed"]},
                 "long_context": {"enabled": bool(dm.hparams.long_context),
                                  "gen_lengths": dict(dm.gen_lengths),
                                  "speed_only": metrics["speed_only"],
                                  "trained_context": self.trained_context,
                                  "context_extended": any(r["context_extended"]
                                                          for r in rows_sorted)}}
        if hp.policy == "llada":
            extra["note"] = ("llada runs steps = gen_length unless policy_args.steps is set "
                             "(Fast-dLLM's baseline)")
        n_params = sum(p.numel() for p in self.net.parameters())
        models = [{"slug": self.ckpt_path.parent.name, "path": str(self.ckpt_path),
                   "sha256": self.ckpt_sha256, "quantisation": "none", "params": n_params}]
        data = {"name": "reasoning-gym families (toolkit.dllm.tasks_data)",
                "split": dm.hparams.split, "families": dict(dm.gen_lengths)}
        timings = {"load_s": self.load_s, "decode_s": float(sum(r["wall_s"] for r in rows_sorted))}
        return RunReport(hp.method, metrics, rows_sorted, dict(hp), hp.seed, models, data,
                         timings, extra)

    def figures(self, rows: list[dict[str, Any]], report: RunReport) -> dict[str, Any]:
        return {"nfe_over_answer": nfe_over_answer_plot(rows, self.hparams.plot_examples,
                                                        self.hparams.method),
                "accuracy_vs_nfe": accuracy_vs_nfe_plot(report.metrics, self.hparams.method)}
