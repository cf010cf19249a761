"""STAPOTrainer's loss against real TRL and against stapo.core, on hand-built batches.

* tau_p = 0 (S2T can silence nothing): loss and gradients equal GRPOTrainer's for every mapped
  loss_type, with ratios away from 1 so clipping is exercised.
* 20-Entropy equals GRPOTrainer with top_entropy_quantile = 0.2.
* STAPO equals `stapo.core.stapo_loss` on the same tensors, and its denominator is the same whether
  the step is one micro-batch (exact in-loss count) or two (gradients rescaled at the step end).
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

from stapo.core import S2TSettings, stapo_loss
from stapo.engines.trl import STAPOConfig, STAPOTrainer

MAX_LEN = 6
ROWS = 4


def _reward(completions, **kwargs):
    return [0.0 for _ in completions]


def _common(tmp_path, **kw):
    return dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=kw.pop("per_device_train_batch_size", ROWS),
        num_generations=2,
        max_completion_length=MAX_LEN,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        bf16=False,  # float32 end to end: the 1e-6 comparisons are about the math, not bf16 rounding
        **kw,
    )


def _trainer(cls, cfg_cls, model_dir, tmp_path, **kw):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    if cfg_cls is STAPOConfig:  # TRL's own LM head on both sides: these tests are about the loss math
        kw.setdefault("fused_lm_head", False)
    args = cfg_cls(**_common(tmp_path, **kw))
    ds = Dataset.from_dict({"prompt": ["a", "b"]})
    trainer = cls(model=model, reward_funcs=_reward, args=args, train_dataset=ds, processing_class=tok)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps
    return trainer


def _batch(vocab: int, seed: int = 0, rows: int = ROWS, with_old: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    prompt_len = 3
    lengths = torch.tensor([MAX_LEN, 2, 4, 1, 5, 3, 6, 2][:rows])
    completion_mask = (torch.arange(MAX_LEN)[None, :] < lengths[:, None]).long()
    batch = {
        "prompt_ids": torch.randint(0, vocab, (rows, prompt_len), generator=g),
        "prompt_mask": torch.ones(rows, prompt_len, dtype=torch.long),
        "completion_ids": torch.randint(0, vocab, (rows, MAX_LEN), generator=g),
        "completion_mask": completion_mask,
        "advantages": torch.tensor([1.0, -0.5, 0.8, -1.2, 0.3, -0.7, 1.1, -0.2][:rows]),
        "num_items_in_batch": completion_mask.sum(),
    }
    if with_old:
        # old log-probs far enough from the current ones that ratios leave [1 - 0.2, 1 + 0.28]
        batch["old_per_token_logps"] = None  # filled per model in _with_old
        batch["_noise"] = 0.5 * torch.randn(rows, MAX_LEN, generator=g)
    return batch


def _with_old(trainer, batch):
    b = dict(batch)
    noise = b.pop("_noise", None)
    if noise is not None:
        with torch.no_grad():
            ids = torch.cat([b["prompt_ids"], b["completion_ids"]], 1)
            attn = torch.cat([b["prompt_mask"], b["completion_mask"]], 1)
            lp, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attn, MAX_LEN)
        b["old_per_token_logps"] = lp + noise
    else:
        b.pop("old_per_token_logps", None)
    return b


def _loss_and_grads(trainer, batch):
    trainer.model.zero_grad()
    trainer._buffered_inputs, trainer._step = [batch], 0  # the batch is one optimizer step, as TRL buffers it
    loss = trainer._compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _assert_same(a, b, atol=1e-6):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert torch.allclose(loss_a, loss_b, atol=atol, rtol=0), (float(loss_a), float(loss_b))
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=atol, rtol=1e-5), name


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["dapo", "bnpo", "grpo", "dr_grpo"])
def test_mask_off_matches_trl_loss_and_gradients(tiny_qwen3_dir, tmp_path, loss_type):
    clip = dict(epsilon=0.2, epsilon_high=0.28, loss_type=loss_type)
    ours = _trainer(STAPOTrainer, STAPOConfig, tiny_qwen3_dir, tmp_path / "a", method="stapo", tau_p=0.0, **clip)
    ref = _trainer(GRPOTrainer, GRPOConfig, tiny_qwen3_dir, tmp_path / "b", **clip)
    batch = _batch(ours.model.config.vocab_size)
    b_ours, b_ref = _with_old(ours, batch), _with_old(ref, batch)
    assert torch.equal(b_ours["old_per_token_logps"], b_ref["old_per_token_logps"])
    result = _loss_and_grads(ours, b_ours)
    _assert_same(result, _loss_and_grads(ref, b_ref))
    assert float(result[0]) != 0.0
    # clipping really happened in this batch (otherwise the test would not cover it)
    ours._finish_window(ours.model)
    clipped = ours._metrics["train"]["clip_ratio/region_mean"][-1]
    assert clipped > 0


@pytest.mark.slow
def test_twenty_entropy_matches_trl_top_entropy_quantile(tiny_qwen3_dir, tmp_path):
    ours = _trainer(STAPOTrainer, STAPOConfig, tiny_qwen3_dir, tmp_path / "a", method="20-entropy")
    ref = _trainer(
        GRPOTrainer, GRPOConfig, tiny_qwen3_dir, tmp_path / "b",
        epsilon=0.2, epsilon_high=0.28, loss_type="dapo", top_entropy_quantile=0.2,
    )
    batch = _batch(ours.model.config.vocab_size, seed=1)
    result = _loss_and_grads(ours, _with_old(ours, batch))
    _assert_same(result, _loss_and_grads(ref, _with_old(ref, batch)))
    ours._finish_window(ours.model)
    kept = ours._metrics["train"]["stapo/entropy_kept_frac"][-1]
    assert 0.0 < kept < 0.5


def _tensors(trainer, batch):
    with torch.no_grad():
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
        attn = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
        return trainer._get_per_token_logps_and_entropies(trainer.model, ids, attn, MAX_LEN, compute_entropy=True)[:2]


@pytest.mark.slow
def test_stapo_equals_core_stapo_loss(tiny_qwen3_dir, tmp_path):
    # a random model's entropies are near log V: the uncapped quantile over all valid tokens lets H decide
    literal = dict(tau_h_population="valid", tau_h_max=math.inf)
    trainer = _trainer(STAPOTrainer, STAPOConfig, tiny_qwen3_dir, tmp_path, method="stapo", tau_h_quantile=0.3,
                       **literal)
    batch = _with_old(trainer, _batch(trainer.model.config.vocab_size, seed=2, with_old=False))
    trainer._buffered_inputs, trainer._step = [batch], 0
    loss = trainer._compute_loss(trainer.model, batch).detach()
    logps, ent = _tensors(trainer, batch)
    valid = batch["completion_mask"].bool()
    ref, m = stapo_loss(logps.double(), logps.double(), batch["advantages"].double(), valid, ent.double(),
                        s2t=S2TSettings(tau_h_quantile=0.3, **literal))
    assert m["s2t_masked_count"] > 0  # the random model puts every token at p < 0.002: H decides
    assert torch.allclose(loss.double(), ref, atol=1e-6), (float(loss), float(ref))
    trainer._finish_window(trainer.model)
    assert trainer._metrics["train"]["stapo/s2t_masked_count"][-1] == float(m["s2t_masked_count"])


@pytest.mark.slow
def test_denominator_same_for_one_or_two_micro_batches(tiny_qwen3_dir, tmp_path):
    """An absolute tau_h decided per micro-batch on the current policy: GA=2 (deferred rescale at the step
    end) == GA=1 (exact in-loss count), gradients and logged loss."""
    probe = _trainer(STAPOTrainer, STAPOConfig, tiny_qwen3_dir, tmp_path / "p")
    batch = _batch(probe.model.config.vocab_size, seed=3, with_old=False)
    _, ent = _tensors(probe, batch)
    # an absolute threshold: the mask must not depend on how the step is split
    tau_h = float(torch.quantile(ent[batch["completion_mask"].bool()], 0.4))

    one = _trainer(STAPOTrainer, STAPOConfig, tiny_qwen3_dir, tmp_path / "a", tau_h=tau_h, max_grad_norm=1e9)
    one._tr_loss = torch.zeros(())
    one._buffered_inputs, one._step = [batch], 0
    loss_one = one._compute_loss(one.model, batch)
    loss_one.backward()
    one._tr_loss += loss_one.detach()
    one._get_grad_norm(one.model)

    two = _trainer(
        STAPOTrainer, STAPOConfig, tiny_qwen3_dir, tmp_path / "b",
        tau_h=tau_h, per_device_train_batch_size=ROWS // 2, gradient_accumulation_steps=2, max_grad_norm=1e9,
    )
    assert two._deferred_denominator() and not one._deferred_denominator()
    two._tr_loss = torch.zeros(())
    halves = [{k: (v[h] if k != "num_items_in_batch" else v) for k, v in batch.items()}
              for h in (slice(0, ROWS // 2), slice(ROWS // 2, ROWS))]
    two._buffered_inputs = halves
    for two._step, micro in enumerate(halves):
        loss = two._compute_loss(two.model, micro)
        loss.backward()
        two._tr_loss += loss.detach()
    two._clip_grad_norm(two.model)

    masked = one._metrics["train"]["stapo/s2t_masked_count"][-1]
    assert masked > 0 and two._metrics["train"]["stapo/s2t_masked_count"][-1] == masked
    assert two._metrics["train"]["stapo/denominator_scale"][-1] > 1.0
    assert torch.allclose(one._tr_loss, two._tr_loss, atol=1e-6)
    for (name, p1), (_, p2) in zip(one.model.named_parameters(), two.model.named_parameters()):
        assert torch.allclose(p1.grad, p2.grad, atol=1e-6, rtol=1e-5), name


def _window_step(trainer, batch, parts):
    """One optimizer step of `batch` split into `parts` micro-batches, as TRL feeds them (buffered slices)."""
    rows = batch["completion_ids"].shape[0]
    slices = [slice(i * rows // parts, (i + 1) * rows // parts) for i in range(parts)]
    micro = [{k: (v[sl] if k != "num_items_in_batch" else v) for k, v in batch.items()} for sl in slices]
    trainer._buffered_inputs = micro
    trainer._tr_loss = torch.zeros(())
    for i, mb in enumerate(micro):
        trainer._step = i  # TRL's micro-batch counter: the step starts where it is a multiple of GA
        loss = trainer._compute_loss(trainer.model, mb)
        loss.backward()
        trainer._tr_loss += loss.detach()
    trainer._clip_grad_norm(trainer.model)
    m = trainer._metrics["train"]
    return m["stapo/s2t_masked_count"][-1], m["stapo/entropy_threshold"][-1]


@pytest.mark.slow
def test_mini_batch_scope_same_decision_for_1_2_4_micro_batches(tiny_qwen3_dir, tmp_path):
    """The paper's scope: tau_h (the 75% quantile of the candidates' entropies) over the optimizer step.
    Split into 1, 2 or 4 micro-batches, the step silences the same tokens with the same threshold and
    gives the same gradients; the per-micro-batch scope does not (so the check can fail)."""
    rows = 8
    results = {}
    for scope in ("mini_batch", "micro_batch"):
        for parts in (1, 2, 4):
            t = _trainer(STAPOTrainer, STAPOConfig, tiny_qwen3_dir, tmp_path / f"{scope}{parts}", tau_h_scope=scope,
                         per_device_train_batch_size=rows // parts, gradient_accumulation_steps=parts,
                         max_grad_norm=1e9, temperature=0.05)  # sharpened: entropies spread, not all ~log V
            batch = _batch(t.model.config.vocab_size, seed=5, rows=rows, with_old=False)
            t.model.zero_grad()
            masked, threshold = _window_step(t, batch, parts)
            grads = {n: p.grad.detach().clone() for n, p in t.model.named_parameters() if p.grad is not None}
            results[scope, parts] = (masked, threshold, grads)
    masked, threshold, grads = results["mini_batch", 1]
    assert masked > 0
    for parts in (2, 4):
        m, thr, g = results["mini_batch", parts]
        assert m == masked and thr == pytest.approx(threshold, rel=1e-5)
        for name in grads:  # float32 noise of different batch shapes, relative to the gradient's scale
            scale = float(grads[name].abs().max())
            assert torch.allclose(g[name], grads[name], atol=1e-5 * scale, rtol=1e-4), name
    assert results["micro_batch", 1][:2] == pytest.approx((masked, threshold), rel=1e-5)  # one part: the same
    assert results["micro_batch", 4][1] != pytest.approx(threshold, rel=1e-3)


def test_steps_need_whole_micro_batches_of_one_generation(tmp_path):
    """The step's own token count (token-mean) and the mini-batch scope need each optimizer step's
    micro-batches in one generation; other loss types without S2T do not."""
    for method in ("stapo", "grpo"):
        with pytest.raises(ValueError,
                           match="steps_per_generation .3. must be a multiple of gradient_accumulation_steps .2."):
            STAPOConfig(**_common(tmp_path, method=method, gradient_accumulation_steps=2, steps_per_generation=3))
    STAPOConfig(**_common(tmp_path, method="grpo", loss_type="grpo", gradient_accumulation_steps=2,
                          steps_per_generation=3))
