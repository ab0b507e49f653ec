"""The cascade's predictor: P(a stage's answer is correct), before and after its draft.

Post-draft heads (always): an MLP reads a stage's draft features (a feature schema such as
``topk-v1``) and predicts ``correct`` (ground truth) and ``agreement`` (BLEU with the top
stage's answer > 0.8, the seed's label); rows without a target (NaN) are left out of that
head's loss.

Router heads (when ``embedding_dim > 0``): the prompt's embedding (pooled hidden states of a
small model, ``prompt_embeddings.py``; 576-1,536 wide) is standardised and projected to
``projection_dim`` (<= 64) dimensions, and one linear head per stage predicts from that code
alone whether the stage will answer correctly: the router of cascade routing, trained on every
(prompt, stage) correctness label as in matrix-factorisation routers. With
``draft_reads_prompt`` the post-draft MLP reads the same code next to the draft features.
The projection lives inside the module, so the exported ONNX graph takes raw features and raw
embeddings and its cost does not grow with the embedding's width beyond one small matmul.

Standardisation (mean/std of the training split) is part of the module. The feature schema,
and the embedding's spec (model slug, sha256, layers, pooling), are stored in the checkpoint
and checked when inputs come in.
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

from toolkit.cascade.features import CascadeInputError, FeatureSchema, build_schema
from toolkit.cascade.records_datamodule import TARGETS

Batch = dict[str, torch.Tensor]


class QualityPredictor(LightningModule):
    """Post-draft MLP (the seed's 256 → 128 → 1 by default) and optional router heads.

    Args:
        schema: feature schema name (topk, full, seed); must match the DataModule's.
        num_stages: stages of the cascade.
        hidden: hidden layer widths of the post-draft MLP.
        dropout: dropout after the last hidden layer (seed: 0.1).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        agreement_weight: weight of the agreement head's loss next to the correctness head's.
        embedding_dim: width of the prompt embedding the router heads read (the sidecar's
            ``dim``, e.g. 1,152 for SmolLM2-135M's two pooled layers); 0: no router heads.
        projection_dim: the embedding is projected to this many dimensions (<= 64 keeps the
            ONNX call near the draft-only one's latency).
        router_weight: weight of the router heads' loss.
        draft_reads_prompt: the post-draft MLP also reads the projected prompt embedding.
        router_l2: L2 penalty (in the loss, as in logistic regression; no AdamW decay) on the
            projection and router weights: hidden states are ~1,000 wide and prompts a few
            hundred, so they need far stronger regularisation than the post-draft MLP.
            Decoupled AdamW decay strong enough to help left the weights oscillating and the
            out-of-fold AUROC seed-dependent (0.89-0.95 at stage 0 over three seeds).
    """

    def __init__(self, schema: str = "topk", num_stages: int = 3,
                 hidden: list[int] | None = None, dropout: float = 0.1, lr: float = 3e-3,
                 weight_decay: float = 1e-4, agreement_weight: float = 0.5,
                 embedding_dim: int = 0, projection_dim: int = 32, router_weight: float = 1.0,
                 draft_reads_prompt: bool = True, router_l2: float = 0.3) -> None:
        super().__init__()
        hidden = [256, 128] if hidden is None else list(hidden)
        if embedding_dim < 0 or (embedding_dim and not 1 <= projection_dim <= 64):
            raise CascadeInputError(f"need embedding_dim >= 0 and 1 <= projection_dim <= 64, "
                                    f"got {embedding_dim} and {projection_dim}")
        self.save_hyperparameters({"schema": schema, "num_stages": num_stages, "hidden": hidden,
                                   "dropout": dropout, "lr": lr, "weight_decay": weight_decay,
                                   "agreement_weight": agreement_weight,
                                   "embedding_dim": embedding_dim,
                                   "projection_dim": projection_dim,
                                   "router_weight": router_weight,
                                   "draft_reads_prompt": draft_reads_prompt,
                                   "router_l2": router_l2})
        self.schema: FeatureSchema = build_schema(schema, num_stages)
        # The embedding model's spec (slug, sha256, layers, pooling): set from the DataModule
        # at fit start, saved in the checkpoint and the ONNX metadata.
        self.embedding_spec: dict[str, Any] | None = None
        self.reads_prompt = embedding_dim > 0
        width = self.schema.dim
        if self.reads_prompt:
            self.register_buffer("emb_mean", torch.zeros(embedding_dim))
            self.register_buffer("emb_std", torch.ones(embedding_dim))
            self.project = nn.Linear(embedding_dim, projection_dim)
            self.router_head = nn.Linear(projection_dim, num_stages)
            width += projection_dim if draft_reads_prompt else 0
        layers: list[nn.Module] = []
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
            for stage in ("val", "test") for t in (*TARGETS, "router")})

    # ------------------------------------------------------------------ model
    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor,
                          emb_mean: torch.Tensor | None = None,
                          emb_std: torch.Tensor | None = None) -> None:
        self.feat_mean.copy_(mean)
        self.feat_std.copy_(std.clamp_min(1e-6))
        if self.reads_prompt and emb_mean is not None and emb_std is not None:
            self.emb_mean.copy_(emb_mean)
            self.emb_std.copy_(emb_std.clamp_min(1e-6))

    def _code(self, embedding: torch.Tensor) -> torch.Tensor:
        """Raw prompt embedding [B, D] -> its projection [B, projection_dim]."""
        return self.project((embedding - self.emb_mean) / self.emb_std)

    def _draft_logits(self, features: torch.Tensor, code: torch.Tensor | None) -> torch.Tensor:
        x = (features - self.feat_mean) / self.feat_std
        if self.reads_prompt and self.hparams.draft_reads_prompt:
            if code is None:
                raise CascadeInputError("this predictor's post-draft heads read the prompt "
                                        "embedding; none was given")
            x = torch.cat([x, code], dim=-1)
        return self.net(x)

    def forward(self, features: torch.Tensor,
                embedding: torch.Tensor | None = None) -> torch.Tensor:
        """Raw features [B, F] (and raw prompt embeddings [B, D] when the module reads the
        prompt) -> post-draft probabilities [B, 2] (correct, agreement)."""
        code = self._code(embedding) if self.reads_prompt and embedding is not None else None
        return torch.sigmoid(self._draft_logits(features, code))

    def route(self, embedding: torch.Tensor) -> torch.Tensor:
        """Raw prompt embeddings [B, D] -> [B, L]: P(stage k answers correctly), before any
        stage has run (the router heads)."""
        if not self.reads_prompt:
            raise CascadeInputError("this predictor has no router heads (embedding_dim 0)")
        return torch.sigmoid(self.router_head(self._code(embedding)))

    # --------------------------------------------------------------- training
    def on_fit_start(self) -> None:
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "arrays") or self.feat_std.ne(1).any():
            return
        dm.schema.check_compatible(self.schema)
        x, _ = dm.arrays("train")
        x = torch.from_numpy(x)
        emb_mean = emb_std = None
        if self.reads_prompt:
            e, self.embedding_spec = dm.embedding_arrays("train")
            if e.shape[1] != self.hparams.embedding_dim:
                raise CascadeInputError(
                    f"the model's embedding_dim is {self.hparams.embedding_dim} but the "
                    f"prompt embeddings of {self.embedding_spec.get('slug')} are {e.shape[1]} "
                    "wide; set --model.init_args.embedding_dim to match")
            e = torch.from_numpy(e)
            emb_mean, emb_std = e.mean(0), e.std(0)
        self.set_feature_stats(x.mean(0), x.std(0), emb_mean, emb_std)

    def _losses(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(loss, post-draft logits [B, 2], router logits of each row's stage [B] or None)."""
        y = batch["targets"]
        code = self._code(batch["embedding"]) if self.reads_prompt else None
        logits = self._draft_logits(batch["features"], code)
        seen = ~torch.isnan(y)
        weights = torch.tensor([1.0, self.hparams.agreement_weight], device=y.device)
        bce = nn.functional.binary_cross_entropy_with_logits(
            logits, torch.nan_to_num(y), reduction="none")
        w = seen * weights
        loss = (bce * w).sum() / w.sum().clamp_min(1.0)
        if code is None:
            return loss, logits, None
        # Router: each row is one (prompt, stage) pair; its stage's head learns correctness.
        r = self.router_head(code).gather(1, batch["stage"].long()[:, None])[:, 0]
        ok = seen[:, 0]
        r_bce = nn.functional.binary_cross_entropy_with_logits(
            r, torch.nan_to_num(y[:, 0]), reduction="none")
        loss = loss + self.hparams.router_weight * (r_bce * ok).sum() / ok.sum().clamp_min(1)
        if self.hparams.router_l2:
            loss = loss + self.hparams.router_l2 / 2 * (self.project.weight.square().sum()
                                                        + self.router_head.weight.square().sum())
        return loss, logits, r

    def training_step(self, batch: Batch, _: int) -> torch.Tensor:
        loss, _, _ = self._losses(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["targets"]))
        return loss

    def _eval_step(self, batch: Batch, stage: str) -> None:
        y = batch["targets"]
        loss, logits, r = self._losses(batch)
        self.log(f"{stage}/loss", loss, batch_size=len(y))
        probs = torch.sigmoid(logits)
        heads = [(t, probs[:, j], y[:, j]) for j, t in enumerate(TARGETS)]
        if r is not None:
            heads.append(("router", torch.sigmoid(r), y[:, 0]))
        for t, p, target in heads:
            seen = ~torch.isnan(target)
            if seen.any():
                for m in self.metrics[f"{stage}_{t}"].values():
                    m.update(p[seen], target[seen].long())
                brier = ((p[seen] - target[seen]) ** 2).mean()
                self.log(f"{stage}/{t}_brier", brier, batch_size=int(seen.sum()))

    def _eval_epoch_end(self, stage: str) -> None:
        for t in (*TARGETS, "router"):
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

    def validation_step(self, batch: Batch, i: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: Batch, i: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        # Weights only: the router heads' biases carry each stage's base rate, which decay
        # would pull towards 0.5.
        router = [self.project.weight, self.router_head.weight] if self.reads_prompt else []
        ids = {id(q) for q in router}
        rest = [q for q in self.parameters() if id(q) not in ids]
        groups = [{"params": rest, "weight_decay": hp.weight_decay}]
        if router:
            groups.append({"params": router, "weight_decay": 0.0})  # router_l2 instead
        return torch.optim.AdamW(groups, lr=hp.lr)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["feature_schema"] = self.schema.to_dict()
        if self.embedding_spec is not None:
            checkpoint["prompt_embedding"] = self.embedding_spec

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.embedding_spec = checkpoint.get("prompt_embedding")


def _one_thread(fn: Any) -> Any:
    """Run ``fn`` on one torch thread (small models gain nothing from more, and on a busy
    machine extra intra-op threads make them many times slower; it also fixes the summation
    order, so replay results are reproducible)."""
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    wrapped.__doc__, wrapped.__name__ = fn.__doc__, fn.__name__
    return wrapped


@_one_thread
def train_quality_predictor(features: np.ndarray, targets: np.ndarray, schema: str = "topk",
                            num_stages: int = 3, steps: int = 300, seed: int = 0,
                            embeddings: np.ndarray | None = None,
                            stages: np.ndarray | None = None,
                            **hparams: Any) -> QualityPredictor:
    """Fit a :class:`QualityPredictor` full batch on in-memory rows, outside a Trainer.

    The one trainer behind replay's cross-validation and the bundle builder: the same model
    class, heads and loss that ``python cli.py fit`` trains (there with Lightning's loop and
    mini-batches), so what replay evaluates is the model ``fit`` ships. Seeded and, on CPU,
    deterministic: one thread, one summation order.

    Args:
        features: [N, F] raw features of the schema, one row per (prompt, stage).
        targets: [N, 2] (correct, agreement) labels; NaN where a label does not exist (the
            top stage's agreement with itself), left out of that head's loss.
        schema: feature schema name.
        num_stages: stages of the cascade.
        steps: full-batch AdamW steps.
        seed: initialisation seed.
        embeddings: [N, D] raw prompt embedding of each row's prompt: trains the router heads
            (``embedding_dim`` is set from it); None: post-draft heads only.
        stages: [N] stage index of each row (needed with ``embeddings``).
        **hparams: other ``QualityPredictor`` arguments (hidden, dropout, lr, …).
    """
    # Replay runs inside Trainer.test, which disables autograd (inference mode); the model must
    # be built and fitted with it back on.
    with torch.inference_mode(False), torch.enable_grad():
        torch.manual_seed(seed)
        batch = {"features": torch.from_numpy(np.asarray(features, dtype=np.float32)),
                 "targets": torch.from_numpy(np.asarray(targets, dtype=np.float32))}
        x = batch["features"]
        if embeddings is not None:
            if stages is None:
                raise ValueError("embeddings need the stage of each row")
            batch["embedding"] = torch.from_numpy(np.asarray(embeddings, dtype=np.float32))
            batch["stage"] = torch.from_numpy(np.asarray(stages, dtype=np.int64))
            hparams["embedding_dim"] = batch["embedding"].shape[1]
        module = QualityPredictor(schema=schema, num_stages=num_stages, **hparams)
        e = batch.get("embedding")
        module.set_feature_stats(x.mean(0), x.std(0), None if e is None else e.mean(0),
                                 None if e is None else e.std(0))
        opt = module.configure_optimizers()
        module.train()
        for _ in range(steps):
            opt.zero_grad()
            module._losses(batch)[0].backward()
            opt.step()
    return module.eval()


@_one_thread
def predict_correct(module: QualityPredictor, features: np.ndarray,
                    embeddings: np.ndarray | None = None) -> np.ndarray:
    """Post-draft P(correct) for features of any leading shape ([..., F] -> [...]); a module
    that reads the prompt also takes ``embeddings`` [N, D], broadcast over the stages when
    features are [N, L, F]."""
    with torch.no_grad():
        x = torch.from_numpy(np.asarray(features, dtype=np.float32))
        flat = x.reshape(-1, x.shape[-1])
        e = None
        if embeddings is not None and module.reads_prompt:
            e = torch.from_numpy(np.asarray(embeddings, dtype=np.float32))
            e = e.reshape(*e.shape[:1], *([1] * (x.dim() - 2)), e.shape[-1])
            e = e.expand(*x.shape[:-1], e.shape[-1]).reshape(-1, e.shape[-1])
        return module(flat, e)[:, 0].numpy().reshape(x.shape[:-1])


@_one_thread
def predict_route(module: QualityPredictor, embeddings: np.ndarray) -> np.ndarray:
    """Router heads: [N, D] raw prompt embeddings -> [N, L] P(stage answers correctly)."""
    with torch.no_grad():
        return module.route(torch.from_numpy(np.asarray(embeddings, dtype=np.float32))
                            ).numpy().astype(np.float64)
