"""Multi-block task families: long answers of predictable spans with short hard spans.

The reasoning-gym families of :mod:`toolkit.dllm.tasks_data` answer in one block of 32 tokens
(or, for the long family, a long but uniformly easy echo). An adaptive decoder has something to
adapt to only when one answer mixes spans a model is sure of (copies, templates) with spans it
must compute. These families write every step of the work out, so an answer is 64–255
characters (the toolkit's dLLM tokenizer is :class:`~toolkit.dllm.tasks_data.CharTokenizer`:
one character is one token) and spans 3–7 blocks of 32. By construction (the generators'
bounds) worked_sum answers are 69–131 characters, echo_sort 67–210 at most, string_ops 76–203,
reverse_words 80–215, case_reverse 69–153; ``gen`` below is the generation length, answer + at
least one EOS:

============ ============================================ ========================= ======
family       prompt → answer                              hard spans                gen
============ ============================================ ========================= ======
worked_sum   ``add: 12 7 30`` →                           each running sum          160
             ``12+7=19; 19+30=49; answer 49``
echo_sort    ``sort: 5 3 9 3`` →                          each digit's count        224
             ``echo 5 3 9 3; 3 x2; 5 x1; 9 x1; answer 3 3 5 9``
string_ops   ``apply reverse upper: abc`` →               each transformed string   224
             ``start abc; reverse cba; upper CBA; answer CBA``
reverse_words ``reverse each: cat dog`` →                 each reversed word        224
             ``echo cat dog; cat tac; dog god; answer tac god``
case_reverse like string_ops, 6–10 letters, only          each reversed string      160
             ``reverse`` / ``upper`` / ``lower``
============ ============================================ ========================= ======

worked_sum, echo_sort and string_ops came first; a 0.88 M-parameter model trained on them for
3 CPU-hours wrote their formats but got the computation wrong (3-digit running sums, counting,
shift ciphers), 0% exact (``checkpoints/dllm/multiblock/README.md``). reverse_words and
case_reverse keep the multi-block shape (echoes and templates with short hard spans) but their
hard spans are reversals, which the same model does at 98% as the short spell_backward family.
A further 26 CPU-minutes on them (stage 7) still gave 0% exact: reversing random-letter words
is harder than reversing the English words of spell_backward, and long answers also slip in
plain copies.

Every answer is ``step; step; ...; answer FINAL``: the steps are the intermediate work and
FINAL the result. Two scorers use that shape: :func:`final_correct` (exact match of FINAL,
whitespace-normalised) and :func:`step_accuracy` (the fraction of the reference's steps that
the completion has, equal, at the same position). The alphabet is small (digits, lowercase
and uppercase letters, a few words) and the lengths bounded, so a model of a few million
parameters can learn them on a CPU.

Generation is local and seeded (no network, no reasoning-gym): :func:`draw` takes a
``random.Random``; :mod:`toolkit.dllm.tasks_data` seeds it per family, seed and split and keeps a
problem only in the split its prompt hashes to, as for the other families.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass

STEP_SEP = "; "
FINAL_PREFIX = "answer "


@dataclass(frozen=True)
class LocalFamily:
    """A locally generated family: its generation length and its generator.

    Attributes:
        name: family name (ids and reports).
        gen_length: answer tokens incl. EOS padding; a multiple of 32, ≥ every answer + 1.
        generate: draws ``(prompt, steps, final)`` from a seeded ``random.Random``.
    """

    name: str
    gen_length: int
    generate: Callable[[random.Random], tuple[str, list[str], str]]


def format_answer(steps: list[str], final: str) -> str:
    """The answer text: the steps, then ``answer FINAL``, ``"; "``-joined."""
    return STEP_SEP.join([*steps, FINAL_PREFIX + final])


def parse_answer(text: str) -> tuple[list[str], str | None]:
    """``(steps, final)`` of an answer or a completion (``final`` None when absent).

    Segments are whitespace-normalised; the last segment that starts with ``answer`` is
    FINAL and the segments before it are the steps (a completion without one is all steps).
    """
    segments = [" ".join(s.split()) for s in text.split(STEP_SEP.strip())]
    for i in range(len(segments) - 1, -1, -1):
        if segments[i] == FINAL_PREFIX.strip() or segments[i].startswith(FINAL_PREFIX):
            return segments[:i], segments[i][len(FINAL_PREFIX):].strip()
    return segments, None


def final_correct(reference: str, completion: str) -> bool:
    """Exact match of the final answer (whitespace-normalised); the steps do not count."""
    _, want = parse_answer(reference)
    _, got = parse_answer(completion)
    return got is not None and got == want


def step_accuracy(reference: str, completion: str) -> float:
    """Fraction of the reference's intermediate steps that the completion has at the same
    position, exactly (whitespace-normalised). Positional, so a skipped step costs the
    steps after it too: the steps of these families build on one another."""
    want, _ = parse_answer(reference)
    got, _ = parse_answer(completion)
    if not want:
        return 1.0
    return sum(g == w for g, w in zip(got, want)) / len(want)


# ---------------------------------------------------------------------------- generators
def _worked_sum(rng: random.Random) -> tuple[str, list[str], str]:
    """7–11 two-digit terms; each step adds the next term to the running sum."""
    terms = [rng.randint(10, 99) for _ in range(rng.randint(7, 11))]
    steps, total = [], terms[0]
    for t in terms[1:]:
        steps.append(f"{total}+{t}={total + t}")
        total += t
    return "add: " + " ".join(map(str, terms)), steps, str(total)


def _echo_sort(rng: random.Random) -> tuple[str, list[str], str]:
    """12–32 digits; echo them, count each digit present (in order), then the sorted list."""
    digits = [rng.randint(0, 9) for _ in range(rng.randint(12, 32))]
    echo = " ".join(map(str, digits))
    counts = [f"{d} x{digits.count(d)}" for d in sorted(set(digits))]
    return "sort: " + echo, ["echo " + echo, *counts], " ".join(map(str, sorted(digits)))


def _shift(s: str) -> str:
    """Each letter one further in the alphabet (``z`` → ``a``, ``Z`` → ``A``)."""
    out = []
    for c in s:
        base = string.ascii_lowercase if c.islower() else string.ascii_uppercase
        out.append(base[(base.index(c) + 1) % 26])
    return "".join(out)


def _swap(s: str) -> str:
    """Swap neighbours: ``abcde`` → ``badce`` (an odd last letter stays)."""
    chars = list(s)
    for i in range(0, len(chars) - 1, 2):
        chars[i], chars[i + 1] = chars[i + 1], chars[i]
    return "".join(chars)


STRING_OPS: dict[str, Callable[[str], str]] = {
    "reverse": lambda s: s[::-1],
    "upper": str.upper,
    "lower": str.lower,
    "shift": _shift,
    "rotate": lambda s: s[1:] + s[:1],
    "swap": _swap,
}


def _apply_ops(rng: random.Random, op_names: list[str], letters: tuple[int, int],
               n_ops: tuple[int, int]) -> tuple[str, list[str], str]:
    """A random lowercase string and random operations of ``op_names`` applied in turn."""
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(*letters)))
    ops = [rng.choice(op_names) for _ in range(rng.randint(*n_ops))]
    steps, cur = [f"start {word}"], word
    for op in ops:
        cur = STRING_OPS[op](cur)
        steps.append(f"{op} {cur}")
    return f"apply {' '.join(ops)}: {word}", steps, cur


def _string_ops(rng: random.Random) -> tuple[str, list[str], str]:
    """A 8–16 letter lowercase string and 3–6 of all six operations (ciphers included)."""
    return _apply_ops(rng, sorted(STRING_OPS), (8, 16), (3, 6))


def _case_reverse(rng: random.Random) -> tuple[str, list[str], str]:
    """string_ops without the ciphers: 6–10 letters, 3–6 of reverse / upper / lower."""
    return _apply_ops(rng, ["lower", "reverse", "upper"], (6, 10), (3, 6))


def _reverse_words(rng: random.Random) -> tuple[str, list[str], str]:
    """4–7 words of 3–6 letters: echo them, then each word and its reversal, then all
    reversals in order (spell_backward, the short family, word by word)."""
    words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
             for _ in range(rng.randint(4, 7))]
    steps = ["echo " + " ".join(words), *(f"{w} {w[::-1]}" for w in words)]
    return "reverse each: " + " ".join(words), steps, " ".join(w[::-1] for w in words)


LOCAL_FAMILIES: dict[str, LocalFamily] = {f.name: f for f in (
    LocalFamily("worked_sum", 160, _worked_sum),
    LocalFamily("echo_sort", 224, _echo_sort),
    LocalFamily("string_ops", 224, _string_ops),
    LocalFamily("reverse_words", 224, _reverse_words),
    LocalFamily("case_reverse", 160, _case_reverse),
)}


def family_rng(family: str, split_seed: int) -> random.Random:
    """The generator of one family and split seed (string seeds are stable across runs)."""
    return random.Random(f"{family}:{split_seed}")


def draw(family: str, rng: random.Random) -> tuple[str, str]:
    """One ``(prompt, answer)`` of a local family."""
    prompt, steps, final = LOCAL_FAMILIES[family].generate(rng)
    return prompt, format_answer(steps, final)
