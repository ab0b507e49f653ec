"""What the prompt embeddings and the probe features share: pooled hidden states and sidecars.

Both read a stage model's hidden states through :class:`TransformersBackend` (same tokenizer,
chat template and system prompt as the stage, so the model sees what it saw while labelling),
pool chosen layers over chosen positions (the prompt for a router, the answer for a post-draft
probe), and keep the pooled vectors in a sidecar beside the labelled records: an ``.npz`` (ids,
float16 vectors, FLOPs per id) and a ``.json`` meta that says what made it (model sha256,
layers, pooling, chat formatting). A sidecar is rewritten atomically after every batch, so a
killed build loses at most one batch and a rerun computes only the missing ids; a stale or
incomplete one is refused with one line naming the command that (re)makes it.

Layer indices count like transformers' ``hidden_states``: 0 is the token embeddings, ``i`` the
output of block ``i``, and the last (``-1``) the final, normed hidden state.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.common.errors import UserError
from toolkit.common.io import atomic_write_json
from toolkit.generation.base import DecodingConfig, Messages


class SidecarError(UserError, RuntimeError):
    """A sidecar is missing, stale or incomplete, or its input is bad (one line, names the fix)."""


def resolve_layers(layers: Sequence[int] | None, n_states: int,
                   error: type[SidecarError] = SidecarError) -> tuple[int, ...]:
    """Non-negative ``hidden_states`` indices (``n_states`` = blocks + 1); None: last, middle."""
    if layers is None:
        layers = (-1, (n_states - 1) // 2)
    if not layers:
        raise error("layers is empty; give at least one hidden_states index")
    out = []
    for k in layers:
        if not -n_states <= int(k) < n_states:
            raise error(f"layer {k} out of range: this model has {n_states} "
                        f"hidden states (0 = embeddings .. {n_states - 1})")
        out.append(int(k) % n_states)
    return tuple(out)


class HiddenStateReader:
    """A causal LM read for its hidden states: one forward, chosen layers mean-pooled.

    Args:
        model: ``zoo:<slug>``, a local transformers folder, or a hub id.
        layers: ``hidden_states`` indices to pool and concatenate; None means the last and the
            middle one. Stored normalised (non-negative) in :attr:`layers`.
        decoding: the stage's decoding settings; only its chat formatting (``chat_template``,
            ``system_prompt``) matters here. None means :class:`DecodingConfig`'s defaults.
        device: ``cpu`` or ``cuda[:i]``.

    Attributes:
        slug, sha256: the model's identity (as in every labelled record).
        layers: the pooled layers, non-negative indices into ``hidden_states``.
        dim: width of one pooled vector (hidden size × number of layers).
        non_embedding_params: parameters counted by the FLOP formula.
    """

    error: type[SidecarError] = SidecarError

    def __init__(self, model: str, layers: Sequence[int] | None = None,
                 decoding: DecodingConfig | None = None, device: str = "cpu") -> None:
        import torch

        from toolkit.generation.hf_backend import TransformersBackend

        self.backend = TransformersBackend(model, device=device)
        self.decoding = decoding or DecodingConfig()
        self.model_name = model
        self.slug = self.backend.info.slug
        self.sha256 = self.backend.info.sha256
        self.non_embedding_params = self.backend.info.non_embedding_params
        # The base model without the LM head: logits over the vocabulary are not needed.
        self._body = self.backend.model.base_model
        self._device = torch.device(device)
        n_states = int(self.backend.model.config.num_hidden_layers) + 1
        self.layers = resolve_layers(layers, n_states, self.error)
        self.dim = int(self.backend.model.config.hidden_size) * len(self.layers)

    @property
    def chat_formatting(self) -> dict[str, Any]:
        return {"chat_template": self.decoding.chat_template,
                "system_prompt": self.decoding.system_prompt}

    def token_ids(self, prompts: list[str | Messages]) -> list[list[int]]:
        """The token ids the stage model reads for each prompt (chat template applied)."""
        ids = [self.backend.encode(p, self.decoding) for p in prompts]
        for i, row in enumerate(ids):
            if not row:
                raise self.error(f"prompt {i} is empty after tokenisation")
        return ids

    def pool(self, ids: list[list[int]], starts: Sequence[int]) -> np.ndarray:
        """float32 [N, dim]: for row i, the mean over positions ``starts[i] .. len(ids[i]) - 1``
        of each chosen layer's hidden states, layers concatenated; one right-padded forward."""
        import torch

        if not ids:
            return np.zeros((0, self.dim), np.float32)
        lengths = torch.tensor([len(r) for r in ids])
        first = torch.tensor([int(s) for s in starts])
        if bool((first < 0).any() or (first >= lengths).any()):
            raise self.error("nothing to pool: a pooled span is empty")
        width = int(lengths.max())
        # Right padding: every real token keeps the position it has unpadded, and under the
        # causal mask no real token attends to a pad; the pooling weights drop the pads.
        pos = torch.arange(width)[None, :]
        mask = (pos < lengths[:, None]).long()
        span = (mask.bool() & (pos >= first[:, None])).float()
        pad = self.backend.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        input_ids[mask.bool()] = torch.tensor([t for r in ids for t in r])
        with torch.no_grad():
            out = self._body(input_ids=input_ids.to(self._device),
                             attention_mask=mask.to(self._device), use_cache=False,
                             output_hidden_states=True)
            weights = (span / span.sum(1, keepdim=True)).to(self._device)[:, :, None]
            pooled = [(out.hidden_states[k].float() * weights).sum(1) for k in self.layers]
            return torch.cat(pooled, -1).cpu().numpy().astype(np.float32)


