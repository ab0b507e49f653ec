"""The live cascade: run stages lazily and pay only for the stages a prompt reaches.

Decisions go through the same ``StoppingPolicy`` as replay (``policy.first_stage``,
``policy.bin_of``, ``policy.decide``), so a live run on prompts whose records were labelled
with the same models and settings makes the same decisions as replay on those records. Prompts
are batched per stage: all prompts waiting for stage k are generated together, scored by the
ONNX predictor, and each one stops or moves on.

With a prompt router (a cascade-routing bundle, ``live_routing.PromptRouter``), every prompt
is embedded first and enters at the stage its router cell's policy picks; its cell is the
policy group of every later decision, and the embedding forward is charged to its cost.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from toolkit.cascade.features import record_features
from toolkit.cascade.live_routing import PromptRouter, Route
from toolkit.cascade.onnx_runtime import OnnxQualityPredictor
from toolkit.cascade.stopping import AnyPolicy, Decision, History, StoppingPolicy, prompt_key
from toolkit.generation.base import (
    DecodingConfig,
    GenerationOutput,
    GenerationRequest,
    call_cost,
    check_feature_schema,
)


@dataclass
class StageTrace:
    stage: int
    model: str
    output: str
    p: float
    decision: str
    why: str
    cost_flops: float
    generated_tokens: int
    wall_s: float


@dataclass
class StageStep:
    """One prompt's outcome at one stage: its trace entry, the decision, the new history."""

    trace: StageTrace
    decision: Decision
    history: History
    output: GenerationOutput


@dataclass
class CascadeResult:
    output: str
    stopped_at_stage: int
    stage_probabilities: list[float]
    cost_flops: float
    latency_ms: float
    trace: list[StageTrace] = field(default_factory=list)
    route: Route | None = None


