"""The multi-block task families (worked_sum, echo_sort, string_ops, reverse_words,
case_reverse): seeded generation,
disjoint splits, answer lengths over several blocks, the two scorers, the training data, and
one real decode through the eval rows and the fit-time callback (plumbing)."""

from __future__ import annotations

import re
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from toolkit.common.splits import split_of
from toolkit.dllm.llada_model import LLaDAConfig, LLaDAModelLM
from toolkit.dllm.multiblock_tasks import LOCAL_FAMILIES, parse_answer
from toolkit.dllm.registry import make_policy
from toolkit.dllm.tasks_data import (
    FAMILIES,
    MULTIBLOCK_FAMILIES,
    SHORT_FAMILIES,
    CharTokenizer,
    Problem,
    get_family,
    make_problems,
    score,
    step_score,
)

torch.set_num_threads(1)
TOK = CharTokenizer()


def test_families_are_registered_and_defaults_unchanged():
    assert MULTIBLOCK_FAMILIES == ["worked_sum", "echo_sort", "string_ops", "reverse_words",
                                   "case_reverse"]
    # Defaults that list families (training sizes, eval families) are what they were.
    assert SHORT_FAMILIES == ["spell_backward", "word_sorting", "number_sorting", "chain_sum"]
    for name in MULTIBLOCK_FAMILIES:
        fam = get_family(name)
        assert fam.kind == "multiblock" and fam.dataset == "local"
        assert fam.gen_length % 32 == 0 and 64 < fam.gen_length <= 256


@pytest.mark.parametrize("family", MULTIBLOCK_FAMILIES)
def test_generation_is_deterministic_per_seed(family: str):
    a = make_problems(family, "train", 40, seed=0)
    assert a == make_problems(family, "train", 40, seed=0)
    b = make_problems(family, "train", 40, seed=1)
    assert [p.prompt for p in a] != [p.prompt for p in b]
    assert len({p.prompt for p in a}) == 40  # no repeats within a split


