"""Prompt rows from anywhere: local JSONL / Parquet files, ``datasets`` directories, hub ids,
the benchmark files, and the built-in synthetic tasks.

    load_prompts(source, problem_key="problem", answer_key="answer", ...) -> list[dict]
    load_benchmark(name, data_dir=None) -> list[dict]

Every row comes back as ``{"id", "problem", "answer", "meta"}`` (strings, ``meta`` a dict of
the other fields). A row with a missing or empty problem/answer, or one that is a JSON object
instead of text or a number, is a :class:`DataError` naming the file and row, or, with
``on_invalid="skip"``, is skipped and counted in ``.skipped``.
A file that is not UTF-8, a line that is not JSON, and a JSON object with a key given twice are
errors naming the file and the line (or row).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "BENCHMARKS",
    "BENCHMARK_HUB_IDS",
    "DataError",
    "PromptRows",
    "find_benchmark_dir",
    "load_benchmark",
    "load_prompts",
    "ungradable_reason",
]


class DataError(ValueError):
    """A prompt source that cannot be read: names the file, the row and the field."""


class PromptRows(list[dict[str, Any]]):
    """A list of prompt rows; ``.skipped`` lists ``(row_number, reason)`` for skipped rows,
    ``.source`` names where the rows came from and ``.locations`` names each kept row's place
    in it (``"data.jsonl: line 7"``), for errors found after loading."""

    def __init__(
        self,
        rows: Iterable[dict[str, Any]] = (),
        source: str = "",
        skipped: list[tuple[int, str]] | None = None,
        locations: list[str] | None = None,
    ):
        super().__init__(rows)
        self.source = source
        self.skipped: list[tuple[int, str]] = skipped or []
        self.locations: list[str] = (
            list(locations) if locations is not None else [f"{source}: row {i}" for i in range(1, len(self) + 1)]
        )

    def location(self, index: int) -> str:
        """Where row ``index`` (0-based) came from."""
        if index < len(self.locations):
            return self.locations[index]
        return f"{self.source}: row {index + 1}"


BENCHMARKS = ("aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench")

# For users who want the benchmarks from the hub instead of the local files. These are the
# usual public copies; check each card, the column names are the ones load_prompts needs.
BENCHMARK_HUB_IDS = {
    "aime24": {"source": "HuggingFaceH4/aime_2024", "split": "train", "problem_key": "problem", "answer_key": "answer"},
    "aime25": {"source": "MathArena/aime_2025", "split": "train", "problem_key": "problem", "answer_key": "answer"},
    "amc23": {"source": "math-ai/amc23", "split": "test", "problem_key": "question", "answer_key": "answer"},
    "math500": {"source": "HuggingFaceH4/MATH-500", "split": "test", "problem_key": "problem", "answer_key": "answer",
                "id_key": "unique_id"},
    "minerva": {"source": "math-ai/minervamath", "split": "test", "problem_key": "question", "answer_key": "answer"},
    "olympiadbench": {"source": "math-ai/olympiadbench", "split": "test", "problem_key": "question",
                      "answer_key": "final_answer"},
}

_ON_INVALID = ("error", "skip")
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".pq", ".csv", ".txt")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _text(value: Any) -> str | None:
    """A field as text: strings stripped, integral floats as integers, one-element lists unwrapped."""
    if value is None:
        return None
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (list, tuple)):
        parts = [_text(v) for v in value]
        if any(p is None for p in parts):
            return None
        return ", ".join(p for p in parts if p)
    return str(value).strip()


def _has_object(value: Any) -> bool:
    """A mapping, or a list holding one at any depth (a JSON object where text or a number belongs)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            return True
        if isinstance(v, (list, tuple)):
            stack.extend(v)
    return False


class _RepeatedKeys(dict[str, Any]):
    """A JSON object in which some key appeared more than once (``json`` would silently keep the
    last value); ``repeated`` is the first such key."""

    repeated: str = ""


