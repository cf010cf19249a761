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


class UserError(Exception):
    """An error caused by user input: printed as one line, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stapo",
        description="Spurious-Token-Aware Policy Optimization: train, evaluate and analyze "
        "RL fine-tuning of LLMs on verifiable math rewards.",
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
    # `key=value` overrides may come after options (`stapo train demo --resume max_steps=2`).
    if extra:
        if isinstance(getattr(args, "overrides", None), list) and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides.extend(extra)
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


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
