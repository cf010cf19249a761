"""`stapo analyze tokens | runs`: see the spurious tokens S2T silences and whether entropy stayed flat.

    stapo analyze tokens --model embedded --data synthetic:add1?n=32 [--samples 8] [--out DIR]
    stapo analyze tokens --rollouts RUN_DIR_OR_FILE [--steps 10 20]
    stapo analyze tokens --run RUN_DIR [--data SOURCE]        (defaults from the run's config.yaml)
    stapo analyze runs RUN_DIR [RUN_DIR ...] [--out DIR] [--html FILE] [--no-group] [--smooth W]
    stapo analyze counterfactual --model embedded [--data synthetic:add1] [--quick] [--out DIR]

Each writes a self-contained HTML report (and its PNGs, and a JSON summary) into --out.
Heavy imports (torch, transformers, matplotlib) happen inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stapo.rundir import (
    CONFIG_FILE,
    CURVES_FILE,
    FINAL_DIR,
    METRICS_FILE,
    ROLLOUTS_DIR,
    RunDirError,
    atomic_write_bytes,
    atomic_write_text,
    read_run_config,
)

DEFAULT_NUM_PROMPTS = 16

EPILOG = """\
examples:
  stapo analyze tokens --model embedded --data "synthetic:add1?n=32"   # sample, grade, the S2T tokens
  stapo analyze tokens --run runs/demo          # the run's captured rollouts, its settings
  stapo analyze runs runs/grpo runs/demo --html report.html
  stapo analyze counterfactual --quick          # the one-step entropy test, smoke-sized

