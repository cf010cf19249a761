"""Counterfactual one-step test: what does one update on a token set do to the policy's entropy?

On scored rollout batches (sampled from the model on prompts, graded with `stapo.rewards`, group
advantages with `core.group_advantages`), a copy of the policy takes ONE step on the policy-gradient
loss restricted to a token set S,

    L_S = − Σ_{t ∈ S} A_t log π(a_t)          (a sum, so the step grows with |S|),

and we measure, on a fixed held-out set of positions P (completions of other prompts, never trained
on), the change of the mean policy entropy and the KL to the unchanged policy:

    ΔH̄ = mean_{x∈P} H(π_new(·|x)) − H(π_old(·|x)),    KL = mean_{x∈P} KL(π_old(·|x) ‖ π_new(·|x)),

both also divided by |S| ("per token in the set"). Sets, per batch:

    s2t        core.s2t_mask at the given thresholds: A > 0 ∧ p < τ_p ∧ H < τ_h
    random     |s2t| tokens drawn uniformly from the A > 0 tokens (one set per draw)
    lowp_hiH   A > 0 ∧ p < τ_p ∧ H ≥ τ_h (rare tokens at uncertain positions)
    all        every valid token

Readings: plain SGD with one fixed step size (primary), and AdamW whose state is warmed up by a few
steps on all tokens of the batch first (the reference policy is then the warmed-up one; AdamW's
momentum moves the policy even for a zero gradient, so its rows report the change relative to a
step with an empty set, `adamw_null`).

What is trained: the output head only (an untied float32 copy of the LM head weight), on the final
hidden states cached from one forward pass of the frozen backbone. This keeps a step cheap enough
for a CPU (one step costs a head GEMM over the set's tokens and one over P); the first-order
effect of a token's own update on its logits is the same as for the full model up to the
backbone's share of the gradient, which this test does not include.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from stapo.core import S2TSettings, group_advantages, s2t_decision
from stapo.core.lm_head import causal_lm_head_params, causal_lm_hidden_states, lm_head_logprobs_entropy

SETS = ("s2t", "random", "lowp_hiH", "all")
# Student t 0.975 quantiles for 1..30 degrees of freedom (two-sided 95 % interval).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


@dataclass(frozen=True)
class CounterfactualConfig:
    batches: int = 2
    draws: int = 5
    prompts_per_batch: int = 8
    heldout_prompts: int = 8
    group_size: int = 8
    max_new_tokens: int = 32
    temperature: float = 1.0
    s2t: S2TSettings = field(default_factory=S2TSettings)  # the S2T set's thresholds (set (i))
    sgd_lr: float = 1e-4
    adamw_lr: float = 1e-4
    warmup_steps: int = 3
    heldout_positions: int = 1024
    seed: int = 0

    def __post_init__(self):
        for name in ("batches", "draws", "prompts_per_batch", "heldout_prompts", "max_new_tokens",
                     "heldout_positions"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages need a group), got {self.group_size}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        for name in ("sgd_lr", "adamw_lr", "temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


@dataclass
class ScoredBatch:
    """Cached final hidden states and per-token statistics of the valid completion tokens (flat [N])."""

    hidden: torch.Tensor  # [N, H] float32
    targets: torch.Tensor  # [N] int64
    logprob: torch.Tensor  # [N]
    entropy: torch.Tensor  # [N]
    advantage: torch.Tensor  # [N]
    s2t: torch.Tensor  # [N] bool
    tau_h: float  # the threshold used, in nats
    reward_mean: float
    samples: int


def confidence_interval(values) -> dict:
    """mean, standard deviation, n and the two-sided 95 % Student-t interval of `values`."""
    v = [float(x) for x in values if x == x]
    n = len(v)
    if n == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "sd": float("nan"), "n": 0}
    mean = sum(v) / n
    if n == 1:
        return {"mean": mean, "lo": float("nan"), "hi": float("nan"), "sd": float("nan"), "n": 1}
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1))
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.96
    half = t * sd / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "sd": sd, "n": n}


# ------------------------------------------------------------------------------------ sampling


@torch.no_grad()
def sample_batch(model, tokenizer, prompts, golds, group_size, max_new_tokens, temperature, grade=None,
                 advantages=True):
    """Generate `group_size` completions per prompt; return final hidden states at the completion
    positions, the sampled tokens, rewards and (when `advantages`) group advantages, flat over
    the valid tokens."""
    from stapo.analyze.collect import completion_lengths

    if grade is None:
        from stapo.rewards import grade_batch

        def grade(c, g):
            return list(grade_batch(c, g))

    eos = tokenizer.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    tokenizer.padding_side = "left"
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**enc, do_sample=True, temperature=temperature, top_p=1.0, top_k=0,
                         max_new_tokens=max_new_tokens, num_return_sequences=group_size,
                         pad_token_id=pad, eos_token_id=eos_ids)
    comp = out[:, enc["input_ids"].shape[1]:]
    lens = completion_lengths(comp, eos_ids)
    cmask = torch.arange(comp.shape[1])[None, :] < lens[:, None]
    comp = torch.where(cmask, comp, torch.full_like(comp, pad))
    pids = enc["input_ids"].repeat_interleave(group_size, 0)
    pmask = enc["attention_mask"].repeat_interleave(group_size, 0)
    ids = torch.cat([pids, comp], 1)
    attn = torch.cat([pmask, cmask.long()], 1)
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    tc = comp.shape[1]
    chunks = []
    for s in range(0, ids.shape[0], 8):
        h = causal_lm_hidden_states(model, ids[s:s + 8], attention_mask=attn[s:s + 8], position_ids=pos[s:s + 8])
        chunks.append(h[:, -tc - 1:-1, :].float())
    hidden = torch.cat(chunks)
    texts = [tokenizer.decode(comp[i, : int(lens[i])].tolist(), skip_special_tokens=True) for i in range(comp.shape[0])]
    rewards = torch.tensor(grade(texts, [g for g in golds for _ in range(group_size)]), dtype=torch.float32)
    adv = group_advantages(rewards, group_size) if advantages else torch.zeros_like(rewards)
    return hidden[cmask], comp[cmask], adv[:, None].expand_as(cmask)[cmask], rewards, cmask


def score_batch(hidden, targets, adv, cmask, rewards, head, temperature, s2t: S2TSettings) -> ScoredBatch:
    """Per-token statistics under the head, and the S2T set (core.s2t_decision on the padded layout)."""
    with torch.no_grad():
        lp, ent = lm_head_logprobs_entropy(hidden, head, targets, temperature=temperature)
    pad_lp = torch.zeros(cmask.shape)
    pad_ent = torch.zeros(cmask.shape)
    pad_adv = torch.zeros(cmask.shape)
    pad_lp[cmask], pad_ent[cmask], pad_adv[cmask] = lp, ent, adv.float()
    decision = s2t_decision(pad_lp, pad_ent, pad_adv, cmask, s2t)
    flags, tau_used = decision.spurious, float(decision.threshold)
    return ScoredBatch(hidden, targets, lp, ent, adv.float(), flags[cmask], tau_used, float(rewards.mean()),
                       int(cmask.shape[0]))


# ------------------------------------------------------------------------------------ measuring


class HeldOut:
    """Fixed held-out positions: their hidden states and the unchanged policy's log-probabilities."""

    def __init__(self, hidden: torch.Tensor, temperature: float, rows_per_chunk: int = 256):
        self.hidden, self.temperature, self.rows = hidden, temperature, rows_per_chunk

    def logp(self, head: torch.Tensor):
        for s in range(0, self.hidden.shape[0], self.rows):
            yield (self.hidden[s:s + self.rows] @ head.t() / self.temperature).log_softmax(-1)

    @torch.no_grad()
    def entropy_and_kl(self, old_head: torch.Tensor, new_head: torch.Tensor) -> tuple[float, float, float]:
        """(mean H under old, mean H under new, mean KL(old ‖ new)) over the held-out positions."""
        h_old = h_new = kl = 0.0
        for lo, ln in zip(self.logp(old_head), self.logp(new_head)):
            po, pn = lo.exp(), ln.exp()
            h_old += float(-(po * lo).sum())
            h_new += float(-(pn * ln).sum())
            kl += float((po * (lo - ln)).sum())
        n = self.hidden.shape[0]
        return h_old / n, h_new / n, kl / n


