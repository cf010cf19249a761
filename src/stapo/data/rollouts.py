"""Rollout capture: sampled completions with their per-token statistics, as compact Parquet files.

A trainer calls `write_rollouts(run_dir, step, records)` on capture steps; `stapo analyze` reads
them back with `read_rollouts(path)`.

Layout: one file per capture step, `<run_dir>/rollouts/step_<step:08d>.parquet`, written atomically
(`stapo.rundir.atomic_write_bytes`), zstd-compressed, dictionary-encoded strings. One row per *sample*, with
the per-token values as list columns (prompt and completion text are stored once per sample):

    column       type            meaning
    step         int32           training step of the capture
    sample       int32           index of the sample in the step's batch
    prompt       string          prompt text (as given to the model, chat template included)
    completion   string          completion text
    reward       float32         the sample's scalar reward (NaN when the trainer passed none)
    advantage    float32         the sample's advantage Â (broadcast to its tokens)
    token_id     list<int32>     sampled token ids of the completion
    token_text   list<string>    decoded text piece of each token
    logprob      list<float32>   log π(a_t) under the policy that decided the S2T mask
    entropy      list<float32>   H_t = −Σ_v π_v log π_v (nats)
    collision    list<float32>   Σ_v π_v² (collision probability)
    s2t          list<bool>      the S2T flag the trainer applied (True = silenced)

File-level metadata (Parquet key/value, JSON-encoded): `stapo.rollouts.version`, and whatever the
trainer passes as `metadata` (e.g. `tau_p`, `tau_h` — the thresholds that produced `s2t`).

The gradient-norm² proxy ‖∇_z log π(a)‖² = 1 − 2p + Σπ² is *not stored*: `read_rollouts` computes it
from `logprob` and `collision` with `stapo.core.grad_norm_proxy` (both are float32, so nothing is lost).

Several calls for one step (one per micro-batch, say) append to the step's file; a sample index
that is already there is replaced, so re-capturing a step after a resume never duplicates it.

Size bounds: at most `max_samples` samples per step (the first ones, in the given order, so the kept
set is an unbiased slice of the batch) and at most `max_bytes` bytes of rollout files per run. Samples
beyond either bound are dropped with a `RolloutCapWarning` that counts them; the return value counts
them too, so a trainer can log it.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stapo.rundir import ROLLOUTS_DIR, atomic_write_bytes, rollout_file, rollout_step

if TYPE_CHECKING:
    import torch

SCHEMA_VERSION = 1
DEFAULT_MAX_SAMPLES = 64
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
METADATA_PREFIX = "stapo."

TOKEN_FIELDS = ("token_id", "token_text", "logprob", "entropy", "collision", "s2t")
SAMPLE_FIELDS = ("prompt", "completion", "reward", "advantage")
# Accepted aliases for record keys (the plural forms read naturally at call sites).
_ALIASES = {
    "token_ids": "token_id",
    "token_texts": "token_text",
    "logprobs": "logprob",
    "entropies": "entropy",
    "collision_prob": "collision",
    "spurious": "s2t",
    "s2t_mask": "s2t",
    "sample_index": "sample",
    "tokens": "token_text",
}


class RolloutError(ValueError):
    """Bad rollout records or an unreadable/missing rollout file; the message names the file or field."""


class RolloutCapWarning(UserWarning):
    """Samples were dropped because a capture exceeded its per-step or per-run size bound."""


@dataclass
class RolloutWriteResult:
    path: Path | None  # None when the whole capture was dropped
    samples_written: int
    samples_dropped: int
    bytes_written: int


def rollout_path(run_dir_or_path: str | os.PathLike[str], step: int) -> Path:
    """`x.parquet` stays as is; anything else is a run directory: `<dir>/rollouts/step_<step>.parquet`."""
    p = Path(run_dir_or_path)
    if p.suffix == ".parquet":
        return p
    return rollout_file(p, step)


def _to_numpy(x: Any, name: str, where: str, dtype: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    try:
        arr = np.asarray(x, dtype=dtype)
    except (TypeError, ValueError) as err:
        raise RolloutError(f"{where}: field '{name}' cannot be read as {np.dtype(dtype).name}: {err}") from None
    if arr.ndim != 1:
        raise RolloutError(f"{where}: field '{name}' must be 1-D (one value per token), got shape {arr.shape}")
    return arr


def _normalise(record: Mapping[str, Any], index: int, step: int) -> dict[str, Any]:
    where = f"rollout record {index} (step {step})"
    if not isinstance(record, Mapping):
        raise RolloutError(f"{where}: must be a mapping of field -> value, got {type(record).__name__}")
    rec = {_ALIASES.get(k, k): v for k, v in record.items()}
    if rec.get("reward") is None:  # optional: stored as NaN when the trainer has none
        rec["reward"] = float("nan")
    missing = [k for k in SAMPLE_FIELDS + TOKEN_FIELDS if k not in rec or rec[k] is None]
    if missing:
        raise RolloutError(f"{where}: missing field(s) {', '.join(missing)}")
    if "step" in rec and rec["step"] is not None and int(rec["step"]) != int(step):
        raise RolloutError(f"{where}: field 'step' is {rec['step']} but the capture step is {step}")
    out: dict[str, Any] = {"sample": int(rec.get("sample", index))}
    for name in ("prompt", "completion"):
        if not isinstance(rec[name], str):
            raise RolloutError(f"{where}: field '{name}' must be a string, got {type(rec[name]).__name__}")
        out[name] = rec[name]
    for name in ("reward", "advantage"):
        try:
            value = float(rec[name])
        except (TypeError, ValueError):
            raise RolloutError(f"{where}: field '{name}' must be a number, got {rec[name]!r}") from None
        if not np.isfinite(value) and not (name == "reward" and np.isnan(value)):
            raise RolloutError(f"{where}: field '{name}' is not finite ({value})")
        out[name] = value
    out["token_id"] = _to_numpy(rec["token_id"], "token_id", where, np.int64).astype(np.int32)
    n = out["token_id"].shape[0]
    texts = list(rec["token_text"])
    if any(not isinstance(t, str) for t in texts):
        raise RolloutError(f"{where}: field 'token_text' must be a list of strings")
    out["token_text"] = texts
    for name in ("logprob", "entropy", "collision"):
        arr = _to_numpy(rec[name], name, where, np.float32)
        if not np.isfinite(arr).all():
            raise RolloutError(f"{where}: field '{name}' contains non-finite values")
        out[name] = arr
    out["s2t"] = _to_numpy(rec["s2t"], "s2t", where, np.bool_)
    for name in TOKEN_FIELDS:
        if len(out[name]) != n:
            raise RolloutError(f"{where}: field '{name}' has {len(out[name])} values but token_id has {n}")
    if (out["logprob"] > 1e-4).any():
        raise RolloutError(f"{where}: field 'logprob' has positive values (log-probabilities are <= 0)")
    return out


def _table(step: int, rows: list[dict[str, Any]], metadata: Mapping[str, Any] | None) -> Any:
    import pyarrow as pa

    def lists(name: str, typ: Any) -> Any:
        return pa.array([r[name] for r in rows], type=pa.list_(typ))

    columns = {
        "step": pa.array([step] * len(rows), type=pa.int32()),
        "sample": pa.array([r["sample"] for r in rows], type=pa.int32()),
        "prompt": pa.array([r["prompt"] for r in rows], type=pa.string()),
        "completion": pa.array([r["completion"] for r in rows], type=pa.string()),
        "reward": pa.array([r["reward"] for r in rows], type=pa.float32()),
        "advantage": pa.array([r["advantage"] for r in rows], type=pa.float32()),
        "token_id": lists("token_id", pa.int32()),
        "token_text": lists("token_text", pa.string()),
        "logprob": lists("logprob", pa.float32()),
        "entropy": lists("entropy", pa.float32()),
        "collision": lists("collision", pa.float32()),
        "s2t": lists("s2t", pa.bool_()),
    }
    meta = {f"{METADATA_PREFIX}rollouts.version": json.dumps(SCHEMA_VERSION)}
    for k, v in (metadata or {}).items():
        try:
            meta[f"{METADATA_PREFIX}{k}"] = json.dumps(v)
        except TypeError:
            raise RolloutError(f"rollout metadata '{k}' is not JSON-serialisable: {v!r}") from None
    return pa.table(columns).replace_schema_metadata(meta)


def _run_bytes(directory: Path, exclude: Path) -> int:
    if not directory.is_dir():
        return 0
    return sum(
        f.stat().st_size for f in directory.iterdir() if rollout_step(f) is not None and f != exclude
    )


def write_rollouts(
    run_dir_or_path: str | os.PathLike[str],
    step: int,
    records: Iterable[Mapping[str, Any]],
    *,
    max_samples: int | None = DEFAULT_MAX_SAMPLES,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    metadata: Mapping[str, Any] | None = None,
    append: bool = True,
) -> RolloutWriteResult:
    """Write one capture step's samples (schema in the module docstring) and return what was kept.

    `records`: one mapping per sample with `prompt`, `completion`, `advantage`, optional `reward`
    (NaN when absent), optional `sample` index (default: position) and the per-token sequences
    `token_id`, `token_text`, `logprob`, `entropy`, `collision`, `s2t` (lists, numpy arrays or
    torch tensors; plural aliases such as `token_ids`, `logprobs` are accepted).

    A trainer may call this several times for one step (e.g. once per micro-batch): with `append`
    the new samples join the step's file, and a sample index already in it is replaced (so a
    resumed run that re-captures a step does not duplicate it). `max_samples` caps the samples of
    the step (all calls together); `max_bytes` caps the rollout files of the whole run (the step's
    file is not updated if it would not fit). None disables a cap. The file is replaced atomically.
    """
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise RolloutError(f"step must be a non-negative int, got {step!r}")
    step = int(step)
    for name, cap in (("max_samples", max_samples), ("max_bytes", max_bytes)):
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 0):
            raise RolloutError(f"{name} must be a non-negative int or None, got {cap!r}")
    records = list(records)
    new_rows = [_normalise(r, i, step) for i, r in enumerate(records)]
    path = rollout_path(run_dir_or_path, step)
    old_rows, old_meta = (_read_rows(path) if append and path.is_file() else ([], {}))
    new_ids = {r["sample"] for r in new_rows}
    kept_old = [r for r in old_rows if r["sample"] not in new_ids]
    room = len(kept_old) + len(new_rows) if max_samples is None else max(max_samples - len(kept_old), 0)
    dropped = max(len(new_rows) - room, 0)
    rows = kept_old + new_rows[:room]
    path.parent.mkdir(parents=True, exist_ok=True)

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = _table(step, rows, {**old_meta, **(metadata or {})})
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer, compression="zstd", use_dictionary=True)
    data = buffer.getvalue().to_pybytes()
    size = len(data)
    if max_bytes is not None and _run_bytes(path.parent, path) + size > max_bytes:
        dropped = len(new_rows)
        _warn(step, dropped, len(records), f"the run's rollout files would exceed max_bytes={max_bytes}")
        return RolloutWriteResult(path if old_rows else None, 0, dropped, 0)
    atomic_write_bytes(path, data)
    if dropped:
        _warn(step, dropped, len(records), f"max_samples={max_samples} per step")
    return RolloutWriteResult(path, len(rows) - len(kept_old), dropped, size)


def _read_rows(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows of an existing step file, in the writer's normalised form (for appending)."""
    ro = read_rollouts(path)
    rows = []
    for i in range(ro.num_samples):
        sl = ro.token_slice(i)
        rows.append(
            {
                "sample": int(ro.sample[i]),
                "prompt": ro.prompt[i],
                "completion": ro.completion[i],
                "reward": float(ro.reward[i]),
                "advantage": float(ro.advantage[i]),
                "token_id": ro.token_id[sl],
                "token_text": ro.token_text[sl],
                "logprob": ro.logprob[sl],
                "entropy": ro.entropy[sl],
                "collision": ro.collision[sl],
                "s2t": ro.s2t[sl],
            }
        )
    meta = next(iter(ro.metadata.values()), {})
    meta = {k: v for k, v in meta.items() if k != "rollouts.version"}
    return rows, meta