`stapo analyze WHAT --help` for each one's options; docs/analyze.md for what they measure."""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "analyze",
        help="token-level diagnostics (spurious tokens, gradient proxy, threshold sweep) and run comparisons",
        description="Token-level diagnostics of STAPO's spurious-token mask, and training-curve comparisons.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="analyze_command", metavar="WHAT")

    t = sub.add_parser(
        "tokens",
        help="per-token p, H, collision, gradient proxy and the S2T set, for a model on prompts or captured rollouts",
        description="Per-token statistics of a model on prompts (sampled, graded) or of captured rollouts: "
        "summary, threshold sweep, figures and an HTML report with coloured tokens.",
    )
    src = t.add_mutually_exclusive_group()
    src.add_argument("--rollouts", metavar="PATH",
                     help="a run directory, its rollouts/ directory or one step_N.parquet")
    src.add_argument("--data", metavar="SOURCE", help="prompts: a .jsonl/.json/.parquet file, synthetic:<task>?n=.., "
                     "benchmark:<name> (needs --model)")
    t.add_argument("--run", metavar="RUN_DIR", default=None,
                   help="a training run directory: the options below default to its config.yaml (template, "
                   "samples, max new tokens, temperature, tau_p/tau_h), --model to its final/ model, and "
                   "without --data or --rollouts its captured rollouts are analysed. --rollouts RUN_DIR does the same")
    t.add_argument("--model", default=None, help="'embedded', a local directory or a hub id (with --data)")
    t.add_argument("--num-prompts", "--limit", dest="num_prompts", type=int, default=None,
                   help=f"prompts to use from --data (default: all of a synthetic:<task>?n=N source, "
                   f"else the first {DEFAULT_NUM_PROMPTS})")
    # One vocabulary: the flags of `stapo eval`; the config field of `stapo train` in each help.
    t.add_argument("--samples", "--group-size", "-G", dest="group_size", type=int, default=None, metavar="G",
                   help="samples per prompt, the group size "
                   f"(default: the run's, else {TOKENS_DEFAULTS['group_size']}). "
                   "Config field: num_generations")
    t.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help=f"completion length limit (default: the run's, else {TOKENS_DEFAULTS['max_new_tokens']}). "
                   "Config field: max_completion_length")
    t.add_argument("--temperature", type=float, default=None,
                   help=f"sampling temperature (default: the run's, else {TOKENS_DEFAULTS['temperature']:g})")
    t.add_argument("--batch-prompts", type=int, default=4, help="prompts per generate call (default 4)")
    t.add_argument("--template", default=None,
                   help="prompt template name or a string with {problem} (default: the run's, else "
                   f"{TOKENS_DEFAULTS['template']}). Config field: prompt_template")
    t.add_argument("--problem-key", default="problem",
                   help="--data's column holding the problem text (default: problem). Config field: problem_key")
    t.add_argument("--answer-key", default="answer",
                   help="--data's column holding the gold answer (default: answer). Config field: answer_key")
    t.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    t.add_argument("--steps", type=int, nargs="+", default=None, help="with --rollouts: only these capture steps")
    add_s2t_arguments(t, "the run's, else ")
    t.add_argument("--out", default="analysis", help="output directory (default ./analysis). Config field: output_dir")
    t.add_argument("--max-samples-shown", type=int, default=24, help="completions shown in the report (default 24)")
    t.add_argument("--save-rollouts", action="store_true",
                   help="with --model: also save the scored samples as <out>/rollouts/step_00000000.parquet")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=run_tokens)

    r = sub.add_parser(
        "runs",
        help="overlay training curves of several run directories, seeds of one run as a mean and band (PNG + HTML)",
        description="Overlay held-out accuracy, reward, entropy, S2T masked fraction, clip fractions and "
        "response length of several runs (their metrics.jsonl, eval.json). Runs whose names differ only by "
        "a -seedN suffix (grpo-seed0, grpo-seed1) form one group: a line for the mean over its runs, a "
        "band from their min to their max at the steps all of them logged, and a table of held-out "
        "accuracy per group (mean [min, max], std).",
    )
    r.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="training run directories (stapo train's output_dir)")
    r.add_argument("--out", default="analysis", help="output directory (default ./analysis)")
    r.add_argument("--html", metavar="FILE", default=None,
                   help="where to write the HTML report (default: <out>/runs.html); its plots stay in --out")
    r.add_argument("--no-group", dest="group", action="store_false",
                   help="one line per run, even for runs that differ only by their -seedN suffix")
    r.add_argument("--smooth", type=int, default=1, metavar="W",
                   help="trailing moving average over W steps for the per-step curves, each run smoothed "
                   "before the mean over its group (default 1: none; held-out accuracy is never smoothed)")
    r.set_defaults(func=run_runs)

    c = sub.add_parser(
        "counterfactual",
        help="one-step test: entropy change and KL on held-out positions after a step on S2T / random / "
        "low-p high-H / all tokens",
        description="Sample and grade rollout batches, then take ONE step (output head only, on cached hidden "
        "states) on the policy-gradient loss restricted to (i) the S2T set, (ii) an equally large random set "
        "of A>0 tokens, (iii) A>0 low-probability tokens that are not low-entropy, (iv) all tokens; report "
        "the mean entropy change and KL on held-out positions per token in the set, with 95% intervals, for "
        "plain SGD and for AdamW with warmed-up state.",
    )
    c.add_argument("--model", default="embedded", help="'embedded' (default), a local directory or a hub id")
    c.add_argument("--data", default="synthetic:add1", help="prompts source (default synthetic:add1)")
    c.add_argument("--template", default="boxed",
                   help="prompt template name or a string with {problem} (default: boxed). "
                   "Config field: prompt_template")
    c.add_argument("--problem-key", default="problem",
                   help="--data's column holding the problem text (default: problem). Config field: problem_key")
    c.add_argument("--answer-key", default="answer",
                   help="--data's column holding the gold answer (default: answer). Config field: answer_key")
    c.add_argument("--batches", type=int, default=None, help="scored rollout batches (default 2; quick 2)")
    c.add_argument("--draws", type=int, default=None, help="random draws of set (ii) per batch (default 5)")
    c.add_argument("--prompts-per-batch", type=int, default=None, help="default 8 (quick 2)")
    c.add_argument("--heldout-prompts", type=int, default=None, help="prompts whose completions give the "
                   "held-out positions (default 8, quick 2)")
    c.add_argument("--heldout-positions", type=int, default=None, help="at most this many held-out positions "
                   "(default 1024, quick 64)")
    c.add_argument("--group-size", "-G", type=int, default=None, help="samples per prompt (default 8, quick 4)")
    c.add_argument("--max-new-tokens", type=int, default=None, help="default 32 (quick 8)")
    c.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    add_s2t_arguments(c)
    c.add_argument("--sgd-lr", type=float, default=None, help="plain SGD step size (default 1e-4)")
    c.add_argument("--adamw-lr", type=float, default=None, help="AdamW learning rate (default 1e-4)")
    c.add_argument("--warmup-steps", type=int, default=None, help="AdamW warm-up steps on all tokens (default 3)")
    c.add_argument("--seed", type=int, default=0, help="seed of the sampling and the random token sets (default 0)")
    c.add_argument("--quick", action="store_true", help="a tiny configuration for a smoke test (< 60 s on CPU)")
    c.add_argument("--out", default="analysis", help="output directory (default ./analysis)")
    c.set_defaults(func=run_counterfactual_cmd)
    p.set_defaults(func=lambda args: _usage(p))


