"""Final-answer extraction from chat completions, shared by the reasoning-gym tasks.

Numbers: the last ``Answer: X`` (or "the answer is X"), else the last ``\\boxed{X}``, else the
last ``#### X``, else the last number in the text; compared exactly as decimals, so
"1,200" == "1200" == "1200.00". Text (a word, a list): what follows the last ``Answer:`` on
its line (or on the next line with content), else the last "the answer is ...", else the
last ``\\boxed{...}``, with markdown, LaTeX math and a
sentence's final period taken off; never a guess from the body of the text, because a wrong
guess there would be scored as the model's answer.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# A number: optional sign and dollar sign, digits with or without thousands commas, decimals.
# The look-behind keeps "3-4" from reading as minus four and "x2" from reading as two.
NUMBER = r"(?<![\w.])(?:(?:-\$?|\$-?)\s?)?(?:\d{1,3}(?:,\d{3})+(?![\d])|\d+)(?:\.\d+)?"
_ANSWER = re.compile(rf"answer(?:\*\*)?\s*(?:is\b\s*:?|[:=])[\s*]*({NUMBER})", re.IGNORECASE)
_HASHES = re.compile(rf"####\s*({NUMBER})")
_ANY_NUMBER = re.compile(NUMBER)
_FRACTION = re.compile(rf"\\[dt]?frac\s*\{{\s*({NUMBER})\s*\}}\s*\{{\s*({NUMBER})\s*\}}")
# "Answer:", "**Answer:**", "Final answer =" (a colon or "=" is what marks the final line).
_ANSWER_COLON = re.compile(r"\banswer[\s*_]*[:=][*_]*", re.IGNORECASE)
_ANSWER_IS = re.compile(r"\banswer(?:\*\*)?\s+is\b\s*:?", re.IGNORECASE)
_FENCE = re.compile(r"^`{3}\w*$")


def to_decimal(text: str) -> Decimal | None:
    """``text`` as a finite decimal ("$1,200.50" -> 1200.50), or None if it is not a number."""
    cleaned = re.sub(r"[\s,$]", "", text).rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def _normalise(raw: str) -> str | None:
    value = to_decimal(raw)
    if value is None:
        return None
    if value == value.to_integral_value():
        return str(int(value))  # "70.00" -> "70", "-0" -> "0"
    return format(value.normalize(), "f")  # "2.50" -> "2.5", never "2.5E+1"


def boxed_contents(text: str) -> list[str]:
    """The contents of every ``\\boxed{...}``, nested braces included."""
    found = []
    for m in re.finditer(r"\\boxed\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found.append(text[m.end():i - 1])
    return found


def extract_answer(text: str) -> str | None:
    """The final numeric answer of a completion, normalised ("1,200.0" -> "1200"), or None."""
    answers = _ANSWER.findall(text)
    if answers:
        return _normalise(answers[-1])
    for box in reversed(boxed_contents(text)):
        # LaTeX spells thousands separators and spaces as {,} and \, inside math.
        box = box.replace("{,}", ",").replace("\\,", "").replace("\\$", "$")
        frac = _FRACTION.search(box)
        if frac:
            num, den = to_decimal(frac.group(1)), to_decimal(frac.group(2))
            if num is not None and den:
                return _normalise(str(num / den))
        numbers = _ANY_NUMBER.findall(box)
        if numbers:
            return _normalise(numbers[0])
    hashes = _HASHES.findall(text)
    if hashes:
        return _normalise(hashes[-1])
    numbers = _ANY_NUMBER.findall(text)
    return _normalise(numbers[-1]) if numbers else None


def answers_match(predicted: str | None, reference: str) -> bool:
    """Whether two answers are the same number (False when either is not a number)."""
    if predicted is None:
        return False
    a, b = to_decimal(predicted), to_decimal(reference)
    return a is not None and b is not None and a == b


def _clean(answer: str) -> str:
    """An answer without its wrapping: markdown emphasis or code, $...$, \\boxed{}, quotes,
    and the period that ends a sentence."""
    previous = None
    while answer != previous:
        previous = answer
        answer = answer.strip()
        boxes = boxed_contents(answer)
        if len(boxes) == 1 and answer.startswith("\\boxed"):
            answer = boxes[0]
        for left, right in (("**", "**"), ("__", "__"), ("`", "`"), ("$", "$"),
                            ("\\(", "\\)"), ('"', '"'), ("'", "'")):
            if len(answer) > len(left) + len(right) - 1 and answer.startswith(left) \
                    and answer.endswith(right) and answer.count(left) == (1 if left != right
                                                                            else 2):
                answer = answer[len(left):len(answer) - len(right)]
        if answer.endswith(".") and not answer.endswith(".."):
            answer = answer[:-1]
    return answer


def _first_line(text: str) -> str:
    """The first line with content, skipping code fences (an answer may follow on its own
    line, or inside a fence)."""
    for line in text.splitlines():
        if line.strip() and not _FENCE.match(line.strip()):
            return line
    return ""


def extract_text_answer(text: str) -> str | None:
    """The final answer of a completion as text (see the module docstring), or None."""
    for pattern in (_ANSWER_COLON, _ANSWER_IS):
        matches = list(pattern.finditer(text))
        if matches:
            answer = _clean(_first_line(text[matches[-1].end():]))
            if answer:
                return answer
    boxes = boxed_contents(text)
    return _clean(boxes[-1]) or None if boxes else None
