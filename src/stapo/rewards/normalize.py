"""String-level answer normalisation, the no-sympy fast path, and the pathological-input filter.

Nothing here parses or evaluates: numbers are read with bounded digit counts into exact
``fractions.Fraction`` values, so no input can make this module slow or execute anything.

    normalize_gold(gold)            the cleaned gold that the grader compares against
    clean_answer(answer)            the same cleaning for an extracted model answer
    fast_verdict(pred, gold)        1.0 / 0.0 when it is certain without sympy, else None
    pathological_reason(pred, gold) why an answer is refused before sympy sees it, or None
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = [
    "MAX_ANSWER_CHARS",
    "as_number",
    "clean_answer",
    "control_character",
    "fast_verdict",
    "normalize_gold",
    "pathological_reason",
    "split_top_level",
]

# An extracted answer longer than this is refused (scored 0, counted): real final answers are
# short, and sympy's cost grows badly with length.
MAX_ANSWER_CHARS = 1000
MAX_BRACE_DEPTH = 32
MAX_POWERS = 24
MAX_EXPONENT = 100_000
MAX_FACTORIAL_ARG = 1000
MAX_NUMBER_DIGITS = 120  # fast-path numbers only; longer ones go to math-verify
MAX_SCI_EXPONENT = 400
MAX_POW_BASE = 1000
MAX_POW_EXPONENT = 4000
# Two plain numbers are equal when |a - b| <= NUMERIC_REL_TOL * max(|a|, |b|) (exact rationals).
NUMERIC_REL_TOL = Fraction(1, 10**6)

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
# Control characters an answer may not contain: C0 except tab, newline and carriage return (line
# breaks inside a matrix or an aligned answer), DEL, and C1. A gold is cleaned of _CONTROL instead.
_ANSWER_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SPACING = re.compile(r"\\[!,;:>]|\\ |~|\\quad|\\qquad")
_LEFT_RIGHT = re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])")
_SCI = re.compile(r"^(-?\d+(?:\.\d+)?)\s*[eE]\s*([+-]?\d+)$")
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree(?![a-zA-Z])")
_PERCENT = re.compile(r"\\?%")
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_TRAILING_PUNCT = re.compile(r"[\s.;]+$")


def _clean_common(s: str) -> str:
    s = _CONTROL.sub("", s)
    s = s.replace("\\$", "")  # currency: \$18.90
    s = s.replace("$", "")  # math delimiters: $\frac{1}{2}$, $69$,$84$
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\displaystyle", "")
    s = s.replace("{,}", ",")
    s = _LEFT_RIGHT.sub("", s)
    s = _SPACING.sub(" ", s)
    s = s.replace("\\(", "").replace("\\)", "").replace("\\[", "").replace("\\]", "")
    s = _TRAILING_PUNCT.sub("", s.strip())
    s = re.sub(r"\s+", " ", s).strip()
    m = _SCI.match(s)
    if m:  # 4.5e33 -> 4.5\times 10^{33}: latex2sympy reads "e" as Euler's number
        s = f"{m.group(1)}\\times 10^{{{int(m.group(2))}}}"
    return s


def control_character(answer: str) -> str | None:
    """The first control character in an extracted answer (``\\boxed{1\\x00}``), or None. The
    grader scores such an answer 0 (counted as rejected, reason ``control_character``) instead
    of stripping it: ``1\\x00`` is not the answer ``1``."""
    m = _ANSWER_CONTROL.search(answer)
    return m.group(0) if m else None


def normalize_gold(gold: str) -> str:
    """The gold answer as the grader compares it: ``$`` wrappers, ``\\$``, ``\\!``, ``\\left`` /
    ``\\right``, ``\\dfrac`` and spacing commands removed; ``10,\\!080`` -> ``10080``; ``4.5e33``
    -> ``4.5\\times 10^{33}``.

    >>> normalize_gold("$69$,$84$"), normalize_gold("10,\\\\!080"), normalize_gold("\\\\$18.90")
    ('69,84', '10080', '18.90')
    """
    if not isinstance(gold, str):
        gold = str(gold)
    g = gold.replace(",\\!", "")  # 10,\!080: an explicit thousands separator
    return _clean_common(g)


def clean_answer(answer: str) -> str:
    """The same cleaning as :func:`normalize_gold` for an extracted model answer."""
    return _clean_common(answer.replace(",\\!", ""))


def split_top_level(s: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside (), [], {} (``(1,2),(3,4)`` -> two parts)."""
    parts: list[str] = []
    cur: list[str] = []
    depth = 0
    for c in s:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    parts.append("".join(cur))
    return [p.strip() for p in parts]