class LiveCascade:
    """Run a cascade of generation backends with a predictor and a stopping policy.

    Args:
        backends: one generation backend per stage (smallest first), sharing nothing; each
            must declare the predictor's feature schema in its ``feature_schemas`` (vLLM
            serves only top-k-log-prob schemas such as ``topk-v1``), else a one-line error.
        predictor: the ONNX quality predictor (its feature schema must fit the stage count).
        policy: the fitted stopping policy (``fit_policy`` / ``policy_from_dict``); a
            ``MixedPolicy`` is resolved per prompt by ``prompt_key``.
        decoding: decoding settings (greedy by default, as the labels were made).
        batch_size: sequences decoding together per stage.
        router: a prompt router (cascade-routing bundles): the entry stage and policy group
            of each prompt come from it; None = the policy's entry for the given groups.
    """

    def __init__(self, backends: Sequence[Any], predictor: OnnxQualityPredictor,
                 policy: AnyPolicy, decoding: DecodingConfig | None = None,
                 batch_size: int = 8, router: PromptRouter | None = None) -> None:
        if predictor.schema.num_stages != len(backends) or policy.num_stages != len(backends):
            raise ValueError(f"{len(backends)} stages, but the predictor expects "
                             f"{predictor.schema.num_stages} and the policy "
                             f"{policy.num_stages}")
        for b in backends:  # a backend must give what the predictor reads (vLLM: topk-v1)
            check_feature_schema(b, predictor.schema.id)
        self.backends, self.predictor, self.policy = list(backends), predictor, policy
        self.decoding = decoding or DecodingConfig()
        self.batch_size = batch_size
        self.router = router

    def run(self, prompts: Sequence[str], groups: Sequence[str] | None = None
            ) -> list[CascadeResult]:
        """Run the cascade on prompts; ``groups`` (tasks) are ignored with a router, whose
        cells are the groups."""
        t0 = time.perf_counter()
        policies = [self.policy.for_key(prompt_key(p)) for p in prompts]
        routes = self.router.route(prompts, policies) if self.router is not None else None
        if routes is not None:
            groups = [r.cell for r in routes]
        groups = list(groups) if groups is not None else [""] * len(prompts)
        at = {i: policies[i].first_stage(groups[i]) for i in range(len(prompts))}
        hist: dict[int, History] = {i: () for i in range(len(prompts))}
        traces: dict[int, list[StageTrace]] = {i: [] for i in range(len(prompts))}
        done: dict[int, CascadeResult] = {}
        for k in range(len(self.backends)):
            waiting = [i for i in at if i not in done and at[i] == k]
            if not waiting:
                continue
            steps = self.run_stage(k, [GenerationRequest(prompts[i]) for i in waiting],
                                   [hist[i] for i in waiting],
                                   policies=[policies[i] for i in waiting],
                                   groups=[groups[i] for i in waiting],
                                   embeddings=None if routes is None else
                                   [routes[i].embedding for i in waiting])
            for i, st in zip(waiting, steps):
                hist[i] = st.history
                traces[i].append(st.trace)
                if st.decision.action == "stop":
                    tr = traces[i]
                    route = routes[i] if routes is not None else None
                    cost = sum(t.cost_flops for t in tr) + (route.embedding_flops if route
                                                            else 0.0)
                    done[i] = CascadeResult(st.trace.output, k, [t.p for t in tr], cost,
                                            1000 * (time.perf_counter() - t0), tr, route)
                else:
                    at[i] = st.decision.next_stage
        return [done[i] for i in range(len(prompts))]

    def run_stage(self, k: int, requests: Sequence[GenerationRequest],
                  histories: Sequence[History], decoding: DecodingConfig | None = None,
                  on_step: Callable[[list[int], list[int]], Iterable[int] | None] | None = None,
                  policies: Sequence[StoppingPolicy] | None = None,
                  groups: Sequence[str] | None = None,
                  embeddings: Sequence[np.ndarray | None] | None = None) -> list[StageStep]:
        """Generate stage k's answers for a batch, score them and decide for each.

        The one decision step, shared by ``run`` and the HTTP server's per-stage micro-batches
        (which pass each request's own history and budget, and ``on_step`` to stream the top
        stage's tokens as they are decoded). ``policies`` are the requests' own deterministic
        policies (``policy.for_key``); by default every request uses ``self.policy``.
        ``groups`` are the requests' prompt groups (tasks); by default unknown (``""``).
        """
        if policies is None:
            policies = [self.policy.for_key(prompt_key(r.prompt)) for r in requests]
        extra = {"on_step": on_step} if on_step is not None else {}
        outs = self.backends[k].generate(list(requests), decoding or self.decoding,
                                         batch_size=self.batch_size, **extra)
        return self.score(k, outs, histories, policies, groups, embeddings)

    def score(self, k: int, outs: Sequence[GenerationOutput], histories: Sequence[History],
              policies: Sequence[StoppingPolicy], groups: Sequence[str] | None = None,
              embeddings: Sequence[np.ndarray | None] | None = None) -> list[StageStep]:
        """Score stage k's finished answers and decide for each (the second half of
        ``run_stage``; the server calls it directly as answers finish mid-batch).
        ``embeddings``: each prompt's embedding from its route, for a predictor whose
        post-draft heads read the prompt."""
        backend = self.backends[k]
        feats = np.stack([record_features(self._record(k, o), self.predictor.schema)
                          for o in outs])
        emb = None
        if getattr(self.predictor, "reads_prompt", False):
            if embeddings is None or any(e is None for e in embeddings):
                raise ValueError("this predictor reads the prompt embedding: run it with the "
                                 "prompt router of its bundle")
            emb = np.stack(list(embeddings))
        probs = self.predictor.predict(feats, self.predictor.schema, embedding=emb)[:, 0]
        groups = list(groups) if groups is not None else [""] * len(outs)
        steps = []
        for h, o, p, pol, g in zip(histories, outs, probs, policies, groups):
            history = (*h, (k, pol.bin_of(k, float(p))))
            d = pol.decide(k, history, g)
            why = (f"stop: λ(1-acc)={d.stop_value:.3f} <= best continuation "
                   f"{d.go_value:.3f}" if d.action == "stop" and k < len(self.backends) - 1
                   else "top stage" if d.action == "stop"
                   else f"go to stage {d.next_stage}: continuation {d.go_value:.3f} < "
                        f"stop {d.stop_value:.3f}")
            cost = call_cost(backend.info.non_embedding_params, o.prompt_tokens,
                             o.generated_tokens)
            steps.append(StageStep(StageTrace(k, backend.info.slug, o.text, float(p), d.action,
                                              why, cost, o.generated_tokens, o.wall_s),
                                   d, history, o))
        return steps

    @staticmethod
    def _record(stage: int, out: Any) -> dict[str, Any]:
        """The fields of a label record that features are computed from."""
        return {"stage": stage, "prompt_tokens": out.prompt_tokens,
                "generated_tokens": out.generated_tokens, "stop_reason": out.stop_reason,
                "tokens": out.token_arrays(), "backend": "live"}
