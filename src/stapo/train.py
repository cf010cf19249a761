"""The `stapo train` recipe: config -> data -> reward -> STAPOTrainer -> run directory.

Thin on purpose: TRL does generation, batching, logging and checkpointing; `stapo.core` does the
math (through `stapo.engines.trl`); this file wires the pieces. The run directory's layout, its atomic
writes and the rules for starting in an existing directory are `stapo.rundir`'s.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from stapo import rundir
from stapo.config import ConfigError, RunConfig, dump_config

Log = Callable[[str], None]


def _print(msg: str) -> None:
    print(msg, flush=True)


def _quiet(msg: str) -> None:
    pass


def lora_config(run: RunConfig):
    """The run's `peft.LoraConfig` (TRL's `peft_config`), or None without use_peft."""
    if not run.use_peft:
        return None
    from peft import LoraConfig

    return LoraConfig(r=run.lora_r, lora_alpha=run.lora_alpha, lora_dropout=run.lora_dropout,
                      target_modules=run.lora_target_modules, task_type="CAUSAL_LM")


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
        _print(f"stapo: skipped {len(skipped)} invalid row(s) of {source} "
               f"(first: row {skipped[0][0]}: {skipped[0][1]})")
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

    t0 = time.monotonic()
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
    # disable=None: a bar on a terminal only (redrawn into a log file it leaves carriage returns and cursor codes)
    with tqdm(total=len(requests), desc=desc, unit="sample", leave=False, disable=None) as bar:
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
        "seconds": round(time.monotonic() - t0, 2),
    }


def _accuracy(res: dict) -> str:
    return f"accuracy {res['accuracy']:.3f} ± {res['stderr']:.3f} (evaluated in {res['seconds']:.1f} s)"


class HeldoutAccuracyCallback(TrainerCallback):
    """Held-out accuracy before training, every `every` optimizer steps and after the last step.

    Each measurement is logged through the trainer's callbacks at its step (step 0 = before), so it
    lands in metrics.jsonl as an `eval_heldout_accuracy` line of kind "eval", in report_to
    (TensorBoard / W&B: eval/heldout_accuracy), on the console line of that step and in curves.png.
    The line carries the seconds it took (`eval_heldout_seconds`): the console leaves them out of
    s/step and the ETA. "before" and "after" also go to `results` (eval.json, written by `save`).
    """

    def __init__(self, trainer, evaluate: Callable[[Any, str], dict], results: dict, save: Callable[[], None],
                 every: int = 0, before: bool = True, after: bool = True, log: Log = _print):
        self.trainer, self.evaluate, self.results, self.save = trainer, evaluate, results, save
        self.every, self.before, self.after, self.log = every, before, after, log

    def _measure(self, when: str) -> dict:
        self.log(f"stapo: held-out accuracy {when} ...")
        return self.evaluate(self.trainer.model, f"eval {when.split()[0]}")

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.before or "before" in self.results:
            return  # a resumed run measured it already (and its metrics.jsonl has the line)
        res = self.results["before"] = self._measure("before training")
        self.save()
        self.log(f"stapo: before: {_accuracy(res)}")
        if state.global_step == 0:
            self._log(args, state, control, res)

    def on_step_end(self, args, state, control, **kwargs):
        last = state.global_step >= state.max_steps
        if last and self.after:
            res = self.results["after"] = self._measure("after training")
            self.save()
            self.log(f"stapo: after: {_accuracy(res)}")
        elif self.every and state.global_step % self.every == 0:
            res = self.evaluate(self.trainer.model, "eval")
        else:
            return control
        return self._log(args, state, control, res)

    def _log(self, args, state, control, res):
        logs = {"eval_heldout_accuracy": res["accuracy"], "eval_heldout_stderr": res["stderr"],
                "eval_heldout_seconds": res["seconds"]}
        # Straight to the callbacks (metrics.jsonl, console, report_to), not Trainer.log: that would take
        # TRL's accumulated training metrics into this line and clear `should_log`, dropping this step's
        # own training log (loss, grad_norm).
        state.log_history.append({**logs, "step": state.global_step})
        should_log = control.should_log
        control = self.trainer.callback_handler.on_log(args, state, control, logs) or control
        control.should_log = should_log
        return control


def logged_loss_sum(log_history: list[dict], up_to_step: int) -> float:
    """Σ of the per-step training losses the logs of steps <= `up_to_step` stand for.

    Each `loss` entry is the mean over the steps since the previous one, so it counts (step − previous
    step) times; this is the Trainer's own running total (`_total_loss_scalar`) at the last log before
    `up_to_step`.
    """
    total, previous = 0.0, 0
    for entry in sorted((e for e in log_history if "loss" in e and "step" in e), key=lambda e: e["step"]):
        if entry["step"] > up_to_step:
            break
        total += float(entry["loss"]) * (entry["step"] - previous)
        previous = entry["step"]
    return total


class ResumedLossCallback(TrainerCallback):
    """On resume at step k, start the Trainer's loss total at the logged losses of steps 1..k.

    The Trainer restarts that total at 0 and divides it by every step at the end, so a resumed run
    reported its post-resume losses over all steps as `train_loss` (the printed summary line, the
    "summary" line of metrics.jsonl and summary.json); with this it equals an uninterrupted run's.
    """

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0:
            self.trainer._total_loss_scalar += logged_loss_sum(state.log_history, state.global_step)


def run_training(run: RunConfig, resume: bool = False, log: Log = _print, overwrite: bool = False) -> dict:
    """Train as configured; returns a summary (also written to <output_dir>/summary.json).

    A non-empty output directory is refused (`rundir.RunDirError`) unless `resume` continues the run
    there or `overwrite` replaces it, and so is one another run holds (the main process holds the
    directory's lock until this returns). Every check that can refuse the start (data, prompt lengths,
    options the model cannot serve) comes before anything is written or deleted, so a refused start
    leaves the directory as it was. A full disk becomes a `RunDirError` naming the path.
    """
    from stapo.engines.trl.console import quiet_console

    args = build_stapo_config(run)
    out = Path(args.output_dir)
    main_process = int(os.environ.get("RANK", "0")) == 0  # accelerate/torchrun set RANK per process
    if not main_process:  # one console for the run: the other processes print warnings and errors only
        log = _quiet
    # Only the main process writes the directory; the others would see its files and its lock.
    lock = rundir.claim_output_dir(out, resume=resume, overwrite=overwrite) if main_process else None
    try:
        with quiet_console():
            return _train(run, args, out, resume, overwrite, main_process, log)
    except Exception as err:
        if rundir.is_disk_full(err):
            raise rundir.RunDirError(_disk_full_message(err, out, main_process)) from None
        raise
    finally:
        if lock is not None:
            lock.release()


def _disk_full_message(err: BaseException, out: Path, main_process: bool) -> str:
    """What a full disk stopped, what of the run is whole on disk, and the way on; the staging
    directory of the write that failed is removed (it is never resumed from)."""
    partial = []
    if main_process:
        partial = rundir.remove_stale_staging(out)
        staged_final = out / rundir.staged_name(rundir.FINAL_DIR)
        if staged_final.is_dir():
            shutil.rmtree(staged_final, ignore_errors=True)
            partial.append(staged_final)
    path = getattr(err, "filename", None) or out
    complete = rundir.last_checkpoint(out)
    kept = (f"{complete.name} is the newest complete checkpoint" if complete is not None
            else "no checkpoint was complete yet, so --resume starts from step 0")
    removed = ""
    if partial:
        names = ", ".join(p.name[len(rundir.STAGING_PREFIX):] for p in partial)
        removed = f"; the partial {names} {'was' if len(partial) == 1 else 'were'} removed"
    return f"{path}: no space left on device; free some space and continue with --resume ({kept}{removed})"


def _train(run, args, out: Path, resume, overwrite, main_process, log) -> dict:
    import datasets
    import torch

    from stapo.data import fit_training_prompts
    from stapo.engines.trl import STAPOTrainer
    from stapo.models import load_tokenizer, resolve_model

    # args.world_size / args.device start the process group: the launch is visible before anything loads.
    log(f"stapo: {args.world_size} process{'es' if args.world_size > 1 else ''} (world size {args.world_size}), "
        f"device {args.device.type}" + (f", {args.n_gpu} GPU(s) per process" if args.n_gpu > 1 else ""))
    train_rows = load_rows(run.train_data, run, **run.train_data_kwargs)
    eval_rows = load_rows(run.eval_data, run, limit=run.eval_limit) if run.eval_data else None
    log(f"stapo: method={args.method} model={run.model} train={len(train_rows)} rows"
        + (f" eval={len(eval_rows)} rows" if eval_rows else "") + f" -> {out}")

    model_path = resolve_model(run.model)
    tokenizer = load_tokenizer(run.model)
    # Prompt lengths against the model's context (config.json), before the weights load: docs/data.md.
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
            peft_config=lora_config(run),
        )
    except ValueError as err:  # options the model cannot serve (e.g. fused_lm_head=true with softcapped logits)
        raise ConfigError([str(err).strip().splitlines()[0]], "config") from None

    # Every check has passed: from here on the run writes its directory.
    if main_process and overwrite:
        removed = rundir.clear_run_files(out)
        if removed:
            log(f"stapo: --overwrite: removed the previous run's {', '.join(p.name for p in removed)} from {out}")
    out.mkdir(parents=True, exist_ok=True)
    if main_process:
        dump_config(run, out / rundir.CONFIG_FILE)
    trainer.add_callback(ResumedLossCallback(trainer))
    summary: dict[str, Any] = {"method": args.method, "model": run.model, "output_dir": str(out)}
    eval_tokens = run.eval_max_new_tokens or args.max_completion_length
    if eval_rows and trainer.accelerator.num_processes > 1:
        # HF generation on a sharded model would need every process; evaluate checkpoints instead.
        log("stapo: eval_data is evaluated in single-process runs only; use `stapo eval` on the checkpoints")
        eval_rows = None
    last_checkpoint = rundir.last_checkpoint(out) if resume else None
    if resume and last_checkpoint is None:
        log(f"stapo: --resume: no checkpoint in {out}; starting from scratch")

    eval_path = out / rundir.EVAL_FILE
    results = rundir.read_json(eval_path) if resume else {}
    if eval_rows and (run.eval_before or run.eval_after or run.eval_every):
        def save_results():
            if main_process:
                rundir.atomic_write_json(eval_path, results)

        trainer.add_callback(HeldoutAccuracyCallback(
            trainer,
            lambda model, desc: evaluate_accuracy(model, tokenizer, eval_rows, run, eval_tokens, args.seed, desc),
            results, save_results, every=run.eval_every, before=run.eval_before, after=run.eval_after, log=log,
        ))

    t0 = time.time()
    train_output = trainer.train(resume_from_checkpoint=str(last_checkpoint) if last_checkpoint else None)
    summary["train_seconds"] = round(time.time() - t0, 1)
    summary["global_step"] = trainer.state.global_step
    summary["train_loss"] = getattr(train_output, "training_loss", None)
    # final/ is staged and renamed into place, like the checkpoints: a failed save leaves the old one.
    final, staged = out / rundir.FINAL_DIR, out / rundir.staged_name(rundir.FINAL_DIR)
    if main_process:
        shutil.rmtree(staged, ignore_errors=True)  # left by a crash while saving
    trainer.save_model(str(staged))
    if main_process:
        tokenizer.save_pretrained(str(staged))
        rundir.publish_checkpoint(staged, final)

    summary["eval"] = results
    if main_process:
        from stapo.engines.trl.model_card import write_model_card

        write_model_card(trainer, final)  # now with the held-out results; also final/README.md
        if run.plots:
            summary["plots"] = [str(p) for p in plot_run(out)]
        rundir.atomic_write_json(out / rundir.SUMMARY_FILE, summary)
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
        return rundir.atomic_write_bytes(out_png, curves_png(panels))
    except Exception as err:  # noqa: BLE001 - plots are a convenience; never fail a finished run on them
        _print(f"stapo: could not draw {out_png.name}: {err}")
        return None


def plot_run(run_dir: Path) -> list[Path]:
    png = plot_runs([run_dir], run_dir / rundir.PLOTS_DIR / rundir.CURVES_FILE)
    return [png] if png else []
