"""`stapo eval`'s engine: benchmarks -> prompts -> a generation backend -> the grader -> metrics.

    evaluate(config)   generate what is missing, grade it, write samples.jsonl / results.json /
                       results.md in config.out_dir, return the results dict

Every sample is identified by (benchmark, setting, problem id, sample index) and carries its own
seed (stapo.eval.protocol.sample_seed): a rerun with the same out dir generates only the samples the
log lacks, and the scores are always recomputed from the log, so any number can be audited there.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stapo.eval import metrics
from stapo.eval.protocol import BENCHMARKS, DEFAULT_SAMPLES, SETTINGS, sample_seed
from stapo.eval.report import run_table
from stapo.eval.store import SampleLog
from stapo.rundir import atomic_write_text, is_disk_full

__all__ = ["EvalConfig", "EvalError", "Problem", "evaluate", "compute_results", "default_out_dir"]

# Keys of run.json that change what a sample is; a rerun into the same directory must match them.
GENERATION_KEYS = ("model", "max_new_tokens", "seed", "backend", "prompt_format", "extract", "hub")


class EvalError(ValueError):
    """A user-facing evaluation error (bad benchmark, data, model or run directory)."""


@dataclass
class EvalConfig:
    model: str
    out_dir: Path
    benchmarks: list[str] = field(default_factory=lambda: list(BENCHMARKS))
    settings: list[str] = field(default_factory=lambda: list(SETTINGS))
    samples: int | None = None  # None: DEFAULT_SAMPLES per benchmark
    max_new_tokens: int = 4096
    limit: int | None = None
    data_dir: str | None = None
    seed: int = 0
    backend: str = "auto"
    batch_size: int = 16  # HF backend rows per generate call
    extract: str = "auto"  # answer extraction mode, as in training's reward (stapo.rewards)
    template: str = "boxed"  # stapo.data.PROMPT_TEMPLATES name (the paper's boxed instruction)
    hub: bool = False  # benchmarks from the hub (stapo.data.BENCHMARK_HUB_IDS) instead of local files
    grade_timeout: float = 5.0
    dtype: str | None = None
    progress: bool = True

    def k_for(self, benchmark: str, setting: str | None = None) -> int:
        fixed = SETTINGS[setting].samples if setting is not None else None
        if fixed is not None:
            return fixed
        return self.samples if self.samples is not None else DEFAULT_SAMPLES[benchmark]


@dataclass(frozen=True)
class Problem:
    benchmark: str
    id: str
    problem: str
    answer: str
    flag: str | None = None  # why the problem cannot be graded fairly (kept, reported)


def default_out_dir(model: str, root: str | Path = "runs/eval") -> Path:
    name = model.rstrip("/").replace("\\", "/").split("/")[-1] or "model"
    return Path(root) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


# --------------------------------------------------------------------------------------- data, prompts


def load_problems(config: EvalConfig) -> dict[str, list[Problem]]:
    """The rows of every requested benchmark (first `limit` of each), loaded before any model.

    Local files (`data_dir`, see stapo.data.find_benchmark_dir) by default; with `config.hub`, the
    hub copies and column mappings of stapo.data.BENCHMARK_HUB_IDS (network).
    """
    from stapo.data import BENCHMARK_HUB_IDS, load_benchmark, load_prompts, ungradable_reason

    out: dict[str, list[Problem]] = {}
    for name in config.benchmarks:
        rows: list[dict[str, Any]]
        try:
            if config.hub:
                spec = dict(BENCHMARK_HUB_IDS[name])
                rows = load_prompts(spec.pop("source"), limit=config.limit, **spec)
                for r in rows:
                    r["ungradable"] = ungradable_reason(r)
            else:
                rows = load_benchmark(name, data_dir=config.data_dir)
        except (OSError, ValueError, KeyError) as err:
            raise EvalError(str(err)) from None
        if config.limit is not None:
            rows = rows[: config.limit]
        out[name] = [Problem(name, str(r["id"]), r["problem"], r["answer"], r.get("ungradable")) for r in rows]
        if not out[name]:
            raise EvalError(f"benchmark {name!r} has no problems")
        ids = [p.id for p in out[name]]
        if len(set(ids)) != len(ids):
            raise EvalError(f"benchmark {name!r}: problem ids are not unique (samples are keyed by id)")
    return out


def prompt_token_ids(tokenizer, problem: str, template: str) -> list[int]:
    """The training prompt (stapo.data.format_prompt: the chat template when the tokenizer has one)
    as token ids; special tokens come from the template only, as TRL tokenizes prompts."""
    from stapo.data import format_prompt

    text = format_prompt(problem, tokenizer, template=template)
    return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


# ---------------------------------------------------------------------------------------- the run dir


def _check_run_dir(out_dir: Path, run_info: dict) -> None:
    path = out_dir / "run.json"
    if path.exists():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise EvalError(f"{path}: unreadable ({err}); use another --out") from None
        for key in GENERATION_KEYS:
            if previous.get(key) != run_info.get(key):
                raise EvalError(
                    f"{out_dir} holds a run with {key}={previous.get(key)!r}, this one has "
                    f"{key}={run_info.get(key)!r}; its samples cannot be reused — use another --out"
                )


def _start_run_dir(out_dir: Path, run_info: dict) -> None:
    """Create the directory and its run.json (once the model has loaded: a failed start leaves nothing)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (out_dir / "run.json").exists():
        atomic_write_text(out_dir / "run.json", json.dumps(run_info, indent=2) + "\n")


