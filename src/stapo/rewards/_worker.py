"""The grading worker: a small process that runs math-verify on one (answer, gold) pair at a time.

Started by :mod:`stapo.rewards.sandbox` as ``python _worker.py`` (by path, so it imports neither
stapo nor torch) and spoken to over stdin/stdout, one JSON object per line:

    -> {"pred": "...", "gold": "...", "soft_timeout": 4.0}
    <- {"verdict": 1.0, "status": "ok" | "no_parse" | "gold_no_parse" | "soft_timeout" | "error"}

Why a process: math-verify bounds its own time with ``signal.alarm``, which only works in a main
thread and cannot interrupt long C-level big-integer arithmetic. The parent kills this process
when a reply is late and starts a new one, which works from any thread of any process.

Defence in depth against executing model output (the parsing path is latex2sympy's ANTLR
grammar, which builds sympy objects and evaluates no strings, and math-verify's sympy
``parse_expr`` path is never enabled here): after warm-up an audit hook refuses any compile of
source text, process creation, and file writes in this process.
"""

import json
import os
import re
import signal
import sys
from functools import lru_cache
from typing import Any, NoReturn


class _SoftTimeout(BaseException):  # not Exception: math-verify swallows those
    pass


def _on_alarm(signum: int, frame: object) -> NoReturn:
    raise _SoftTimeout()


_BLOCKED_EVENTS = (
    "os.system",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.fork",
    "os.forkpty",
    "subprocess.Popen",
    "pty.spawn",
    "os.remove",
    "os.rename",
    "os.rmdir",
    "os.mkdir",
    "os.symlink",
    "os.link",
    "os.truncate",
    "shutil.rmtree",
    "socket.connect",
    "socket.bind",
    "ctypes.dlopen",
)


_SAFE_NAMES = frozenset(
    {"Integer", "Float", "Rational", "Symbol", "Number", "E", "I", "pi", "oo", "zoo", "nan"}
)
_QUOTED_LITERAL = re.compile(r"'[\w.+\-]*'")
_UNSAFE_CHAR = re.compile(r"[^\w\s().,'+\-*/]")
_NAME = re.compile(r"[A-Za-z_]\w*")


def _safe_source(source: str) -> bool:
    """True for the sources sympy compiles by itself while parsing numbers and polynomials."""
    if source == "from sympy import *":
        return True
    if "__" in source or "import" in source or "lambda" in source:
        return False
    if source.startswith("def monomial_") and "." not in source and "'" not in source:
        return True  # sympy.polys.monomials codegen: fixed templates, no caller input
    bare = _QUOTED_LITERAL.sub("''", source)
    if _UNSAFE_CHAR.search(bare):
        return False
    return all(name in _SAFE_NAMES for name in _NAME.findall(bare))


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event in _BLOCKED_EVENTS:
        raise RuntimeError(f"blocked in the grading worker: {event}")
    if event == "compile":
        # Source text compiled at run time. Imports compile files with a real path; sympy itself
        # evals number literals (sympy.Number("12") -> parse_expr -> eval("Integer (12 )")) and
        # generates a few polynomial helpers; anything else (a name that is not a sympy number
        # constructor, a dunder, an attribute access, a call we did not list) is refused.
        filename = args[1] if len(args) > 1 else None
        if isinstance(filename, (str, bytes)) and os.fsdecode(filename).endswith(".py"):
            return
        source = args[0]
        if isinstance(source, bytes):
            source = source.decode("utf-8", "replace")
        if not isinstance(source, str) or not _safe_source(source):
            raise RuntimeError("blocked in the grading worker: compiling source text")
    if event == "open":
        mode = args[1] if len(args) > 1 else "r"
        flags = args[2] if len(args) > 2 else 0
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        )
        if writing:
            raise RuntimeError("blocked in the grading worker: opening a file for writing")


def main() -> None:
    # Memory cap: a runaway big-integer computation fails with MemoryError instead of eating
    # the machine (the parent's timeout catches the rest).
    try:
        import resource

        cap = int(os.environ.get("STAPO_GRADER_MEMORY_BYTES", str(4 << 30)))
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    except Exception:  # noqa: BLE001 - the memory cap is best effort; grading goes on without it
        pass

    import logging

    logging.disable(logging.CRITICAL)  # math-verify logs every timeout / parse failure
    from math_verify import LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(boxed_match_priority=0)]

    def parse_answer(text: str) -> Any:
        return parse("\\boxed{" + text + "}", extraction_config=config, parsing_timeout=None)

    @lru_cache(maxsize=4096)
    def parse_gold(text: str) -> Any:
        return parse_answer(text)

    # Warm up every lazy import on the paths we use, before the audit hook goes on.
    for g, p in (("\\frac{1}{2}", "0.5"), ("(2,\\infty)", "(2, \\infty)"), ("1,2", "2,1"),
                 ("x^2+\\sqrt{3}", "\\sqrt3+x^{2}"), ("\\text{(C)}", "C"), ("30^\\circ", "30"),
                 ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "(1,2)"), ("x=3", "3"), ("50\\%", "0.5"),
                 ("\\pi/2", "\\frac{\\pi}{2}"), ("[1,2)", "[1,2)"), ("a\\le b", "b\\ge a")):
        verify(parse_answer(g), parse_answer(p), timeout_seconds=None)
    if os.environ.get("STAPO_GRADER_NO_AUDIT") != "1":
        sys.addaudithook(_audit)
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the trainer, which kills us

    stdin, stdout = sys.stdin, sys.stdout
    stdout.write('{"ready": true}\n')
    stdout.flush()
    while True:
        line = stdin.readline()
        if not line:
            return  # the parent closed the pipe (or died)
        try:
            req = json.loads(line)
            soft = float(req.get("soft_timeout", 4.0))
        except Exception:  # noqa: BLE001 - any malformed request gets an error reply; the worker keeps serving
            stdout.write('{"verdict": 0.0, "status": "error", "detail": "bad request"}\n')
            stdout.flush()
            continue
        reply = {"verdict": 0.0, "status": "error"}
        try:
            signal.setitimer(signal.ITIMER_REAL, max(soft, 0.01))
            try:
                gold = parse_gold(req["gold"])
                if not gold:
                    reply = {"verdict": 0.0, "status": "gold_no_parse"}
                else:
                    pred = parse_answer(req["pred"])
                    if not pred:
                        reply = {"verdict": 0.0, "status": "no_parse"}
                    else:
                        ok = verify(gold, pred, timeout_seconds=None)
                        reply = {"verdict": 1.0 if ok else 0.0, "status": "ok"}
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except _SoftTimeout:
            reply = {"verdict": 0.0, "status": "soft_timeout"}
        except BaseException as e:  # noqa: BLE001 - any failure is a zero, never a crash
            reply = {"verdict": 0.0, "status": "error", "detail": type(e).__name__}
        stdout.write(json.dumps(reply) + "\n")
        stdout.flush()


if __name__ == "__main__":
    main()
