"""A deterministic adversarial corpus of completions, for stress-testing a grader.

    adversarial_corpus(n, seed=0, marker_dir=None) -> list[tuple[str, str]]   (completion, gold)

Hand-written nasties (exponent towers, huge factorials, megabyte strings, deep nesting, unbalanced
LaTeX, unicode look-alikes, null bytes, thousands of boxes, code-injection attempts aimed at
Python's eval and sympy's parser) followed by generated items that mix realistic answers with
those fragments. Injection payloads would create files in ``marker_dir``; a safe grader leaves it
empty. Used by the fuzz tests and ``benchmarks/bench_grading.py``.
"""

from __future__ import annotations

import random

__all__ = ["GOLDS", "NUMERIC_GOLDS", "SYMBOLIC_GOLDS", "adversarial_corpus", "injection_payloads", "nasty_answers"]

# Golds as in RL math data: mostly numbers (DAPO-Math is all integers), some symbolic.
NUMERIC_GOLDS = ["1", "025", "-7", "42", "\\frac{1}{2}", "0.5", "4.5e33", "10,\\!080", "\\$18.90", "180^\\circ",
                 "2^{1009}"]
SYMBOLIC_GOLDS = ["\\sqrt{2}", "x+1", "(2,\\infty)", "$69$,$84$", "\\text{Evelyn}", "\\frac{\\pi}{4}"]
GOLDS = NUMERIC_GOLDS + SYMBOLIC_GOLDS


def _gold(rng: random.Random) -> str:
    return rng.choice(SYMBOLIC_GOLDS) if rng.random() < 0.1 else rng.choice(NUMERIC_GOLDS)


def injection_payloads(marker: str) -> list[str]:
    """Strings that would create ``marker`` if anything evaluated them as code."""
    cmd = f"touch {marker}"
    return [
        f"__import__('os').system('{cmd}')",
        f"eval(\"__import__('os').system('{cmd}')\")",
        f"exec(\"import os; os.system('{cmd}')\")",
        f"(lambda: __import__('os').system('{cmd}'))()",
        f"__builtins__.__import__('os').system('{cmd}')",
        f"().__class__.__base__.__subclasses__()[0].__init__.__globals__['sys'].modules['os'].system('{cmd}')",
        f"Symbol('x').__class__.__mro__[-1].__subclasses__() or open('{marker}', 'w')",
        f"getattr(__import__('os'), 'system')('{cmd}')",
        f"sympify(\"__import__('os').system('{cmd}')\")",
        f"parse_expr(\"__import__('os').system('{cmd}')\")",
        f"\\operatorname{{__import__}}('os').system('{cmd}')",
        f"\\text{{__import__('os').system('{cmd}')}}",
        f"\\mathrm{{eval}}(\\text{{open('{marker}','w')}})",
        f"1 + __import__('subprocess').run(['touch', '{marker}'])",
        f"Integer(1).__class__.__init__.__globals__['__builtins__']['open']('{marker}','w')",
    ]


def nasty_answers() -> list[str]:
    """Answer texts (to be boxed or stated) that are slow, huge or malformed."""
    return [
        "9^9^9^9", "9^{9^{9^{9}}}", "10^{10^{10}}", "2^{2^{2^{2^{2}}}}", "2**3**4**5", "(9^9)^{9^9}",
        "10^{1000000000}", "10^{99999999}", "2^{123456789}", "100000!", "(10^{6})!", "(10^{5})!!",
        "99999999!", "10!!!!!!!!!!", "\\binom{10^{9}}{10^{5}}", "\\prod_{n=1}^{10^{12}} n",
        "\\sum_{n=1}^{10^{10}} n^{n}", "\\int_0^{10^{9}} e^{x^{9}} dx", "\\lim_{x\\to 0} x^{x^{x}}",
        "{" * 5000 + "1" + "}" * 5000, "(" * 3000 + "1" + ")" * 3000, "\\frac{" * 500 + "1" + "}{2}" * 500,
        "\\sqrt{" * 400 + "2" + "}" * 400, "}" * 100 + "{" * 100, "\\frac{1}{", "\\left( 1, 2",
        "\\begin{pmatrix} 1 & 2",
        "\\end{array}", "$$$$$$", "\\\\\\\\\\\\", "^^^^^^^^", "_{_{_{_{_{", "\\boxed{", "\\fbox{\\boxed{",
        "５", "１/２", "𝟓", "Ⅻ", "х+1", "ｘ＋１", "\u200b5\u200b", "5\u202e1", "\ufeff1", "１０,０８０",
        "1\x00", "\x00" * 100, "1\x00\x00\x002", "\x1b[31m1\x1b[0m", "\udcff1", "💯", "∞", "√2", "½",
        "1" * 999, "9" * 5000, "1." + "0" * 5000 + "1", "1e999999999", "1e-999999999", "-" * 100 + "1",
        "0x1F", "0b101", "1_000", "nan", "inf", "-inf", "1/0", "0/0", "\\frac{1}{0}", "\\infty - \\infty",
        "x = y = z = 1", "a \\le b \\le c", "\\{1, 2, 3\\}", "\\emptyset", "\\mathbb{R}", "[0, 1) \\cup (2, 3]",
        "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\text{" + "a" * 900 + "}", "\\textbf{\\textit{\\text{1}}}",
    ]


