"""The run directory of `stapo eval`: an append-only sample log and atomically replaced reports.

    samples.jsonl   one JSON object per generated sample, appended (flush + fsync per batch); on
                    restart it is read back, a torn last line (an interrupted write) is dropped, and
                    every (benchmark, setting, problem id, sample index) already present is skipped
    results.json    written with `stapo.rundir.atomic_write_text` (a temporary sibling, fsync, rename), so an
    results.md      interrupted run leaves the previous complete file or none — never half of one
    run.json        the generation-relevant configuration; a rerun into the same directory must match
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["SampleKey", "SampleLog", "sample_key"]

SampleKey = tuple[str, str, str, int]


def sample_key(record: dict) -> SampleKey:
    return (record["benchmark"], record["setting"], str(record["problem_id"]), int(record["sample_idx"]))


class SampleLog:
    """Append-only JSONL of graded samples, keyed by (benchmark, setting, problem id, sample index)."""

    REQUIRED = ("benchmark", "setting", "problem_id", "sample_idx")

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.records: dict[SampleKey, dict] = {}
        self.dropped_torn_line = False
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        # A file that does not end in a newline was interrupted mid-write: its last line is torn.
        torn = lines.pop() if lines else b""
        if torn.strip():
            self.dropped_torn_line = True
        for lineno, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
                key = sample_key(record)
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(
                    f"{self.path}: line {lineno} is not a sample record ({err}); "
                    "this file was not written by 'stapo eval' or was edited"
                ) from None
            self.records[key] = record
        if self.dropped_torn_line:
            # Truncate the torn tail so the next append starts on a fresh line.
            with open(self.path, "r+b") as fh:
                fh.truncate(len(data) - len(torn))

    def __contains__(self, key: SampleKey) -> bool:
        return key in self.records

    def __len__(self) -> int:
        return len(self.records)

    def get(self, key: SampleKey) -> dict | None:
        return self.records.get(key)

    def append(self, records: list[dict]) -> None:
        """Append records and fsync: after this returns they survive a crash."""
        if not records:
            return
        lines = []
        for r in records:
            missing = [f for f in self.REQUIRED if f not in r]
            if missing:
                raise ValueError(f"sample record lacks {missing}")
            lines.append(json.dumps(r, ensure_ascii=False) + "\n")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write("".join(lines))
            fh.flush()
            os.fsync(fh.fileno())
        for r in records:
            self.records[sample_key(r)] = r
