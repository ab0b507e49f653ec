"""The transformers generation backend: batched, left-padded, KV-cached decoding.

Why our own loop instead of ``model.generate``: we need, for every generated token, statistics
of the *full* untempered distribution (chosen log-prob, top-1, entropy, top-k), per-request
seeds that do not depend on batch composition, per-request wall time, and continuous
batching: a finished sequence leaves the batch at once and a queued prompt takes its slot
(``generate`` keeps decoding padding for finished rows until the longest answer ends). ``benchmarks/generation_throughput.py`` checks that this loop keeps pace with
``model.generate``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from toolkit.generation.base import (
    DecodingConfig,
    GenerationOutput,
    GenerationRequest,
    Messages,
    ModelInfo,
)
from toolkit.generation.sampling import choose_next, make_generator, token_stats
from toolkit.models import loading


class ContextLengthError(ValueError):
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
                 batch_size: int = 8) -> list[GenerationOutput]:
        encoded = [self.encode(r.prompt, config) for r in requests]
        budgets = [r.max_new_tokens or config.max_new_tokens for r in requests]
        for i, (ids, budget) in enumerate(zip(encoded, budgets)):
            if len(ids) + budget > self.context_length:
                raise ContextLengthError(
                    f"request {i}: prompt of {len(ids)} tokens + max_new_tokens {budget} "
                    f"exceeds the model's context of {self.context_length}")
            if not ids:
                raise ValueError(f"request {i}: empty prompt")
        seeds = [r.seed if r.seed is not None else i for i, r in enumerate(requests)]
        return self.generate_ids(encoded, budgets, seeds, config, max_active=batch_size)

    # ------------------------------------------------------------ the decode loop
    def _prefill(self, prompts: list[list[int]]) -> tuple:
        """Left-pad and run prompts; return (cache, last logits, attention mask, positions)."""
        width, dev = max(len(p) for p in prompts), self.device
        ids = torch.full((len(prompts), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         use_cache=True, logits_to_keep=1)
        return out.past_key_values, out.logits[:, -1, :].float(), mask, positions[:, -1:]

    @staticmethod
    def _can_merge(cache: Any) -> bool:
        """Joining rows needs plain per-layer K/V tensors (not sliding-window layers)."""
        layers = getattr(cache, "layers", None)
        return bool(layers) and all(not getattr(la, "is_sliding", False)
                                    and getattr(la, "keys", None) is not None for la in layers)

    @staticmethod
    def _merge(a: tuple, b: tuple) -> tuple:
        """Join two decoding states along the batch, left-padding the shorter cache."""
        (ca, la, ma, pa), (cb, lb, mb, pb) = a, b
        width = max(ma.shape[1], mb.shape[1])

        def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            missing = width - t.shape[dim]
            if missing == 0:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        for x, y in zip(ca.layers, cb.layers):
            x.keys = torch.cat([pad(x.keys, 2), pad(y.keys, 2)], 0)
            x.values = torch.cat([pad(x.values, 2), pad(y.values, 2)], 0)
        return ca, torch.cat([la, lb]), torch.cat([pad(ma, 1), pad(mb, 1)]), torch.cat([pa, pb])

    @staticmethod
    def _trim(cache: Any, mask: torch.Tensor) -> torch.Tensor:
        """Drop leading columns that are padding for every row still decoding."""
        first = int(mask.any(0).long().argmax())
        if first == 0 or getattr(cache, "layers", None) is None:
            return mask
        for la in cache.layers:
            la.keys, la.values = la.keys[:, :, first:], la.values[:, :, first:]
        return mask[:, first:]

    @torch.inference_mode()
    def generate_ids(self, prompts: list[list[int]], budgets: list[int], seeds: list[int],
                     config: DecodingConfig, max_active: int = 8) -> list[GenerationOutput]:
        """Decode token-id prompts with continuous batching.

        At most ``max_active`` sequences decode together. A sequence leaves the batch the step
        it finishes, and the next queued prompts (shortest first, which keeps padding small)
        are prefilled and join it, so the batch stays full until the queue is empty.
        ``wall_s`` of a request runs from its admission (its prefill) to its last token.
        """
        t0 = time.perf_counter()
        n, dev = len(prompts), self.device
        queue = sorted(range(n), key=lambda i: len(prompts[i]))
        generators = None if config.greedy else [make_generator(config.seed, s) for s in seeds]
        eos = torch.tensor(self.eos_ids or [-1], device=dev)
        budget_all = torch.tensor(budgets, device=dev)
        k = config.top_logprobs if config.token_stats else 0
        buf_ids = torch.zeros((n, max(budgets)), dtype=torch.long, device=dev)
        stats_buf: dict[str, torch.Tensor] = {}
        lengths, stop, wall, admitted = [0] * n, ["length"] * n, [0.0] * n, [0.0] * n
        state = None  # (cache, next-token logits, attention mask, positions) of active rows
        active = torch.zeros(0, dtype=torch.long, device=dev)  # request index of each row
        steps = torch.zeros(0, dtype=torch.long, device=dev)  # tokens generated by each row
        while queue or len(active):
            free = max_active - len(active)
            if free > 0 and queue and (state is None or self._can_merge(state[0])):
                new, queue = queue[:free], queue[free:]
                for i in new:
                    admitted[i] = time.perf_counter() - t0
                fresh = self._prefill([prompts[i] for i in new])
                state = fresh if state is None else self._merge(state, fresh)
                active = torch.cat([active, torch.tensor(new, device=dev)])
                steps = torch.cat([steps, steps.new_zeros(len(new))])
            cache, logits, mask, positions = state
            rows = None if generators is None else [generators[i] for i in active.tolist()]
            nxt = choose_next(logits, config.temperature, config.top_k, config.top_p, rows)
            buf_ids[active, steps] = nxt
            if config.token_stats:
                for name, val in token_stats(torch.log_softmax(logits, -1), nxt, k).items():
                    if name not in stats_buf:
                        stats_buf[name] = torch.zeros((n, buf_ids.shape[1], *val.shape[1:]),
                                                      dtype=val.dtype, device=dev)
                    stats_buf[name][active, steps] = val
            steps = steps + 1
            ended = torch.isin(nxt, eos) if self.eos_ids else torch.zeros_like(nxt, dtype=bool)
            done = ended | (budget_all[active] <= steps)
            if done.any():
                now = time.perf_counter() - t0
                for j in done.nonzero().flatten().tolist():
                    r = int(active[j])
                    lengths[r], wall[r] = int(steps[j]), now - admitted[r]
                    stop[r] = "eos" if bool(ended[j]) else "length"
                keep = (~done).nonzero().flatten()
                active, steps, nxt = active[keep], steps[keep], nxt[keep]
                if len(active) == 0:
                    state = None
                    continue
                cache.batch_select_indices(keep)
                mask = self._trim(cache, mask[keep])
                positions = positions[keep]
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
            positions = positions + 1
            out = self.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=positions,
                             past_key_values=cache, use_cache=True)
            state = (out.past_key_values, out.logits[:, -1, :].float(), mask, positions)

        ids_np = buf_ids.cpu().numpy()
        stats_np = {name: v.cpu().numpy() for name, v in stats_buf.items()}
        results = []
        for r in range(n):
            toks = ids_np[r, :lengths[r]]
            res = GenerationOutput(
                text=self.tokenizer.decode(toks, skip_special_tokens=True),
                token_ids=toks, prompt_tokens=len(prompts[r]), stop_reason=stop[r],
                wall_s=wall[r], extra={"queued_s": admitted[r], "max_active": max_active})
            for name, arr in stats_np.items():
                setattr(res, name, arr[r, :lengths[r]])
            results.append(res)
        return results


def plain_generate_kwargs(config: DecodingConfig) -> dict:
    """``model.generate`` arguments equivalent to a DecodingConfig (for benchmarks/tests)."""
    if config.greedy:
        return {"do_sample": False, "max_new_tokens": config.max_new_tokens}
    return {"do_sample": True, "temperature": config.temperature, "top_p": config.top_p,
            "top_k": config.top_k or None, "max_new_tokens": config.max_new_tokens}


