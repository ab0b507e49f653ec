"""Stream ``generate`` output (OpenAI-format JSONL + diagnostics) into tokenised batches.

Each generation file ``X.jsonl`` may have ``X.diagnostics.jsonl`` beside it (q* runs write
one); its per-sample ``alpha_mean``, ``ess_ratio_mean``, ``kl_theta_mean``, ``kl_t_mean`` and
``log_weight`` (written when the file was sampled, temperature > 0) travel with the sample.
Missing values become NaN, so plain-generation files stream too; an importance-weighted fit
refuses a batch whose ``log_weight`` is missing rather than silently weighting it uniformly.

Sharding. An ``IterableDataset`` gets no sampler from Lightning, so the dataset shards itself:
row ``i`` (counted over all files, in order) goes to shard ``i mod (world · workers)``, where the
shard of this reader is ``rank · workers + worker_id``. Every row is read by exactly one
(rank, worker). Shards may differ in length by one row, so under DDP ranks can run a different
number of steps at the end of an epoch; use ``trainer.limit_train_batches`` / ``max_steps`` (or
equal-sized data) when that matters. The dataset has no ``__len__``: its length per reader is
not known without reading the files, and a wrong one would mislead progress bars and schedulers.

Train/validation split: a row is validation when ``sample_idx % val_every == 0`` (fixed by the
data, not by the reader), so both splits are the same on every rank and every run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from toolkit.common.io import read_jsonl

DIAG_FIELDS = ("alpha_mean", "ess_ratio_mean", "kl_theta_mean", "kl_t_mean")


def diagnostics_file(path: Path) -> Path:
    """``X.jsonl`` -> ``X.diagnostics.jsonl`` (as ``generate`` writes it)."""
    return path.with_name(path.stem + ".diagnostics.jsonl")


def _reader_shard(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(shard index, number of shards) of the calling process and DataLoader worker."""
    if rank is None or world_size is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        else:
            rank = int(os.environ.get("RANK", 0))
            world_size = int(os.environ.get("WORLD_SIZE", 1))
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * workers + worker, world_size * workers


def tokenize_chat(tokenizer: Any, messages: list[dict[str, str]], max_length: int,
                  truncated: bool = False) -> tuple[list[int], list[int]]:
    """Token ids and labels of one conversation: only the last (assistant) turn is learned.

    The prompt is rendered with the generation prompt, exactly as the sampler saw it, and the
    completion is tokenised as the text the full template adds after that prompt, so a BPE
    merge across the boundary cannot shift the mask. A ``truncated`` answer (cut at
    max_new_tokens) gets no end-of-turn tokens: the model must not learn to stop mid-answer.
    """
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("a training row needs messages ending with an assistant turn")
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False,
                                           add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if truncated:
        completion = messages[-1]["content"]
    elif not full.startswith(prompt):  # templates that rewrite earlier turns: fall back
        completion = messages[-1]["content"] + (tokenizer.eos_token or "")
    else:
        completion = full[len(prompt):]
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    ids = (p_ids + c_ids)[:max_length]
    labels = ([-100] * len(p_ids) + c_ids)[:max_length]
    return ids, labels