# --------------------------------------------------------------------------- sidecar files
def save_npz(path: Path, ids: list[str], x: np.ndarray, flops: np.ndarray) -> None:
    """Rewrite the npz atomically: readers see the old or the new file, never half of one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, ids=np.array(ids, dtype=str), emb=x.astype(np.float16),
                     flops=flops.astype(np.float64))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_npz(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(ids, float16 vectors, FLOPs) of a sidecar npz."""
    with np.load(path, allow_pickle=False) as z:
        return [str(i) for i in z["ids"]], z["emb"], z["flops"]


@dataclass(frozen=True)
class Sidecar:
    """One sidecar (npz + json meta) and how to tell its user what to run.

    ``command(meta, force)`` is the command line that makes it (``meta``: the existing
    sidecar's meta, or None); ``noun`` names its content in messages ("prompt embeddings of
    X"), ``unit`` its keys ("prompt ids"), ``error`` the error class raised.
    """

    npz: Path
    meta_path: Path
    noun: str
    unit: str
    command: Callable[[dict[str, Any] | None, bool], str]
    error: type[SidecarError] = SidecarError

    def read_meta(self) -> dict[str, Any] | None:
        return json.loads(self.meta_path.read_text()) if self.meta_path.is_file() else None

    def check_meta(self, want: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
        """The existing meta; refuse it when it differs from ``want`` in one of ``keys`` that
        ``want`` holds (a stale sidecar)."""
        meta = self.read_meta() or {}
        for key in keys:
            if key in want and meta.get(key) != want[key]:
                raise self.error(f"{self.npz} was made with another {key} ({meta.get(key)!r}, "
                                 f"expected {want[key]!r}); rebuild it with "
                                 f"{self.command(None, True)}")
        return meta

    def load(self, ids: Sequence[str], want: dict[str, Any], keys: Sequence[str]
             ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Vectors float32 [len(ids), D] and FLOPs [len(ids)] in the order of ``ids``, and the
        meta; refuses a missing sidecar, a stale one (``check_meta``) or missing ids."""
        if not self.npz.is_file() or not self.meta_path.is_file():
            raise self.error(f"no {self.noun} under {self.npz.parent}; make them with "
                             f"{self.command(None, False)}")
        meta = self.check_meta(want, keys)
        have, x, flops = read_npz(self.npz)
        row = {i: k for k, i in enumerate(have)}
        wanted = [str(i) for i in ids]
        missing = [i for i in wanted if i not in row]
        if missing:
            raise self.error(f"{len(missing)} of {len(wanted)} {self.unit} have no entry in "
                             f"{self.npz} (e.g. {missing[0]}); make them with "
                             f"{self.command(meta, False)}")
        take = np.array([row[i] for i in wanted], dtype=np.int64)
        return x[take].astype(np.float32), flops[take].astype(np.float64), meta

    def build(self, meta: dict[str, Any], ids: Sequence[str], keys: Sequence[str],
              tokenise: Callable[[list[str]], list[list[int]]],
              compute: Callable[[list[str], list[list[int]]], tuple[np.ndarray, np.ndarray]],
              batch_size: int, force: bool, tag: str, what: str) -> Path:
        """Compute the ids not yet in the sidecar, shortest first, saving after every batch.

        ``tokenise(ids)`` gives each id's token ids (their lengths order the batches, so each
        padded batch wastes little), ``compute(ids, tokens)`` the float32 vectors and FLOPs.
        An existing sidecar made otherwise (``keys`` of ``meta``) is refused unless ``force``
        (then it is rebuilt from scratch). Progress lines read ``<tag>: done/total <what>``.
        """
        done_ids: list[str] = []
        x = np.zeros((0, int(meta["dim"])), np.float16)
        flops = np.zeros(0)
        if not force and self.npz.exists():
            self.check_meta(meta, keys)
            done_ids, x, flops = read_npz(self.npz)
        self.npz.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.meta_path, meta)  # before the npz: an npz always has its meta
        done = set(done_ids)
        todo = [i for i in ids if i not in done]
        tokens = tokenise(todo)
        order = sorted(range(len(todo)), key=lambda j: (len(tokens[j]), todo[j]))
        total, start = len(ids), time.perf_counter()
        print(f"{tag}: {len(done)}/{total} {what} already in {self.npz}")
        for b in range(0, len(order), batch_size):
            rows = order[b:b + batch_size]
            e, f = compute([todo[j] for j in rows], [tokens[j] for j in rows])
            done_ids += [todo[j] for j in rows]
            x = np.concatenate([x, e.astype(np.float16)])
            flops = np.concatenate([flops, f])
            save_npz(self.npz, done_ids, x, flops)
            print(f"{tag}: {len(done_ids)}/{total} {what} ({time.perf_counter() - start:.1f} s)",
                  flush=True)
        if not self.npz.exists():  # nothing to do and nothing there: still leave an empty one
            save_npz(self.npz, done_ids, x, flops)
        return self.npz
