"""The one decoding loop for masked-diffusion LMs; policies (``policies.py``) plug into it.

``decode`` runs any :class:`~toolkit.dllm.policies.Policy` on a batch of prompts. Prompts are
left-padded so every answer starts at the same column; padding is excluded from attention and
rotary positions count real tokens only, so a padded row computes what it would alone. Each row
keeps its own policy state, block, cache slots, random generator (``seed + row``) and counters;
rows whose plans coincide share one forward, and finished rows leave the batch.

Each step: every active row asks its policy for a plan; the model runs once per distinct plan;
for the rows' candidates (masked positions of the current block, or from the answer's start
to the block's end for ``llada``) the loop draws the prediction (argmax, or Gumbel-max at
``temperature`` > 0 with float64 noise as in the LLaDA reference), its probability
(confidence) and, if the policy wants it, the entropy; the policy picks what to commit. As in
the published samplers the prediction may be the mask token, unless the policy sets
``exclude_mask_token``: committing it leaves the position masked and is not counted as a
committed token. The policy says when a block is over (``block_done``); a row stops after its
last block, or (``stop_at_eos``) when it holds a committed EOS with every earlier answer
position committed: the positions after that EOS are set to EOS without being decoded. A row
whose policy gave up a block (the stall cap) is reported in ``stalled``; masks left in an
answer are counted in ``masks_left`` (before the first EOS) and stay in ``answers``.

Accounting is per row: full and cached forwards (with classifier-free guidance each step costs
two sequence forwards, both counted), tokens committed per step, positions recomputed versus
read from cache, answer tokens (up to and including the first EOS; never the prompt).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor

from toolkit.dllm.decode_result import DecodeResult, compare  # noqa: F401 (re-exported)
from toolkit.dllm.llada_model import KVCache
from toolkit.dllm.policies import DecodeInputError, Plan, Policy, RowState
from toolkit.dllm.registry import make_policy


def _config_value(model: Any, key: str) -> Any:
    cfg = getattr(model, "config", None)
    if isinstance(cfg, dict):
        return cfg.get(key)
    return getattr(cfg, key, None)


def _as_prompt_lists(prompts: list[list[int]] | Tensor) -> list[list[int]]:
    if isinstance(prompts, Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        if prompts.dim() != 2:
            raise DecodeInputError(f"prompt tensor must be (L,) or (B, L), got "
                                   f"{tuple(prompts.shape)}")
        return [[int(t) for t in row] for row in prompts.tolist()]
    if not prompts or not all(isinstance(p, (list, tuple)) for p in prompts):
        raise DecodeInputError("prompts must be a non-empty list of token-id lists or a tensor")
    return [[int(t) for t in p] for p in prompts]


class _Decoder:
    """State of one :func:`decode` call; see the module docstring."""

    def __init__(self, model: Any, prompts: list[list[int]], gen_length: int, policy: Policy,
                 mask_id: int, eos_id: int | None, pad_id: int, temperature: float,
                 cfg_scale: float, seed: int, device: torch.device, stop_at_eos: bool):
        self.model, self.policy, self.gen = model, policy, gen_length
        self.mask_id, self.eos_id = mask_id, eos_id
        self.temperature, self.cfg = temperature, cfg_scale
        self.stop_at_eos = stop_at_eos and eos_id is not None
        self.device = device
        self.lengths = [len(p) for p in prompts]
        b, p_max = len(prompts), max(self.lengths)
        self.b, self.p = b, p_max
        self.seq_len = p_max + gen_length
        x = torch.full((b, self.seq_len), pad_id, dtype=torch.long)
        am = torch.zeros(b, self.seq_len, dtype=torch.bool)
        for r, prompt in enumerate(prompts):
            x[r, p_max - len(prompt):p_max] = torch.tensor(prompt, dtype=torch.long)
            am[r, p_max - len(prompt):] = True
        x[:, p_max:] = mask_id
        self.x, self.am = x.to(device), am.to(device)
        self.pos = (self.am.long().cumsum(-1) - 1).clamp(min=0)
        self.prompt_region = self.am.clone()
        self.prompt_region[:, p_max:] = False
        needs_rng = temperature > 0 or policy.random_confidence
        self.gens = [torch.Generator(device=device).manual_seed(seed + r) if needs_rng else None
                     for r in range(b)]
        self.states: list[RowState] = [policy.new_state(gen_length) for _ in range(b)]
        for st in self.states:
            policy.begin_block(st)
        self.active = [True] * b
        self.cache: KVCache | None = None
        self.nfe_full, self.nfe_cached = [0] * b, [0] * b
        self.batch_full = self.batch_cached = 0
        self.tokens_per_step: list[list[int]] = [[] for _ in range(b)]
        self.computed, self.cached = [0] * b, [0] * b
        self.stopped = [False] * b
        self.remasked = [0] * b
        self.commit_nfe = torch.zeros(b, gen_length, dtype=torch.long, device=device)

    # -- forwards ---------------------------------------------------------------------------
    def _full_logits(self, rows: Tensor, store_cache: bool) -> Tensor:
        x, am, pos = self.x[rows], self.am[rows], self.pos[rows]
        if self.cfg > 0:
            # Unconditional branch: the prompt's real tokens replaced by masks (padding stays).
            uncond = x.masked_fill(self.prompt_region[rows], self.mask_id)
            x, am, pos = torch.cat((x, uncond)), torch.cat((am, am)), torch.cat((pos, pos))
        if getattr(self.model, "supports_kv_cache", False):
            out = self.model(x, attention_mask=am, position_ids=pos, use_cache=store_cache)
        elif bool(am.all()):
            out = self.model(x)
        else:
            out = self.model(x, attention_mask=am.long())
        logits = out.logits
        if store_cache:
            self._store_cache(rows, out.past_key_values)
        if self.cfg > 0:
            cond, uncond_logits = logits.chunk(2)
            logits = uncond_logits + (self.cfg + 1) * (cond - uncond_logits)
        return logits

    def _store_cache(self, rows: Tensor, new: KVCache) -> None:
        if rows.numel() == self.b:  # every row refreshed: the new cache replaces the old
            self.cache = new
            return
        if self.cache is None:
            self.cache = KVCache.empty_like(new, self.b)
        self.cache.write_rows(rows, new)

    def _shadow_logits(self, rows: Tensor, span: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """One forward of the rows plus a masked copy of answer ``span`` (WINO's shadow block).

        The copy holds mask tokens at the span's positions; copy j sees every real token of
        the sequence except its original (and itself), and nothing sees the copy, so the
        sequence's own logits are those of a plain forward and copy j predicts position j
        from its context without the token drafted there. Returns (sequence, copy) logits.
        """
        x, am, pos = self.x[rows], self.am[rows], self.pos[rows]
        n, length = x.shape
        lo, hi = self.p + span[0], self.p + span[1]
        width = hi - lo
        ext = torch.cat((x, torch.full((n, width), self.mask_id, dtype=x.dtype,
                                       device=self.device)), 1)
        ext_pos = torch.cat((pos, pos[:, lo:hi]), 1)
        keys = torch.cat((am, torch.zeros(n, width, dtype=torch.bool, device=self.device)), 1)
        pair = keys[:, None, :].repeat(1, length + width, 1)
        j = torch.arange(width, device=self.device)
        pair[:, length + j, length + j] = True
        pair[:, length + j, lo + j] = False
        logits = self.model(ext, attention_mask=pair, position_ids=ext_pos).logits
        return logits[:, :length], logits[:, length:]

    def _cached_logits(self, rows: Tensor, cols: Tensor) -> Tensor:
        assert self.cache is not None, "a cached forward was planned before any cache existed"
        whole = rows.numel() == self.b
        # All rows at once: splice into the batch cache directly; else into a copy of the rows.
        cache = self.cache if whole else self.cache.select_rows(rows)
        out = self.model(self.x[rows][:, cols], position_ids=self.pos[rows][:, cols],
                         past_key_values=cache, replace_position=cols, use_cache=True)
        if not whole:
            self.cache.write_rows(rows, cache)
        return out.logits

    # -- one step for the rows sharing a plan ------------------------------------------------
    def _run_group(self, plan: Plan, row_ids: list[int]) -> None:
        rows = torch.tensor(row_ids, device=self.device)
        shadow_logits = None
        if plan.shadow is not None:
            cols = torch.arange(self.seq_len, device=self.device)
            logits, shadow_logits = self._shadow_logits(rows, plan.shadow)
            self.batch_full += 1
        elif plan.full:
            cols = torch.arange(self.seq_len, device=self.device)
            logits = self._full_logits(rows, plan.store_cache)
            self.batch_full += 1
        else:
            cols = torch.cat([torch.arange(self.p + s, self.p + e, device=self.device)
                              for s, e in plan.spans])
            logits = self._cached_logits(rows, cols)
            self.batch_cached += 1
        states = [self.states[r] for r in row_ids]
        starts = torch.tensor([self.p + self.policy.candidate_start(s) for s in states],
                              device=self.device)
        ends = torch.tensor([self.p + s.block_end for s in states], device=self.device)
        tokens = self.x[rows][:, cols]
        cand = ((tokens == self.mask_id) & (cols >= starts[:, None]) & (cols < ends[:, None]))
        # Only the columns spanned by some candidate need probabilities (a scheduled step with
        # no candidate left still runs and is counted, as in the published loop: one dummy
        # column then keeps the shapes).
        hit = cand.any(0).nonzero()[:, 0]
        c0, c1 = (int(hit.min()), int(hit.max()) + 1) if hit.numel() else (0, 1)
        cand, logits, span_cols = cand[:, c0:c1], logits[:, c0:c1], cols[c0:c1]
        if self.policy.exclude_mask_token and self.mask_id < logits.shape[-1]:
            logits[..., self.mask_id] = -math.inf  # see policies.py: a departure, off by default
        logp = torch.log_softmax(logits.double(), dim=-1)
        n_real = self.am[rows][:, cols].sum(-1)
        noise_offset = cols.numel() - n_real
        if self.temperature > 0:
            # Gumbel-max: argmax(l - T·log(-log U)) == argmax(exp(l) / (-log U)^T).
            u = self._draw(row_ids, noise_offset, cols.numel(), c0, c1, logits.shape[-1])
            pred = (logits.double() - self.temperature * torch.log(-torch.log(u))).argmax(-1)
        else:
            pred = logits.argmax(-1)
        prob = logp.gather(-1, pred[..., None])[..., 0].exp()
        if self.policy.random_confidence:
            conf = self._draw(row_ids, noise_offset, cols.numel(), c0, c1, None)
        else:
            conf = prob
        entropy = torch.full((len(row_ids),), math.nan, dtype=torch.float64)
        ent = None
        if self.policy.needs_entropy:
            # entr(p) = -p·log p with entr(0) = 0 (an excluded mask token has p = 0).
            ent = torch.special.entr(logp.exp()).sum(-1)
            mean = (ent * cand).sum(-1) / cand.sum(-1).clamp(min=1)
            entropy = torch.where(cand.any(-1), mean, entropy.to(mean.device))
        commit = self.policy.select(states, conf, cand, ent) & cand
        self.x[rows[:, None], span_cols[None, :]] = torch.where(commit, pred, tokens[:, c0:c1])
        accepted = commit.sum(-1)
        # A committed mask-token prediction leaves the position masked: not a committed token.
        commit = commit & (pred != self.mask_id)
        if shadow_logits is not None:
            self._revoke(rows, row_ids, states, plan.shadow, tokens, shadow_logits, accepted)
        n_commit = commit.sum(-1).tolist()
        conf_sum = (prob * commit).sum(-1).tolist()
        n_real = n_real.tolist()
        cost = 2 if (plan.full and self.cfg > 0) else 1
        for i, r in enumerate(row_ids):
            if plan.full:
                self.nfe_full[r] += cost
            else:
                self.nfe_cached[r] += 1
            self.computed[r] += cost * n_real[i] + (shadow_logits.shape[1]
                                                    if shadow_logits is not None else 0)
            self.cached[r] += cost * (self.lengths[r] + self.gen - n_real[i])
            self.tokens_per_step[r].append(n_commit[i])
            self.policy.observe(self.states[r], n_commit[i], conf_sum[i], float(entropy[i]))
        step_no = torch.tensor([self.nfe_full[r] + self.nfe_cached[r] for r in row_ids],
                               device=self.device)
        ans = span_cols - self.p
        self.commit_nfe[rows[:, None], ans[None, :]] = torch.where(
            commit, step_no[:, None], self.commit_nfe[rows[:, None], ans[None, :]])

    def _revoke(self, rows: Tensor, row_ids: list[int], states: list, span: tuple[int, int],
                tokens: Tensor, shadow_logits: Tensor, accepted: Tensor) -> None:
        """Re-mask the drafted tokens of ``span`` that the policy no longer trusts.

        ``tokens`` are the rows' tokens before this step's commits: every unmasked position of
        the span was drafted earlier and is verified by its shadow copy's probability of it.
        ``accepted``: tokens each row drafted in this step.
        """
        lo, hi = self.p + span[0], self.p + span[1]
        before = tokens[:, lo:hi]
        drafted = before != self.mask_id
        if self.policy.exclude_mask_token and self.mask_id < shadow_logits.shape[-1]:
            shadow_logits[..., self.mask_id] = -math.inf
        vprob = torch.softmax(shadow_logits.double(), -1).gather(-1, before[..., None])[..., 0]
        remask = self.policy.verify(states, vprob, drafted, accepted) & drafted
        self.x[rows, lo:hi] = torch.where(remask, self.mask_id, self.x[rows, lo:hi])
        ans = slice(span[0], span[1])
        self.commit_nfe[rows, ans] = torch.where(remask, 0, self.commit_nfe[rows, ans])
        for i, r in enumerate(row_ids):
            self.remasked[r] += int(remask[i].sum())

    def _draw(self, row_ids: list[int], offset: Tensor, width: int, c0: int, c1: int,
              vocab: int | None) -> Tensor:
        """Uniform draws from each row's own generator over its real (unpadded) columns.

        Drawing over the whole row, as the reference does, keeps a padded row's random stream
        identical to the same prompt decoded alone; only columns ``c0:c1`` are returned.
        """
        out = []
        for i, r in enumerate(row_ids):
            off = int(offset[i])
            shape = (1, width - off) if vocab is None else (1, width - off, vocab)
            u = torch.rand(shape, generator=self.gens[r], dtype=torch.float64,
                           device=self.device)
            out.append(u[0, c0 - off:c1 - off])
        return torch.stack(out)

    # -- after every step --------------------------------------------------------------------
    def _advance(self) -> None:
        ans = self.x[:, self.p:]
        masked = ans == self.mask_id
        ids = [r for r in range(self.b) if self.active[r]]
        starts = torch.tensor([self.states[r].block_start for r in range(self.b)])
        ends = torch.tensor([self.states[r].block_end for r in range(self.b)])
        cols = torch.arange(self.gen)
        in_block = (cols >= starts[:, None]) & (cols < ends[:, None])
        left = (masked.cpu() & in_block).sum(-1).tolist()
        for r in ids:
            st = self.states[r]
            if self.policy.block_done(st, left[r]):
                self.policy.end_block(st)
                if st.block_end < self.gen:
                    self.policy.begin_block(st)
                else:
                    self.active[r] = False
        if not self.stop_at_eos:
            return
        big = torch.full_like(ans, self.gen)
        pos = torch.arange(self.gen, device=self.device).expand_as(ans)
        first_mask = torch.where(masked, pos, big).min(-1).values
        first_eos = torch.where(ans == self.eos_id, pos, big).min(-1).values
        act = torch.tensor(self.active, device=self.device)
        stop = act & (first_eos < first_mask)
        if bool(stop.any()):
            fill = stop[:, None] & (pos > first_eos[:, None])
            self.x[:, self.p:] = torch.where(fill, self.eos_id, ans)
            self.commit_nfe.masked_fill_(fill, 0)
            for r in stop.nonzero()[:, 0].tolist():
                self.active[r] = False
                self.stopped[r] = True

    def run(self) -> None:
        iterations = 0
        budget = self.policy.step_budget(self.gen)
        while any(self.active):
            # Policies end their blocks within their own caps (schedule, stall cap), so more
            # steps than the policy's budget is a bug in a policy, not a user error.
            iterations += 1
            if iterations > budget:
                raise RuntimeError(f"{self.policy.name}: still running after {budget} steps")
            groups: dict[Plan, list[int]] = {}
            for r in range(self.b):
                if self.active[r]:
                    groups.setdefault(self.policy.plan(self.states[r]), []).append(r)
            for plan, row_ids in groups.items():
                self._run_group(plan, row_ids)
            self._advance()


@torch.no_grad()
def decode(model: Any, prompts: list[list[int]] | Tensor, gen_length: int,
           policy: Policy | str, *, mask_id: int | None = None, eos_id: int | None = None,
           pad_id: int | None = None, temperature: float = 0.0, cfg_scale: float = 0.0,
           seed: int = 0, device: str | torch.device | None = None,
           stop_at_eos: bool = True) -> DecodeResult:
    """Decode ``gen_length`` answer tokens after each prompt with ``policy``.

    Args:
        model: A mask predictor returning ``.logits``; :class:`LLaDAModelLM` (or any model with
            ``supports_kv_cache``) is needed for cached policies.
        prompts: Token-id lists (any lengths; left-padded here) or an unpadded ``(B, L)``
            tensor.
        gen_length: Answer length in tokens.
        policy: A :class:`Policy` or the name of one (``llada``, ``fastdllm``, ``adaptive``,
            ``eb``, ``wino``).
        mask_id: Mask token id; default the model config's ``mask_token_id``.
        eos_id: EOS id for the early stop; default the config's ``eos_token_id``.
        pad_id: Left-padding id (never attended); default the config's ``pad_token_id``, else
            ``eos_id``, else 0.
        temperature: Gumbel-max sampling temperature; 0 is greedy.
        cfg_scale: Classifier-free guidance scale (policies without a cache only).
        seed: Row ``r`` draws its random numbers from a generator seeded ``seed + r``.
        device: Where to decode; default the model's device.
        stop_at_eos: Stop a row at a committed EOS whose predecessors are all committed.

    Returns:
        A :class:`DecodeResult`.

    Raises:
        ValueError: For a model without a mask token, a prompt plus answer longer than the
            model's context, lengths the policy cannot split, or CFG with a cached policy.
    """
    if isinstance(policy, str):
        policy = make_policy(policy)
    if mask_id is None:
        mask_id = _config_value(model, "mask_token_id")
    if mask_id is None:
        raise DecodeInputError("the model has no mask token (its config has no mask_token_id): "
                         "diffusion decoding needs one; pass mask_id= for a model that has one")
    if eos_id is None:
        eos_id = _config_value(model, "eos_token_id")
    if pad_id is None:
        pad_id = _config_value(model, "pad_token_id")
        pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
    prompt_lists = _as_prompt_lists(prompts)
    policy.validate(gen_length)
    context = (_config_value(model, "max_sequence_length")
               or _config_value(model, "max_position_embeddings"))
    longest = max(len(p) for p in prompt_lists)
    if context is not None and longest + gen_length > context:
        raise DecodeInputError(f"prompt of {longest} tokens + gen_length {gen_length} = "
                         f"{longest + gen_length} exceeds the model's context of {context} "
                         "tokens (max_sequence_length)")
    if policy.uses_shadow and (cfg_scale > 0 or not getattr(model, "supports_kv_cache", False)):
        raise DecodeInputError(f"policy {policy.name} needs an LLaDAModelLM (a (B, T, T) "
                               "attention mask for its shadow block) and cfg_scale 0")
    if cfg_scale > 0 and policy.uses_cache:
        raise DecodeInputError(f"cfg_scale > 0 needs a policy without a KV cache; {policy.name} "
                               "uses one (choose cache='none' or the llada policy)")
    if policy.uses_cache and not getattr(model, "supports_kv_cache", False):
        raise DecodeInputError(f"policy {policy.name} uses a KV cache, which "
                         f"{type(model).__name__} does not support (use cache='none')")
    if device is None:
        device = next(model.parameters()).device if hasattr(model, "parameters") else "cpu"
    device = torch.device(device)
    start = time.perf_counter()
    dec = _Decoder(model, prompt_lists, gen_length, policy, int(mask_id),
                   None if eos_id is None else int(eos_id), int(pad_id), temperature,
                   cfg_scale, seed, device, stop_at_eos)
    dec.run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    answers = dec.x[:, dec.p:].clone()
    answer_tokens, masks_left = [], []
    for r in range(dec.b):
        eos_at = (answers[r] == eos_id).nonzero() if eos_id is not None else answers[r][:0]
        answer_tokens.append(int(eos_at[0, 0]) + 1 if len(eos_at) else gen_length)
        masks_left.append(int((answers[r, :answer_tokens[-1]] == mask_id).sum()))
    return DecodeResult(
        sequences=dec.x, answers=answers, prompt_lengths=dec.lengths, gen_length=gen_length,
        policy=policy.config(), nfe_full=dec.nfe_full, nfe_cached=dec.nfe_cached,
        batch_forwards_full=dec.batch_full, batch_forwards_cached=dec.batch_cached,
        tokens_per_step=dec.tokens_per_step,
        block_sizes=[st.block_sizes for st in dec.states],
        thresholds=[st.thresholds for st in dec.states],
        adaptations=[st.adaptations for st in dec.states],
        positions_computed=dec.computed, positions_cached=dec.cached,
        answer_tokens=answer_tokens, stopped_at_eos=dec.stopped,
        stalled=[st.stalled for st in dec.states], masks_left=masks_left,
        remasked=dec.remasked,
        commit_nfe=dec.commit_nfe,
        wall_time_s=wall)