_INT = re.compile(r"^[+-]?\d+$")
_DEC = re.compile(r"^[+-]?(?:\d+\.\d*|\.\d+|\d+)$")
_FRAC_SLASH = re.compile(r"^([+-]?\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)$")
_FRAC_TEX = re.compile(r"^([+-]?)\\frac\s*\{\s*(\d+(?:\.\d+)?)\s*\}\s*\{\s*(\d+(?:\.\d+)?)\s*\}$")
_FRAC_TEX_SHORT = re.compile(r"^([+-]?)\\frac\s*(\d)\s*(\d)$")  # \frac12
_SCI_TEX = re.compile(
    r"^([+-]?\d+(?:\.\d+)?)\s*(?:\\times|\\cdot|\*|x)\s*10\s*\^\s*\{?\s*([+-]?\d+)\s*\}?$"
)
_APPROXIMATE = re.compile(r"\d\.\d|\.\d|\\times|\\cdot|[eE][+-]?\d")
_INT_POW = re.compile(r"^(\d{1,4})\s*\^\s*\{?\s*(\d{1,5})\s*\}?$")  # 2^{1009}
_POW10 = re.compile(r"^10\s*\^\s*\{?\s*([+-]?\d+)\s*\}?$")


def _dec(s: str) -> Fraction:
    return Fraction(s)  # only called on short plain decimals matched above


def as_number(s: str) -> Fraction | None:
    """An exact rational for a plain number (``025``, ``-3.50``, ``7/2``, ``\\frac{7}{2}``,
    ``1.2\\times 10^{-3}``, ``10^{5}``, ``1,234``), or None. Never slow: digit counts and
    exponents are bounded before any arithmetic."""
    s = s.strip().replace(" ", "")
    if not s or len(s) > MAX_NUMBER_DIGITS:
        return None
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    if _DEC.match(s):
        return _dec(s)
    m = _FRAC_SLASH.match(s) or _FRAC_TEX.match(s) or _FRAC_TEX_SHORT.match(s)
    if m:
        if m.re is _FRAC_SLASH:
            num, den, sign = m.group(1), m.group(2), ""
        else:
            sign, num, den = m.group(1), m.group(2), m.group(3)
        d = _dec(den)
        if d == 0:
            return None
        value = _dec(num) / d
        return -value if sign == "-" else value
    m = _INT_POW.match(s)
    if m and m.group(1) != "10":
        base, exp = int(m.group(1)), int(m.group(2))
        if base > MAX_POW_BASE or exp > MAX_POW_EXPONENT:
            return None
        return Fraction(base) ** exp
    m = _SCI_TEX.match(s) or _POW10.match(s)
    if m:
        mant = _dec(m.group(1)) if m.re is _SCI_TEX else Fraction(1)
        exp = int(m.group(2) if m.re is _SCI_TEX else m.group(1))
        if abs(exp) > MAX_SCI_EXPONENT:
            return None
        return mant * Fraction(10) ** exp
    return None


def _text_words(s: str) -> str | None:
    """Lower-cased letters of a pure text answer (``\\text{Evelyn}``, ``\\text{(C)}``), else None."""
    inner = _TEXT_CMD.sub(lambda m: m.group(1), s).strip()
    inner = inner.strip("()").strip()
    if re.fullmatch(r"[A-Za-z][A-Za-z ]*", inner) and (s.startswith("\\text") or len(inner) > 1):
        return " ".join(inner.lower().split())
    return None


def _canonical(s: str) -> str:
    s = _TEXT_CMD.sub(lambda m: m.group(1), s)
    s = _DEGREES.sub("", s)
    s = _PERCENT.sub("", s)
    s = s.replace("\\frac", "\\frac ")
    return re.sub(r"\s+", "", s)


def fast_verdict(pred: str, gold: str) -> float | None:
    """1.0 or 0.0 when certain without sympy; None when math-verify must decide.

    Certain means: identical after cosmetic normalisation (1.0); two plain numbers (integers,
    decimals, fractions, scientific notation): exactly equal for an integer or fraction gold,
    within a relative 1e-6 for a decimal or scientific gold (1.0), or not (0.0); an integer gold
    and an answer without a digit (0.0); a text gold such as ``\\text{Evelyn}`` compared as words
    (either verdict; sympy would read the word as a product of symbols and accept anagrams); a
    plain number against a list, an interval or an expression in a free variable (0.0).
    """
    if not pred:
        return 0.0
    cg, cp = _canonical(gold), _canonical(pred)
    if cg == cp:
        return 1.0
    words_gold = _text_words(gold)
    if words_gold is not None and not any(ch.isdigit() for ch in gold):
        words_pred = _text_words(pred) if not pred.startswith("\\text") else _text_words(pred)
        if words_pred is None:
            words_pred = " ".join(re.sub(r"[^A-Za-z ]", "", _canonical(pred)).lower().split())
        return 1.0 if words_pred == words_gold else 0.0
    ng = as_number(cg)
    if ng is None:
        if as_number(cp) is not None and _cannot_be_a_number(gold):
            return 0.0
        return None
    if "," in cp and "," not in cg and not _THOUSANDS.match(cp):
        return None  # a list against a number: math-verify decides
    np_ = as_number(cp)
    if np_ is not None:
        # Two plain numbers: decided here. An integer or fraction gold is exact; a decimal or
        # scientific-notation gold (a measured value, e.g. Minerva's 4.5e33) allows a relative
        # NUMERIC_REL_TOL. (math-verify rounds to 6 decimal places, which calls 2.88e-19 and
        # 1.325e-27 equal, and 3986729 and 3986730 nothing worse than close.)
        if not _APPROXIMATE.search(cg):
            return 1.0 if np_ == ng else 0.0
        scale = max(abs(ng), abs(np_))
        return 1.0 if abs(ng - np_) <= NUMERIC_REL_TOL * scale else 0.0
    if ng.denominator == 1 and _INT.match(cg) and not any(ch.isdigit() for ch in cp):
        return 0.0
    return None


