"""README.md and docs/*.md as a user reads them: every repository path they name exists, every
`stapo ...` line in a code block parses as the CLI would read it, and every config a `stapo train`
line names validates (the `--dry-run`), all in-process (argparse, load_config) to stay fast.
The README's Python blocks run as written."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from stapo.cli import build_parser, parse

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TOP_LEVEL = {p.name for p in REPO.iterdir() if not p.name.startswith(".")}


_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
_CODE = re.compile(r"`([^`\n]+)`")
_PATHLIKE = re.compile(r"^[\w.\-]+(/[\w.\-]+)*/?$")


def _text_outside_fences(text: str) -> str:
    return _FENCE.sub("", text)


def _repo_paths(doc: Path):
    text = doc.read_text(encoding="utf-8")
    for m in _LINK.finditer(text):
        target = (m.group(1) or m.group(2)).split("#")[0]
        if target and not re.match(r"^[a-z]+:", target):
            yield target, (doc.parent / target)
    for m in _CODE.finditer(_text_outside_fences(text)):
        span = m.group(1).strip()
        if "/" in span and _PATHLIKE.match(span) and span.split("/")[0] in TOP_LEVEL:
            yield span, REPO / span


def _command_lines(doc: Path):
    """`stapo ...` lines of the code blocks (continuations joined, comments dropped); synopsis lines
    with [optional] / a|b / ... placeholders are not commands."""
    for block in _FENCE.findall(doc.read_text(encoding="utf-8")):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            launch = line.startswith("accelerate launch")
            if not (line.startswith("stapo ") or launch):
                continue
            try:
                words = shlex.split(line, comments=True)
            except ValueError as err:
                raise AssertionError(f"{doc.name}: {line!r}: {err}") from None
            if any(w.startswith("[") or "|" in w or w == "..." for w in words):
                continue
            yield line, words


def _cases():
    return [pytest.param(doc, line, words, id=f"{doc.name}:{line[:60]}")
            for doc in DOCS for line, words in _command_lines(doc)]


def test_every_repository_path_named_in_the_docs_exists():
    missing = [f"{doc.relative_to(REPO)}: {shown}" for doc in DOCS for shown, path in _repo_paths(doc)
               if not path.exists()]
    assert not missing, "paths named in the docs that do not exist:\n" + "\n".join(missing)


def test_the_path_check_sees_links_and_code_paths(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("[a](docs/eval.md) `configs/demo.yaml` `src/stapo/nothing.py`\n```\nsrc/skip/me\n```\n")
    shown = [s for s, _ in _repo_paths(doc)]
    assert shown == ["docs/eval.md", "configs/demo.yaml", "src/stapo/nothing.py"]


def _stapo_argv(words: list[str]) -> tuple[list[str], str | None]:
    """argv after `stapo`, and the accelerate --config_file of a launch line."""
    if words[0] == "stapo":
        return words[1:], None
    config = words[words.index("--config_file") + 1] if "--config_file" in words else None
    return words[words.index("stapo") + 1:], config


@pytest.mark.parametrize("doc,line,words", _cases())
def test_every_documented_command_parses(doc, line, words, capsys):
    argv, accel_config = _stapo_argv(words)
    if accel_config is not None:
        import yaml

        assert (REPO / accel_config).is_file(), f"{line}: {accel_config} does not exist"
        assert isinstance(yaml.safe_load((REPO / accel_config).read_text()), dict)
    try:
        args = parse(argv, build_parser())
    except SystemExit:
        raise AssertionError(f"{doc.name}: `{line}` does not parse: {capsys.readouterr().err.strip()}") from None
    assert getattr(args, "func", None), f"{doc.name}: `{line}` names no command"


def _train_lines():
    return [pytest.param(doc, line, words, id=f"{doc.name}:{line[:60]}") for doc in DOCS
            for line, words in _command_lines(doc) if _stapo_argv(words)[0][:1] in (["train"], ["demo"])]


@pytest.mark.parametrize("doc,line,words", _train_lines())
def test_every_documented_train_line_dry_runs(doc, line, words):
    try:
        import stapo.engines.trl  # noqa: F401  - load_config validates TRL's fields through it
    except ImportError as err:
        pytest.skip(f"the TRL engine does not import at this commit ({err})")
    from stapo.config import ConfigError, load_config

    argv, _ = _stapo_argv(words)
    args = parse(argv, build_parser())
    if args.command == "demo":
        config, overrides = "demo", list(args.overrides) + ([f"output_dir={args.out}"] if args.out else [])
    else:
        config, overrides = args.config, args.overrides
        if config.endswith((".yaml", ".yml")) and not (REPO / config).exists():
            pytest.skip(f"{config} stands for the reader's own config")
    try:
        load_config(config, overrides)
    except ConfigError as err:
        raise AssertionError(f"{doc.name}: `{line} --dry-run` fails: {err}") from None


def test_readme_python_blocks_run(capsys):
    blocks = re.findall(r"^```python\n(.*?)^```", (REPO / "README.md").read_text(encoding="utf-8"), re.S | re.M)
    assert len(blocks) >= 2
    for n, code in enumerate(blocks):
        exec(compile(code, f"README.md python block {n + 1}", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    loss = float(re.search(r"loss (-?[\d.]+)", out).group(1))
    assert loss != 0.0  # the snippet shows a loss that moves the policy
    assert Path(out.strip().splitlines()[-1], "config.json").is_file()  # embedded_model_dir()
