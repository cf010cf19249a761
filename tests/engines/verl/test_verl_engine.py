"""The plugin inside verl's real training engine, on a CPU: verl 0.9.1's FSDP2 engine (`EngineRegistry`,
`FSDPEngineWithLMHead`) on a tiny random Qwen3, one gloo rank, fp32. A hand-made actor batch (two GRPO
groups) goes through `engine.train_batch` with the loss function verl's engine worker binds
(`partial(ppo_loss, config=actor_config)`): verl's `ppo_loss`, verl's policy-loss registry, the plugin's
`stapo` loss, backward and an optimizer step.

  - the entropies and log-probs the loss sees are the model's (float64 Hugging Face recomputation);
  - an empty S2T mask gives verl's `vanilla` gradients; planted spurious tokens get no gradient and leave
    the token-mean denominator (= `vanilla` on a response mask without them); with the registry entry
    swapped for `vanilla` the same comparison fails;
  - `tau_h_scope=mini_batch`: the decision on a mini-batch split into 1, 2 or 4 micro-batches (or by a
    token budget) is the decision on the whole mini-batch; `micro_batch` scope differs;
  - the `actor/s2t_*` metrics come back in the engine's output.
"""

from __future__ import annotations

import pytest
from verl_fakes import VERL_MODULE, VERL_SKIP_REASON

pytest.importorskip(VERL_MODULE, reason=VERL_SKIP_REASON)

import math

import torch
from token_mean_reference import Method, spurious_tokens, step_loss
from verl_engine import (
    actor_loss,
    build_engine,
    full_grads,
    full_params,
    hf_logprobs_entropy,
    make_batch,
    tiny_qwen3,
    to_actor_batch,
    verl_on_cpu,
)
from verl_fakes import make_actor_config

import stapo.engines.verl as plugin
import stapo.engines.verl.entropy_channel as entropy_channel
import stapo.engines.verl.losses as plugin_losses


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The model, the batch, the float64 references and one engine (lr 0: the policy never moves, so
    every test sees the same current policy; gradients are what is compared)."""
    model_dir = tiny_qwen3(tmp_path_factory.mktemp("tiny_qwen3"))
    padded = make_batch()
    ref_lp, ref_ent = hf_logprobs_entropy(model_dir, padded)
    with verl_on_cpu():
        engine = build_engine(model_dir, lr=0.0)
        with engine.train_mode():  # the actor's old log-probs: a forward-only pass, as compute_log_prob
            out = engine.infer_batch(to_actor_batch(padded, torch.zeros(ref_lp.shape), micro_batch_size=8))
        from verl.workers.utils.padding import no_padding_2_padding

        td = to_actor_batch(padded, torch.zeros(ref_lp.shape), micro_batch_size=8)
        lp = no_padding_2_padding(out["model_output"]["log_probs"], td).float()
        ent = no_padding_2_padding(out["model_output"]["entropy"], td).float()
        valid = padded["response_mask"].bool()
        noise = 0.15 * torch.randn(lp.shape, generator=torch.Generator().manual_seed(5))
        old = torch.where(valid, lp + noise, torch.zeros_like(lp))  # ratios on both sides of the clip range
        yield dict(model_dir=model_dir, padded=padded, ref_lp=ref_lp, ref_ent=ref_ent, engine=engine, lp=lp,
                   ent=ent, old=old, valid=valid, adv=padded["advantages"])


class Spy:
    """Records what the plugin's loss sees on every call verl makes to it."""

    def __init__(self, monkeypatch):
        self.calls = []
        original = plugin_losses._token_filter_loss

        def spy(loss_mode, old_log_prob, log_prob, advantages, response_mask, *args):
            inputs = entropy_channel._INPUTS.get()
            loss, metrics = original(loss_mode, old_log_prob, log_prob, advantages, response_mask, *args)
            self.calls.append(dict(log_prob=log_prob.detach().clone(), entropy=inputs.entropy.clone(),
                                   mask=response_mask.bool().clone(), metrics=metrics))
            return loss, metrics

        monkeypatch.setattr(plugin_losses, "_token_filter_loss", spy)

    def rows(self, key):
        """The calls' [b, T] tensors stacked in batch order (fixed-size micro-batches keep the order)."""
        width = max(c[key].shape[1] for c in self.calls)
        return torch.cat([torch.nn.functional.pad(c[key], (0, width - c[key].shape[1])) for c in self.calls])