def _todo(config: EvalConfig, problems: dict[str, list[Problem]], log: SampleLog):
    """(setting, benchmark) -> [(problem, sample index)] still missing from the log."""
    todo: dict[tuple[str, str], list[tuple[Problem, int]]] = {}
    for setting in config.settings:
        for bench, rows in problems.items():
            missing = [(p, i) for p in rows for i in range(config.k_for(bench, setting))
                       if (bench, setting, p.id, i) not in log]
            if missing:
                todo[(setting, bench)] = missing
    return todo


def _count(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def plan_line(config: EvalConfig, problems: dict[str, list[Problem]]) -> str:
    """What the run asks for, in one line: benchmarks (problems) x settings x samples = total, and
    the length limit. `--benchmark`-style slips and the default `--setting all` show here, before
    any model loads."""
    sizes = {b: len(rows) for b, rows in problems.items()}
    if len(set(sizes.values())) == 1:
        n = next(iter(sizes.values()))
        benches = f"{', '.join(sizes)} ({_count(n, 'problem')}{' each' if len(sizes) > 1 else ''})"
    else:
        benches = ", ".join(f"{b} ({_count(n, 'problem')})" for b, n in sizes.items())
    settings = f"setting{'s' if len(config.settings) > 1 else ''} {', '.join(config.settings)}"
    sampled = [s for s in config.settings if SETTINGS[s].samples is None]
    fixed = {s: k for s in config.settings if (k := SETTINGS[s].samples) is not None}
    by_k: dict[int, list[str]] = {}
    for b in sizes:
        by_k.setdefault(config.k_for(b), []).append(b)
    if len(by_k) == 1:
        samples = _count(next(iter(by_k)), "sample")
    else:
        samples = ", ".join(f"{_count(k, 'sample')} for {'/'.join(bs)}" for k, bs in by_k.items())
    fixed_text = ", ".join(f"{s}: {k}" for s, k in fixed.items())
    if not sampled:
        samples = ", ".join(f"{_count(k, 'sample')} ({s})" for s, k in fixed.items())
    elif fixed:
        samples += f" ({fixed_text})"
    total = sum(sizes[b] * config.k_for(b, s) for s in config.settings for b in sizes)
    return (f"plan: {benches} x {settings} x {samples} = {_count(total, 'sample')}, "
            f"up to {config.max_new_tokens:,} new tokens each")


# ------------------------------------------------------------------------------------------- backends


def _make_backend(config: EvalConfig, backend_name: str):
    from stapo.eval.backends import HFBackend, VLLMBackend
    from stapo.models import ModelLoadError, load_model, load_tokenizer, resolve_model

    backend: VLLMBackend | HFBackend
    try:
        tokenizer = load_tokenizer(config.model)
        if backend_name == "vllm":
            backend = VLLMBackend(resolve_model(config.model), tokenizer, dtype=config.dtype,
                                  progress=config.progress)
        else:
            model = load_model(config.model, dtype=config.dtype)
            backend = HFBackend(model, tokenizer, batch_size=config.batch_size)
    except ModelLoadError as err:
        raise EvalError(str(err)) from None
    return tokenizer, backend


# ----------------------------------------------------------------------------------------- generation


def _generate_missing(config, todo, tokenizer, backend, log: SampleLog, out) -> None:
    """Generate, grade and log the missing samples, one generation batch at a time (HF: one
    `generate` call; vLLM: one benchmark and setting, with vLLM's own progress bar)."""
    from tqdm import tqdm

    from stapo.eval.backends import SampleRequest
    from stapo.rewards import extract_answer, grade_batch

    prompt_cache: dict[tuple[str, str], tuple[list[int], str]] = {}
    total = sum(len(missing) for missing in todo.values())
    # every batch is shown (miniters=1, mininterval=0): batches are seconds to minutes apart
    bar = tqdm(total=total, desc="generated", unit="sample", file=out, disable=not config.progress,
               dynamic_ncols=True, miniters=1, mininterval=0)
    gen_tokens, gen_seconds = 0, 0.0
    chunk = max(1, int(backend.batch_size))
    for (setting_name, bench), missing in todo.items():
        setting = SETTINGS[setting_name]
        for start in range(0, len(missing), chunk):
            part = missing[start : start + chunk]
            requests = []
            for p, idx in part:
                key = (bench, p.id)
                if key not in prompt_cache:
                    ids = prompt_token_ids(tokenizer, p.problem, config.template)
                    prompt_cache[key] = (ids, tokenizer.decode(ids, skip_special_tokens=False))
                requests.append(SampleRequest(
                    prompt_ids=tuple(prompt_cache[key][0]), temperature=setting.temperature, top_p=setting.top_p,
                    max_new_tokens=config.max_new_tokens,
                    seed=sample_seed(config.seed, bench, setting_name, p.id, idx),
                ))
            t0 = time.perf_counter()
            completions = backend.generate(requests)
            gen_s = time.perf_counter() - t0
            # the batch is generated: the bar moves now, not after grading
            gen_tokens += sum(c.num_tokens for c in completions)
            gen_seconds += gen_s
            bar.set_postfix_str(f"{bench} [{setting_name}], {gen_tokens / max(gen_seconds, 1e-9):.1f} tok/s",
                                refresh=False)
            bar.update(len(part))
            t1 = time.perf_counter()
            verdicts = grade_batch([c.text for c in completions], [p.answer for p, _ in part],
                                   timeout=config.grade_timeout, mode=config.extract)
            grade_s = time.perf_counter() - t1
            records = []
            for (p, idx), req, comp, verdict in zip(part, requests, completions, verdicts):
                records.append({
                    "benchmark": bench, "setting": setting_name, "problem_id": p.id, "sample_idx": idx,
                    "seed": req.seed, "temperature": req.temperature, "top_p": req.top_p,
                    "prompt": prompt_cache[(bench, p.id)][1], "prompt_tokens": len(req.prompt_ids),
                    "completion": comp.text, "completion_tokens": comp.num_tokens,
                    "finish_reason": comp.finish_reason,
                    "extracted": extract_answer(comp.text, mode=config.extract),
                    "gold": p.answer, "correct": bool(verdict >= 1.0), "flag": p.flag,
                    # timings are per call, amortized over its samples (one batch = one call)
                    "gen_s": gen_s / len(part), "grade_s": grade_s / len(part), "batch_size": len(part),
                    "backend": backend.name,
                })
            log.append(records)
    bar.close()


# -------------------------------------------------------------------------------------------- results


def compute_results(config: EvalConfig, problems: dict[str, list[Problem]], log: SampleLog, run_info: dict) -> dict:
    """Scores recomputed from the log for this config's problems and k (a partial run reports the
    problems that have all k samples and is marked incomplete)."""
    results: dict = {}
    complete = True
    for setting in config.settings:
        per: dict = {}
        for bench, rows in problems.items():
            k = config.k_for(bench, setting)
            graded = []
            for p in rows:
                recs = [r for i in range(k) if (r := log.get((bench, setting, p.id, i))) is not None]
                if len(recs) < k:  # a sample is missing
                    complete = False
                    continue
                graded.append(([r["extracted"] for r in recs], [bool(r["correct"]) for r in recs]))
            if graded:
                per[bench] = metrics.aggregate_problems(graded)
        if per:
            per["average"] = metrics.average_over_benchmarks({b: r for b, r in per.items()})
        results[setting] = per
    flagged = {b: [{"id": p.id, "reason": p.flag} for p in rows if p.flag] for b, rows in problems.items()}
    return {
        **run_info,
        "settings": {s: {"temperature": SETTINGS[s].temperature, "top_p": SETTINGS[s].top_p} for s in config.settings},
        "k": {b: config.k_for(b) for b in problems},
        "limit": config.limit,
        "complete": complete,
        "results": results,
        "flagged": flagged,
        "samples_file": "samples.jsonl",
    }


def write_results(out_dir: Path, results: dict) -> str:
    table = run_table(results)
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out_dir / "results.md", table)
    return table


