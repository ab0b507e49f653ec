"""The generic reasoning-gym task: seeded data, unique ids, answers checked against our own
arithmetic (not reasoning-gym's), answer extraction, and bad input."""

from __future__ import annotations

import ast
import json
import operator
import re
from fractions import Fraction

import pytest

from toolkit.tasks import Example, TaskError, build_task
from toolkit.tasks.answers import extract_text_answer


def rg(dataset: str, **options):
    return build_task("reasoning_gym", dataset=dataset, **options)


def test_same_seed_same_problems_and_size_only_cuts():
    a, b = rg("basic_arithmetic", seed=7, size=30), rg("basic_arithmetic", seed=7, size=30)
    rows = [(e.id, e.prompt, e.reference) for e in a.examples()]
    assert rows == [(e.id, e.prompt, e.reference) for e in b.examples()] and len(rows) == 30
    assert [(e.id, e.prompt) for e in rg("basic_arithmetic", seed=7, size=5).examples()] == \
        [r[:2] for r in rows[:5]]
    assert [e.id for e in rg("basic_arithmetic", seed=7, size=30, limit=4).examples()] == \
        [f"basic_arithmetic/7/{i}" for i in range(4)]
    other = rg("basic_arithmetic", seed=1000, size=30).examples()
    assert other[0].prompt != rows[0][1]
    assert a.name == "basic_arithmetic" and rg("leg_counting", size=1, task_name="x").name == "x"


def test_ids_unique_across_families_and_seeds():
    ids = [e.id for d in ("basic_arithmetic", "leg_counting", "word_sorting", "gsm_symbolic")
           for seed in (7, 8) for e in rg(d, seed=seed, size=20).examples()]
    assert len(ids) == len(set(ids)) == 160
    assert all(re.fullmatch(r"[a-z_]+/(7|8)/\d+", i) for i in ids)


def _evaluate(expression: str) -> Fraction:
    """Our own exact evaluation of + - * / expressions (parentheses, unary minus)."""
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv}

    def ev(node: ast.AST) -> Fraction:
        if isinstance(node, ast.BinOp):
            return ops[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        assert isinstance(node, ast.Constant), ast.dump(node)
        return Fraction(node.value)

    return ev(ast.parse(expression, mode="eval").body)


def test_arithmetic_scored_against_our_own_arithmetic():
    task = rg("basic_arithmetic", seed=7, size=25)
    for ex in task.examples():
        value = _evaluate(ex.meta["expression"])
        assert value.denominator == 1 and str(value) == ex.reference, ex.prompt
        right = f"Step by step ... = {value}\n\n**Answer:** {int(value):,}"
        assert task.score(ex, right) is True
        assert task.score(ex, f"Answer: {value + 1}") is False
        assert task.score(ex, "I cannot compute this.") is False


def test_leg_counting_hand_computed():
    task = rg("leg_counting", seed=7, size=1)
    ex = task.examples()[0]
    assert "15 dogs, 9 wasps, 4 flatworms, 1 leech, 2 birds, 7 beetles, 7 sheeps, 2 sea slugs" \
        in ex.prompt
    legs = 15 * 4 + 9 * 6 + 4 * 0 + 1 * 0 + 2 * 2 + 7 * 6 + 7 * 4 + 2 * 0
    assert ex.reference == str(legs) == "188"
    assert task.score(ex, f"Total: {legs} legs.\nAnswer: {legs} legs") is True
    assert task.score(ex, "Answer: 186") is False


def test_letter_counting_by_our_own_count():
    task = rg("letter_counting", seed=3, size=20)
    for ex in task.examples():
        letter, text = re.search(r'letter "(.)" appear in the text: "(.*)"\?', ex.prompt).groups()
        count = text.lower().count(letter)
        assert ex.reference == str(count)
        assert task.score(ex, f"Answer: {count}") and not task.score(ex, f"Answer: {count + 2}")


def test_sorting_families_use_their_own_scorer():
    words = rg("word_sorting", seed=3, size=12)
    seen = set()
    for ex in words.examples():
        listed = re.search(r"comma-separated list: (.*)$", ex.meta["question"].strip()).group(1)
        desc = ex.meta["direction"] == "descending"
        seen.add(desc)
        mine = sorted(listed.split(", "), reverse=desc)  # Python sorts str by code point
        assert words.score(ex, "Sorted:\nAnswer: " + ", ".join(mine)) is True
        if len(set(mine)) > 1:  # two words swapped: reasoning-gym gives partial credit, not us
            swapped = [mine[1], mine[0], *mine[2:]]
            assert words.score(ex, "Answer: " + ", ".join(swapped)) is False
    assert seen == {True, False}
    numbers = rg("number_sorting", seed=3, size=12)
    for ex in numbers.examples():
        listed = re.search(r"order: (.*)\n", ex.meta["question"]).group(1).split(", ")
        desc = ex.meta["direction"] == "descending"
        mine = sorted(listed, key=float, reverse=desc)
        text = str(mine)  # ['-1.5', '2.0', ...], the format the question asks for
        assert numbers.score(ex, f"Answer:\n```\n{text}\n```") is True
        assert numbers.score(ex, f"Answer: {mine[::-1]}") is False
        # An example rebuilt from saved outputs is scored from its meta (direction included).
        saved = Example("saved/0", ex.prompt, ex.reference, json.loads(json.dumps(ex.meta)))
        assert numbers.score(saved, f"Answer: {text}") is True


def test_generic_adapter_on_gsm_symbolic_matches_the_gsm_task():
    gsm = build_task("gsm_symbolic", seed=42, size=5).examples()
    generic = rg("gsm_symbolic", seed=42, size=5).examples()
    assert [e.id for e in gsm] == [e.id for e in generic] == [f"gsm_symbolic/42/{i}"
                                                              for i in range(5)]
    assert [e.prompt.replace("<number>", "<answer>") for e in gsm] == [e.prompt for e in generic]
    renamed = build_task("gsm_symbolic", seed=5000, size=2, task_name="gsm_symbolic_s5000")
    assert renamed.name == "gsm_symbolic_s5000"
    assert renamed.examples()[1].id == "gsm_symbolic/5000/1"


def test_repeated_questions_are_skipped():
    tiny = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1,
            "operators": ["+"], "allow_parentheses": False, "allow_negation": False}
    task = rg("basic_arithmetic", seed=3, size=300, config=tiny)
    prompts = [e.prompt for e in task.examples()]
    assert len(prompts) == len(set(prompts)) < 150  # a + b with 1-digit a, b: few questions
    assert len(prompts) + len(task.skipped) == 300
    assert task.skipped[0].reason.startswith("same question as basic_arithmetic/3/")


