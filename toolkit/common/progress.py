"""A Lightning progress bar that knows the length of streamed (iterable) data.

Lightning cannot count the batches of an ``IterableDataset`` (it shows ``3/--``), and giving the
dataset a ``__len__`` would mislead the DataLoader when ranks or workers shard it. Instead a
DataModule may offer ``num_batches(split) -> int`` (batches this rank will see); this bar asks
it whenever Lightning's own count is infinite.
"""

from __future__ import annotations

import math

from lightning.pytorch.callbacks import TQDMProgressBar


class StreamProgressBar(TQDMProgressBar):
    """``TQDMProgressBar`` whose train/val totals come from ``datamodule.num_batches(split)``."""

    def _known(self, lightning_count: int | float, split: str) -> int | float:
        dm = getattr(self.trainer, "datamodule", None)
        if math.isfinite(lightning_count) or not hasattr(dm, "num_batches"):
            return lightning_count
        return dm.num_batches(split)

    @property
    def total_train_batches(self) -> int | float:
        return self._known(super().total_train_batches, "train")

    @property
    def total_val_batches_current_dataloader(self) -> int | float:
        if self.trainer.sanity_checking:
            return super().total_val_batches_current_dataloader
        return self._known(super().total_val_batches_current_dataloader, "val")
