"""The run directory of `stapo train`: where each file lives, how files are written into it, and what a
resumed run keeps. The bottom layer: imports nothing from `stapo` (data, eval, analyze, engines and
train import it).

Layout:

    <run>/config.yaml                   the resolved config (rerun with `stapo train <run>/config.yaml`)
    <run>/metrics.jsonl                 one JSON line per logged step (appended)
    <run>/checkpoint-N/                 complete checkpoints (`--resume` continues from the newest)
    <run>/.tmp-checkpoint-N/            a checkpoint being written (published by one rename)
    <run>/eval.json                     held-out accuracy before / after training
    <run>/summary.json                  the run's summary (written last)
    <run>/final/                        the trained model and tokenizer
    <run>/plots/                        training curves
    <run>/rollouts/step_<N:08d>.parquet rollout captures of step N

Atomic writes (`atomic_write_bytes`, `atomic_write_text`, `atomic_write_json`): the data go to a
temporary sibling file (hidden, `.<name>.<random>.tmp`), are fsync'ed, and replace the target with one
`os.replace`; a failure (disk full, say) removes the temporary file and leaves the previous target
untouched. The temporary file is created with mode 0666 minus the umask, like any file `open()` makes.

Checkpoints are staged: the trainer writes `.tmp-checkpoint-N/checkpoint-N/`, and `publish_checkpoint`
renames it to `checkpoint-N/` once every file is on disk. Nothing named `checkpoint-*` exists until it
is complete. Rotation (`save_total_limit`) only ever deletes checkpoints of the run that is saving.

Resume: whatever the interrupted run appended for steps after the checkpoint being resumed from
(metrics lines, rollout files) is dropped (`truncate_metrics_after_step`, `truncate_rollouts_after_step`).

A new run refuses an output directory that already holds files (`check_output_dir`), unless it resumes
the run there or the user asked to overwrite it (`clear_run_files`). One run at a time: the run's main
process holds `<run>/.stapo.lock` (`claim_output_dir`), which holds its pid and is not a run file.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
EVAL_FILE = "eval.json"
FINAL_DIR = "final"
PLOTS_DIR = "plots"
ROLLOUTS_DIR = "rollouts"
CHECKPOINT_PREFIX = "checkpoint"
STAGING_PREFIX = ".tmp-"
LOCK_FILE = ".stapo.lock"  # held by the main process of the run writing the directory (`RunDirLock`)
TRAINER_STATE_FILE = "trainer_state.json"  # the Trainer writes it last: its presence marks a whole checkpoint
CURVES_FILE = "curves.png"  # in PLOTS_DIR: the training curves (stapo.analyze.plots)
MODEL_CARD_FILE = "README.md"  # the model card, also in FINAL_DIR (stapo.engines.trl.model_card)

_CHECKPOINT_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)$")
_ROLLOUT_NAME = re.compile(r"^step_(\d+)\.parquet$")


class RunDirError(ValueError):
    """The output directory cannot be used (not a directory, another run's files, no space left); the
    message names the path and the way out."""


# ---- names ----------------------------------------------------------------------------------------


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}-{int(step)}"


def checkpoint_step(path: str | os.PathLike[str]) -> int | None:
    """N for a path named `checkpoint-N`, else None."""
    m = _CHECKPOINT_NAME.match(Path(path).name)
    return int(m.group(1)) if m else None


def rollout_file_name(step: int) -> str:
    return f"step_{int(step):08d}.parquet"


def rollout_step(path: str | os.PathLike[str]) -> int | None:
    """N for a path named `step_N.parquet`, else None."""
    m = _ROLLOUT_NAME.match(Path(path).name)
    return int(m.group(1)) if m else None


def rollout_file(run_dir: str | os.PathLike[str], step: int) -> Path:
    return Path(run_dir) / ROLLOUTS_DIR / rollout_file_name(step)


# ---- atomic writes ----------------------------------------------------------------------------------


def _fsync_path(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # directories cannot be opened on some platforms
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Replace `path` with `data` in one rename (see the module docstring); returns the path."""
    path = Path(path)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"atomic_write_bytes needs bytes, got {type(data).__name__}")
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            # 0o666 through open(2): the umask applies, as for any new file (mkstemp would give 0600).
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_path(path.parent, directory=True)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    if not isinstance(text, str):
        raise TypeError(f"atomic_write_text needs str, got {type(text).__name__}")
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON object from `path`, or {} when it is missing or unreadable."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_run_config(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The config a run directory holds (`<run_dir>/config.yaml`, written by `stapo train`) as a mapping;
    {} when there is none. A file that cannot be read, is not valid YAML or is not a mapping raises
    `RunDirError` naming the file: a damaged config is never read as an empty one."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise RunDirError(f"{path}: cannot be read ({err})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RunDirError(f"{path}: not valid YAML{where} ({getattr(err, 'problem', None) or err}); "
                          "restore it or delete it") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RunDirError(f"{path}: expected a mapping of config fields (field: value), got {type(data).__name__}")
    return data


