"""`STAPOConfig.fused_lm_head`: stapo's LM head in TRL 1.16's fused-head slot.

* on and off give the same log-probs, entropies, loss and gradients (and both match a float64
  recomputation from the full logits);
* "on" really routes through `stapo.core.lm_head_logprobs_entropy` (a spy), only inside the
  trainer's call: TRL's slot is restored and a plain GRPOTrainer in the same process is untouched;
* auto turns it on for a plain Qwen3 and off for a softcapped model, where True is an error;
* a 1-step training run logs the same loss, entropy and gradient norm either way.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

import trl.trainer.utils as trl_utils
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

import stapo.core.lm_head as lm_head
from stapo.engines.trl import STAPOConfig, STAPOTrainer

# every test builds a real TRL trainer
pytestmark = pytest.mark.slow

T = 6  # completion length


def _reward(completions, completion_ids=None, **kwargs):
    return [float(ids[0] % 2 == 0) if len(ids) else 0.0 for ids in completion_ids]


def _trainer(model_dir, tmp_path, cls=STAPOTrainer, cfg=STAPOConfig, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2, max_completion_length=T,
                use_cpu=True, bf16=False, report_to=[], save_strategy="no", temperature=0.7)
    base.update(kw)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ds = Dataset.from_dict({"prompt": ["a", "b"]})
    trainer = cls(model=model, reward_funcs=_reward, args=cfg(**base), train_dataset=ds,
                  processing_class=AutoTokenizer.from_pretrained(model_dir))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def _batch(vocab):
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([T, 2, 4, 5])
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    return {
        "prompt_ids": torch.randint(0, vocab, (4, 3), generator=g),
        "prompt_mask": torch.ones(4, 3, dtype=torch.long),
        "completion_ids": torch.randint(0, vocab, (4, T), generator=g),
        "completion_mask": mask,
        "advantages": torch.tensor([1.0, -0.5, 0.8, -1.2]),
        "num_items_in_batch": mask.sum(),
    }


def _logps_entropies(trainer, batch):
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attn = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    lp, ent, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attn, T, compute_entropy=True)
    return lp, ent


def _loss_and_grads(trainer, batch):
    trainer.model.zero_grad()
    trainer._buffered_inputs, trainer._step = [dict(batch)], 0  # one optimizer step, as TRL buffers it
    loss = trainer._compute_loss(trainer.model, dict(batch))
    loss.backward()
    trainer._window = None
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def test_on_and_off_agree_and_match_float64(tiny_qwen3_dir, tmp_path):
    trainer = _trainer(tiny_qwen3_dir, tmp_path, tau_h_quantile=0.25)
    assert trainer.use_stapo_lm_head is True  # auto, float32 Qwen3 on CPU
    batch = _batch(trainer.model.config.vocab_size)
    valid = batch["completion_mask"].bool()

    with torch.no_grad():  # float64 reference from the full logits
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
        attn = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
        logits = trainer.model(input_ids=ids, attention_mask=attn).logits[:, -T - 1 : -1].double() / 0.7
        logp_all = torch.log_softmax(logits, -1)
        ref_lp = logp_all.gather(-1, batch["completion_ids"][..., None]).squeeze(-1)
        ref_ent = -(logp_all.exp() * logp_all).sum(-1)

    on = _logps_entropies(trainer, batch)
    loss_on, grads_on = _loss_and_grads(trainer, batch)
    trainer.use_stapo_lm_head = False
    off = _logps_entropies(trainer, batch)
    loss_off, grads_off = _loss_and_grads(trainer, batch)

    for (lp, ent) in (on, off):
        assert torch.allclose(lp[valid].double(), ref_lp[valid], atol=1e-5, rtol=0)
        assert torch.allclose(ent[valid].double(), ref_ent[valid], atol=1e-5, rtol=0)
    assert torch.allclose(on[0][valid], off[0][valid], atol=1e-5, rtol=0)
    assert torch.allclose(on[1][valid], off[1][valid], atol=1e-5, rtol=0)
    assert abs(float(loss_on) - float(loss_off)) < 1e-5 and float(loss_on) != 0.0
    assert grads_on.keys() == grads_off.keys() and len(grads_on) > 10
    for name in grads_on:
        assert torch.allclose(grads_on[name], grads_off[name], atol=1e-5, rtol=1e-4), name
    assert any(float(g.abs().max()) > 1e-4 for g in grads_on.values())  # gradients are not trivially zero


def test_switch_routes_through_stapo_head_only_inside_the_trainer(tiny_qwen3_dir, tmp_path, monkeypatch):
    calls = []
    real = lm_head.lm_head_logprobs_entropy

    def spy(hidden, weight, targets, **kw):
        calls.append(tuple(hidden.shape))
        return real(hidden, weight, targets, **kw)

    monkeypatch.setattr(lm_head, "lm_head_logprobs_entropy", spy)
    trl_head = trl_utils._ChunkedLogProbFunction
    trainer = _trainer(tiny_qwen3_dir, tmp_path / "on")
    batch = _batch(trainer.model.config.vocab_size)
    lp, ent = _logps_entropies(trainer, batch)
    # hidden states of every next-token position (TRL scores all of them off Triton devices), never logits
    assert calls == [(4 * (3 + T - 1), trainer.model.config.hidden_size)] and ent is not None
    assert trl_utils._ChunkedLogProbFunction is trl_head  # restored after the call

    calls.clear()
    trainer.use_stapo_lm_head = False
    _logps_entropies(trainer, batch)
    assert calls == []
    plain = _trainer(tiny_qwen3_dir, tmp_path / "trl", cls=GRPOTrainer, cfg=GRPOConfig, loss_type="dapo", beta=0.0)
    _logps_entropies(plain, batch)
    assert calls == []
    off = _trainer(tiny_qwen3_dir, tmp_path / "off", fused_lm_head=False)
    assert off.use_stapo_lm_head is False
    _logps_entropies(off, batch)
    assert calls == []


def test_auto_is_off_and_true_is_refused_for_softcapped_logits(tiny_qwen3_dir, tmp_path):
    trainer = _trainer(tiny_qwen3_dir, tmp_path)
    assert trainer._resolve_fused_lm_head(None) is True
    trainer.model.config.final_logit_softcapping = 30.0
    assert trainer._resolve_fused_lm_head(None) is False
    assert trainer._resolve_fused_lm_head(False) is False
    with pytest.raises(ValueError, match="fused_lm_head=True is not possible here: the model softcaps"):
        trainer._resolve_fused_lm_head(True)
    with pytest.raises(ValueError, match="fused_lm_head"):
        STAPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], fused_lm_head="yes")


def test_one_step_run_is_the_same_with_and_without_the_switch(tiny_qwen3_dir, tmp_path):
    logged = {}
    for switch in (True, False):
        out = tmp_path / str(switch)
        trainer = _trainer(tiny_qwen3_dir, out, fused_lm_head=switch, max_steps=1, logging_steps=1, seed=5,
                           learning_rate=1e-3, tau_h_quantile=0.25)
        assert trainer.use_stapo_lm_head is switch
        trainer.train()
        logged[switch] = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    on, off = logged[True], logged[False]
    for key in ("loss", "entropy", "grad_norm", "reward", "stapo/s2t_masked_count", "stapo/completion_tokens"):
        assert on[key] == pytest.approx(off[key], abs=1e-5, rel=1e-5), key
    assert on["grad_norm"] > 0
    # (The updated weights are not compared: Adam's first step is lr * g / (|g| + eps), which turns
    # 1e-9 differences of near-zero gradients into differences of order lr.)


def test_stapo_train_refuses_fused_head_on_a_softcapped_model_in_one_line(tiny_qwen3_dir, tmp_path, capsys):
    import shutil

    from stapo.cli import main

    model_dir = tmp_path / "softcapped"
    shutil.copytree(tiny_qwen3_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["final_logit_softcapping"] = 30.0
    (model_dir / "config.json").write_text(json.dumps(config))
    fields = dict(model=str(model_dir), output_dir=str(tmp_path / "run"), max_steps=1, eval_data="null",
                  train_data="synthetic:add1?n=8&seed=0", fused_lm_head="true", plots="false")
    rc = main(["train", "demo", *[f"{k}={v}" for k, v in fields.items()]])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "fused_lm_head=True is not possible here: the model softcaps its logits" in err
