"""The registered losses, through verl's own registry and config objects, against verl's `vanilla`
loss and against stapo.core / hand-computed masks."""

from __future__ import annotations

import pytest
from verl_fakes import VERL_MODULE, VERL_SKIP_REASON

pytest.importorskip(VERL_MODULE, reason=VERL_SKIP_REASON)

import torch
from verl.trainer.ppo.core_algos import get_policy_loss_fn
from verl_fakes import make_actor_config

import stapo.core as core
from stapo.core import S2TSettings
from stapo.engines.verl import core_loss_kwargs, entropy_context

AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
GLOBAL_INFOS = {
    "local": {},
    "global": {"dp_size": 2, "batch_num_tokens": 37, "global_batch_size": 9, "loss_scale_factor": 5},
}


def random_batch(seed=0, bsz=5, resp_len=7):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(bsz, resp_len, generator=g, dtype=torch.float64) * 3.0
    lp = old + 0.5 * torch.randn(bsz, resp_len, generator=g, dtype=torch.float64)  # ratios across the clip range
    adv = torch.randn(bsz, generator=g, dtype=torch.float64)[:, None].expand(bsz, resp_len).contiguous()
    ent = torch.rand(bsz, resp_len, generator=g, dtype=torch.float64) * 2.0
    lengths = torch.tensor([7, 3, 5, 1, 6])[:bsz]
    mask = torch.arange(resp_len)[None, :] < lengths[:, None]
    return lp, old, adv, ent, mask


def run_loss(name, config, lp, old, adv, mask, agg, entropy=None):
    leaf = lp.clone().requires_grad_(True)
    fn = get_policy_loss_fn(name)
    kwargs = dict(old_log_prob=old, log_prob=leaf, advantages=adv, response_mask=mask, loss_agg_mode=agg, config=config)
    if entropy is None:
        loss, metrics = fn(**kwargs)
    else:
        with entropy_context(entropy):
            loss, metrics = fn(**kwargs)
    loss.backward()
    return loss.detach(), leaf.grad, metrics


def with_info(config, info):
    config.global_batch_info.clear()
    config.global_batch_info.update(info)
    return config


@pytest.mark.parametrize("info", list(GLOBAL_INFOS))
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("name", ["stapo", "20-entropy"])
def test_empty_filter_equals_vanilla(name, agg, info):
    """No token silenced (STAPO: tau_h = 0, below every entropy; 20-Entropy: rho = 1) -> verl's vanilla,
    value and gradient, for every aggregation mode, with and without global batch info."""
    lp, old, adv, ent, mask = random_batch()
    stapo = {"tau_h": 0.0} if name == "stapo" else {"top_entropy_quantile": 1.0}  # H < 0 nats: never
    cfg = with_info(make_actor_config(name, stapo=stapo, loss_agg_mode=agg), GLOBAL_INFOS[info])
    ref_cfg = with_info(make_actor_config("vanilla", loss_agg_mode=agg), GLOBAL_INFOS[info])
    loss, grad, metrics = run_loss(name, cfg, lp, old, adv, mask, agg, entropy=ent)
    ref_loss, ref_grad, _ = run_loss("vanilla", ref_cfg, lp, old, adv, mask, agg)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)
    assert grad.abs().sum() > 0  # the comparison is not vacuous
    if name == "stapo":
        assert metrics["actor/s2t_masked_count"] == 0.0


def spurious_batch():
    """A batch whose S2T set is known by construction (tau_p = 0.05, tau_h = 0.5 nats)."""
    lp, old, adv, ent, mask = random_batch(seed=1)
    adv = torch.tensor([1.0, 1.0, -1.0, 0.5, 2.0], dtype=torch.float64)[:, None].expand_as(lp).contiguous()
    lp = lp.clone()
    ent = ent.clone() + 0.6  # every entropy >= 0.6: nothing low-entropy unless set below
    for i, t in [(0, 1), (0, 4), (1, 2), (2, 0), (4, 5)]:  # (2, 0) has A < 0: not spurious
        lp[i, t] = torch.log(torch.tensor(0.01, dtype=torch.float64))
        ent[i, t] = 0.1
    lp[3, 0] = torch.log(torch.tensor(0.01, dtype=torch.float64))  # low p, high entropy: kept
    ent[4, 0] = 0.1  # low entropy, but p is not low unless by chance -> checked by the definition below
    return lp, old, adv, ent, mask


def test_known_spurious_set_equals_core_and_hand_mask():
    lp, old, adv, ent, mask = spurious_batch()
    expected = mask & (adv > 0) & (lp.exp() < 0.05) & (ent < 0.5)  # METHOD.md's definition, float64
    assert {(int(i), int(t)) for i, t in expected.nonzero()} >= {(0, 1), (0, 4), (1, 2), (4, 5)}
    assert not expected[2, 0] and not expected[3, 0]
    for info in GLOBAL_INFOS.values():
        cfg = with_info(make_actor_config("stapo", stapo={"tau_p": 0.05, "tau_h": 0.5}), info)
        loss, grad, metrics = run_loss("stapo", cfg, lp, old, adv, mask, "token-mean", entropy=ent)
        # stapo.core with verl's global batch info mapped onto core's denominators
        leaf = lp.clone().requires_grad_(True)
        core_loss, _ = core.stapo_loss(
            leaf, old, adv, mask, ent, s2t=S2TSettings(tau_p=0.05, tau_h=0.5), **core_loss_kwargs(cfg, "token-mean")
        )
        core_loss.backward()
        assert loss.item() == pytest.approx(core_loss.item(), rel=1e-6)
        torch.testing.assert_close(grad, leaf.grad)
        assert torch.all(grad[expected] == 0)
        # ...and it is the mask that zeroes them: without it they carry gradient
        _, unmasked_grad, _ = run_loss("vanilla", with_info(make_actor_config("vanilla"), info), lp, old, adv, mask,
                                       "token-mean")
        assert torch.all(unmasked_grad[expected] != 0)
        assert metrics["actor/s2t_masked_count"] == float(expected.sum())
    # Without global info STAPO renormalises over the kept tokens: verl's vanilla on valid & ~M.
    cfg = with_info(make_actor_config("stapo", stapo={"tau_p": 0.05, "tau_h": 0.5}), {})
    loss, grad, _ = run_loss("stapo", cfg, lp, old, adv, mask, "token-mean", entropy=ent)
    ref_cfg = with_info(make_actor_config("vanilla"), {})
    ref_loss, ref_grad, _ = run_loss("vanilla", ref_cfg, lp, old, adv, mask & ~expected, "token-mean")
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    torch.testing.assert_close(grad, ref_grad)


