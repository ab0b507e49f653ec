"""During ``fit``: decode held-out problems with the adaptive and the static Fast-dLLM decoders.

Loss curves say little about decoding; this callback shows the end-to-end effect while the
model trains: accuracy and NFE of both decoders on the same K held-out problems per family.
It runs inside the Trainer's own processes (no Fabric, no subprocesses: the Trainer may itself
be running under a launcher), with the model in eval mode, and restores the mode it found.

Across processes (DDP) every rank decodes a shard of whole decode batches and the rows are
gathered on every rank (:mod:`toolkit.dllm.shards`: ``torch.distributed.all_gather_object``,
as ``cli.py test`` gathers its rows), so every rank holds one process's rows, sorted by
policy and problem id. Each rank then computes the same metrics
from the same sorted rows and logs them with ``sync_dist`` (the mean of equal values is that
value), so they can be monitored like any logged metric; only ``val/decode_s`` differs per
rank and is reduced with ``max`` (the slowest rank).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from toolkit.dllm.eval_module import decode_problems
from toolkit.dllm.registry import make_policy
from toolkit.dllm.shards import gather_sorted, rank_batches
from toolkit.dllm.tasks_data import Problem, get_family


class DiffusionDecodeCallback(Callback):
    """Every ``every_n_val_epochs`` validations, decode K val problems per family.

    Logs ``val/acc_adaptive``, ``val/acc_fastdllm``, ``val/nfe_adaptive``,
    ``val/nfe_fastdllm`` (means over the problems), plus ``val/block_adaptive`` (mean block
    size), ``val/decode_problems`` (problems decoded, all ranks together) and ``val/decode_s``
    (wall seconds the callback took, slowest rank). When a decoded family writes its steps out
    (the multiblock families), also ``val/step_acc_adaptive`` and ``val/step_acc_fastdllm``:
    the mean fraction of intermediate steps right, over the problems of such families.

    Args:
        every_n_val_epochs: run on every n-th validation (sanity checks excluded).
        num_problems: K, held-out (val split) problems per family.
        families: families to decode (default: every trained family).
        adaptive_args: settings of the adaptive policy (default: the seed's).
        fastdllm_args: settings of the static Fast-dLLM policy (default: B 32, τ 0.9, prefix
            cache).
        batch_size: problems per decode call.
    """

    def __init__(self, every_n_val_epochs: int = 1, num_problems: int = 8,
                 families: list[str] | None = None, adaptive_args: dict[str, Any] | None = None,
                 fastdllm_args: dict[str, Any] | None = None, batch_size: int = 8) -> None:
        if every_n_val_epochs < 1 or num_problems < 1 or batch_size < 1:
            raise ValueError("every_n_val_epochs, num_problems and batch_size must be ≥ 1")
        for f in families or []:
            get_family(f)
        self.every, self.k, self.families, self.batch_size = (every_n_val_epochs, num_problems,
                                                              families, batch_size)
        self.policies = {"adaptive": make_policy("adaptive", **(adaptive_args or {})),
                         "fastdllm": make_policy("fastdllm", **(fastdllm_args or {}))}
        self.validations = 0

    def _problems(self, trainer: Trainer) -> list[Problem]:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "split"):
            raise ValueError("DiffusionDecodeCallback needs a DiffusionTaskDataModule")
        families = self.families or list(dm.families)
        picked: list[Problem] = []
        for family in families:
            picked += [p for p in dm.split("val") if p.family == family][:self.k]
        return picked

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.validations += 1
        if self.validations % self.every:
            return
        t0 = time.perf_counter()
        shard = rank_batches(self._problems(trainer), self.batch_size, trainer.global_rank,
                             trainer.world_size)
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                rows = [{**row, "policy": name} for name, policy in self.policies.items()
                        for batch in shard for row in self._decode(pl_module, batch, policy)]
        finally:
            pl_module.train(was_training)
        rows = gather_sorted(rows, ("policy", "id"))  # collective: every rank calls it
        for name in self.policies:
            mine = [r for r in rows if r["policy"] == name]
            self._log(pl_module, f"val/acc_{name}", np.mean([r["correct"] for r in mine]))
            self._log(pl_module, f"val/nfe_{name}", np.mean([r["nfe"] for r in mine]))
            steps = [r["step_accuracy"] for r in mine if "step_accuracy" in r]
            if steps:
                self._log(pl_module, f"val/step_acc_{name}", np.mean(steps))
        self._log(pl_module, "val/block_adaptive",
                  np.mean([r["mean_block_size"] for r in rows if r["policy"] == "adaptive"]))
        self._log(pl_module, "val/decode_problems", len(rows) / len(self.policies))
        self._log(pl_module, "val/decode_s", time.perf_counter() - t0, reduce_fx="max")

    @staticmethod
    def _log(pl_module: LightningModule, key: str, value: float, reduce_fx: str = "mean"
             ) -> None:
        # Every rank logs the value computed from the same gathered rows; sync_dist's mean
        # of equal values is that value (and it keeps Lightning's epoch-level check quiet).
        # batch_size 1 on every rank: else Lightning weights the mean by each rank's last
        # val batch, and unequal weights could round the equal values differently.
        pl_module.log(key, float(value), sync_dist=True, reduce_fx=reduce_fx, batch_size=1)

    def _decode(self, pl_module: LightningModule, batch: list[Problem],
                policy: Any) -> list[dict[str, Any]]:
        """One decode call on one batch (one family)."""
        return decode_problems(pl_module.model, pl_module.tokenizer, batch, policy,
                               get_family(batch[0].family).gen_length,
                               batch_size=len(batch))