# `analyze tokens` option -> the field of a run's config.yaml it defaults to, and the defaults without a run.
TOKENS_OPTIONS_FROM_RUN = {"template": "prompt_template", "group_size": "num_generations",
                           "max_new_tokens": "max_completion_length", "temperature": "temperature", "tau_p": "tau_p",
                           "tau_h_population": "tau_h_population", "tau_h_max": "tau_h_max"}
# max_new_tokens: the embedded model on the boxed template ends 3 in 4 completions within 512 tokens (the
# longest in 491), 1 in 4 within 64 (docs/analyze.md); the summary says how many were cut.
TOKENS_DEFAULTS = {"template": "boxed", "group_size": 8, "max_new_tokens": 512, "temperature": 1.0}


def add_s2t_arguments(parser, default_prefix: str = "") -> None:
    """--tau-p, --tau-h | --tau-h-quantile, --tau-h-population (defaults: stapo.core.S2TSettings)."""
    from stapo.core import S2T_DEFAULTS, TAU_H_POPULATIONS

    parser.add_argument("--tau-p", type=float, default=None,
                        help=f"S2T probability threshold (default: {default_prefix}{S2T_DEFAULTS['tau_p']:g})")
    h = parser.add_mutually_exclusive_group()
    h.add_argument("--tau-h", type=float, default=None, help="S2T absolute entropy threshold in nats")
    h.add_argument("--tau-h-quantile", type=float, default=None,
                   help="S2T entropy threshold as a quantile of the entropies of --tau-h-population "
                   f"(default: {default_prefix}{S2T_DEFAULTS['tau_h_quantile']:g})")
    parser.add_argument("--tau-h-population", choices=TAU_H_POPULATIONS, default=None,
                        help="the tokens the quantile is taken over: valid, low_prob (p < tau_p) or candidates "
                        f"(p < tau_p, A > 0) (default: {default_prefix}{S2T_DEFAULTS['tau_h_population']})")
    parser.add_argument("--tau-h-max", type=float, default=None,
                        help="cap of a quantile tau_h in nats, inf: none (default: "
                        f"{default_prefix}{S2T_DEFAULTS['tau_h_max']:g})")


def s2t_settings_from_args(args):
    """The S2TSettings of --tau-* (None: the defaults); one error naming the flag."""
    from stapo.cli import UserError
    from stapo.core import S2TSettings, s2t_errors

    values = {"tau_p": args.tau_p, "tau_h": args.tau_h, "tau_h_quantile": args.tau_h_quantile,
              "tau_h_population": args.tau_h_population, "tau_h_max": args.tau_h_max}
    for name, problem in s2t_errors(values).items():
        raise UserError(f"--{name.replace('_', '-')} {problem}, got {values[name]!r}")
    return S2TSettings.resolve(values)


def _run_base(path: Path) -> Path:
    """The run directory of a run directory, its rollouts/ directory or one of its step files."""
    base = path if path.is_dir() else path.parent
    return base.parent if base.name == ROLLOUTS_DIR else base


