"""The cascade's quality predictor: an MLP that estimates P(answer acceptable | features).

Two heads share the MLP: ``correct`` (ground truth) and ``agreement`` (BLEU with the top
stage's answer > 0.8, the seed's label); rows without a target (NaN) are left out of that
head's loss. Feature standardisation (mean/std of the training split) is part of the module, so
the exported ONNX graph takes raw features. The feature schema is stored in the checkpoint and
checked when features come in.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule
from torch import nn
from torchmetrics.classification import (
    BinaryAUROC,
    BinaryAveragePrecision,
    BinaryCalibrationError,
)

from toolkit.cascade.features import FeatureSchema, build_schema
from toolkit.cascade.records_datamodule import TARGETS


class QualityPredictor(LightningModule):
    """MLP quality predictor (the seed's 256 → 128 → 1 by default).

    Args:
        schema: feature schema name (topk, full, seed); must match the DataModule's.
        num_stages: stages of the cascade.
        hidden: hidden layer widths.
        dropout: dropout after the last hidden layer (seed: 0.1).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        agreement_weight: weight of the agreement head's loss next to the correctness head's.
    """

    def __init__(self, schema: str = "topk", num_stages: int = 3,
                 hidden: list[int] | None = None, dropout: float = 0.1, lr: float = 3e-3,
                 weight_decay: float = 1e-4, agreement_weight: float = 0.5) -> None:
        super().__init__()
        hidden = [256, 128] if hidden is None else list(hidden)
        self.save_hyperparameters({"schema": schema, "num_stages": num_stages, "hidden": hidden,
                                   "dropout": dropout, "lr": lr, "weight_decay": weight_decay,
                                   "agreement_weight": agreement_weight})
        self.schema: FeatureSchema = build_schema(schema, num_stages)
        layers: list[nn.Module] = []
        width = self.schema.dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers += [nn.Dropout(dropout), nn.Linear(width, len(TARGETS))]
        self.net = nn.Sequential(*layers)
        self.register_buffer("feat_mean", torch.zeros(self.schema.dim))
        self.register_buffer("feat_std", torch.ones(self.schema.dim))
        self.metrics = nn.ModuleDict({
            f"{stage}_{t}": nn.ModuleDict({"auroc": BinaryAUROC(), "ap": BinaryAveragePrecision(),
                                           "ece": BinaryCalibrationError(n_bins=10)})
            for stage in ("val", "test") for t in TARGETS})

    # ------------------------------------------------------------------ model
    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.feat_mean.copy_(mean)
        self.feat_std.copy_(std.clamp_min(1e-6))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Raw features [B, F] -> probabilities [B, 2] (correct, agreement)."""
        return torch.sigmoid(self.net((features - self.feat_mean) / self.feat_std))

    # --------------------------------------------------------------- training
    def on_fit_start(self) -> None:
        dm = self.trainer.datamodule
        if dm is not None and hasattr(dm, "arrays") and not self.feat_std.ne(1).any():
            dm.schema.check_compatible(self.schema)
            x, _ = dm.arrays("train")
            x = torch.from_numpy(x)
            self.set_feature_stats(x.mean(0), x.std(0))

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen = ~torch.isnan(y)
        weights = torch.tensor([1.0, self.hparams.agreement_weight], device=y.device)
        bce = nn.functional.binary_cross_entropy_with_logits(
            logits, torch.nan_to_num(y), reduction="none")
        w = seen * weights
        return (bce * w).sum() / w.sum().clamp_min(1.0)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        loss = self._loss(self.net((x - self.feat_mean) / self.feat_std), y)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(x))
        return loss

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        x, y = batch
        logits = self.net((x - self.feat_mean) / self.feat_std)
        self.log(f"{stage}/loss", self._loss(logits, y), batch_size=len(x))
        probs = torch.sigmoid(logits)
        for j, t in enumerate(TARGETS):
            seen = ~torch.isnan(y[:, j])
            if seen.any():
                for m in self.metrics[f"{stage}_{t}"].values():
                    m.update(probs[seen, j], y[seen, j].long())
                brier = ((probs[seen, j] - y[seen, j]) ** 2).mean()
                self.log(f"{stage}/{t}_brier", brier, batch_size=int(seen.sum()))

    def _eval_epoch_end(self, stage: str) -> None:
        for t in TARGETS:
            for name, m in self.metrics[f"{stage}_{t}"].items():
                if m.update_count == 0:
                    continue
                try:
                    value = m.compute()
                except (RuntimeError, ValueError):  # a split with one class only
                    value = torch.tensor(float("nan"))
                key = f"{stage}/{name}" if t == "correct" else f"{stage}/{t}_{name}"
                self.log(key, value, prog_bar=(t == "correct" and name == "auroc"))
                m.reset()

    def validation_step(self, batch: Any, i: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: Any, i: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr,
                                 weight_decay=self.hparams.weight_decay)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["feature_schema"] = self.schema.to_dict()


def train_quality_predictor(features: np.ndarray, targets: np.ndarray, schema: str = "topk",
                            num_stages: int = 3, steps: int = 300, seed: int = 0,
                            **hparams: Any) -> QualityPredictor:
    """Fit a :class:`QualityPredictor` full batch on in-memory features, outside a Trainer.

    The one trainer behind replay's cross-validation and the bundle builder: the same model
    class, heads and loss that ``python cli.py fit`` trains (there with Lightning's loop and
    mini-batches), so what replay evaluates is the model ``fit`` ships. Seeded and, on CPU,
    deterministic: one thread, one summation order.

    Args:
        features: [N, F] raw features of the schema.
        targets: [N, 2] (correct, agreement) labels; NaN where a label does not exist (the
            top stage's agreement with itself), left out of that head's loss.
        schema: feature schema name.
        num_stages: stages of the cascade.
        steps: full-batch AdamW steps.
        seed: initialisation seed.
        **hparams: other ``QualityPredictor`` arguments (hidden, dropout, lr, …).
    """
    threads = torch.get_num_threads()
    # One thread: a few-thousand-row MLP gains nothing from more, and on a busy machine extra
    # intra-op threads make it many times slower; it also fixes the summation order.
    torch.set_num_threads(1)
    # Replay runs inside Trainer.test, which disables autograd (inference mode); the model must
    # be built and fitted with it back on.
    try:
        with torch.inference_mode(False), torch.enable_grad():
            torch.manual_seed(seed)
            module = QualityPredictor(schema=schema, num_stages=num_stages, **hparams)
            x = torch.from_numpy(np.asarray(features, dtype=np.float32))
            y = torch.from_numpy(np.asarray(targets, dtype=np.float32))
            module.set_feature_stats(x.mean(0), x.std(0))
            opt = module.configure_optimizers()
            module.train()
            for _ in range(steps):
                opt.zero_grad()
                module._loss(module.net((x - module.feat_mean) / module.feat_std), y).backward()
                opt.step()
        return module.eval()
    finally:
        torch.set_num_threads(threads)


def predict_correct(module: QualityPredictor, features: np.ndarray) -> np.ndarray:
    """P(correct) for features of any leading shape ([..., F] -> [...]), on one thread so that
    replay results are reproducible."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            x = torch.from_numpy(np.asarray(features, dtype=np.float32))
            flat = x.reshape(-1, x.shape[-1])
            return module(flat)[:, 0].numpy().reshape(x.shape[:-1])
    finally:
        torch.set_num_threads(threads)