def test_global_denominator_mapping_against_vanilla_on_the_kept_set():
    """With verl's global info, STAPO = vanilla restricted to the kept tokens with verl's own
    (global) denominators, for every aggregation mode: the dp_size mapping is verl's."""
    lp, old, adv, ent, mask = spurious_batch()
    expected = mask & (adv > 0) & (lp.exp() < 0.05) & (ent < 0.5)
    for agg in AGG_MODES:
        cfg = with_info(make_actor_config("stapo", stapo={"tau_p": 0.05, "tau_h": 0.5}, loss_agg_mode=agg),
                        GLOBAL_INFOS["global"])
        ref_cfg = with_info(make_actor_config("vanilla", loss_agg_mode=agg), GLOBAL_INFOS["global"])
        loss, grad, _ = run_loss("stapo", cfg, lp, old, adv, mask, agg, entropy=ent)
        ref_loss, ref_grad, _ = run_loss("vanilla", ref_cfg, lp, old, adv, mask & ~expected, agg)
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5), agg
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)


def test_quantile_threshold_and_20_entropy_keep_set():
    lp, old, adv, ent, mask = random_batch(seed=3)
    lp = lp.clone()
    lp[mask] = torch.log(torch.tensor(0.001, dtype=torch.float64))  # every token has low p
    adv = adv.abs() + 0.1
    q = torch.quantile(ent[mask], 0.3)  # torch's linear quantile as the independent reference
    # the quantile over all valid tokens, uncapped (torch.quantile's reading)
    cfg = with_info(make_actor_config("stapo", stapo={"tau_p": 0.01, "tau_h_quantile": 0.3, "tau_h_population": "valid",
                                                      "tau_h_max": float("inf")}), {})
    _, grad, metrics = run_loss("stapo", cfg, lp, old, adv, mask, "token-mean", entropy=ent)
    silenced = mask & (ent < q)
    assert metrics["actor/s2t_entropy_threshold"] == pytest.approx(q.item(), rel=1e-6)
    assert torch.all(grad[silenced] == 0) and torch.all(grad[mask & ~silenced] != 0)
    # 20-Entropy: top 40% by entropy keep a gradient, denominator = all valid tokens
    cfg = with_info(make_actor_config("20-entropy", stapo={"top_entropy_quantile": 0.4}), {})
    loss, grad, _ = run_loss("20-entropy", cfg, lp, old, adv, mask, "token-mean", entropy=ent)
    keep = mask & (ent >= torch.quantile(ent[mask], 0.6))
    ref_cfg = with_info(make_actor_config("vanilla"), {"batch_num_tokens": int(mask.sum())})
    ref_loss, ref_grad, _ = run_loss("vanilla", ref_cfg, lp, old, adv, keep, "token-mean")
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    torch.testing.assert_close(grad, ref_grad)


def test_errors_name_the_setting():
    lp, old, adv, ent, mask = random_batch()
    cfg = make_actor_config("stapo")
    with pytest.raises(ValueError, match="calculate_entropy"):
        get_policy_loss_fn("stapo")(old, lp, adv, mask, "token-mean", cfg)
    with pytest.raises(ValueError, match="rollout_correction"):
        with entropy_context(ent):
            get_policy_loss_fn("stapo")(old, lp, adv, mask, "token-mean", cfg, torch.ones_like(lp))
    with pytest.raises(ValueError, match="batch_num_tokens"):
        core_loss_kwargs(with_info(make_actor_config("stapo"), {"dp_size": 2}), "token-mean")


@pytest.mark.parametrize("tau_p, warns", [(0.0, True), (0.05, False)])
def test_inert_guard_warns_only_when_nothing_is_silenced(caplog, tau_p, warns):
    """verl's loss is called once per micro-batch: after inert_warning_steps calls that silenced nothing,
    one warning line; quiet when the mask bites."""
    lp, old, adv, ent, mask = spurious_batch()
    cfg = with_info(make_actor_config("stapo", stapo={"tau_p": tau_p, "tau_h": 0.5, "inert_warning_steps": 3}), {})
    with caplog.at_level("WARNING", logger="stapo.engines.verl.losses"):
        for _ in range(5):
            _, _, metrics = run_loss("stapo", cfg, lp, old, adv, mask, "token-mean", entropy=ent)
    inert = [r.getMessage() for r in caplog.records if "silenced no token" in r.getMessage()]
    assert "actor/s2t_candidates" in metrics
    if warns:
        assert len(inert) == 1 and "for 3 optimizer steps" in inert[0] and "micro-batches" in inert[0]
    else:
        assert metrics["actor/s2t_masked_count"] > 0 and inert == []
