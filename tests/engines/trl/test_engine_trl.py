"""STAPOConfig presets and validation; STAPOTrainer end to end on a tiny random Qwen3 (2 steps, resume)."""

from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

from datasets import Dataset
from transformers import AutoTokenizer

from stapo.core import PRESETS, S2TSettings, group_advantages
from stapo.engines.trl import STAPOConfig, STAPOTrainer

# ---- config ---------------------------------------------------------------------------------

EXPECTED = {  # method -> (loss_type, epsilon, epsilon_high, scale_rewards, top_entropy_quantile)
    "grpo": ("dapo", 0.2, 0.2, "group", 1.0),
    "dapo": ("dapo", 0.2, 0.28, "group", 1.0),
    "dr_grpo": ("dr_grpo", 0.2, 0.2, "none", 1.0),
    "20-entropy": ("dapo", 0.2, 0.28, "group", 0.2),
    "justrl": ("dapo", 0.2, 0.28, "group", 1.0),
    "stapo": ("dapo", 0.2, 0.28, "group", 1.0),
}


def _cfg(tmp_path, **kw):
    return STAPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], **kw)


@pytest.mark.parametrize("method", sorted(PRESETS))
def test_presets_map_to_trl_options(tmp_path, method):
    cfg = _cfg(tmp_path, method=method)
    got = (cfg.loss_type, cfg.epsilon, cfg.epsilon_high, cfg.scale_rewards, cfg.top_entropy_quantile)
    assert got == EXPECTED[method]
    assert cfg.beta == 0.0 and cfg.explicit_options == ()
    # every method carries STAPO's default thresholds: applied by stapo, diagnostic for the others
    assert (cfg.tau_p, cfg.tau_h, cfg.tau_h_quantile, cfg.tau_h_scope) == (0.002, None, 0.75, "mini_batch")
    assert cfg.s2t_settings == PRESETS[method].s2t_settings == S2TSettings()
    assert cfg.clip_ratio_c == PRESETS[method].clip_ratio_c  # dual clip: 10 for justrl / stapo, else none


def test_explicit_options_win_over_the_preset(tmp_path):
    # 0.2 equals TRL's default epsilon: still explicit, still kept
    cfg = _cfg(tmp_path, method="dapo", epsilon_high=0.2, loss_type="bnpo", scale_rewards=False)
    assert (cfg.epsilon_high, cfg.loss_type, cfg.scale_rewards) == (0.2, "bnpo", "none")
    assert set(cfg.explicit_options) == {"epsilon_high", "loss_type", "scale_rewards"}
    cfg = _cfg(tmp_path, method="stapo", tau_p=0.05, tau_h=0.3)
    assert (cfg.tau_p, cfg.tau_h) == (0.05, 0.3)
    cfg = _cfg(tmp_path, method="grpo", tau_p=0.05, tau_h=0.3)  # diagnostic thresholds for a baseline
    assert (cfg.tau_p, cfg.tau_h) == (0.05, 0.3)
    cfg = _cfg(tmp_path, method="stapo", tau_h_population="candidates", inert_warning_steps=0, clip_ratio_c=3.0)
    assert (cfg.tau_h_population, cfg.inert_warning_steps, cfg.clip_ratio_c) == ("candidates", 0, 3.0)
    assert cfg.s2t_settings.tau_h_population == "candidates"


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"method": "ppo"}, "method"),
        ({"tau_p": 1.5}, "tau_p"),
        ({"tau_p": -0.1}, "tau_p"),
        ({"tau_p": "0.01"}, "tau_p"),
        ({"tau_h": -1.0}, "tau_h"),
        ({"tau_h_quantile": 1.5}, "tau_h_quantile"),
        ({"tau_h_quantile": float("nan")}, "tau_h_quantile"),
        ({"tau_h_population": "all"}, "tau_h_population must be one of valid, low_prob, candidates"),
        ({"inert_warning_steps": -1}, "inert_warning_steps"),
        ({"clip_ratio_c": 1.0}, "clip_ratio_c"),
        ({"method": "grpo", "clip_ratio_c": "10"}, "clip_ratio_c"),
        ({"method": "dapo", "tau_p": 1.5}, "tau_p"),
        ({"method": "dapo", "top_entropy_quantile": 0.2}, "top_entropy_quantile"),
        ({"method": "20-entropy", "loss_type": "grpo"}, "loss_type"),
        ({"loss_type": "cispo"}, "loss_type"),
        ({"beta": 0.01}, "beta"),
        ({"delta": 2.0}, "delta"),
        ({"importance_sampling_level": "sequence"}, "importance_sampling_level"),
        ({"capture_rollouts_every": -1}, "capture_rollouts_every"),
    ],
)
def test_bad_config_names_the_field(tmp_path, kw, field):
    with pytest.raises(ValueError, match=field):
        _cfg(tmp_path, **kw)


