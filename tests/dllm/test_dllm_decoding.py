"""The one decoding loop and its policies: reference conformance, parallel decoding, batching,
EOS stop, accounting, per-row adaptation, the seed's API, and input errors."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from toolkit.dllm import (
    PRESETS,
    AdaptiveInferenceScheduler,
    AdaptivePolicy,
    FastDLLMPolicy,
    LLaDAConfig,
    LLaDAModelLM,
    LLaDAPolicy,
    TieredCacheManager,
    compare,
    compare_generation_methods,
    decode,
    generate_adaptive,
    generate_with_adaptive_scheduling,
    generate_with_custom_scheduler,
)
from toolkit.dllm.peer_policies import EntropyBoundedPolicy, WinoPolicy
from toolkit.dllm.policies import Plan, select_factor, select_threshold, select_top_k

torch.set_num_threads(1)
VOCAB = 64
MASK, EOS = VOCAB - 1, VOCAB - 2
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13, 14, 15, 16]]


def config(mask: int | None = MASK) -> LLaDAConfig:
    return LLaDAConfig(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=64,
                       vocab_size=VOCAB, max_sequence_length=96, mask_token_id=mask,
                       eos_token_id=EOS, pad_token_id=EOS)


def make_model(scale: float = 100.0, seed: int = 0, cls: type = LLaDAModelLM) -> LLaDAModelLM:
    """Tiny random float64 model; scaling the output head makes its predictions confident
    enough (and different enough between prompts) for thresholds and adaptation to matter."""
    model = LLaDAModelLM.from_config(config(), seed=seed, dtype=torch.float64)
    with torch.no_grad():
        model.model.transformer.ff_out.weight.mul_(scale)
    if cls is not LLaDAModelLM:
        other = cls(config()).to(torch.float64)
        other.load_state_dict(model.state_dict())
        model = other
    return model.eval()


@pytest.fixture(scope="module")
def model() -> LLaDAModelLM:
    return make_model()


@torch.no_grad()
def naive_llada(model, prompt, steps, gen_length, block_length, remasking, temperature,
                cfg_scale, gen, mask=MASK):
    """The published LLaDA sampler, step by step, written plainly for comparison.

    The argmax may be the mask token (the position then stays masked), confidence is the plain
    softmax, every masked position before the block's end is a candidate, and every scheduled
    step runs its forward.
    """
    MASK = mask  # noqa: N806 (the sampler's name for the mask id)
    n = len(prompt)
    x = torch.full((1, n + gen_length), MASK, dtype=torch.long)
    x[0, :n] = torch.tensor(prompt)
    steps_per_block = steps // (gen_length // block_length)
    forwards = 0
    for block in range(gen_length // block_length):
        lo, hi = n + block * block_length, n + (block + 1) * block_length
        masked = int((x[0, lo:hi] == MASK).sum())
        counts = [masked // steps_per_block + (1 if i < masked % steps_per_block else 0)
                  for i in range(steps_per_block)]
        for i in range(steps_per_block):
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[0, :n] = MASK
                both = model(torch.cat([x, un_x])).logits
                logits = both[1:] + (cfg_scale + 1) * (both[:1] - both[1:])
            else:
                logits = model(x).logits
            forwards += 1
            if temperature > 0:
                u = torch.rand(logits.shape, generator=gen, dtype=torch.float64)
                x0 = (logits.double().exp() / (-torch.log(u)) ** temperature).argmax(-1)
            else:
                x0 = logits.argmax(-1)
            if remasking == "low_confidence":
                p = F.softmax(logits.double(), dim=-1)
                x0_p = p.gather(-1, x0[..., None])[..., 0]
            else:
                x0_p = torch.rand(x0.shape, generator=gen, dtype=torch.float64)
            x0_p[:, hi:] = -float("inf")
            is_mask = x == MASK
            x0 = torch.where(is_mask, x0, x)
            confidence = torch.where(is_mask, x0_p, torch.tensor(-float("inf")))
            _, chosen = torch.topk(confidence[0], k=counts[i])
            x[0, chosen] = x0[0, chosen]
    return x, forwards


@pytest.mark.parametrize("remasking,temperature,cfg", [
    ("low_confidence", 0.0, 0.0), ("random", 0.0, 0.0), ("low_confidence", 0.7, 0.0),
    ("low_confidence", 0.0, 1.5)])
@pytest.mark.parametrize("steps,block_length", [(16, 4), (12, 8)])
def test_llada_policy_equals_naive_reference(remasking, temperature, cfg, steps, block_length):
    model = make_model(scale=30.0, seed=1)
    prompt = [3, 9, 4, 1, 7]
    ref, forwards = naive_llada(model, prompt, steps, 16, block_length, remasking, temperature,
                                cfg, torch.Generator().manual_seed(5))
    out = decode(model, [prompt], 16, LLaDAPolicy(steps, block_length, remasking),
                 temperature=temperature, cfg_scale=cfg, seed=5, stop_at_eos=False)
    assert torch.equal(out.sequences, ref)
    assert out.nfe_full == [forwards * (2 if cfg else 1)] and out.nfe_cached == [0]
    assert out.cache_hit_rate == 0.0


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_threshold_above_one_commits_exactly_one_token_per_step(model, cache):
    out = decode(model, PROMPTS[:2], 16, FastDLLMPolicy(8, threshold=1.0 + 1e-9, cache=cache),
                 stop_at_eos=False)
    assert all(n == 1 for row in out.tokens_per_step for n in row)
    assert out.nfe == [16, 16]
    assert out.nfe_full == ([16, 16] if cache == "none" else [2, 2])


def test_selection_rules():
    conf = torch.tensor([[0.95, 0.5, 0.91, 0.2], [0.3, 0.1, 0.2, 0.99]], dtype=torch.float64)
    cand = torch.tensor([[True, True, True, True], [True, True, True, False]])
    assert select_threshold(conf, cand, torch.tensor([0.9, 0.9])).tolist() == [
        [True, False, True, False], [True, False, False, False]]  # forced top-1 in row 1
    assert select_top_k(conf, cand, torch.tensor([3, 2])).tolist() == [
        [True, True, True, False], [True, False, True, False]]
    # factor 1: n=2 needs c2 ≥ 1 - 1/3, n=3 needs c3 ≥ 1 - 1/4 (0.5 fails).
    assert select_factor(conf, cand, 1.0).tolist() == [
        [True, False, True, False], [True, False, False, False]]


def test_threshold_and_factor_decode_in_parallel(model):
    for policy in (FastDLLMPolicy(8, threshold=0.9), FastDLLMPolicy(8, factor=1.0)):
        out = decode(model, PROMPTS, 32, policy, stop_at_eos=False)
        assert out.mean_tokens_per_step > 1.0
        assert all(sum(row) == 32 for row in out.tokens_per_step)


POLICIES = {
    "llada": lambda: LLaDAPolicy(steps=32, block_length=8),
    "fastdllm-prefix": lambda: FastDLLMPolicy(8, cache="prefix"),
    "fastdllm-dual": lambda: FastDLLMPolicy(8, cache="dual"),
    "fastdllm-factor": lambda: FastDLLMPolicy(8, factor=1.0, cache="dual"),
    "adaptive": lambda: AdaptivePolicy(base_block_size=8, min_block_size=4, max_block_size=16),
    "adaptive-no-tiers": lambda: AdaptivePolicy(base_block_size=8, min_block_size=4,
                                                max_block_size=16, tiered_cache=False,
                                                cache="dual"),
    # Static blocks and a dual cache keep rows in shared forwards while their τ diverge.
    "adaptive-threshold-only": lambda: AdaptivePolicy(base_block_size=8, dynamic_block=False,
                                                      tiered_cache=False, cache="dual"),
    "eb-prefix": lambda: EntropyBoundedPolicy(8, gamma=0.5),
    "eb-dual": lambda: EntropyBoundedPolicy(8, gamma=0.5, cache="dual"),
    "wino": lambda: WinoPolicy(8, draft_threshold=0.3, verify_threshold=0.9),
}


@pytest.mark.parametrize("name", list(POLICIES))
def test_batch_with_left_padding_equals_single_runs(model, name):
    batch = decode(model, PROMPTS, 32, POLICIES[name](), stop_at_eos=False)
    for r, prompt in enumerate(PROMPTS):
        alone = decode(model, [prompt], 32, POLICIES[name](), stop_at_eos=False)
        assert torch.equal(batch.answers[r], alone.answers[0])
        assert batch.nfe_full[r] == alone.nfe_full[0]
        assert batch.nfe_cached[r] == alone.nfe_cached[0]
        assert batch.tokens_per_step[r] == alone.tokens_per_step[0]
        assert batch.block_sizes[r] == alone.block_sizes[0]
        assert batch.thresholds[r] == alone.thresholds[0]
    if name.startswith("adaptive"):
        # Per-row state: the rows adapted differently, so sharing any state would have failed.
        assert len({tuple(t) for t in batch.thresholds}) > 1
        if name != "adaptive-no-tiers":  # τ moves (the candidates' entropy is finite)
            assert any(t != 0.8 for row in batch.thresholds for t in row)
    if name == "adaptive":
        assert len({tuple(b) for b in batch.block_sizes}) > 1


def test_batch_sampling_uses_one_generator_per_row(model):
    policy = LLaDAPolicy(steps=16, block_length=8, remasking="random")
    batch = decode(model, PROMPTS, 16, policy, temperature=0.8, seed=3, stop_at_eos=False)
    for r, prompt in enumerate(PROMPTS):
        alone = decode(model, [prompt], 16, policy, temperature=0.8, seed=3 + r,
                       stop_at_eos=False)
        assert torch.equal(batch.answers[r], alone.answers[0])


class EosAtPosition12(LLaDAModelLM):
    """EOS wins (and nothing else can be EOS) exactly at rotary position 12."""

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        out = super().forward(input_ids, attention_mask, position_ids, **kwargs)
        assert position_ids is not None
        out.logits[..., EOS] += torch.where(position_ids == 12, 1e3, -1e3)
        self.batch_sizes.append(input_ids.shape[0])
        return out


@pytest.mark.parametrize("policy", [LLaDAPolicy(steps=16, block_length=4),
                                    FastDLLMPolicy(4, cache="dual")])
def test_eos_stops_a_row_and_fills_the_rest(policy):
    model = make_model(cls=EosAtPosition12)
    prompts = [[1, 2, 3, 4], list(range(1, 11))]  # EOS at answer index 8 and 2
    model.batch_sizes = []
    free = decode(model, prompts, 16, policy, stop_at_eos=False)
    model.batch_sizes = []
    out = decode(model, prompts, 16, policy)
    assert out.stopped_at_eos == [True, True]
    for r, j in enumerate((8, 2)):
        assert out.answers[r, j] == EOS and bool((out.answers[r, :j] != EOS).all())
        assert bool((out.answers[r, :j] != MASK).all())  # stopped only once all before j done
        assert bool((out.answers[r, j:] == EOS).all())
        assert bool((out.commit_nfe[r, j + 1:] == 0).all())  # filled, not decoded
        assert out.nfe[r] < free.nfe[r]
        assert out.answer_tokens[r] == j + 1
    # Row 1 stops first; later forwards carry only row 0.
    assert model.batch_sizes[out.nfe[1]:] == [1] * (len(model.batch_sizes) - out.nfe[1])
    if policy.name == "llada":
        assert out.nfe[0] == 9  # two blocks of 4 steps, then EOS is block 2's first commit


class PrefersMask(LLaDAModelLM):
    """Puts the mask token on top everywhere."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits[..., MASK] += 1e3
        return out


