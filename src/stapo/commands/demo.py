"""`stapo demo [--compare] [key=value ...]`: the offline end-to-end demo on the embedded model."""

from __future__ import annotations


def register(subparsers) -> None:
    from stapo.commands.train import add_run_dir_flags

    p = subparsers.add_parser(
        "demo",
        help="train the embedded model with STAPO on an offline task (CPU, minutes)",
        description="Runs the bundled 'demo' config: SmolLM2-135M-Instruct (offline) on a synthetic "
        "arithmetic task, held-out accuracy before and after STAPO training. --compare trains GRPO "
        "and STAPO with the same seed, prints their held-out accuracy and training curves side by side "
        "and overlays the curves in one plot.",
    )
    p.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                   help="override fields of the demo config (optional)")
    p.add_argument("--compare", action="store_true",
                   help="train GRPO and STAPO (same seed), print their numbers side by side and plot both")
    p.add_argument("--out", default=None, help="run directory (default: the config's output_dir)")
    add_run_dir_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from stapo.cli import UserError
    from stapo.commands.train import train_from_config
    from stapo.config import ConfigError, load_config

    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"output_dir={args.out}")
    try:
        base = load_config("demo", overrides)
    except ConfigError as err:
        raise UserError(str(err)) from None
    if not args.compare:
        return train_from_config(base, resume=args.resume, overwrite=args.overwrite)

    from stapo.train import plot_runs

    root = Path(base.output_dir)
    dirs = []
    for method in ("grpo", "stapo"):
        try:
            cfg = load_config("demo", overrides + [f"method={method}", f"output_dir={root / method}"])
        except ConfigError as err:
            raise UserError(str(err)) from None
        print(f"=== {method} ===", flush=True)
        train_from_config(cfg, resume=args.resume, overwrite=args.overwrite)
        dirs.append(root / method)
    png = plot_runs(dirs, root / "compare.png")
    from stapo.analyze.runs import RunError, format_side_by_side, load_runs

    try:
        print("\n" + format_side_by_side(load_runs(dirs)))
    except RunError as err:  # a run that logged nothing: the runs are on disk, say why there is no table
        print(f"no comparison table: {err}")
    if png:
        print(f"\ncomparison plot: {png}")
    return 0
