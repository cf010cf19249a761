"""`stapo train` and the output directory, through the command line (subprocesses): an existing run or
the user's files are never overwritten without `--resume` / `--overwrite`, bad output paths, empty
configs, a full disk, the train_loss of a resumed run, one run at a time in a directory (its lock), and
a refused start that leaves nothing behind. Every error is one line, no traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stapo import rundir

pytest.importorskip("torch")
pytest.importorskip("trl")

SRC = Path(__file__).resolve().parents[2] / "src"


# `stapo` with a reward that varies inside every group (the first completion token's parity), so the
# advantages and, with S2T masking some tokens, the losses are not all zero on a random tiny model.
PARITY_REWARD_STAPO = """
import sys
import stapo.train

def parity_reward(run):
    def reward(completions, completion_ids=None, **kwargs):
        return [float(ids[0] % 2 == 0) if len(ids) else 0.0 for ids in completion_ids]
    return reward

stapo.train.make_reward_function = parity_reward
from stapo.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _stapo(*argv, cwd=None, parity_reward=False) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    entry = ["-c", PARITY_REWARD_STAPO] if parity_reward else ["-m", "stapo"]
    return subprocess.run([sys.executable, *entry, *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def _fields(model_dir, out, **extra) -> list[str]:
    fields = dict(model=str(model_dir), output_dir=str(out), max_steps=2, save_steps=1, seed=3,
                  max_completion_length=4, per_device_train_batch_size=4, num_generations=2,
                  train_data="synthetic:add1?n=16&seed=0", eval_data="null", plots="false",
                  learning_rate=1e-3, lr_scheduler_type="constant", tau_h="null", tau_h_quantile=0.25,
                  tau_h_population="valid", tau_h_max=".inf",  # a random model: H ~ log V, so no cap
                  dataloader_num_workers=0)
    fields.update(extra)
    return [f"{k}={v}" for k, v in fields.items()]


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("stapo train: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def checkpointed_run(tiny_qwen3_dir, tmp_path_factory) -> Path:
    """A finished 2-step run with checkpoints 1 and 2 (demo's save_total_limit is 2)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    proc = _stapo("train", "demo", *_fields(tiny_qwen3_dir, out), parity_reward=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


# ---- 1. an existing run or the user's files ---------------------------------------------------------


@pytest.mark.slow
def test_second_train_without_resume_is_refused_and_touches_nothing(tiny_qwen3_dir, checkpointed_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(checkpointed_run, out)
    before = _tree(out)
    proc = _stapo("train", "demo", *_fields(tiny_qwen3_dir, out, max_steps=1))
    assert proc.returncode == 2
    line = _one_error_line(proc)
    assert line.startswith(f"stapo train: error: output_dir {out} is not empty (it holds a previous run: ")
    assert "--resume" in line and "new output_dir" in line and "--overwrite" in line
    assert "method=" not in proc.stdout  # refused before the model was loaded
    assert _tree(out) == before  # checkpoints 1 and 2, metrics.jsonl: byte for byte

    both = _stapo("train", "demo", "--resume", "--overwrite", *_fields(tiny_qwen3_dir, out))
    assert both.returncode == 2 and "pass one of them" in _one_error_line(both)
    assert _tree(out) == before


@pytest.mark.slow
def test_overwrite_replaces_the_previous_run_and_keeps_other_files(tiny_qwen3_dir, checkpointed_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(checkpointed_run, out)
    (out / "notes.txt").write_text("mine")
    proc = _stapo("train", "demo", "--overwrite", *_fields(tiny_qwen3_dir, out, max_steps=1))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]  # the old checkpoint-2 is gone
    assert [m["step"] for m in _metrics(out) if m["kind"] == "train"] == [1]
    assert (out / "notes.txt").read_text() == "mine"


def test_a_directory_of_the_users_files_is_refused(tiny_qwen3_dir, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    for extra in ([], ["--resume"]):
        proc = _stapo("train", "demo", *extra, *_fields(tiny_qwen3_dir, out))
        assert proc.returncode == 2
        assert f"output_dir {out}" in _one_error_line(proc)
        assert _tree(out) == {"thesis.tex": b"years of work"}


# ---- 2. output_dir a file, or under a file ----------------------------------------------------------


def test_output_dir_that_is_a_file_or_under_a_file_is_one_line(tiny_qwen3_dir, tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    for out, why in ((f, "exists and is not a directory"), (f / "run", f"{f} is a file, not a directory")):
        proc = _stapo("train", "demo", *_fields(tiny_qwen3_dir, out))
        assert proc.returncode == 2
        assert why in _one_error_line(proc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"] and f.read_text() == "x"


# ---- 2. a full disk ------------------------------------------------------------------------------


@pytest.mark.slow
def test_disk_full_while_saving_a_checkpoint_is_one_line_and_keeps_the_earlier_one(tiny_qwen3_dir, tmpfs):
    # 90 MiB: one checkpoint of the tiny model (~60 MB with the optimizer) fits, two do not
    small_tmpfs = tmpfs("90m")
    from safetensors.torch import load_file

    out = small_tmpfs / "run"
    proc = _stapo("train", "demo", *_fields(tiny_qwen3_dir, out, max_steps=3, save_total_limit=5))
    assert proc.returncode == 2
    line = _one_error_line(proc)
    assert line.startswith("stapo train: error: ") and "no space left on device" in line and str(out) in line
    assert "--resume" in line
    # checkpoint-1 is whole; the one that did not fit was never published
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert "checkpoint-1 is the newest complete checkpoint; the partial checkpoint-2 was removed" in line
    assert not list(out.glob(".tmp-*"))
    assert json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())["global_step"] == 1
    assert load_file(str(out / "checkpoint-1" / "model.safetensors"))
    assert [m["step"] for m in _metrics(out)][:1] == [1]  # every line parses


@pytest.mark.parametrize("full_at, written", [
    (1, "no checkpoint was complete yet, so --resume starts from step 0; the partial checkpoint-1 was removed"),
    (2, "checkpoint-1 is the newest complete checkpoint; the partial checkpoint-2 was removed"),
])
def test_disk_full_in_process_is_one_line_saying_what_was_written(tiny_qwen3_dir, tmp_path, capsys, monkeypatch,
                                                                  full_at, written):
    """Without a tmpfs: the disk fills while checkpoint `full_at` is written (its weights already in the
    staging directory), as safetensors reports it."""
    from stapo.cli import main
    from stapo.engines.trl import STAPOTrainer

    class SafetensorError(Exception):
        pass

    save_rng_state = STAPOTrainer._save_rng_state

    def full(self, output_dir):
        if self.state.global_step == full_at:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return save_rng_state(self, output_dir)

    monkeypatch.setattr(STAPOTrainer, "_save_rng_state", full)
    out = tmp_path / "run"
    rc = main(["train", "demo", *_fields(tiny_qwen3_dir, out)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if "error" in line]
    assert errors == [f"stapo train: error: {out}: no space left on device; free some space and continue with "
                      f"--resume ({written})"]
    assert sorted(p.name for p in out.glob("*checkpoint-*")) == [f"checkpoint-{s}" for s in range(1, full_at)]
    assert not list(out.glob(".tmp-*")) and not (out / rundir.LOCK_FILE).exists()


# ---- 3. train_loss of a resumed run -----------------------------------------------------------------


@pytest.mark.slow
def test_resumed_run_reports_the_train_loss_of_an_uninterrupted_one(tiny_qwen3_dir, checkpointed_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(checkpointed_run, out)
    # as if the run had died after checkpoint 1
    for name in ("checkpoint-2", "final"):
        shutil.rmtree(out / name)
    (out / "summary.json").unlink()
    proc = _stapo("train", "demo", "--resume", *_fields(tiny_qwen3_dir, out), parity_reward=True)
    assert proc.returncode == 0, proc.stderr[-3000:]

    want = json.loads((checkpointed_run / "summary.json").read_text())["train_loss"]
    got = json.loads((out / "summary.json").read_text())["train_loss"]
    losses = [m["loss"] for m in _metrics(out) if m["kind"] == "train"]
    assert len(losses) == 2 and abs(losses[0]) > 1e-6  # step 1's loss (before the resume) must count
    assert got == pytest.approx(sum(losses) / 2, rel=1e-9)  # the mean over steps, recomputed from the log
    assert got == pytest.approx(want, rel=1e-6)
    summary_line = [m for m in _metrics(out) if m["kind"] == "summary"][-1]
    assert summary_line["train_loss"] == pytest.approx(got, rel=1e-12)


# ---- 4. a config without train_data ---------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "model: embedded\n", "model: embedded\ntrain_data: ''\n"])
def test_config_without_train_data_is_one_line_and_creates_nothing(tmp_path, text):
    (tmp_path / "c.yaml").write_text(text)
    proc = _stapo("train", "c.yaml", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "stapo train: error:" in proc.stderr and "Traceback" not in proc.stderr
    assert "- train_data: is required" in proc.stderr
    assert "not a datasets directory" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]  # no runs/stapo/ left behind


# ---- 5. one run at a time in a directory --------------------------------------------------------------

HOLD_LOCK = """
import sys, time
from stapo.rundir import claim_output_dir
lock = claim_output_dir(sys.argv[1])
print("held", flush=True)
time.sleep(300)
"""


@pytest.mark.slow
def test_a_directory_another_run_holds_is_refused_naming_its_pid_and_taken_over_once_it_is_gone(
        tiny_qwen3_dir, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for extra in ([], ["--resume"], ["--overwrite"]):
            proc = _stapo("train", "demo", *extra, *_fields(tiny_qwen3_dir, out))
            assert proc.returncode == 2
            assert _one_error_line(proc) == (
                f"stapo train: error: output_dir {out} is in use by another run (process {holder.pid}, which holds "
                f"{out / rundir.LOCK_FILE}); wait for it to end, or choose another output_dir=...")
            assert "method=" not in proc.stdout  # refused before anything was loaded
            assert sorted(p.name for p in out.iterdir()) == [rundir.LOCK_FILE]
    finally:
        holder.kill()
        holder.wait()

    # killed: its lock file stays, naming a process that has ended; the next start takes it over
    assert (out / rundir.LOCK_FILE).read_text().strip() == str(holder.pid)
    proc = _stapo("train", "demo", *_fields(tiny_qwen3_dir, out, max_steps=1))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (f"stapo: warning: output_dir {out}: took over the lock left by process {holder.pid}, which has ended"
            in proc.stderr.splitlines())
    assert (out / "checkpoint-1").is_dir() and not (out / rundir.LOCK_FILE).exists()


# ---- 6. a refused start leaves nothing that blocks the retry ------------------------------------------


@pytest.mark.slow
def test_a_start_refused_for_a_long_prompt_leaves_nothing_and_the_retry_runs(tiny_qwen3_dir, tmp_path):
    rows = [{"problem": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(8)]
    too_long = {"problem": "What is " + " + ".join(["1"] * 300) + "?", "answer": "300"}
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:3] + [too_long] + rows[3:]))
    out = tmp_path / "run"
    fields = _fields(tiny_qwen3_dir, out, train_data=str(data), max_steps=1)

    proc = _stapo("train", "demo", *fields)
    assert proc.returncode == 2
    assert f"stapo train: error: {data}: line 4: prompt is " in _one_error_line(proc)
    assert not out.exists()  # not even the directory

    data.write_text("".join(json.dumps(r) + "\n" for r in rows))  # the fix
    proc = _stapo("train", "demo", *fields)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "checkpoint-1").is_dir()

    # --overwrite refused for the same reason: the previous run is still all there
    before = _tree(out)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows + [too_long]))
    proc = _stapo("train", "demo", "--overwrite", *fields)
    assert proc.returncode == 2 and "line 9: prompt is " in _one_error_line(proc)
    assert _tree(out) == before