def test_mask_token_guard_is_an_option_and_the_default_stalls():
    model = make_model(cls=PrefersMask)
    guarded = decode(model, PROMPTS[:2], 16,
                     FastDLLMPolicy(8, cache="dual", exclude_mask_token=True), stop_at_eos=False)
    assert not bool((guarded.answers == MASK).any()) and guarded.stalled == [False, False]
    assert all(n <= 16 for n in guarded.nfe)
    # Published behaviour: the mask token is the argmax everywhere, so nothing is ever
    # unmasked; each block is given up after block_length forwards and the row is stalled.
    out = decode(model, PROMPTS[:2], 16, FastDLLMPolicy(8, cache="dual"), stop_at_eos=False)
    assert bool((out.answers == MASK).all()) and out.stalled == [True, True]
    assert out.nfe == [16, 16] and out.masks_left == [16, 16]
    assert all(n == 0 for row in out.tokens_per_step for n in row)
    llada = decode(model, PROMPTS[:2], 16, LLaDAPolicy(8, 8), stop_at_eos=False)
    assert llada.nfe == [8, 8] and llada.masks_left == [16, 16] and llada.stalled == [False] * 2


def test_accounting(model):
    llada = decode(model, PROMPTS, 32, LLaDAPolicy(32, 8), stop_at_eos=False)
    prefix = decode(model, PROMPTS, 32, FastDLLMPolicy(8, cache="prefix"), stop_at_eos=False)
    dual = decode(model, PROMPTS, 32, FastDLLMPolicy(8, cache="dual"), stop_at_eos=False)
    tiered = decode(model, PROMPTS, 32, AdaptivePolicy(), stop_at_eos=False)
    assert llada.nfe == [32] * 4 and llada.batch_nfe == 32 and llada.cache_hit_rate == 0.0
    assert prefix.nfe_full == [4] * 4 and min(prefix.nfe_cached) > 0
    assert 0 < prefix.cache_hit_rate < dual.cache_hit_rate < 1
    assert tiered.nfe_full == [1] * 4 and tiered.cache_hit_rate > 0
    for res in (llada, prefix, dual, tiered):
        assert [sum(row) for row in res.tokens_per_step] == [32] * 4
        first_eos = [(row == EOS).nonzero()[:1, 0].tolist() for row in res.answers]
        assert res.answer_tokens == [e[0] + 1 if e else 32 for e in first_eos]
        assert int(res.commit_nfe.min()) >= 1 and res.tokens_per_second > 0
    stats = compare(llada, prefix)
    assert stats["nfe_reduction_percent"] == pytest.approx(
        100 * (1 - sum(prefix.nfe) / sum(llada.nfe)))
    assert stats["speedup"] == pytest.approx(llada.wall_time_s / prefix.wall_time_s)
    assert set(prefix.metrics()) >= {"nfe", "nfe_full", "nfe_cached", "cache_hit_rate",
                                     "tokens_per_second", "mean_block_size", "wall_time_s"}


