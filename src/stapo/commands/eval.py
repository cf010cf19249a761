"""`stapo eval` (not implemented yet)."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="(coming soon)")
    p.set_defaults(func=run)


def run(args) -> int:
    from stapo.cli import UserError

    raise UserError("'stapo eval' is not implemented yet")