def _data_dir_name(config: EvalConfig) -> str | None:
    if config.hub:
        return None
    from stapo.data import find_benchmark_dir

    return str(find_benchmark_dir(config.data_dir).resolve())


def evaluate(config: EvalConfig, out=None, backend=None, tokenizer=None) -> dict:
    """Run (or resume) an evaluation; returns the results dict also written to results.json.

    `backend` / `tokenizer`: an already built generation backend (anything with `name`, `info`,
    `batch_size` and `generate(requests)`) and its tokenizer, instead of loading `config.model`.
    A full disk is an `EvalError` naming the output directory (what is written stays whole).
    """
    try:
        return _evaluate(config, out, backend, tokenizer)
    except Exception as err:
        if is_disk_full(err):
            raise EvalError(
                f"{config.out_dir}: no space left on device; free some space and rerun the same command "
                "(the samples already in samples.jsonl are kept and only the missing ones are generated)"
            ) from None
        raise


def _evaluate(config: EvalConfig, out, backend, tokenizer) -> dict:
    from stapo import __version__
    from stapo.eval.backends import choose_backend

    out = out if out is not None else sys.stderr  # looked up per call (tests capture it)
    if config.samples is not None and config.samples < 1:
        raise EvalError(f"--samples must be >= 1, got {config.samples}")
    if config.max_new_tokens < 1:
        raise EvalError(f"--max-new-tokens must be >= 1, got {config.max_new_tokens}")
    if config.limit is not None and config.limit < 1:
        raise EvalError(f"--limit must be >= 1, got {config.limit}")
    problems = load_problems(config)
    backend_name = backend.name if backend is not None else choose_backend(config.backend)
    out_dir = Path(config.out_dir)
    run_info = {
        "model": config.model, "max_new_tokens": config.max_new_tokens, "seed": config.seed,
        "backend": backend_name, "prompt_format": config.template, "extract": config.extract,
        "hub": config.hub, "data_dir": _data_dir_name(config), "stapo_version": __version__,
    }
    _check_run_dir(out_dir, run_info)
    try:
        log = SampleLog(out_dir / "samples.jsonl")
    except ValueError as err:
        raise EvalError(str(err)) from None
    todo = _todo(config, problems, log)
    n_missing = sum(len(v) for v in todo.values())
    if todo and backend is None:
        # The model's config.json and tokenizer, and the prompt lengths against its context, before
        # the plan is printed and the weights load (docs/data.md): a bad --model is the first line.
        from stapo.data import DataError, check_eval_prompts
        from stapo.models import ModelLoadError
        try:
            check_eval_prompts(config.model, problems, config.template, config.max_new_tokens)
        except (DataError, ModelLoadError) as err:
            raise EvalError(str(err)) from None
    done = f"{len(log):,} already in samples.jsonl, " if len(log) else ""
    print(f"stapo eval: {plan_line(config, problems)}; {done}{n_missing:,} to generate; backend {backend_name}; "
          f"out {out_dir}", file=out, flush=True)
    backend_info = {"backend": backend_name}
    if todo:
        from stapo.rewards import warmup

        warmup(wait=False)  # the graders import sympy while the model loads, not when the first batch is due
    if todo and backend is None:
        tokenizer, backend = _make_backend(config, backend_name)
    _start_run_dir(out_dir, run_info)
    try:
        if todo:
            backend_info = dict(backend.info)
            _generate_missing(config, todo, tokenizer, backend, log, out=out)
    finally:
        # also on interrupt: the scores of what is complete, marked incomplete (atomic writes)
        if len(log) or not todo:
            results = compute_results(config, problems, log, {**run_info, "backend_info": backend_info})
            results["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
            write_results(out_dir, results)
    return results


def env_threads() -> None:
    """Respect OMP_NUM_THREADS for torch on CPU (generate otherwise grabs every core)."""
    n = os.environ.get("OMP_NUM_THREADS")
    if n and n.isdigit():
        import torch

        torch.set_num_threads(int(n))