@pytest.mark.parametrize("text,expected", [
    ("Answer: tuobnrut", "tuobnrut"), ("**Answer:** `KIND, bomb`.", "KIND, bomb"),
    ("answer: $-12$", "-12"), ("Final answer = \\boxed{abc}", "abc"),
    ("Answer:\n```python\n['1', '2']\n```", "['1', '2']"),
    ("Answer: x\nmore text\nAnswer: y", "y"), ("The answer is: 'nus'.", "nus"),
    ("so \\boxed{\\text{z}} and \\boxed{w}", "w"), ("no final line here", None),
    ("Answer:", None), ("the answers are many. Answer: ['-1.5', '2.0']", "['-1.5', '2.0']"),
    ("This answer is wrong.\nAnswer: 7", "7"), ('Answer: "sun"', "sun"),
])
def test_extract_text_answer(text, expected):
    assert extract_text_answer(text) == expected


def test_bad_input_is_one_line():
    with pytest.raises(TaskError, match=r"unknown reasoning-gym dataset 'basic_arithmetc' "
                                        r"\(did you mean basic_arithmetic"):
        rg("basic_arithmetc")
    with pytest.raises(TaskError, match="missing a required argument: 'dataset'"):
        build_task("reasoning_gym", seed=1)
    with pytest.raises(TaskError, match=r"leg_counting: bad config \{'max_legs': 3\}"):
        rg("leg_counting", config={"max_legs": 3})
    with pytest.raises(TaskError, match="need an integer seed, size >= 1"):
        rg("leg_counting", size=0)
    with pytest.raises(TaskError, match="config must be a mapping"):
        rg("leg_counting", config=[1])
    with pytest.raises(TaskError) as info:
        rg("nope_not_a_family")
    assert "\n" not in str(info.value) and "exist" in str(info.value)


def test_label_runs_two_seeds_of_a_family_only_under_two_names(tmp_path, tiny_lm, tiny_lm_b):
    from toolkit.cascade.labelling import StageSpec, TaskSpec, label, load_records
    from toolkit.common.errors import UserError
    from toolkit.generation.base import DecodingConfig

    stages = [StageSpec(str(tiny_lm)), StageSpec(str(tiny_lm_b))]
    seeds = [TaskSpec("reasoning_gym", {"dataset": "leg_counting", "seed": s, "size": 2})
             for s in (1, 500)]
    with pytest.raises(UserError, match="two tasks write to .*leg_counting/; give one"):
        label(stages, seeds, out_dir=str(tmp_path / "a"))
    assert not (tmp_path / "a").exists()  # refused before anything was written
    seeds[1].options["task_name"] = "leg_counting_s500"
    label(stages, seeds, DecodingConfig(max_new_tokens=4), out_dir=str(tmp_path / "b"),
          threads=1)
    rows = load_records(tmp_path / "b")
    assert sorted((r["task"], r["id"], r["stage"]) for r in rows) == sorted(
        (task, f"leg_counting/{seed}/{i}", stage)
        for task, seed in (("leg_counting", 1), ("leg_counting_s500", 500))
        for i in range(2) for stage in (0, 1))
    assert all(r["correct"] is False for r in rows)  # 4 tokens of a random model