# numeric towers only: 9^9^9, 10^{10^{10}}, 2^{3^{4^5}} (symbolic ones such as e^{x^2} are real
# answers; they go to the bounded worker)
_RELATION = re.compile(r"=|<|>|\\le|\\ge|\\ne|\\in(?![a-z])|\\to|\\approx|\\sim|\\equiv")
_COMMAND = re.compile(r"\\[A-Za-z]+")
_TEXT_GROUP = re.compile(r"\\(?:text|mathrm|textbf|mbox|operatorname)\s*\{[^{}]*\}")
# letters that may stand for constants in a gold (Euler's e, the imaginary unit)
_FREE_LETTER = re.compile(r"[a-df-hj-zA-DF-HJ-Z]")


def _cannot_be_a_number(gold: str) -> bool:
    """True when no plain number can equal ``gold``: a list of several answers, an interval or
    tuple, or an expression in a free variable (``x+1``, ``2n-2``) that is not a relation."""
    if len(split_top_level(gold)) >= 2 and not _THOUSANDS.match(gold.replace(" ", "")):
        return True
    g = gold.strip()
    if g[:1] in "([" and g[-1:] in ")]" and len(split_top_level(g[1:-1])) >= 2:
        return True
    if _RELATION.search(g) or "\\text" in g or "\\mathrm" in g or "\\operatorname" in g:
        return False  # units, words and equations: math-verify decides
    bare = _COMMAND.sub(" ", _TEXT_GROUP.sub(" ", g))
    return bool(_FREE_LETTER.search(bare))


_TOWER_BRACED = re.compile(r"\^\s*\{\s*\(?\s*[\d.]+\s*\)?\s*\^")
_TOWER_BARE = re.compile(r"\^\s*[({]?\s*[\d.]+\s*[)}]?\s*\^")
_TOWER_STARSTAR = re.compile(r"\*\*\s*\(?\s*[\d.]+\s*\)?\s*\*\*")
_EXPONENT_NUM = re.compile(r"(?:\^|\*\*)\s*\{?\s*\(?\s*[+-]?\s*(\d{6,}|\d+(?:\s*\d)*)")
_FACTORIAL = re.compile(r"(\d+)\s*\}?\s*!")
_FACTORIAL_OF_GROUP = re.compile(r"[)\]]\s*!|\^\s*\{[^{}]*\}\s*\}\s*!")


def pathological_reason(pred: str, gold: str) -> str | None:
    """Why ``pred`` is refused before sympy sees it, or None.

    Refused: longer than MAX_ANSWER_CHARS; braces nested deeper than MAX_BRACE_DEPTH; power
    towers (``9^9^9``, ``10^{10^{10}}``) unless the gold has one too; a numeric exponent above
    MAX_EXPONENT; a factorial of a number above MAX_FACTORIAL_ARG, of a bracketed expression, or
    a double factorial (unless the gold has a factorial); more than MAX_POWERS powers.
    These would cost sympy seconds to hours of big-integer arithmetic; none is a real answer.
    """
    if len(pred) > MAX_ANSWER_CHARS:
        return "too_long"
    depth = max_depth = 0
    for c in pred:
        if c in "{([":
            depth += 1
            if depth > max_depth:
                max_depth = depth
        elif c in "})]":
            depth -= 1
    if max_depth > MAX_BRACE_DEPTH:
        return "too_deep"
    if pred.count("^") + pred.count("**") > MAX_POWERS:
        return "too_many_powers"
    gold_has_tower = bool(_TOWER_BRACED.search(gold) or _TOWER_BARE.search(gold))
    if not gold_has_tower and (
        _TOWER_BRACED.search(pred) or _TOWER_BARE.search(pred) or _TOWER_STARSTAR.search(pred)
    ):
        return "power_tower"
    for m in _EXPONENT_NUM.finditer(pred):
        digits = re.sub(r"\s", "", m.group(1))
        if len(digits) > 6 or int(digits) > MAX_EXPONENT:
            return "huge_exponent"
    for m in _FACTORIAL.finditer(pred):
        if len(m.group(1)) > 4 or int(m.group(1)) > MAX_FACTORIAL_ARG:
            return "huge_factorial"
    if "!" in pred and "!" not in gold:
        # n! of an expression ((10^{6})!), double factorials and factorial chains: sympy evaluates
        # them exactly; a literal n! up to MAX_FACTORIAL_ARG is allowed (5! = 120 is an answer)
        if _FACTORIAL_OF_GROUP.search(pred) or "!!" in pred.replace(" ", "") or pred.count("!") > 4:
            return "huge_factorial"
    return None
