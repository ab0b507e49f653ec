"""Data for the small diffusion LM: a character tokenizer and reasoning-gym task families.

The families mix answers that are mostly easy (copying, reversing, fixed formatting) with hard
spans (arithmetic, ordering), so that an adaptive decoder has something to adapt to, and one
family has long answers (a 512-token generation) for the long-context case:

==================== ===================== ====== ===========================================
family               reasoning-gym dataset kind   answer (generation length)
==================== ===================== ====== ===========================================
spell_backward       spell_backward        easy   a 3–8 letter word reversed (32)
word_sorting         word_sorting          medium 3 lowercase 3–6 letter words sorted,
                                                  ``", "``-joined (64)
number_sorting       number_sorting        medium ``['52.0', '30.0', '4.0']``: 3 integers in
                                                  0–99, sorted (the format is easy) (64)
chain_sum            chain_sum             hard   the value of ``a ± b``, 1–2 digits (32)
word_reversal_long   word_sequence_reversal long   45–60 words in reverse order (512)
worked_sum           (local)               multi  every running sum of 7–11 terms (160)
echo_sort            (local)               multi  12–32 digits echoed, counted, sorted (224)
string_ops           (local)               multi  3–6 string operations, each result (224)
reverse_words        (local)               multi  4–7 words echoed, each reversed (224)
case_reverse         (local)               multi  3–6 of reverse/upper/lower, each (160)
==================== ===================== ====== ===========================================

The five ``multiblock`` families are generated locally (:mod:`toolkit.dllm.multiblock_tasks`):
answers of 64–255 characters that write every step out, scored on the final answer
(:func:`score`) and on the steps (:func:`step_score`). They are not in ``SHORT_FAMILIES``, so
every default that lists families is what it was before they existed.

reasoning-gym generates the problems; the prompt is rebuilt compactly from each item's
metadata (its English instructions would cost a character model hundreds of positions for
nothing), and the answer is reasoning-gym's ``answer`` string unchanged.

Splits: train, val and test are generated from different seeds, *and* each problem is kept
only in the split that a hash of its prompt assigns it to (:func:`toolkit.common.splits.split_of`),
so a held-out prompt can never appear in training, whatever the sizes or seeds.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from toolkit.common.splits import split_of
from toolkit.dllm import multiblock_tasks

SPLIT_OFFSET = {"train": 0, "val": 1, "test": 2}


class CharTokenizer:
    """Character vocabulary built in code: special tokens, then printable ASCII and newline.

    Ids 0–5 are ``<pad> <mask> <eos> <bos> <sep> <unk>``. A prompt is encoded as
    ``<bos> text <sep>``; an answer as ``text <eos> <eos> ...`` up to the generation length
    (LLaDA's SFT recipe: the model learns to fill the tail with EOS).
    """

    SPECIALS = ("<pad>", "<mask>", "<eos>", "<bos>", "<sep>", "<unk>")
    PAD, MASK, EOS, BOS, SEP, UNK = range(6)

    def __init__(self, chars: str | None = None) -> None:
        # string.printable minus the rarely useful \r \t \x0b \x0c, in a fixed order.
        self.chars = chars if chars is not None else (
            "".join(c for c in string.printable if c not in "\r\t\x0b\x0c"))
        if len(set(self.chars)) != len(self.chars):
            raise ValueError("tokenizer characters must be unique")
        self.itos = [*self.SPECIALS, *self.chars]
        self.stoi = {c: i + len(self.SPECIALS) for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def can_encode(self, text: str) -> bool:
        return all(c in self.stoi for c in text)

    def encode(self, text: str) -> list[int]:
        """Characters to ids; unknown characters become ``<unk>``."""
        return [self.stoi.get(c, self.UNK) for c in text]

    def decode(self, ids: Sequence[int], stop_at_eos: bool = True) -> str:
        """Ids to text, dropping special tokens; stops at the first EOS by default."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.EOS and stop_at_eos:
                break
            if i >= len(self.SPECIALS):
                out.append(self.itos[i])
        return "".join(out)

    def encode_prompt(self, text: str) -> list[int]:
        return [self.BOS, *self.encode(text), self.SEP]

    def encode_answer(self, text: str, gen_length: int) -> list[int]:
        """``text`` then EOS up to ``gen_length`` (at least one EOS, so the end is learnt)."""
        ids = self.encode(text)
        if len(ids) + 1 > gen_length:
            raise ValueError(f"answer of {len(ids)} characters + EOS does not fit in "
                             f"gen_length {gen_length}")
        return ids + [self.EOS] * (gen_length - len(ids))

    def to_dict(self) -> dict[str, Any]:
        return {"type": "char", "specials": list(self.SPECIALS), "chars": self.chars}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> CharTokenizer:
        if raw.get("type") != "char" or list(raw.get("specials", [])) != list(cls.SPECIALS):
            raise ValueError(f"not a character tokenizer of this toolkit: {raw!r:.200}")
        return cls(raw["chars"])


@dataclass(frozen=True)
class Problem:
    """One problem: stable id, family, compact prompt text, reference answer text."""

    id: str
    family: str
    prompt: str
    answer: str


@dataclass(frozen=True)
class Family:
    """A task family: which reasoning-gym dataset, its settings, and the prompt format.

    Attributes:
        name: our name for it (ids and reports).
        dataset: reasoning-gym dataset name, or ``local`` (generated by
            :mod:`toolkit.dllm.multiblock_tasks`; no config, no prompt builder).
        kind: easy / medium / hard / long / multiblock (for reports).
        gen_length: answer length in tokens (answer + EOS padding); a multiple of 32 so the
            static block-32 decoders can run on it.
        config: reasoning-gym settings.
        prompt: builds the compact prompt from a reasoning-gym item.
    """

    name: str
    dataset: str
    kind: str
    gen_length: int
    config: dict[str, Any] = field(default_factory=dict, hash=False)
    prompt: Callable[[dict[str, Any]], str] | None = field(default=None, hash=False)


LOCAL = "local"


def _meta(item: dict[str, Any]) -> dict[str, Any]:
    return item["metadata"]


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("spell_backward", "spell_backward", "easy", 32,
           {"min_word_len": 3, "max_word_len": 8},
           lambda it: f"spell backward: {_meta(it)['word']}"),
    Family("word_sorting", "word_sorting", "medium", 64,
           {"min_words": 3, "max_words": 3, "min_word_length": 3, "max_word_length": 6,
            "transformation": "lowercase"},
           lambda it: (f"sort words {_meta(it)['direction']}: "
                       + ", ".join(_meta(it)["transformed_words"]))),
    Family("number_sorting", "number_sorting", "medium", 64,
           {"min_numbers": 3, "max_numbers": 3, "min_decimals": 0, "max_decimals": 0,
            "min_value": 0, "max_value": 99},
           lambda it: (f"sort numbers {_meta(it)['direction']}: "
                       + ", ".join(_meta(it)["original_numbers"]))),
    Family("chain_sum", "chain_sum", "hard", 32,
           {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2},
           lambda it: f"sum: {_meta(it)['expression']} ="),
    Family("word_reversal_long", "word_sequence_reversal", "long", 512,
           {"min_words": 45, "max_words": 60},
           lambda it: "reverse words: " + ", ".join(_meta(it)["words"])),
    *(Family(f.name, LOCAL, "multiblock", f.gen_length)
      for f in multiblock_tasks.LOCAL_FAMILIES.values()),
)}
SHORT_FAMILIES = [n for n, f in FAMILIES.items() if f.kind not in ("long", "multiblock")]
MULTIBLOCK_FAMILIES = [n for n, f in FAMILIES.items() if f.kind == "multiblock"]
LONG_FAMILY = "word_reversal_long"


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown task family {name!r}; choose from {sorted(FAMILIES)}")
    return FAMILIES[name]


