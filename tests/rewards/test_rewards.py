"""stapo.rewards: extraction, verdicts on real answer formats, time bounds, no execution."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from stapo.rewards import (
    all_boxed,
    extract_answer,
    fast_verdict,
    grade_batch,
    grading_stats,
    math_reward,
    normalize_gold,
    pathological_reason,
    reset_grading_stats,
    sandbox,
)

# An answer that passes the pathological-input filter but keeps sympy busy for seconds
# (binomial of a 10-digit number): the time bound has to come from the worker machinery.
SLOW_ANSWER = r"\boxed{\binom{10^{9}}{10^{5}}}"


# ---------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "completion, expected",
    [
        (r"so $x = \boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
        (r"\boxed{1} first, then \boxed{2}", "2"),  # the last box
        (r"\boxed{1} then a truncated \boxed{2", "1"),  # an unclosed last box is skipped
        (r"\boxed{\boxed{3}}", "3"),
        (r"\fbox{x^{2}}", "x^{2}"),
        (r"\boxed 5.", "5"),
        (r"\boxed{a\{b\}}", r"a\{b\}"),  # escaped braces do not close the box
        (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
        ("The final answer is $\\frac{3}{4}$. I hope it is correct.", r"\frac{3}{4}"),
        ("Answer: 12", "12"),
        ("**Final Answer:** 12", "12"),
        ("3 + 4 = 7, so 7 apples", "7"),  # last number
        ("It costs 1,234 dollars", "1,234"),
        ("-3.5 is it", "-3.5"),
        ("no number here", None),
        ("", None),
    ],
)
def test_extract_answer_table(completion, expected):
    assert extract_answer(completion) == expected


def test_extract_modes():
    text = "3 + 4 = 7"
    assert extract_answer(text, mode="auto") == "7"
    assert extract_answer(text, mode="answer") is None
    assert extract_answer(text, mode="boxed") is None
    assert extract_answer("Answer: 7", mode="answer") == "7"
    assert extract_answer("Answer: 7", mode="boxed") is None
    assert extract_answer(r"\boxed{7}", mode="boxed") == "7"
    with pytest.raises(ValueError, match="mode"):
        extract_answer("x", mode="box")


def test_all_boxed_order_and_nesting():
    assert all_boxed(r"\boxed{69} and \boxed{84} \fbox{\boxed{1}}") == ["69", "84", r"\boxed{1}"]


def test_extraction_is_linear_on_adversarial_text():
    # 150k unclosed boxes: a naive scanner is quadratic (minutes); this must be well under 2 s
    start = time.monotonic()
    assert extract_answer("\\boxed{" * 150_000) is None
    assert extract_answer("\\boxed{" * 100_000 + "\\boxed{5}") == "5"
    assert time.monotonic() - start < 2.0


# ---------------------------------------------------------------- verdicts on real formats

# (completion, gold, expected verdict). Golds are written as the benchmark files write them.
FORMAT_TABLE = [
    # integers, zero padding (AIME), signs
    (r"\boxed{25}", "025", 1.0),
    (r"\boxed{025}", "25", 1.0),
    (r"\boxed{26}", "025", 0.0),
    (r"\boxed{-7}", "-7", 1.0),
    (r"\boxed{7}", "-7", 0.0),
    # fractions and decimals
    (r"\boxed{\frac{14}{3}}", r"\frac{14}{3}", 1.0),
    (r"\boxed{14/3}", r"\frac{14}{3}", 1.0),
    (r"\boxed{\dfrac{17}{50}}", r"\dfrac{17}{50}", 1.0),
    (r"\boxed{0.34}", r"\dfrac{17}{50}", 1.0),
    (r"\boxed{\frac{9}{19}}", r"\frac9{19}", 1.0),
    (r"\boxed{\frac{1}{3}}", r"\frac{1}{2}", 0.0),
    (r"\boxed{18.9}", r"\$18.90", 1.0),
    (r"\boxed{\$18.90}", r"\$18.90", 1.0),
    (r"\boxed{18.99}", r"\$18.90", 0.0),
    # radicals
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{\sqrt2}{2}", 1.0),
    (r"\boxed{\sqrt{8}}", r"2 \sqrt{2}", 1.0),
    (r"\boxed{2\sqrt{3}}", r"2 \sqrt{2}", 0.0),
    (r"\boxed{1+2\sqrt{3}}", r"1+2\sqrt{3}", 1.0),
    # intervals and tuples
    (r"\boxed{(2, \infty)}", r"(2,\infty)", 1.0),
    (r"\boxed{[2, \infty)}", r"(2,\infty)", 0.0),
    (r"\boxed{\left[ \frac{\pi^2}{8}, \frac{5 \pi^2}{4} \right]}",
     r"\left[ \frac{\pi^2}{8}, \frac{5 \pi^2}{4} \right]", 1.0),
    (r"\boxed{(3, \frac{\pi}{2})}", r"\left( 3, \frac{\pi}{2} \right)", 1.0),
    # degrees and percentages
    (r"\boxed{180}", r"180^\circ", 1.0),
    (r"\boxed{180^{\circ}}", r"180^\circ", 1.0),
    (r"\boxed{90^\circ}", r"180^\circ", 0.0),
    (r"\boxed{4.2\%}", "4.2", 1.0),
    (r"\boxed{4.2}", r"4.2\%", 1.0),
    # multiple answers: one box with a list, or one box per answer; order does not matter
    (r"\boxed{84, 69}", "$69$,$84$", 1.0),
    (r"first \boxed{69} and second \boxed{84}", "$69$,$84$", 1.0),
    (r"\boxed{69}", "$69$,$84$", 0.0),
    (r"\boxed{(3,2), (1,1)}", "$(1,1), (3,2)$", 1.0),
    # text around the box, $-wrapped golds (OlympiadBench)
    ("Lots of reasoning... so the answer is $\\boxed{\\frac{1}{2 n+2}}$. Done.", r"$\frac{1}{2 n+2}$", 1.0),
    (r"\boxed{\frac{1}{2n+1}}", r"$\frac{1}{2 n+2}$", 0.0),
    # thousands separators
    (r"\boxed{10080}", r"10,\!080", 1.0),
    (r"\boxed{10,080}", r"10,\!080", 1.0),
    (r"\boxed{10,081}", r"10,\!080", 0.0),
    # scientific notation (Minerva)
    (r"\boxed{4.5 \times 10^{33}}", "4.5e33", 1.0),
    (r"\boxed{4.5e33}", "4.5e33", 1.0),
    (r"\boxed{4.6 \times 10^{33}}", "4.5e33", 0.0),
    (r"\boxed{1.325 \times 10^{-27}}", "2.88e-19", 0.0),  # math-verify alone rounds both to 0
    (r"\boxed{0.0000000177}", "1.77e-8", 1.0),
    (r"\boxed{4.5000001 \times 10^{33}}", "4.5e33", 1.0),  # a measured gold: relative 1e-6
    (r"\boxed{3986730}", "3986729", 0.0),  # an integer gold is exact, however large
    (r"\boxed{11111111101}", r"11,\! 111,\! 111,\! 100", 0.0),
    (r"\boxed{11111111100}", r"11,\! 111,\! 111,\! 100", 1.0),
    # text answers: words, letters; sympy would read a word as a product of letters
    (r"\boxed{\text{Evelyn}}", r"\text{Evelyn}", 1.0),
    (r"\boxed{Evelyn}", r"\text{Evelyn}", 1.0),
    (r"\boxed{Nevely}", r"\text{Evelyn}", 0.0),
    (r"\boxed{C}", r"\text{(C)}", 1.0),
    (r"\boxed{(B)}", r"\text{(C)}", 0.0),
    # expressions and equations
    (r"\boxed{x=5}", "5", 1.0),
    (r"\boxed{q - p}", "p - q", 0.0),
    (r"\boxed{-q + p}", "p - q", 1.0),
    # fallbacks without a box
    ("The final answer is 42.", "42", 1.0),
    ("so 3 + 4 = 7", "7", 1.0),
    ("no answer at all", "7", 0.0),
]


@pytest.mark.parametrize("completion, gold, expected", FORMAT_TABLE)
def test_answer_format_table(completion, gold, expected):
    assert math_reward(completion, gold, timeout=10.0) == expected


def test_require_boxed():
    assert math_reward("so 3 + 4 = 7", "7") == 1.0
    assert math_reward("so 3 + 4 = 7", "7", require_boxed=True) == 0.0
    assert math_reward(r"so \boxed{7}", "7", require_boxed=True) == 1.0


def test_normalize_gold():
    assert normalize_gold("$69$,$84$") == "69,84"
    assert normalize_gold(r"10,\!080") == "10080"
    assert normalize_gold(r"\$18.90") == "18.90"
    assert normalize_gold(r"$\frac{1}{2 n+2}$") == r"\frac{1}{2 n+2}"
    assert normalize_gold("4.5e33") == r"4.5\times 10^{33}"
    assert normalize_gold(r"\left( 3, \frac{\pi}{2} \right)") == r"( 3, \frac{\pi}{2} )"


def test_fast_verdict_is_conservative():
    assert fast_verdict("25", "025") == 1.0
    assert fast_verdict("24", "025") == 0.0
    assert fast_verdict(r"\frac{1}{2}", "0.5") == 1.0
    assert fast_verdict("x", "5") == 0.0  # no digit against an integer
    assert fast_verdict(r"\sqrt{4}", "2") is None  # needs sympy
    assert fast_verdict("1,2", "3") is None  # a list against a number: sympy decides


def test_pathological_filter():
    gold = "1"
    for pred, reason in [
        ("9^9^9^9", "power_tower"),
        ("10^{10^{10}}", "power_tower"),
        ("2**3**4", "power_tower"),
        ("10^{1000000}", "huge_exponent"),
        ("100000!", "huge_factorial"),
        ("(10^{6})!", "huge_factorial"),
        ("{" * 40 + "}" * 40, "too_deep"),
        ("1" * 5000, "too_long"),
    ]:
        assert pathological_reason(pred, gold) == reason, pred
    for ok in ["e^{x^2}", "2^{1009}", "5!", r"\frac{1}{2}", "x^2y^2"]:
        assert pathological_reason(ok, gold) is None, ok
    # a tower gold allows a tower answer
    assert pathological_reason("2^{2^{3}}", "2^{2^{3}}") is None


def test_stats_count_rejections_and_no_answers():
    reset_grading_stats()
    assert math_reward(r"\boxed{9^9^9^9}", "5") == 0.0
    assert math_reward("nothing", "5") == 0.0
    assert math_reward(r"\boxed{5}", "5") == 1.0
    s = grading_stats()
    assert s["graded"] == 3 and s["correct"] == 1
    assert s["rejected"] == 1 and s["rejected_reasons"] == {"power_tower": 1}
    assert s["no_answer"] == 1 and s["fast_path"] == 1


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="timeout"):
        math_reward("x", "1", timeout=0)
    with pytest.raises(ValueError, match="2 golds"):
        grade_batch(["a"], ["1", "2"])
    with pytest.raises(ValueError, match="workers"):
        grade_batch(["a"], ["1"], workers=0)
    with pytest.raises(ValueError, match="mode"):
        math_reward("x", "1", mode="box")
    with pytest.raises(ValueError, match="gold must be a string"):
        math_reward("x", None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"golds\[1\] must be a string"):
        grade_batch(["a", "b"], ["1", None])  # type: ignore[list-item]
    assert math_reward(r"\boxed{27}", 27) == 1.0  # numeric golds (AMC's 27.0) are fine


@pytest.mark.parametrize("completion", [None, 1, b"\\boxed{1}", [1], [{"role": "assistant", "content": None}]])
def test_unreadable_completion_is_a_type_error(completion):
    # it used to score 0.0 silently: a caller passing the wrong shape saw a policy that never learns
    with pytest.raises(TypeError, match="completion"):
        math_reward(completion, "1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"completions\[1\]"):
        grade_batch(["\\boxed{1}", completion], ["1", "1"])  # type: ignore[list-item]


def test_chat_message_completion_is_graded_like_its_text():
    # TRL passes conversational completions as a list of messages
    assert math_reward([{"role": "assistant", "content": "so \\boxed{2}"}], "2") == 1.0
    assert math_reward([{"role": "assistant", "content": "so \\boxed{3}"}], "2") == 0.0
    assert math_reward({"role": "assistant", "content": "\\boxed{2}"}, "2") == 1.0
    parts = [{"role": "assistant", "content": [{"type": "text", "text": "so \\boxed{2}"}]}]
    assert math_reward(parts, "2") == 1.0
    # only the assistant's words count: a boxed answer in an echoed user turn is not the model's
    echoed = [{"role": "user", "content": "\\boxed{2}?"}, {"role": "assistant", "content": "no idea"}]
    assert math_reward(echoed, "2", require_boxed=True) == 0.0
    assert grade_batch([[{"role": "assistant", "content": "\\boxed{2}"}], "\\boxed{2}"], ["2", "2"]) == [1.0, 1.0]


@pytest.mark.parametrize("junk", ["\x00", "\x07", "\x1b", "\x7f", "\x9b"])
def test_control_characters_in_an_answer_grade_wrong(junk):
    # \boxed{1\x00} used to grade equal to 1: the cleaning step stripped the control character
    reset_grading_stats()
    assert math_reward("\\boxed{1}", "1") == 1.0
    assert math_reward(f"\\boxed{{1{junk}}}", "1") == 0.0
    assert math_reward(f"\\boxed{{{junk}1}}", "1") == 0.0
    assert math_reward(f"The answer is 1{junk}", "1") == 0.0
    assert grade_batch([f"\\boxed{{1{junk}2}}"], ["12"]) == [0.0]
    assert grading_stats()["rejected_reasons"] == {"control_character": 4}


@pytest.mark.parametrize("junk", ["\x0b", "\x0c", "\x1f", "\x85"])
def test_whitespace_like_control_characters_inside_an_answer_grade_wrong(junk):
    # str.strip() counts these as whitespace, so only inside an answer are they still there to refuse
    assert math_reward(f"\\boxed{{1{junk}2}}", "12") == 0.0


def test_line_breaks_in_an_answer_are_not_control_characters():
    assert math_reward("\\boxed{x +\r\n 1}", "x+1") == 1.0
    assert math_reward("\\boxed{x +\n 1}", "x+1") == 1.0
    assert math_reward("\\boxed{1\t}", "1") == 1.0


# ---------------------------------------------------------------- batches


def test_grade_batch_matches_math_reward():
    rows = FORMAT_TABLE[:20]
    comps = [c for c, _, _ in rows]
    golds = [g for _, g, _ in rows]
    expected = [e for _, _, e in rows]
    assert grade_batch(comps, golds, timeout=10.0, workers=2) == expected
    assert grade_batch(comps, golds, timeout=10.0, workers=1) == expected
    assert grade_batch([], [], timeout=1.0) == []


# ---------------------------------------------------------------- time bounds


def _timed(fn):
    start = time.monotonic()
    value = fn()
    return value, time.monotonic() - start


def test_timeout_main_thread():
    sandbox.warmup(1)
    reset_grading_stats()
    verdict, elapsed = _timed(lambda: math_reward(SLOW_ANSWER, "1", timeout=1.0))
    assert verdict == 0.0
    assert elapsed < 1.0 + 0.75
    assert grading_stats()["timeouts"] == 1


def test_timeout_in_worker_thread():
    sandbox.warmup(1)
    reset_grading_stats()
    result = {}

    def target():
        result["value"], result["elapsed"] = _timed(lambda: math_reward(SLOW_ANSWER, "1", timeout=1.0))

    t = threading.Thread(target=target)
    t.start()
    t.join(30)
    assert not t.is_alive()
    assert result["value"] == 0.0 and result["elapsed"] < 1.75
    assert grading_stats()["timeouts"] == 1


def test_hard_kill_of_an_unresponsive_worker():
    """A worker that never answers (stopped) is killed at the deadline and replaced."""
    sandbox.warmup(2)
    w = sandbox._POOL.acquire(time.monotonic() + 60)
    os.kill(w.proc.pid, signal.SIGSTOP)
    sandbox._POOL.release(w, healthy=True)  # the most recently released worker is used next
    reset_grading_stats()
    killed_before = grading_stats()["workers_killed"]
    verdict, elapsed = _timed(lambda: math_reward(r"\boxed{\sqrt{4}}", "2", timeout=1.0))
    assert verdict == 0.0 and elapsed < 1.5
    s = grading_stats()
    assert s["timeouts"] == 1 and s["workers_killed"] == killed_before + 1
    assert w.proc.poll() is not None  # it is gone
    # and grading goes on with a fresh worker
    assert math_reward(r"\boxed{\sqrt{4}}", "2", timeout=30.0) == 1.0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_uses_its_own_workers():
    """A fork (DataLoader workers, some reward servers) must not talk to the parent's workers."""
    import warnings

    sandbox.warmup(1)
    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads alive
        pid = os.fork()
    if pid == 0:  # child
        try:
            v = math_reward(r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt2}", timeout=30.0)
            os.write(write_fd, str(v).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    _, status = os.waitpid(pid, 0)
    got = os.read(read_fd, 100).decode()
    os.close(read_fd)
    assert status == 0 and got == "1.0"
    # the parent's workers were not disturbed
    assert math_reward(r"\boxed{\sqrt{9}}", "3", timeout=30.0) == 1.0


_CHILD = r"""
import json, sys, time
from stapo.rewards import math_reward, grading_stats
from stapo.rewards import sandbox
sandbox.warmup(1)
t = time.monotonic()
v = math_reward(sys.argv[1], "1", timeout=1.0)
ok = math_reward(r"\boxed{\sqrt{4}}", "2", timeout=30.0)
print(json.dumps({"v": v, "elapsed": time.monotonic() - t, "ok": ok, "timeouts": grading_stats()["timeouts"]}))
"""


def test_timeout_in_subprocess():
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, SLOW_ANSWER], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    import json

    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["v"] == 0.0 and r["timeouts"] == 1 and r["ok"] == 1.0


