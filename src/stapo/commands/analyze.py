"""`stapo analyze tokens | runs`: see the spurious tokens S2T silences and whether entropy stayed flat.

    stapo analyze tokens --model embedded --data synthetic:add1?n=32 [--group-size 8] [--out DIR]
    stapo analyze tokens --rollouts RUN_DIR_OR_FILE [--steps 10 20]
    stapo analyze runs RUN_DIR [RUN_DIR ...] [--out DIR]

Each writes a self-contained HTML report (and its PNGs, and a JSON summary) into --out.
Heavy imports (torch, transformers, matplotlib) happen inside the handlers.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from stapo.rundir import METRICS_FILE, ROLLOUTS_DIR, atomic_write_bytes, atomic_write_text


DEFAULT_NUM_PROMPTS = 16


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "analyze",
        help="token-level diagnostics (spurious tokens, gradient proxy, threshold sweep) and run comparisons",
        description="Token-level diagnostics of STAPO's spurious-token mask, and training-curve comparisons.",
    )
    sub = p.add_subparsers(dest="analyze_command", metavar="WHAT")

    t = sub.add_parser(
        "tokens",
        help="per-token p, H, collision, gradient proxy and the S2T set, for a model on prompts or captured rollouts",
        description="Per-token statistics of a model on prompts (sampled, graded) or of captured rollouts: "
        "summary, threshold sweep, figures and an HTML report with coloured tokens.",
    )
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--rollouts", metavar="PATH", help="a run directory, its rollouts/ directory or one step_N.parquet")
    src.add_argument("--data", metavar="SOURCE", help="prompts: a .jsonl/.json/.parquet file, synthetic:<task>?n=.., "
                     "benchmark:<name> (needs --model)")
    t.add_argument("--model", default=None, help="'embedded', a local directory or a hub id (with --data)")
    t.add_argument("--num-prompts", "--limit", dest="num_prompts", type=int, default=None,
                   help=f"prompts to use from --data (default: all of a synthetic:<task>?n=N source, "
                   f"else the first {DEFAULT_NUM_PROMPTS})")
    t.add_argument("--group-size", "-G", type=int, default=8, help="samples per prompt (default 8)")
    t.add_argument("--max-new-tokens", type=int, default=64, help="default 64")
    t.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    t.add_argument("--batch-prompts", type=int, default=4, help="prompts per generate call (default 4)")
    t.add_argument("--template", default="boxed", help="prompt template name or a string with {problem} (default boxed)")
    t.add_argument("--problem-key", default="problem")
    t.add_argument("--answer-key", default="answer")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps", type=int, nargs="+", default=None, help="with --rollouts: only these capture steps")
    t.add_argument("--tau-p", type=float, default=0.01, help="S2T probability threshold (default 0.01)")
    h = t.add_mutually_exclusive_group()
    h.add_argument("--tau-h", type=float, default=None, help="S2T absolute entropy threshold in nats")
    h.add_argument("--tau-h-quantile", type=float, default=0.05,
                   help="S2T entropy threshold as a quantile of the token entropies (default 0.05)")
    t.add_argument("--out", default="analysis", help="output directory (default ./analysis)")
    t.add_argument("--max-samples-shown", type=int, default=24, help="completions shown in the report (default 24)")
    t.add_argument("--save-rollouts", action="store_true",
                   help="with --model: also save the scored samples as <out>/rollouts/step_00000000.parquet")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=run_tokens)

    r = sub.add_parser(
        "runs",
        help="overlay training curves of several run directories (PNG + HTML)",
        description="Overlay reward, entropy, S2T masked fraction, clip fractions and response length "
        "of several runs (their metrics.jsonl).",
    )
    r.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    r.add_argument("--out", default="analysis", help="output directory (default ./analysis)")
    r.set_defaults(func=run_runs)
    p.set_defaults(func=lambda args: _usage(p))


def _usage(parser) -> int:
    parser.print_help()
    return 2


def _positive(name: str, value, allow_zero=False) -> None:
    from stapo.cli import UserError

    if value is None or (value < 0 if allow_zero else value <= 0):
        raise UserError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _load_model_rollouts(args):
    from stapo.cli import UserError
    from stapo.data import DataError, format_prompt, load_prompts
    from stapo.models import ModelLoadError, load_model, load_tokenizer

    if not args.model:
        raise UserError("--data needs --model (e.g. --model embedded)")
    if args.num_prompts is None:
        explicit_n = args.data.startswith("synthetic:") and "n=" in args.data
        args.num_prompts = None if explicit_n else DEFAULT_NUM_PROMPTS
    for name in ("max_new_tokens", "batch_prompts", "temperature") + (("num_prompts",) if args.num_prompts is not None else ()):
        _positive(f"--{name.replace('_', '-')}", getattr(args, name))
    if args.group_size < 2:
        raise UserError(f"--group-size must be >= 2 (advantages need a group), got {args.group_size}")
    try:
        rows = load_prompts(args.data, problem_key=args.problem_key, answer_key=args.answer_key,
                            limit=args.num_prompts)
    except (DataError, ValueError) as err:
        raise UserError(str(err)) from None
    if not rows:
        raise UserError(f"{args.data}: no prompts")
    try:
        tokenizer = load_tokenizer(args.model)
        model = load_model(args.model)
    except ModelLoadError as err:
        raise UserError(str(err)) from None
    try:
        prompts = [format_prompt(r["problem"], tokenizer, template=args.template) for r in rows]
    except ValueError as err:
        raise UserError(f"--template: {err}") from None
    from stapo.analyze.collect import collect_rollouts

    print(f"sampling {args.group_size} completions for each of {len(prompts)} prompts "
          f"(max {args.max_new_tokens} new tokens, T={args.temperature:g})", file=sys.stderr)
    return collect_rollouts(
        model, tokenizer, prompts, [r["answer"] for r in rows], group_size=args.group_size,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, batch_prompts=args.batch_prompts,
        tau_p=args.tau_p, tau_h=args.tau_h, tau_h_quantile=args.tau_h_quantile, seed=args.seed,
        progress=not args.no_progress,
    )


def run_tokens(args) -> int:
    from stapo.cli import UserError
    from stapo.data.rollouts import RolloutError, read_rollouts

    if not 0 <= args.tau_p <= 1:
        raise UserError(f"--tau-p must be in [0, 1], got {args.tau_p}")
    if args.tau_h is not None and not math.isfinite(args.tau_h):
        raise UserError(f"--tau-h must be a finite number of nats, got {args.tau_h}")
    if not 0 <= args.tau_h_quantile <= 1:
        raise UserError(f"--tau-h-quantile must be in [0, 1], got {args.tau_h_quantile}")
    _positive("--max-samples-shown", args.max_samples_shown, allow_zero=True)
    if args.rollouts:
        if args.model:
            raise UserError("--model is used with --data; --rollouts already holds the statistics")
        try:
            ro = read_rollouts(args.rollouts, steps=args.steps)
        except RolloutError as err:
            raise UserError(str(err)) from None
        captured, title = True, f"stapo analyze tokens — {args.rollouts}"
    else:
        ro = _load_model_rollouts(args)
        captured, title = False, f"stapo analyze tokens — {args.model} on {args.data}"
    if ro.num_tokens == 0:
        raise UserError("the rollouts hold no completion tokens: nothing to analyze")

    out = Path(args.out)
    if args.save_rollouts and not args.rollouts:
        from stapo.data.rollouts import write_rollouts

        records = _records(ro)
        write_rollouts(out, 0, records, max_samples=None, max_bytes=None, append=False,
                       metadata=next(iter(ro.metadata.values()), {}))
    result = analyze_tokens(ro, args.tau_p, args.tau_h, args.tau_h_quantile, captured, out, title,
                            args.max_samples_shown, run_dir=Path(args.rollouts) if args.rollouts else None)
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


def analyze_tokens(ro, tau_p, tau_h, tau_h_quantile, captured, out: Path, title: str,
                   max_samples_shown: int = 24, run_dir: Path | None = None) -> dict:
    """Summary, sweep, figures and report for a Rollouts; returns the printed text and paths."""
    import numpy as np

    from stapo.analyze import plots, report
    from stapo.analyze.tokens import (
        Thresholds,
        TokenBatch,
        format_summary,
        format_sweep,
        summarize,
        threshold_sweep,
    )

    th = Thresholds(tau_p=tau_p, tau_h=tau_h, tau_h_quantile=tau_h_quantile)
    tb = TokenBatch(ro)
    summary = summarize(tb, th, captured=captured)
    sweep = threshold_sweep(tb)
    mask = tb.mask(th).numpy()
    adv = np.repeat(ro.advantage, ro.lengths())
    figures = [
        ("p vs H", plots.p_vs_entropy_png(np.exp(ro.logprob), ro.entropy, adv, mask, th.tau_p, summary.tau_h)),
        ("gradient proxy histogram", plots.grad_proxy_hist_png(ro.grad_proxy, mask)),
    ]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "p_vs_entropy.png", figures[0][1])
    atomic_write_bytes(out / "grad_proxy_hist.png", figures[1][1])

    curves, runs_text = None, None
    notes = []
    if run_dir is not None:  # a run directory with metrics: add its curves to the same report
        base = run_dir if run_dir.is_dir() else run_dir.parent
        base = base.parent if base.name == ROLLOUTS_DIR else base
        if (base / METRICS_FILE).is_file():
            from stapo.analyze.runs import RunError, curve_panels, format_runs_table, load_runs

            try:
                runs = load_runs([base])
                curves = plots.curves_png(curve_panels(runs), _titles())
                runs_text = format_runs_table(runs)
                atomic_write_bytes(out / "curves.png", curves)
            except RunError as err:
                notes.append(f"training curves not shown: {err}")
    html_text = report.build_report(title, summary, sweep, ro, mask, figures, curves, runs_text, notes,
                                    max_samples=max_samples_shown)
    path = report.write_report(out / "tokens.html", html_text)
    atomic_write_text(
        out / "tokens_summary.json",
        json.dumps({"summary": summary.as_dict(), "sweep": sweep.as_dict()}, indent=2, default=float),
    )
    text = "\n".join([
        format_summary(summary),
        "",
        "threshold sweep: masked fraction of tokens (count); rows tau_h, columns tau_p",
        format_sweep(sweep, "frac"),
        "",
        "threshold sweep: share of the total grad-norm^2 carried by the S2T set",
        format_sweep(sweep, "grad_share"),
    ])
    return {"text": text, "report": path, "summary": summary, "sweep": sweep, "mask": mask}


def _titles():
    from stapo.analyze.runs import CURVES

    return {k: v[0] for k, v in CURVES.items()}


def run_runs(args) -> int:
    from stapo.analyze import plots, report
    from stapo.analyze.runs import RunError, config_differences, curve_panels, format_runs_table, load_runs
    from stapo.cli import UserError

    try:
        runs = load_runs(args.run_dirs)
    except RunError as err:
        raise UserError(str(err)) from None
    panels = curve_panels(runs)
    png = plots.curves_png(panels, _titles())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "curves.png", png)
    notes = config_differences(runs)
    text = format_runs_table(runs)
    html_text = report.build_report(
        "stapo analyze runs — " + ", ".join(r.name for r in runs), curves_png=png, runs_text=text, notes=notes
    )
    path = report.write_report(out / "runs.html", html_text)
    for n in notes:
        print(f"note: {n}")
    print(text)
    print(f"\nplots: {out / 'curves.png'}\nreport: {path}")
    return 0

