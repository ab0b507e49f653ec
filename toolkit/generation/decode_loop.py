"""The one autoregressive decoding loop: continuous batching over one or more causal LMs.

Plain generation runs one model; the q* sampler runs two models that share a tokenizer and
mixes their next-token distributions. Both go through ``DecodeLoop``: it owns the queue, the
slots, the KV caches (one per model, kept in lock-step), EOS/length stopping and the per-token
records; a *picker* turns the models' next-token logits into the emitted tokens, the
distribution whose statistics are recorded, and optional extra per-token values.

Continuous batching: at most ``max_active`` sequences decode together. A sequence leaves the
batch the step it finishes, and the next queued prompts (shortest first, which keeps padding
small) are prefilled and join, so the batch stays full until the queue is empty. Joining pads
the shorter cache on the left; leading columns that are padding for every row are trimmed.
``steps`` runs the loop one step at a time and lets a caller add requests while it runs (the
server admits new requests into a running batch); ``run`` decodes a fixed list.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from toolkit.generation.base import DecodingConfig, GenerationOutput
from toolkit.generation.sampling import choose_next, make_generator, token_stats

OnStep = Callable[[list[int], list[int]], Iterable[int] | None]
Admit = Callable[[int], Iterable[tuple[list[int], int, int]]]
"""``admit(free slots)`` -> new requests as (prompt ids, budget, seed).

See ``DecodeLoop.steps``."""

# picker(logits per model [B, V] each, config, generators of the rows or None)
#   -> (tokens [B], log-probs to record stats on [B, V], extra per-token values {name: [B]})
Picker = Callable[[list[torch.Tensor], DecodingConfig, list[torch.Generator] | None],
                  tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]


def single_model_picker(logits: list[torch.Tensor], config: DecodingConfig,
                        rows: list[torch.Generator] | None) -> tuple[torch.Tensor, torch.Tensor,
                                                                     dict[str, torch.Tensor]]:
    """Plain generation: sample from the one model; record stats of its raw distribution."""
    nxt = choose_next(logits[0], config.temperature, config.top_k, config.top_p, rows)
    return nxt, torch.log_softmax(logits[0], -1), {}


def _cache_kwarg(model: Any) -> str:
    """The forward() keyword of the KV cache: transformers 5.2x renamed ``past_key_values`` to
    ``cache`` (the old name only warns, and is slated for removal); older 5.x has the old one."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out: Any) -> Any:
    """The KV cache of a forward's output, under either name (see ``_cache_kwarg``)."""
    cache = out.get("cache")
    return cache if cache is not None else out.past_key_values