def _warn(step: int, dropped: int, total: int, why: str) -> None:
    warnings.warn(
        f"rollout capture at step {step}: dropped {dropped} of {total} samples ({why})",
        RolloutCapWarning,
        stacklevel=3,
    )


# ----------------------------------------------------------------------------------------- reading


@dataclass
class Rollouts:
    """Captured samples, pandas-free: per-sample arrays plus flat per-token arrays.

    Tokens of sample i are `offsets[i]:offsets[i+1]` of every per-token array.
    `grad_proxy` = 1 − 2p + Σπ² (computed on read with `stapo.core.grad_norm_proxy`).
    """

    step: np.ndarray  # [S] int32
    sample: np.ndarray  # [S] int32
    prompt: list[str]
    completion: list[str]
    reward: np.ndarray  # [S] float32
    advantage: np.ndarray  # [S] float32
    offsets: np.ndarray  # [S + 1] int64
    token_id: np.ndarray  # [N] int32
    token_text: list[str]
    logprob: np.ndarray  # [N] float32
    entropy: np.ndarray  # [N] float32
    collision: np.ndarray  # [N] float32
    s2t: np.ndarray  # [N] bool
    grad_proxy: np.ndarray  # [N] float32
    metadata: dict[int, dict[str, Any]] = field(default_factory=dict)  # step -> file metadata
    files: list[Path] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        return int(self.reward.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.logprob.shape[0])

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def token_slice(self, i: int) -> slice:
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))

    def padded(self) -> dict[str, torch.Tensor]:
        """torch tensors [S, T] (right-padded) for the core functions:
        dict with logprobs, entropy, collision, s2t, advantages [S], response_mask, token_ids."""
        import torch

        s, lens = self.num_samples, self.lengths()
        t = int(lens.max()) if s else 0
        rows = np.repeat(np.arange(s), lens)
        cols = np.arange(self.num_tokens) - np.repeat(self.offsets[:-1], lens)

        def pad(values: Any, dtype: torch.dtype, fill: float) -> torch.Tensor:
            out = torch.full((s, t), fill, dtype=dtype)
            out[rows, cols] = torch.as_tensor(values).to(dtype)
            return out

        return {
            "logprobs": pad(self.logprob, torch.float32, 0.0),
            "entropy": pad(self.entropy, torch.float32, 0.0),
            "collision": pad(self.collision, torch.float32, 1.0),
            "s2t": pad(self.s2t, torch.bool, False),
            "token_ids": pad(self.token_id, torch.int64, 0),
            "response_mask": pad(np.ones(self.num_tokens, dtype=bool), torch.bool, False),
            "advantages": torch.as_tensor(self.advantage, dtype=torch.float32),
        }


