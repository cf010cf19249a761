"""Rollout capture for `stapo analyze`: token-level records of a few completions of a training step.

Every `capture_rollouts_every` optimizer steps (steps numbered like the logs: 1, 1 + every, ...) the
main process writes up to `capture_max_samples` of its completions with
`stapo.data.rollouts.write_rollouts`: text, token ids, reward, advantage, and per token the log-prob,
entropy, collision probability Σπ² and the S2T decision of the loss step that trained on them.
Σπ² is recomputed from the logits with `stapo.core.token_logprobs_entropy` (one extra no-grad
forward of the captured rows, on capture steps only).
"""

from __future__ import annotations

import torch

from stapo.core import S2TSettings, token_logprobs_entropy


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
        "tau_h": settings.tau_h if settings.tau_h is not None else (float(threshold) if torch.isfinite(threshold) else None),
        "tau_h_quantile": settings.tau_h_quantile,
        "tau_h_population": settings.tau_h_population,
    }
