"""One self-contained HTML report: no network, no external files (PNGs inlined as data URIs).

Sections (each optional): the token summary, the p-vs-H and gradient-proxy figures, the threshold
sweep, sample completions with every token coloured by its gradient-norm² proxy (S2T tokens outlined,
a tooltip with p, H, A and the proxy), and the training curves of runs.
"""

from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path

import numpy as np

from stapo.analyze.tokens import APPLIED, Sweep, TokenSummary, format_summary, sweep_row_name
from stapo.rundir import atomic_write_text

DEFAULT_MAX_SAMPLES = 24
MAX_TOKENS_PER_SAMPLE = 2048

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1200px;
     color:#1d1d1f;background:#fff;padding:0 16px}
h1{font-size:1.6em;margin-bottom:4px}
h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
pre.summary{background:#f6f8fa;padding:12px;border-radius:6px;font-size:13px;overflow-x:auto}
table.sweep{border-collapse:collapse;font-size:13px;margin:8px 0 16px}
table.sweep td,table.sweep th{border:1px solid #ddd;padding:3px 8px;text-align:right}
table.sweep th{background:#f0f0f0} table.sweep td.hi{background:#fff2c6}
img.fig{max-width:100%;border:1px solid #eee;margin:6px 0}
.figs{display:flex;flex-wrap:wrap;gap:12px}
.sample{border:1px solid #e3e3e3;border-radius:6px;padding:8px 10px;margin:10px 0}
.meta{font-size:12px;color:#555;margin-bottom:6px}
.prompt{font-size:12px;color:#666;white-space:pre-wrap;margin-bottom:4px}
.tokens{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;white-space:pre-wrap;line-height:1.7}
.tok{border-radius:2px;cursor:default} .tok.special{color:#888;font-size:11px}
.tok.s2t,.s2t-key{outline:2px solid #000;font-weight:bold;background:#ff2d2d !important;color:#fff}
.legend span{display:inline-block;padding:1px 6px;margin-right:4px;font-size:12px;font-family:monospace}
#tip{position:fixed;display:none;background:#222;color:#fff;font:12px monospace;padding:4px 6px;border-radius:4px;
     pointer-events:none;z-index:10;white-space:pre}
.note{color:#8a5a00;font-size:13px}
#js-errors{color:#b00;white-space:pre-wrap}
"""

# Installed first, so any later script error is written into the page (the browser test reads it).
_ERROR_HOOK = """
window.__stapoErrors = [];
window.addEventListener('error', function (e) {
  window.__stapoErrors.push(String(e.message || e));
  var box = document.getElementById('js-errors');
  if (box) { box.textContent = window.__stapoErrors.join('\\n'); }
});
"""

_TOOLTIP_JS = """
(function () {
  var tip = document.getElementById('tip');
  document.addEventListener('mouseover', function (e) {
    var t = e.target;
    if (!t.classList || !t.classList.contains('tok')) { tip.style.display = 'none'; return; }
    var d = t.dataset;
    tip.textContent = 'p = ' + d.p + '\\nH = ' + d.h + ' nats\\nA = ' + d.a + '\\n1-2p+\\u03a3\\u03c0\\u00b2 = ' + d.g +
      (t.classList.contains('s2t') ? '\\nS2T: silenced' : '');
    tip.style.display = 'block';
  });
  document.addEventListener('mousemove', function (e) {
    tip.style.left = (e.clientX + 12) + 'px'; tip.style.top = (e.clientY + 12) + 'px';
  });
  var box = document.getElementById('js-errors');
  if (box && window.__stapoErrors.length) { box.textContent = window.__stapoErrors.join('\\n'); }
  document.body.setAttribute('data-js-ok', '1');
})();
"""


def proxy_color(g: float) -> str:
    """Background colour for a gradient-norm² proxy g ∈ [0, 2]: white (0) -> amber (1) -> red (2)."""
    x = min(max(g / 2.0, 0.0), 1.0)
    hue = 45 - 45 * x
    light = 98 - 48 * x
    return f"hsl({hue:.0f},95%,{light:.0f}%)"


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="fig" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _fmt_pct(x: float) -> str:
    if x == 0:
        return "0"
    return f"{100 * x:.4f}%" if x < 1e-3 else f"{100 * x:.3f}%"


def sweep_table_html(sw: Sweep, value: str, applied_tau_p: float) -> str:
    """The sweep as a table (cells in % of tokens); the applied cell (row `APPLIED`, column τ_p) highlighted."""
    head = "".join(f"<th>{p:g}</th>" for p in sw.tau_p)
    rows = []
    for label in sw.tau_h_labels:
        cells = [sw.cell(label, p) for p in sw.tau_p]
        name = sweep_row_name(sw, label)
        tds = []
        for c in cells:
            cls = ' class="hi"' if (label == APPLIED and c.tau_p == applied_tau_p) else ""
            text = f"{_fmt_pct(c.frac)} ({c.count})" if value == "frac" else _fmt_pct(getattr(c, value))
            tds.append(f'<td{cls} data-tau-h="{html.escape(label)}" data-tau-p="{c.tau_p:g}">{text}</td>')
        rows.append(f"<tr><th>{html.escape(name)}</th>{''.join(tds)}</tr>")
    return f'<table class="sweep"><tr><th>τ_h \\ τ_p</th>{head}</tr>{"".join(rows)}</table>'


SPECIAL_TOKEN_MARK = "∎"  # shown in place of a special token (end of turn, end of text): its markup is not text


def _token_text(t: str) -> str:
    if t == "":
        return "∅"
    if is_special_token(t):
        return SPECIAL_TOKEN_MARK
    return html.escape(t.replace("\n", "↵\n"))


# Chat-template markup: ChatML/Qwen/SmolLM "<|im_start|>", Llama "<|start_header_id|>", "<s>", "</s>".
_CHAT_TOKEN = re.compile(r"<\|[^|<>\s]{1,40}\|>|</?s>")
_CHATML_TURN = re.compile(r"<\|im_start\|>(\w+)\n(.*?)(?=<\|im_end\|>|<\|im_start\|>|$)", re.S)


def is_special_token(text: str) -> bool:
    """A token that is chat-template markup (`<|im_end|>`, `<|endoftext|>`, `</s>`), not text."""
    return _CHAT_TOKEN.fullmatch(text.strip()) is not None


def prompt_text(prompt: str, chars: int = 160) -> str:
    """What the user asked, for display: the last user turn of a chat-templated prompt without its
    special tokens, shortened from the front at a word boundary (the question is at the end)."""
    turns = [(role, body) for role, body in _CHATML_TURN.findall(prompt) if role == "user"]
    text = turns[-1][1] if turns else _CHAT_TOKEN.sub(" ", prompt)
    text = text.strip()
    if len(text) <= chars:
        return text
    tail = text[-chars:]
    cut = re.search(r"\s", tail)  # drop the partial first word
    return "… " + (tail[cut.end():] if cut and cut.end() < len(tail) else tail).lstrip()


def _token_groups(tokens: list[str], completion: str) -> list[tuple[int, int, str]]:
    """(first, end, text) display groups of a completion's tokens.

    A multi-byte character split across byte-level tokens decodes token by token as U+FFFD ("�");
    a run of such tokens is shown as one group holding the characters the completion text has at
    that place. Tokens that do not line up with the completion are shown as they are.
    """
    groups: list[tuple[int, int, str]] = []
    pos, k, n = 0, 0, len(tokens)
    while k < n:
        t = tokens[k]
        if "\ufffd" not in t:
            if completion.startswith(t, pos):
                pos += len(t)
            groups.append((k, k + 1, t))
            k += 1
            continue
        end = k
        while end < n and "\ufffd" in tokens[end]:
            end += 1
        nxt = tokens[end] if end < n else None
        stop = completion.find(nxt, pos) if nxt else len(completion)
        merged = completion[pos:stop] if stop >= pos else ""
        if merged and "\ufffd" not in merged and len(merged) <= 4 * (end - k):
            groups.append((k, end, merged))
            pos = stop
        else:
            groups.extend((j, j + 1, tokens[j]) for j in range(k, end))
        k = end
    return groups


def samples_html(rollouts, s2t_flat: np.ndarray, max_samples: int = DEFAULT_MAX_SAMPLES,
                 from_run: bool = True) -> str:
    """Completions with coloured tokens; samples holding S2T tokens first (largest proxy first).

    `from_run`: the samples were captured during training, so their step is shown."""
    ro = rollouts
    s2t_flat = np.asarray(s2t_flat, dtype=bool)
    order_hit, order_rest = [], []
    for i in range(ro.num_samples):
        sl = ro.token_slice(i)
        if s2t_flat[sl].any():
            order_hit.append((-float(ro.grad_proxy[sl][s2t_flat[sl]].max()), i))
        else:
            order_rest.append((-float(ro.advantage[i]), i))
    chosen = [i for _, i in sorted(order_hit)] + [i for _, i in sorted(order_rest)]
    chosen = chosen[:max_samples]
    out = []
    for i in chosen:
        sl = ro.token_slice(i)
        n = sl.stop - sl.start
        spans = []
        shown_tokens = [str(t) for t in ro.token_text[sl.start:sl.start + min(n, MAX_TOKENS_PER_SAMPLE)]]
        for first, end, text in _token_groups(shown_tokens, str(ro.completion[i])):
            # a group of several tokens (one split character) shows the stats of its largest-proxy token
            j = sl.start + max(range(first, end), key=lambda q: float(ro.grad_proxy[sl.start + q]))
            p = math.exp(float(ro.logprob[j]))
            g = float(ro.grad_proxy[j])
            cls = "tok s2t" if s2t_flat[sl.start + first:sl.start + end].any() else "tok"
            title = f"p={p:.3g} H={float(ro.entropy[j]):.3g} A={float(ro.advantage[i]):.3g} g={g:.3f}"
            if is_special_token(text):
                cls += " special"
                title = "end of the completion (a special token); " + title
            if end - first > 1:
                title += f" ({end - first} tokens)"
            spans.append(
                f'<span class="{cls}" style="background:{proxy_color(g)}" data-sample="{i}" data-pos="{first}" '
                + (f'data-tokens="{end - first}" ' if end - first > 1 else "")
                + f'data-p="{p:.4g}" data-h="{float(ro.entropy[j]):.4g}" data-a="{float(ro.advantage[i]):.4g}" '
                f'data-g="{g:.4f}" title="{title}">{_token_text(text)}</span>'
            )
        more = f" … ({n - MAX_TOKENS_PER_SAMPLE} more tokens)" if n > MAX_TOKENS_PER_SAMPLE else ""
        reward = "n/a" if not np.isfinite(ro.reward[i]) else f"{float(ro.reward[i]):g}"
        out.append(
            f'<div class="sample" id="sample-{i}"><div class="meta">'
            + (f"step {int(ro.step[i])}, " if from_run else "")
            + f"sample {int(ro.sample[i])} · "
            f"reward {reward} · advantage {float(ro.advantage[i]):.3g} · {n} tokens · "
            f"{int(s2t_flat[sl].sum())} S2T</div>"
            f'<div class="prompt">{html.escape(prompt_text(ro.prompt[i]))}</div>'
            f'<div class="tokens">{"".join(spans)}{more}</div></div>'
        )
    shown = f"{len(chosen)} of {ro.num_samples} samples"
    legend = "".join(f'<span style="background:{proxy_color(g)}">{g:g}</span>' for g in (0, 0.5, 1.0, 1.5, 2.0))
    return (
        f'<p class="legend">Token colour = gradient-norm² proxy 1 − 2p + Σπ²: {legend}'
        f'<span class="s2t-key">S2T</span> = silenced by S2T; {SPECIAL_TOKEN_MARK} = the end-of-turn token. '
        f"Hover a token for p, H, A. ({shown}; samples with S2T tokens first.)</p>" + "".join(out)
    )


def build_report(
    title: str,
    summary: TokenSummary | None = None,
    sweep: Sweep | None = None,
    rollouts=None,
    s2t_flat=None,
    figures: list[tuple[str, bytes]] | None = None,
    curves_png: bytes | None = None,
    runs_text: str | None = None,
    notes: list[str] | None = None,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    from_run: bool = True,
    populations=None,
) -> str:
    """The HTML text of the report (write it with `write_report`). `from_run`: the rollouts were
    captured in a training run (their step is shown), not sampled for this analysis."""
    parts = [f"<h1>{html.escape(title)}</h1>"]
    for note in notes or []:
        parts.append(f'<p class="note">{html.escape(note)}</p>')
    if summary is not None:
        parts.append("<h2>Token summary</h2>")
        parts.append(f'<pre class="summary" id="summary">{html.escape(format_summary(summary))}</pre>')
    if figures:
        parts.append("<h2>Token figures</h2><div class=\"figs\">")
        parts.extend(_img(png, alt) for alt, png in figures)
        parts.append("</div>")
    if sweep is not None:
        tau_p = summary.tau_p if summary else float("nan")
        parts.append("<h2>Threshold sweep</h2>")
        parts.append(
            f"<p>% of the {sweep.tokens} valid tokens silenced (count) — rows τ_h as a quantile of all "
            "tokens' entropies, in absolute nats, and the applied τ_h; columns τ_p; the applied settings "
            "highlighted. The paper reports ≈ 0.01%.</p>"
        )
        parts.append(sweep_table_html(sweep, "frac", tau_p))
        parts.append("<p>Share of the total gradient-norm² (Σ 1 − 2p + Σπ²) carried by the S2T set, in %:</p>")
        parts.append(sweep_table_html(sweep, "grad_share", tau_p))
    if populations:
        parts.append("<h2>The three τ_h readings</h2>")
        parts.append(
            "<p>τ_h = the q-quantile of the entropies of each population: <b>valid</b> (all valid tokens, the "
            "literal reading), <b>low_prob</b> (p &lt; τ_p), <b>candidates</b> (p &lt; τ_p, A &gt; 0). "
            "“pctl”: where τ_h falls among all valid entropies (% below it) — silenced tokens should sit at "
            "confident positions.</p>")
        parts.append(population_table_html(populations))
    if rollouts is not None and s2t_flat is not None:
        parts.append("<h2>Sample completions</h2>")
        parts.append(samples_html(rollouts, s2t_flat, max_samples, from_run=from_run))
    if curves_png is not None or runs_text:
        parts.append("<h2>Training curves</h2>")
        if curves_png is not None:
            parts.append(_img(curves_png, "training curves"))
        if runs_text:
            parts.append(f'<pre class="summary">{html.escape(runs_text)}</pre>')
    body = "\n".join(parts)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style><script>{_ERROR_HOOK}</script></head>"
        f'<body><div id="tip"></div>{body}\n<pre id="js-errors"></pre><script>{_TOOLTIP_JS}</script></body></html>\n'
    )


def population_table_html(rows) -> str:
    head = ("<tr><th>population</th><th>q</th><th>size (tokens)</th><th>τ_h (nats)</th><th>pctl (%)</th>"
            "<th>silenced (tokens)</th><th>silenced (% of tokens)</th><th>grad-norm² share (%)</th>"
            "<th>A²·grad-norm² share (%)</th><th>silenced H mean / max (nats)</th></tr>")
    body = []
    for r in rows:
        thr = "empty" if r.threshold is None else f"{r.threshold:.4g}"
        pct = "—" if r.threshold_percentile is None else f"{r.threshold_percentile:.1f}"
        sil = ("—" if r.silenced_entropy_mean is None
               else f"{r.silenced_entropy_mean:.3g} / {r.silenced_entropy_max:.3g}")
        cells = [r.population, f"{r.quantile:g}", str(r.population_size), thr, pct, str(r.masked),
                 f"{100 * r.masked_frac:.4f}", f"{100 * r.grad_share:.3f}", f"{100 * r.grad_share_weighted:.3f}", sil]
        body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return f'<table class="sweep" id="populations">{head}{"".join(body)}</table>'


def write_report(path: str | Path, text: str) -> Path:
    """Write atomically (`stapo.rundir.atomic_write_text`)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(p, text)