def test_the_engine_has_the_attributes_the_hook_reads(setup):
    """The attributes of verl's engine the plugin reads (stapo.engines.verl.internals), on the real FSDP engine;
    one taken away is named."""
    from stapo.engines.verl.internals import engine_problems

    assert engine_problems(setup["engine"]) == []
    size = setup["engine"].__dict__.pop("ulysses_sequence_parallel_size")
    try:
        assert any(p.startswith("engine.ulysses_sequence_parallel_size is missing")
                   for p in engine_problems(setup["engine"]))
    finally:
        setup["engine"].ulysses_sequence_parallel_size = size


def train(setup, config, micro_batch_size=8, response_mask=None, old=None, extra=None, engine=None, **batch_keys):
    """One `engine.train_batch` (zero grad, forward/backward of every micro-batch, optimizer step) with the
    loss function verl's worker binds; returns (metrics, the gradient vector). `old`: other old log-probs;
    `extra`: more padded [B, T] fields of the actor batch (e.g. pi_old's entropies)."""
    padded = dict(setup["padded"], **(extra or {}))
    if response_mask is not None:
        padded["response_mask"] = response_mask.long()
        padded["advantages"] = padded["advantages"] * response_mask
    data = to_actor_batch(padded, setup["old"] if old is None else old, micro_batch_size)
    if batch_keys:
        from verl.utils import tensordict_utils as tu

        tu.assign_non_tensor(data, **batch_keys)
    engine = setup["engine"] if engine is None else engine
    with verl_on_cpu(), engine.train_mode():  # leaving train mode zeroes the gradients: read them inside
        out = engine.train_batch(data, loss_function=actor_loss(config))
        grads = full_grads(engine)
    return out["metrics"], grads


def assert_grads_close(grads, ref, rel=1e-5):
    """Equal up to float32 summation order: element-wise, to `rel` of the gradient's scale."""
    torch.testing.assert_close(grads, ref, rtol=rel, atol=rel * float(ref.abs().max()))


def values(metric) -> list[float]:
    items = metric if isinstance(metric, list) else [metric]
    out = []
    for m in items:
        out += [float(v) for v in getattr(m, "values", [m])]
    return out


def stapo_config(**stapo):
    return make_actor_config("stapo", stapo=stapo)


def vanilla_config():
    return make_actor_config("vanilla")


def test_the_loss_sees_the_models_entropies_and_reports_its_metrics(setup, monkeypatch):
    """(a) + (d): two micro-batches through the real engine; the entropies and log-probs our loss gets are a
    float64 recomputation's (to fp32 accuracy), aligned with the response tokens; the metrics come back."""
    spy = Spy(monkeypatch)
    metrics, grads = train(setup, stapo_config(tau_p=0.05), micro_batch_size=4)
    assert len(spy.calls) == 2  # verl called the plugin's loss once per micro-batch
    valid = setup["valid"]
    assert torch.equal(spy.rows("mask"), valid)
    ent, lp = spy.rows("entropy").double(), spy.rows("log_prob").double()
    assert (ent - setup["ref_ent"])[valid].abs().max() < 1e-4
    assert (lp - setup["ref_lp"])[valid].abs().max() < 1e-4
    # an off-by-one alignment (the entropy of the next position) would be far off: the check has teeth
    shifted = torch.roll(setup["ref_ent"], 1, dims=1)
    assert (ent - shifted)[valid & torch.roll(valid, 1, dims=1)].abs().max() > 1e-2
    for name in ("actor/s2t_masked_count", "actor/s2t_masked_frac", "actor/s2t_candidates",
                 "actor/s2t_entropy_threshold", "actor/s2t_frac_low_prob", "actor/pg_clipfrac"):
        assert name in metrics, name
    assert values(metrics["actor/s2t_masked_count"]) == [c["metrics"]["actor/s2t_masked_count"] for c in spy.calls]
    assert sum(values(metrics["actor/s2t_masked_count"])) > 0  # tau_p 0.05 with the paper's quantile silences some
    assert grads.abs().sum() > 0 and "grad_norm" in metrics


@pytest.mark.parametrize("micro_batch_size", [8, 4])
def test_an_empty_mask_is_verls_vanilla(setup, micro_batch_size):
    """(b) tau_p = 0 silences nothing: the same gradient as verl's vanilla loss."""
    metrics, grads = train(setup, stapo_config(tau_p=0.0), micro_batch_size)
    _, ref = train(setup, vanilla_config(), micro_batch_size)
    assert sum(values(metrics["actor/s2t_masked_count"])) == 0
    assert_grads_close(grads, ref)
    assert ref.abs().sum() > 0