@pytest.mark.parametrize("family", MULTIBLOCK_FAMILIES)
def test_splits_are_disjoint(family: str):
    prompts = {s: {p.prompt for p in make_problems(family, s, n, seed=0)}
               for s, n in (("train", 400), ("val", 100), ("test", 100))}
    assert not prompts["train"] & prompts["val"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["val"] & prompts["test"]
    for s, ps in prompts.items():
        assert all(split_of(f"{family}:{p}") == s for p in ps)


@pytest.mark.parametrize("family", MULTIBLOCK_FAMILIES)
def test_answers_are_64_to_256_tokens_over_several_blocks(family: str):
    gen = get_family(family).gen_length
    lengths = [len(TOK.encode(p.answer)) for p in make_problems(family, "train", 300, seed=3)]
    # The tokenizer is character-level: tokens = characters, no <unk>.
    assert all(TOK.can_encode(p.answer) for p in make_problems(family, "test", 50, seed=3))
    assert min(lengths) >= 64 and max(lengths) + 1 <= gen <= 256, (min(lengths), max(lengths))
    assert min(lengths) > 2 * 32  # every answer reaches a third block of 32


# ----------------------------------------------------------- the generators, checked by hand
def _shift(s: str) -> str:
    return "".join(chr((ord(c) - (97 if c.islower() else 65) + 1) % 26
                       + (97 if c.islower() else 65)) for c in s)


def _swap(s: str) -> str:
    return "".join(s[i + 1] + s[i] for i in range(0, len(s) - 1, 2)) + s[len(s) // 2 * 2:]


OPS = {"reverse": lambda s: "".join(reversed(s)), "upper": str.upper, "lower": str.lower,
       "shift": _shift, "rotate": lambda s: s[1:] + s[0], "swap": _swap}


def test_worked_sum_steps_are_right():
    for p in make_problems("worked_sum", "val", 50, seed=0):
        terms = [int(x) for x in p.prompt.removeprefix("add: ").split()]
        steps, final = parse_answer(p.answer)
        assert final == str(sum(terms)) and len(steps) == len(terms) - 1
        running = terms[0]
        for step, term in zip(steps, terms[1:]):
            a, b, c = map(int, re.fullmatch(r"(\d+)\+(\d+)=(\d+)", step).groups())
            assert (a, b, c) == (running, term, running + term)
            running = c


def test_echo_sort_steps_are_right():
    for p in make_problems("echo_sort", "val", 50, seed=0):
        digits = p.prompt.removeprefix("sort: ").split()
        steps, final = parse_answer(p.answer)
        assert steps[0] == "echo " + " ".join(digits)
        counts = Counter(digits)
        assert steps[1:] == [f"{d} x{counts[d]}" for d in sorted(counts)]
        assert final == " ".join(sorted(digits))


def test_string_ops_steps_are_right():
    for p in make_problems("string_ops", "val", 50, seed=0):
        head, word = p.prompt.removeprefix("apply ").split(": ")
        steps, final = parse_answer(p.answer)
        assert steps[0] == f"start {word}"
        for op, step in zip(head.split(), steps[1:]):
            word = OPS[op](word)
            assert step == f"{op} {word}"
        assert final == word and len(steps) == len(head.split()) + 1


def test_case_reverse_uses_only_the_three_non_cipher_ops():
    seen = set()
    for p in make_problems("case_reverse", "val", 50, seed=0):
        head, word = p.prompt.removeprefix("apply ").split(": ")
        assert 6 <= len(word) <= 10 and word.islower() and 3 <= len(head.split()) <= 6
        steps, final = parse_answer(p.answer)
        assert steps[0] == f"start {word}"
        for op, step in zip(head.split(), steps[1:]):
            word = OPS[op](word)
            assert step == f"{op} {word}"
        assert final == word
        seen |= set(head.split())
    assert seen == {"reverse", "upper", "lower"}


def test_reverse_words_steps_are_right():
    for p in make_problems("reverse_words", "val", 50, seed=0):
        words = p.prompt.removeprefix("reverse each: ").split()
        assert 4 <= len(words) <= 7 and all(3 <= len(w) <= 6 for w in words)
        steps, final = parse_answer(p.answer)
        assert steps[0] == "echo " + " ".join(words)
        assert steps[1:] == [w + " " + "".join(reversed(w)) for w in words]
        assert final == " ".join("".join(reversed(w)) for w in words)


# -------------------------------------------------------------------------------- scorers
HAND = Problem("worked_sum/x/0", "worked_sum", "add: 12 17 30 45",
               "12+17=29; 29+30=59; 59+45=104; answer 104")


@pytest.mark.parametrize("completion,final,steps", [
    ("12+17=29; 29+30=59; 59+45=104; answer 104", True, 1.0),
    ("12+17=29;29+30=59;  59+45=104;answer 104 ", True, 1.0),  # whitespace does not count
    ("12+17=29; 29+30=58; 58+45=103; answer 103", False, 1 / 3),  # a carry lost in step 2
    ("12+17=28; 28+30=58; 58+45=103; answer 104", True, 0.0),  # final only: steps all wrong
    ("12+17=29; 59+45=104; answer 104", True, 1 / 3),  # a skipped step shifts the rest
    ("12+17=29; 29+30=59; 59+45=104", False, 1.0),  # no final answer
    ("", False, 0.0),
])
def test_scorers_on_a_hand_computed_example(completion: str, final: bool, steps: float):
    assert score(HAND, completion) is final
    assert step_score(HAND, completion) == pytest.approx(steps)


def test_old_families_keep_whole_answer_match_and_have_no_steps():
    p = Problem("chain_sum/x/0", "chain_sum", "sum: 1 + 2 =", "3")
    assert score(p, " 3 ") and not score(p, "answer 3")
    assert step_score(p, "3") is None


# --------------------------------------------------------------------- data and decoding
def test_train_data_module_yields_multiblock_batches():
    from toolkit.dllm.train_module import DiffusionTaskDataModule

    dm = DiffusionTaskDataModule(train_sizes={f: 6 for f in MULTIBLOCK_FAMILIES}, val_size=2,
                                 tokens_per_batch=2048)
    assert dm.families == {f: get_family(f).gen_length for f in MULTIBLOCK_FAMILIES}
    answers = {p.answer for p in dm.split("train")}
    seen = set()
    for batch in dm.train_dataloader():
        gen = get_family(batch["family"]).gen_length
        assert (batch["answer_mask"].sum(-1) == gen).all()
        for row, am in zip(batch["input_ids"], batch["answer_mask"]):
            text = TOK.decode(row[am].tolist())
            assert text in answers
            seen.add(text)
    assert seen == answers


def _tiny_model(max_len: int = 320) -> LLaDAModelLM:
    cfg = LLaDAConfig(d_model=32, n_heads=2, n_layers=1, mlp_hidden_size=64,
                      vocab_size=TOK.vocab_size, mask_token_id=TOK.MASK, eos_token_id=TOK.EOS,
                      pad_token_id=TOK.PAD, max_sequence_length=max_len)
    return LLaDAModelLM.from_config(cfg, seed=0).eval()


def test_one_multiblock_problem_decodes_through_the_real_loop():
    """Plumbing: a tiny random model, the real decoder, the eval rows and their summary."""
    from toolkit.dllm.eval_module import DiffusionEvalDataModule, decode_problems, summarise

    dm = DiffusionEvalDataModule(families=MULTIBLOCK_FAMILIES, n_per_family=1)
    dm.setup()
    assert dm.gen_lengths == {f: get_family(f).gen_length for f in MULTIBLOCK_FAMILIES}
    problem = next(p for p in dm.problems if p.family == "worked_sum")
    policy = make_policy("fastdllm", block_length=32, threshold=0.9)
    with torch.no_grad():
        (row,) = decode_problems(_tiny_model(), TOK, [problem], policy, 160)
    assert row["gen_length"] == 160 and row["nfe"] >= 1
    assert 0.0 <= row["step_accuracy"] <= 1.0
    assert row["correct"] == float(score(problem, row["completion"]) and not row["masks_left"])
    metrics = summarise([{**row, "speed_only": False}])
    assert metrics["step_accuracy"]["value"] == row["step_accuracy"]


def test_decode_callback_logs_step_accuracy_for_multiblock_families():
    from toolkit.dllm.callbacks import DiffusionDecodeCallback
    from toolkit.dllm.train_module import DiffusionTaskDataModule, MaskedDiffusionLM

    dm = DiffusionTaskDataModule(train_sizes={"worked_sum": 2, "spell_backward": 2},
                                 val_size=2)
    module = MaskedDiffusionLM(d_model=16, n_layers=1, n_heads=2, mlp_hidden_size=32,
                               max_sequence_length=256)
    logged: dict[str, float] = {}
    # No Trainer is attached, so record what the callback logs instead.
    module.log = lambda key, value, **_: logged.__setitem__(key, value)  # type: ignore
    cb = DiffusionDecodeCallback(num_problems=1, batch_size=2)
    trainer = SimpleNamespace(sanity_checking=False, global_rank=0, world_size=1, datamodule=dm)
    cb.on_validation_epoch_end(trainer, module)
    for key in ("val/step_acc_adaptive", "val/step_acc_fastdllm"):
        assert 0.0 <= logged[key] <= 1.0
    assert logged["val/decode_problems"] == 2  # one per family
    assert set(FAMILIES) >= set(LOCAL_FAMILIES)
