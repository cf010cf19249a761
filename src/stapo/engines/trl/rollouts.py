"""Rollout capture for `stapo analyze`: token-level records of a few completions of a training step.

Every `capture_rollouts_every` optimizer steps (steps numbered like the logs: 1, 1 + every, ...) the
main process writes up to `capture_max_samples` of its completions with
`stapo.data.rollouts.write_rollouts`: text, token ids, reward, advantage, and per token the log-prob,
entropy, collision probability Σπ² and the S2T decision of the loss step that trained on them.
Σπ² is recomputed from the logits with `stapo.core.token_logprobs_entropy` (one extra no-grad
forward of the captured rows, on capture steps only).

`RolloutCaptureCallback` does it from the trainer's events (`events.py`): it takes the records from each
training micro-batch's loss step and writes them once the step's update is taken or skipped; a capture
of a skipped step (non-finite forward, loss or gradient) is marked `update_skipped`.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from stapo.core import S2TSettings, token_logprobs_entropy
from stapo.engines.trl.events import MicroBatchLoss


def capture_due(global_step: int, every: int, is_main_process: bool) -> bool:
    """Whether the optimizer step after `global_step` captures (steps 1, 1 + every, 1 + 2·every, ...)."""
    return bool(every) and global_step % every == 0 and is_main_process


@torch.no_grad()
def collision_probabilities(model, inputs, rows: list[int], temperature: float) -> torch.Tensor | None:
    """Σπ² per completion position of `rows`, float32 [len(rows), T] (None without a model or rows)."""
    if model is None or not rows:
        return None
    ids = torch.cat([inputs["prompt_ids"][rows], inputs["completion_ids"][rows]], dim=1)
    attn = torch.cat([inputs["prompt_mask"][rows], inputs["completion_mask"][rows]], dim=1)
    t = inputs["completion_ids"].size(1)
    logits = model(input_ids=ids, attention_mask=attn).logits[:, -t - 1 : -1, :]
    _, _, collision = token_logprobs_entropy(
        logits, inputs["completion_ids"][rows], temperature=temperature, return_collision=True
    )
    return collision.float()


@torch.no_grad()
def rollout_records(inputs, tokenizer, rows, step, first_sample, logps, entropies, advantages, mask, spurious,
                    collision) -> list[dict]:
    """One record per row of the micro-batch (`advantages` [B, T], `mask`/`spurious` bool [B, T])."""
    records = []
    for j, i in enumerate(rows):
        n = int(mask[i].sum())
        ids = inputs["completion_ids"][i, :n].tolist()
        prompt = inputs["prompt_ids"][i][inputs["prompt_mask"][i].bool()].tolist()
        records.append(
            {
                "step": step,
                "sample": first_sample + j,
                "prompt": tokenizer.decode(prompt, skip_special_tokens=False),
                "completion": tokenizer.decode(ids, skip_special_tokens=False),
                "reward": float(inputs["stapo_rewards"][i]) if "stapo_rewards" in inputs else None,
                "advantage": float(advantages[i, 0]),
                "token_id": ids,
                "token_text": [tokenizer.decode([t], skip_special_tokens=False) for t in ids],
                "logprob": logps[i, :n].float().clamp(max=0.0),
                "entropy": entropies[i, :n].float(),
                "collision": collision[j, :n],
                "s2t": spurious[i, :n],
            }
        )
    return records


def capture_metadata(method: str, s2t_applied: bool, settings: S2TSettings, threshold: torch.Tensor) -> dict:
    """The step's S2T settings, with `tau_h` the threshold in nats that was used (quantile resolved)."""
    return {
        "method": method,
        "s2t_applied": s2t_applied,
        "tau_p": settings.tau_p,
        # a quantile over an empty population silences nothing (threshold -inf): no number to record
        "tau_h": (settings.tau_h if settings.tau_h is not None
                  else float(threshold) if torch.isfinite(threshold) else None),
        "tau_h_quantile": settings.tau_h_quantile,
        "tau_h_population": settings.tau_h_population,
    }


class RolloutCaptureCallback(TrainerCallback):
    """Token-level records of up to `capture_max_samples` completions of this process at every
    `capture_rollouts_every`-th optimizer step, taken from the loss step (`on_micro_batch_loss`) and kept
    until the step's update is taken or skipped (`on_update_decided`)."""

    def __init__(self, tokenizer, temperature: float, method: str, s2t_applied: bool, s2t_settings: S2TSettings,
                 is_main_process: bool):
        self.tokenizer = tokenizer
        self.temperature = temperature
        self.method = method
        self.s2t_applied = s2t_applied
        self.s2t_settings = s2t_settings
        self.is_main_process = is_main_process
        self.pending: list = []  # (step, records, metadata) of the current step, written once it is decided
        self.step: int | None = None  # the step being captured, and the samples captured of it so far
        self.count = 0

    @torch.no_grad()
    def on_micro_batch_loss(self, args, state, control, loss: MicroBatchLoss, **kwargs):
        if not capture_due(state.global_step, args.capture_rollouts_every, self.is_main_process):
            return
        step = state.global_step + 1
        if self.step != step:
            self.step, self.count = step, 0
        room = args.capture_max_samples - self.count
        if room <= 0:
            return
        rows = list(range(min(room, loss.valid.shape[0])))
        collision = collision_probabilities(loss.model, loss.inputs, rows, self.temperature)
        records = rollout_records(loss.inputs, self.tokenizer, rows, step, self.count, loss.logps, loss.entropies,
                                  loss.advantages, loss.valid, loss.s2t.spurious, collision)
        self.count += len(rows)
        metadata = capture_metadata(self.method, self.s2t_applied, self.s2t_settings, loss.s2t.threshold)
        self.pending.append((step, records, metadata))

    def on_update_decided(self, args, state, control, skipped: bool, **kwargs):
        """Write the step's captures; a skipped update is marked."""
        from stapo.data.rollouts import write_rollouts

        pending, self.pending = self.pending, []
        for step, records, metadata in pending:
            write_rollouts(args.output_dir, step, records, max_samples=args.capture_max_samples,
                           metadata={**metadata, "update_skipped": skipped})