def planted(setup, n=4):
    """tau_p, an absolute tau_h and the spurious set they give on the current policy: the n lowest-entropy
    candidates (A > 0, p < tau_p), both thresholds set in the middle of a gap of the values."""
    lp, ent, valid, adv = setup["lp"], setup["ent"], setup["valid"], setup["adv"]
    probs = torch.sort(lp[valid & (adv > 0)].exp()).values
    k = len(probs) // 2
    tau_p = float((probs[k - 1] + probs[k]) / 2)
    candidates = valid & (adv > 0) & (lp < math.log(tau_p))
    e = torch.sort(ent[candidates]).values
    assert len(e) > n and float(e[n] - e[n - 1]) > 1e-4 and float(probs[k] - probs[k - 1]) > 1e-6
    tau_h = float((e[n - 1] + e[n]) / 2)
    spurious = candidates & (ent < tau_h)
    assert int(spurious.sum()) == n
    return tau_p, tau_h, spurious


@pytest.mark.parametrize("micro_batch_size", [8, 4, 2])
def test_planted_spurious_tokens_get_no_gradient_and_leave_the_denominator(setup, micro_batch_size, monkeypatch):
    """(c) STAPO = verl's vanilla on a response mask without the planted tokens (their gradient is zero, the
    token-mean is over the others), however the mini-batch is split (mini_batch scope)."""
    tau_p, tau_h, spurious = planted(setup)
    metrics, grads = train(setup, stapo_config(tau_p=tau_p, tau_h=tau_h), micro_batch_size)
    _, ref = train(setup, vanilla_config(), micro_batch_size, response_mask=setup["valid"] & ~spurious)
    _, plain = train(setup, vanilla_config(), micro_batch_size)
    assert sum(values(metrics["actor/s2t_masked_count"])) == int(spurious.sum())
    assert_grads_close(grads, ref)
    assert (grads - plain).abs().max() > 1e-3 * plain.abs().max()  # the planted tokens do carry gradient


def test_the_comparison_fails_when_verl_does_not_call_the_plugin(setup, monkeypatch):
    """The planted-token comparison has teeth: with verl's registry entry `stapo` pointing at verl's own
    vanilla loss (the plugin's loss unregistered), the engine trains without the mask and the check fails."""
    from verl.trainer.ppo import core_algos

    tau_p, tau_h, spurious = planted(setup)
    _, ref = train(setup, vanilla_config(), 8, response_mask=setup["valid"] & ~spurious)
    spy = Spy(monkeypatch)
    monkeypatch.setitem(core_algos.POLICY_LOSS_REGISTRY, "stapo", core_algos.POLICY_LOSS_REGISTRY["vanilla"])
    metrics, grads = train(setup, stapo_config(tau_p=tau_p, tau_h=tau_h), 8)
    assert spy.calls == [] and "actor/s2t_masked_count" not in metrics
    assert (grads - ref).abs().max() > 1e-3 * ref.abs().max()
    monkeypatch.undo()
    assert core_algos.POLICY_LOSS_REGISTRY["stapo"] is plugin.compute_policy_loss_stapo
    _, grads = train(setup, stapo_config(tau_p=tau_p, tau_h=tau_h), 8)
    assert_grads_close(grads, ref)


def test_micro_batch_scope_keeps_the_silenced_tokens_in_the_denominator(setup):
    """micro_batch scope over several micro-batches cannot know the mini-batch's silenced count before the
    first loss: the token-mean keeps verl's count of every valid token (gradient scaled by 1 - masked/N)."""
    tau_p, tau_h, spurious = planted(setup)
    _, grads = train(setup, stapo_config(tau_p=tau_p, tau_h=tau_h, tau_h_scope="micro_batch"), 4)
    _, ref = train(setup, vanilla_config(), 4, response_mask=setup["valid"] & ~spurious)
    n, m = int(setup["valid"].sum()), int(spurious.sum())
    assert_grads_close(grads, ref * (n - m) / n)


def decision(spy):
    """(the thresholds the micro-batches used, the silenced tokens of the mini-batch)."""
    thresholds = [c["metrics"]["actor/s2t_entropy_threshold"] for c in spy.calls]
    return thresholds, sum(c["metrics"]["actor/s2t_masked_count"] for c in spy.calls)


