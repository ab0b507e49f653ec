"""Stream labelled stage records from JSONL into feature batches (fixed train/val/test split).

The dataset is an ``IterableDataset``: Lightning gives it no sampler, so it splits its own rows
by (global rank, world size) and by DataLoader worker, and every row is seen by exactly one
(rank, worker) per epoch. The split of a record is a function of its prompt id
(``toolkit.common.splits``), so all stages of a prompt stay in one split.

With ``embedding_model`` set, every row also carries its prompt's embedding (the sidecar of
``python cli.py embed``, committed beside the shipped records) and its stage index, for the
predictor's router heads.

Targets, per record: ``correct`` (ground truth) and ``agreement`` (BLEU with the top stage's
answer > ``bleu_threshold``, the seed's label). The top stage agrees with itself by
construction, so its agreement target is masked out (NaN) rather than counted as a free 1.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from toolkit.cascade.features import CascadeInputError, FeatureSchema, build_schema, record_features
from toolkit.cascade.prompt_table import record_files
from toolkit.common.io import read_jsonl

TARGETS = ("correct", "agreement")


def targets_of(rec: dict[str, Any], top_stage: int, bleu_threshold: float) -> np.ndarray:
    correct = np.nan if rec.get("correct") is None else float(rec["correct"])
    agree = np.nan if rec["stage"] == top_stage else float(rec["agreement_bleu"] > bleu_threshold)
    return np.asarray([correct, agree], dtype=np.float32)


def read_split(files: list[Path], split: str, schema: FeatureSchema, bleu_threshold: float
               ) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """(features [N, F], targets [N, 2], prompt ids [N], stages [N]) of every record of one
    split, in file order."""
    feats, targets, ids, stages = [], [], [], []
    for path in files:
        for rec in read_jsonl(path):
            if rec["split"] == split:
                feats.append(record_features(rec, schema))
                targets.append(targets_of(rec, schema.num_stages - 1, bleu_threshold))
                ids.append(str(rec["id"]))
                stages.append(int(rec["stage"]))
    if not feats:
        return (np.zeros((0, schema.dim), np.float32), np.zeros((0, 2), np.float32), [],
                np.zeros(0, np.int64))
    return np.stack(feats), np.stack(targets), ids, np.asarray(stages, dtype=np.int64)


class StageRecordStream(IterableDataset):
    """Rows (dicts of ``features``, ``targets``, ``stage`` and, when given, ``embedding``) of
    every record of one split, sharded by rank and worker.

    The rows are read and featurised once per process (``read_split``) and kept in memory:
    re-parsing the JSONL every epoch cost most of ``fit``'s time.
    """

    def __init__(self, columns: dict[str, np.ndarray], rank: int = 0,
                 world_size: int = 1) -> None:
        self.columns = {k: torch.from_numpy(v) for k, v in columns.items()}
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        shard, shards = self.rank * workers + worker, self.world_size * workers
        for i in range(shard, len(self.columns["features"]), shards):
            yield {k: v[i] for k, v in self.columns.items()}


class CascadeRecordsDataModule(LightningDataModule):
    """Feature batches from the labelled cascade records in ``data_dir``.

    Args:
        data_dir: folder holding ``<task>/stage<i>-<slug>.jsonl`` (from `cli.py label`).
        schema: feature schema name: topk (default, vLLM-compatible), full or seed.
        num_stages: stages of the cascade the records come from.
        bleu_threshold: agreement label = BLEU with the top stage's answer > this (seed: 0.8).
        batch_size: rows per batch.
        num_workers: DataLoader workers (each reads its own share of the rows).
        embedding_model: slug of the model whose prompt embeddings (the sidecar
            ``<data_dir>/prompt_embeddings/<slug>.npz``) every row carries, for the router
            heads; null: none.
    """

    def __init__(self, data_dir: str = "data/cascade", schema: str = "topk", num_stages: int = 3,
                 bleu_threshold: float = 0.8, batch_size: int = 256,
                 num_workers: int = 0, embedding_model: str | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.schema = build_schema(schema, num_stages)
        self.files = record_files(data_dir)
        self._splits: dict[str, dict[str, np.ndarray]] = {}  # read on first use
        self.embedding_spec: dict[str, Any] | None = None

    def _split(self, split: str) -> dict[str, np.ndarray]:
        if split not in self._splits:
            x, y, ids, stages = read_split(self.files, split, self.schema,
                                           self.hparams.bleu_threshold)
            cols = {"features": x, "targets": y, "stage": stages}
            if self.hparams.embedding_model and ids:  # no rows: arrays() names that first
                from toolkit.cascade.prompt_embeddings import load_sidecar

                emb, _, meta = load_sidecar(self.hparams.data_dir, ids,
                                            self.hparams.embedding_model)
                cols["embedding"] = emb
                from toolkit.cascade.live_routing import EMBEDDING_KEYS

                self.embedding_spec = {k: meta.get(k) for k in EMBEDDING_KEYS}
            self._splits[split] = cols
        return self._splits[split]

    def num_batches(self, split: str) -> int:
        """Batches of ``split`` this rank sees per epoch (for the progress bar; see
        :mod:`toolkit.common.progress`)."""
        counts = {split: len(self._split(split)["features"])}
        world = self.trainer.world_size if self.trainer else 1
        rank = self.trainer.global_rank if self.trainer else 0
        workers = max(1, self.hparams.num_workers)  # each worker batches its own shard
        shards = range(rank * workers, (rank + 1) * workers)
        return sum(math.ceil(len(range(k, counts[split], world * workers))
                             / self.hparams.batch_size) for k in shards)

    def _stream(self, split: str) -> StageRecordStream:
        rank = self.trainer.global_rank if self.trainer else 0
        world = self.trainer.world_size if self.trainer else 1
        return StageRecordStream(self._split(split), rank, world)

    def _loader(self, split: str) -> DataLoader:
        return DataLoader(self._stream(split), batch_size=self.hparams.batch_size,
                          num_workers=self.hparams.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """All (features, targets) of a split in memory (for statistics and checks)."""
        cols = self._split(split)
        if not len(cols["features"]):
            raise CascadeInputError(f"no {split} records under {self.hparams.data_dir}")
        return cols["features"], cols["targets"]

    def embedding_arrays(self, split: str) -> tuple[np.ndarray, dict[str, Any]]:
        """The prompt embedding of every row of a split [N, D], and the embedding's spec."""
        if not self.hparams.embedding_model:
            raise CascadeInputError("the predictor reads prompt embeddings: set "
                                    "--data.init_args.embedding_model (e.g. "
                                    "smollm2-135m-instruct)")
        self.arrays(split)
        return self._split(split)["embedding"], dict(self.embedding_spec or {})
