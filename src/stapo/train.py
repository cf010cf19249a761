"""The `stapo train` recipe: config -> data -> reward -> STAPOTrainer -> run directory.

Thin on purpose: TRL does generation, batching, logging and checkpointing; `stapo.core` does the
math (through `stapo.engines.trl`); this file wires the pieces and writes the run directory:

    <output_dir>/config.yaml        the resolved config (rerun with `stapo train <output_dir>/config.yaml`)
    <output_dir>/metrics.jsonl      one line per logged step (the engine's callback)
    <output_dir>/checkpoint-N/      TRL checkpoints (`--resume` continues from the last one)
    <output_dir>/eval.json          held-out accuracy before and after training (when eval_data is set)
    <output_dir>/plots/*.png        reward, accuracy, entropy and S2T masked fraction over steps
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from transformers import TrainerCallback

from stapo.config import ConfigError, RunConfig, dump_config

Log = Callable[[str], None]


def _print(msg: str) -> None:
    print(msg, flush=True)


def build_stapo_config(run: RunConfig):
    """`STAPOConfig` from the run's TRL fields, with CPU-safe defaults when no GPU is present."""
    import torch

    from stapo.engines.trl import STAPOConfig

    kwargs = dict(run.trl)
    if not torch.cuda.is_available():
        # TRL's GRPOConfig defaults to bf16 and gradient checkpointing, both slow (or unsupported) on CPUs.
        kwargs.setdefault("bf16", False)
        kwargs.setdefault("gradient_checkpointing", False)
        kwargs.setdefault("use_cpu", True)
    try:
        return STAPOConfig(**kwargs)
    except (ValueError, TypeError) as err:
        raise ConfigError([str(err).strip().splitlines()[0]], "config") from None


def load_rows(source: str, run: RunConfig, limit: int | None = None, **kwargs) -> list[dict]:
    from stapo.data import load_prompts

    rows = load_prompts(
        source,
        problem_key=run.problem_key,
        answer_key=run.answer_key,
        on_invalid="skip" if run.skip_invalid_rows else "error",
        limit=limit,
        **kwargs,
    )
    skipped = getattr(rows, "skipped", None) or []
    if skipped:
        _print(f"stapo: skipped {len(skipped)} invalid row(s) of {source} (first: row {skipped[0][0]}: {skipped[0][1]})")
    if not rows:
        raise ConfigError([f"{source} has no usable rows"], "train_data" if source == run.train_data else "eval_data")
    return rows


def prompt_for(problem: str, tokenizer, run: RunConfig):
    """A conversational prompt (TRL applies the chat template) or a raw string for tokenizers without one."""
    from stapo.data import build_messages, format_prompt

    if getattr(tokenizer, "chat_template", None):
        return build_messages(problem, run.prompt_template, run.system_prompt)
    return format_prompt(problem, tokenizer, run.prompt_template, run.system_prompt)


def make_reward_function(run: RunConfig):
    """TRL reward function: 1.0 / 0.0 from the safe, bounded grader (`stapo.rewards`), logging the
    batch's grading failure fractions (timeouts, parse failures, no answer) through TRL."""
    from stapo.rewards import trl_reward_fn

    return trl_reward_fn(answer_key="answer", timeout=run.reward_timeout, require_boxed=run.reward_mode == "boxed")


