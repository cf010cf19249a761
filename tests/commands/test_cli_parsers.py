"""Every parser of the `stapo` CLI, walked: options taken only as spelled (no abbreviations), every
option with a help line, examples that run, help texts that say what the code does."""

from __future__ import annotations

import argparse

import pytest

from stapo.cli import build_parser, main, parse


def subparsers_of(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return {name: sub for a in parser._actions if isinstance(a, argparse._SubParsersAction)
            for name, sub in a.choices.items()}


def _parsers():
    """(argv prefix, parser) for the root parser and every subcommand, depth first."""
    todo = [([], build_parser())]
    while todo:
        path, parser = todo.pop(0)
        yield path, parser
        todo.extend((path + [name], sub) for name, sub in subparsers_of(parser).items())


PARSERS = list(_parsers())
ROOT = PARSERS[0][1]
IDS = [" ".join(["stapo", *path]) for path, _ in PARSERS]


def _positional_fillers(parser: argparse.ArgumentParser) -> list[str]:
    """Values for the parser's required positionals, so that only the option under test is judged."""
    return ["x" for a in parser._actions if not a.option_strings and a.nargs in (None, "+")
            and not isinstance(a, argparse._SubParsersAction)]


def test_the_walk_sees_every_command():
    assert {" ".join(p) for p, _ in PARSERS} >= {"", "train", "eval", "demo", "analyze", "analyze tokens",
                                                  "analyze runs", "analyze counterfactual"}


@pytest.mark.parametrize("path,parser", PARSERS, ids=IDS)
def test_no_option_is_taken_from_an_abbreviation(path, parser):
    assert parser.allow_abbrev is False
    options = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    tried = 0
    for action in parser._actions:
        for option in action.option_strings:
            abbrev = option[:-1]
            # only a prefix that names this option alone would be taken as it
            if not option.startswith("--") or len(abbrev) < 3 or sum(o.startswith(abbrev) for o in options) != 1:
                continue
            if action.nargs == 0:
                argv = [abbrev]
            else:
                argv = [abbrev, (action.choices and str(next(iter(action.choices)))) or "1"]
            args, extra = ROOT.parse_known_args(path + argv + _positional_fillers(parser))
            assert abbrev in extra, f"stapo {' '.join(path)} {abbrev} is read as {option}"
            tried += 1
    assert tried or not options


def test_a_misspelled_option_is_refused_with_the_right_name(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(["eval", "--model", "embedded", "--benchmark", "aime24"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "stapo eval: error: unrecognized arguments: --benchmark aime24 (did you mean --benchmarks?)" in err


@pytest.mark.parametrize("path,parser", PARSERS, ids=IDS)
def test_every_argument_has_a_help_line(path, parser):
    missing = [a.option_strings[0] if a.option_strings else a.dest for a in parser._actions
               if not isinstance(a, argparse._SubParsersAction) and not (a.help or "").strip()]
    assert not missing, f"stapo {' '.join(path)}: no help for {missing}"


@pytest.mark.parametrize("path,parser", PARSERS, ids=IDS)
def test_help_renders_as_written(path, parser):
    text = parser.format_help()
    assert "%%" not in text  # a description is printed verbatim, only help lines are %-formatted
    assert "ln 2" not in text  # the default cap is none (inf), not ln 2


def test_tau_h_max_help_says_no_cap():
    from stapo.core import S2T_DEFAULTS

    assert S2T_DEFAULTS["tau_h_max"] == float("inf")
    tokens = subparsers_of(subparsers_of(build_parser())["analyze"])["tokens"]
    help_line = next(a.help for a in tokens._actions if "--tau-h-max" in a.option_strings)
    assert help_line.endswith("inf: none (default: the run's, else inf)")


@pytest.mark.parametrize("path", [[], ["analyze"], ["eval"]], ids=["stapo", "stapo analyze", "stapo eval"])
def test_help_has_examples_that_parse(path):
    parser = dict((tuple(p), q) for p, q in PARSERS)[tuple(path)]
    epilog = parser.epilog or ""
    assert "examples:" in epilog
    lines = [line.split("#")[0].split() for line in epilog.splitlines() if line.strip().startswith("stapo ")]
    assert len(lines) >= 3
    for words in lines:
        args = parse([w.strip('"') for w in words[1:]])
        assert getattr(args, "func", None), words


def test_train_without_arguments_asks_for_the_config_only(capsys):
    with pytest.raises(SystemExit):
        parse(["train"])
    err = capsys.readouterr().err
    assert err.rstrip().endswith("the following arguments are required: config")
    # overrides stay optional, also after options, and parsing twice does not carry them over
    parser = build_parser()
    assert parse(["train", "demo"], parser).overrides == []
    assert parse(["train", "demo", "--dry-run", "max_steps=2"], parser).overrides == ["max_steps=2"]
    assert parse(["train", "demo"], parser).overrides == []


def test_an_override_error_names_the_override(capsys):
    pytest.importorskip("trl")
    assert main(["train", "demo", "max_steps=abc", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stapo train: error: override max_steps=abc: 1 problem(s):")
    assert "demo.yaml" not in err and "- max_steps: expected int, got str 'abc'" in err
    assert main(["demo", "tau_p=5", "max_stepz=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stapo demo: error: overrides tau_p=5, max_stepz=1: 2 problem(s):")


def test_an_error_in_the_config_file_names_the_file_and_the_override(tmp_path, capsys):
    pytest.importorskip("trl")
    config = tmp_path / "c.yaml"
    config.write_text("model: embedded\ntrain_data: synthetic:add1\nmax_stepz: 2\n")
    assert main(["train", str(config), "tau_p=5", "--dry-run"]) == 2
    assert capsys.readouterr().err.startswith(f"stapo train: error: {config} and override tau_p=5: 2 problem(s):")