def test_adaptive_rules_and_ablation_switches():
    pol = AdaptivePolicy()
    st = pol.new_state(64)
    pol.begin_block(st)
    assert (st.block_start, st.block_end, st.tau) == (0, 16, 0.8)
    assert pol.plan(st) == Plan(full=True, store_cache=True)
    assert pol.plan(st).spans == ((0, 16),) and pol.plan(st).spans == ((0, 16),)
    assert pol.plan(st).spans == ((0, 64),)  # every 3rd step: stable tier and suffix too
    pol.observe(st, 16, 16 * 0.97, entropy=3.0)  # high entropy: τ ← τ·(1 + rate/2)
    assert st.tau == pytest.approx(0.88)
    pol.end_block(st)  # confident block: grows by (1 + rate), becomes tier 2
    assert st.block_size == 19 and st.stable == [(0, 16)] and st.recent is None
    pol.begin_block(st)
    assert pol.plan(st).spans == ((16, 35),)
    pol.observe(st, 1, 0.3, entropy=0.1)
    assert st.tau == pytest.approx(0.88 * 0.9)
    pol.end_block(st)  # unsure block stays active (tier 3) for one more block
    # Window mean (0.97 + 0.3) / 2 < 0.7: the next block shrinks by (1 - rate).
    assert st.recent == (16, 35) and st.block_size == 15
    frozen = AdaptivePolicy(dynamic_block=False, adaptive_threshold=False)
    st = frozen.new_state(64)
    frozen.begin_block(st)
    frozen.observe(st, 1, 0.1, entropy=9.0)
    frozen.end_block(st)
    assert (st.block_size, st.tau, st.adaptations) == (16, 0.8, 0)
    assert AdaptivePolicy.from_preset("math").base_block_size == 8
    assert PRESETS["creative"] == {"base_block_size": 32, "base_threshold": 0.7,
                                   "adaptation_rate": 0.3}


