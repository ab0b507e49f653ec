"""Prompt representations for routing: pooled hidden states of a small model over the prompt.

A router that decides before any draft needs a representation of the prompt alone. This module
computes one with a chosen causal LM (default: the cheapest stage's model), prefill only: one
forward over the chat-formatted prompt, exactly as the stage model reads it (same tokenizer,
chat template and system prompt, through :class:`TransformersBackend`), and the mean of the
hidden states of chosen layers over the prompt tokens. Its cost is charged like any model call
(SPEC §D2: ``2 · non-embedding params · prompt tokens``), because a router is not free.

The embeddings of labelled records live in a sidecar beside them,
``<data_dir>/prompt_embeddings/<slug>.npz`` (ids, float16 embeddings, FLOPs) plus
``<slug>.json`` (the model's sha256, layers, pooling, chat formatting). ``python cli.py embed``
makes it, resumably; :func:`load_sidecar` reads it and refuses a missing or stale one.

Layer indices count like transformers' ``hidden_states``: 0 is the token embeddings, ``i`` the
output of block ``i``, and the last (``-1``) the final, normed hidden state. The default is the
last and the middle one (``num_hidden_layers // 2``).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.common.errors import UserError
from toolkit.common.io import atomic_write_json, read_jsonl
from toolkit.generation.base import DecodingConfig, Messages, call_cost

SIDECAR_DIR = "prompt_embeddings"
POOLING = "mean of hidden states over the prompt tokens (attention mask), layers concatenated"


class EmbeddingSidecarError(UserError, RuntimeError):
    """A prompt-embedding sidecar is missing, stale or incomplete (one line, names the fix)."""


def _make_command(data_dir: str | Path, model: str, force: bool = False) -> str:
    return (f"`python cli.py embed --data_dir {data_dir} --model {model}"
            f"{' --force true' if force else ''}`")


class PromptEmbedder:
    """Embed prompts with a causal LM: one prefill forward, mean-pooled chosen layers.

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
        dim: width of one embedding (hidden size × number of layers).
        non_embedding_params: parameters counted by the FLOP formula.
    """

    def __init__(self, model: str = "zoo:smollm2-135m-instruct",
                 layers: tuple[int, ...] | None = None, decoding: DecodingConfig | None = None,
                 device: str = "cpu") -> None:
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
        self.layers = resolve_layers(layers, n_states)
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
                raise EmbeddingSidecarError(f"prompt {i} is empty after tokenisation")
        return ids

    def embed(self, prompts: list[str | Messages]) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings float32 [N, dim] and FLOP cost [N] of the prompts, in one padded forward."""
        return self.embed_ids(self.token_ids(prompts))

    def embed_ids(self, ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`embed` on token ids (e.g. from :meth:`token_ids`)."""
        import torch

        if not ids:
            return np.zeros((0, self.dim), np.float32), np.zeros(0)
        lengths = torch.tensor([len(r) for r in ids])
        width = int(lengths.max())
        # Right padding: every real token keeps the position it has unpadded, and under the
        # causal mask no real token attends to a pad; the pooling mask drops the pads.
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        pad = self.backend.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        input_ids[mask.bool()] = torch.tensor([t for r in ids for t in r])
        with torch.no_grad():
            out = self._body(input_ids=input_ids.to(self._device),
                             attention_mask=mask.to(self._device), use_cache=False,
                             output_hidden_states=True)
            weights = (mask / lengths[:, None]).to(self._device, torch.float32)[:, :, None]
            pooled = [(out.hidden_states[k].float() * weights).sum(1) for k in self.layers]
            emb = torch.cat(pooled, -1).cpu().numpy().astype(np.float32)
        flops = np.array([call_cost(self.non_embedding_params, len(r), 0) for r in ids])
        return emb, flops


def resolve_layers(layers: tuple[int, ...] | list[int] | None, n_states: int) -> tuple[int, ...]:
    """Non-negative ``hidden_states`` indices (``n_states`` = blocks + 1); None: last, middle."""
    if layers is None:
        layers = (-1, (n_states - 1) // 2)
    if not layers:
        raise EmbeddingSidecarError("layers is empty; give at least one hidden_states index")
    out = []
    for k in layers:
        if not -n_states <= int(k) < n_states:
            raise EmbeddingSidecarError(f"layer {k} out of range: this model has {n_states} "
                                        f"hidden states (0 = embeddings .. {n_states - 1})")
        out.append(int(k) % n_states)
    return tuple(out)


# --------------------------------------------------------------------------- sidecar
def sidecar_paths(data_dir: str | Path, slug: str) -> tuple[Path, Path]:
    """(npz, json meta) of one model's sidecar under ``data_dir``."""
    folder = Path(data_dir) / SIDECAR_DIR
    return folder / f"{slug}.npz", folder / f"{slug}.json"


def labelled_prompts(data_dir: str | Path) -> tuple[list[str], list[Any], dict[str, Any]]:
    """Prompt ids (sorted), prompts and the chat formatting of the stage-0 records."""
    from toolkit.cascade.prompt_table import record_files

    prompts: dict[str, Any] = {}
    formats: set[str] = set()
    for path in record_files(data_dir):
        for r in read_jsonl(path):
            if int(r["stage"]) != 0:
                continue
            prompts.setdefault(r["id"], r["prompt"])
            d = r.get("decoding", {})
            formats.add(json.dumps({"chat_template": d.get("chat_template", True),
                                    "system_prompt": d.get("system_prompt")}))
    if not prompts:
        raise EmbeddingSidecarError(f"no stage-0 records under {data_dir}; make them with "
                                    "`python cli.py label`")
    if len(formats) > 1:
        raise EmbeddingSidecarError(f"stage-0 records under {data_dir} mix chat formattings "
                                    f"({sorted(formats)}); embed each records folder apart")
    ids = sorted(prompts)
    return ids, [prompts[i] for i in ids], json.loads(formats.pop())


def _save_npz(path: Path, ids: list[str], emb: np.ndarray, flops: np.ndarray) -> None:
    """Rewrite the npz atomically: readers see the old or the new file, never half of one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, ids=np.array(ids, dtype=str), emb=emb.astype(np.float16),
                     flops=flops.astype(np.float64))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_npz(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return [str(i) for i in z["ids"]], z["emb"], z["flops"]


def _check_existing(data_dir: str | Path, model: str, slug: str, want: dict[str, Any]) -> None:
    """Refuse an existing sidecar whose meta differs from ``want`` in any key ``want`` has
    among sha256, layers, pooling and chat formatting."""
    npz, meta_path = sidecar_paths(data_dir, slug)
    if not npz.exists():
        return
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    for key in ("sha256", "layers", "chat_template", "system_prompt", "pooling"):
        if key in want and meta.get(key) != want[key]:
            raise EmbeddingSidecarError(
                f"{npz} was made with another {key} ({meta.get(key)!r}, now {want[key]!r}); "
                f"rebuild it with {_make_command(data_dir, model, force=True)}")


def build_sidecar(data_dir: str = "data/cascade", model: str = "zoo:smollm2-135m-instruct",
                  layers: tuple[int, ...] | list[int] | None = None, batch_size: int = 16,
                  force: bool = False) -> Path:
    """Embed every labelled prompt under ``data_dir`` not yet in the sidecar; return its npz.

    Prompts come from the stage-0 records (one per id), formatted with their decoding's chat
    settings. Prompts are taken shortest first, so each padded batch wastes little; after every
    batch the npz is rewritten atomically with everything so far, so a killed run loses at most
    one batch and a rerun embeds only the missing ids. A sidecar made with another sha256,
    layers or chat formatting is refused unless ``force`` (then it is rebuilt from scratch).
    """
    from toolkit.models.loading import resolve

    ids, prompts, formatting = labelled_prompts(data_dir)
    # Refuse a stale sidecar before loading the model (resolving it is cheap); the layers are
    # known only once the model is loaded, so they are checked after.
    resolved = resolve(model)
    if not force:
        _check_existing(data_dir, model, resolved.slug,
                        {"sha256": resolved.sha256, "pooling": POOLING, **formatting})
    embedder = PromptEmbedder(model, tuple(layers) if layers is not None else None,
                              DecodingConfig(**formatting))
    npz, meta_path = sidecar_paths(data_dir, embedder.slug)
    meta = {"model": model, "slug": embedder.slug, "sha256": embedder.sha256,
            "layers": list(embedder.layers), "pooling": POOLING, "dim": embedder.dim,
            **embedder.chat_formatting, "non_embedding_params": embedder.non_embedding_params,
            "flops": "2 * non_embedding_params * prompt_tokens (SPEC D2), per prompt",
            "storage": "float16"}
    done_ids: list[str] = []
    emb = np.zeros((0, embedder.dim), np.float16)
    flops = np.zeros(0)
    if not force and npz.exists():
        _check_existing(data_dir, model, embedder.slug, meta)
        done_ids, emb, flops = _read_npz(npz)
    npz.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(meta_path, meta)  # before the npz: an npz always has its meta

    done = set(done_ids)
    todo = [(i, p) for i, p in zip(ids, prompts) if i not in done]
    tokens = embedder.token_ids([p for _, p in todo])
    order = sorted(range(len(todo)), key=lambda j: (len(tokens[j]), todo[j][0]))
    total, start = len(ids), time.perf_counter()
    print(f"embed: {len(done)}/{total} prompts already in {npz}")
    for b in range(0, len(order), batch_size):
        rows = order[b:b + batch_size]
        e, f = embedder.embed_ids([tokens[j] for j in rows])
        done_ids += [todo[j][0] for j in rows]
        emb = np.concatenate([emb, e.astype(np.float16)])
        flops = np.concatenate([flops, f])
        _save_npz(npz, done_ids, emb, flops)
        print(f"embed: {len(done_ids)}/{total} prompts ({time.perf_counter() - start:.1f} s)",
              flush=True)
    if not npz.exists():  # nothing to do and nothing there: still leave a (empty) sidecar
        _save_npz(npz, done_ids, emb, flops)
    return npz


def load_sidecar(data_dir: str | Path, ids: list[str] | np.ndarray,
                 model_slug: str = "smollm2-135m-instruct", sha256: str | None = None,
                 model: str | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Embeddings float32 [len(ids), D] and FLOPs [len(ids)] in the order of ``ids``, and meta.

    ``model`` (default ``zoo:<model_slug>``) is the name the error messages' ``embed``
    command gives the model (a local folder's slug is not a zoo name).

    Raises:
        EmbeddingSidecarError: no sidecar for ``model_slug``; one made with another model or
            (when ``sha256`` is given) other weights; or prompt ids it does not hold.
    """
    npz, meta_path = sidecar_paths(data_dir, model_slug)
    model = model or f"zoo:{model_slug}"
    make = _make_command(data_dir, model)
    if not npz.is_file() or not meta_path.is_file():
        raise EmbeddingSidecarError(f"no prompt embeddings of {model_slug} under "
                                    f"{npz.parent}; make them with {make}")
    meta = json.loads(meta_path.read_text())
    make = _make_command(data_dir, meta.get("model", model))
    if meta.get("slug") != model_slug or (sha256 is not None and meta.get("sha256") != sha256):
        raise EmbeddingSidecarError(
            f"{npz} was made with {meta.get('slug')} sha256 {str(meta.get('sha256'))[:12]}, "
            f"expected {model_slug} sha256 {str(sha256)[:12]}; rebuild it with "
            f"{_make_command(data_dir, model, force=True)}")
    have, emb, flops = _read_npz(npz)
    row = {i: k for k, i in enumerate(have)}
    wanted = [str(i) for i in ids]
    missing = [i for i in wanted if i not in row]
    if missing:
        raise EmbeddingSidecarError(f"{len(missing)} of {len(wanted)} prompt ids have no "
                                    f"embedding in {npz} (e.g. {missing[0]}); embed them with "
                                    f"{make}")
    take = np.array([row[i] for i in wanted], dtype=np.int64)
    return emb[take].astype(np.float32), flops[take].astype(np.float64), meta


# ------------------------------------------------------------------------------- CLI
def embed(data_dir: str = "data/cascade", model: str = "zoo:smollm2-135m-instruct",
          layers: list[int] | None = None, batch_size: int = 16, force: bool = False) -> str:
    """Embed every labelled prompt once (prefill only) into a sidecar beside the records.

    Writes <data_dir>/prompt_embeddings/<slug>.npz (ids, float16 mean-pooled hidden states of
    the chosen layers, FLOPs per prompt) and <slug>.json (model sha256, layers, pooling, chat
    formatting). Resumable: a rerun embeds only the prompts not yet there.

    Args:
        data_dir: the labelled records (output folder of `label`).
        model: zoo:<slug>, a local transformers folder, or a hub id.
        layers: hidden_states indices to pool (0 = token embeddings, -1 = last); default:
            the last and the middle layer.
        batch_size: prompts per padded forward.
        force: rebuild a sidecar made with other weights, layers or chat formatting.
    """
    path = build_sidecar(data_dir, model, layers, batch_size, force)
    print(f"embed: wrote {path}")
    return str(path)
