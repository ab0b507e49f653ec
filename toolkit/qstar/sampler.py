"""The q* sampler: decode from the per-token geometric mixture of two models, exactly.

At every position both models run (each with its own KV cache, in lock-step inside the one
``DecodeLoop``), α is solved per row (``alpha.solve_alpha``: fixed, entropy or kl_symmetry),
q_α ∝ π_θ^α · π_t^(1−α) is formed on the full temperature-scaled distributions, top-k/top-p
are applied to q_α *after* α is solved, and the token is drawn from that truncated q (each
request from its own generator seeded by (seed, request seed), as in plain generation). The
per-token diagnostics (α, both KLs, both ESS) are recorded for the untruncated q_α and for the
distribution actually sampled from.

This is per-token sampling: the sequence it produces is not a draw from the sequence-level
geometric mixture. Importance weights for training are computed from the exact per-token q
that was sampled from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from toolkit.common.errors import UserError
from toolkit.generation.base import DecodingConfig, GenerationOutput, GenerationRequest
from toolkit.generation.decode_loop import DecodeLoop
from toolkit.generation.hf_backend import ContextLengthError, TransformersBackend
from toolkit.generation.sampling import sample_rows

ALPHA_METHODS = ("fixed", "entropy", "kl_symmetry")


class VocabularyMismatchError(UserError, ValueError):
    """The two models do not share a tokenizer, so their distributions cannot be mixed."""


class QStarSampler:
    """Sample from q* = π_θ^α · π_t^(1−α) (per token) with two transformers models.

    Args:
        model_theta: π_θ, the current/base policy (zoo:<slug>, folder or hub id).
        model_t: π_t, the target/teacher; must share π_θ's tokenizer.
        alpha_method: fixed | entropy | kl_symmetry.
        fixed_alpha: α for ``fixed``.
        dtype: weights dtype of both models.
        device: cpu or cuda.
    """

    def __init__(self, model_theta: str, model_t: str, alpha_method: str = "kl_symmetry",
                 fixed_alpha: float = 0.5, dtype: str = "float32", device: str = "cpu") -> None:
        if alpha_method not in ALPHA_METHODS:
            raise ValueError(f"unknown alpha_method {alpha_method!r}; choose {ALPHA_METHODS}")
        self.theta = TransformersBackend(model_theta, dtype=dtype, device=device)
        self.t = TransformersBackend(model_t, dtype=dtype, device=device)
        self._check_vocabularies()
        self.alpha_method, self.fixed_alpha = alpha_method, fixed_alpha

    def _check_vocabularies(self) -> None:
        va, vb = self.theta.tokenizer.get_vocab(), self.t.tokenizer.get_vocab()
        if va != vb:
            only_a = len(set(va) - set(vb))
            raise VocabularyMismatchError(
                f"{self.theta.info.slug} and {self.t.info.slug} do not share a tokenizer "
                f"({len(va)} vs {len(vb)} tokens, {only_a} only in the first)")
        na, nb = self.theta.info.vocab_size, self.t.info.vocab_size
        if na != nb:
            # Same tokenizer but padded embedding tables of different sizes: mixing the
            # padded logits would compare rows that mean nothing.
            raise VocabularyMismatchError(
                f"output sizes differ ({na} vs {nb}) although the tokenizers match")

    def picker(self, logits: list[torch.Tensor], config: DecodingConfig,
               rows: list[torch.Generator] | None) -> tuple[torch.Tensor, torch.Tensor,
                                                            dict[str, torch.Tensor]]:
        from toolkit.qstar.alpha import sampling_distribution, solve_alpha
        from toolkit.qstar.diagnostics import token_diagnostics

        temperature = config.temperature if config.temperature > 0 else 1.0
        res = solve_alpha(logits[0], logits[1], self.alpha_method, temperature=temperature,
                          fixed_alpha=self.fixed_alpha)
        logq_s = sampling_distribution(res.logq, config.top_k, config.top_p)
        if config.greedy:
            nxt = logq_s.argmax(-1)
        else:
            nxt = sample_rows(logq_s, rows)
        diag = token_diagnostics(res, logq_s).as_dict()
        # Per-token log importance ratios of the emitted token against the distribution it was
        # drawn from (temperature-scaled models, q after top-k/top-p); summed per sample they
        # are the sequence weights log π(y)/q(y) (meaningful when sampling, not greedy).
        tok = nxt[:, None].to(logq_s.device)
        logq_tok = logq_s.gather(-1, tok).squeeze(-1)
        diag["logw_theta"] = res.logp_theta.gather(-1, tok).squeeze(-1) - logq_tok
        diag["logw_t"] = res.logp_t.gather(-1, tok).squeeze(-1) - logq_tok
        return nxt, logq_s.float(), {k: v.float() for k, v in diag.items()}

    def generate(self, requests: Sequence[GenerationRequest], config: DecodingConfig,
                 batch_size: int = 8) -> list[GenerationOutput]:
        """Generate every request from q*; per-token diagnostics land in ``extra``."""
        encoded = [self.theta.encode(r.prompt, config) for r in requests]
        budgets = [r.max_new_tokens or config.max_new_tokens for r in requests]
        limit = min(self.theta.context_length, self.t.context_length)
        for i, (ids, budget) in enumerate(zip(encoded, budgets)):
            if not ids:
                raise ValueError(f"request {i}: empty prompt")
            if len(ids) + budget > limit:
                raise ContextLengthError(f"request {i}: prompt of {len(ids)} tokens + "
                                         f"max_new_tokens {budget} exceeds the context of {limit}")
        seeds = [r.seed if r.seed is not None else i for i, r in enumerate(requests)]
        eos = sorted(set(self.theta.eos_ids) | set(self.t.eos_ids))
        loop = DecodeLoop([self.theta.model, self.t.model], self.theta.tokenizer.pad_token_id,
                          eos, self.theta.device, picker=self.picker)
        return loop.run(encoded, budgets, seeds, config, batch_size,
                        decode=lambda ids: self.theta.tokenizer.decode(
                            ids, skip_special_tokens=True))

    @property
    def info(self) -> dict[str, Any]:
        return {"theta": self.theta.info.__dict__, "t": self.t.info.__dict__,
                "alpha_method": self.alpha_method}
