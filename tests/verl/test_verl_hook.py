"""The actor-loss hook: a fake verl actor micro-batch (tensors only) through verl's own `ppo_loss`
as the engine worker calls it, with stapo.engines.verl installed."""

from __future__ import annotations

import pytest
from verl_fakes import VERL_MODULE, VERL_SKIP_REASON

pytest.importorskip(VERL_MODULE, reason=VERL_SKIP_REASON)

import math
import sys

import torch
from verl_fakes import make_actor_config, make_micro_batch

import stapo.engines.verl  # noqa: F401 - installs the hook
import verl.workers.utils.losses as verl_losses


def test_hook_is_what_the_engine_worker_binds(monkeypatch):
    """The engine worker does `from verl.workers.utils.losses import ppo_loss`: imported after the
    plugin it gets the hook; imported before, install_actor_loss_hook replaces its binding. (The
    real worker module needs the rollout server stack, so a stand-in module plays it here.)"""
    import types

    assert verl_losses.ppo_loss is stapo.engines.verl.stapo_actor_loss
    original = stapo.engines.verl.losses._VERL_PPO_LOSS
    assert original is not None and original.__module__ == "verl.workers.utils.losses"
    worker = types.ModuleType("verl.workers.engine_workers")
    worker.ppo_loss = original
    monkeypatch.setitem(sys.modules, "verl.workers.engine_workers", worker)
    stapo.engines.verl.install_actor_loss_hook()
    assert worker.ppo_loss is stapo.engines.verl.stapo_actor_loss
    assert stapo.engines.verl.losses._VERL_PPO_LOSS is original  # idempotent: never wraps itself


def mini_batch(seed=0, bsz=6, resp_len=6):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([6, 2, 5, 4, 1, 3])[:bsz]
    mask = torch.arange(resp_len)[None, :] < lengths[:, None]
    old = -torch.rand(bsz, resp_len, generator=g) * 2.0
    lp = old + 0.3 * torch.randn(bsz, resp_len, generator=g)
    adv = torch.tensor([1.0, 0.5, -1.0, 2.0, 1.0, -0.5])[:bsz, None].expand(bsz, resp_len).contiguous()
    ent = 0.6 + torch.rand(bsz, resp_len, generator=g)
    spurious = [(0, 2), (3, 1), (3, 3), (2, 0)]  # (2, 0) has A < 0: stays
    for i, t in spurious:
        lp[i, t] = math.log(0.004)
        ent[i, t] = 0.05
    lp, old, ent = lp * mask, old * mask, ent * mask  # padding is zero, as verl's unpadding gives
    expected = mask & (adv > 0) & (lp.exp() < 0.01) & (ent < 0.5)
    return lp, old, adv, ent, mask, expected


def test_spurious_tokens_get_zero_gradient_through_the_wrapper():
    lp, old, adv, ent, mask, expected = mini_batch()
    assert expected.sum() == 3
    cfg = make_actor_config("stapo", stapo={"tau_p": 0.01, "tau_h": 0.5})
    data, out, flat = make_micro_batch(lp, old, adv, ent, mask)
    loss, metrics = verl_losses.ppo_loss(cfg, out, data)
    loss.backward()
    # map the padded [B, T] positions to the flat leaf: position of token (i, t)
    from verl.workers.utils.padding import no_padding_2_padding

    index = no_padding_2_padding(torch.arange(flat.numel(), dtype=torch.float64), data).long()
    grads = flat.grad[index]
    assert torch.all(grads[expected] == 0)
    vanilla_cfg = make_actor_config("vanilla")
    data2, out2, flat2 = make_micro_batch(lp, old, adv, ent, mask)
    verl_losses.ppo_loss(vanilla_cfg, out2, data2)[0].backward()
    assert torch.all(flat2.grad[index][expected] != 0)  # without STAPO they do get gradient
    count = metrics["actor/s2t_masked_count"]  # reaches verl's metrics (a verl Metric)
    assert count.aggregate() == 3.0


def split_run(lp, old, adv, ent, mask, bounds, cfg, dp_size=1, global_tokens=None, global_seqs=None):
    """Run micro-batches [a, b) through the wrapper, as one rank; returns (Σ loss, grad of a shared θ)."""
    theta = torch.zeros((), requires_grad=True)
    total = 0.0
    info = {
        "dp_size": dp_size,
        "batch_num_tokens": int(mask.sum()) if global_tokens is None else global_tokens,
        "global_batch_size": mask.shape[0] if global_seqs is None else global_seqs,
    }
    for a, b in bounds:
        data, out, flat = make_micro_batch(lp[a:b], old[a:b], adv[a:b], ent[a:b], mask[a:b], global_info=info)
        # a shared parameter: every token's log-prob moves with θ (times a token-specific weight)
        weight = 1.0 + 0.5 * torch.cos(7.0 * flat.detach())  # a function of the token, not of the split
        out["log_probs"] = flat.detach() + theta * weight
        loss, _ = verl_losses.ppo_loss(cfg, out, data)
        loss.backward()
        total += loss.item()
    return total, theta.grad.item()


@pytest.mark.parametrize("loss_mode,stapo_cfg", [("stapo", {"tau_p": 0.01, "tau_h": 0.5}), ("20-entropy", {"top_entropy_quantile": 1.0})])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batch_and_dp_split_invariance(loss_mode, stapo_cfg, agg):
    lp, old, adv, ent, mask, _ = mini_batch(seed=2)
    cfg = make_actor_config(loss_mode, stapo=stapo_cfg, loss_agg_mode=agg, loss_scale_factor=6)
    whole = split_run(lp, old, adv, ent, mask, [(0, 6)], cfg)
    for bounds in ([(0, 2), (2, 6)], [(0, 1), (1, 3), (3, 6)]):
        parts = split_run(lp, old, adv, ent, mask, bounds, cfg)
        assert parts[0] == pytest.approx(whole[0], rel=1e-5)
        assert parts[1] == pytest.approx(whole[1], rel=1e-5)
    # two data-parallel ranks with verl's global info: FSDP averages the ranks' gradients
    n_tok = int(mask.sum())
    rank0 = split_run(lp, old, adv, ent, mask, [(0, 3)], cfg, dp_size=2, global_tokens=n_tok, global_seqs=6)
    rank1 = split_run(lp, old, adv, ent, mask, [(3, 4), (4, 6)], cfg, dp_size=2, global_tokens=n_tok, global_seqs=6)
    assert (rank0[1] + rank1[1]) / 2 == pytest.approx(whole[1], rel=1e-5)
    assert whole[1] != 0.0


def test_other_loss_modes_pass_through_unchanged():
    lp, old, adv, ent, mask, _ = mini_batch()
    cfg = make_actor_config("vanilla")
    data, out, _ = make_micro_batch(lp, old, adv, ent, mask)
    hooked, _ = verl_losses.ppo_loss(cfg, out, data)
    data, out, _ = make_micro_batch(lp, old, adv, ent, mask)
    original, _ = stapo.engines.verl.losses._VERL_PPO_LOSS(cfg, out, data)
    assert hooked.item() == original.item()


def test_missing_entropy_names_the_setting():
    lp, old, adv, ent, mask, _ = mini_batch()
    data, out, _ = make_micro_batch(lp, old, adv, ent, mask)
    del out["entropy"]
    with pytest.raises(ValueError, match="calculate_entropy"):
        verl_losses.ppo_loss(make_actor_config("stapo"), out, data)
