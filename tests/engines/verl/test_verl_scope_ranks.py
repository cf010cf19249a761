"""tau_h_scope=mini_batch over two data-parallel ranks (two gloo processes): the plugin's pre-pass
(`mini_batch_s2t`, with a stand-in engine whose forward-only pass hands over fixed micro-batches) and its
loss through verl's `ppo_loss` give, on every rank, the threshold, the silenced count and (after FSDP's
average over the ranks) the gradient of the whole mini-batch decided at once in one process. The same
holds with one micro-batch per rank and no pre-pass (the loss gathers the quantile and all-reduces the
count). verl's FSDP engine itself cannot run two ranks on gloo (no reduce-scatter); it runs one rank in
test_verl_engine.py."""

from __future__ import annotations

import pytest
from verl_fakes import VERL_MODULE, VERL_SKIP_REASON

pytest.importorskip(VERL_MODULE, reason=VERL_SKIP_REASON)

import math
from functools import partial

import torch
from gloo_ranks import gloo_group, spawn_ranks
from verl_fakes import make_actor_config, make_micro_batch

SETTINGS = {"tau_p": 0.3}  # the paper's quantile rule (q 0.75 of the candidates) with many candidates


def mini_batch(seed=3, bsz=8, resp_len=6):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([6, 3, 5, 4, 6, 2, 5, 6])[:bsz]
    mask = torch.arange(resp_len)[None, :] < lengths[:, None]
    old = -torch.rand(bsz, resp_len, generator=g) * 3.0
    lp = old + 0.2 * torch.randn(bsz, resp_len, generator=g)
    adv = torch.tensor([1.0, -1.0, 0.5, 1.0, -0.5, 1.0, 2.0, -1.0])[:bsz, None].expand(bsz, resp_len).contiguous()
    ent = 0.2 + 2.0 * torch.rand(bsz, resp_len, generator=g)
    return lp * mask, old * mask, adv, ent * mask, mask


def whole_batch_reference():
    """One process, the whole mini-batch: the S2T decision, and STAPO's gradient w.r.t. a shared θ (every
    token's log-prob moves with θ) = verl's vanilla on the kept tokens with their own count."""
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    from stapo.core import S2TSettings, s2t_decision

    lp, old, adv, ent, mask = mini_batch()
    d = s2t_decision(lp, ent, adv, mask, S2TSettings(**SETTINGS))
    theta = torch.zeros((), requires_grad=True)
    cfg = make_actor_config("vanilla")
    kept = mask & ~d.spurious
    cfg.global_batch_info.update(dp_size=1, batch_num_tokens=int(kept.sum()), global_batch_size=8)
    loss, _ = get_policy_loss_fn("vanilla")(old, lp + theta * weight(lp), adv, kept, "token-mean", cfg)
    loss.backward()
    return float(d.threshold), int(d.n_spurious), float(theta.grad)


def weight(lp):
    return 1.0 + 0.5 * torch.cos(7.0 * lp.detach())  # a token-specific weight, independent of the split


class StandInEngine:
    """What `mini_batch_s2t` needs of a verl engine: a forward-only pass calling the loss function once per
    micro-batch (here fixed micro-batches) and the data-parallel group."""

    def __init__(self, micro_batches):
        self.micro_batches = micro_batches

    def infer_batch(self, data, loss_function=None):
        for mb_data, out, _ in self.micro_batches:
            loss_function(model_output=out, data=mb_data, dp_group=None)

    def get_data_parallel_group(self):
        import torch.distributed as dist

        return dist.group.WORLD


def _rank(rank, world, port, out_dir):
    with gloo_group(rank, world, port):
        for parts_per_rank in (2, 1):
            torch.save(_one_rank(rank, world, parts_per_rank), f"{out_dir}/rank{rank}_{parts_per_rank}.pt")


def _one_rank(rank, world, parts_per_rank):
    import torch.distributed as dist
    import verl.workers.utils.losses as verl_losses

    import stapo.engines.verl  # noqa: F401 - registers the losses
    from stapo.core import S2TSettings
    from stapo.engines.verl import MiniBatchS2T, mini_batch_s2t, with_entropy

    lp, old, adv, ent, mask = mini_batch()
    rows = torch.tensor_split(torch.arange(lp.shape[0]), world)[rank]
    info = {"dp_size": world, "batch_num_tokens": int(mask.sum()), "global_batch_size": lp.shape[0]}
    micro = [make_micro_batch(lp[r], old[r], adv[r], ent[r], mask[r], global_info=info)
             for r in torch.tensor_split(rows, parts_per_rank)]
    cfg = make_actor_config("stapo", stapo=SETTINGS)
    state = MiniBatchS2T(micro_batches=parts_per_rank)
    if parts_per_rank > 1:
        state.threshold, state.masked = mini_batch_s2t(StandInEngine(micro), None, S2TSettings(**SETTINGS))
    theta = torch.zeros((), requires_grad=True)
    thresholds, masked = [], 0.0
    loss_fn = with_entropy(partial(verl_losses.ppo_loss, config=cfg), state)
    for data, out, flat in micro:
        out["log_probs"] = flat.detach() + theta * weight(flat)
        loss, metrics = loss_fn(model_output=out, data=data, dp_group=dist.group.WORLD)
        loss.backward()
        thresholds.append(float(metrics["actor/s2t_entropy_threshold"].aggregate()))
        masked += float(metrics["actor/s2t_masked_count"].aggregate())
    grad = theta.grad.detach().clone()
    dist.all_reduce(grad)  # FSDP averages the ranks' gradients
    return {"thresholds": thresholds, "masked": masked, "grad": float(grad) / world, "state_masked": state.masked}


def test_two_ranks_take_the_whole_mini_batchs_decision(tmp_path):
    """Two micro-batches per rank (the pre-pass) and one per rank (no pre-pass), both over two gloo ranks."""
    spawn_ranks(_rank, 2, str(tmp_path))
    threshold, n_spurious, grad = whole_batch_reference()
    assert n_spurious > 0 and math.isfinite(threshold)
    for parts_per_rank in (2, 1):
        results = [torch.load(tmp_path / f"rank{r}_{parts_per_rank}.pt") for r in range(2)]
        for res in results:
            assert res["thresholds"] == pytest.approx([threshold] * parts_per_rank, rel=1e-6)
            assert res["grad"] == pytest.approx(grad, rel=1e-5)
            if parts_per_rank > 1:
                assert res["state_masked"] == n_spurious
        assert sum(res["masked"] for res in results) == n_spurious
    # each rank's own quantile would be another decision: the gathered one is not a rank's
    from stapo.core import S2TSettings, s2t_decision

    lp, old, adv, ent, mask = mini_batch()
    own = [float(s2t_decision(lp[r], ent[r], adv[r], mask[r], S2TSettings(**SETTINGS)).threshold)
           for r in torch.tensor_split(torch.arange(8), 2)]
    assert all(abs(t - threshold) > 1e-3 for t in own)