def rollouts_from_records(
    records: Iterable[Mapping[str, Any]], step: int = 0, metadata: Mapping[str, Any] | None = None
) -> Rollouts:
    """In-memory `Rollouts` from writer-style records (same checks as `write_rollouts`, no file)."""
    rows = [_normalise(r, i, int(step)) for i, r in enumerate(records)]
    meta = {"rollouts.version": SCHEMA_VERSION, **(metadata or {})}
    return _from_table(_table(int(step), rows, None), {int(step): meta}, [])


def rollout_files(path_or_dir: str | os.PathLike[str]) -> list[Path]:
    """The capture files under a `.parquet` file, a `rollouts/` directory or a run directory, by step."""
    p = Path(path_or_dir)
    if not p.exists():
        raise RolloutError(f"no such rollout file or directory: {p}")
    if p.is_file():
        if p.suffix != ".parquet":
            raise RolloutError(f"{p}: not a rollout file (expected a .parquet file or a directory)")
        return [p]
    directory = p / ROLLOUTS_DIR if (p / ROLLOUTS_DIR).is_dir() else p
    files = sorted(
        (f for f in directory.iterdir() if f.is_file() and rollout_step(f) is not None),
        key=lambda f: rollout_step(f) or 0,  # every file here has a step
    )
    if not files:
        raise RolloutError(
            f"{directory}: no rollout files (step_<N>.parquet) found; enable capture with "
            "capture_rollouts_every in the training config, or pass a .parquet file"
        )
    return files


