"""`STAPOTrainer`: TRL's GRPO trainer with the loss step of `stapo.core`.

Generation, rewards, advantages, batching, logging and checkpointing are TRL's. What is replaced,
and why (TRL / Trainer private methods in parentheses):

    the loss step            (_compute_loss)  log-probs/entropies -> token filter -> clipped loss -> metrics
    the LM head              (_get_per_token_logps_and_entropies)  stapo's head in TRL's slot (`lm_head.py`)
    step end                 (_clip_grad_norm, _get_grad_norm)  global step metrics, the deferred S2T
                             denominator, the non-finite guard
    checkpoints              (_save_checkpoint, _get_output_dir, _load_optimizer_and_scheduler)  written to
                             a staging directory and published with one rename (`stapo.rundir`)
    vLLM on a CPU            (__init__, _generate_and_score_completions)  TRL's colocated engine made to run on
                             vLLM's CPU build, the rollout log-prob gap (`vllm.py`)
    reward metrics           (_calculate_rewards, _generate_and_score_completions)  accuracy, zero-variance
                             groups, and each row's reward carried with the batch for rollout captures

Optimizer steps with a non-finite loss or gradient norm are skipped, counted and, after
`max_nonfinite_steps` in a row, stop the run (`NonFiniteTrainingError`); a resumed run drops the
metrics lines and rollout captures newer than its checkpoint.

Loss types and their core aggregation (micro-batch loss; B = micro-batch rows, GA = accumulation steps):

    dapo     token-mean, num_tokens = TRL's normaliser (num_items_in_batch / processes, rescaled
             to one accumulation window)
    bnpo     token-mean over the micro-batch's own tokens, / GA
    grpo     seq-mean-token-mean with num_seqs = B, / GA
    dr_grpo  seq-mean-token-sum-norm with num_seqs = B, horizon = max_completion_length, / GA

STAPO's denominator. The S2T mask needs the current policy's probabilities and entropies, which
exist only inside the loss, one micro-batch at a time; silenced tokens must leave the denominator
(`loss_type="dapo"`: the number of *unmasked* valid tokens over the whole step and all processes).

  * A step made of one micro-batch (gradient_accumulation_steps = steps_per_generation = 1, TRL's
    default, and evaluation): the silenced count is all-reduced inside the loss and the exact
    denominator  num_items_in_batch - masked_global  is used directly.
  * A step made of several micro-batches: each micro-batch uses TRL's normaliser (all valid
    tokens); at the optimizer-step boundary, before gradient clipping, the gradients (and the logged
    loss) are multiplied by N_valid / (N_valid - N_masked), counted over the step on every process.
    Since every micro-batch loss is Σ_unmasked ℓ / D, this gives exactly Σ_unmasked ℓ / D' with
    D' = D (N_valid - N_masked) / N_valid — the single-micro-batch result (tested).
    The multiplication needs the gradients in `param.grad`: DeepSpeed is refused in this case.

`bnpo`, `grpo` need no correction (their denominators are local); `dr_grpo`'s is a constant.

Entropy thresholds are quantiles over every process (gathered when torch.distributed is initialised).
S2T's tau_h (where S2T is applied, `tau_h_scope = mini_batch`, the default) is taken over the whole
optimizer step, the paper's PPO mini-batch: with several micro-batches per step, a no-grad forward over
the step's micro-batches at its first one (`_step_s2t_threshold`; one extra forward per micro-batch) —
the decision is then the same however the step is split. `tau_h_scope = micro_batch`, and the
S2T statistics that other methods only measure, take the quantile per micro-batch, as does 20-Entropy's
top-rho (the scope of TRL's own `top_entropy_quantile`). A micro-batch with no valid token trains with
loss 0 (the quantile of an empty population silences nothing).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from pathlib import Path

import torch
from transformers import TrainerCallback
from trl import GRPOTrainer

from stapo.core import (
    FilterParams,
    get_preset,
    policy_loss,
    s2t_metrics,
    s2t_population,
    s2t_threshold,
    tau_h_for_fraction,
    zero_variance_group_fraction,
)
from stapo.core.monitor import PAPER_MASKED_FRACTION, InertS2TMonitor
from stapo.engines.trl.nonfinite import NonFiniteGuard, NonFiniteTrainingError
from stapo.rundir import (
    checkpoint_name,
    publish_checkpoint,
    remove_stale_staging,
    resumed_lineage,
    rotate_checkpoints,
    staging_dir,
    truncate_rollouts_after_step,
)
from stapo.engines.trl.config import STAPOConfig
from stapo.engines.trl.console import install_console
from stapo.engines.trl.lm_head import stapo_lm_head_in_trl, trl_has_fused_head_slot
from stapo.engines.trl.metrics import MetricsJsonlCallback, TokenStats, reduce_window, window_metrics
from stapo.engines.trl.rollouts import capture_due, capture_metadata, collision_probabilities, rollout_records
from stapo.engines.trl.vllm import check_vllm_args, cpu_engine_options, record_rollout_gap, use_cpu_weight_sync

logger = logging.getLogger(__name__)
__all__ = ["STAPOTrainer", "NonFiniteTrainingError"]


class STAPOTrainer(GRPOTrainer):
    """`GRPOTrainer` whose loss is `stapo.core`'s, with the method's token filter (S2T / 20-Entropy)."""

    def __init__(self, model, reward_funcs=None, args: STAPOConfig | None = None, *more, **kwargs):
        if args is None:
            args = STAPOConfig()
        if not isinstance(args, STAPOConfig):
            raise ValueError(f"STAPOTrainer needs args=STAPOConfig(...), got {type(args).__name__}")
        check_vllm_args(args)
        with cpu_engine_options(args):  # use_vllm on vLLM's CPU build: see vllm.py
            super().__init__(model, reward_funcs, args, *more, **kwargs)
        use_cpu_weight_sync(self)
        self.preset = get_preset(args.method)
        self.token_filter = self.preset.filter  # a TokenFilterSpec: the engine reads its properties
        self._step_threshold = None  # S2T's tau_h of the current optimizer step (tau_h_scope = mini_batch)
        self.filter_params = FilterParams(s2t=args.s2t_settings, top_entropy_quantile=self.top_entropy_quantile)
        self._window: TokenStats | None = None
        self._window_loss = 0.0  # global loss sum of the last finished window (non-finite check)
        self._nonfinite = NonFiniteGuard(limit=args.max_nonfinite_steps)
        self._step_skipped = False
        self._inert = InertS2TMonitor(args.s2t_settings)  # warns when S2T silences nothing for K steps
        self._last_s2t = None  # the last training micro-batch's (entropies, S2T decision): the warning's suggestion
        self._staging_run_dir: str | None = None
        self._run_checkpoints: set[int] = set()  # steps this run wrote or resumed from: the only ones rotated
        self.use_stapo_lm_head = self._resolve_fused_lm_head(args.fused_lm_head)
        if self._deferred_denominator() and self.is_deepspeed_enabled:
            raise ValueError(
                "method='stapo' with loss_type='dapo' and several micro-batches per step rescales gradients at the "
                "optimizer step, which DeepSpeed does not expose; set gradient_accumulation_steps=1 and "
                "steps_per_generation=1, or use DDP/FSDP"
            )
        if args.metrics_jsonl:
            self.add_callback(MetricsJsonlCallback())
        self.add_callback(_RunDirectoryCallback())
        install_console(self)  # one readable line per logging step instead of the Trainer's dict

    # ---- the loss step ------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        valid = _valid_tokens(inputs)

        # 1. The current policy's per-token log-probs and entropies (TRL's forward, stapo's head if fused_lm_head).
        logps, entropies, aux_loss = self._policy_forward(model, inputs, compute_aux_loss=self.aux_loss_enabled)
        old_logps = inputs.get("old_per_token_logps")
        old_logps = logps.detach() if old_logps is None else old_logps
        advantages = _token_advantages(inputs, logps)

        # 2. The token filter: which valid tokens learn. The S2T decision is measured for every method;
        # where S2T is applied, tau_h is the optimizer step's (tau_h_scope = mini_batch).
        threshold = self._step_s2t_threshold(model) if mode == "train" else None
        filtered = self.token_filter(logps, entropies, advantages, valid, self.filter_params, s2t_threshold=threshold)

        # 3. The clipped policy loss (dual clip where A < 0 when the preset has one) with the run's denominator.
        # TRL multiplies the per-token loss by the vLLM importance weight w >= 0; max(-rA, -clip(r)A)·w equals
        # max(-r·Aw, -clip(r)·Aw) (and the dual-clip bound scales the same way), so w rides on the advantage.
        loss_advantages = advantages
        if self.use_vllm and self.vllm_importance_sampling_correction:
            loss_advantages = advantages * inputs["importance_sampling_ratio"].expand_as(advantages)
        agg_kwargs, divisor = self._aggregation(inputs, valid, filtered.loss_mask, mode)
        loss, metrics = policy_loss(
            logps,
            old_logps,
            loss_advantages,
            filtered.loss_mask,
            clip_low=self.epsilon_low,
            clip_high=self.epsilon_high,
            clip_ratio_c=self.args.clip_ratio_c,
            **agg_kwargs,
        )
        loss = loss / divisor
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / divisor
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())

        # 4. Metrics (summed over the optimizer step, reduced at its end) and rollout captures.
        self._record_tokens(mode, metrics, filtered.s2t, entropies, valid, loss)
        if mode == "train" and self._capture_due():
            self._capture_rollouts(inputs, logps, entropies, advantages, valid, filtered.s2t, model)
        return loss

    def _policy_forward(self, model, inputs, compute_aux_loss=False):
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        return self._get_per_token_logps_and_entropies(
            model,
            torch.cat([inputs["prompt_ids"], completion_ids], dim=1),
            torch.cat([inputs["prompt_mask"], completion_mask], dim=1),
            completion_ids.size(1),
            compute_entropy=True,
            compute_aux_loss=compute_aux_loss,
            **{k: inputs.get(k) for k in _MULTIMODAL_KEYS},
        )

    def _step_s2t_threshold(self, model):
        """S2T's tau_h over the whole optimizer step (`tau_h_scope = mini_batch`), or None (the micro-batch's own).

        The step's micro-batches are TRL's buffered slices [i, i + GA) of the generation batch; the
        decision uses the current policy, which does not change within the step, so a no-grad forward
        over those slices gives exactly the values each micro-batch's loss will see. Needed only when the
        step has several micro-batches; methods that only measure S2T keep the per-micro-batch quantile
        (no extra forward for a diagnostic)."""
        s2t = self.filter_params.s2t
        ga = self.current_gradient_accumulation_steps
        if not self.token_filter.applies_s2t or s2t.tau_h_scope != "mini_batch" or s2t.tau_h is not None or ga == 1:
            return None
        if self._step % ga == 0 or self._step_threshold is None:  # the first micro-batch of the step
            start = self._step % self.args.steps_per_generation
            populations = []
            with torch.no_grad():
                for part in self._buffered_inputs[start : start + ga]:
                    logps, entropies, _ = self._policy_forward(model, part)
                    populations.append(s2t_population(logps, entropies, _token_advantages(part, logps),
                                                      _valid_tokens(part), s2t))
            self._step_threshold = s2t_threshold(populations, s2t)  # gathered over every process
        return self._step_threshold

    def _single_micro_batch_steps(self) -> bool:
        return self.args.gradient_accumulation_steps == 1 and self.args.steps_per_generation == 1

    def _deferred_denominator(self) -> bool:
        return self.token_filter.applies_s2t and self.loss_type == "dapo" and not self._single_micro_batch_steps()

    def _aggregation(self, inputs, valid, loss_mask, mode) -> tuple[dict, float]:
        """core aggregation kwargs for this micro-batch, and the divisor applied afterwards (GA)."""
        ga = float(self.current_gradient_accumulation_steps) if mode == "train" else 1.0
        rows = valid.shape[0]
        if self.loss_type == "dapo":
            normaliser = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normaliser = normaliser * ga / self.args.steps_per_generation
            if self.token_filter.applies_s2t and (mode == "eval" or self._single_micro_batch_steps()):
                # Exact: the step is this micro-batch (on every process); drop the silenced tokens.
                masked = self.accelerator.reduce((valid & ~loss_mask).sum().float(), reduction="sum")
                normaliser = (inputs["num_items_in_batch"].float() - masked) / self.accelerator.num_processes
            return {"agg": "token-mean", "num_tokens": normaliser}, 1.0
        if self.loss_type == "bnpo":
            counted = loss_mask if self.token_filter.denominator == "kept" else valid
            return {"agg": "token-mean", "num_tokens": counted.sum().float()}, ga
        if self.loss_type == "grpo":
            return {"agg": "seq-mean-token-mean", "num_seqs": float(rows)}, ga
        return {
            "agg": "seq-mean-token-sum-norm",
            "num_seqs": float(rows),
            "horizon": float(self.max_completion_length),
        }, ga

    # ---- LM head ----------------------------------------------------------------------------

    def _resolve_fused_lm_head(self, requested: bool | None) -> bool:
        """Whether stapo's LM head fills TRL's fused-head slot: None (auto) turns it on unless the model
        softcaps its logits, the run uses DeepSpeed ZeRO-3 or an entropy bonus (the adapter cannot serve
        those); True in those cases is an error."""
        model = self.accelerator.unwrap_model(self.model)
        config = getattr(model, "config", None)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        blockers = []
        if not trl_has_fused_head_slot():
            blockers.append("this TRL version has no fused-head slot (trl.trainer.utils._ChunkedLogProbFunction)")
        if getattr(text_config, "final_logit_softcapping", None) is not None:
            blockers.append("the model softcaps its logits (final_logit_softcapping)")
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None) if self.is_deepspeed_enabled else None
        if plugin is not None and getattr(plugin, "zero_stage", None) == 3:
            blockers.append("DeepSpeed ZeRO-3 gathers the head weight only inside TRL's own head")
        if self.args.entropy_coef != 0 or self.args.use_adaptive_entropy:
            blockers.append("an entropy bonus needs a differentiable entropy")
        if requested and blockers:
            raise ValueError(f"fused_lm_head=True is not possible here: {blockers[0]}; set fused_lm_head=false or null")
        use = (not blockers) if requested is None else bool(requested)
        logger.info("stapo: LM head for log-probs/entropies: %s", "stapo (fused_lm_head on)" if use else "TRL's")
        return use

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        if not self.use_stapo_lm_head:
            return super()._get_per_token_logps_and_entropies(*args, **kwargs)
        with stapo_lm_head_in_trl():
            return super()._get_per_token_logps_and_entropies(*args, **kwargs)

    # ---- metrics ------------------------------------------------------------------------------

    @torch.no_grad()
    def _record_tokens(self, mode, metrics, s2t, entropies, valid, loss):
        """Add a micro-batch to the step's sums: the S2T decision's counts and `policy_loss`'s metrics
        (clip fractions and ratios over the tokens that get gradient, turned back into sums)."""
        if self._window is None:
            self._window = TokenStats(valid.device, deferred=mode == "train" and self._deferred_denominator())
        n = metrics["num_tokens"]
        self._window.add(
            valid=s2t.n_valid,
            masked=s2t.n_spurious,
            loss_tokens=n,
            low_prob=s2t.n_low_prob,
            candidates=s2t.n_candidates,
            low_entropy=s2t.n_low_entropy,
            entropy=torch.where(valid, entropies.detach().float(), 0.0).sum(),
            clip_low=metrics["clip_frac_low"] * n,
            clip_high=metrics["clip_frac_high"] * n,
            ratio=metrics["ratio_mean"] * n,
            threshold=s2t_metrics(s2t)["entropy_threshold"],
            micro_batches=1,
            loss=loss.detach(),
        )
        if bool(n > 0):
            self._window.add_ratio_extremes(metrics["ratio_min"], metrics["ratio_max"])
        if mode == "train":
            self._last_s2t = (entropies.detach(), s2t)
        if mode == "eval":
            self._finish_window(None, mode="eval")

    def _finish_window(self, model, mode: str = "train") -> None:
        """End of an optimizer step: global statistics, the deferred S2T denominator, step metrics."""
        w, self._window = self._window, None
        if mode == "train":
            self._step_threshold = None
        if w is None:
            return
        g = reduce_window(w, self.accelerator)
        self._window_loss = g["loss"]
        scale = 1.0
        if w.deferred and g["masked"] > 0 and g["valid"] > g["masked"]:
            scale = g["valid"] / (g["valid"] - g["masked"])
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
            if getattr(self, "_tr_loss", None) is not None and math.isfinite(w.get("loss")):
                self._tr_loss += (scale - 1.0) * w.get("loss")
        metrics = window_metrics(g, s2t_applied=self.token_filter.applies_s2t)
        metrics["stapo/denominator_scale"] = scale
        if self.token_filter.uses_top_entropy_quantile:
            metrics["stapo/entropy_kept_frac"] = g["loss_tokens"] / max(g["valid"], 1.0)
        step_times = self._metrics[mode].get("step_time") if mode == "train" else None
        if step_times:
            metrics["stapo/tokens_per_s"] = g["valid"] / max(step_times[-1], 1e-9)
        for key, value in metrics.items():
            self._metrics[mode][key].append(value)
        if mode == "train":
            self._warn_if_inert(g)

    def _warn_if_inert(self, g) -> None:
        """One warning line when S2T has silenced nothing for `inert_warning_steps` optimizer steps in a row."""
        if not self.token_filter.applies_s2t or g["valid"] == 0:
            return

        def suggest():  # from this process's last micro-batch: the step's data, not a global quantile
            if self._last_s2t is None:
                return None
            entropies, s2t = self._last_s2t
            return tau_h_for_fraction(entropies, s2t.candidates, s2t.n_valid, PAPER_MASKED_FRACTION)

        message = self._inert.update(g["masked"], g["valid"], g["low_prob"], g["candidates"],
                                     g["threshold"] / max(g["micro_batches"], 1.0), suggest)
        if message and self.accelerator.is_main_process:
            logger.warning("stapo: %s", message)

    def _clip_grad_norm(self, model):
        self._finish_window(model)
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model, grad_norm=None):
        self._finish_window(model)  # no-op when _clip_grad_norm already ended the window
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self._guard_nonfinite(model, grad_norm)
        return grad_norm

    def log(self, logs, *args, **kwargs):
        if "loss" in logs and self.model.training:
            logs = {**logs, "stapo/nonfinite_steps": float(self._nonfinite.total)}
        return super().log(logs, *args, **kwargs)

    def create_model_card(self, *args, **kwargs):
        """stapo's card (base model, method, S2T thresholds, data, steps, held-out results): model_card.py."""
        from stapo.engines.trl.model_card import write_model_card

        write_model_card(self)

    # ---- non-finite steps, checkpoints ---------------------------------------------------------

    def _guard_nonfinite(self, model, grad_norm) -> None:
        """Called once per optimizer step, right before `optimizer.step()` (all processes agree:
        the loss is summed over processes and the gradient norm is global)."""
        loss = self._window_loss
        norm = float(grad_norm) if grad_norm is not None else 0.0
        step = self.state.global_step + 1
        self._window_loss = 0.0
        if self._nonfinite.check(loss, norm, step):  # raises on the max_nonfinite_steps-th in a row
            self._step_skipped = False
            return
        self._step_skipped = True
        # Without gradients the optimizer skips every parameter: no update, no moment or weight-decay change.
        for p in model.parameters():
            p.grad = None
        logger.warning(
            "stapo: step %d skipped: non-finite loss (%s) or gradient norm (%s); %d skipped so far, %d in a row "
            "(the run stops at %d in a row)", step, loss, norm, self._nonfinite.total, self._nonfinite.consecutive,
            self._nonfinite.limit,
        )

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        except NonFiniteTrainingError:
            for callback in self.callback_handler.callbacks:  # end the progress bar before the message
                bar = getattr(callback, "training_bar", None)
                if bar is not None:
                    bar.close()
                    callback.training_bar = None
            raise

    def _get_output_dir(self, trial):
        if self._staging_run_dir is not None:  # inside _save_checkpoint: the Trainer writes into staging
            return self._staging_run_dir
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        """The Trainer's checkpoint, written into a staging directory and published with one rename."""
        if self._step_skipped:
            logger.warning("stapo: no checkpoint at step %d (its update was skipped)", self.state.global_step)
            return
        run_dir = self._get_output_dir(trial)
        name = checkpoint_name(self.state.global_step)
        staging = staging_dir(run_dir, self.state.global_step)
        if self.args.should_save:
            remove_stale_staging(run_dir)
        self.accelerator.wait_for_everyone()
        self._staging_run_dir = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_run_dir = None
        if self.args.should_save:
            self._nonfinite.save(staging / name)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final = Path(run_dir) / name
            publish_checkpoint(staging / name, final)
            shutil.rmtree(staging, ignore_errors=True)
            best = self.state.best_model_checkpoint
            if best and Path(best) == staging / name:
                self.state.best_model_checkpoint = str(final)
                self.state.save_to_json(str(final / "trainer_state.json"))
            self._run_checkpoints.add(self.state.global_step)
            rotate_checkpoints(run_dir, self.args.save_total_limit, self._run_checkpoints,
                               protect=self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        self._nonfinite.load(checkpoint)
        if checkpoint is not None:
            self._run_checkpoints |= resumed_lineage(checkpoint)

    # ---- rewards ------------------------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        mode = "train" if self.model.training else "eval"
        group = self.num_generations if mode == "train" else self.num_generations_eval
        weights = self.reward_weights.to(rewards_per_func.device).unsqueeze(0)
        rewards = (rewards_per_func * weights).nansum(dim=1)
        # accuracy: the fraction of completions with a positive total reward (for a 0/1 correctness
        # reward, the accuracy).
        self._metrics[mode]["stapo/accuracy"].append(float((rewards > 0).float().mean()))
        if group and group > 1 and rewards.numel() % group == 0:
            self._metrics[mode]["stapo/zero_variance_group_frac"].append(
                zero_variance_group_fraction(rewards.float(), group)
            )
        self._last_rewards = rewards  # every process's rows; sliced to this process's below
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if self.use_vllm:
            record_rollout_gap(self._metrics["train" if self.model.training else "eval"])
        rows = out["completion_ids"].shape[0]
        start = self.accelerator.process_index * rows
        # The scalar reward of each row travels with the batch (shuffled and split with it) for captures.
        out["stapo_rewards"] = self._last_rewards[start : start + rows].to(out["completion_ids"].device)
        return out

    # ---- rollout capture (for `stapo analyze`; see rollouts.py) -------------------------------

    def _capture_due(self) -> bool:
        return capture_due(self.state.global_step, self.args.capture_rollouts_every, self.accelerator.is_main_process)

    @torch.no_grad()
    def _capture_rollouts(self, inputs, logps, entropies, advantages, valid, s2t, model=None):
        """Write token-level records of up to `capture_max_samples` completions of this process."""
        step = self.state.global_step + 1
        if getattr(self, "_captured_step", None) != step:
            self._captured_step, self._captured_count = step, 0
        room = self.args.capture_max_samples - self._captured_count
        if room <= 0:
            return
        from stapo.data.rollouts import write_rollouts

        rows = list(range(min(room, valid.shape[0])))
        collision = collision_probabilities(model, inputs, rows, self.temperature)
        records = rollout_records(inputs, self.processing_class, rows, step, self._captured_count, logps, entropies,
                                  advantages, valid, s2t.spurious, collision)
        self._captured_count += len(rows)
        metadata = capture_metadata(self.args.method, self.token_filter.applies_s2t, self.filter_params.s2t, s2t.threshold)
        write_rollouts(self.args.output_dir, step, records, max_samples=self.args.capture_max_samples, metadata=metadata)


def _valid_tokens(inputs) -> torch.Tensor:
    mask = inputs["completion_mask"]
    return (mask if "tool_mask" not in inputs else mask * inputs["tool_mask"]).bool()


def _token_advantages(inputs, like: torch.Tensor) -> torch.Tensor:
    advantages = inputs["advantages"]
    return advantages if advantages.dim() == 2 else advantages.unsqueeze(1).expand_as(like)


class _RunDirectoryCallback(TrainerCallback):
    """At the start of a run (fresh or resumed at step k): drop rollout captures of steps > k and staging
    directories left by a crash while saving (metrics.jsonl lines are handled by MetricsJsonlCallback)."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and os.path.isdir(args.output_dir):
            truncate_rollouts_after_step(args.output_dir, state.global_step)
            remove_stale_staging(args.output_dir)


_MULTIMODAL_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)
