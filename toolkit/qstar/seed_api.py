"""The seed's Python API for q* sampling, as a thin layer over :class:`QStarSampler`.

    model = create_optimal_sampling_model("zoo:qwen2.5-coder-0.5b-instruct",
                                          "zoo:qwen2.5-coder-1.5b-instruct", "kl_symmetry")
    out = model.generate(["Write a haiku"], max_new_tokens=64, temperature=1.0, top_p=0.95)
    out["texts"][0], out["diagnostics"][0]["alpha_mean"]

Everything (exact per-token mixing, α solvers, diagnostics, seeding) is the sampler's; this
module only maps the seed's names and returns plain Python values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from toolkit.generation.base import DecodingConfig, GenerationRequest
from toolkit.qstar.sampler import QStarSampler

_PER_SAMPLE = ("alpha", "ess_theta", "ess_t", "ess_ratio", "kl_theta", "kl_t")


class OptimalSamplingModel:
    """q* = π_θ^α · π_t^(1−α) per token, with the seed's ``generate`` signature.

    Args:
        sampler: the underlying :class:`QStarSampler`.
    """

    def __init__(self, sampler: QStarSampler) -> None:
        self.sampler = sampler

    @property
    def alpha_method(self) -> str:
        return self.sampler.alpha_method

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 256,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                 batch_size: int = 8) -> dict[str, Any]:
        """Sample one completion per prompt from q*.

        Args:
            prompts: user messages (the chat template is applied).
            max_new_tokens: generation budget per prompt.
            temperature: applied to both models before mixing; 0 means greedy on q*.
            top_p: nucleus mass, applied to q* after α is solved.
            top_k: top-k, applied to q* after α is solved (0 = off).
            seed: prompt i samples from a generator seeded by (seed, i).
            batch_size: prompts decoded together.

        Returns:
            ``{"texts": [...], "diagnostics": [...]}``; each diagnostics dict has
            ``{name}_mean`` for α, ESS_θ, ESS_t, ESS ratio, KL_θ, KL_t, the per-token lists
            ``alpha`` and ``kl_theta``/``kl_t``, ``frac_meets_*`` (the seed's conditions) and
            ``tokens``.
        """
        config = DecodingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                                top_p=top_p, top_k=top_k, seed=seed, top_logprobs=0,
                                token_stats=False)
        reqs = [GenerationRequest(p, seed=i) for i, p in enumerate(prompts)]
        outs = self.sampler.generate(reqs, config, batch_size=batch_size)
        diags = []
        for out in outs:
            d: dict[str, Any] = {"tokens": out.generated_tokens, "stop_reason": out.stop_reason}
            for key in _PER_SAMPLE:
                arr = np.asarray(out.extra.get(key, []), dtype=float)
                d[f"{key}_mean"] = float(arr.mean()) if arr.size else float("nan")
            for key in ("alpha", "kl_theta", "kl_t"):
                d[key] = np.asarray(out.extra.get(key, []), dtype=float).tolist()
            for key, arr in out.extra.items():
                if key.startswith("meets_") and len(arr):
                    d[f"frac_{key}"] = float(np.mean(arr))
            diags.append(d)
        return {"texts": [o.text for o in outs], "diagnostics": diags}


def create_optimal_sampling_model(model_theta: str, model_t: str,
                                  alpha_method: str = "kl_symmetry", fixed_alpha: float = 0.5,
                                  dtype: str = "float32", device: str = "cpu"
                                  ) -> OptimalSamplingModel:
    """Load π_θ and π_t (sharing a tokenizer) and return the seed's sampling model.

    Args:
        model_theta: π_θ (zoo:<slug>, folder or hub id).
        model_t: π_t.
        alpha_method: fixed | entropy | kl_symmetry.
        fixed_alpha: α for ``fixed``.
        dtype: weights dtype.
        device: cpu or cuda.
    """
    return OptimalSamplingModel(QStarSampler(model_theta, model_t, alpha_method, fixed_alpha,
                                             dtype, device))