def read_rollouts(path_or_dir: str | os.PathLike[str], steps: Sequence[int] | None = None) -> Rollouts:
    """Read one capture file, or every capture of a run (`steps` selects some), into `Rollouts`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = rollout_files(path_or_dir)
    if steps is not None:
        wanted = {int(s) for s in steps}
        files = [f for f in files if rollout_step(f) is None or rollout_step(f) in wanted]
        if not files:
            raise RolloutError(f"{path_or_dir}: no rollout files for steps {sorted(wanted)}")
    tables, metadata = [], {}
    required = ("step", "sample", "prompt", "completion", "reward", "advantage") + TOKEN_FIELDS
    for f in files:
        try:
            table = pq.read_table(f)
        except (pa.ArrowInvalid, OSError) as err:
            raise RolloutError(f"{f}: not a readable Parquet file ({err})") from None
        missing = [c for c in required if c not in table.column_names]
        if missing:
            raise RolloutError(f"{f}: not a stapo rollout file (missing column(s) {', '.join(missing)})")
        meta = _file_metadata(f, table.schema.metadata)
        if table.num_rows:
            metadata[int(table.column("step")[0].as_py())] = meta
        tables.append(table.select(list(required)))
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    return _from_table(table, metadata, files)


def _file_metadata(path: Path, raw: Mapping[bytes, bytes] | None) -> dict[str, Any]:
    """The stapo entries of a Parquet file's key/value metadata, each JSON-decoded; a key or
    value that is not UTF-8 JSON is a RolloutError naming the file and the key."""
    meta: dict[str, Any] = {}
    for k, v in (raw or {}).items():
        key = k.decode("utf-8", errors="replace")
        if not key.startswith(METADATA_PREFIX):
            continue
        try:
            meta[key[len(METADATA_PREFIX):]] = json.loads(v)
        except (UnicodeDecodeError, ValueError) as err:  # JSONDecodeError is a ValueError
            raise RolloutError(f"{path}: metadata {key!r} is not valid JSON ({err}); the file was not written by stapo "
                               "or was altered") from None
    return meta


def _flat(table: Any, name: str, dtype: Any) -> np.ndarray:
    col = table.column(name).combine_chunks()
    values = col.flatten()
    return np.array(values.to_numpy(zero_copy_only=False), dtype=dtype)  # a writable copy


def _from_table(table: Any, metadata: dict[int, dict[str, Any]], files: list[Path]) -> Rollouts:
    import torch

    from stapo.core import grad_norm_proxy

    lengths = [np.asarray(table.column(c).combine_chunks().value_lengths().fill_null(0)) for c in TOKEN_FIELDS]
    for name, lens in zip(TOKEN_FIELDS[1:], lengths[1:]):
        if not np.array_equal(lens, lengths[0]):
            row = int(np.nonzero(lens != lengths[0])[0][0])
            raise RolloutError(f"{files}: row {row}: column '{name}' length differs from token_id")
    offsets = np.concatenate([[0], np.cumsum(lengths[0])]).astype(np.int64)
    logprob = _flat(table, "logprob", np.float32)
    collision = _flat(table, "collision", np.float32)
    proxy = grad_norm_proxy(torch.from_numpy(logprob), torch.from_numpy(collision)).numpy()
    return Rollouts(
        step=np.array(table.column("step").to_numpy(), dtype=np.int32),
        sample=np.array(table.column("sample").to_numpy(), dtype=np.int32),
        prompt=table.column("prompt").to_pylist(),
        completion=table.column("completion").to_pylist(),
        reward=np.array(table.column("reward").to_numpy(), dtype=np.float32),
        advantage=np.array(table.column("advantage").to_numpy(), dtype=np.float32),
        offsets=offsets,
        token_id=_flat(table, "token_id", np.int32),
        token_text=table.column("token_text").combine_chunks().flatten().to_pylist(),
        logprob=logprob,
        entropy=_flat(table, "entropy", np.float32),
        collision=collision,
        s2t=_flat(table, "s2t", np.bool_),
        grad_proxy=proxy.astype(np.float32),
        metadata=metadata,
        files=list(files),
    )