def test_plain_model_without_cache_plugs_in(model):
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model
            self.config = {"mask_token_id": MASK, "eos_token_id": EOS}

        def forward(self, input_ids, attention_mask=None):
            return SimpleNamespace(logits=self.inner(input_ids, attention_mask).logits)

    plain = decode(Plain(), PROMPTS, 16, LLaDAPolicy(16, 8), stop_at_eos=False)
    ours = decode(model, PROMPTS, 16, LLaDAPolicy(16, 8), stop_at_eos=False)
    assert torch.equal(plain.answers, ours.answers)
    with pytest.raises(ValueError, match="KV cache"):
        decode(Plain(), PROMPTS, 16, FastDLLMPolicy(8))


def test_seed_api(model):
    prompt = torch.tensor([PROMPTS[1]])
    out, nfe = generate_adaptive(model, prompt, gen_length=32)
    assert out.shape == (1, 7 + 32) and torch.equal(out[:, :7], prompt) and nfe >= 1
    out, metrics = generate_with_adaptive_scheduling(model, prompt, gen_length=32,
                                                     base_block_size=8)
    assert {"nfe", "total_adaptations", "avg_block_size"} <= set(metrics)
    assert 0 < metrics["cache_efficiency"]["cache_hit_rate"] < 1
    sched = AdaptiveInferenceScheduler(min_block_size=4, max_block_size=32,
                                       base_confidence_threshold=0.85,
                                       adaptation_sensitivity=0.25, confidence_window=3)
    out2, metrics2 = generate_with_custom_scheduler(
        model, prompt, sched, TieredCacheManager(tier2_stability_threshold=0.9), gen_length=32)
    assert out2.shape == out.shape and metrics2["nfe"] >= 1
    result = compare_generation_methods(model, prompt, gen_length=32)
    assert {"speedup", "nfe_reduction_percent"} <= set(result)


