"""Supervised fine-tuning of π_θ on q* generations, LoRA by default, optional importance weights.

LoRA (a minimal, dependency-free version): each targeted ``nn.Linear`` W is replaced by
``W x + (α/r) · B A x`` with A (r × in) random, B (out × r) zero, so training starts exactly at
the base model; W is frozen and only A, B train. Checkpoints keep only the trainable tensors
(the frozen base comes from ``model``), which for a 0.5B model is a few MB instead of 2 GB.

Importance weighting (off by default). Each sample may carry a sequence log-weight
``log w_i`` (``log_weight`` in the diagnostics file: Σ_t log π_θ/q over its tokens, written by
``generate`` when it samples).
Per batch the weights are self-normalised in log space, ``w̃ = softmax(log w)`` (no overflow
however long the sequence), capped at ``weight_clip`` times the uniform weight 1/B and
renormalised (``batch_weights``: the excess goes to the others in proportion); the loss is
Σ w̃_i · loss_i and ``train/batch_ess`` = 1 / Σ w̃_i² (B when uniform, 1 when one sample
takes all the weight) is logged so a collapse is visible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn

from toolkit.common.errors import UserError


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update ``(alpha/r) · B A``.

    Args:
        base: the Linear to adapt (its parameters are frozen).
        r: rank of the update.
        alpha: scale numerator (the update is multiplied by alpha / r).
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float) -> None:
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank must be > 0, got {r}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=dev, dtype=dt))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises
        self.scale = alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale


def apply_lora(model: nn.Module, targets: Sequence[str], r: int, alpha: float) -> list[str]:
    """Freeze ``model`` and wrap every Linear whose attribute name is in ``targets``.

    Returns:
        The dotted names of the wrapped modules.

    Raises:
        ValueError: no Linear matched (a typo in ``targets`` must not train nothing).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, r, alpha))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise ValueError(f"no nn.Linear named any of {list(targets)} in the model")
    return wrapped


def sample_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-mean next-token cross-entropy per sample -> [B] (labels -100 are ignored)."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    ce = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)),
                         shift_labels.reshape(-1), ignore_index=-100, reduction="none")
    ce = ce.view(shift_labels.shape)
    counts = (shift_labels != -100).sum(1)
    # A sample truncated to its prompt has no target tokens: it contributes 0, not NaN.
    return ce.sum(1) / counts.clamp(min=1)


def batch_weights(log_weights: torch.Tensor, clip: float) -> torch.Tensor:
    """Self-normalised importance weights of one batch (sum 1), capped at ``clip``/B.

    The cap is applied by water-filling: the k largest weights are set to the cap and the rest
    keep their proportions, scaled to the remaining mass, with the smallest k for which none of
    the rest exceeds the cap. The proportions of the rest come from a softmax of their
    log-weights, so weights that underflow in a plain softmax still get their share.

    Args:
        log_weights: [B] unnormalised log-weights.
        clip: cap of a normalised weight in units of the uniform weight 1/B (>= 1).
    """
    lw = log_weights.double()
    n = lw.numel()
    cap = clip / n
    order = torch.argsort(lw, descending=True)
    sorted_lw = lw[order]
    out = torch.empty_like(sorted_lw)
    for k in range(n):  # B is a batch size: a Python loop over it costs nothing
        rest = torch.softmax(sorted_lw[k:], dim=0) * (1.0 - k * cap)
        if rest[0] <= cap * (1 + 1e-9):
            out[:k], out[k:] = cap, rest
            break
    # clip >= 1 means cap >= 1/B, so k = B - 1 always satisfies the test above.
    w = torch.empty_like(out)
    w[order] = out
    return w.float()


class MissingWeightsError(UserError, ValueError):
    """An importance-weighted fit met a sample without ``log_weight`` (e.g. greedy output)."""


class SFTCheckpointError(UserError, ValueError):
    """A checkpoint that is not a QStarSFTModule checkpoint, or does not fit its base model."""


class QStarSFTModule(LightningModule):
    """Fine-tune π_θ on generated conversations (``QStarStreamDataModule`` batches).

    Args:
        model: π_θ (zoo:<slug>, a transformers folder or a hub id).
        lora_r: LoRA rank; 0 means full fine-tuning (every weight trains).
        lora_alpha: LoRA scale numerator (update scaled by lora_alpha / lora_r).
        lora_targets: names of the Linear modules to adapt (e.g. q_proj, v_proj).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        importance_weighting: weight each sample by its self-normalised batch weight.
        weight_clip: cap of a normalised weight, in units of the uniform weight 1/B.
        dtype: weights dtype.
    """

    def __init__(self, model: str = "zoo:qwen2.5-coder-0.5b-instruct", lora_r: int = 8,
                 lora_alpha: float = 16.0, lora_targets: list[str] | None = None,
                 lr: float = 2e-4, weight_decay: float = 0.0,
                 importance_weighting: bool = False, weight_clip: float = 5.0,
                 dtype: str = "float32") -> None:
        super().__init__()
        if lora_r < 0:
            raise ValueError(f"lora_r must be >= 0, got {lora_r}")
        if weight_clip < 1:
            raise ValueError(f"weight_clip must be >= 1 (uniform weights), got {weight_clip}")
        self.save_hyperparameters()
        self.targets = lora_targets or ["q_proj", "v_proj"]
        self.lm: nn.Module | None = None
        self.wrapped: list[str] = []
        # Checkpoints hold only the trainable tensors; the base is reloaded from ``model``.
        self.strict_loading = False

    def configure_model(self) -> None:
        """Load π_θ lazily (``--print_config`` and config parsing never touch the weights)."""
        if self.lm is not None:
            return
        from toolkit.models.loading import load_causal_lm, resolve

        lm, _ = load_causal_lm(resolve(self.hparams.model), dtype=self.hparams.dtype)
        lm.config.use_cache = False
        if self.hparams.lora_r > 0:
            self.wrapped = apply_lora(lm, self.targets, self.hparams.lora_r,
                                      self.hparams.lora_alpha)
        self.lm = lm
        self.lm.train()

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        out = self.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return sample_losses(out.logits, batch["labels"])

    def training_step(self, batch: dict[str, Any], _: int) -> torch.Tensor:
        losses = self(batch)
        n = losses.numel()
        if self.hparams.importance_weighting:
            if torch.isnan(batch["log_weight"]).any():
                raise MissingWeightsError("importance_weighting needs a log_weight for every "
                                          "sample, but the diagnostics file lacks some: generate "
                                          "the data with temperature > 0 (greedy output has no "
                                          "weights)")
            w = batch_weights(batch["log_weight"], self.hparams.weight_clip).to(losses.device)
        else:
            w = torch.full_like(losses, 1.0 / n)
        loss = (w.to(losses.dtype) * losses).sum()
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        if self.hparams.importance_weighting:
            self.log("train/batch_ess", 1.0 / float((w.double() ** 2).sum()), batch_size=n)
        return loss

    def validation_step(self, batch: dict[str, Any], _: int) -> None:
        losses = self(batch)
        self.log("val/loss", losses.mean(), prog_bar=True, batch_size=losses.numel())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams.lr,
                                 weight_decay=self.hparams.weight_decay)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if k in trainable}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every ``LoRALinear`` back into a plain Linear holding W + (α/r) · B A (in place)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                with torch.no_grad():
                    child.base.weight += child.scale * (child.lora_B @ child.lora_A)
                setattr(module, name, child.base)
    return model