def _object_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    seen: set[str] = set()
    marked = _RepeatedKeys(obj)
    for k, _ in pairs:  # the first key seen before
        if k in seen:
            marked.repeated = k
            break
        seen.add(k)
    return marked


def _repeated_key(value: Any) -> str | None:
    """The first key given twice in any JSON object inside ``value`` (iterative: no recursion
    limit on deep documents)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, _RepeatedKeys):
            return v.repeated
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return None


def _parse_json(text: str) -> Any:
    """``json.loads`` with repeated keys marked (see :class:`_RepeatedKeys`)."""
    return json.loads(text, object_pairs_hook=_object_pairs)


def _not_utf8(path: Path, err: UnicodeDecodeError, line: int, column: int) -> DataError:
    byte = err.object[err.start : err.start + 1].hex()
    return DataError(f"{path}: line {line}: not UTF-8 text (byte 0x{byte} at column {column}); save the file as UTF-8")


def _make_row(
    raw: Any,
    where: str,
    problem_key: str,
    answer_key: str | None,
    id_key: str | None,
    default_id: str,
) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected an object with fields, got {type(raw).__name__}")
    repeated = _repeated_key(raw)
    if repeated is not None:
        raise DataError(f"{where}: key {repeated!r} appears twice in one object (which value is meant?)")
    row: dict[str, Any] = {}
    for key in (problem_key, answer_key):
        if key is not None and _has_object(raw.get(key)):
            # its Python text ("{'value': 3}") is no problem or answer: the row could never score
            shown = json.dumps(raw[key], ensure_ascii=False, default=str)
            raise DataError(f"{where}: field {key!r} is a JSON object ({shown:.60}); expected text or a number")
    problem = _text(raw.get(problem_key))
    if problem_key not in raw:
        raise DataError(f"{where}: field {problem_key!r} is missing (fields: {sorted(raw)[:12]}); pass problem_key=")
    if not problem:
        raise DataError(f"{where}: field {problem_key!r} is empty")
    row["problem"] = problem
    if answer_key is not None:
        if answer_key not in raw:
            raise DataError(f"{where}: field {answer_key!r} is missing (fields: {sorted(raw)[:12]}); pass answer_key=")
        answer = _text(raw.get(answer_key))
        if not answer:
            raise DataError(f"{where}: field {answer_key!r} is empty")
        row["answer"] = answer
    rid = _text(raw.get(id_key)) if id_key and id_key in raw else None
    row["id"] = rid or default_id
    used = {problem_key, answer_key, id_key, "meta"}
    meta = dict(raw["meta"]) if isinstance(raw.get("meta"), dict) else {}
    meta.update({k: v for k, v in raw.items() if k not in used})
    row["meta"] = meta
    return row


def _collect(
    records: Iterable[tuple[int, Any]],
    where_fmt: str,
    name: str,
    keys: tuple[str, str | None, str | None],
    on_invalid: str,
    limit: int | None,
) -> PromptRows:
    rows = PromptRows(source=name)
    problem_key, answer_key, id_key = keys
    for number, raw in records:
        where = where_fmt.format(n=number)
        try:
            rows.append(_make_row(raw, where, problem_key, answer_key, id_key, f"{Path(name).stem}-{number}"))
            rows.locations.append(where)
        except DataError as e:
            if on_invalid == "error":
                raise
            rows.skipped.append((number, str(e)))
        if limit is not None and len(rows) >= limit:
            break
    return rows


def _jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    # bytes, decoded line by line: a non-UTF-8 byte is reported with its line, not as a traceback
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, e, number, e.start + 1) from None
            if not line.strip():
                continue
            try:
                yield number, _parse_json(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {number}: not valid JSON ({e.msg})") from None
            except RecursionError:
                raise DataError(f"{path}: line {number}: JSON nested too deeply") from None


def _json_records(path: Path) -> Iterator[tuple[int, Any]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line_start = raw.rfind(b"\n", 0, e.start) + 1
        raise _not_utf8(path, e, raw.count(b"\n", 0, e.start) + 1, e.start - line_start + 1) from None
    try:
        data = _parse_json(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply") from None
    if isinstance(data, _RepeatedKeys):  # the {"data": [...]} wrapper itself
        raise DataError(f"{path}: key {data.repeated!r} appears twice in the top-level object")
    if isinstance(data, dict):
        # {"data": [...]} / {"rows": [...]} wrappers
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON list of rows (or JSONL)")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows (or JSONL)")
    return ((i, r) for i, r in enumerate(data, start=1))


def _parquet_records(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises many types for a bad file
        raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    return ((i, r) for i, r in enumerate(table.to_pylist(), start=1))


def _dataset_records(ds: Iterable[Any]) -> Iterator[tuple[int, Any]]:
    return ((i, r) for i, r in enumerate(ds, start=1))


def _pick_split(ds: Any, split: str | None, name: str) -> Any:
    from datasets import DatasetDict

    if isinstance(ds, DatasetDict):
        splits = list(ds.keys())
        if split is None:
            if len(splits) == 1:
                return ds[splits[0]]
            split = "train" if "train" in splits else None
        if split not in ds:
            raise DataError(f"{name}: no split {split!r} (splits: {splits}); pass split=")
        return ds[split]
    return ds


def load_prompts(
    source: str | os.PathLike[str],
    problem_key: str = "problem",
    answer_key: str | None = "answer",
    id_key: str | None = "id",
    split: str | None = None,
    on_invalid: str = "error",
    limit: int | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    **hub_kwargs: Any,
) -> PromptRows:
    """Prompt rows ``{"id", "problem", "answer", "meta"}`` from ``source``.

    ``source`` is one of:
      - a local ``.jsonl`` / ``.json`` / ``.parquet`` file;
      - a local ``datasets`` directory (``save_to_disk``; ``split`` picks from a DatasetDict);
      - ``benchmark:<name>`` (see :func:`load_benchmark`; ``data_dir`` as there);
      - ``synthetic:<task>?n=256&seed=0&split=train`` (see :func:`stapo.data.synthetic_task`);
      - otherwise a hub dataset id (``owner/name``, network; ``split`` defaults to ``train``;
        extra keyword arguments go to ``datasets.load_dataset``, e.g. ``name=`` for a config).

    ``problem_key`` / ``answer_key`` / ``id_key`` name the source's columns (``answer_key=None``
    for prompts without a gold answer). ``on_invalid="skip"`` skips rows with a missing/empty
    field and records them in ``.skipped`` instead of raising. ``limit`` keeps the first rows.
    """
    if on_invalid not in _ON_INVALID:
        raise ValueError(f"on_invalid must be one of {_ON_INVALID}, got {on_invalid!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative integer, got {limit!r}")
    keys = (problem_key, answer_key, id_key)
    text = os.fspath(source)
    if text.startswith("benchmark:"):
        rows = load_benchmark(text.split(":", 1)[1], data_dir=data_dir)
        return PromptRows(rows[:limit], source=text, locations=rows.locations[:limit])
    if text.startswith("synthetic:"):
        from stapo.data.synthetic import synthetic_from_spec

        try:
            synthetic_rows = synthetic_from_spec(text)
        except ValueError as e:  # unknown task, split or parameter: one line naming what is known
            raise DataError(str(e)) from None
        return PromptRows(synthetic_rows[:limit], source=text)
    path = Path(text).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            records, fmt = _jsonl_records(path), f"{path}: line {{n}}"
        elif suffix == ".json":
            records, fmt = _json_records(path), f"{path}: row {{n}}"
        elif suffix in (".parquet", ".pq"):
            records, fmt = _parquet_records(path), f"{path}: row {{n}}"
        else:
            raise DataError(f"{path}: unknown file type {suffix!r}; use .jsonl, .json or .parquet")
        return _collect(records, fmt, str(path), keys, on_invalid, limit)
    if path.is_dir():
        try:
            from datasets import load_from_disk
        except ImportError:
            raise DataError(f"{path}: reading a datasets directory needs the 'datasets' package") from None
        try:
            ds = load_from_disk(str(path))
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{path}: not a datasets directory saved with save_to_disk ({e})") from None
        ds = _pick_split(ds, split, str(path))
        return _collect(_dataset_records(ds), f"{path}: row {{n}}", str(path), keys, on_invalid, limit)
    if not _HUB_ID.match(text) or Path(text).suffix.lower() in _FILE_SUFFIXES:
        raise DataError(
            f"{text}: no such file or directory (a hub dataset id looks like 'owner/name'; "
            "synthetic tasks are 'synthetic:<task>', benchmarks 'benchmark:<name>')"
        )
    try:
        from datasets import load_dataset
    except ImportError:
        raise DataError(f"{text}: loading a hub dataset needs the 'datasets' package") from None
    try:
        ds = load_dataset(text, split=split or "train", **hub_kwargs)
    except Exception as e:  # noqa: BLE001 - network / auth / unknown id
        raise DataError(
            f"{text}: not a local file or directory, and could not load it as a hub dataset "
            f"({type(e).__name__}: {e})"
        ) from None
    return _collect(_dataset_records(ds), f"{text}: row {{n}}", text, keys, on_invalid, limit)


def find_benchmark_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The benchmark directory: ``data_dir``, else ``$STAPO_DATA_DIR`` (a folder of
    ``<name>.jsonl`` files, or one with a ``benchmarks/`` folder of them). Nothing else is searched:
    the files are not part of the package, and ``--hub`` loads them from the hub instead."""
    given = data_dir if data_dir is not None else os.environ.get("STAPO_DATA_DIR") or None
    ways = ("add --hub to `stapo eval` to load them from the hub (network), or point --data-dir "
            "(data_dir= in Python) or STAPO_DATA_DIR at a folder with <name>.jsonl files")
    if given is None:
        raise DataError(f"benchmark files: no folder given; they are not part of the package: {ways}")
    folder = Path(given).expanduser()
    for d in (folder, folder / "benchmarks"):
        if any(d.glob("*.jsonl")):
            return d
    where = "--data-dir" if data_dir is not None else "STAPO_DATA_DIR"
    raise DataError(f"benchmark files not found in {folder} ({where}): no <name>.jsonl files there; {ways}")


