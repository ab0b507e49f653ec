"""During ``fit``: decode held-out problems with the adaptive and the static Fast-dLLM decoders.

Loss curves say little about decoding; this callback shows the end-to-end effect while the
model trains: accuracy and NFE of both decoders on the same K held-out problems per family.
It runs inside the Trainer's own process on rank 0 only (no Fabric, no subprocesses: the
Trainer may itself be running under a launcher), with the model in eval mode, and restores
the mode it found.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from toolkit.dllm.eval_module import decode_problems
from toolkit.dllm.policies import make_policy
from toolkit.dllm.tasks_data import Problem, get_family


class DiffusionDecodeCallback(Callback):
    """Every ``every_n_val_epochs`` validations, decode K val problems per family.

    Logs ``val/acc_adaptive``, ``val/acc_fastdllm``, ``val/nfe_adaptive``,
    ``val/nfe_fastdllm`` (means over the problems), plus ``val/block_adaptive`` (mean block
    size) and ``val/decode_s`` (wall seconds the callback took).

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
        if self.validations % self.every or trainer.global_rank != 0:
            return
        t0 = time.perf_counter()
        problems = self._problems(trainer)
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                results = {name: self._decode(pl_module, problems, policy)
                           for name, policy in self.policies.items()}
        finally:
            pl_module.train(was_training)
        for name, rows in results.items():
            pl_module.log(f"val/acc_{name}", float(np.mean([r["correct"] for r in rows])),
                          rank_zero_only=True)
            pl_module.log(f"val/nfe_{name}", float(np.mean([r["nfe"] for r in rows])),
                          rank_zero_only=True)
        pl_module.log("val/block_adaptive",
                      float(np.mean([r["mean_block_size"] for r in results["adaptive"]])),
                      rank_zero_only=True)
        pl_module.log("val/decode_s", time.perf_counter() - t0, rank_zero_only=True)

    def _decode(self, pl_module: LightningModule, problems: list[Problem],
                policy: Any) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for family in dict.fromkeys(p.family for p in problems):
            mine = [p for p in problems if p.family == family]
            rows += decode_problems(pl_module.model, pl_module.tokenizer, mine, policy,
                                    get_family(family).gen_length, batch_size=self.batch_size)
        return rows
