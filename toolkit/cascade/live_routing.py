"""Routing a live prompt: embed it, run the router, find its cell, pick the entry stage.

A cascade-routing bundle (``bundle_routing.py``) carries a router fitted on the prompt
embeddings of its labelled records, the edges of the router cells and a stopping policy whose
entry stage (and, optionally, post-draft decisions) is chosen per cell. At request time the
prompt is embedded by the same code that made the sidecar the router was trained on
(``PromptEmbedder``: same model, layers, pooling and chat formatting), rounded to float16 as
the sidecar stores it, so a labelled prompt gets the route that replay on the sidecar gives it.
The embedding forward is a model call like any other, and its FLOPs are charged to the
request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from toolkit.cascade import routing
from toolkit.cascade.stopping import StoppingPolicy
from toolkit.common.errors import UserError
from toolkit.generation.base import DecodingConfig, Messages

# What a router bundle records of its embedding model (``bundle.json`` → router.embedding).
EMBEDDING_KEYS = ("model", "slug", "sha256", "layers", "pooling", "dim", "chat_template",
                  "system_prompt", "non_embedding_params")


class EmbeddingModelError(UserError, ValueError):
    """The embedding model at hand is not the one the router was trained on."""


@dataclass
class Route:
    """Where a prompt enters the cascade, and why."""

    entry_stage: int
    cell: str
    """The router cell (bin of each cell stage's predicted correctness, ``"0:1|1:0"``)."""
    router_probabilities: list[float]
    """The router's predicted probability that each stage answers the prompt correctly."""
    embedding_flops: float
    """The embedding forward's cost (2 · non-embedding params · prompt tokens), charged."""
    embedding: np.ndarray | None = field(default=None, repr=False, compare=False)
    """The prompt's embedding as the router read it (float16-rounded): the post-draft heads
    of a predictor that reads the prompt take it too. Not part of ``to_dict``."""

    def to_dict(self) -> dict[str, Any]:
        return {"entry_stage": self.entry_stage, "cell": self.cell,
                "router_probabilities": self.router_probabilities,
                "embedding_flops": self.embedding_flops}


def check_embedding_model(spec: dict[str, Any], model: str | None = None) -> str:
    """Resolve the embedding model (``model``, default the one the bundle names) and refuse it
    unless its slug and weights' sha256 are the bundle's; returns the name to load. Cheap:
    nothing is loaded, so a server refuses before loading any stage."""
    from toolkit.models.loading import resolve

    name = model or spec["model"]
    got = resolve(name)  # a missing model is a one-line ModelLoadError
    if got.slug != spec["slug"] or (spec.get("sha256") and got.sha256 != spec["sha256"]):
        raise EmbeddingModelError(
            f"the bundle's router reads embeddings of {spec['slug']} (sha256 "
            f"{str(spec.get('sha256'))[:12]}…), but {name} is {got.slug} (sha256 "
            f"{str(got.sha256)[:12]}…); serve with that model or rebuild the bundle")
    return name


class HeadsRouter:
    """The router heads of a predictor that reads the prompt (one ONNX file: the bundle's
    ``predictor.onnx``), behind the same ``predict`` / ``dim`` / ``num_stages`` as a
    ``routing.Router``."""

    kind = "predictor"

    def __init__(self, predictor: Any) -> None:
        if not getattr(predictor, "reads_prompt", False):
            raise EmbeddingModelError("the bundle's router is its predictor's router heads, "
                                      "but its predictor.onnx has none")
        self.predictor = predictor

    @property
    def dim(self) -> int:
        return int(self.predictor.embedding_dim)

    @property
    def num_stages(self) -> int:
        return int(self.predictor.schema.num_stages)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.predictor.route(X).astype(np.float64)


class PromptRouter:
    """Embed prompts, predict each stage's correctness, and pick each prompt's entry stage.

    Args:
        embedder: a ``PromptEmbedder`` loaded with the bundle's embedding model and layers.
        router: the fitted router (``routing.Router``, or ``HeadsRouter``).
        cells: the rule that puts a prompt's predictions in a cell (``routing.CellRule``).
    """

    def __init__(self, embedder: Any, router: routing.Router | HeadsRouter,
                 cells: routing.CellRule) -> None:
        if embedder.dim != router.dim:
            raise EmbeddingModelError(f"the embedding model gives {embedder.dim}-wide "
                                      f"embeddings, the router reads {router.dim}")
        self.embedder, self.router = embedder, router
        self.cells = cells

    def route(self, prompts: Sequence[str | Messages], policies: Sequence[StoppingPolicy]
              ) -> list[Route]:
        """One padded embedding forward for the prompts, then each one's entry stage under
        its own (deterministic side of the) policy."""
        emb, flops = self.embedder.embed(list(prompts))
        emb = emb.astype(np.float16).astype(np.float32)  # as the sidecar stores it
        R = self.router.predict(emb)
        cells = self.cells.labels(R)
        return [Route(pol.first_stage(str(c)), str(c), [float(x) for x in r], float(f), e)
                for pol, c, r, f, e in zip(policies, cells, R, flops, emb)]


def load_prompt_router(spec: dict[str, Any], router: routing.Router | HeadsRouter,
                       decoding: DecodingConfig,
                       model: str | None = None, device: str = "cpu") -> PromptRouter:
    """The live router of a bundle: its ``router`` section (``spec``), the loaded router, and
    the bundle's decoding (chat formatting). ``model`` overrides where the embedding model is
    loaded from; it must still be the bundle's (slug and sha256)."""
    from toolkit.cascade.prompt_embeddings import PromptEmbedder

    emb = spec["embedding"]
    name = check_embedding_model(emb, model)
    embedder = PromptEmbedder(name, tuple(emb["layers"]), decoding, device=device)
    if list(embedder.layers) != list(emb["layers"]):
        raise EmbeddingModelError(f"embedding layers {list(embedder.layers)} differ from "
                                  f"the router's {emb['layers']}")
    return PromptRouter(embedder, router, routing.CellRule.from_dict(spec["cells"]))
