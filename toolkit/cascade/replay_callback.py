"""The replay watch dial of ``python cli.py fit``: the cascade (and cascade routing) replayed on
the validation prompts with the predictor being trained."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule

from toolkit.cascade import route_replay
from toolkit.cascade.prompt_table import PromptTable, load_prompt_table


class CascadeReplayCallback(Callback):
    """During fit: after each validation epoch, replay the whole cascade on the val prompts.

    The current predictor scores every (prompt, stage); the stopping policy is fitted on the
    train-split prompts (their scores are in-sample, so this is optimistic about calibration:
    a watch dial, not the evaluation; ``test --method cascade`` cross-validates properly) and
    replayed on the val prompts. Logs ``val/cascade_accuracy``, ``val/cascade_relative_cost``
    and ``val/cascade_stage_<k>``. A predictor with router heads also gets cascade routing
    (router cells from its heads, ``route_replay.fit_routed_policy``), charged the prompt
    embedding's forward: ``val/cascade_routing_accuracy``, ``val/cascade_routing_relative_cost``.

    Args:
        lam: λ of the stopping policy.
        data_dir: the labelled records; default: the trainer's DataModule's ``data_dir``.
        every_n_epochs: replay after every n-th validation epoch (and the last one).
    """

    def __init__(self, lam: float = 1.0, data_dir: str | None = None,
                 every_n_epochs: int = 5) -> None:
        self.lam, self.data_dir, self.every_n_epochs = lam, data_dir, every_n_epochs
        self.table: PromptTable | None = None
        self.embeddings: tuple[np.ndarray, np.ndarray] | None = None

    def _load(self, trainer: Any, pl_module: LightningModule) -> PromptTable:
        data_dir = self.data_dir or trainer.datamodule.hparams.data_dir
        self.table = t = load_prompt_table(data_dir, pl_module.hparams.schema,
                                           pl_module.hparams.num_stages)
        if getattr(pl_module, "reads_prompt", False):
            from toolkit.cascade.prompt_embeddings import load_sidecar

            slug = (pl_module.embedding_spec or {}).get("slug") or \
                trainer.datamodule.hparams.embedding_model
            emb, flops, _ = load_sidecar(data_dir, t.ids, slug)
            self.embeddings = (emb, flops / t.flops[:, -1].mean())
        return t

    def on_validation_epoch_end(self, trainer: Any, pl_module: LightningModule) -> None:
        from toolkit.cascade.stopping import evaluate, fit_policy

        if trainer.sanity_checking:
            return
        last = trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs
        if (trainer.current_epoch + 1) % self.every_n_epochs and not last:
            return  # the replay fits a policy per call: a watch dial, not needed every epoch
        t = self.table if self.table is not None else self._load(trainer, pl_module)
        n, L, F = t.features.shape
        tr, va = t.splits == "train", t.splits == "val"
        if not tr.any() or not va.any():
            return
        with torch.no_grad():
            x = torch.from_numpy(t.features.reshape(n * L, F)).to(pl_module.device)
            e = R = None
            if self.embeddings is not None:
                emb = torch.from_numpy(self.embeddings[0]).to(pl_module.device)
                e = emb.repeat_interleave(L, 0)  # prompt-major, as the features
                R = pl_module.route(emb).cpu().numpy().astype(np.float64)
            P = pl_module(x, e)[:, 0].cpu().numpy().reshape(n, L)
        C = t.cost
        policy = fit_policy(P[tr], t.correct[tr], C[tr], self.lam, groups=t.tasks[tr])
        ev = evaluate(policy, P[va], t.correct[va], C[va], t.tasks[va])
        pl_module.log("val/cascade_accuracy", float(ev["correct"].mean()))
        pl_module.log("val/cascade_relative_cost", float(ev["cost"].mean()))
        for k in range(L):
            pl_module.log(f"val/cascade_stage_{k}", float((ev["stage"] == k).mean()))
        if R is not None:
            cfg = route_replay.RoutingConfig(stages=tuple(range(L)))
            fitted = route_replay.fit_routed_policy("cascade-routing", P[tr], t.correct[tr],
                                                    C[tr], R[tr], cfg, lam=self.lam)
            ev = evaluate(fitted.policy, P[va], t.correct[va], C[va], fitted.cells(R[va]))
            pl_module.log("val/cascade_routing_accuracy", float(ev["correct"].mean()))
            pl_module.log("val/cascade_routing_relative_cost",
                          float((ev["cost"] + self.embeddings[1][va]).mean()))
