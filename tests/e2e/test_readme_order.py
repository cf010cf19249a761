"""The README's commands, run in the order written, in a fresh directory: none is refused because an
earlier one ran. Scaled down only by what the README itself says scales them; the commands that
need a GPU, the network or an hour are checked as test_docs checks every documented command
(parsed, the config dry-run)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from stapo.cli import build_parser, main, parse

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text(encoding="utf-8")
# what the README says makes a training command a smoke run, and the flags it names for `stapo eval`
SMOKE_OVERRIDES = ["max_steps=1", "eval_samples=1", "max_completion_length=8"]
SMALL_FLAGS = {"--limit": "1", "--samples": "2", "--max-new-tokens": "8"}


def readme_commands() -> list[str]:
    """Every command of the README's bash blocks in order (`a && b` is two commands, comments dropped)."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", README, re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            commands += [part.strip() for part in line.split("&&") if part.strip()]
    return commands


def _scaled(words: list[str]) -> list[str]:
    """stapo's argv, scaled down the README's way."""
    argv = words[1:]
    if argv[0] in ("demo", "train"):
        return argv + SMOKE_OVERRIDES
    flags = dict(SMALL_FLAGS)
    for i, word in enumerate(argv[:-1]):
        if word in flags:
            argv[i + 1] = flags.pop(word)
    if argv[:2] == ["analyze", "tokens"]:
        argv += [w for flag, value in flags.items() for w in (flag, value)]
    return argv


def test_the_scaling_is_the_readmes():
    assert " ".join(SMOKE_OVERRIDES) in README
    for flag in SMALL_FLAGS:
        assert f"`{flag}`" in README


def test_the_readme_commands_are_the_ones_this_test_knows():
    kinds = [_kind(c) for c in readme_commands()]
    assert kinds.count("run") >= 6 and "gpu" in kinds and "setup" in kinds


def _kind(command: str) -> str:
    words = shlex.split(command)
    if words[0] == "scripts/setup.sh":
        return "setup"  # what made this test's environment
    if words[:3] == [".venv/bin/python", "-m", "pytest"]:
        return "suite"  # this test suite
    if words[:2] == ["accelerate", "launch"]:
        return "gpu"
    if words[0] in ("python", ".venv/bin/python"):
        return "script"
    assert Path(words[0]).name == "stapo", command
    return "hub" if "--hub" in words else "run"


@pytest.mark.slow  # four smoke trainings, a small eval and analyses: ~6 min on a busy 2-core machine
def test_readme_commands_run_in_order_in_a_fresh_directory(tmp_path, monkeypatch, benchmark_dir, capsys):
    monkeypatch.chdir(tmp_path)
    import torch

    torch.set_num_threads(1)
    ran = []
    for command in readme_commands():
        kind = _kind(command)
        words = shlex.split(command)
        if kind == "setup":
            assert (REPO / words[0]).is_file()
        elif kind == "suite":
            assert words[-1] == "-q"
        elif kind == "gpu":
            argv = words[words.index("stapo") + 1:]
            assert (REPO / words[words.index("--config_file") + 1]).is_file()
            args = parse(argv, build_parser())
            from stapo.config import load_config

            load_config(args.config, args.overrides)  # the dry-run's validation, without vLLM here
        elif kind == "script":
            script = REPO / words[1]
            assert script.is_file(), command
            import subprocess
            import sys

            # the ten-run sweep takes over an hour: its options parse
            done = subprocess.run([sys.executable, str(script), *words[2:], "--help"], capture_output=True,
                                  text=True, timeout=300, cwd=REPO)
            assert done.returncode == 0, done.stderr
        elif kind == "hub":
            assert getattr(parse(words[1:], build_parser()), "func", None)
        else:
            argv = _scaled(words)
            code = main(argv)
            out = capsys.readouterr()
            assert code == 0, f"`{command}` (run as stapo {' '.join(argv)}) after {ran}:\n{out.err[-2000:]}"
            ran.append(command)
    assert ran[0] == ".venv/bin/stapo demo"  # the README's first command, then the rest
    assert (tmp_path / "runs/demo/final").is_dir() and (tmp_path / "runs/grpo/final").is_dir()
    assert (tmp_path / "report.html").is_file()
