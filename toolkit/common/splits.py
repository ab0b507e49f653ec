"""Fixed train/val/test split by prompt id.

The split is a pure function of the id (a hash), so it never changes when more prompts are
labelled, every stage of one prompt lands in the same split, and no list has to be stored.
"""

from __future__ import annotations

import hashlib

SPLITS = ("train", "val", "test")
FRACTIONS = (0.70, 0.15, 0.15)


def split_of(example_id: str, fractions: tuple[float, float, float] = FRACTIONS) -> str:
    u = int(hashlib.sha256(example_id.encode()).hexdigest()[:12], 16) / float(1 << 48)
    if u < fractions[0]:
        return "train"
    if u < fractions[0] + fractions[1]:
        return "val"
    return "test"
