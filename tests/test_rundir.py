"""`stapo.rundir`: names, atomic writes, checkpoints, resume truncation, starting in an existing directory."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from stapo import rundir
from stapo.rundir import (
    RunDirError,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_output_dir,
    clear_run_files,
    is_disk_full,
    last_checkpoint,
    publish_checkpoint,
    resumed_lineage,
    rotate_checkpoints,
    truncate_metrics_after_step,
    truncate_rollouts_after_step,
)


def _fake_checkpoint(path: Path, complete: bool = True) -> Path:
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"w")
    if complete:
        (path / "trainer_state.json").write_text("{}")
    return path


# ---- the bottom layer -------------------------------------------------------------------------------


def test_rundir_imports_nothing_from_stapo():
    """rundir is imported by data, eval, analyze, engines and train; it must not import them back."""
    code = ("import sys, stapo.rundir; "
            "print(sorted(m for m in sys.modules if m.startswith('stapo.') and m != 'stapo.rundir'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_names_round_trip():
    assert rundir.checkpoint_name(12) == "checkpoint-12" and rundir.checkpoint_step("x/checkpoint-12") == 12
    assert rundir.checkpoint_step("checkpoint-x") is None and rundir.checkpoint_step(".tmp-checkpoint-3") is None
    assert rundir.rollout_file_name(7) == "step_00000007.parquet"
    assert rundir.rollout_step("step_00000007.parquet") == 7 and rundir.rollout_step("step_7.parquet") == 7
    assert rundir.rollout_step("step_7.parquet.tmp") is None and rundir.rollout_step("notes.txt") is None
    assert rundir.rollout_file("r", 3) == Path("r/rollouts/step_00000003.parquet")


# ---- atomic writes ----------------------------------------------------------------------------------


def test_atomic_write_replaces_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "results.json"
    atomic_write_text(path, "old")
    atomic_write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_atomic_write_failure_keeps_the_old_file_and_no_temp_file(tmp_path, monkeypatch, failing):
    path = tmp_path / "summary.json"
    atomic_write_text(path, "old")

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, failing, no_space)
    with pytest.raises(OSError) as info:
        atomic_write_bytes(path, b"new" * 1000)
    monkeypatch.undo()
    assert is_disk_full(info.value)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_atomic_write_on_a_full_disk_keeps_the_old_file_and_no_temp_file(tmpfs):
    tiny_tmpfs = tmpfs("64k")  # 64 KiB
    path = tiny_tmpfs / "eval.json"
    atomic_write_text(path, "old")
    with pytest.raises(OSError) as info:
        atomic_write_bytes(path, b"x" * 1024 * 1024)  # 1 MiB into 64 KiB
    assert info.value.errno == errno.ENOSPC and is_disk_full(info.value)
    assert path.read_text() == "old"
    assert [p.name for p in tiny_tmpfs.iterdir()] == ["eval.json"]


def test_atomic_write_refuses_a_non_text_payload_before_touching_anything(tmp_path):
    path = tmp_path / "r.json"
    atomic_write_text(path, "old")
    with pytest.raises(TypeError):
        atomic_write_text(path, 12345)  # type: ignore[arg-type]
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.json"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_gives_normal_permissions_under_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with open(tmp_path / "b.txt", "w") as fh:  # what a plain open() makes: the reference
            fh.write("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == stat.S_IMODE((tmp_path / "b.txt").stat().st_mode)


def test_every_run_file_writer_gives_0644_under_umask_022(tmp_path):
    """results.json / results.md / run.json (eval), rollouts, reports: all through the one writer."""
    np = pytest.importorskip("numpy")
    pytest.importorskip("pyarrow")
    from stapo.analyze.report import write_report
    from stapo.data.rollouts import write_rollouts
    from stapo.eval.runner import write_results

    old = os.umask(0o022)
    try:
        write_results(tmp_path, {"model": "m", "results": {}, "flagged": {}})
        write_report(tmp_path / "tokens.html", "<html></html>")
        rec = {"prompt": "p", "completion": "c", "reward": 1.0, "advantage": 0.5, "token_id": [1, 2],
               "token_text": ["a", "b"], "logprob": np.array([-0.1, -0.2]), "entropy": np.array([0.3, 0.4]),
               "collision": np.array([0.9, 0.8]), "s2t": [False, True]}
        write_rollouts(tmp_path, 3, [rec])
    finally:
        os.umask(old)
    files = [tmp_path / "results.json", tmp_path / "results.md", tmp_path / "tokens.html",
             tmp_path / "rollouts" / "step_00000003.parquet"]
    assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {f.name: "0o644" for f in files}


def test_is_disk_full_recognises_oserror_and_writer_library_messages():
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(ValueError("bad value"))


# ---- checkpoints ------------------------------------------------------------------------------------


def test_last_checkpoint_ignores_incomplete_and_staged_ones(tmp_path):
    good = _fake_checkpoint(tmp_path / "checkpoint-2")
    _fake_checkpoint(tmp_path / "checkpoint-10", complete=False)  # torn: no trainer_state.json
    _fake_checkpoint(tmp_path / ".tmp-checkpoint-11" / "checkpoint-11")  # staged, never published
    _fake_checkpoint(tmp_path / ".tmp-old-checkpoint-12")  # publish_checkpoint's copy of a replaced one
    _fake_checkpoint(tmp_path / "checkpoint-x")
    (tmp_path / "checkpoint-13").write_text("a file, not a directory")
    assert last_checkpoint(tmp_path) == good
    assert list(rundir.checkpoints(tmp_path)) == [2]
    assert last_checkpoint(tmp_path / "missing") is None


def test_publish_checkpoint_replaces_an_existing_step(tmp_path):
    old = _fake_checkpoint(tmp_path / "checkpoint-3")
    (old / "stale.bin").write_bytes(b"old")
    staged = _fake_checkpoint(tmp_path / ".tmp-checkpoint-3" / "checkpoint-3")
    (staged / "model.safetensors").write_bytes(b"new")
    publish_checkpoint(staged, tmp_path / "checkpoint-3")
    assert (tmp_path / "checkpoint-3" / "model.safetensors").read_bytes() == b"new"
    assert not (tmp_path / "checkpoint-3" / "stale.bin").exists()
    assert not staged.exists() and not (tmp_path / ".tmp-old-checkpoint-3").exists()


def test_rotation_deletes_only_the_saving_runs_oldest_checkpoints(tmp_path):
    for step in (4, 5):  # another run's, newer in step and in file time
        _fake_checkpoint(tmp_path / f"checkpoint-{step}")
    for step in (1, 2, 3):
        _fake_checkpoint(tmp_path / f"checkpoint-{step}")
    removed = rotate_checkpoints(tmp_path, 2, own_steps={1, 2, 3})
    assert [p.name for p in removed] == ["checkpoint-1"]
    assert list(rundir.checkpoints(tmp_path)) == [2, 3, 4, 5]
    # the best checkpoint is kept in addition to the newest ones
    assert rotate_checkpoints(tmp_path, 1, own_steps={2, 3}, protect=tmp_path / "checkpoint-2") == []
    assert rotate_checkpoints(tmp_path, None, own_steps={2, 3}) == []
    assert [p.name for p in rotate_checkpoints(tmp_path, 1, own_steps={2, 3})] == ["checkpoint-2"]


def test_resumed_lineage_is_the_checkpoints_up_to_the_resumed_one(tmp_path):
    for step in (1, 2, 3, 5):
        _fake_checkpoint(tmp_path / f"checkpoint-{step}")
    assert resumed_lineage(tmp_path / "checkpoint-3") == {1, 2, 3}
    assert resumed_lineage(tmp_path / "elsewhere") == set()


# ---- resume truncation ------------------------------------------------------------------------------


def test_truncate_metrics_drops_later_and_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "loss": 0.3}\n{"step": 4, "lo')
    assert truncate_metrics_after_step(path, 2) == 2
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    assert truncate_metrics_after_step(path, 2) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_truncate_rollouts_after_step(tmp_path):
    d = tmp_path / "rollouts"
    d.mkdir()
    for step in (1, 2, 3, 12):
        (d / f"step_{step:08d}.parquet").write_bytes(b"x")
    (d / "notes.txt").write_text("kept")
    removed = truncate_rollouts_after_step(tmp_path, 2)
    assert sorted(p.name for p in removed) == ["step_00000003.parquet", "step_00000012.parquet"]
    assert sorted(p.name for p in d.iterdir()) == ["notes.txt", "step_00000001.parquet", "step_00000002.parquet"]
    assert truncate_rollouts_after_step(tmp_path / "no-run", 0) == []


# ---- starting a run in an output directory ---------------------------------------------------------


def test_check_output_dir_allows_new_and_empty_directories(tmp_path):
    check_output_dir(tmp_path / "new" / "deeper")
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty")
    check_output_dir(tmp_path / "empty", resume=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # nothing created


def test_check_output_dir_refuses_a_previous_run_unless_resumed_or_overwritten(tmp_path):
    _fake_checkpoint(tmp_path / "checkpoint-5")
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(RunDirError, match=r"is not empty \(it holds a previous run: checkpoint-5, metrics.jsonl\); "
                                          r"continue that run with --resume, .*--overwrite"):
        check_output_dir(tmp_path)
    check_output_dir(tmp_path, resume=True)
    check_output_dir(tmp_path, overwrite=True)


def test_check_output_dir_refuses_the_users_own_files(tmp_path):
    (tmp_path / "thesis.tex").write_text("mine")
    with pytest.raises(RunDirError, match=r"it holds files: thesis.tex"):
        check_output_dir(tmp_path)
    with pytest.raises(RunDirError, match=r"holds files but no stapo run to resume"):
        check_output_dir(tmp_path, resume=True)


def test_check_output_dir_refuses_a_file_or_a_path_under_a_file(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(RunDirError, match=r"file.txt: exists and is not a directory"):
        check_output_dir(f)
    with pytest.raises(RunDirError, match=r"file.txt is a file, not a directory"):
        check_output_dir(f / "run" / "deeper")


def test_clear_run_files_removes_only_run_entries(tmp_path):
    _fake_checkpoint(tmp_path / "checkpoint-5")
    _fake_checkpoint(tmp_path / ".tmp-checkpoint-6" / "checkpoint-6")
    _fake_checkpoint(tmp_path / ".tmp-final")
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "eval.json", "notes.txt"):
        (tmp_path / name).write_text("x")
    for name in ("final", "plots", "rollouts", "data"):
        (tmp_path / name).mkdir()
    clear_run_files(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "notes.txt"]


# ---- one run at a time: the run directory's lock ----------------------------------------------------

HOLD_LOCK = """
import sys, time
from stapo.rundir import claim_output_dir
lock = claim_output_dir(sys.argv[1])
print("held", flush=True)
time.sleep(120)
"""


def _hold_lock(out: Path) -> subprocess.Popen:
    """Another process holding `out`'s lock (claimed and held until killed)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(rundir.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_held_lock_refuses_a_second_claim_naming_the_pid(tmp_path):
    out = tmp_path / "run"
    holder = _hold_lock(out)
    try:
        assert (out / rundir.LOCK_FILE).read_text().strip() == str(holder.pid)
        for flags in ({}, {"resume": True}, {"overwrite": True}):
            with pytest.raises(RunDirError,
                               match=rf"output_dir {out} is in use by another run \(process {holder.pid}, "):
                rundir.claim_output_dir(out, **flags)
        assert sorted(p.name for p in out.iterdir()) == [rundir.LOCK_FILE]  # the holder's file is untouched
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_is_not_a_file_of_the_directory_and_goes_on_release(tmp_path):
    out = tmp_path / "new" / "run"
    lock = rundir.claim_output_dir(out)
    assert (out / rundir.LOCK_FILE).read_text() == f"{os.getpid()}\n"
    check_output_dir(out)  # the lock file does not make the directory "not empty"
    check_output_dir(out, resume=True)
    (out / "config.yaml").write_text("x")
    lock.release()
    lock.release()  # twice is harmless
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]

    # a start refused after taking the lock leaves no directory it created behind
    with rundir.claim_output_dir(tmp_path / "a" / "b"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"]


def test_a_lock_left_by_a_process_that_ended_is_taken_over_with_a_warning(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    pid = _dead_pid()
    (out / rundir.LOCK_FILE).write_text(f"{pid}\n")
    warnings = []
    with rundir.claim_output_dir(out, warn=warnings.append) as lock:
        assert lock.held and (out / rundir.LOCK_FILE).read_text() == f"{os.getpid()}\n"
    assert warnings == [f"stapo: warning: output_dir {out}: took over the lock left by process {pid}, which has ended"]
    assert not (out / rundir.LOCK_FILE).exists()


RACE = """
import sys, time
from stapo.rundir import RunDirError, claim_output_dir
start = float(sys.argv[2])
time.sleep(max(start - time.time() - 0.05, 0))
while time.time() < start:
    pass
try:
    lock = claim_output_dir(sys.argv[1])
except RunDirError:
    print("refused", flush=True)
else:
    time.sleep(3)  # held past every other start
    print("claimed", flush=True)
"""


def test_of_four_starts_at_the_same_moment_exactly_one_gets_the_directory(tmp_path):
    import time

    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(rundir.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    start = time.time() + 1.5  # after every interpreter has started
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(out), str(start)], env=env, stdout=subprocess.PIPE,
                              text=True) for _ in range(4)]
    results = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert results == ["claimed", "refused", "refused", "refused"]