def test_trainer_refuses_plain_grpo_config(tiny_qwen3_dir, tmp_path):
    from trl import GRPOConfig

    with pytest.raises(ValueError, match="STAPOConfig"):
        STAPOTrainer(model=str(tiny_qwen3_dir), reward_funcs=_reward,
                     args=GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[]))


# ---- training runs ----------------------------------------------------------------------------


def _reward(completions, completion_ids=None, **kwargs):
    """Deterministic and cheap: 1 when the first completion token id is even."""
    return [float(ids[0] % 2 == 0) if len(ids) else 0.0 for ids in completion_ids]


class RecordingTrainer(STAPOTrainer):
    """Checks every micro-batch loss against an independent float64 recomputation of STAPO."""

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        with torch.no_grad():
            ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
            attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
            t = inputs["completion_ids"].shape[1]
            logits = model(input_ids=ids, attention_mask=attn).logits[:, -t - 1 : -1].double() / self.temperature
            logp_all = torch.log_softmax(logits, -1)
            logp = logp_all.gather(-1, inputs["completion_ids"][..., None]).squeeze(-1)
            ent = -(logp_all.exp() * logp_all).sum(-1)
            valid = inputs["completion_mask"].bool()
            tau_h = torch.quantile(ent[valid], self.args.tau_h_quantile)
            adv = inputs["advantages"].double()[:, None].expand_as(logp)
            spurious = valid & (adv > 0) & (logp.exp() < self.args.tau_p) & (ent < tau_h)
            keep = valid & ~spurious
            # num_iterations = 1: ratio = 1, so every kept token contributes -A; denominator = kept tokens
            expected = -(adv * keep).sum() / keep.sum()
        self.checked.append((float(loss.detach()), float(expected), int(spurious.sum())))
        return loss


def _run_args(out, **kw):
    base = dict(
        output_dir=str(out),
        method="stapo",
        tau_h_quantile=0.25,  # a random model puts every token at p < tau_p: H decides, mask ~25% of A > 0
        tau_h_population="valid", tau_h_max=math.inf,  # the reference below: quantile of all valid tokens, uncapped
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=6,
        max_steps=2,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        use_cpu=True,
        bf16=False,
        report_to=[],
        logging_steps=1,
        save_steps=1,
        seed=7,
        capture_rollouts_every=1,
        capture_max_samples=3,
    )
    base.update(kw)
    return STAPOConfig(**base)


def _dataset():
    return Dataset.from_dict({"prompt": ["What is 2+3?", "Name a prime.", "Say hi.", "Count to 3."] * 4})


def _train(model_dir, args, cls=RecordingTrainer, resume=None):
    tok = AutoTokenizer.from_pretrained(model_dir)
    trainer = cls(model=str(model_dir), reward_funcs=_reward, args=args, train_dataset=_dataset(), processing_class=tok)
    trainer.checked = []
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.fixture(scope="module")
def two_step_run(tiny_qwen3_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return out, _train(tiny_qwen3_dir, _run_args(out))


@pytest.mark.slow
def test_two_step_run_loss_matches_float64_stapo(two_step_run):
    _, trainer = two_step_run
    assert len(trainer.checked) == 2
    for loss, expected, _ in trainer.checked:
        assert math.isclose(loss, expected, abs_tol=1e-5), (loss, expected)
    assert sum(masked for *_, masked in trainer.checked) > 0  # the mask did something
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logged] == [1, 2]
    for h, (loss, _, masked) in zip(logged, trainer.checked):
        assert math.isclose(h["loss"], loss, abs_tol=1e-6)
        assert h["stapo/s2t_masked_count"] == masked


