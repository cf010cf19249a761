"""Final-answer extraction from a model completion.

Everything here is linear-time string scanning (no regex backtracking over the whole text, no
parsing, no evaluation): the input is untrusted model output of any length.

Order of preference (``mode="auto"``, the default):

    1. the last complete ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces, ``\\boxed 5`` too);
    2. the last "final answer is X" / "answer is X" / "Answer: X" phrase;
    3. the last number in the text (integer, decimal or a/b fraction).

``mode="boxed"`` stops after step 1 (the paper's strict setting); ``mode="answer"`` stops after 2.
The last-number fallback exists because weak models often state the answer without a box: on the
embedded 135M model a boxed-only reward gives almost no learning signal.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Literal

__all__ = ["EXTRACTION_MODES", "all_boxed", "extract_answer", "last_boxed"]

EXTRACTION_MODES = ("auto", "answer", "boxed")

# Phrase and number fallbacks only look at the end of the text: the answer is stated last, and
# this bounds the regex work on megabyte-long completions.
FALLBACK_TAIL_CHARS = 4000

_ANSWER_PHRASE = re.compile(
    r"(?:final\s+answer\s*(?:is|:|=)|answer\s*(?:is|:|=)|answer\s*\*\*\s*:?)\s*:?\s*",
    re.IGNORECASE,
)
_SENTENCE_END = re.compile(r"[.;!?]\s+(?=[A-Z(])")
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?(?:\s*/\s*\d+)?(?![\w])")


_BRACE_EVENT = re.compile(r"[\\{}]")


def _braced(text: str, open_at: int, limit: int) -> int:
    """Index just past the brace group opening at ``text[open_at] == '{'``; -1 if it does not
    close before ``limit``. Jumps between braces and backslashes with a regex (C speed on long
    runs of plain text)."""
    depth = 0
    pos = open_at
    while True:
        m = _BRACE_EVENT.search(text, pos, limit)
        if m is None:
            return -1
        i = m.start()
        c = text[i]
        if c == "\\":
            pos = i + 2  # an escaped character (\{, \}, \\) never opens or closes a group
            continue
        depth += 1 if c == "{" else -1
        if depth == 0:
            return i + 1
        pos = i + 1


_BARE_TOKEN = re.compile(r"[^\s$.,;{}]{1,200}")


def _box_at(text: str, cmd_at: int, cmd: str, limit: int) -> tuple[str, int] | Literal[False] | None:
    """(content, end) of the box command at ``cmd_at``; None if it is not a box; False if its
    brace group does not close before ``limit`` (truncated)."""
    i = cmd_at + len(cmd)
    if i < len(text) and text[i].isalpha():
        return None  # \boxedx is another command
    j = i
    while j < len(text) and text[j] in " \t":
        j += 1
    if j >= len(text):
        return False
    if text[j] == "{":
        end = _braced(text, j, limit)
        return False if end < 0 else (text[j + 1 : end - 1], end)
    if j > i:
        # "\boxed 5": a single token, as TeX reads it
        m = _BARE_TOKEN.match(text, j)
        return (m.group(0), m.end()) if m else None
    return None


def _boxes_backward(text: str) -> Iterator[tuple[int, int, str]]:
    """Yield (start, end, content) of complete boxes from the last to the first, in linear time.

    Why linear: if the group opening at j never closes, no group opening before j can close after
    j either (the depth counted from it stays above the depth at j), so scans stop at the earliest
    unclosed box seen so far.
    """
    limit = len(text)
    # each command's next occurrence is searched once (rfind over the whole prefix every step
    # would be quadratic on a text made of thousands of boxes)
    at_boxed = text.rfind("\\boxed")
    at_fbox = text.rfind("\\fbox")
    while at_boxed >= 0 or at_fbox >= 0:
        if at_boxed >= at_fbox:
            at, cmd = at_boxed, "\\boxed"
            at_boxed = text.rfind("\\boxed", 0, at) if at > 0 else -1
        else:
            at, cmd = at_fbox, "\\fbox"
            at_fbox = text.rfind("\\fbox", 0, at) if at > 0 else -1
        found = _box_at(text, at, cmd, limit)
        if found is False:
            limit = at
        elif found is not None:
            content, end = found
            yield at, end, content


def all_boxed(text: str, max_count: int = 32) -> list[str]:
    """Contents of the last ``max_count`` complete top-level ``\\boxed{}`` / ``\\fbox{}``, in order
    of appearance (a box nested in another box is reported as part of the outer one)."""
    spans: list[tuple[int, int, str]] = []
    for at, end, content in _boxes_backward(text):
        # a box found later in the backward scan that encloses earlier-found ones replaces them
        while spans and spans[-1][0] < end and spans[-1][0] > at:
            spans.pop()
        spans.append((at, end, content))
        if len(spans) > max_count * 4:
            break
    spans.reverse()
    return [c.strip() for _, _, c in spans[-max_count:]]


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{}`` / ``\\fbox{}``; None if there is none.

    A truncated last box (no closing brace) is skipped in favour of an earlier complete one.
    ``\\boxed{\\boxed{x}}`` gives ``x``.
    """
    for _, _, content in _boxes_backward(text):
        content = content.strip()
        for _ in range(8):  # unwrap \boxed{\boxed{x}} (bounded: the input is untrusted)
            if content.startswith(("\\boxed", "\\fbox")):
                inner = next(_boxes_backward(content), None)
                if inner is not None and inner[1] == len(content):
                    content = inner[2].strip()
                    continue
            break
        return content
    return None