def test_mini_batch_scope_is_the_whole_mini_batchs_decision(setup, monkeypatch):
    """Task of tau_h_scope=mini_batch: the paper's quantile (q 0.75 of the candidates) on a mini-batch cut
    into 1, 2 or 4 micro-batches, or by a token budget (dynamic batch size), gives one threshold, the same
    silenced count and the same gradient as the whole mini-batch at once; a pre-pass runs only when there
    are several micro-batches. micro_batch scope gives other thresholds (so this test can fail)."""
    engine = setup["engine"]
    prepasses = []
    infer = engine.infer_batch

    def counting_infer(*args, **kwargs):
        prepasses.append(1)
        return infer(*args, **kwargs)

    monkeypatch.setattr(engine, "infer_batch", counting_infer)
    cfg = stapo_config(tau_p=0.05)
    results = {}
    for mbs in (8, 4, 2):
        spy = Spy(monkeypatch)
        prepasses.clear()
        _, grads = train(setup, cfg, mbs)
        assert len(spy.calls) == 8 // mbs and len(prepasses) == (0 if mbs == 8 else 1)
        results[mbs] = (decision(spy), grads)
    spy = Spy(monkeypatch)
    _, grads = train(setup, cfg, 8, use_dynamic_bsz=True, max_token_len_per_gpu=40)
    assert len(spy.calls) > 1
    results["budget"] = (decision(spy), grads)
    ([whole], whole_masked), whole_grads = results[8]
    assert whole_masked > 0
    for key, ((thresholds, masked), grads) in results.items():
        assert thresholds == pytest.approx([whole] * len(thresholds), abs=1e-6) and masked == whole_masked, key
        assert_grads_close(grads, whole_grads)
    # the whole mini-batch's threshold is the quantile of its candidates' entropies (the definition)
    lp, ent, valid, adv = setup["lp"], setup["ent"], setup["valid"], setup["adv"]
    cand = ent[valid & (adv > 0) & (lp < math.log(0.05))].double()
    assert whole == pytest.approx(float(torch.quantile(cand, 0.75)), abs=2e-6)
    # micro_batch scope: each micro-batch's own quantile, another decision
    for mbs in (4, 2):
        spy = Spy(monkeypatch)
        train(setup, stapo_config(tau_p=0.05, tau_h_scope="micro_batch"), mbs)
        thresholds, masked = decision(spy)
        assert max(abs(t - whole) for t in thresholds) > 1e-3, mbs


def test_an_optimizer_step_moves_the_policy(setup):
    """The same engine path with a learning rate: the step changes the weights (grad_norm reported)."""
    with verl_on_cpu():
        engine = build_engine(setup["model_dir"], lr=1e-2)
        before = full_params(engine)
        data = to_actor_batch(setup["padded"], setup["old"], 4)
        with engine.train_mode():
            out = engine.train_batch(data, loss_function=actor_loss(stapo_config(tau_p=0.05)))
        assert (full_params(engine) - before).abs().max() > 1e-4
        assert math.isfinite(out["metrics"]["grad_norm"]) and out["metrics"]["grad_norm"] > 0


# ---- the paper's layout: the same float64 reference as the TRL engine's test ----------------------