def resolve_tokens_defaults(args) -> list[str]:
    """Fill the options left unset: from the run's config.yaml (--run, or --rollouts in a run), else
    TOKENS_DEFAULTS. Returns 'name=value (from FILE)' for what came from the run."""
    from stapo.cli import UserError

    run_dir = Path(args.run) if args.run else (_run_base(Path(args.rollouts)) if args.rollouts else None)
    if args.run and not Path(args.run).is_dir():
        raise UserError(f"--run {args.run}: not a directory")
    cfg: dict = {}
    cfg_path = run_dir / CONFIG_FILE if run_dir is not None else None
    if run_dir is not None and cfg_path is not None and cfg_path.is_file():
        try:
            cfg = read_run_config(run_dir)
        except RunDirError as err:
            raise UserError(str(err)) from None
    elif args.run:
        raise UserError(f"--run {args.run}: no {CONFIG_FILE} there (is it a 'stapo train' output directory?)")
    from_run = []
    for name, field in TOKENS_OPTIONS_FROM_RUN.items():
        if getattr(args, name) is None:
            if cfg.get(field) is not None:
                setattr(args, name, cfg[field])
                from_run.append(f"{name}={cfg[field]}")
            else:
                setattr(args, name, TOKENS_DEFAULTS.get(name))  # None: stapo.core.S2TSettings' default
    # the entropy threshold is one choice: absolute tau_h or a quantile, never a mix of the two sources
    if args.tau_h is None and args.tau_h_quantile is None:
        if cfg.get("tau_h") is not None:
            args.tau_h = float(cfg["tau_h"])
            from_run.append(f"tau_h={args.tau_h:g}")
        elif cfg.get("tau_h_quantile") is not None:
            args.tau_h_quantile = float(cfg["tau_h_quantile"])
            from_run.append(f"tau_h_quantile={args.tau_h_quantile:g}")
    if args.run and not args.rollouts and not args.data:
        if (Path(args.run) / ROLLOUTS_DIR).is_dir():
            args.rollouts = str(run_dir)
        else:
            raise UserError(f"--run {args.run}: it captured no rollouts; give --data SOURCE to sample new ones")
    if args.run and args.data and not args.model and (Path(args.run) / FINAL_DIR).is_dir():
        args.model = str(Path(args.run) / FINAL_DIR)
        from_run.append(f"model={args.model}")
    if not args.rollouts and not args.data:
        raise UserError("give --rollouts RUN_DIR_OR_FILE, --data SOURCE (with --model) or --run RUN_DIR")
    return [f"{x} (from {cfg_path})" for x in from_run]


def _usage(parser) -> int:
    parser.print_help()
    return 2


def _positive(name: str, value, allow_zero=False) -> None:
    from stapo.cli import UserError

    if value is None or (value < 0 if allow_zero else value <= 0):
        raise UserError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _load_model_rollouts(args):
    from stapo.cli import UserError
    from stapo.data import DataError, load_prompts

    if not args.model:
        raise UserError("--data needs --model (e.g. --model embedded)")
    if args.num_prompts is None:
        explicit_n = args.data.startswith("synthetic:") and "n=" in args.data
        args.num_prompts = None if explicit_n else DEFAULT_NUM_PROMPTS
    counts = ("max_new_tokens", "batch_prompts", "temperature")
    for name in counts + (("num_prompts",) if args.num_prompts is not None else ()):
        _positive(f"--{name.replace('_', '-')}", getattr(args, name))
    if args.group_size < 2:
        raise UserError(f"--samples must be >= 2 (advantages need a group), got {args.group_size}")
    try:
        rows = load_prompts(args.data, problem_key=args.problem_key, answer_key=args.answer_key,
                            limit=args.num_prompts)
    except (DataError, ValueError) as err:
        raise UserError(str(err)) from None
    if not rows:
        raise UserError(f"{args.data}: no prompts")
    model, tokenizer, prompts = model_and_prompts(args, rows)
    from stapo.analyze.collect import collect_rollouts

    print(f"sampling {args.group_size} completions for each of {len(prompts)} prompts "
          f"(max {args.max_new_tokens} new tokens, T={args.temperature:g})", file=sys.stderr)
    s2t = s2t_settings_from_args(args)
    return collect_rollouts(
        model, tokenizer, prompts, [r["answer"] for r in rows], group_size=args.group_size,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, batch_prompts=args.batch_prompts,
        s2t=s2t, seed=args.seed,
        progress=not args.no_progress, return_collision_logp=True,
    )


def model_and_prompts(args, rows):
    """--model's model and tokenizer, and the rows' problems in --template; one UserError otherwise."""
    from stapo.cli import UserError
    from stapo.data import format_prompt
    from stapo.models import ModelLoadError, load_model, load_tokenizer

    try:
        tokenizer = load_tokenizer(args.model)
        model = load_model(args.model)
    except ModelLoadError as err:
        raise UserError(str(err)) from None
    try:
        return model, tokenizer, [format_prompt(r["problem"], tokenizer, template=args.template) for r in rows]
    except ValueError as err:
        raise UserError(f"--template: {err}") from None


