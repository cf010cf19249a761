"""The engine hook: a fake verl actor micro-batch (tensors only) through verl's own `ppo_loss` bound as the
engine worker binds it, wrapped by `with_entropy` as the hooked `BaseEngine.train_batch` wraps it (the
real engine runs in test_verl_engine.py)."""

from __future__ import annotations

import pytest
from verl_fakes import VERL_MODULE, VERL_SKIP_REASON

pytest.importorskip(VERL_MODULE, reason=VERL_SKIP_REASON)

import math
import os
import subprocess
import sys
from functools import partial

import torch
import verl.workers.utils.losses as verl_losses
from verl_fakes import make_actor_config, make_micro_batch

import stapo.engines.verl  # noqa: F401 - installs the hook
from stapo.engines.verl import MiniBatchS2T, with_entropy


def ppo_loss(cfg, out, data, mini_batch=None):
    """verl's ppo_loss as the hooked engine calls it for one micro-batch."""
    return with_entropy(partial(verl_losses.ppo_loss, config=cfg), mini_batch)(model_output=out, data=data,
                                                                                dp_group=None)


def test_the_hook_wraps_every_engines_train_batch_and_leaves_ppo_loss_alone():
    """Importing the plugin does not import verl's engines (that would resolve verl's accelerator platform
    before other plugins register theirs); once they are imported, `BaseEngine.train_batch`, which every
    engine inherits, is the plugin's wrapper. verl's ppo_loss is not replaced. (A fresh interpreter.)"""
    code = (
        "import sys\n"
        "import stapo.engines.verl\n"
        "import verl.plugin.platform.platform_manager as pm\n"
        "assert 'verl.workers.engine' not in sys.modules and pm._current_platform is None\n"
        "import verl.workers.utils.losses as L\n"
        "assert L.ppo_loss.__module__ == 'verl.workers.utils.losses'\n"
        "from verl.workers.engine.base import BaseEngine\n"
        "from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead\n"
        "assert BaseEngine.train_batch is FSDPEngineWithLMHead.train_batch\n"
        "assert getattr(BaseEngine.train_batch, '_stapo_hook', False)\n"
        "stapo.engines.verl.install_engine_hook()\n"
        "assert stapo.engines.verl.engine_hook._VERL_TRAIN_BATCH.__module__ == 'verl.workers.engine.base'\n"
        "print('ok')\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


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
    loss, metrics = ppo_loss(cfg, out, data)
    loss.backward()
    # map the padded [B, T] positions to the flat leaf: position of token (i, t)
    from verl.workers.utils.padding import no_padding_2_padding

    index = no_padding_2_padding(torch.arange(flat.numel(), dtype=torch.float64), data).long()
    grads = flat.grad[index]
    assert torch.all(grads[expected] == 0)
    vanilla_cfg = make_actor_config("vanilla")
    data2, out2, flat2 = make_micro_batch(lp, old, adv, ent, mask)
    ppo_loss(vanilla_cfg, out2, data2)[0].backward()
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
        loss, _ = ppo_loss(cfg, out, data)
        loss.backward()
        total += loss.item()
    return total, theta.grad.item()


@pytest.mark.parametrize("loss_mode,stapo_cfg", [("stapo", {"tau_p": 0.01, "tau_h": 0.5}),
                                                 ("20-entropy", {"top_entropy_quantile": 1.0})])
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
    hooked, _ = ppo_loss(cfg, out, data)
    data, out, _ = make_micro_batch(lp, old, adv, ent, mask)
    original, _ = verl_losses.ppo_loss(cfg, out, data)
    assert hooked.item() == original.item()
    # verl's logits-processor use of the same function (no model_output) goes straight through
    seen = []
    wrapped = with_entropy(lambda **kw: seen.append(kw) or "through")
    assert wrapped(student_logits=1, data=None) == "through" and seen == [{"student_logits": 1, "data": None}]


def test_missing_entropy_names_the_setting():
    lp, old, adv, ent, mask, _ = mini_batch()
    data, out, _ = make_micro_batch(lp, old, adv, ent, mask)
    del out["entropy"]
    with pytest.raises(ValueError, match="calculate_entropy"):
        ppo_loss(make_actor_config("stapo"), out, data)


def test_one_micro_batch_per_rank_renormalises_over_the_kept_tokens():
    """With verl's global info, a mini-batch that is one micro-batch on this rank (what the hook tells the
    loss) gets STAPO's exact denominator: the valid tokens minus the silenced ones (all-reduced over the
    ranks; one rank here), i.e. verl's vanilla on the kept tokens with verl's own count of them."""
    lp, old, adv, ent, mask, expected = mini_batch()
    cfg = make_actor_config("stapo", stapo={"tau_p": 0.01, "tau_h": 0.5})
    info = {"dp_size": 1, "batch_num_tokens": int(mask.sum()), "global_batch_size": 6}
    data, out, flat = make_micro_batch(lp, old, adv, ent, mask, global_info=info)
    loss, _ = ppo_loss(cfg, out, data, MiniBatchS2T(micro_batches=1))
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    vanilla = make_actor_config("vanilla")
    vanilla.global_batch_info.update(info, batch_num_tokens=int((mask & ~expected).sum()))
    ref, _ = get_policy_loss_fn("vanilla")(old, lp, adv, mask & ~expected, "token-mean", vanilla)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    # without the hook's word on the split, verl's count of every valid token stays the denominator
    data3, out3, _ = make_micro_batch(lp, old, adv, ent, mask, global_info=info)
    unknown, _ = ppo_loss(cfg, out3, data3)
    n, m = int(mask.sum()), int(expected.sum())
    assert unknown.item() == pytest.approx(ref.item() * (n - m) / n, rel=1e-6)


def test_mini_batch_scope_refuses_several_micro_batches_without_a_pre_pass():
    """A hooked engine that did not take the mini-batch's tau_h (it could not find the config, or split
    differently) must not silently fall back to per-micro-batch quantiles."""
    lp, old, adv, ent, mask, _ = mini_batch()
    cfg = make_actor_config("stapo", stapo={"tau_p": 0.01})
    state = MiniBatchS2T(micro_batches=None)
    data, out, _ = make_micro_batch(lp[:3], old[:3], adv[:3], ent[:3], mask[:3])
    ppo_loss(cfg, out, data, state)  # the first call cannot know yet
    data, out, _ = make_micro_batch(lp[3:], old[3:], adv[3:], ent[3:], mask[3:])
    with pytest.raises(RuntimeError, match="tau_h_scope=micro_batch"):
        ppo_loss(cfg, out, data, state)
    micro = make_actor_config("stapo", stapo={"tau_p": 0.01, "tau_h_scope": "micro_batch"})
    ppo_loss(micro, out, data, MiniBatchS2T(micro_batches=2, loss_calls=1))  # micro_batch scope: fine


def test_the_driver_keeps_pi_olds_entropies_for_decision_policy_old():
    """verl's driver (`RayPPOTrainer._compute_old_log_prob`) returns the old-log-prob pass's `entropys`, logs
    and drops them; the hook copies them to the actor batch's `old_entropys` when a stapo run decides on
    pi_old, and only then. (A stand-in for verl's ray_trainer module: it imports Ray's serving stack.)"""
    import types

    from stapo.engines.verl import engine_hook
    from stapo.engines.verl.entropy_channel import OLD_ENTROPY_KEY

    entropys = torch.rand(2, 3)

    class RayPPOTrainer:
        def __init__(self, actor):
            self.config = types.SimpleNamespace(actor_rollout_ref=types.SimpleNamespace(actor=actor))

        def _compute_old_log_prob(self, batch):
            return types.SimpleNamespace(batch={"old_log_probs": torch.zeros(2, 3), "entropys": entropys}), 0.5

    module = types.SimpleNamespace(RayPPOTrainer=RayPPOTrainer)
    engine_hook._patch_ray_trainer(module)
    engine_hook._patch_ray_trainer(module)  # idempotent
    for policy, loss_mode, kept in (("old", "stapo", True), ("current", "stapo", False), ("old", "vanilla", False)):
        stapo = {"decision_policy": policy} if loss_mode == "stapo" else None
        out, mfu = RayPPOTrainer(make_actor_config(loss_mode, stapo=stapo))._compute_old_log_prob(None)
        assert mfu == 0.5 and (OLD_ENTROPY_KEY in out.batch) == kept, (policy, loss_mode)
        if kept:
            assert torch.equal(out.batch[OLD_ENTROPY_KEY], entropys)
            assert out.batch[OLD_ENTROPY_KEY] is not entropys  # survives the driver's pop