class GenerationStream(IterableDataset):
    """Rows of generation files, tokenised, sharded by (rank, worker); see the module doc.

    Args:
        files: generation JSONL files (``python cli.py generate`` output).
        tokenizer: a tokenizer with a chat template; None yields the raw rows (tests).
        max_length: truncate each sample to this many tokens.
        split: "train", "val" or "all" (see ``val_every``).
        val_every: rows with ``sample_idx % val_every == 0`` are validation (0: none).
        rank: override the global rank (tests; default: torch.distributed or $RANK).
        world_size: override the world size (default: torch.distributed or $WORLD_SIZE).
    """

    def __init__(self, files: Sequence[str | Path], tokenizer: Any = None,
                 max_length: int = 1024, split: str = "all", val_every: int = 0,
                 rank: int | None = None, world_size: int | None = None) -> None:
        super().__init__()
        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be train, val or all, got {split!r}")
        self.files = [Path(f) for f in files]
        for f in self.files:
            if not f.is_file():
                raise FileNotFoundError(f"generation file {f} not found")
        self.tokenizer, self.max_length = tokenizer, max_length
        self.split, self.val_every = split, val_every
        self.rank, self.world_size = rank, world_size

    def _keep(self, sample_idx: int) -> bool:
        if self.split == "all" or self.val_every <= 0:
            return self.split != "val"
        is_val = sample_idx % self.val_every == 0
        return is_val if self.split == "val" else not is_val

    def __iter__(self) -> Iterator[dict[str, Any]]:
        shard, shards = _reader_shard(self.rank, self.world_size)
        i = -1
        for path in self.files:
            diag_path = diagnostics_file(path)
            # One small dict per file (five floats a sample); the generations themselves stream.
            diags = {r["sample_idx"]: r for r in read_jsonl(diag_path)} \
                if diag_path.is_file() else {}
            for row in read_jsonl(path):
                if not self._keep(int(row["sample_idx"])):
                    continue
                i += 1
                if i % shards != shard:
                    continue
                yield self._item(path, row, diags.get(row["sample_idx"], {}))

    def _item(self, path: Path, row: dict[str, Any], diag: dict[str, Any]) -> dict[str, Any]:
        item: dict[str, Any] = {"file": str(path), "sample_idx": int(row["sample_idx"])}
        for key in (*DIAG_FIELDS, "log_weight"):
            value = diag.get(key)
            item[key] = float(value) if value is not None else math.nan
        if self.tokenizer is None:
            item["messages"] = row["messages"]
            return item
        item["input_ids"], item["labels"] = tokenize_chat(
            self.tokenizer, row["messages"], self.max_length,
            truncated=row.get("finish_reason") == "length")
        return item


def collate(items: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Right-pad a list of tokenised samples into a batch (labels padded with -100)."""
    width = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for b, it in enumerate(items):
        n = len(it["input_ids"])
        ids[b, :n] = torch.tensor(it["input_ids"])
        labels[b, :n] = torch.tensor(it["labels"])
        mask[b, :n] = 1
    batch: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "labels": labels,
                             "sample_idx": torch.tensor([it["sample_idx"] for it in items])}
    for key in (*DIAG_FIELDS, "log_weight"):
        batch[key] = torch.tensor([it[key] for it in items], dtype=torch.float32)
    return batch


class QStarStreamDataModule(LightningDataModule):
    """Stream q* generation files into tokenised training/validation batches.

    Args:
        files: generation JSONL files (each may have ``.diagnostics.jsonl`` beside it).
        model: the model whose tokenizer and chat template are used (zoo:<slug> or folder).
        val_every: every n-th sample (by sample_idx) is held out for validation (0: none).
        batch_size: samples per batch.
        max_length: truncate each sample to this many tokens.
        num_workers: DataLoader workers (each reads its own share of the rows).
    """

    def __init__(self, files: list[str], model: str = "zoo:qwen2.5-coder-0.5b-instruct",
                 val_every: int = 10, batch_size: int = 4, max_length: int = 1024,
                 num_workers: int = 0) -> None:
        super().__init__()
        if not files:
            raise ValueError("files: give at least one generation JSONL file")
        self.save_hyperparameters()
        self.tokenizer: Any = None

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            from toolkit.models.loading import load_tokenizer, resolve

            self.tokenizer = load_tokenizer(resolve(self.hparams.model))

    def _loader(self, split: str) -> DataLoader:
        hp = self.hparams
        self.setup()
        ds = GenerationStream(hp.files, self.tokenizer, hp.max_length, split, hp.val_every)
        pad = self.tokenizer.pad_token_id
        return DataLoader(ds, batch_size=hp.batch_size, num_workers=hp.num_workers,
                          collate_fn=partial(collate, pad_id=pad))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train" if self.hparams.val_every > 0 else "all")

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val") if self.hparams.val_every > 0 else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("all")