def evaluate_accuracy(model, tokenizer, rows: list[dict], run: RunConfig, max_new_tokens: int, seed: int,
                      desc: str = "eval") -> dict:
    """avg@k accuracy on `rows`: `eval_samples` samples per problem with the HF generation backend,
    graded by the same reward as training. Deterministic in `seed`."""
    from tqdm.auto import tqdm

    from stapo.eval.backends import HFBackend, SampleRequest
    from stapo.eval.metrics import mean_and_se
    from stapo.rewards import grade_batch

    backend = HFBackend(model, tokenizer, batch_size=32)
    requests, golds = [], []
    for i, row in enumerate(rows):
        prompt = prompt_for(row["problem"], tokenizer, run)
        if isinstance(prompt, list):
            prompt = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        ids = tuple(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        for k in range(run.eval_samples):
            requests.append(SampleRequest(ids, run.eval_temperature, run.eval_top_p, max_new_tokens,
                                          seed * 1_000_003 + i * 1009 + k))
            golds.append(row["answer"])
    was_training = model.training
    model.eval()
    completions = []
    t0 = time.time()
    with tqdm(total=len(requests), desc=desc, unit="sample", leave=False) as bar:
        for start in range(0, len(requests), backend.batch_size):
            completions.extend(backend.generate(requests[start : start + backend.batch_size]))
            bar.update(len(requests[start : start + backend.batch_size]))
    if was_training:
        model.train()
    scores = grade_batch([c.text for c in completions], golds, timeout=run.reward_timeout, mode=run.reward_mode)
    k = run.eval_samples
    per_problem = [sum(scores[i * k : (i + 1) * k]) / k for i in range(len(rows))]
    accuracy, stderr = mean_and_se(per_problem)
    return {
        "accuracy": accuracy,
        "stderr": stderr,
        "problems": len(rows),
        "samples_per_problem": k,
        "mean_completion_tokens": sum(c.num_tokens for c in completions) / max(len(completions), 1),
        "seconds": round(time.time() - t0, 2),
    }


class HeldoutAccuracyCallback(TrainerCallback):
    """Held-out accuracy every `every` optimizer steps, logged through the trainer's callbacks (so it
    lands in metrics.jsonl as its own `eval_heldout_accuracy` line of kind "eval", and in report_to)."""

    def __init__(self, trainer, every: int, evaluate: Callable[[Any], dict]):
        self.trainer, self.every, self.evaluate = trainer, every, evaluate

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 and state.global_step < state.max_steps:
            res = self.evaluate(self.trainer.model)
            logs = {"eval_heldout_accuracy": res["accuracy"], "eval_heldout_stderr": res["stderr"]}
            # Straight to the callbacks (metrics.jsonl, progress bar, report_to), not Trainer.log:
            # that would take TRL's accumulated training metrics into this line and clear
            # `should_log`, dropping this step's own training log (loss, grad_norm).
            state.log_history.append({**logs, "step": state.global_step})
            should_log = control.should_log
            control = self.trainer.callback_handler.on_log(args, state, control, logs) or control
            control.should_log = should_log
        return control


def run_training(run: RunConfig, resume: bool = False, log: Log = _print) -> dict:
    """Train as configured; returns a summary (also written to <output_dir>/summary.json)."""
    import datasets
    import torch

    from stapo.engines.trl import STAPOTrainer
    from stapo.models import load_tokenizer, resolve_model

    args = build_stapo_config(run)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    main_process = int(os.environ.get("RANK", "0")) == 0  # accelerate/torchrun set RANK per process
    if main_process:
        dump_config(run, out / "config.yaml")

    train_rows = load_rows(run.train_data, run, **run.train_data_kwargs)
    eval_rows = load_rows(run.eval_data, run, limit=run.eval_limit) if run.eval_data else None
    log(f"stapo: method={args.method} model={run.model} train={len(train_rows)} rows"
        + (f" eval={len(eval_rows)} rows" if eval_rows else "") + f" -> {out}")

    model_path = resolve_model(run.model)
    tokenizer = load_tokenizer(run.model)
    # Prompt lengths against the model's context (config.json), before the weights load: docs/data.md.
    from stapo.data import fit_training_prompts
    train_rows, eval_rows = fit_training_prompts(run, args, model_path, tokenizer, train_rows, eval_rows, log)
    train_ds = datasets.Dataset.from_list(
        [{"prompt": prompt_for(r["problem"], tokenizer, run), "answer": r["answer"]} for r in train_rows]
    )
    try:
        trainer = STAPOTrainer(
            model=model_path,
            reward_funcs=[make_reward_function(run)],
            args=args,
            train_dataset=train_ds,
            processing_class=tokenizer,
        )
    except ValueError as err:  # options the model cannot serve (e.g. fused_lm_head=true with softcapped logits)
        raise ConfigError([str(err).strip().splitlines()[0]], "config") from None
    summary: dict[str, Any] = {"method": args.method, "model": run.model, "output_dir": str(out)}
    eval_tokens = run.eval_max_new_tokens or args.max_completion_length
    if eval_rows and trainer.accelerator.num_processes > 1:
        # HF generation on a sharded model would need every process; evaluate checkpoints instead.
        log("stapo: eval_data is evaluated in single-process runs only; use `stapo eval` on the checkpoints")
        eval_rows = None
    if eval_rows and run.eval_every:
        trainer.add_callback(HeldoutAccuracyCallback(
            trainer, run.eval_every,
            lambda model: evaluate_accuracy(model, tokenizer, eval_rows, run, eval_tokens, args.seed, "eval"),
        ))
    last_checkpoint = _last_checkpoint(out) if resume else None
    if resume and last_checkpoint is None:
        log(f"stapo: --resume: no checkpoint in {out}; starting from scratch")

    results = _read_json(out / "eval.json") if resume else {}
    if eval_rows and run.eval_before and "before" not in results:
        log(f"stapo: held-out accuracy before training ({len(eval_rows)} problems x {run.eval_samples} samples) ...")
        results["before"] = evaluate_accuracy(trainer.model, tokenizer, eval_rows, run, eval_tokens, args.seed, "eval before")
        _write_json(out / "eval.json", results)
        log(f"stapo: before: accuracy {results['before']['accuracy']:.3f} ± {results['before']['stderr']:.3f}")

    t0 = time.time()
    train_output = trainer.train(resume_from_checkpoint=str(last_checkpoint) if last_checkpoint else None)
    summary["train_seconds"] = round(time.time() - t0, 1)
    summary["global_step"] = trainer.state.global_step
    summary["train_loss"] = getattr(train_output, "training_loss", None)
    trainer.save_model(str(out / "final"))
    if main_process:
        tokenizer.save_pretrained(str(out / "final"))

    if eval_rows and run.eval_after:
        log("stapo: held-out accuracy after training ...")
        results["after"] = evaluate_accuracy(trainer.model, tokenizer, eval_rows, run, eval_tokens, args.seed, "eval after")
        _write_json(out / "eval.json", results)
        log(f"stapo: after: accuracy {results['after']['accuracy']:.3f} ± {results['after']['stderr']:.3f}")
    summary["eval"] = results
    if main_process:
        if run.plots:
            summary["plots"] = [str(p) for p in plot_run(out)]
        _write_json(out / "summary.json", summary)
    del trainer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return summary


def plot_runs(run_dirs: list[Path], out_png: Path) -> Path | None:
    """One PNG overlaying the curves (reward, entropy, S2T masked fraction, clip fractions, length)
    of one or more run directories, drawn by `stapo analyze`."""
    try:
        from stapo.analyze.plots import curves_png
        from stapo.analyze.runs import curve_panels, load_runs

        panels = curve_panels(load_runs([str(d) for d in run_dirs]))
        out_png.parent.mkdir(parents=True, exist_ok=True)
        out_png.write_bytes(curves_png(panels))
        return out_png
    except Exception as err:  # noqa: BLE001 - plots are a convenience; never fail a finished run on them
        _print(f"stapo: could not draw {out_png.name}: {err}")
        return None


def plot_run(run_dir: Path) -> list[Path]:
    png = plot_runs([run_dir], run_dir / "plots" / "curves.png")
    return [png] if png else []


def _last_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint-N directory (TRL writes trainer_state.json last)."""
    best = None
    for p in out.glob("checkpoint-*"):
        suffix = p.name.split("-", 1)[1]
        if p.is_dir() and suffix.isdigit() and (p / "trainer_state.json").is_file():
            if best is None or int(suffix) > int(best.name.split("-", 1)[1]):
                best = p
    return best


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)