def test_bad_inputs_raise_clear_errors(model):
    with pytest.raises(ValueError, match="multiple of block_length"):
        decode(model, PROMPTS, 30, LLaDAPolicy(30, 8))
    with pytest.raises(ValueError, match="steps 6 must be a positive multiple"):
        decode(model, PROMPTS, 32, LLaDAPolicy(6, 8))
    with pytest.raises(ValueError, match="multiple of block_length"):
        decode(model, PROMPTS, 20, FastDLLMPolicy(32))
    no_mask = LLaDAModelLM.from_config(config(mask=None), seed=0).eval()
    with pytest.raises(ValueError, match="no mask token"):
        decode(no_mask, PROMPTS, 16, LLaDAPolicy(16, 8))
    with pytest.raises(ValueError, match="exceeds the model's context of 96"):
        decode(model, [list(range(90))], 16, LLaDAPolicy(16, 8))
    with pytest.raises(ValueError, match="cfg_scale"):
        decode(model, PROMPTS, 16, FastDLLMPolicy(8), cfg_scale=1.0)
    with pytest.raises(ValueError, match="prompts"):
        decode(model, [], 16, LLaDAPolicy(16, 8))
    with pytest.raises(ValueError, match="remasking"):
        LLaDAPolicy(16, 8, remasking="entropy")
    with pytest.raises(ValueError, match="unknown preset"):
        AdaptivePolicy.from_preset("poetry")
    # The same errors are UserErrors: cli.py prints them as one `error: ...` line.
    from toolkit.common.errors import UserError
    from toolkit.dllm.policies import DecodeInputError

    with pytest.raises(DecodeInputError) as info:
        decode(model, PROMPTS, 20, FastDLLMPolicy(32))
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)


# -- the published samplers on the shipped reference fixture --------------------------------
# The fixture's random weights put the mask token on top at many positions: the case where the
# published samplers leave a position masked.
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "llada_tiny"
FX_MASK = 319


@pytest.fixture(scope="module")
def fixture_model() -> LLaDAModelLM:
    return LLaDAModelLM.from_pretrained(FIXTURE).eval()