def run_tokens(args) -> int:
    from stapo.cli import UserError
    from stapo.data.rollouts import RolloutError, read_rollouts

    for note in resolve_tokens_defaults(args):
        print(f"setting {note}", file=sys.stderr)
    s2t = s2t_settings_from_args(args)
    _positive("--max-samples-shown", args.max_samples_shown, allow_zero=True)
    if args.rollouts:
        if args.model:
            raise UserError("--model is used with --data; --rollouts already holds the statistics")
        try:
            ro = read_rollouts(args.rollouts, steps=args.steps)
        except RolloutError as err:
            raise UserError(str(err)) from None
        captured, title = True, f"stapo analyze tokens — {args.rollouts}"
        collision_logp = None
    else:
        ro, collision_logp = _load_model_rollouts(args)
        captured, title = False, f"stapo analyze tokens — {args.model} on {args.data}"
    if ro.num_tokens == 0:
        raise UserError("the rollouts hold no completion tokens: nothing to analyze")

    out = Path(args.out)
    if args.save_rollouts and not args.rollouts:
        from stapo.data.rollouts import write_rollouts

        records = _records(ro)
        write_rollouts(out, 0, records, max_samples=None, max_bytes=None, append=False,
                       metadata=next(iter(ro.metadata.values()), {}))
    result = analyze_tokens(ro, s2t, captured, out, title,
                            args.max_samples_shown, run_dir=Path(args.rollouts) if args.rollouts else None,
                            collision_logp=collision_logp)
    print(result["text"])
    print(f"\nreport: {result['report']}")
    return 0


def _records(ro):
    recs = []
    for i in range(ro.num_samples):
        sl = ro.token_slice(i)
        recs.append({
            "sample": int(ro.sample[i]), "prompt": ro.prompt[i], "completion": ro.completion[i],
            "reward": float(ro.reward[i]), "advantage": float(ro.advantage[i]),
            "token_id": ro.token_id[sl], "token_text": ro.token_text[sl], "logprob": ro.logprob[sl],
            "entropy": ro.entropy[sl], "collision": ro.collision[sl], "s2t": ro.s2t[sl],
        })
    return recs


def analyze_tokens(ro, th, captured, out: Path, title: str,
                   max_samples_shown: int = 24, run_dir: Path | None = None, collision_logp=None) -> dict:
    """Summary, sweep, figures and report for a Rollouts; returns the printed text and paths.
    `collision_logp` (Σπ² log π per token, flat) adds the first-order entropy change ΔH."""
    import numpy as np

    from stapo.analyze import plots, report
    from stapo.analyze.populations import population_table
    from stapo.analyze.tokens import TokenBatch, format_console, summarize, threshold_sweep

    tb = TokenBatch(ro, collision_logp=collision_logp)
    summary = summarize(tb, th, captured=captured)
    sweep = threshold_sweep(tb, applied=th)
    populations = population_table(tb, th.tau_p, tau_h_max=th.tau_h_max)
    mask = tb.mask(th).numpy()
    adv = np.repeat(ro.advantage, ro.lengths())
    figures = [
        ("p vs H", plots.p_vs_entropy_png(np.exp(ro.logprob), ro.entropy, adv, mask, th.tau_p, summary.tau_h)),
        ("gradient proxy histogram", plots.grad_proxy_hist_png(ro.grad_proxy, mask)),
    ]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "p_vs_entropy.png", figures[0][1])
    atomic_write_bytes(out / "grad_proxy_hist.png", figures[1][1])
    if tb.delta_h is not None:
        figures.append(("entropy change vs grad-norm^2",
                        plots.entropy_change_scatter_png(tb.delta_h.numpy(), ro.grad_proxy, adv, mask)))
        atomic_write_bytes(out / "entropy_change.png", figures[-1][1])

    curves, runs_text = None, None
    notes = []
    if run_dir is not None:  # a run directory with metrics: add its curves to the same report
        base = _run_base(run_dir)
        if (base / METRICS_FILE).is_file():
            from stapo.analyze.runs import RunError, curve_panels, format_runs_table, load_runs

            try:
                runs = load_runs([base])
                curves = plots.curves_png(curve_panels(runs))
                runs_text = format_runs_table(runs)
                atomic_write_bytes(out / CURVES_FILE, curves)
            except RunError as err:
                notes.append(f"training curves not shown: {err}")
    html_text = report.build_report(title, summary, sweep, ro, mask, figures, curves, runs_text, notes,
                                    max_samples=max_samples_shown, from_run=captured, populations=populations)
    path = report.write_report(out / "tokens.html", html_text)
    atomic_write_text(
        out / "tokens_summary.json",
        json.dumps({"summary": summary.as_dict(), "sweep": sweep.as_dict(),
                    "populations": [r.as_dict() for r in populations]}, indent=2, default=float),
    )
    meta: dict = next(iter(ro.metadata.values()), {}) if not captured else {}
    truncated = ((int(meta["truncated"]), int(meta["max_new_tokens"]))
                 if isinstance(meta.get("truncated"), int) and isinstance(meta.get("max_new_tokens"), int) else None)
    text = format_console(summary, sweep, populations, truncated)
    return {"text": text, "report": path, "summary": summary, "sweep": sweep, "mask": mask,
            "populations": populations}