_RELAY_MARKERS = ("TNYWR", "T N Y W R", "number you will receive", "the answer to the previous problem")


def ungradable_reason(row: dict[str, Any]) -> str | None:
    """Why a benchmark row cannot be graded fairly from its own text, or None.

    OlympiadBench's ARML relay items ("Let $T = TNYWR$", "the number you will receive") depend on
    another problem's answer that the text does not give.
    """
    problem = row.get("problem", "")
    compact = problem.replace(" ", "")
    if "TNYWR" in compact or any(m in problem for m in _RELAY_MARKERS):
        return "relay problem: depends on another problem's answer (TNYWR)"
    return None


def load_benchmark(name: str, data_dir: str | os.PathLike[str] | None = None) -> PromptRows:
    """The rows of one benchmark file ``<data_dir>/<name>.jsonl``.

    Each row keeps ``id``, ``problem``, ``answer`` (verbatim), ``source`` and ``meta``, and gets
    ``benchmark`` (the name) and ``ungradable`` (a reason string, or None; see
    :func:`ungradable_reason`). The grader normalises the gold itself (``$..$``, ``\\$``, ``\\!``...).
    """
    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    folder = find_benchmark_dir(data_dir)
    path = folder / f"{name}.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: benchmark file not found in {folder}")
    rows = PromptRows(source=str(path))
    for number, raw in _jsonl_records(path):
        row = _make_row(raw, f"{path}: line {number}", "problem", "answer", "id", f"{name}-{number}")
        if "source" in row["meta"]:
            row["source"] = row["meta"].pop("source")
        row["benchmark"] = name
        row["ungradable"] = ungradable_reason(row)
        rows.append(row)
        rows.locations.append(f"{path}: line {number}")
    return rows