@torch.no_grad()
def naive_fastdllm(model, prompt, gen_length, block_length, threshold, cache):
    """Fast-dLLM's published threshold sampler (no cache, prefix or dual cache), step by step.

    Each block: a full forward (keeping K/V for a cache), then while the block holds a mask,
    a forward (full, or the block and everything after it on the prefix cache, or the block
    alone spliced into the full cache), argmax (the mask token allowed), plain-softmax
    confidence of the masked positions of the block, the most confident one and every other
    with confidence ≥ threshold take their prediction. Where the published loop would never
    end, the block is given up after block_length forwards (the declared cap).
    """
    n = len(prompt)
    x = torch.full((1, n + gen_length), FX_MASK, dtype=torch.long)
    x[0, :n] = torch.tensor(prompt)
    nfe, stalled = 0, False
    for b in range(gen_length // block_length):
        lo, hi = n + b * block_length, n + (b + 1) * block_length
        forwards, past = 0, None
        while bool((x[0, lo:hi] == FX_MASK).any()) and forwards < block_length:
            if cache == "none" or forwards == 0:
                out = model(x, use_cache=cache != "none")
                logits = out.logits[0, lo:hi]
                past = out.past_key_values
                if cache == "prefix":
                    past = past.truncate(lo)
            elif cache == "prefix":
                logits = model(x[:, lo:], past_key_values=past).logits[0, :hi - lo]
            else:
                logits = model(x[:, lo:hi], past_key_values=past,
                               replace_position=slice(lo, hi)).logits[0]
            forwards += 1
            nfe += 1
            x0 = logits.argmax(-1)
            p = F.softmax(logits.double(), dim=-1)
            x0_p = p.gather(-1, x0[:, None])[:, 0]
            masked = x[0, lo:hi] == FX_MASK
            confidence = torch.where(masked, x0_p, torch.tensor(-float("inf")))
            order = torch.argsort(confidence, descending=True)
            transfer = torch.zeros(hi - lo, dtype=torch.bool)
            transfer[order[0]] = True
            for k in order[1:int(masked.sum())].tolist():
                if confidence[k] >= threshold:
                    transfer[k] = True
            x[0, lo:hi] = torch.where(transfer, x0, x[0, lo:hi])
        stalled |= bool((x[0, lo:hi] == FX_MASK).any())
    return x, nfe, stalled


# Prompts under which the fixture's first forward puts the mask token on top at 7, 2 and 3 of
# the 16 answer positions.
FX_PROMPTS = [[51, 180, 66, 259, 172, 303, 220, 245, 60], [301, 217, 177, 113, 8, 144, 273, 142],
              [296, 48, 31, 199, 141, 39, 40]]


def test_fixture_argmax_is_often_the_mask_token(fixture_model):
    for prompt, count in zip(FX_PROMPTS, (7, 2, 3)):
        x = torch.tensor([prompt + [FX_MASK] * 16])
        with torch.no_grad():
            pred = fixture_model(x).logits.argmax(-1)[0, len(prompt):]
        assert int((pred == FX_MASK).sum()) == count  # the case the tests below must cover


@pytest.mark.parametrize("steps,block_length", [(16, 8), (32, 8), (8, 16)])
def test_llada_default_equals_published_loop_on_fixture(fixture_model, steps, block_length):
    for prompt in FX_PROMPTS:
        ref, forwards = naive_llada(fixture_model, prompt, steps, 16, block_length,
                                    "low_confidence", 0.0, 0.0, None, mask=FX_MASK)
        out = decode(fixture_model, [prompt], 16, LLaDAPolicy(steps, block_length),
                     stop_at_eos=False)
        assert torch.equal(out.sequences, ref)
        assert out.nfe == [forwards] == [steps]
        assert out.masks_left == [int((ref[0, len(prompt):] == FX_MASK).sum())]
    # The options depart from it: no mask token, and no forward for an empty scheduled step.
    guarded = decode(fixture_model, FX_PROMPTS, 16, LLaDAPolicy(32, 8, exclude_mask_token=True,
                                                               skip_empty_steps=True),
                     stop_at_eos=False)
    assert guarded.masks_left == [0, 0, 0] and guarded.nfe == [16, 16, 16]


def test_fixture_batch_with_left_padding_equals_single_runs(fixture_model):
    for policy in (LLaDAPolicy(16, 8), FastDLLMPolicy(8, threshold=0.3, cache="dual")):
        batch = decode(fixture_model, FX_PROMPTS, 16, policy, stop_at_eos=False)
        for r, prompt in enumerate(FX_PROMPTS):
            alone = decode(fixture_model, [prompt], 16, policy, stop_at_eos=False)
            assert torch.equal(batch.answers[r], alone.answers[0])
            assert batch.nfe[r] == alone.nfe[0] and batch.stalled[r] == alone.stalled[0]


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("threshold", [0.05, 0.3, 0.9])
def test_fastdllm_default_equals_published_loop_on_fixture(fixture_model, cache, threshold):
    stalls = 0
    for prompt in FX_PROMPTS:
        ref, nfe, stalled = naive_fastdllm(fixture_model, prompt, 16, 8, threshold, cache)
        out = decode(fixture_model, [prompt], 16, FastDLLMPolicy(8, threshold, cache=cache),
                     stop_at_eos=False)
        assert torch.equal(out.sequences, ref)
        assert out.nfe == [nfe] and out.stalled == [stalled]
        stalls += stalled
    if threshold == 0.9:
        assert stalls > 0  # the capped case is exercised


# -- peers: entropy-bounded and WINO-style revocable decoding ---------------------------------
@torch.no_grad()
def naive_eb(model, prompt, gen_length, block_length, gamma, mask):
    """Entropy-bounded unmasking, full forwards: per step, the block's masked positions in
    decreasing confidence are unmasked while their summed entropy stays ≤ gamma (at least one);
    a block is given up after block_length forwards."""
    n = len(prompt)
    x = torch.full((1, n + gen_length), mask, dtype=torch.long)
    x[0, :n] = torch.tensor(prompt)
    nfe = 0
    for b in range(gen_length // block_length):
        lo, hi = n + b * block_length, n + (b + 1) * block_length
        forwards = 0
        while bool((x[0, lo:hi] == mask).any()) and forwards < block_length:
            logits = model(x).logits[0, lo:hi]
            forwards += 1
            nfe += 1
            p = F.softmax(logits.double(), dim=-1)
            x0 = logits.argmax(-1)
            conf = p.gather(-1, x0[:, None])[:, 0]
            ent = -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(-1)
            masked = [j for j in range(hi - lo) if x[0, lo + j] == mask]
            chosen, total = [], 0.0
            for j in sorted(masked, key=lambda j: -float(conf[j])):
                if chosen and total + float(ent[j]) > gamma:
                    break
                chosen.append(j)
                total += float(ent[j])
            for j in chosen:
                x[0, lo + j] = x0[j]
    return x, nfe


@torch.no_grad()
def naive_wino(model, prompt, gen_length, block_length, t_draft, t_verify, mask, guard=False):
    """WINO-style decoding, per step: one forward of the sequence plus a masked copy of the
    block (copy j sees every token but position j's); draft each masked position with
    confidence ≥ t_draft (at least the most confident), and re-mask each earlier draft whose
    copy gives it probability < t_verify. A block is given up after 2 × block_length forwards.

    ``guard``: as WINO's released code: at most min(max(int(0.7 · masked), 5), 20) drafts (the
    most confident); no re-masking after a step that drafted one token; and if as many would
    be re-masked as the previous step drafted (30 before a block's first step), only that
    count − 1, the least confident."""
    n = len(prompt)
    x = torch.full((1, n + gen_length), mask, dtype=torch.long)
    x[0, :n] = torch.tensor(prompt)
    nfe = remasked = 0
    for b in range(gen_length // block_length):
        lo, hi = n + b * block_length, n + (b + 1) * block_length
        width, length = hi - lo, x.shape[1]
        forwards, last_accept = 0, 30
        while bool((x[0, lo:hi] == mask).any()) and forwards < 2 * block_length:
            ext = torch.cat((x, torch.full((1, width), mask)), 1)
            pos = torch.tensor([list(range(length)) + list(range(lo, hi))])
            allowed = torch.zeros(1, length + width, length + width, dtype=torch.bool)
            allowed[0, :, :length] = True
            for j in range(width):
                allowed[0, length + j, length + j] = True
                allowed[0, length + j, lo + j] = False
            logits = model(ext, attention_mask=allowed, position_ids=pos).logits[0]
            forwards += 1
            nfe += 1
            before = x[0, lo:hi].clone()
            p = F.softmax(logits[lo:hi].double(), dim=-1)
            x0 = logits[lo:hi].argmax(-1)
            conf = p.gather(-1, x0[:, None])[:, 0]
            masked = [j for j in range(width) if before[j] == mask]
            best = max(masked, key=lambda j: float(conf[j]))
            drafts = [j for j in masked if j == best or conf[j] >= t_draft]
            if guard:
                cap = min(max(int(len(masked) * 0.7), 5), 20)
                drafts = sorted(drafts, key=lambda j: -float(conf[j]))[:cap]
            for j in drafts:
                x[0, lo + j] = x0[j]
            shadow = F.softmax(logits[length:].double(), dim=-1)
            low = [j for j in range(width)
                   if before[j] != mask and shadow[j, before[j]] < t_verify]
            if guard:
                if len(drafts) <= 1:
                    low = []
                elif len(low) >= last_accept:
                    low = sorted(low, key=lambda j: float(shadow[j, before[j]]))[:last_accept - 1]
                last_accept = len(drafts)
            for j in low:
                x[0, lo + j] = mask
                remasked += 1
    return x, nfe, remasked


@pytest.mark.parametrize("gamma", [0.01, 1.0, 3.0])
def test_entropy_bounded_equals_naive_transcription(gamma, model, fixture_model):
    cases = [(model, [[3, 9, 4, 1, 7], [5, 2]], MASK),
             (fixture_model, FX_PROMPTS[:2], FX_MASK)]
    parallel = False
    for model, prompts, mask in cases:
        for prompt in prompts:
            ref, nfe = naive_eb(model, prompt, 16, 8, gamma, mask)
            out = decode(model, [prompt], 16, EntropyBoundedPolicy(8, gamma, cache="none"),
                         stop_at_eos=False)
            assert torch.equal(out.sequences, ref) and out.nfe == [nfe]
            parallel |= out.mean_tokens_per_step > 1
    assert parallel == (gamma > 0.01)


@pytest.mark.parametrize("guard", [True, False])
@pytest.mark.parametrize("t_draft,t_verify", [(0.0, 0.5), (0.3, 0.9), (0.9, 0.9)])
def test_wino_equals_naive_transcription(t_draft, t_verify, guard, fixture_model):
    cases = [(make_model(scale=30.0, seed=1), [[3, 9, 4, 1, 7], [5, 2]], MASK),
             (fixture_model, FX_PROMPTS[:2], FX_MASK)]
    revoked = 0
    for model, prompts, mask in cases:
        for prompt in prompts:
            ref, nfe, remasked = naive_wino(model, prompt, 16, 8, t_draft, t_verify, mask,
                                            guard)
            out = decode(model, [prompt], 16,
                         WinoPolicy(8, t_draft, t_verify, progress_guard=guard),
                         stop_at_eos=False)
            assert torch.equal(out.sequences, ref)
            assert out.nfe == [nfe] and out.remasked == [remasked]
            revoked += remasked
    if t_draft < t_verify:
        assert revoked > 0  # the narrow-out path is exercised


def test_entropy_bound_selection_rule():
    conf = torch.tensor([[0.9, 0.5, 0.8, 0.7]], dtype=torch.float64)
    cand = torch.tensor([[True, True, True, True]])
    ent = torch.tensor([[0.1, 0.05, 0.2, 0.3]], dtype=torch.float64)
    from toolkit.dllm.peer_policies import select_entropy_bounded

    # Confidence order 0, 2, 3, 1; cumulative entropy 0.1, 0.3, 0.6, 0.65.
    assert select_entropy_bounded(conf, cand, ent, 0.35).tolist() == [[True, False, True, False]]
    assert select_entropy_bounded(conf, cand, ent, 0.0).tolist() == [[True, False, False, False]]
    assert select_entropy_bounded(conf, cand, ent, 1.0).all()
