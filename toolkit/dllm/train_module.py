"""Training a small LLaDA-style masked-diffusion LM on reasoning-gym families (``cli.py fit``).

The objective is LLaDA's SFT loss. For each example, draw ``t ~ U(eps, 1)`` and mask every
*answer* token independently with probability ``t`` (the prompt is never masked); the model
predicts all positions at once and the loss is the cross-entropy on the masked positions,
weighted by ``1/t``, summed per example, divided by the example's answer length and averaged
over the batch. Answers are padded with EOS to the family's fixed generation length and the
padding is masked and predicted like any other answer token, so the model learns where an
answer ends (the decoders then stop at EOS).

A batch holds one family (all its rows share the generation length); the number of rows is
``tokens_per_batch // sequence_length``, so a batch of long problems is not 16× the work of a
short one. Prompts are left-padded, which :func:`toolkit.dllm.decoding.decode` also does, so
training and decoding see the same rotary positions.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from toolkit.dllm.llada_model import LLaDAConfig, LLaDAModelLM
from toolkit.dllm.tasks_data import (
    SHORT_FAMILIES,
    CharTokenizer,
    Problem,
    get_family,
    make_problems,
)
from toolkit.models.loading import ModelLoadError

CKPT_KEY = "diffusion_lm"


class DiffusionCheckpointError(ModelLoadError):
    """A checkpoint that cannot be read as a diffusion LM of this toolkit (one-line message)."""


# ----------------------------------------------------------------------------- objective
def forward_process(input_ids: Tensor, answer_mask: Tensor, t: Tensor, mask_id: int,
                    generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Mask each answer token of row ``r`` with probability ``t[r]``; never the prompt.

    Returns:
        (noisy ids, bool mask of the positions that were masked).
    """
    u = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    masked = answer_mask & (u < t[:, None])
    return input_ids.masked_fill(masked, mask_id), masked


LOSS_WEIGHTINGS = ("inverse_t", "none")


def diffusion_loss(logits: Tensor, targets: Tensor, masked: Tensor, t: Tensor,
                   answer_mask: Tensor, weighting: str = "inverse_t",
                   token_weight: Tensor | None = None) -> Tensor:
    """The masked-token cross-entropy.

    ``inverse_t`` is LLaDA's loss: Σ over masked tokens of CE/t, divided by each row's answer
    length, mean over rows (the answer length counts the EOS padding, part of the answer).
    ``none`` is the plain mean CE over the batch's masked tokens: the same minimiser (the
    per-position predictor does not depend on t's weight), without the 1/t factor that gives a
    lightly masked row up to 1/eps times the weight — a much noisier gradient at small batch.

    ``token_weight`` (same shape as ``targets``) scales each token's CE; with ``none`` the
    result is the weighted mean, so down-weighting the EOS padding shifts the gradient onto
    the answer's content without changing the loss's scale.
    """
    ce = F.cross_entropy(logits[masked].float(), targets[masked], reduction="none")
    if weighting == "none":
        if token_weight is None:
            return ce.sum() / masked.sum().clamp(min=1)
        w = token_weight[masked].to(ce.dtype)
        return (w * ce).sum() / w.sum().clamp(min=1e-8)
    if token_weight is not None:
        ce = ce * token_weight[masked].to(ce.dtype)
    if weighting != "inverse_t":
        raise ValueError(f"loss weighting must be one of {LOSS_WEIGHTINGS}, got {weighting!r}")
    rows = masked.nonzero()[:, 0]
    answer_len = answer_mask.sum(-1).clamp(min=1).to(ce.dtype)
    return (ce / t[rows] / answer_len[rows]).sum() / targets.shape[0]


def padding_weights(targets: Tensor, answer_mask: Tensor, eos_id: int,
                    padding_weight: float) -> Tensor:
    """Per-token loss weights: ``padding_weight`` on the EOS padding after an answer's first
    EOS (the first EOS, which marks where the answer ends, keeps weight 1), 1 elsewhere."""
    eos = (targets == eos_id) & answer_mask
    padding = eos & (eos.long().cumsum(-1) >= 2)
    weight = torch.ones(targets.shape, dtype=torch.float32, device=targets.device)
    return weight.masked_fill(padding, padding_weight)