def is_disk_full(err: BaseException) -> bool:
    """True for 'No space left on device' (an OSError, or a writer library's own error that quotes it)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text


# ---- checkpoints ------------------------------------------------------------------------------------


def checkpoints(run_dir: str | os.PathLike[str]) -> dict[int, Path]:
    """The complete checkpoints of `run_dir` by step (`checkpoint-N` directories with trainer_state.json)."""
    found: dict[int, Path] = {}
    root = Path(run_dir)
    if not root.is_dir():
        return found
    for p in root.iterdir():
        step = checkpoint_step(p)
        if step is not None and p.is_dir() and (p / TRAINER_STATE_FILE).is_file():
            found[step] = p
    return dict(sorted(found.items()))


def last_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint of `run_dir` (staging directories are never considered)."""
    found = checkpoints(run_dir)
    return found[max(found)] if found else None


def staged_name(name: str) -> str:
    """The hidden name `name` is written under before it is renamed into place."""
    return f"{STAGING_PREFIX}{name}"


def staging_dir(run_dir: str | os.PathLike[str], step: int) -> Path:
    """The directory the Trainer writes checkpoint `step` into (it creates `checkpoint-<step>` inside)."""
    return Path(run_dir) / staged_name(checkpoint_name(step))


def remove_stale_staging(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Delete staging directories left by a crash while saving; returns what was removed."""
    removed: list[Path] = []
    for p in Path(run_dir).glob(f"{STAGING_PREFIX}{CHECKPOINT_PREFIX}-*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def fsync_tree(root: Path) -> None:
    """Flush every file (and directory entry) under `root` to disk, so the rename publishes data."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath), directory=True)


def publish_checkpoint(staged: Path, final: Path) -> None:
    """Move a complete checkpoint from its staging place to `final` with one rename.

    An existing `final` (the same step saved again, e.g. after resuming from an older checkpoint)
    is first renamed out of the way, then deleted once the new one is in place.
    """
    fsync_tree(staged)
    old = None
    if final.exists():
        old = final.parent / f"{STAGING_PREFIX}old-{final.name}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(staged, final)
    _fsync_path(final.parent, directory=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def rotate_checkpoints(run_dir: str | os.PathLike[str], keep: int | None, own_steps: Iterable[int],
                       protect: str | os.PathLike[str] | None = None) -> list[Path]:
    """Delete the oldest checkpoints among `own_steps` (the saving run's) until `keep` of them remain.

    Checkpoints of any other step are never touched, whatever their age; `protect` (the best model
    checkpoint) is kept in addition. Returns what was deleted.
    """
    if not keep or keep <= 0:
        return []
    own = set(own_steps)
    mine = [p for step, p in checkpoints(run_dir).items() if step in own]  # oldest first
    protected = Path(protect).resolve() if protect else None
    removed: list[Path] = []
    for p in mine[: max(len(mine) - keep, 0)]:
        if p.resolve() != protected:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def resumed_lineage(checkpoint: str | os.PathLike[str]) -> set[int]:
    """Steps of the checkpoints beside `checkpoint` up to its own step: the run being resumed wrote
    them, so the resumed run may rotate them (newer ones, from an abandoned continuation, it may not)."""
    step = checkpoint_step(checkpoint)
    if step is None:
        return set()
    return {s for s in checkpoints(Path(checkpoint).parent) if s <= step}


# ---- resume hygiene ---------------------------------------------------------------------------------


def truncate_metrics_after_step(path: str | os.PathLike[str], step: int) -> int:
    """Keep only the lines of a metrics.jsonl whose step is <= `step`; returns how many were dropped.

    A torn last line (a crash mid-write) is dropped as well.
    """
    kept, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
                keep = int(record["step"]) <= step
            except (ValueError, KeyError, TypeError):
                keep = False
            if keep:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        atomic_write_text(path, "".join(kept))
    return dropped


def truncate_rollouts_after_step(run_dir: str | os.PathLike[str], step: int) -> list[Path]:
    """Delete rollout captures of steps > `step` (written by a run that is being resumed)."""
    removed: list[Path] = []
    directory = Path(run_dir) / ROLLOUTS_DIR
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        n = rollout_step(p)
        if n is not None and n > step:
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


# ---- starting a run in an output directory ---------------------------------------------------------

# What a run writes at the top of its directory (checkpoints and staging directories by pattern).
RUN_ENTRIES = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, EVAL_FILE, FINAL_DIR, PLOTS_DIR, ROLLOUTS_DIR)


def _is_run_entry(p: Path) -> bool:
    name = p.name[len(STAGING_PREFIX):] if p.name.startswith(STAGING_PREFIX) else p.name
    name = name[len("old-"):] if name.startswith("old-") else name  # publish_checkpoint's old copy
    return name in RUN_ENTRIES or checkpoint_step(name) is not None


def check_output_dir(out: str | os.PathLike[str], resume: bool = False, overwrite: bool = False) -> None:
    """Raise `RunDirError` unless a run may start in `out`. Creates and deletes nothing.

    Allowed: a directory that does not exist yet (nor does any file stand in its path), an empty
    one, one holding a run when resuming it, anything when `overwrite` is set (`clear_run_files`).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"output_dir {out}: exists and is not a directory; choose another output_dir=...")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise RunDirError(
                    f"output_dir {out}: {parent} is a file, not a directory; choose another output_dir=...")
            break
    writable = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not os.access(writable, os.W_OK | os.X_OK):
        raise RunDirError(f"output_dir {out}: {writable} is not writable; choose another output_dir=...")
    if not out.exists() or overwrite:
        return
    entries = sorted(p for p in out.iterdir() if p.name != LOCK_FILE)
    if not entries:
        return
    if resume:
        if any(_is_run_entry(p) for p in entries):
            return
        raise RunDirError(
            f"output_dir {out} holds files but no stapo run to resume ({', '.join(p.name for p in entries[:3])}"
            f"{', ...' if len(entries) > 3 else ''}); choose a new output_dir=..., or pass --overwrite to use it anyway"
        )
    shown = [p.name for p in entries if _is_run_entry(p)] or [p.name for p in entries]
    what = "a previous run" if any(_is_run_entry(p) for p in entries) else "files"
    raise RunDirError(
        f"output_dir {out} is not empty (it holds {what}: {', '.join(shown[:4])}{', ...' if len(shown) > 4 else ''}); "
        "continue that run with --resume, choose a new output_dir=..., or pass --overwrite to replace it"
    )


def clear_run_files(out: str | os.PathLike[str]) -> list[Path]:
    """Delete what a previous run wrote at the top of `out` (for `--overwrite`); other files stay."""
    out = Path(out)
    removed: list[Path] = []
    if not out.is_dir():
        return removed
    for p in sorted(out.iterdir()):
        if _is_run_entry(p):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
    return removed


# ---- one run at a time --------------------------------------------------------------------------------


def _warn(message: str) -> None:
    import sys

    print(message, file=sys.stderr, flush=True)


def _lock_holder(fd: int, wait: float = 0.0) -> int | None:
    """The pid written in a lock file, or None; waits up to `wait` seconds for a holder that has just
    taken the lock and not yet written its pid."""
    import time

    deadline = time.monotonic() + wait
    while True:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        if text.isdigit():
            return int(text)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.02)


def _same_file(path: Path, fd: int) -> bool:
    try:
        on_disk, held = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


class RunDirLock:
    """A process's exclusive claim on a run directory: `<run>/LOCK_FILE`, holding the pid.

    The claim is an `flock` on that file: exactly one of two starts at the same moment gets it, and the
    kernel drops it when the process ends, however it ends. `release` deletes the file, then closes it;
    a file still there whose lock nobody holds was left by a run that was killed, and is taken over
    with a warning. Directories created to hold the lock are removed on release while still empty, so
    a start refused after taking the lock leaves nothing behind. Use `claim_output_dir`.
    """

    def __init__(self, path: Path, fd: int | None, created: list[Path]):
        self.path, self._fd, self._created = path, fd, created

    @classmethod
    def acquire(cls, run_dir: str | os.PathLike[str], warn: Callable[[str], None] = _warn) -> RunDirLock:
        run_dir = Path(run_dir)
        path = run_dir / LOCK_FILE
        created = [d for d in (run_dir, *run_dir.parents) if not d.exists()][::-1]  # outermost first
        while True:
            run_dir.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            except FileNotFoundError:  # the directory was removed in between (a refused start tidying up)
                continue
            to_close: int | None = fd
            try:
                locked = _flock(fd, path, warn)
                holder = None if locked else _lock_holder(fd, wait=1.0)
                if locked and not _same_file(path, fd):  # its holder released (deleted) it after our open
                    continue
                if locked:
                    previous = _lock_holder(fd)
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
                    if previous is not None and previous != os.getpid():
                        warn(f"stapo: warning: output_dir {run_dir}: took over the lock left by process {previous}, "
                             "which has ended")
                    lock, to_close = cls(path, fd, created), None
                    return lock
            finally:
                if to_close is not None:
                    os.close(to_close)
            cls(path, None, created).release()  # removes the directories this start created, if empty
            raise RunDirError(
                f"output_dir {run_dir} is in use by another run (process {holder or 'unknown'}, which holds "
                f"{path}); wait for it to end, or choose another output_dir=..."
            )

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Delete the lock file (if it is still ours), close it, remove the directories taking it created
        while they are empty. Idempotent."""
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                if _same_file(self.path, fd):
                    self.path.unlink(missing_ok=True)
            finally:
                os.close(fd)
        for directory in reversed(self._created):
            try:
                directory.rmdir()
            except OSError:  # not empty (the run wrote files) or gone
                break
        self._created = []

    def __enter__(self) -> RunDirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _flock(fd: int, path: Path, warn: Callable[[str], None]) -> bool:
    """Take the exclusive lock on `fd` without waiting: False when another process holds it. Where the
    platform or file system has no locks, warns and proceeds (the lock file still names the run)."""
    try:
        import fcntl
    except ImportError:
        warn(f"stapo: warning: {path}: this platform cannot lock files; make sure no other run writes here")
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno in (errno.EAGAIN, errno.EACCES):
            return False
        warn(f"stapo: warning: {path}: this file system cannot lock files ({err.strerror}); "
             "make sure no other run writes here")
    return True


def claim_output_dir(out: str | os.PathLike[str], resume: bool = False, overwrite: bool = False,
                     warn: Callable[[str], None] = _warn) -> RunDirLock:
    """The lock of `out` for a run that may start there (`check_output_dir`), for the caller to hold
    while the run writes there (`with claim_output_dir(...)` or `.release()`).

    The directory is checked before the lock is taken (a file in the way: nothing is created), and again
    once it is held, so a run that started and finished in between is seen. A second start while the
    lock is held is refused (`RunDirError`) naming the pid of the run that holds it.
    """
    check_output_dir(out, resume=resume, overwrite=overwrite)
    lock = RunDirLock.acquire(out, warn=warn)
    try:
        check_output_dir(out, resume=resume, overwrite=overwrite)
    except BaseException:
        lock.release()
        raise
    return lock
