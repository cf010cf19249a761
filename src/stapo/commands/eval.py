"""`stapo eval`: the six-benchmark evaluation (avg@k, pass@k, maj@k), and `--compare` of several runs."""

from __future__ import annotations

import argparse

EPILOG = """\
examples:
  stapo eval --model embedded --benchmarks math500 --limit 2 --samples 2 --max-new-tokens 64
  stapo eval --model Qwen/Qwen3-1.7B --benchmarks all --setting all --out runs/eval/qwen3
  stapo eval --compare runs/eval/grpo runs/eval/stapo --metric avg@k

defaults: k = 32 for aime24/aime25/amc23, k = 4 for math500/minerva/olympiadbench;
settings train = (T=1.0, top-p=1.0), nucleus = (T=0.7, top-p=0.9), greedy = (T=0, k=1).
Tables are percentages, "± SE across problems", with k and n per benchmark. See docs/eval.md."""

# Options that configure a new evaluation; `--compare` only reads finished runs and ignores them.
GENERATION_OPTIONS = ("model", "samples", "max_new_tokens", "limit", "data_dir", "hub", "template", "out",
                      "backend", "batch_size", "seed", "extract", "dtype", "benchmarks")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def register(subparsers) -> None:
    from stapo.eval.report import EXTRACTION_RULES  # plain data, no heavy imports

    p = subparsers.add_parser(
        "eval",
        help="evaluate a model on AIME24/25, AMC23, MATH500, Minerva, OlympiadBench",
        description="Sample k completions per problem, grade them, report avg@k / pass@k / maj@k per "
        "benchmark and their unweighted average. Reruns with the same --out resume.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help="'embedded', a local model directory, or a hub id")
    p.add_argument("--benchmarks", default="all", help="'all' or comma-separated names (default: all)")
    p.add_argument("--samples", "-G", type=_positive_int, default=None, metavar="K",
                   help="samples per problem for every benchmark (default: 32 AIME/AMC, 4 others; "
                   "greedy always 1). Training's config field: num_generations")
    p.add_argument("--setting", default=None, choices=("train", "nucleus", "greedy", "both", "all"),
                   help="sampling setting(s): train = T 1.0/top-p 1.0, nucleus = T 0.7/top-p 0.9, greedy = T 0 "
                   "(one sample); both = train + nucleus, all = the three (default: all). "
                   "With --compare: only the tables of this setting")
    p.add_argument("--max-new-tokens", type=_positive_int, default=4096, metavar="N",
                   help="completion length limit in tokens (default: 4096). Training's config field: "
                   "max_completion_length")
    p.add_argument("--limit", type=_positive_int, default=None, metavar="N",
                   help="evaluate the first N problems of each benchmark")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="directory with <benchmark>.jsonl files ({id, problem, answer, meta})")
    p.add_argument("--hub", action="store_true",
                   help="load the benchmarks from their hub copies (network; see docs/eval.md for the columns)")
    p.add_argument("--template", default="boxed",
                   help="prompt template: a stapo.data.PROMPT_TEMPLATES name or a string with {problem} "
                   "(default: boxed, as in training). Training's config field: prompt_template")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="run directory (default: runs/eval/<model>-<timestamp>); reusing one resumes it. "
                   "Training's config field: output_dir")
    p.add_argument("--backend", default="auto", choices=("auto", "hf", "vllm"),
                   help="generation backend (default: vllm if installed and a GPU is present, else hf)")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="HF backend: rows per generate call")
    p.add_argument("--seed", type=int, default=0, help="run seed; each sample's seed derives from it")
    p.add_argument("--extract", default="auto", choices=tuple(EXTRACTION_RULES),
                   help="answer extraction (named in every table): "
                   + "; ".join(f"{m} = {rule}" for m, rule in EXTRACTION_RULES.items()) + " (default: auto)")
    p.add_argument("--dtype", default=None, help="model dtype (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--compare", nargs="+", metavar="RUN", default=None,
                   help="print the results of several run directories side by side and exit")
    p.add_argument("--metric", default="avg@k", choices=("avg@k", "pass@k", "maj@k"),
                   help="--compare: which metric to tabulate (default: avg@k)")
    p.set_defaults(func=run)
    _DEFAULTS.update({name: p.get_default(name) for name in GENERATION_OPTIONS})


_DEFAULTS: dict = {}  # the parser's defaults of GENERATION_OPTIONS, to tell which ones a user typed


def run(args) -> int:
    from stapo.cli import UserError

    if args.compare:
        return _compare(args)
    if not args.model:
        raise UserError("--model is required (or use --compare RUN...)")
    if args.metric != "avg@k":
        raise UserError("--metric chooses the metric of --compare; a new evaluation reports all three")
    if args.setting is None:
        args.setting = "all"

    from pathlib import Path

    from stapo.eval.protocol import parse_benchmarks, parse_settings
    from stapo.eval.runner import EvalConfig, EvalError, default_out_dir, env_threads, evaluate

    try:
        benchmarks = parse_benchmarks(args.benchmarks)
        settings = parse_settings(args.setting)
    except ValueError as err:
        raise UserError(str(err)) from None
    env_threads()
    config = EvalConfig(
        model=args.model,
        out_dir=Path(args.out) if args.out else default_out_dir(args.model),
        benchmarks=benchmarks,
        settings=settings,
        samples=args.samples,
        max_new_tokens=args.max_new_tokens,
        limit=args.limit,
        data_dir=args.data_dir,
        seed=args.seed,
        backend=args.backend,
        batch_size=args.batch_size,
        extract=args.extract,
        template=args.template,
        hub=args.hub,
        dtype=args.dtype,
        progress=not args.no_progress,
    )
    try:
        results = evaluate(config)
    except EvalError as err:
        raise UserError(str(err)) from None
    from stapo.eval.report import run_table

    print(run_table(results))
    print(f"wrote {config.out_dir}/results.md, results.json, samples.jsonl")
    return 0


def _compare(args) -> int:
    from pathlib import Path

    from stapo.cli import UserError
    from stapo.eval.report import compare_table, load_results

    given = [f"--{name.replace('_', '-')}" for name in GENERATION_OPTIONS
             if getattr(args, name) != _DEFAULTS.get(name)]
    if given:
        raise UserError(f"--compare reads finished runs; {', '.join(given)} configure a new evaluation "
                        "(drop them, or run them without --compare). --setting and --metric choose the tables")
    from stapo.eval.protocol import SETTING_GROUPS

    settings = None if args.setting is None else list(SETTING_GROUPS.get(args.setting, (args.setting,)))
    runs = []
    try:
        for path in args.compare:
            runs.append((Path(path.rstrip("/")).name or path, load_results(path)))
        print(compare_table(runs, metric=args.metric, settings=settings))
    except ValueError as err:
        raise UserError(str(err)) from None
    return 0
