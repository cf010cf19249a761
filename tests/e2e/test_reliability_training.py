"""Training-state reliability of the TRL engine on a tiny random Qwen3 (CPU, float32):

* checkpoints are published atomically: a crash between the weight write and the rename leaves no
  `checkpoint-N`, `--resume` picks the previous one, and the resumed run reproduces the lost step;
* non-finite steps are skipped (parameters untouched), counted and logged; K in a row stop the run
  with `NonFiniteTrainingError` and the newest checkpoint is the last finite step's;
* a SIGKILLed `stapo train` resumed with `--resume` logs exactly the metrics of an uninterrupted run
  (slow; subprocesses).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoTokenizer, TrainerCallback

import stapo.engines.trl.trainer as engine
from stapo.engines.trl import STAPOConfig, STAPOTrainer
from stapo.engines.trl.nonfinite import NonFiniteGuard, NonFiniteTrainingError
from stapo.rundir import last_checkpoint


def _reward(completions, completion_ids=None, **kwargs):
    return [float(ids[0] % 2 == 0) if len(ids) else 0.0 for ids in completion_ids]


def _args(out, **kw):
    base = dict(
        output_dir=str(out), method="stapo", tau_h_quantile=0.25, per_device_train_batch_size=4,
        num_generations=2, max_completion_length=4, max_steps=3, learning_rate=1e-3,
        lr_scheduler_type="constant", use_cpu=True, bf16=False, report_to=[], logging_steps=1,
        save_steps=1, seed=7, capture_rollouts_every=1, capture_max_samples=2,
    )
    base.update(kw)
    return STAPOConfig(**base)


def _trainer(model_dir, args, cls=STAPOTrainer):
    tok = AutoTokenizer.from_pretrained(model_dir)
    ds = Dataset.from_dict({"prompt": ["What is 2+3?", "Name a prime.", "Say hi.", "Count to 3."] * 4})
    return cls(model=str(model_dir), reward_funcs=_reward, args=args, train_dataset=ds, processing_class=tok)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


class ParamSnapshots(TrainerCallback):
    """Parameters after every optimizer step: {global_step: {name: tensor}}."""

    def __init__(self):
        self.after = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters()}


# ---- non-finite guard ---------------------------------------------------------------------------


def test_nonfinite_guard_counts_and_stops_at_k(tmp_path):
    g = NonFiniteGuard(limit=3)
    nan, inf = float("nan"), float("inf")
    # (loss, grad_norm) -> take the step?
    assert g.check(1.0, 2.0, step=1) is True
    assert g.check(nan, 2.0, step=2) is False and (g.total, g.consecutive) == (1, 1)
    assert g.check(1.0, inf, step=3) is False and (g.total, g.consecutive) == (2, 2)
    assert g.check(0.5, 0.1, step=4) is True and (g.total, g.consecutive) == (2, 0)
    assert g.check(-inf, 1.0, step=5) is False
    assert g.check(nan, nan, step=6) is False
    with pytest.raises(NonFiniteTrainingError, match=r"stopped at step 7: 3 consecutive step.*max_nonfinite_steps=3"):
        g.check(1.0, nan, step=7)
    assert (g.total, g.consecutive) == (5, 3)
    g.save(tmp_path)
    h = NonFiniteGuard(limit=3)
    h.load(tmp_path)
    assert (h.total, h.consecutive) == (5, 3)
    h.load(tmp_path / "no-such-checkpoint")  # a checkpoint without the file keeps the counters
    assert h.total == 5


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_max_nonfinite_steps_is_validated(tmp_path, value):
    with pytest.raises(ValueError, match="max_nonfinite_steps"):
        _args(tmp_path, max_nonfinite_steps=value)


# ---- atomic checkpoints in a run -------------------------------------------------------------------


def test_crash_before_rename_leaves_no_checkpoint_and_resume_reproduces_it(tiny_qwen3_dir, tmp_path, monkeypatch):
    # Uninterrupted reference: 3 steps, at most 2 checkpoints kept (the rotation sees only published ones).
    ref_dir = tmp_path / "ref"
    ref = _trainer(tiny_qwen3_dir, _args(ref_dir, save_total_limit=2))
    ref.train()
    assert sorted(p.name for p in ref_dir.iterdir() if "checkpoint" in p.name) == ["checkpoint-2", "checkpoint-3"]
    assert json.loads((ref_dir / "checkpoint-3" / "stapo_state.json").read_text())["nonfinite_total"] == 0

    # Same run, killed (an exception) after checkpoint 2's files are written, before its rename.
    out = tmp_path / "run"
    real_publish = engine.publish_checkpoint

    def crash_at_step_2(staged, final):
        if final.name == "checkpoint-2":
            raise KeyboardInterrupt("simulated crash")
        real_publish(staged, final)

    monkeypatch.setattr(engine, "publish_checkpoint", crash_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        _trainer(tiny_qwen3_dir, _args(out)).train()
    monkeypatch.setattr(engine, "publish_checkpoint", real_publish)
    staged = out / ".tmp-checkpoint-2" / "checkpoint-2"
    assert (staged / "model.safetensors").is_file() and (staged / "trainer_state.json").is_file()
    assert not (out / "checkpoint-2").exists()
    assert last_checkpoint(out) == out / "checkpoint-1"
    assert [m["step"] for m in _metrics(out)] == [1, 2]  # step 2 was logged before its checkpoint

    resumed = _trainer(tiny_qwen3_dir, _args(out))
    resumed.train(resume_from_checkpoint=str(last_checkpoint(out)))
    assert not staged.parent.exists()  # the leftover staging directory is cleaned up
    lines = _metrics(out)
    assert [(m["step"], m["kind"]) for m in lines] == [(1, "train"), (2, "train"), (3, "train"), (3, "summary")]
    for got, want in zip(lines[:3], _metrics(ref_dir)[:3]):
        for key in ("loss", "reward", "entropy", "grad_norm", "stapo/s2t_masked_count"):
            assert got[key] == pytest.approx(want[key], abs=1e-6), (got["step"], key)
    a = load_file(str(ref_dir / "checkpoint-3" / "model.safetensors"))
    b = load_file(str(out / "checkpoint-3" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


# ---- non-finite steps ----------------------------------------------------------------------------


class NaNLossTrainer(STAPOTrainer):
    """Multiplies the loss of the optimizer steps in `nan_steps` by NaN (so every gradient is NaN)."""

    nan_steps: tuple[int, ...] = ()

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        return loss * float("nan") if self.state.global_step + 1 in self.nan_steps else loss


def test_one_nonfinite_step_is_skipped_and_training_continues(tiny_qwen3_dir, tmp_path):
    out = tmp_path / "run"
    trainer = _trainer(tiny_qwen3_dir, _args(out, max_nonfinite_steps=2), cls=NaNLossTrainer)
    trainer.nan_steps = (2,)
    snaps = ParamSnapshots()
    trainer.add_callback(snaps)
    trainer.train()
    assert trainer.state.global_step == 3
    # step 2 changed nothing (AdamW with lr 1e-3 would move every parameter), steps 1 and 3 did
    assert all(torch.equal(snaps.after[1][n], snaps.after[2][n]) for n in snaps.after[1])
    assert not all(torch.equal(snaps.after[2][n], snaps.after[3][n]) for n in snaps.after[2])
    assert all(torch.isfinite(p).all() for p in snaps.after[3].values())
    lines = [m for m in _metrics(out) if m["kind"] == "train"]
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert [m["stapo/nonfinite_steps"] for m in lines] == [0.0, 1.0, 1.0]
    assert lines[1]["grad_norm"] is None and math.isfinite(lines[2]["grad_norm"])
    # no checkpoint of the skipped step; the others carry the counter
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-3"]
    assert json.loads((out / "checkpoint-3" / "stapo_state.json").read_text())["nonfinite_total"] == 1


def test_k_nonfinite_steps_in_a_row_stop_with_the_last_good_checkpoint(tiny_qwen3_dir, tmp_path):
    out = tmp_path / "run"
    trainer = _trainer(tiny_qwen3_dir, _args(out, max_steps=5, max_nonfinite_steps=2), cls=NaNLossTrainer)
    trainer.nan_steps = (2, 3, 4, 5)
    with pytest.raises(NonFiniteTrainingError, match=r"stopped at step 3: 2 consecutive step.*max_nonfinite_steps=2"):
        trainer.train()
    assert sorted(p.name for p in out.glob("*checkpoint-*")) == ["checkpoint-1"]
    assert last_checkpoint(out) == out / "checkpoint-1"
    weights = load_file(str(out / "checkpoint-1" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert [m["step"] for m in _metrics(out)] == [1, 2]  # the stopping step is reported by the error


def test_stapo_train_prints_the_nonfinite_stop_as_one_line(tiny_qwen3_dir, tmp_path, capsys, monkeypatch):
    from stapo.cli import main

    real = STAPOTrainer._compute_loss
    monkeypatch.setattr(STAPOTrainer, "_compute_loss", lambda self, m, i: real(self, m, i) * float("nan"))
    out = tmp_path / "run"
    fields = dict(model=str(tiny_qwen3_dir), output_dir=str(out), max_steps=3, save_steps=1,
                  max_completion_length=4, per_device_train_batch_size=4, num_generations=4,
                  train_data="synthetic:add1?n=8&seed=0", eval_data="null", plots="false",
                  max_nonfinite_steps=1)
    rc = main(["train", "demo", *[f"{k}={v}" for k, v in fields.items()]])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1
    assert errors[0].startswith(
        "stapo train: error: training stopped at step 1: 1 consecutive step(s) had a non-finite")
    assert not list(out.glob("*checkpoint-*"))


# ---- SIGKILL and --resume (subprocesses) ------------------------------------------------------------

KILL_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    import torch
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    hang = os.environ.get("STAPO_TEST_HANG")  # "<where>:<step>" (this test only; the script patches itself)
    if hang:
        where, step = hang.split(":")
        step = int(step)
        marker = os.environ["STAPO_TEST_MARKER"]

        def stall():
            open(marker, "w").close()
            time.sleep(600)

        if where == "generation":  # inside step `step`, after its prompts were sampled, before its loss
            import stapo.train
            make = stapo.train.make_reward_function

            def make_stalling(run):
                reward, calls = make(run), [0]

                def stalling(*args, **kwargs):
                    calls[0] += 1
                    if calls[0] == step:
                        stall()
                    return reward(*args, **kwargs)

                return stalling

            stapo.train.make_reward_function = make_stalling
        else:  # "checkpoint": while checkpoint `step` is being written (weights and optimizer already on disk)
            from stapo.engines.trl import STAPOTrainer
            save_rng = STAPOTrainer._save_rng_state

            def stalling_save(self, output_dir):
                if self.state.global_step == step:
                    stall()
                return save_rng(self, output_dir)

            STAPOTrainer._save_rng_state = stalling_save
    from stapo.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def _stapo_train(script, model_dir, out, resume=False, hang=None, marker=None):
    fields = dict(model=str(model_dir), output_dir=str(out), max_steps=4, save_steps=1, seed=3,
                  max_completion_length=4, per_device_train_batch_size=4, num_generations=2,
                  train_data="synthetic:add1?n=16&seed=0", eval_data="null", plots="false",
                  capture_rollouts_every=1, capture_max_samples=2, learning_rate=1e-3,
                  lr_scheduler_type="constant", tau_h_quantile=0.25, dataloader_num_workers=0)
    cmd = [sys.executable, str(script), "train", "demo", *[f"{k}={v}" for k, v in fields.items()]]
    if resume:
        cmd.append("--resume")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("STAPO_TEST_HANG", None)
    if hang:
        env.update(STAPO_TEST_HANG=hang, STAPO_TEST_MARKER=str(marker))
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=120):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]


@pytest.fixture(scope="module")
def kill_setup(tiny_qwen3_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    script = root / "train_script.py"
    script.write_text(KILL_SCRIPT)
    ref = root / "ref"
    _finish(_stapo_train(script, tiny_qwen3_dir, ref))
    return script, ref


@pytest.mark.slow
@pytest.mark.parametrize("where", ["generation", "checkpoint"])
def test_sigkill_then_resume_equals_an_uninterrupted_run(tiny_qwen3_dir, kill_setup, tmp_path, where):
    from stapo.data.rollouts import read_rollouts

    script, ref = kill_setup
    out, marker, kill_step = tmp_path / "run", tmp_path / "stalled", 3
    proc = _stapo_train(script, tiny_qwen3_dir, out, hang=f"{where}:{kill_step}", marker=marker)
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline, "the run never reached the kill point"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    assert last_checkpoint(out) == out / f"checkpoint-{kill_step - 1}"
    assert not (out / f"checkpoint-{kill_step}").exists()
    if where == "checkpoint":  # step 3 was logged and captured, its checkpoint only staged
        assert (out / f".tmp-checkpoint-{kill_step}" / f"checkpoint-{kill_step}" / "model.safetensors").is_file()
        assert [m["step"] for m in _metrics(out)] == [1, 2, 3]
    else:
        assert [m["step"] for m in _metrics(out)] == [1, 2]

    _finish(_stapo_train(script, tiny_qwen3_dir, out, resume=True))
    got, want = _metrics(out), _metrics(ref)
    assert [(m["step"], m["kind"]) for m in got] == [(m["step"], m["kind"]) for m in want]
    assert [m["step"] for m in got if m["kind"] == "train"] == [1, 2, 3, 4]
    keys = ("loss", "reward", "reward_std", "entropy", "grad_norm", "stapo/s2t_masked_count",
            "stapo/completion_tokens", "stapo/entropy_threshold", "stapo/nonfinite_steps")
    for g, w in zip(got, want):
        if g["kind"] != "train":
            continue
        for key in keys:
            assert g[key] == pytest.approx(w[key], abs=1e-6, rel=1e-6), (g["step"], key, g[key], w[key])

    # rollouts: every step once, each with its 2 samples, equal to the uninterrupted run's
    r_got, r_want = read_rollouts(out), read_rollouts(ref)
    assert sorted(r_got.metadata) == sorted(r_want.metadata) == [1, 2, 3, 4]
    import pyarrow.parquet as pq

    for step in (1, 2, 3, 4):
        name = f"rollouts/step_{step:08d}.parquet"
        a, b = pq.read_table(out / name).to_pylist(), pq.read_table(ref / name).to_pylist()
        assert [row["sample"] for row in a] == [0, 1]
        assert [row["token_id"] for row in a] == [row["token_id"] for row in b]
        assert [row["completion"] for row in a] == [row["completion"] for row in b]
        for ra, rb in zip(a, b):
            assert ra["logprob"] == pytest.approx(rb["logprob"], abs=1e-5)
    assert not list(out.glob(".tmp-*"))
    fa = load_file(str(ref / "checkpoint-4" / "model.safetensors"))
    fb = load_file(str(out / "checkpoint-4" / "model.safetensors"))
    assert all(torch.allclose(fa[k], fb[k], atol=1e-6) for k in fa)


# ---- checkpoint rotation and the train_loss of a resumed run ---------------------------------------


def test_rotation_never_deletes_checkpoints_this_run_did_not_write(tiny_qwen3_dir, tmp_path):
    out = tmp_path / "run"
    for step in (4, 5):  # another run's: higher steps, and older files than this run's
        ckpt = out / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        (ckpt / "trainer_state.json").write_text("{}")
    trainer = _trainer(tiny_qwen3_dir, _args(out, max_steps=2, save_total_limit=1, capture_rollouts_every=0))
    trainer.train()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-5"]


def test_logged_loss_sum_weights_each_log_by_the_steps_it_covers():
    from stapo.train import logged_loss_sum

    history = [{"loss": 0.5, "step": 1}, {"loss": 0.2, "step": 3}, {"eval_heldout_accuracy": 0.9, "step": 3},
               {"loss": 1.0, "step": 4}, {"train_loss": 7.0, "step": 4}]
    assert logged_loss_sum(history, 3) == pytest.approx(0.5 * 1 + 0.2 * 2, abs=1e-15)
    assert logged_loss_sum(history, 4) == pytest.approx(0.5 + 0.4 + 1.0, abs=1e-15)
    assert logged_loss_sum(history, 0) == 0.0
