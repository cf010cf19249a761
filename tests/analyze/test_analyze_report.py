"""The HTML report and `stapo analyze tokens --rollouts`: the S2T tokens marked in the page are exactly
`core.s2t_mask`'s, the page is self-contained, and it loads in a real headless browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from stapo.cli import main
from stapo.core import S2TSettings, s2t_mask
from stapo.data.rollouts import read_rollouts, write_rollouts

REPO = Path(__file__).resolve().parents[2]


def _records(n_samples=12, seed=0):
    """Random but realistic samples: per-token stats from explicit softmax distributions."""
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n_samples):
        n = int(rng.integers(3, 40))
        logits = rng.normal(0, 1, (n, 64))
        logits[np.arange(n), rng.integers(0, 64, n)] += rng.uniform(0, 14, n)  # some confident positions
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        a = rng.integers(0, 64, n)
        reward = float(i % 3 == 0)
        recs.append({
            "prompt": f"<|user|>What is {i} + 1?<|assistant|>", "completion": "...",
            "reward": reward, "advantage": 1.2 if reward else -0.6,
            "token_id": a, "token_text": [["<b>&", " x", "\n", "", "9"][k % 5] for k in range(n)],
            "logprob": np.log(probs[np.arange(n), a]), "entropy": -(probs * np.log(probs)).sum(1),
            "collision": (probs**2).sum(1), "s2t": np.zeros(n, bool),
        })
    return recs


class _Spans(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tokens, self.s2t, self.srcs = [], set(), []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("src", "href"):
            if key in a:
                self.srcs.append(a[key])
        if tag == "span" and "tok" in (a.get("class") or "").split():
            pos = (int(a["data-sample"]), int(a["data-pos"]))
            self.tokens.append(pos)
            if "s2t" in a["class"].split():
                self.s2t.add(pos)


@pytest.fixture()
def run_dir(tmp_path):
    run = tmp_path / "run"
    write_rollouts(run, 3, _records(12, 0), metadata={"tau_p": 0.01})
    write_rollouts(run, 6, _records(8, 1))
    with (run / "metrics.jsonl").open("w") as f:
        for s in range(1, 8):
            f.write(json.dumps({"step": s, "reward": s / 10, "entropy": 0.4, "stapo/s2t_masked_frac": 0.0}) + "\n")
    return run


def test_report_marks_exactly_core_s2t_mask(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["analyze", "tokens", "--rollouts", str(run_dir), "--out", str(out), "--tau-p", "0.2",
            "--tau-h-quantile", "0.3", "--max-samples-shown", "1000"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "threshold sweep" in printed and "S2T applied" in printed

    ro = read_rollouts(run_dir)
    pad = ro.padded()
    core = s2t_mask(pad["logprobs"], pad["entropy"], pad["advantages"], pad["response_mask"],
                    settings=S2TSettings.resolve(tau_p=0.2, tau_h_quantile=0.3))
    expected = {(int(i), int(t)) for i, t in torch.nonzero(core).tolist()}
    assert expected, "the data must contain S2T tokens for this test to mean something"

    html = (out / "tokens.html").read_text(encoding="utf-8")
    spans = _Spans()
    spans.feed(html)
    assert len(spans.tokens) == ro.num_tokens  # every token of every sample is shown
    assert spans.s2t == expected
    # tooltips carry p, H, A
    m = re.search(r'class="tok s2t"[^>]*data-p="([^"]+)" data-h="([^"]+)" data-a="([^"]+)"', html)
    assert m and float(m.group(1)) < 0.2 and float(m.group(3)) > 0
    # escaped token text, never raw markup from the model
    assert "&lt;b&gt;&amp;" in html and "<b>&" not in html
    # self-contained: every src/href is a data URI, no http(s) anywhere
    assert spans.srcs and all(s.startswith("data:image/png;base64,") for s in spans.srcs)
    assert not re.search(r"https?://", html)
    # the figures: scatter, histogram, and the run's curves (metrics.jsonl sits next to rollouts/)
    assert html.count("data:image/png;base64,") == 3
    summary = json.loads((out / "tokens_summary.json").read_text())
    assert summary["summary"]["count_s2t"] == len(expected)
    assert summary["summary"]["captured_s2t_count"] == 0
    for name in ("p_vs_entropy.png", "grad_proxy_hist.png", "curves.png"):
        assert (out / name).stat().st_size > 5000


def test_cli_tokens_bad_inputs(tmp_path, capsys):
    def err_of(args):
        assert main(["analyze", "tokens", *args]) == 2
        e = capsys.readouterr().err
        assert "Traceback" not in e and len(e.strip().splitlines()) == 1
        return e

    (tmp_path / "empty" / "rollouts").mkdir(parents=True)
    assert "no rollout files" in err_of(["--rollouts", str(tmp_path / "empty")])
    assert "no such rollout" in err_of(["--rollouts", str(tmp_path / "missing")])
    assert "--data needs --model" in err_of(["--data", "synthetic:add1?n=2"])
    # the S2T flags are checked by stapo.core.settings, the message names the flag
    assert "--tau-p must be a number in [0, 1]" in err_of(["--rollouts", str(tmp_path), "--tau-p", "2"])
    assert "--tau-h must be a number >= 0" in err_of(["--rollouts", str(tmp_path), "--tau-h", "-1"])
    assert "--tau-h-quantile must be a number in [0, 1]" in err_of(["--rollouts", str(tmp_path), "--tau-h-quantile",
                                                                     "1.5"])
    write_rollouts(tmp_path / "r", 0, [{**_records(1)[0], "token_id": [], "token_text": [], "logprob": [],
                                         "entropy": [], "collision": [], "s2t": []}])
    assert "no completion tokens" in err_of(["--rollouts", str(tmp_path / "r")])


# ---------------------------------------------------------------------------------- real browser

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND", "--enable-logging=stderr", "--v=0", "--hide-scrollbars",
]


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("chromium is not installed (apt-get install chromium; CI installs it via scripts/setup.sh dev)")


def _browse(html_path: Path, *extra: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, html_path.as_uri()],
            capture_output=True, text=True, timeout=60,
        )


def _page_errors(html_path: Path) -> tuple[str, list[str], bool]:
    """(DOM after scripts ran, console lines logged by the page, whether the page's own script finished)."""
    res = _browse(html_path, "--dump-dom")
    console = [ln for ln in res.stderr.splitlines() if "CONSOLE" in ln]
    m = re.search(r'<pre id="js-errors">(.*?)</pre>', res.stdout, re.S)
    return (m.group(1) if m else None), console, 'data-js-ok="1"' in res.stdout


@pytest.mark.browser
def test_report_in_headless_chromium(run_dir, tmp_path):
    chromium = _chromium()
    # the error detection itself works: a page that throws is caught both ways
    bad = tmp_path / "bad.html"
    from stapo.analyze.report import build_report

    script = "<script>console.error('x'); throw new Error('boom')</script>"
    bad.write_text(build_report("bad").replace("</body>", script + "</body>"))
    errors, console, _ = _page_errors(bad)
    assert "boom" in errors and any("boom" in ln for ln in console)

    out = tmp_path / "out"
    assert main(["analyze", "tokens", "--rollouts", str(run_dir), "--out", str(out), "--tau-p", "0.2",
                 "--tau-h-quantile", "0.3"]) == 0
    page = out / "tokens.html"
    errors, console, finished = _page_errors(page)
    assert errors == "" and console == [] and finished, (errors, console)

    artifacts = Path(os.environ.get("STAPO_TEST_ARTIFACTS") or REPO / "artifacts")
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / "analyze_tokens_report.png"
    if shot.exists():
        shot.unlink()
    res = _browse(page, f"--screenshot={shot}", "--window-size=1280,2400")
    assert shot.is_file(), f"{chromium} wrote no screenshot: {res.stderr[-500:]}"
    from matplotlib.image import imread

    img = imread(shot)
    assert img.shape[:2] == (2400, 1280)
    rgb = img[..., :3]
    assert float(rgb.std()) > 0.05  # not blank
    # the inlined figures rendered: plenty of pixels that are neither white nor near-white
    assert float((rgb.mean(-1) < 0.8).mean()) > 0.02


def test_console_is_short_with_units_and_the_applied_tau_h(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["analyze", "tokens", "--rollouts", str(run_dir), "--out", str(out), "--tau-p", "0.2",
                 "--tau-h-quantile", "0.3"]) == 0
    printed = capsys.readouterr().out
    assert len(printed.strip().splitlines()) <= 36  # the full tables are in the JSON and the HTML
    summary = json.loads((out / "tokens_summary.json").read_text())["summary"]
    tau_h = f"{summary['tau_h']:.4g} nats"
    head, rest = printed.split("tau_h readings", 1)
    readings, sweep = rest.split("threshold sweep", 1)
    # the applied tau_h: in the summary and in both tables
    assert f"tau_p = 0.2, tau_h = {tau_h}" in head
    assert f"applied     {tau_h}" in readings
    applied = next(line for line in sweep.splitlines() if line.startswith(f"applied ({tau_h})"))
    cell = re.search(r"\[([0-9.]+)% \((\d+)\)\]", applied)  # the applied cell: the S2T set of the summary
    assert cell and int(cell.group(2)) == summary["count_s2t"]
    assert float(cell.group(1)) == pytest.approx(100 * summary["frac_s2t"], rel=1e-3)
    # every number with its unit: % of tokens, nats; no bare fractions beside percentages
    assert "% of tokens silenced" in readings and "% of tokens silenced" in sweep
    assert re.search(r"\d nats, [0-9.]+%", readings)
    assert "masked %" not in printed and "grad² share" not in printed
    share = re.search(r"carrying ([0-9.]+)% of the total grad-norm\^2", head)
    assert share and float(share.group(1)) == pytest.approx(100 * summary["grad_share_s2t"], rel=1e-2)


def test_special_tokens_are_not_shown_as_text():
    from stapo.analyze.report import build_report
    from stapo.data.rollouts import rollouts_from_records

    rec = _records(1)[0]
    n = 3
    rec.update(token_id=np.arange(n), token_text=[" 4", "2", "<|im_end|>"], completion=" 42",
               logprob=np.log([0.5, 0.6, 0.7]), entropy=np.array([0.2, 0.3, 0.4]), collision=np.array([0.3] * n),
               s2t=np.zeros(n, bool))
    ro = rollouts_from_records([rec])
    page = build_report("t", rollouts=ro, s2t_flat=ro.s2t)
    tokens_html = page.split('<div class="tokens">')[1].split("</div>")[0]
    assert "im_end" not in tokens_html
    spans = _Spans()
    spans.feed(page)
    assert len(spans.tokens) == n  # the end token keeps its place (and its p, H, A on hover)
    assert re.search(r'class="tok special"[^>]*>∎</span>', tokens_html)
