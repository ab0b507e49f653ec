"""The LLaDA-compatible model: checkpoint conformance, bidirectionality, GQA, padding, caches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from toolkit.dllm.llada_model import LLaDAConfig, LLaDAModelLM

# Made with the public reference `modeling_llada.py` (see its README); shipped in the repository
# so that every clone checks the model against it.
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "llada_tiny"

torch.set_num_threads(1)


def tiny(dtype: torch.dtype = torch.float32, kv_heads: int = 4, seed: int = 0) -> LLaDAModelLM:
    cfg = LLaDAConfig(d_model=32, n_heads=4, n_kv_heads=kv_heads, n_layers=2, mlp_hidden_size=48,
                      vocab_size=40, max_sequence_length=64, mask_token_id=39, eos_token_id=38)
    return LLaDAModelLM.from_config(cfg, seed=seed, dtype=dtype).eval()


def test_fixture_loads_strictly_and_matches_reference_logits():
    from safetensors.torch import load_file

    model = LLaDAModelLM.from_pretrained(FIXTURE).eval()
    weights = load_file(str(FIXTURE / "model.safetensors"))
    assert set(model.state_dict()) == set(weights)
    ref = load_file(str(FIXTURE / "reference.safetensors"))
    with torch.no_grad():
        logits = model(ref["input_ids"]).logits
    assert logits.shape == ref["logits"].shape
    assert (logits - ref["logits"]).abs().max().item() <= 1e-5
    assert model.config.mask_token_id == 319 and model.config.eos_token_id == 318


def test_state_dict_names_follow_llada_checkpoints(tmp_path):
    model = tiny()
    keys = set(model.state_dict())
    for name in ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out",
                 "attn_norm", "ff_norm"):
        assert f"model.transformer.blocks.1.{name}.weight" in keys
    assert {"model.transformer.wte.weight", "model.transformer.ln_f.weight",
            "model.transformer.ff_out.weight"} <= keys
    again = LLaDAModelLM.from_pretrained(model.save_pretrained(tmp_path / "ckpt")).eval()
    x = torch.randint(0, 40, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(x).logits, again(x).logits)


def test_attention_is_bidirectional():
    model = tiny()
    x = torch.randint(0, 38, (1, 12))
    y = x.clone()
    y[0, -1] = (x[0, -1] + 1) % 38
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    assert (a[0, 0] - b[0, 0]).abs().max() > 1e-6


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = tiny(torch.float64, kv_heads=2)
    mha = tiny(torch.float64, kv_heads=4)
    state = gqa.state_dict()
    for key, w in list(state.items()):
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            # (kv_heads·hd, d) -> each kv head serves n_heads / kv_heads query heads.
            state[key] = w.view(2, 8, 32).repeat_interleave(2, 0).reshape(32, 32)
    mha.load_state_dict(state)
    x = torch.randint(0, 40, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(gqa(x).logits, mha(x).logits, atol=1e-10, rtol=0)


def test_left_padding_is_invisible():
    model = tiny(torch.float64)
    x = torch.randint(0, 38, (1, 7))
    padded = torch.cat((torch.full((1, 3), 38), x), 1)
    mask = torch.tensor([[0, 0, 0] + [1] * 7])
    with torch.no_grad():
        alone = model(x).logits
        pad = model(padded, attention_mask=mask).logits[:, 3:]
    torch.testing.assert_close(pad, alone, atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_prefix_cache_equals_full_forward(dtype, kv_heads):
    model = tiny(dtype, kv_heads)
    x = torch.randint(0, 40, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :4] = 0  # left padding in row 1
    with torch.no_grad():
        full = model(x, attention_mask=mask, use_cache=True)
        prefix = full.past_key_values.truncate(12)
        cached = model(x[:, 12:], past_key_values=prefix, use_cache=True)
    torch.testing.assert_close(cached.logits, full.logits[:, 12:], atol=1e-5, rtol=0)
    assert cached.past_key_values.length == 20


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("how", ["mask", "slice", "index"])
def test_dual_cache_equals_full_forward(dtype, how):
    model = tiny(dtype, kv_heads=2)
    x = torch.randint(0, 40, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[0, :2] = 0
    span = torch.arange(8, 12)
    replace = {"mask": torch.zeros(2, 20, dtype=torch.bool).index_fill_(1, span, True),
               "slice": slice(8, 12), "index": span}[how]
    with torch.no_grad():
        full = model(x, attention_mask=mask, use_cache=True)
        cache = full.past_key_values
        full_keys_9 = cache.keys[0][:, :, 9].clone()
        for _ in range(2):  # splicing unchanged tokens twice leaves the cache unchanged
            step = model(x[:, 8:12], past_key_values=cache, replace_position=replace,
                         use_cache=True)
            torch.testing.assert_close(step.logits, full.logits[:, 8:12], atol=1e-5, rtol=0)
        # A changed token is spliced in place: layer-0 K/V depend only on token and position,
        # so its slot now equals a fresh full forward's.
        y = x.clone()
        y[:, 9] = (x[:, 9] + 1) % 40
        step = model(y[:, 8:12], past_key_values=cache, replace_position=replace, use_cache=True)
        fresh = model(y, attention_mask=mask, use_cache=True).past_key_values
    assert step.past_key_values is cache
    torch.testing.assert_close(cache.keys[0][:, :, 9], fresh.keys[0][:, :, 9], atol=1e-6, rtol=0)
    assert (cache.keys[0][:, :, 9] - full_keys_9).abs().max() > 1e-4


def test_bad_configs_and_replace_positions_raise():
    with pytest.raises(ValueError, match="block_type"):
        LLaDAConfig.from_dict({"block_type": "sequential", "d_model": 32, "n_heads": 4})
    with pytest.raises(ValueError, match="n_kv_heads"):
        LLaDAConfig.from_dict({"d_model": 32, "n_heads": 4, "n_kv_heads": 3})
    model = tiny()
    x = torch.randint(0, 40, (1, 10))
    with torch.no_grad():
        cache = model(x, use_cache=True).past_key_values
        with pytest.raises(ValueError, match="replace_position"):
            model(x[:, :3], past_key_values=cache, replace_position=slice(0, 4))


def test_pair_mask_equals_forwards_without_the_hidden_positions():
    """A (B, T, T) mask: a query that may not see some keys computes what it would in a
    sequence without them (here: WINO's shadow copy, a mask token at position i that sees
    everything but the original position i). With one layer the keys are the tokens' own, so
    the copy computes what a sequence without position i, plus the copy, computes."""
    cfg = LLaDAConfig(d_model=32, n_heads=4, n_kv_heads=2, n_layers=1, mlp_hidden_size=48,
                      vocab_size=40, max_sequence_length=64, mask_token_id=39, eos_token_id=38)
    model = LLaDAModelLM.from_config(cfg, seed=0, dtype=torch.float64).eval()
    x = torch.randint(0, 38, (1, 9))
    i = 6
    ext = torch.cat((x, torch.tensor([[39]])), 1)  # 39: the mask token
    pos = torch.cat((torch.arange(9), torch.tensor([i])))[None]
    pair = torch.ones(1, 10, 10, dtype=torch.bool)
    pair[:, :9, 9] = False  # the original sequence never sees the copy
    pair[:, 9, i] = False  # the copy does not see its original
    with torch.no_grad():
        out = model(ext, attention_mask=pair, position_ids=pos).logits
        plain = model(x).logits
        keep = [j for j in range(9) if j != i]
        alone = model(torch.cat((x[:, keep], torch.tensor([[39]])), 1),
                      position_ids=torch.tensor([keep + [i]])).logits
    torch.testing.assert_close(out[:, :9], plain, atol=1e-10, rtol=0)
    torch.testing.assert_close(out[:, 9], alone[:, -1], atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="position_ids"):
        model(ext, attention_mask=pair)
