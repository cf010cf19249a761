"""The `stapo` command line: `stapo train | eval | analyze | demo`.

Each command lives in `stapo.commands.<name>` with `register(subparsers)`; heavy imports (torch,
transformers, TRL) happen inside the command's handler so `stapo --help` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from stapo import __version__

COMMANDS = ("train", "eval", "analyze", "demo")


EPILOG = """\
examples:
  stapo demo                                    # train the embedded model with STAPO (CPU, ~10 min)
  stapo train demo max_steps=2 output_dir=runs/try   # a bundled config, fields overridden
  stapo train demo method=grpo --dry-run        # print the resolved config and exit
  stapo eval --model runs/demo/final --benchmarks math500 --limit 10 --samples 4 --max-new-tokens 512
  stapo analyze runs runs/demo --html report.html

`stapo COMMAND --help` for each command's options."""


class UserError(Exception):
    """An error caused by user input: printed as one line, no traceback."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that takes options only as spelled: `--benchmark` is not `--benchmarks`.

    Subparsers are made with the class of their parent, so every parser of the CLI is one of these.
    """

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="stapo",
        description="Spurious-Token-Aware Policy Optimization: train, evaluate and analyze "
        "RL fine-tuning of LLMs on verifiable math rewards.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"stapo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"stapo.commands.{name}").register(sub)
    return parser


def parse(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """The command line as `main` reads it (argparse's SystemExit(2) on an error), without running it."""
    parser = parser or build_parser()
    args, extra = parser.parse_known_args(argv)
    if isinstance(getattr(args, "overrides", None), list):
        args.overrides = list(args.overrides)  # a copy: never extend the parser's default list
    # `key=value` overrides may come after options (`stapo train demo --resume max_steps=2`).
    if extra:
        overrides_only = all("=" in e and not e.startswith("-") for e in extra)
        if isinstance(getattr(args, "overrides", None), list) and overrides_only:
            args.overrides.extend(extra)
        else:
            command = _command_parser(parser, args)
            command.error(f"unrecognized arguments: {' '.join(extra)}{_did_you_mean(command, extra)}")
    return args


def subparsers_of(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The parser's subcommands by name (empty when it has none)."""
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)parser of the command that was run: `stapo analyze tokens` -> its parser."""
    for name in (getattr(args, "command", None), getattr(args, "analyze_command", None)):
        parser = subparsers_of(parser).get(name, parser) if name else parser
    return parser


def _did_you_mean(parser: argparse.ArgumentParser, extra: list[str]) -> str:
    """' (did you mean --benchmarks?)' for misspelled options of `parser`."""
    import difflib

    known = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
    hints = []
    for word in extra:
        if word.startswith("--"):
            hints += difflib.get_close_matches(word.split("=", 1)[0], known, n=1, cutoff=0.6)
    return f" (did you mean {', '.join(hints)}?)" if hints else ""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse(argv, parser)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"stapo {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stapo {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a full disk anywhere else is the user's to fix, not a traceback
        from stapo.rundir import is_disk_full

        if not is_disk_full(err):
            raise
        where = getattr(err, "filename", None)
        print(f"stapo {args.command}: error: {f'{where}: ' if where else ''}no space left on device", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