def _loss(head, batch: ScoredBatch, idx: torch.Tensor, temperature: float) -> torch.Tensor:
    lp = lm_head_logprobs_entropy(batch.hidden[idx], head, batch.targets[idx], temperature=temperature)[0]
    return -(batch.advantage[idx].to(lp.dtype) * lp).sum()


def sgd_step(head: torch.Tensor, batch: ScoredBatch, idx, lr: float, temperature: float) -> torch.Tensor:
    w = head.detach().clone().requires_grad_(True)
    _loss(w, batch, idx, temperature).backward()
    assert w.grad is not None  # w is a leaf that requires grad
    return (w - lr * w.grad).detach()


def adamw_warm(head, batch, steps, lr, temperature):
    """A head and an AdamW state after `steps` steps on all tokens of the batch."""
    w = head.detach().clone().requires_grad_(True)
    opt = torch.optim.AdamW([w], lr=lr, weight_decay=0.0)
    every = torch.arange(batch.targets.shape[0])
    for _ in range(steps):
        opt.zero_grad()
        _loss(w, batch, every, temperature).backward()
        opt.step()
    return w.detach().clone(), opt.state_dict()


def adamw_step(warm_head, warm_state, batch, idx, lr, temperature):
    w = warm_head.clone().requires_grad_(True)
    opt = torch.optim.AdamW([w], lr=lr, weight_decay=0.0)
    opt.load_state_dict(warm_state)
    opt.zero_grad()
    if idx.numel():
        _loss(w, batch, idx, temperature).backward()
    else:
        w.grad = torch.zeros_like(w)
    opt.step()
    return w.detach()


