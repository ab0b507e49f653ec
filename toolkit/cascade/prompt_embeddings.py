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
makes it, resumably; :func:`load_sidecar` reads it and refuses a missing or stale one. The
forward, the pooling and the sidecar files are shared with the post-draft probe features
(``hidden_sidecar.py``; ``probe_features.py``).

Layer indices count like transformers' ``hidden_states``: 0 is the token embeddings, ``i`` the
output of block ``i``, and the last (``-1``) the final, normed hidden state. The default is the
last and the middle one (``num_hidden_layers // 2``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.cascade.hidden_sidecar import HiddenStateReader, Sidecar, SidecarError
from toolkit.common.io import read_jsonl
from toolkit.generation.base import DecodingConfig, Messages, call_cost

SIDECAR_DIR = "prompt_embeddings"
POOLING = "mean of hidden states over the prompt tokens (attention mask), layers concatenated"
# What makes an embedding sidecar what it is: another value of any of these is a stale sidecar.
BUILD_KEYS = ("sha256", "layers", "chat_template", "system_prompt", "pooling")


class EmbeddingSidecarError(SidecarError):
    """A prompt-embedding sidecar is missing, stale or incomplete (one line, names the fix)."""


def _make_command(data_dir: str | Path, model: str, force: bool = False) -> str:
    return (f"`python cli.py embed --data_dir {data_dir} --model {model}"
            f"{' --force true' if force else ''}`")


class PromptEmbedder(HiddenStateReader):
    """Embed prompts with a causal LM: one prefill forward, mean-pooled chosen layers.

    Args and attributes: those of :class:`HiddenStateReader` (``dim`` is the width of one
    embedding); the default model is the cheapest stage's.
    """

    error = EmbeddingSidecarError

    def __init__(self, model: str = "zoo:smollm2-135m-instruct",
                 layers: tuple[int, ...] | None = None, decoding: DecodingConfig | None = None,
                 device: str = "cpu") -> None:
        super().__init__(model, layers, decoding, device)

    def embed(self, prompts: list[str | Messages]) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings float32 [N, dim] and FLOP cost [N] of the prompts, in one padded forward."""
        return self.embed_ids(self.token_ids(prompts))

    def embed_ids(self, ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`embed` on token ids (e.g. from :meth:`token_ids`): every token is pooled."""
        flops = np.array([call_cost(self.non_embedding_params, len(r), 0) for r in ids])
        return self.pool(ids, [0] * len(ids)), flops


# --------------------------------------------------------------------------- sidecar
def sidecar_paths(data_dir: str | Path, slug: str) -> tuple[Path, Path]:
    """(npz, json meta) of one model's sidecar under ``data_dir``."""
    folder = Path(data_dir) / SIDECAR_DIR
    return folder / f"{slug}.npz", folder / f"{slug}.json"


def _sidecar(data_dir: str | Path, slug: str, model: str) -> Sidecar:
    """The sidecar of ``slug``; its messages name ``model`` (or, to complete an existing
    sidecar, the model that made it)."""
    def command(meta: dict[str, Any] | None, force: bool) -> str:
        name = model if force or not meta else meta.get("model", model)
        return _make_command(data_dir, name, force)

    npz, meta = sidecar_paths(data_dir, slug)
    return Sidecar(npz, meta, f"prompt embeddings of {slug}", "prompt ids", command,
                   EmbeddingSidecarError)


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
    sidecar = _sidecar(data_dir, resolved.slug, model)
    if not force and sidecar.npz.exists():
        sidecar.check_meta({"sha256": resolved.sha256, "pooling": POOLING, **formatting},
                           BUILD_KEYS)
    embedder = PromptEmbedder(model, tuple(layers) if layers is not None else None,
                              DecodingConfig(**formatting))
    meta = {"model": model, "slug": embedder.slug, "sha256": embedder.sha256,
            "layers": list(embedder.layers), "pooling": POOLING, "dim": embedder.dim,
            **embedder.chat_formatting, "non_embedding_params": embedder.non_embedding_params,
            "flops": "2 * non_embedding_params * prompt_tokens (SPEC D2), per prompt",
            "storage": "float16"}
    prompt_of = dict(zip(ids, prompts))
    return sidecar.build(meta, ids, BUILD_KEYS,
                         lambda todo: embedder.token_ids([prompt_of[i] for i in todo]),
                         lambda _, tokens: embedder.embed_ids(tokens),
                         batch_size, force, "embed", "prompts")


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
    want: dict[str, Any] = {"slug": model_slug}
    if sha256 is not None:
        want["sha256"] = sha256
    sidecar = _sidecar(data_dir, model_slug, model or f"zoo:{model_slug}")
    return sidecar.load([str(i) for i in ids], want, ("slug", "sha256"))


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