def split_seed(seed: int, split: str) -> int:
    """Generator seed of a split: different for train, val and test of the same ``seed``."""
    if split not in SPLIT_OFFSET:
        raise ValueError(f"split must be one of {sorted(SPLIT_OFFSET)}, got {split!r}")
    return 3 * seed + SPLIT_OFFSET[split]


def make_problems(family: str, split: str, n: int, seed: int = 0,
                  tokenizer: CharTokenizer | None = None,
                  gen_length: int | None = None) -> list[Problem]:
    """``n`` distinct problems of ``family`` that belong to ``split``.

    Problems are drawn in reasoning-gym's order (or the local generator's, for ``local``
    families) from the split's seed; a problem is skipped
    when its prompt hashes to another split, repeats an earlier prompt, has a character the
    tokenizer lacks, or its answer + EOS does not fit in ``gen_length`` (default the family's).

    Raises:
        ValueError: if ``n`` problems cannot be found among ``20·n + 200`` draws.
    """
    fam = get_family(family)
    tok = tokenizer or CharTokenizer()
    gen = gen_length or fam.gen_length
    cap = 20 * n + 200
    out: list[Problem] = []
    seen: set[str] = set()
    for prompt, answer in _draws(fam, split_seed(seed, split), cap):
        if len(out) == n:
            break
        if (prompt in seen or split_of(f"{family}:{prompt}") != split
                or not tok.can_encode(prompt + answer) or len(answer) + 1 > gen):
            continue
        seen.add(prompt)
        out.append(Problem(f"{family}/{split}/{len(out):05d}", family, prompt, answer))
    if len(out) < n:
        raise ValueError(f"{family}: only {len(out)} of {n} {split} problems found in {cap} "
                         "draws; ask for fewer")
    return out


def _draws(fam: Family, seed: int, cap: int) -> Iterator[tuple[str, str]]:
    """``cap`` (prompt, answer) pairs of a family from one generator seed."""
    if fam.dataset == LOCAL:
        rng = multiblock_tasks.family_rng(fam.name, seed)
        for _ in range(cap):
            yield multiblock_tasks.draw(fam.name, rng)
        return
    import reasoning_gym

    config = dict(fam.config)
    if isinstance(config.get("transformation"), str):  # word_sorting wants its enum
        from reasoning_gym.algorithmic.word_sorting import TextTransformation

        config["transformation"] = TextTransformation(config["transformation"])
    ds = reasoning_gym.create_dataset(fam.dataset, seed=seed, size=cap, **config)
    for i in range(cap):
        yield fam.prompt(ds[i]), str(ds[i]["answer"])


def normalise(text: str) -> str:
    """Whitespace-insensitive form used for exact match."""
    return " ".join(text.split())


def score(problem: Problem, completion: str) -> bool:
    """Exact match with the reference, whitespace normalised: of the whole answer, or, for a
    multiblock family, of its final answer (``answer FINAL``; the steps are
    :func:`step_score`'s)."""
    if get_family(problem.family).kind == "multiblock":
        return multiblock_tasks.final_correct(problem.answer, completion)
    return normalise(completion) == normalise(problem.answer)


def step_score(problem: Problem, completion: str) -> float | None:
    """Fraction of the reference's intermediate steps the completion has right, for families
    that write steps (the multiblock ones); None for the others."""
    if get_family(problem.family).kind != "multiblock":
        return None
    return multiblock_tasks.step_accuracy(problem.answer, completion)
