"""Per-token statistics of a model on prompts: sample G completions per prompt, grade them, score them.

    generate (HF, temperature T, full vocabulary)  ->  grade (stapo.rewards.grade_batch)
      ->  advantages (core.group_advantages)  ->  one forward pass over prompt + completion
      ->  log-prob, entropy, collision Σπ², Σπ² log π (core.token_logprobs_entropy)  ->  S2T flags (core.s2t_decision)

The result is an in-memory `Rollouts` — the same shape as a trainer's capture — so `stapo analyze`
treats a model and a training run alike. Statistics are those of the sampling distribution
(same temperature), i.e. of the policy that would be trained on these samples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from stapo.core import S2TSettings, group_advantages, s2t_decision, token_logprobs_entropy
from stapo.data.rollouts import rollouts_from_records


def completion_lengths(ids: torch.Tensor, eos_ids: Sequence[int]) -> torch.Tensor:
    """Length of each completion [B, T]: up to and including the first EOS (the EOS is a sampled
    token with its own probability), everything after it is padding."""
    if not eos_ids:
        return torch.full((ids.shape[0],), ids.shape[1], dtype=torch.long)
    is_eos = torch.zeros_like(ids, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= ids == e
    t = ids.shape[1]
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full_like(ids[:, 0], t))
    return torch.clamp(first + 1, max=t)


@torch.no_grad()
def score_completions(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                      completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                      temperature: float = 1.0, rows_per_pass: int = 8):
    """(logprob, entropy, collision, Σπ² log π) [B, Tc] of the completion tokens under `model`, float32.

    Prompts are left-padded; position ids follow the attention mask, as in generation, so the
    distributions are those the tokens were sampled from. Rows go through the model
    `rows_per_pass` at a time and only the completion positions' logits are materialised,
    which bounds the [rows, Tc, V] logits block.
    """
    ids = torch.cat([prompt_ids, completion_ids], 1)
    attn = torch.cat([prompt_mask, completion_mask], 1).long()
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    tc = completion_ids.shape[1]
    outs = []
    for s in range(0, ids.shape[0], rows_per_pass):
        sl = slice(s, s + rows_per_pass)
        kwargs = dict(input_ids=ids[sl], attention_mask=attn[sl], position_ids=pos[sl])
        try:
            logits = model(**kwargs, logits_to_keep=tc + 1).logits
        except TypeError:  # a model class without logits_to_keep
            logits = model(**kwargs).logits
        logits = logits[:, -tc - 1 : -1, :]
        outs.append(token_logprobs_entropy(logits, completion_ids[sl], temperature=temperature,
                                           return_collision=True, return_collision_logp=True))
    return tuple(torch.cat([o[k] for o in outs]) for k in range(4))


def collect_rollouts(
    model,
    tokenizer,
    prompts: Sequence[str],
    golds: Sequence[str],
    group_size: int = 8,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    batch_prompts: int = 4,
    s2t: S2TSettings | None = None,  # S2T's thresholds; None: S2TSettings() (the paper's rule)
    advantage_scale: str = "group",
    seed: int = 0,
    grade: Callable[[list[str], list[str]], list[float]] | None = None,
    progress: bool = True,
    rows_per_pass: int = 8,
    return_collision_logp: bool = False,
):
    """Sample `group_size` completions of each (already formatted) prompt and score every token.

    `grade(completions, golds) -> rewards` defaults to `stapo.rewards.grade_batch`. The S2T flags
    are `core.s2t_mask` over all collected tokens (one batch: the quantile over all of them) at `s2t`. `rows_per_pass`
    sequences go through the scoring forward pass at a time. With `return_collision_logp`, returns
    (Rollouts, Σπ² log π as a float32 numpy array [N] in the Rollouts' flat token order) — the extra
    statistic of the first-order entropy change, which the rollout files do not store.
    """
    if len(prompts) != len(golds):
        raise ValueError(f"prompts and golds differ in length ({len(prompts)} vs {len(golds)})")
    if not prompts:
        raise ValueError("no prompts to analyze")
    if grade is None:
        from stapo.rewards import grade_batch

        def grade(c, g):
            return list(grade_batch(c, g))

    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or []):
        if e not in eos_ids:
            eos_ids.append(e)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    tokenizer.padding_side = "left"
    torch.manual_seed(seed)

    bar = _progress(len(prompts), progress)
    per_sample = []  # (prompt_text, completion_ids list, logprob, entropy, collision, Σπ² log π)
    for start in range(0, len(prompts), batch_prompts):
        chunk = list(prompts[start : start + batch_prompts])
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        out = model.generate(
            **enc, do_sample=True, temperature=temperature, top_p=1.0, top_k=0,
            max_new_tokens=max_new_tokens, num_return_sequences=group_size,
            pad_token_id=pad, eos_token_id=eos_ids,
        )
        comp = out[:, enc["input_ids"].shape[1]:]
        lens = completion_lengths(comp, eos_ids).to(comp.device)
        cmask = torch.arange(comp.shape[1], device=comp.device)[None, :] < lens[:, None]
        comp = torch.where(cmask, comp, torch.full_like(comp, pad))
        pids = enc["input_ids"].repeat_interleave(group_size, 0)
        pmask = enc["attention_mask"].repeat_interleave(group_size, 0)
        lp, ent, col, clp = score_completions(model, pids, pmask, comp, cmask, temperature, rows_per_pass)
        for i in range(comp.shape[0]):
            n = int(lens[i])
            per_sample.append((chunk[i // group_size], comp[i, :n].tolist(), lp[i, :n].cpu(),
                               ent[i, :n].cpu(), col[i, :n].cpu(), clp[i, :n].cpu()))
        bar.update(len(chunk))
    bar.close()

    completions = [tokenizer.decode(s[1], skip_special_tokens=True) for s in per_sample]
    gold_rep = [g for g in golds for _ in range(group_size)]
    rewards = torch.tensor(grade(completions, gold_rep), dtype=torch.float32)
    adv = group_advantages(rewards, group_size, scale=advantage_scale)

    t = max(len(s[1]) for s in per_sample)
    b = len(per_sample)
    lp = torch.zeros(b, max(t, 1))
    ent = torch.zeros_like(lp)
    valid = torch.zeros_like(lp, dtype=torch.bool)
    for i, s in enumerate(per_sample):
        n = len(s[1])
        lp[i, :n], ent[i, :n], valid[i, :n] = s[2], s[3], True
    s2t = s2t or S2TSettings()
    flags = s2t_decision(lp, ent, adv, valid, s2t).spurious

    records = []
    for i, (prompt, ids, logp, e, c, _) in enumerate(per_sample):
        n = len(ids)
        records.append({
            "sample": i, "prompt": prompt, "completion": completions[i],
            "reward": float(rewards[i]), "advantage": float(adv[i]),
            "token_id": ids, "token_text": [tokenizer.decode([t]) for t in ids],
            "logprob": logp, "entropy": e, "collision": c, "s2t": flags[i, :n],
        })
    truncated = sum(1 for s in per_sample if not s[1] or s[1][-1] not in eos_ids)  # stopped by the limit
    meta = {"source": "model", "group_size": group_size, "temperature": temperature,
            "max_new_tokens": max_new_tokens, "truncated": truncated,
            "tau_p": s2t.tau_p, "tau_h": s2t.tau_h, "tau_h_quantile": s2t.tau_h_quantile,
            "tau_h_population": s2t.tau_h_population, "tau_h_max": s2t.tau_h_max}
    ro = rollouts_from_records(records, step=0, metadata=meta)
    if return_collision_logp:
        return ro, torch.cat([s[5] for s in per_sample]).numpy().astype("float32")
    return ro


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="prompts", unit="prompt")