_FIRST_ANSWER = r"""
import json, sys, time
from stapo.rewards import grading_stats, math_reward, trl_reward_fn, warmup
if sys.argv[1] == "trl":
    reward = trl_reward_fn(timeout=1.0)  # set-up: the workers start here
    grade = lambda: reward(completions=[sys.argv[2]], answer=["4"])[0]
else:
    warmup()
    grade = lambda: math_reward(sys.argv[2], "4", timeout=1.0)
ready = grading_stats()["workers_started"]
t = time.monotonic()
v = grade()
print(json.dumps({"v": v, "elapsed": time.monotonic() - t, "ready": ready, "timeouts": grading_stats()["timeouts"]}))
"""


@pytest.mark.parametrize("setup", ["trl", "warmup"])
def test_the_first_answer_of_a_process_is_bounded_by_its_timeout(setup):
    """The issue's case: 4.3 s for a 1 s timeout, the worker's start-up (sympy imports) paid by the
    first answer. Grading set-up starts the workers, so the first answer is bounded like any other."""
    out = subprocess.run([sys.executable, "-c", _FIRST_ANSWER, setup, r"\boxed{\exp(\exp(\exp(100)))}"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    import json

    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["ready"] >= 1  # started before the first answer was due
    assert r["v"] == 0.0 and r["elapsed"] < 1.0 + 0.75, r


def _pool_item(args):
    completion, gold = args
    t = time.monotonic()
    v = math_reward(completion, gold, timeout=1.0)
    return v, time.monotonic() - t


def test_math_reward_inside_a_daemonic_process_pool():
    """multiprocessing.Pool workers are daemonic (they may not use multiprocessing children);
    grading workers are plain subprocesses, so it works there too."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        fast = pool.map(_pool_item, [(r"\boxed{5}", "5")])
        slow = pool.map(_pool_item, [(SLOW_ANSWER, "1")])
        correct = pool.map(_pool_item, [(r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt2}")])
    assert fast[0][0] == 1.0
    assert slow[0][0] == 0.0
    assert correct[0][0] == 1.0


# ---------------------------------------------------------------- no execution


@pytest.mark.parametrize(
    "template",
    [
        r"\boxed{__import__('os').system('touch {path}')}",
        "The answer is __import__('os').system('touch {path}')",
        r"\boxed{\text{__import__('os').system('touch {path}')}}",
        r"\boxed{eval(\"__import__('os').system('touch {path}')\")}",
        "Answer: (lambda: __import__('os').system('touch {path}'))()",
        r"\boxed{().__class__.__base__.__subclasses__()} and open('{path}','w')",
        "\\boxed{1} __import__('subprocess').run(['touch','{path}'])",
    ],
)
def test_injection_is_not_executed(tmp_path, template):
    path = tmp_path / "PWNED"
    completion = template.replace("{path}", str(path))
    assert math_reward(completion, "1", timeout=5.0) in (0.0, 1.0)
    assert grade_batch([completion] * 2, ["1", "x"], timeout=5.0, workers=2) is not None
    assert not path.exists()


def test_worker_refuses_to_compile_source_text(tmp_path):
    """Defence in depth: even a direct sympy parse_expr inside the worker is refused."""
    path = tmp_path / "PWNED2"
    w = sandbox._POOL.acquire(time.monotonic() + 60)
    try:
        # the worker parses "\boxed{<pred>}" with latex2sympy; send text that reaches sympify
        # paths and check the audit hook did not let a string be compiled into a file write
        reply = w.request(f"__import__('os').system('touch {path}')", "1", 5.0)
    finally:
        sandbox._POOL.release(w, healthy=True)
    assert reply is not None and reply["verdict"] == 0.0
    assert not path.exists()
    from stapo.rewards._worker import _safe_source

    assert _safe_source("Integer (12 )") and _safe_source("Float ('1.5' )")
    assert not _safe_source("__import__('os').system('x')")
    assert not _safe_source("Integer(1).__class__")
    assert not _safe_source("open('x', 'w')")


_HOOK_CHILD = r"""
import os, sys
from stapo.rewards._worker import _audit
sys.addaudithook(_audit)
path = sys.argv[1]
blocked = []
for attempt in (
    lambda: eval("__import__('os').system('touch ' + path)"),
    lambda: exec("open(path, 'w').write('x')"),
    lambda: open(path, "w"),
    lambda: os.system("touch " + path),
    lambda: __import__("subprocess").run(["touch", path]),
):
    try:
        attempt()
    except RuntimeError as e:
        blocked.append("blocked" in str(e))
print(sum(blocked))
"""


def test_audit_hook_blocks_code_and_writes(tmp_path):
    path = tmp_path / "PWNED3"
    out = subprocess.run(
        [sys.executable, "-c", _HOOK_CHILD, str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "5"
    assert not path.exists()


# ---------------------------------------------------------------- TRL / verl shapes


def test_trl_reward_fn_with_text_and_conversational_completions():
    from stapo.rewards import trl_reward_fn

    fn = trl_reward_fn()
    assert fn.__name__ == "math_accuracy"
    prompts = [[{"role": "user", "content": "1+1?"}]] * 3
    completions = [
        [{"role": "assistant", "content": "It is \\boxed{2}."}],
        [{"role": "assistant", "content": "It is \\boxed{3}."}],
        [{"role": "assistant", "content": "so 1 + 1 = 2"}],
    ]
    assert fn(prompts=prompts, completions=completions, answer=["2", "2", "2"]) == [1.0, 0.0, 1.0]
    assert fn(prompts=["p"], completions=["\\boxed{5}"], answer=["5"], other=[1]) == [1.0]
    strict = trl_reward_fn(answer_key="solution", require_boxed=True)
    assert strict(prompts=["p", "p"], completions=["\\boxed{2}", "2"], solution=["2", "2"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="no 'answer' column"):
        fn(prompts=["p"], completions=["x"], solution=["1"])
    logged = {}
    fn(
        prompts=["p"] * 4,
        completions=["\\boxed{2}", "nothing", "\\boxed{9^9^9^9}", "\\boxed{2}"],
        completion_ids=[[1]] * 4,
        answer=["2"] * 4,
        trainer_state=None,
        log_metric=lambda name, value: logged.__setitem__(name, value),
    )
    assert logged["grading/no_answer_frac"] == 0.25 and logged["grading/rejected_frac"] == 0.25
    assert logged["grading/timeouts_frac"] == 0.0


def test_verl_compute_score():
    from stapo.rewards import compute_score

    assert compute_score("math500", "so \\boxed{\\frac{1}{2}}", "0.5") == 1.0
    assert compute_score("math500", "so \\boxed{3}", ["$3$"]) == 1.0
    assert compute_score("math500", "so 3", "3", extra_info={"require_boxed": True}) == 0.0
