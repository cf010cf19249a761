"""`stapo demo` (not implemented yet)."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="(coming soon)")
    p.set_defaults(func=run)


def run(args) -> int:
    from stapo.cli import UserError

    raise UserError("'stapo demo' is not implemented yet")
