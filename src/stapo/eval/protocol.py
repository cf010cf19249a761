"""The evaluation protocol as plain data: benchmarks, sampling settings, default k, per-sample seeds.

The paper reports avg@k on six benchmarks under two sampling settings; k follows JustRL's protocol
(32 samples for the small AIME/AMC sets, 4 for the larger ones). Those numbers are the paper's table,
`stapo.paper_setup.EVAL`, and are read from it here. Greedy decoding (T = 0, one sample per problem)
is the third column papers put beside them (not the paper's protocol: defined here).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from stapo.data.loaders import BENCHMARKS
from stapo.paper_setup import EVAL

__all__ = [
    "BENCHMARKS",
    "BENCHMARK_TITLES",
    "DEFAULT_SAMPLES",
    "SETTINGS",
    "SETTING_GROUPS",
    "SamplingSetting",
    "parse_benchmarks",
    "parse_settings",
    "sample_seed",
]

# BENCHMARKS (stapo.data) is in the paper's table order, the display order.
BENCHMARK_TITLES = {
    "aime24": "AIME24",
    "aime25": "AIME25",
    "amc23": "AMC23",
    "math500": "MATH500",
    "minerva": "Minerva",
    "olympiadbench": "OlympiadBench",
}
# k per benchmark when `stapo eval` is given no --samples: the paper's
DEFAULT_SAMPLES: dict[str, int] = dict(EVAL.samples)


@dataclass(frozen=True)
class SamplingSetting:
    name: str
    temperature: float  # 0 = greedy (argmax) decoding
    top_p: float
    samples: int | None = None  # a fixed k for every benchmark (greedy: more samples would be copies)


SETTINGS = {
    # the paper's two: "train", the training-aligned one (sample from the policy exactly as RL rollouts
    # do), and "nucleus"
    **{name: SamplingSetting(name, temperature=t, top_p=p) for name, (t, p) in EVAL.settings.items()},
    "greedy": SamplingSetting("greedy", temperature=0.0, top_p=1.0, samples=1),
}
# --setting names for groups of settings: the paper's pair ("both") and those plus greedy ("all")
SETTING_GROUPS = {EVAL.setting_group: tuple(EVAL.settings), "all": (*EVAL.settings, "greedy")}


def parse_benchmarks(spec: str) -> list[str]:
    """'all' or a comma-separated list of names (case-insensitive) -> names in table order."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("--benchmarks: give 'all' or a comma-separated list of " + ", ".join(BENCHMARKS))
    if spec.strip().lower() == "all":
        return list(BENCHMARKS)
    names = [s.strip().lower() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise ValueError(f"--benchmarks: unknown benchmark {unknown[0]!r}; known: all, " + ", ".join(BENCHMARKS))
    return [b for b in BENCHMARKS if b in names]


def parse_settings(spec: str) -> list[str]:
    """'train' | 'nucleus' | 'greedy' | 'both' (the two sampled ones) | 'all' (those and greedy)."""
    if spec in SETTING_GROUPS:
        return list(SETTING_GROUPS[spec])
    if spec not in SETTINGS:
        raise ValueError(f"--setting: unknown setting {spec!r}; choose "
                         + ", ".join(list(SETTINGS) + list(SETTING_GROUPS)))
    return [spec]


def sample_seed(seed: int, benchmark: str, setting: str, problem_id: str, sample_idx: int) -> int:
    """A 63-bit seed per (run seed, benchmark, setting, problem, sample index).

    Derived by hashing, not by position, so a resumed run, a --limit change or another batch size
    draws the same random numbers for the same sample.
    """
    h = hashlib.sha256(f"{seed}\x1f{benchmark}\x1f{setting}\x1f{problem_id}\x1f{sample_idx}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)