def _answer_after_phrase(tail: str) -> str | None:
    last = None
    for m in _ANSWER_PHRASE.finditer(tail):
        last = m
    if last is None:
        return None
    rest = tail[last.end() : last.end() + 500].lstrip()
    rest = rest.lstrip("*").lstrip()
    if rest.startswith("$"):
        close = rest.find("$", 1) if not rest.startswith("$$") else rest.find("$$", 2)
        if close > 0:
            inner = rest[2:close] if rest.startswith("$$") else rest[1:close]
            return inner.strip() or None
    if rest.startswith("\\(") and "\\)" in rest:
        return rest[2 : rest.index("\\)")].strip() or None
    if rest.startswith("\\["):
        close = rest.find("\\]")
        if close > 0:
            return rest[2:close].strip() or None
    line = rest.split("\n", 1)[0]
    line = _SENTENCE_END.split(line, 1)[0]  # "42. I hope it is correct." -> "42"
    line = line.strip().rstrip("*").strip()
    line = re.sub(r"[.;]+$", "", line).strip()
    return line or None


def extract_answer(completion: str, mode: str = "auto") -> str | None:
    """The final answer in ``completion``, as text, or None.

    ``mode``: ``"auto"`` (box, then answer phrase, then last number), ``"answer"`` (box, then
    answer phrase) or ``"boxed"`` (box only). See the module docstring for the exact order.

    >>> extract_answer(r"so $x = \\boxed{\\frac{1}{2}}$.")
    '\\\\frac{1}{2}'
    >>> extract_answer("The final answer is 42.")
    '42'
    >>> extract_answer("3 + 4 = 7") , extract_answer("3 + 4 = 7", mode="boxed")
    ('7', None)
    """
    if mode not in EXTRACTION_MODES:
        raise ValueError(f"mode must be one of {EXTRACTION_MODES}, got {mode!r}")
    if not isinstance(completion, str) or not completion:
        return None
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed
    if mode == "boxed":
        return None
    tail = completion[-FALLBACK_TAIL_CHARS:]
    phrase = _answer_after_phrase(tail)
    if phrase is not None:
        return phrase
    if mode == "answer":
        return None
    last = None
    for m in _NUMBER.finditer(tail):
        last = m
    if last is None:
        return None
    return re.sub(r"\s+", "", last.group(0))