def token_sets(batch: ScoredBatch, tau_p: float, draws: int, gen: torch.Generator) -> dict[str, list[torch.Tensor]]:
    """Index sets per name; `random` has one set per draw, the others one each."""
    pos = batch.advantage > 0
    low_p = batch.logprob.exp() < tau_p
    s2t = batch.s2t.nonzero().squeeze(1)
    pos_idx = pos.nonzero().squeeze(1)
    k = min(int(s2t.numel()), int(pos_idx.numel()))
    rand = [pos_idx[torch.randperm(pos_idx.numel(), generator=gen)[:k]] for _ in range(draws)]
    return {
        "s2t": [s2t],
        "random": rand,
        "lowp_hiH": [(pos & low_p & (batch.entropy >= batch.tau_h)).nonzero().squeeze(1)],
        "all": [torch.arange(batch.targets.shape[0])],
    }


# ------------------------------------------------------------------------------------ the experiment


@dataclass
class Measurement:
    reading: str  # "sgd" | "adamw"
    batch: int
    set: str
    draw: int
    size: int
    d_entropy: float  # ΔH̄ on the held-out positions (AdamW: minus the null step's)
    kl: float
    d_entropy_per_token: float
    kl_per_token: float


@dataclass
class CounterfactualResult:
    config: dict
    batches: list[dict] = field(default_factory=list)
    measurements: list[Measurement] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"config": self.config, "batches": self.batches, "summary": self.summary, "notes": self.notes,
                "seconds": self.seconds, "measurements": [asdict(m) for m in self.measurements]}