class DecodeLoop:
    """Batched, KV-cached decoding of token-id prompts (see the module docstring).

    Args:
        models: causal LMs that read the same token ids (one for plain generation).
        pad_id: id used for left padding (masked out).
        eos_ids: ids that end a sequence.
        device: where the inputs go.
        picker: how the models' logits become tokens (default: one model, plain sampling).
    """

    def __init__(self, models: Sequence[Any], pad_id: int, eos_ids: Sequence[int],
                 device: torch.device, picker: Picker = single_model_picker) -> None:
        self.models, self.pad_id, self.eos_ids = list(models), pad_id, list(eos_ids)
        self.device, self.picker = device, picker
        self.cache_kwargs = [_cache_kwarg(m) for m in self.models]

    # ------------------------------------------------------------- cache ops
    def _prefill(self, prompts: list[list[int]]) -> tuple:
        """Left-pad and run prompts; (caches, last logits per model, attention mask, positions)."""
        width, dev = max(len(p) for p in prompts), self.device
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        caches, logits = [], []
        for m in self.models:
            out = m(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1)
            caches.append(_cache_of(out))
            logits.append(out.logits[:, -1, :].float())
        return caches, logits, mask, positions[:, -1:]

    @staticmethod
    def _can_merge(caches: list[Any]) -> bool:
        """Joining rows needs plain per-layer K/V tensors (not sliding-window layers)."""
        for cache in caches:
            layers = getattr(cache, "layers", None)
            if not layers or any(getattr(la, "is_sliding", False)
                                 or getattr(la, "keys", None) is None for la in layers):
                return False
        return True

    @staticmethod
    def _merge(a: tuple, b: tuple) -> tuple:
        """Join two decoding states along the batch, left-padding the shorter caches."""
        (ca, la, ma, pa), (cb, lb, mb, pb) = a, b
        width = max(ma.shape[1], mb.shape[1])

        def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            missing = width - t.shape[dim]
            if missing == 0:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        for cache_a, cache_b in zip(ca, cb):
            for x, y in zip(cache_a.layers, cache_b.layers):
                x.keys = torch.cat([pad(x.keys, 2), pad(y.keys, 2)], 0)
                x.values = torch.cat([pad(x.values, 2), pad(y.values, 2)], 0)
        logits = [torch.cat([x, y]) for x, y in zip(la, lb)]
        return ca, logits, torch.cat([pad(ma, 1), pad(mb, 1)]), torch.cat([pa, pb])

    @staticmethod
    def _trim(caches: list[Any], mask: torch.Tensor) -> torch.Tensor:
        """Drop leading columns that are padding for every row still decoding."""
        first = int(mask.any(0).long().argmax())
        if first == 0 or any(getattr(c, "layers", None) is None for c in caches):
            return mask
        for cache in caches:
            for la in cache.layers:
                la.keys, la.values = la.keys[:, :, first:], la.values[:, :, first:]
        return mask[:, first:]

    # ------------------------------------------------------------------ run
    def run(self, prompts: list[list[int]], budgets: list[int], seeds: list[int],
            config: DecodingConfig, max_active: int = 8,
            decode: Callable[[np.ndarray], str] | None = None,
            on_step: OnStep | None = None) -> list[GenerationOutput]:
        """Decode every prompt; ``wall_s`` runs from a request's prefill to its last token.

        ``on_step(request indices, token ids)``, if given, is called after every step with the
        token each decoding row just emitted (the server streams the top stage live with it).
        It may return request indices to abandon (their clients went away): those rows leave
        the batch at once with stop reason ``cancelled``, so nobody pays for unread tokens.
        """
        results: list[GenerationOutput | None] = [None] * len(prompts)
        for finished in self.steps(prompts, budgets, seeds, config, max_active, decode,
                                   on_step):
            for r, out in finished:
                results[r] = out
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def steps(self, prompts: list[list[int]], budgets: list[int], seeds: list[int],
              config: DecodingConfig, max_active: int = 8,
              decode: Callable[[np.ndarray], str] | None = None,
              on_step: OnStep | None = None, admit: Admit | None = None
              ) -> Iterator[list[tuple[int, GenerationOutput]]]:
        """``run`` one step at a time: yields, after every decoding step, the requests that
        finished in it as (request index, output); ends when nothing is left to decode.

        ``admit(free slots)``, if given, is asked before every step for more requests
        ((prompt ids, budget, seed) each; indices continue after the last one): they join the
        running batch at that step (the server admits new requests this way). A caller may
        also stop iterating at any point.
        """
        t0 = time.perf_counter()
        dev = self.device
        prompts, budgets, seeds = list(prompts), list(budgets), list(seeds)
        queue = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        generators = None if config.greedy else [make_generator(config.seed, s) for s in seeds]
        eos = torch.tensor(self.eos_ids or [-1], device=dev)
        budget_all = torch.tensor(budgets, device=dev, dtype=torch.long)
        k = config.top_logprobs if config.token_stats else 0
        bufs: dict[str, torch.Tensor] = {
            "token_ids": torch.zeros((len(prompts), max(budgets, default=1)), dtype=torch.long,
                                     device=dev)}
        admitted = [0.0] * len(prompts)
        state = None  # (caches, next-token logits per model, attention mask, positions)
        active = torch.zeros(0, dtype=torch.long, device=dev)  # request index of each row
        steps = torch.zeros(0, dtype=torch.long, device=dev)  # tokens generated by each row

        def grow() -> None:
            """Make room in the per-token buffers for requests added by ``admit``."""
            rows, width = len(prompts), max(budgets)
            for name, buf in bufs.items():
                extra_rows, extra_cols = rows - buf.shape[0], width - buf.shape[1]
                if extra_cols > 0:
                    buf = torch.cat([buf, buf.new_zeros((buf.shape[0], extra_cols,
                                                         *buf.shape[2:]))], 1)
                if extra_rows > 0:
                    buf = torch.cat([buf, buf.new_zeros((extra_rows, *buf.shape[1:]))], 0)
                bufs[name] = buf

        def record(values: dict[str, torch.Tensor]) -> None:
            for name, val in values.items():
                if name not in bufs:
                    bufs[name] = torch.zeros((len(prompts), bufs["token_ids"].shape[1],
                                              *val.shape[1:]), dtype=val.dtype, device=dev)
                bufs[name][active, steps] = val

        def output(r: int, length: int, stop: str, wall: float) -> GenerationOutput:
            toks = bufs["token_ids"][r, :length].cpu().numpy()
            res = GenerationOutput(
                text=decode(toks) if decode else "", token_ids=toks,
                prompt_tokens=len(prompts[r]), stop_reason=stop, wall_s=wall,
                extra={"queued_s": admitted[r], "max_active": max_active})
            for name, buf in bufs.items():
                if name == "token_ids":
                    continue
                arr = buf[r, :length].cpu().numpy()
                if hasattr(res, name):
                    setattr(res, name, arr)
                else:
                    res.extra[name] = arr
            return res

        while True:
            free = max_active - len(active) - len(queue)
            if admit is not None and free > 0:
                new = list(admit(free))
                if new:
                    for ids, budget, seed in new:
                        queue.append(len(prompts))
                        prompts.append(ids)
                        budgets.append(budget)
                        admitted.append(0.0)
                        if generators is not None:
                            generators.append(make_generator(config.seed, seed))
                    budget_all = torch.tensor(budgets, device=dev, dtype=torch.long)
                    grow()
            if not queue and not len(active):
                return
            free = max_active - len(active)
            if free > 0 and queue and (state is None or self._can_merge(state[0])):
                new_rows, queue = queue[:free], queue[free:]
                for i in new_rows:
                    admitted[i] = time.perf_counter() - t0
                fresh = self._prefill([prompts[i] for i in new_rows])
                state = fresh if state is None else self._merge(state, fresh)
                active = torch.cat([active, torch.tensor(new_rows, device=dev)])
                steps = torch.cat([steps, steps.new_zeros(len(new_rows))])
            caches, logits, mask, positions = state
            rows = None if generators is None else [generators[i] for i in active.tolist()]
            nxt, logprobs, extra = self.picker(logits, config, rows)
            bufs["token_ids"][active, steps] = nxt
            abandon = on_step(active.tolist(), nxt.tolist()) if on_step is not None else None
            if config.token_stats:
                record(token_stats(logprobs, nxt, k))
            record(extra)
            steps = steps + 1
            ended = torch.isin(nxt, eos) if self.eos_ids else torch.zeros_like(nxt, dtype=bool)
            done = ended | (budget_all[active] <= steps)
            cancelled = torch.zeros_like(done)
            if abandon:
                cancelled = torch.isin(active, torch.tensor(list(abandon), device=dev))
                done = done | cancelled
            finished: list[tuple[int, GenerationOutput]] = []
            if done.any():
                now = time.perf_counter() - t0
                for j in done.nonzero().flatten().tolist():
                    r = int(active[j])
                    stop = ("cancelled" if bool(cancelled[j]) else
                            "eos" if bool(ended[j]) else "length")
                    finished.append((r, output(r, int(steps[j]), stop, now - admitted[r])))
                keep = (~done).nonzero().flatten()
                active, steps, nxt = active[keep], steps[keep], nxt[keep]
                if len(active) == 0:
                    state = None
                    yield finished
                    continue
                for cache in caches:
                    cache.batch_select_indices(keep)
                mask = self._trim(caches, mask[keep])
                positions = positions[keep]
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
            positions = positions + 1
            new_caches, new_logits = [], []
            for m, kw, cache in zip(self.models, self.cache_kwargs, caches):
                out = m(input_ids=nxt[:, None], attention_mask=mask, position_ids=positions,
                        use_cache=True, **{kw: cache})
                new_caches.append(_cache_of(out))
                new_logits.append(out.logits[:, -1, :].float())
            state = (new_caches, new_logits, mask, positions)
            yield finished
