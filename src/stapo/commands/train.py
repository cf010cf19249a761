"""`stapo train CONFIG.yaml [key=value ...] [--resume | --overwrite]`."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a policy with STAPO (or a baseline) through TRL",
        description="Train with a YAML config (a path, or a bundled name such as 'demo' or "
        "'paper/qwen3-1.7b-stapo'). Overrides use the config's field names: "
        "stapo train demo max_steps=2 method=grpo tau_p=0.02 output_dir=runs/x",
    )
    p.add_argument("config", help="YAML config path or bundled config name")
    # default=[]: argparse counts a '*' positional without a default as required in its error message
    p.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                   help="override config fields (optional)")
    add_run_dir_flags(p)
    p.add_argument("--dry-run", action="store_true", help="validate and print the resolved config, then exit")
    p.set_defaults(func=run)


def add_run_dir_flags(p) -> None:
    """--resume / --overwrite: what to do with an output_dir that already holds files."""
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a non-empty output_dir, deleting the previous run's files there "
                   "(checkpoints, metrics, rollouts, final model, plots, eval and summary; other files stay)")


def run(args) -> int:
    import sys

    import yaml

    from stapo.cli import UserError
    from stapo.config import ConfigError, check_packages, load_config

    try:
        cfg = load_config(args.config, args.overrides)
        check_packages(cfg)
    except ConfigError as err:
        raise UserError(str(err)) from None
    if args.dry_run:
        for note in cfg.notes:  # stderr: stdout stays the YAML
            print(f"stapo: note: {note}", file=sys.stderr)
        print(yaml.safe_dump(cfg.to_flat_dict(), sort_keys=False), end="")
        return 0
    return train_from_config(cfg, resume=args.resume, overwrite=args.overwrite)


def train_from_config(cfg, resume: bool = False, overwrite: bool = False) -> int:
    from stapo.cli import UserError
    from stapo.config import ConfigError, check_packages
    from stapo.data import DataError
    from stapo.engines.trl import NonFiniteTrainingError
    from stapo.models import ModelLoadError
    from stapo.rundir import RunDirError
    from stapo.train import run_training

    if resume and overwrite:
        raise UserError("--resume continues the run in output_dir and --overwrite replaces it; pass one of them")
    try:
        check_packages(cfg)  # `stapo demo` comes here directly
    except ConfigError as err:
        raise UserError(str(err)) from None
    main_process = is_main_process()
    if main_process:
        for note in cfg.notes:
            print(f"stapo: note: {note}", flush=True)
    try:
        summary = run_training(cfg, resume=resume, overwrite=overwrite)
    except (ConfigError, DataError, ModelLoadError, NonFiniteTrainingError, RunDirError) as err:
        raise UserError(str(err)) from None
    if not main_process:  # one summary for the run, not one per process
        return 0
    ev = summary.get("eval", {})
    if "before" in ev and "after" in ev:
        b, a = ev["before"], ev["after"]
        print(f"held-out accuracy: {b['accuracy']:.3f} ± {b['stderr']:.3f} -> {a['accuracy']:.3f} ± {a['stderr']:.3f}")
    print(f"run directory: {summary['output_dir']}")
    return 0


def is_main_process() -> bool:
    """Rank 0 of a multi-process launch (torchrun and accelerate set RANK per process), or a single process."""
    import os

    return int(os.environ.get("RANK", "0")) == 0