def run_counterfactual(model, tokenizer, train_rows, heldout_rows, cfg: CounterfactualConfig,
                       grade=None, log=print) -> CounterfactualResult:
    """`train_rows`: batches × prompts_per_batch (prompt, gold) pairs; `heldout_rows`: other prompts."""
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    head0 = causal_lm_head_params(model)
    head = (head0.weight.detach().float() * head0.logit_scale).clone()
    if head0.bias is not None:
        raise ValueError("the counterfactual test supports heads without bias")
    res = CounterfactualResult(config=asdict(cfg))

    ho_prompts, ho_golds = zip(*heldout_rows)
    h_ho, *_ = sample_batch(model, tokenizer, ho_prompts, ho_golds, cfg.group_size, cfg.max_new_tokens,
                            cfg.temperature, grade=grade, advantages=False)
    if h_ho.shape[0] > cfg.heldout_positions:
        h_ho = h_ho[torch.randperm(h_ho.shape[0], generator=gen)[: cfg.heldout_positions]]
    heldout = HeldOut(h_ho, cfg.temperature)
    log(f"held-out positions: {h_ho.shape[0]} (from {len(ho_prompts)} other prompts)")

    per = cfg.prompts_per_batch
    for b in range(cfg.batches):
        rows = train_rows[b * per:(b + 1) * per]
        prompts, golds = zip(*rows)
        hidden, targets, adv, rewards, cmask = sample_batch(model, tokenizer, prompts, golds, cfg.group_size,
                                                            cfg.max_new_tokens, cfg.temperature, grade=grade)
        batch = score_batch(hidden, targets, adv, cmask, rewards, head, cfg.temperature, cfg.s2t)
        sets = token_sets(batch, cfg.s2t.tau_p, cfg.draws, gen)
        info = {"batch": b, "samples": batch.samples, "tokens": int(targets.numel()),
                "tokens_pos_adv": int((batch.advantage > 0).sum()), "tokens_neg_adv": int((batch.advantage < 0).sum()),
                "reward_mean": batch.reward_mean, "tau_h": batch.tau_h,
                "sizes": {k: int(v[0].numel()) for k, v in sets.items()}}
        res.batches.append(info)
        log(f"batch {b}: {info['tokens']} tokens, reward mean {batch.reward_mean:.3f}, tau_h {batch.tau_h:.4g} nats, "
            f"set sizes {info['sizes']}")

        def record(reading, name, draw, idx, new_head, ref_head, null=None, batch_index=b):
            h_old, h_new, kl = heldout.entropy_and_kl(ref_head, new_head)
            d = h_new - h_old - (null if null is not None else 0.0)
            n = int(idx.numel())
            res.measurements.append(Measurement(reading, batch_index, name, draw, n, d, kl,
                                                d / n if n else float("nan"), kl / n if n else float("nan")))

        for name, idx_list in sets.items():
            for draw, idx in enumerate(idx_list):
                if idx.numel() == 0:
                    res.measurements.append(Measurement("sgd", b, name, draw, 0, float("nan"), float("nan"),
                                                        float("nan"), float("nan")))
                    continue
                record("sgd", name, draw, idx, sgd_step(head, batch, idx, cfg.sgd_lr, cfg.temperature), head)
        warm_head, warm_state = adamw_warm(head, batch, cfg.warmup_steps, cfg.adamw_lr, cfg.temperature)
        empty = torch.zeros(0, dtype=torch.long)
        null_head = adamw_step(warm_head, warm_state, batch, empty, cfg.adamw_lr, cfg.temperature)
        h_old, h_new, kl_null = heldout.entropy_and_kl(warm_head, null_head)
        null_dh = h_new - h_old
        res.measurements.append(Measurement("adamw_null", b, "none", 0, 0, null_dh, kl_null, float("nan"),
                                            float("nan")))
        for name, idx_list in sets.items():
            for draw, idx in enumerate(idx_list):
                if idx.numel() == 0:
                    res.measurements.append(Measurement("adamw", b, name, draw, 0, float("nan"), float("nan"),
                                                        float("nan"), float("nan")))
                    continue
                new = adamw_step(warm_head, warm_state, batch, idx, cfg.adamw_lr, cfg.temperature)
                record("adamw", name, draw, idx, new, warm_head, null=null_dh)

    res.summary = summarize_measurements(res.measurements)
    for name in SETS:
        sizes = [bi["sizes"][name] for bi in res.batches]
        if not any(sizes):
            res.notes.append(f"the {name} set is empty in every batch at {_threshold_label(cfg)}: no reading "
                             "(try an absolute --tau-h, a larger --tau-h-quantile or --tau-p)")
    res.seconds = time.perf_counter() - t0
    return res


