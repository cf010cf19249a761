"""Prompts and benchmarks as verl RL parquet files (the columns `verl.utils.dataset.RLHFDataset` reads).

    python -m stapo.engines.verl.data --train <jsonl | parquet | hub id> --out data/verl [--benchmarks all]

Each row: `data_source`, `prompt` (chat messages; verl applies the model's chat template),
`ability` = "math", `reward_model` = {"style": "rule", "ground_truth": answer}, `extra_info`
= {"index", "id", "split"}. Training rows come from `stapo.data.load_prompts`, benchmark rows
from `stapo.data.load_benchmark` (ungradable rows are skipped and counted).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from stapo.data import BENCHMARKS, build_messages, load_benchmark, load_prompts
from stapo.rundir import atomic_write_bytes

__all__ = ["prepare", "to_verl_rows", "write_parquet"]


def to_verl_rows(rows, data_source: str, split: str, template: str = "boxed") -> list[dict]:
    """verl rows from stapo prompt rows (`{"id", "problem", "answer", ...}`)."""
    out = []
    for index, row in enumerate(rows):
        answer = row.get("answer")
        if answer is None or not str(answer).strip():
            raise ValueError(f"{data_source}: row {index} (id {row.get('id')!r}) has no answer")
        out.append(
            {
                "data_source": data_source,
                "prompt": build_messages(row["problem"], template),
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": str(answer)},
                "extra_info": {"index": index, "id": str(row.get("id", index)), "split": split},
            }
        )
    return out


def write_parquet(rows: list[dict], path: str | os.PathLike) -> Path:
    """Write rows atomically (a temporary file renamed into place)."""
    if not rows:
        raise ValueError(f"{path}: no rows to write")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return atomic_write_bytes(path, buffer.getvalue().to_pybytes())


def prepare(
    train: str,
    out_dir: str | os.PathLike,
    benchmarks=BENCHMARKS,
    data_dir: str | os.PathLike | None = None,
    template: str = "boxed",
    problem_key: str = "problem",
    answer_key: str = "answer",
    limit: int | None = None,
) -> dict[str, Path]:
    """Write `train.parquet` and `<benchmark>.parquet` files into `out_dir`; returns their paths."""
    out = Path(out_dir)
    written = {}
    train_rows = load_prompts(train, problem_key=problem_key, answer_key=answer_key, limit=limit)
    written["train"] = write_parquet(to_verl_rows(train_rows, "dapo_math", "train", template), out / "train.parquet")
    for name in benchmarks:
        rows = [r for r in load_benchmark(name, data_dir=data_dir) if not r.get("ungradable")]
        written[name] = write_parquet(to_verl_rows(rows, name, "test", template), out / f"{name}.parquet")
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stapo.engines.verl.data", description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True, help="training prompts: .jsonl/.parquet file or hub id")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--benchmarks", default="all", help="comma-separated names, 'all' or 'none'")
    parser.add_argument("--data-dir", default=None, help="folder with the benchmark .jsonl files")
    parser.add_argument("--template", default="boxed", help="prompt template (stapo.data.PROMPT_TEMPLATES)")
    parser.add_argument("--problem-key", default="problem")
    parser.add_argument("--answer-key", default="answer")
    parser.add_argument("--limit", type=int, default=None, help="keep the first N training rows")
    args = parser.parse_args(argv)
    names: tuple[str, ...]
    if args.benchmarks == "all":
        names = BENCHMARKS
    elif args.benchmarks == "none":
        names = ()
    else:
        names = tuple(n.strip() for n in args.benchmarks.split(",") if n.strip())
        unknown = [n for n in names if n not in BENCHMARKS]
        if unknown:
            parser.error(f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}")
    paths = prepare(args.train, args.out, names, args.data_dir, args.template, args.problem_key, args.answer_key,
                    args.limit)
    for name, path in paths.items():
        print(f"{name}: {path} ({pq.ParquetFile(path).metadata.num_rows} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