def float64_step_gradient(setup, method: Method) -> torch.Tensor:
    """The mini-batch's gradient from an independent float64 forward of the same weights and the step's
    token-mean over its own kept tokens (`token_mean_reference`), flattened in the engine's parameter order."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(setup["model_dir"]), dtype=torch.float64,
                                                 attn_implementation="eager")
    padded, valid, adv = setup["padded"], setup["valid"], setup["adv"].double()
    prompts, responses = padded["prompts"], padded["responses"]
    prompt_mask = padded["attention_mask"][:, : prompts.shape[1]].bool()
    rows = []
    for i in range(responses.shape[0]):  # one unpadded sequence at a time, as verl's remove-padding forward
        p, r = prompts[i][prompt_mask[i]], responses[i][valid[i]]
        logp = torch.log_softmax(model(input_ids=torch.cat([p, r])[None]).logits[0], dim=-1)
        logp = logp[len(p) - 1 : len(p) - 1 + len(r)]
        lp = torch.zeros(responses.shape[1], dtype=torch.float64).index_put((torch.arange(len(r)),),
                                                                            logp.gather(-1, r[:, None])[:, 0])
        ent = torch.zeros(responses.shape[1], dtype=torch.float64)
        ent[: len(r)] = -(logp.exp() * logp).sum(-1).detach()
        rows.append((lp, ent))
    lp = torch.stack([r[0] for r in rows])
    ent = torch.stack([r[1] for r in rows])
    spurious = spurious_tokens([(lp.detach(), ent, adv, valid)], method)
    step_loss([lp], [setup["old"]], [adv], [valid], spurious, method).backward()
    return torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=torch.float64)
                      for p in model.parameters()]), int(spurious[0].sum())


@pytest.mark.parametrize("loss_mode", ["vanilla", "stapo"])
def test_the_mini_batch_is_its_own_token_mean_against_float64(setup, loss_mode):
    """The paper's rule through verl's engine, a mini-batch in 4 micro-batches: the gradient is the float64
    reference's (verl's vanilla loss and the plugin's stapo loss; verl's dual clip c = 3 on both)."""
    s2t = Method(clip_low=0.2, clip_high=0.28, clip_ratio_c=3.0, tau_p=0.05 if loss_mode == "stapo" else None)
    config = stapo_config(tau_p=0.05) if loss_mode == "stapo" else vanilla_config()
    _, grads = train(setup, config, micro_batch_size=2)
    ref, silenced = float64_step_gradient(setup, s2t)
    assert loss_mode == "vanilla" or silenced > 0
    error = float((grads.double() - ref).norm() / ref.norm())
    assert error < 1e-5, error


def test_old_decision_policy_decides_on_pi_olds_values(setup, monkeypatch):
    """decision_policy=old: S2T reads pi_old's p and H (the actor batch's old log-probs and the entropies
    the driver keeps) with no pre-pass; current: pi_theta's. Old log-probs planted so that p crosses tau_p
    between the two policies on known tokens: each setting silences exactly its own set."""
    lp, valid, adv = setup["lp"], setup["valid"], setup["adv"]
    tau_p = 0.02
    positive = valid & (adv > 0)
    flip = torch.rand(lp.shape, generator=torch.Generator().manual_seed(3)) < 0.5
    old = torch.where(positive & flip, torch.where(lp < math.log(tau_p), math.log(0.5), math.log(tau_p / 10)), lp)
    old = torch.where(valid, old, torch.zeros_like(old))
    expected = {"current": int((positive & (lp < math.log(tau_p))).sum()),
                "old": int((positive & (old < math.log(tau_p))).sum())}
    assert expected["current"] != expected["old"] and min(expected.values()) > 0
    engine = setup["engine"]
    prepasses = []
    infer = engine.infer_batch
    monkeypatch.setattr(engine, "infer_batch", lambda *a, **k: prepasses.append(1) or infer(*a, **k))
    for policy, forwards in (("current", [1]), ("old", [1])):  # tau_h far above every entropy: p alone decides
        cfg = stapo_config(tau_p=tau_p, tau_h=1e3, decision_policy=policy)
        metrics, _ = train(setup, cfg, micro_batch_size=4, old=old,
                           extra={plugin_losses.OLD_ENTROPY_KEY: setup["ent"]})
        assert sum(values(metrics["actor/s2t_masked_count"])) == expected[policy], policy
        # current: one pre-pass counts the mini-batch's silenced tokens (2 micro-batches); old: none
        assert prepasses == forwards, policy


def test_a_nonfinite_forward_is_skipped_by_verls_own_guard(setup):
    """A NaN among the values the loss reads (here pi_old's log-prob at one valid position): the plugin's loss
    does not raise; its gradient is non-finite, so verl's optimizer step skips the update; the count comes
    back in the metrics."""
    old = setup["old"].clone()
    old[tuple(setup["valid"].nonzero()[0].tolist())] = float("nan")
    with verl_on_cpu():
        engine = build_engine(setup["model_dir"], lr=1e-2)
    with verl_on_cpu(), engine.train_mode():
        before = full_params(engine)
    metrics, _ = train(setup, stapo_config(tau_p=0.05), micro_batch_size=4, old=old, engine=engine)
    with verl_on_cpu(), engine.train_mode():
        assert torch.equal(full_params(engine), before)  # no update
    assert values(metrics["actor/nonfinite_positions"]) == [1.0]
    assert not math.isfinite(values(metrics["grad_norm"])[0])
    metrics, _ = train(setup, stapo_config(tau_p=0.05), micro_batch_size=4, engine=engine)  # the next step trains
    with verl_on_cpu(), engine.train_mode():
        assert not torch.equal(full_params(engine), before)