def sample_t(batch: int, eps: float, device: torch.device | str,
             generator: torch.Generator | None = None, stratified: bool = False) -> Tensor:
    """Mask ratios ``t ~ U(eps, 1)`` (eps keeps the 1/t weight finite).

    ``stratified``: one draw per equal slice of [0, 1) (one shared offset, rows permuted), so
    every batch spans light to heavy masking; each row's t is still ``U(eps, 1)``.
    """
    if not stratified:
        return eps + (1.0 - eps) * torch.rand(batch, generator=generator, device=device)
    u = (torch.arange(batch, device=device)
         + torch.rand(1, generator=generator, device=device)) / batch
    u = u[torch.randperm(batch, generator=generator, device=device)]
    return eps + (1.0 - eps) * u


# ---------------------------------------------------------------------------------- data
def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Tensor]:
    """Left-pad prompts so every answer starts at the same column (as ``decode`` does).

    Args:
        rows: (prompt ids, answer ids); every answer has the same length.
        pad_id: id of the padding (excluded from attention).

    Returns:
        ``input_ids``, ``attention_mask`` and ``answer_mask`` of shape (B, P + G).
    """
    p = max(len(pr) for pr, _ in rows)
    g = len(rows[0][1])
    if any(len(a) != g for _, a in rows):
        raise ValueError("every answer of a batch must have the same length")
    ids = torch.full((len(rows), p + g), pad_id, dtype=torch.long)
    am = torch.zeros(len(rows), p + g, dtype=torch.bool)
    for r, (prompt, answer) in enumerate(rows):
        ids[r, p - len(prompt):] = torch.tensor(prompt + answer, dtype=torch.long)
        am[r, p - len(prompt):] = True
    answer_mask = torch.zeros_like(am)
    answer_mask[:, p:] = True
    return {"input_ids": ids, "attention_mask": am, "answer_mask": answer_mask}


class FamilyBatches(Dataset):
    """A dataset whose items are whole batches, each of one family (one answer length).

    The batches are fixed by ``seed``; the DataLoader shuffles their order (and Lightning's
    distributed sampler shards them over ranks like any map-style dataset). The random masks
    differ every time a batch is seen, so fixed compositions cost nothing.
    """

    def __init__(self, problems: list[Problem], tokenizer: CharTokenizer,
                 tokens_per_batch: int, seed: int) -> None:
        self.tok = tokenizer
        by_family: dict[str, list[Problem]] = {}
        for p in problems:
            by_family.setdefault(p.family, []).append(p)
        rng = random.Random(seed)
        self.batches: list[tuple[str, list[tuple[list[int], list[int]]]]] = []
        for family in sorted(by_family):
            gen = get_family(family).gen_length
            enc = [(tokenizer.encode_prompt(p.prompt), tokenizer.encode_answer(p.answer, gen))
                   for p in by_family[family]]
            rng.shuffle(enc)
            longest = max(len(pr) for pr, _ in enc) + gen
            size = max(1, tokens_per_batch // longest)
            self.batches += [(family, enc[i:i + size]) for i in range(0, len(enc), size)]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, Any]:
        family, rows = self.batches[i]
        return {**collate(rows, self.tok.PAD), "family": family}