# @A@ is the answer, @J@ some filler text
_WRAPPERS = [
    "\\boxed{@A@}",
    "The final answer is $\\boxed{@A@}$.",
    "Let me think.\n@J@\nSo the answer is \\boxed{@A@}",
    "Answer: @A@",
    "The final answer is @A@. I hope it is correct.",
    "@J@ @A@",
    "\\fbox{@A@} and then \\boxed{@A@}",
    "@A@",
    "\\boxed{@A@",  # unclosed
    "$\\boxed{@A@}$ $\\boxed{@A@}$ $\\boxed{@A@}$",
]

_JUNK = ["", "Step 1: 2 + 2 = 4.", "\\left( \\frac{a}{b} \\right)", "x^2 + y^2 = z^2", "中文 答案",
         "\\[ \\int_0^1 x dx \\]", "```python\nimport os\n```", "<think>hmm</think>", "$$ $$"]


def _realistic(rng: random.Random) -> str:
    kind = rng.randrange(8)
    if kind == 0:
        return str(rng.randint(-1000, 1000))
    if kind == 1:
        return f"{rng.randint(0, 99)}.{rng.randint(0, 999)}"
    if kind == 2:
        return f"\\frac{{{rng.randint(1, 50)}}}{{{rng.randint(1, 50)}}}"
    if kind == 3:
        return f"{rng.randint(1, 9)}.{rng.randint(0, 99)}e{rng.randint(-30, 30)}"
    if kind == 4:
        return f"0{rng.randint(0, 99)}"
    if kind == 5:
        return f"{rng.randint(1, 99)}\\%"
    if kind == 6:
        return f"{rng.randint(1, 360)}^\\circ"
    return f"{rng.randint(1, 99)},\\!{rng.randint(100, 999)}"


def adversarial_corpus(n: int = 10_000, seed: int = 0, marker_dir: str | None = None) -> list[tuple[str, str]]:
    """``n`` (completion, gold) pairs: every nasty once in a box, then generated mixtures.

    With ``marker_dir``, injection payloads name files in it (``PWNED_<i>``).
    """
    rng = random.Random(seed)
    items: list[tuple[str, str]] = []
    nasties = nasty_answers()
    payloads = injection_payloads(f"{marker_dir}/PWNED_0") if marker_dir else injection_payloads("/nonexistent/PWNED")
    for a in nasties + payloads:
        items.append((f"\\boxed{{{a}}}", _gold(rng)))
        items.append((f"The answer is {a}", _gold(rng)))
    # megabyte strings and thousands of boxes
    items.append(("x" * 1_000_000, "1"))
    items.append(("\\boxed{" * 150_000, "1"))
    items.append(("\\boxed{1}" * 100_000, "1"))
    items.append(("{" * 500_000 + "1" + "}" * 500_000, "1"))
    items.append(("1 " * 500_000, "1"))
    items.append(("\\boxed{" + "9" * 1_000_000 + "}", "9"))
    i = 0
    while len(items) < n:
        i += 1
        r = rng.random()
        if r < 0.80:
            a = _realistic(rng)
        elif r < 0.90:
            a = rng.choice(nasties)
        elif r < 0.95 and marker_dir:
            a = rng.choice(injection_payloads(f"{marker_dir}/PWNED_{i}"))
        else:
            alphabet = "0123456789+-*/^_{}()[]\\$., abcxyz=!%\x00５𝟓х"
            a = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        wrapper = rng.choice(_WRAPPERS)
        text = wrapper.replace("@J@", rng.choice(_JUNK)).replace("@A@", a)
        items.append((text, _gold(rng)))
    return items[:n] if n >= len(items) - 6 else items