def run_runs(args) -> int:
    from stapo.analyze.runs import RunError, load_runs, write_runs_report
    from stapo.cli import UserError

    if args.smooth < 1:
        raise UserError(f"--smooth must be >= 1, got {args.smooth}")
    try:
        runs = load_runs(args.run_dirs)
    except RunError as err:
        raise UserError(str(err)) from None
    res = write_runs_report(runs, args.out, html=args.html, window=args.smooth, by_seed=args.group)
    for n in res["notes"]:
        print(f"note: {n}")
    print(res["text"])
    print(f"\nplots: {res['png']}\nreport: {res['html']}")
    return 0



QUICK = dict(batches=2, draws=5, prompts_per_batch=2, heldout_prompts=2, heldout_positions=64, group_size=4,
             max_new_tokens=8, warmup_steps=2)


def run_counterfactual_cmd(args) -> int:
    from stapo.analyze.counterfactual import CounterfactualConfig, format_table, run_counterfactual, write_outputs
    from stapo.cli import UserError
    from stapo.data import DataError, load_prompts

    names = ("batches", "draws", "prompts_per_batch", "heldout_prompts", "heldout_positions", "group_size",
             "max_new_tokens", "sgd_lr", "adamw_lr", "warmup_steps")
    given = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    base = dict(QUICK) if args.quick else {}
    try:
        cfg = CounterfactualConfig(**{**base, **given}, temperature=args.temperature,
                                   s2t=s2t_settings_from_args(args), seed=args.seed)
    except (TypeError, ValueError) as err:
        raise UserError(f"counterfactual: {err}") from None
    need = cfg.batches * cfg.prompts_per_batch + cfg.heldout_prompts
    try:
        rows = load_prompts(args.data, problem_key=args.problem_key, answer_key=args.answer_key, limit=need)
    except (DataError, ValueError) as err:
        raise UserError(str(err)) from None
    if len(rows) < need:
        raise UserError(f"{args.data}: {len(rows)} prompts, the configuration needs {need} "
                        f"(batches x prompts-per-batch + heldout-prompts)")
    model, tokenizer, prompts = model_and_prompts(args, rows)
    pairs = list(zip(prompts, [r["answer"] for r in rows]))
    split = cfg.batches * cfg.prompts_per_batch
    res = run_counterfactual(model, tokenizer, pairs[:split], pairs[split:], cfg,
                             log=lambda m: print(m, file=sys.stderr))
    paths = write_outputs(res, Path(args.out))
    print(format_table(res))
    for n in res.notes:
        print(f"note: {n}")
    null = res.summary.get("adamw_null")
    if null:
        print(f"AdamW null step (empty set, momentum only): dH {null['d_entropy']['mean']:+.3e}, "
              f"KL {null['kl']['mean']:.3e} (subtracted from the adamw dH rows)")
    print(f"\n{res.seconds:.0f} s; json: {paths['json']}\nmarkdown: {paths['markdown']}")
    return 0
