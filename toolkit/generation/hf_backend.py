"""The transformers generation backend: batched, left-padded, KV-cached decoding.

Why our own loop instead of ``model.generate``: we need, for every generated token, statistics
of the *full* untempered distribution (chosen log-prob, top-1, entropy, top-k), per-request
seeds that do not depend on batch composition, per-request wall time, and finished sequences
leaving the batch at once (``generate`` keeps decoding padding for them until the longest
answer ends). ``benchmarks/generation_throughput.py`` checks that this loop keeps pace with
``model.generate``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

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
        # Sorting by length keeps padding (wasted compute) small inside each batch.
        order = sorted(range(len(requests)), key=lambda i: len(encoded[i]))
        results: list[GenerationOutput | None] = [None] * len(requests)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            outs = self.generate_ids([encoded[i] for i in idx], [budgets[i] for i in idx],
                                     [seeds[i] for i in idx], config)
            for i, out in zip(idx, outs):
                out.extra["batch_size"] = len(idx)
                results[i] = out
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def generate_ids(self, prompts: list[list[int]], budgets: list[int], seeds: list[int],
                     config: DecodingConfig) -> list[GenerationOutput]:
        """Decode one batch of token-id prompts; rows leave the batch as soon as they finish."""
        t0 = time.perf_counter()
        n, width, dev = len(prompts), max(len(p) for p in prompts), self.device
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((n, width), pad, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for r, p in enumerate(prompts):  # left padding
            input_ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        input_ids, mask = input_ids.to(dev), mask.to(dev)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        generators = None if config.greedy else [make_generator(config.seed, s) for s in seeds]
        eos = torch.tensor(self.eos_ids or [-1], device=dev)
        budget = torch.tensor(budgets, device=dev)
        k = config.top_logprobs if config.token_stats else 0
        steps = max(budgets)
        buf_ids = torch.zeros((n, steps), dtype=torch.long, device=dev)
        stats_buf: dict[str, torch.Tensor] = {}
        lengths, stop, wall = [0] * n, ["length"] * n, [0.0] * n

        active = torch.arange(n, device=dev)  # original row of each row still decoding
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                         use_cache=True, logits_to_keep=1)
        cache, step = out.past_key_values, 0
        while True:
            logits = out.logits[:, -1, :].float()
            rows = None if generators is None else [generators[i] for i in active.tolist()]
            nxt = choose_next(logits, config.temperature, config.top_k, config.top_p, rows)
            buf_ids[active, step] = nxt
            if config.token_stats:
                st = token_stats(torch.log_softmax(logits, -1), nxt, k)
                for name, val in st.items():
                    if name not in stats_buf:
                        stats_buf[name] = torch.zeros((n, steps, *val.shape[1:]),
                                                      dtype=val.dtype, device=dev)
                    stats_buf[name][active, step] = val
            step += 1
            ended = torch.isin(nxt, eos) if self.eos_ids else torch.zeros_like(nxt, dtype=bool)
            done = ended | (budget[active] <= step)
            if done.any():
                now = time.perf_counter() - t0
                for j in done.nonzero().flatten().tolist():
                    r = int(active[j])
                    lengths[r], wall[r] = step, now
                    stop[r] = "eos" if bool(ended[j]) else "length"
                keep = (~done).nonzero().flatten()
                if keep.numel() == 0:
                    break
                active, nxt, mask = active[keep], nxt[keep], mask[keep]
                positions = positions[keep]
                cache.batch_select_indices(keep)
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
            positions = positions[:, -1:] + 1
            out = self.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=positions,
                             past_key_values=cache, use_cache=True)

        ids_np = buf_ids.cpu().numpy()
        stats_np = {k_: v.cpu().numpy() for k_, v in stats_buf.items()}
        results = []
        for r in range(n):
            L = lengths[r]
            toks = ids_np[r, :L]
            res = GenerationOutput(
                text=self.tokenizer.decode(toks, skip_special_tokens=True),
                token_ids=toks, prompt_tokens=len(prompts[r]), stop_reason=stop[r], wall_s=wall[r])
            for name, arr in stats_np.items():
                setattr(res, name, arr[r, :L])
            results.append(res)
        return results


def plain_generate_kwargs(config: DecodingConfig) -> dict:
    """``model.generate`` arguments equivalent to a DecodingConfig (for benchmarks/tests)."""
    if config.greedy:
        return {"do_sample": False, "max_new_tokens": config.max_new_tokens}
    return {"do_sample": True, "temperature": config.temperature, "top_p": config.top_p,
            "top_k": config.top_k or None, "max_new_tokens": config.max_new_tokens}