class DiffusionTaskDataModule(LightningDataModule):
    """Train / val / test problems of the task families (map-style, batched by family).

    Args:
        train_sizes: problems per family for training (the keys are the families).
        val_size: held-out problems per family for ``val/loss`` and the decode callback.
        test_size: held-out problems per family for ``test/loss``.
        seed: data seed (splits are also fixed by a hash of each prompt; see ``tasks_data``).
        tokens_per_batch: rows per batch = this // (longest prompt + generation length).
        num_workers: DataLoader worker processes.
    """

    def __init__(self, train_sizes: dict[str, int] | None = None, val_size: int = 32,
                 test_size: int = 64, seed: int = 0, tokens_per_batch: int = 4096,
                 num_workers: int = 0) -> None:
        super().__init__()
        train_sizes = dict(train_sizes or {f: 2000 for f in SHORT_FAMILIES})
        for family in train_sizes:
            get_family(family)
        self.save_hyperparameters({"train_sizes": train_sizes, "val_size": val_size,
                                   "test_size": test_size, "seed": seed,
                                   "tokens_per_batch": tokens_per_batch,
                                   "num_workers": num_workers})
        self.tokenizer = CharTokenizer()
        self.problems: dict[str, list[Problem]] = {}

    @property
    def families(self) -> dict[str, int]:
        """Trained families and their generation lengths (stored in checkpoints)."""
        return {f: get_family(f).gen_length for f in self.hparams.train_sizes}

    def split(self, split: str) -> list[Problem]:
        """The problems of one split, generated on first use."""
        if split not in self.problems:
            hp = self.hparams
            sizes = (hp.train_sizes if split == "train"
                     else {f: hp.val_size if split == "val" else hp.test_size
                           for f in hp.train_sizes})
            self.problems[split] = [p for f, n in sizes.items() if n > 0
                                    for p in make_problems(f, split, n, hp.seed, self.tokenizer)]
        return self.problems[split]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        hp = self.hparams
        data = FamilyBatches(self.split(split), self.tokenizer, hp.tokens_per_batch, hp.seed)
        return DataLoader(data, batch_size=None, shuffle=shuffle, num_workers=hp.num_workers,
                          persistent_workers=hp.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


# -------------------------------------------------------------------------------- module
class MaskedDiffusionLM(LightningModule):
    """A LLaDA-architecture mask predictor trained with the LLaDA objective (module docstring).

    Args:
        d_model: width.
        n_layers: transformer blocks.
        n_heads: attention heads.
        mlp_hidden_size: SwiGLU hidden width.
        max_sequence_length: longest prompt + answer the model is meant for.
        rope_theta: rotary base.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay (matrices only; norms and embeddings are not decayed).
        warmup_steps: linear warm-up steps; then cosine decay to ``min_lr_ratio · lr``.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        eps: lower end of the mask ratio ``t ~ U(eps, 1)``.
        init_seed: seed of the weight initialisation.
        loss_weighting: ``inverse_t`` (LLaDA's 1/t-weighted loss) or ``none`` (mean CE over
            masked tokens); see :func:`diffusion_loss`.
        stratified_t: draw the batch's mask ratios stratified (see :func:`sample_t`).
        padding_weight: loss weight of the EOS padding after an answer's first EOS (1 = LLaDA's
            objective). The padding is most of a short answer's positions and trivially
            predictable once the length is known, so a lower weight spends the gradient on
            content; the first EOS keeps weight 1, so the length is still learnt.
        init_weights: a diffusion checkpoint whose weights this fit starts from (a second
            stage of training: fresh optimizer, warm-up and schedule; same architecture and
            vocabulary, else a one-line error). Read when fitting starts, not when a trained
            checkpoint is loaded, so the file is needed only to train.
    """

    def __init__(self, d_model: int = 128, n_layers: int = 4, n_heads: int = 4,
                 mlp_hidden_size: int = 384, max_sequence_length: int = 1024,
                 rope_theta: float = 10000.0, lr: float = 1e-3, weight_decay: float = 0.01,
                 warmup_steps: int = 100, min_lr_ratio: float = 0.1, eps: float = 1e-3,
                 init_seed: int = 0, loss_weighting: str = "inverse_t",
                 stratified_t: bool = False, padding_weight: float = 1.0,
                 init_weights: str | None = None) -> None:
        super().__init__()
        if not 0.0 <= padding_weight <= 1.0:
            raise ValueError(f"padding_weight must be in [0, 1], got {padding_weight}")
        if not 0.0 < eps < 1.0:
            raise ValueError(f"eps must be in (0, 1), got {eps}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, "
                             f"got {loss_weighting!r}")
        self.save_hyperparameters()
        self.tokenizer = CharTokenizer()
        tok = self.tokenizer
        self.llada_config = LLaDAConfig(
            d_model=d_model, n_heads=n_heads, n_layers=n_layers, mlp_hidden_size=mlp_hidden_size,
            vocab_size=tok.vocab_size, rope_theta=rope_theta, mask_token_id=tok.MASK,
            eos_token_id=tok.EOS, pad_token_id=tok.PAD, max_sequence_length=max_sequence_length)
        self.model = LLaDAModelLM.from_config(self.llada_config, seed=init_seed)
        # Filled from the DataModule when fitting; saved in and restored from checkpoints.
        self.trained_families: dict[str, int] = {}
        self.data_seed: int | None = None

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.model(input_ids, attention_mask=attention_mask).logits

    def _loss(self, batch: dict[str, Any], generator: torch.Generator | None) -> Tensor:
        ids, am, ans = batch["input_ids"], batch["attention_mask"], batch["answer_mask"]
        if ids.shape[1] > self.hparams.max_sequence_length:
            raise ValueError(f"batch of length {ids.shape[1]} exceeds max_sequence_length "
                             f"{self.hparams.max_sequence_length}")
        hp = self.hparams
        t = sample_t(ids.shape[0], hp.eps, ids.device, generator, hp.stratified_t)
        noisy, masked = forward_process(ids, ans, t, self.tokenizer.MASK, generator)
        weight = (None if hp.padding_weight == 1.0
                  else padding_weights(ids, ans, self.tokenizer.EOS, hp.padding_weight))
        return diffusion_loss(self(noisy, am), ids, masked, t, ans, hp.loss_weighting, weight)

    def training_step(self, batch: dict[str, Any], _: int) -> Tensor:
        loss = self._loss(batch, None)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def _eval_step(self, batch: dict[str, Any], i: int, stage: str) -> None:
        # A fixed generator per batch: the same masks every epoch, so val/loss curves compare.
        gen = torch.Generator(device=batch["input_ids"].device).manual_seed(10_000 + i)
        loss = self._loss(batch, gen)
        b = batch["input_ids"].shape[0]
        self.log(f"{stage}/loss", loss, batch_size=b, prog_bar=stage == "val")
        self.log(f"{stage}/loss_{batch['family']}", loss, batch_size=b)

    def validation_step(self, batch: dict[str, Any], i: int) -> None:
        self._eval_step(batch, i, "val")

    def test_step(self, batch: dict[str, Any], i: int) -> None:
        self._eval_step(batch, i, "test")

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        decay = [p for n, p in self.named_parameters() if p.dim() >= 2 and "wte" not in n]
        rest = [p for n, p in self.named_parameters() if not (p.dim() >= 2 and "wte" not in n)]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp.weight_decay},
                                 {"params": rest, "weight_decay": 0.0}],
                                lr=hp.lr, betas=(0.9, 0.95))
        total = max(1, int(self.trainer.estimated_stepping_batches))

        def schedule(step: int) -> float:
            if step < hp.warmup_steps:
                return (step + 1) / hp.warmup_steps
            frac = min(1.0, (step - hp.warmup_steps) / max(1, total - hp.warmup_steps))
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_fit_start(self) -> None:
        if self.hparams.init_weights and self.trainer.global_step == 0:
            self._load_initial_weights(self.hparams.init_weights)
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "families"):
            self.trained_families = dict(dm.families)
            self.data_seed = dm.hparams.seed

    def _load_initial_weights(self, path: str) -> None:
        source, tok, _ = load_diffusion_checkpoint_with_meta(path)
        if source.config.to_dict() != self.llada_config.to_dict() or \
                tok.to_dict() != self.tokenizer.to_dict():
            raise DiffusionCheckpointError(
                f"init_weights {path}: its architecture or vocabulary differs from this "
                f"model's ({source.config.to_dict()} vs {self.llada_config.to_dict()})")
        self.model.load_state_dict(source.state_dict(), strict=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Everything needed to decode without this class: the network's config, the
        # vocabulary, and which families were trained at which generation length.
        checkpoint[CKPT_KEY] = {"llada_config": self.llada_config.to_dict(),
                                "tokenizer": self.tokenizer.to_dict(),
                                "families": dict(self.trained_families),
                                "data_seed": self.data_seed}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get(CKPT_KEY, {})
        self.trained_families = dict(meta.get("families", {}))
        self.data_seed = meta.get("data_seed")


# ---------------------------------------------------------------------------- loading
def load_diffusion_checkpoint_with_meta(path: str | Path, map_location: str = "cpu"
                                        ) -> tuple[LLaDAModelLM, CharTokenizer, dict[str, Any]]:
    """Like :func:`load_diffusion_checkpoint`, plus the stored metadata (families, seed)."""
    path = Path(path)
    if not path.is_file():
        raise DiffusionCheckpointError(
            f"diffusion checkpoint {path} does not exist (train one with `python cli.py fit "
            "--config configs/dllm/train.yaml` and copy the run's checkpoints/last.ckpt there, "
            "or pass --model.init_args.checkpoint PATH)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
        meta = ckpt[CKPT_KEY]
        cfg = LLaDAConfig.from_dict(meta["llada_config"])
        tok = CharTokenizer.from_dict(meta["tokenizer"])
        state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()
                 if k.startswith("model.")}
        model = LLaDAModelLM(cfg)
        model.load_state_dict(state, strict=True)
    except DiffusionCheckpointError:
        raise
    except Exception as err:  # a truncated file, another kind of checkpoint, ...
        raise DiffusionCheckpointError(f"{path} is not a readable diffusion-LM checkpoint "
                                       f"({type(err).__name__}: {str(err)[:200]})") from err
    return model.eval(), tok, {"families": dict(meta.get("families", {})),
                               "data_seed": meta.get("data_seed")}


def load_diffusion_checkpoint(path: str | Path, map_location: str = "cpu"
                              ) -> tuple[LLaDAModelLM, CharTokenizer]:
    """A trained diffusion LM (eval mode) and its tokenizer from a ``cli.py fit`` checkpoint.

    Raises:
        DiffusionCheckpointError: the file is missing or is not such a checkpoint.
    """
    model, tok, _ = load_diffusion_checkpoint_with_meta(path, map_location)
    return model, tok