@pytest.mark.slow
def test_two_step_run_logs_the_method_metrics(two_step_run):
    out, trainer = two_step_run
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["kind"] for line in lines] == ["train", "train", "summary"]
    lines = lines[:2]
    assert [line["step"] for line in lines] == [1, 2]
    required = [
        "loss", "reward", "reward_std", "stapo/accuracy", "completions/mean_length", "entropy",
        "stapo/s2t_masked_count", "stapo/s2t_masked_frac", "stapo/frac_low_prob", "stapo/frac_low_entropy",
        "stapo/entropy_threshold", "clip_ratio/low_mean", "clip_ratio/high_mean", "stapo/ratio_mean",
        "stapo/ratio_min", "stapo/ratio_max", "grad_norm", "stapo/zero_variance_group_frac", "learning_rate",
        "step_time", "stapo/tokens_per_s",
    ]
    for line, (_, _, masked) in zip(lines, trainer.checked):
        missing = [k for k in required if k not in line]
        assert not missing, missing
        n = line["stapo/completion_tokens"]
        assert line["stapo/s2t_masked_frac"] == pytest.approx(masked / n)
        assert line["stapo/loss_tokens"] == n - masked
        assert line["stapo/frac_low_prob"] == 1.0  # uniform-ish random model: p ~ 1/V < 0.01
        assert 0.0 < line["stapo/frac_low_entropy"] <= 0.5
        assert line["stapo/ratio_min"] == pytest.approx(1.0) and line["stapo/ratio_max"] == pytest.approx(1.0)
        assert line["stapo/tokens_per_s"] == pytest.approx(n / line["step_time"])
        assert 0.0 <= line["stapo/accuracy"] <= 1.0


@pytest.mark.slow
def test_two_step_run_writes_checkpoints_and_rollouts(two_step_run):
    out, trainer = two_step_run
    for step in (1, 2):
        ckpt = out / f"checkpoint-{step}"
        assert (ckpt / "model.safetensors").is_file() and (ckpt / "trainer_state.json").is_file()
    from stapo.data.rollouts import read_rollouts

    r = read_rollouts(out)
    assert sorted(r.metadata) == [1, 2]
    assert r.metadata[1]["method"] == "stapo" and r.metadata[1]["tau_p"] == 0.002
    import pyarrow.parquet as pq

    table = pq.read_table(out / "rollouts" / "step_00000001.parquet").to_pylist()
    assert len(table) == 3
    for row in table:
        n = len(row["token_id"])
        assert n == len(row["logprob"]) == len(row["entropy"]) == len(row["collision"]) == len(row["s2t"])
        for lp, h, c in zip(row["logprob"], row["entropy"], row["collision"]):
            assert lp <= 0 and h >= 0
            assert math.exp(-h) <= c * (1 + 1e-4) and c <= 1.0  # Σπ² >= exp(-H) (Jensen)
        assert row["reward"] in (0.0, 1.0)
        assert "".join(row["token_text"]) == row["completion"]


@pytest.mark.slow
def test_resume_continues_without_duplicate_steps(tiny_qwen3_dir, two_step_run, tmp_path):
    out, first = two_step_run
    import shutil

    run = tmp_path / "run"
    shutil.copytree(out, run)
    shutil.rmtree(run / "checkpoint-2")
    resumed = _train(tiny_qwen3_dir, _run_args(run), resume=str(run / "checkpoint-1"))
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(line["step"], line["kind"]) for line in lines] == [(1, "train"), (2, "train"), (2, "summary")]
    assert len(resumed.checked) == 1  # only step 2 ran
    # same RNG state, same data: step 2 is reproduced, and so are the weights it produced
    assert resumed.checked[0] == pytest.approx(first.checked[1], abs=1e-6)
    from safetensors.torch import load_file

    a = load_file(str(out / "checkpoint-2" / "model.safetensors"))
    b = load_file(str(run / "checkpoint-2" / "model.safetensors"))
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


@pytest.mark.slow
def test_trl_advantages_equal_core_group_advantages(tiny_qwen3_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_qwen3_dir)
    args = _run_args(tmp_path, num_generations=4, capture_rollouts_every=0, metrics_jsonl=False)
    trainer = STAPOTrainer(
        model=str(tiny_qwen3_dir), reward_funcs=_reward, args=args, train_dataset=_dataset(), processing_class=tok
    )
    trainer.model.train()
    prompts = [{"prompt": p} for p in ["What is 2+3?", "Name a prime."] for _ in range(4)]
    for scale, core_scale in (("group", "group"), ("none", "none"), ("batch", "batch")):
        trainer.scale_rewards = scale
        torch.manual_seed(3)
        out = trainer._generate_and_score_completions(prompts)
        ids = [row[m.bool()].tolist() for row, m in zip(out["completion_ids"], out["completion_mask"])]
        rewards = torch.tensor(_reward(None, completion_ids=ids))
        assert torch.equal(out["stapo_rewards"].float(), rewards)
        expected = group_advantages(rewards, 4, scale=core_scale, eps=1e-4)  # TRL's epsilon
        assert torch.allclose(out["advantages"].float(), expected, atol=1e-6), (scale, out["advantages"], expected)
