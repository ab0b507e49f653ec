"""The transformers generation backend: batched, left-padded, KV-cached decoding.

Why our own loop instead of ``model.generate``: we need, for every generated token, statistics
of the *full* untempered distribution (chosen log-prob, top-1, entropy, top-k), per-request
seeds that do not depend on batch composition, per-request wall time, and continuous
batching: a finished sequence leaves the batch at once and a queued prompt takes its slot
(``generate`` keeps decoding padding for finished rows until the longest answer ends). The
loop itself lives in ``decode_loop.py``, shared with the q* sampler.
``benchmarks/generation_throughput.py`` checks that this loop keeps pace with
``model.generate``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from toolkit.common.errors import UserError
from toolkit.generation.base import (
    DecodingConfig,
    GenerationOutput,
    GenerationRequest,
    Messages,
    ModelInfo,
)
from toolkit.generation.decode_loop import DecodeLoop
from toolkit.models import loading

OnStep = Callable[[list[int], list[int]], Iterable[int] | None]


class ContextLengthError(UserError, ValueError):
    """A prompt plus its token budget does not fit the model's context window."""


class TransformersBackend:
    """Generate with a transformers causal LM on CPU or GPU.

    Args:
        model: ``zoo:<slug>``, a local transformers folder, or a hub id.
        quantisation: ``none`` or ``nf4`` (bitsandbytes 4-bit weights).
        dtype: weights dtype for unquantised layers.
        device: ``cpu`` or ``cuda[:i]``.
        threads: torch intra-op threads (None keeps torch's default).
    """

    name = "transformers"
    #: Every feature schema: the full distribution gives the entropies (``full-v1``, ``seed-v1``)
    #: and the hidden states of a forward over the answer give ``probe-v1``.
    feature_schemas = ("topk-v1", "full-v1", "no_entropy-v1", "no_logprobs-v1", "minimal-v1",
                       "seed-v1", "probe-v1")

    def __init__(self, model: str, quantisation: str = "none", dtype: str = "float32",
                 device: str = "cpu", threads: int | None = None, auto_pull: bool = True) -> None:
        if threads:
            torch.set_num_threads(threads)
        resolved = loading.resolve(model, auto_pull=auto_pull)
        self.tokenizer = loading.load_tokenizer(resolved)
        self.model, counts = loading.load_causal_lm(resolved, quantisation, dtype, device)
        self.device = torch.device(device)
        cfg = self.model.config
        self.context_length = int(getattr(cfg, "max_position_embeddings", 0) or 1 << 30)
        self.eos_ids = self._eos_ids()
        self.info = ModelInfo(
            name=model, slug=resolved.slug, sha256=resolved.sha256, path=resolved.path,
            non_embedding_params=counts["non_embedding"], quantisation=quantisation,
            vocab_size=int(self.model.get_output_embeddings().weight.shape[0]
                           if quantisation == "none" else cfg.vocab_size),
            backend=self.name,
        )

    def _eos_ids(self) -> list[int]:
        ids: set[int] = set()
        for src in (getattr(self.model, "generation_config", None), self.model.config,
                    self.tokenizer):
            val = getattr(src, "eos_token_id", None)
            if isinstance(val, int):
                ids.add(val)
            elif isinstance(val, (list, tuple)):
                ids.update(int(v) for v in val)
        return sorted(ids)

    # ----------------------------------------------------------------- prompts
    def render(self, prompt: str | Messages, config: DecodingConfig) -> str:
        """The exact text fed to the model (chat template applied if asked)."""
        if not config.chat_template:
            if not isinstance(prompt, str):
                raise ValueError("chat messages need chat_template=True")
            return prompt
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if config.system_prompt and messages[0].get("role") != "system":
            messages = [{"role": "system", "content": config.system_prompt}, *messages]
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True)

    def encode(self, prompt: str | Messages, config: DecodingConfig) -> list[int]:
        text = self.render(prompt, config)
        # The chat template already holds BOS where the model wants it.
        return self.tokenizer(text, add_special_tokens=not config.chat_template)["input_ids"]

    def count_tokens(self, prompt: str | Messages, config: DecodingConfig) -> int:
        return len(self.encode(prompt, config))

    # -------------------------------------------------------------- generation
    def generate(self, requests: Sequence[GenerationRequest], config: DecodingConfig,
                 batch_size: int = 8, on_step: OnStep | None = None) -> list[GenerationOutput]:
        encoded, budgets, seeds = self._prepare(requests, config)
        return self.generate_ids(encoded, budgets, seeds, config, max_active=batch_size,
                                 on_step=on_step)

    def _prepare(self, requests: Sequence[GenerationRequest], config: DecodingConfig,
                 first: int = 0) -> tuple[list[list[int]], list[int], list[int]]:
        """Token ids, budgets and seeds of requests numbered from ``first``; refuses prompts
        that are empty or do not fit the context."""
        encoded = [self.encode(r.prompt, config) for r in requests]
        budgets = [r.max_new_tokens or config.max_new_tokens for r in requests]
        for i, (ids, budget) in enumerate(zip(encoded, budgets), start=first):
            if len(ids) + budget > self.context_length:
                raise ContextLengthError(
                    f"request {i}: prompt of {len(ids)} tokens + max_new_tokens {budget} "
                    f"exceeds the model's context of {self.context_length}")
            if not ids:
                raise ValueError(f"request {i}: empty prompt")
        seeds = [r.seed if r.seed is not None else i
                 for i, r in enumerate(requests, start=first)]
        return encoded, budgets, seeds

    def generate_steps(self, requests: Sequence[GenerationRequest], config: DecodingConfig,
                       batch_size: int = 8, on_step: OnStep | None = None,
                       admit: Callable[[int], Sequence[GenerationRequest]] | None = None
                       ) -> Iterator[list[tuple[int, GenerationOutput]]]:
        """``generate`` one decoding step at a time (``DecodeLoop.steps``): yields the requests
        finished at each step as (index, output). ``admit(free slots)`` may return more
        requests, which join the running batch at the next step (indices continue)."""
        encoded, budgets, seeds = self._prepare(requests, config)
        count = len(requests)

        def admit_ids(free: int) -> list[tuple[list[int], int, int]]:
            nonlocal count
            new = list(admit(free)) if admit is not None else []
            ids, budgets_, seeds_ = self._prepare(new, config, first=count)
            count += len(new)
            return list(zip(ids, budgets_, seeds_))

        loop = DecodeLoop([self.model], self.tokenizer.pad_token_id, self.eos_ids, self.device)
        return loop.steps(encoded, budgets, seeds, config, batch_size,
                          decode=lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True),
                          on_step=on_step, admit=admit_ids if admit is not None else None)

    def generate_ids(self, prompts: list[list[int]], budgets: list[int], seeds: list[int],
                     config: DecodingConfig, max_active: int = 8,
                     on_step: OnStep | None = None) -> list[GenerationOutput]:
        """Decode token-id prompts with continuous batching (``DecodeLoop``).

        ``on_step(request indices, token ids)`` sees each step's tokens (live streaming).
        """
        loop = DecodeLoop([self.model], self.tokenizer.pad_token_id, self.eos_ids, self.device)
        return loop.run(prompts, budgets, seeds, config, max_active,
                        decode=lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True),
                        on_step=on_step)


def plain_generate_kwargs(config: DecodingConfig) -> dict:
    """``model.generate`` arguments equivalent to a DecodingConfig (for benchmarks/tests)."""
    if config.greedy:
        return {"do_sample": False, "max_new_tokens": config.max_new_tokens}
    return {"do_sample": True, "temperature": config.temperature, "top_p": config.top_p,
            "top_k": config.top_k or None, "max_new_tokens": config.max_new_tokens}