def _threshold_label(cfg: CounterfactualConfig) -> str:
    return f"tau_p={cfg.s2t.tau_p:g}, tau_h: {cfg.s2t.threshold_reading}"


def summarize_measurements(ms: list[Measurement]) -> dict:
    """Per reading and set: the CI of ΔH̄/|S|, KL/|S|, ΔH̄ and KL over all (batch, draw) units."""
    out: dict = {}
    for reading in ("sgd", "adamw"):
        for name in SETS:
            rows = [m for m in ms if m.reading == reading and m.set == name]
            if not rows:
                continue
            out.setdefault(reading, {})[name] = {
                "units": len(rows),
                "empty_units": sum(1 for m in rows if m.size == 0),
                "mean_size": sum(m.size for m in rows) / len(rows),
                "d_entropy_per_token": confidence_interval(m.d_entropy_per_token for m in rows),
                "kl_per_token": confidence_interval(m.kl_per_token for m in rows),
                "d_entropy": confidence_interval(m.d_entropy for m in rows),
                "kl": confidence_interval(m.kl for m in rows),
            }
    null = [m for m in ms if m.reading == "adamw_null"]
    if null:
        out["adamw_null"] = {"d_entropy": confidence_interval(m.d_entropy for m in null),
                             "kl": confidence_interval(m.kl for m in null)}
    return out


def _ci(c: dict) -> str:
    if c["n"] == 0:
        return "n/a (empty)"
    if c["n"] == 1 or c["lo"] != c["lo"]:
        return f"{c['mean']:+.3e}"
    return f"{c['mean']:+.3e} [{c['lo']:+.2e}, {c['hi']:+.2e}]"


def format_table(res: CounterfactualResult, markdown: bool = False) -> str:
    """One row per (reading, set): mean size, ΔH̄/|S| and KL/|S| with 95 % CIs, units."""
    head = ["reading", "set", "|S| mean", "dH/|S| (95% CI)", "KL/|S| (95% CI)", "dH", "KL", "units"]
    body = []
    for reading, sets in res.summary.items():
        if reading == "adamw_null":
            continue
        for name, s in sets.items():
            body.append([reading, name, f"{s['mean_size']:.1f}", _ci(s["d_entropy_per_token"]),
                         _ci(s["kl_per_token"]), _ci(s["d_entropy"]), _ci(s["kl"]),
                         f"{s['units'] - s['empty_units']}/{s['units']}"])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    fmt = lambda r: "  ".join(x.ljust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in body])


def write_outputs(res: CounterfactualResult, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "counterfactual.json", "markdown": out / "counterfactual.md"}
    paths["json"].write_text(json.dumps(res.as_dict(), indent=2, default=float))
    cfg = res.config
    md = [
        "# Counterfactual one-step test",
        "",
        f"One step on L_S = -sum_(t in S) A_t log pi(a_t) (output head only, cached hidden states); "
        f"mean entropy change dH and KL(old || new) on {cfg['heldout_positions']} (at most) held-out positions, "
        f"divided by |S|. SGD lr {cfg['sgd_lr']:g}; AdamW lr {cfg['adamw_lr']:g} after {cfg['warmup_steps']} warm-up "
        f"steps on all tokens (dH relative to a step with an empty set). 95% Student-t intervals over "
        f"{cfg['batches']} batches x draws (random set: {cfg['draws']} draws per batch).",
        "",
        format_table(res, markdown=True),
        "",
        "Batches: " + "; ".join(f"{b['tokens']} tokens, reward {b['reward_mean']:.3f}, tau_h {b['tau_h']:.4g}, "
                                f"sizes {b['sizes']}" for b in res.batches),
    ]
    md += [""] + [f"- note: {n}" for n in res.notes]
    paths["markdown"].write_text("\n".join(md) + "\n")
    return paths
