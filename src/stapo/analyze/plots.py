"""The figures of `stapo analyze`, rendered to PNG bytes with matplotlib's Agg backend (no display).

    p_vs_entropy_png    token probability vs entropy (log axes), coloured by advantage sign,
                        the S2T region shaded and the S2T tokens highlighted
    grad_proxy_hist_png histogram of the gradient-norm² proxy 1 − 2p + Σπ², S2T vs other tokens
    curves_png          training curves of several runs (or groups of seeds: mean line, min..max
                        band) overlaid, one panel per curve with the titles, axis labels and units of
                        `stapo.analyze.curves`, held-out accuracy as points (step 0 = before training)
                        with error bars, one legend for the figure, integer step ticks
"""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np

from stapo.analyze.curves import (
    CURVES,
    HELDOUT,
    REWARD,
    S2T_MASKED,
    TRAIN_ACCURACY,
    Curve,
    heldout_size_text,
    s2t_title,
)
from stapo.analyze.runs import applies_s2t, run_label

MAX_SCATTER_POINTS = 20_000
ENTROPY_FLOOR = 1e-6  # the log axes reach at least this low (lower when the data does)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def p_vs_entropy_png(prob, entropy, advantage, s2t, tau_p: float, tau_h: float, seed: int = 0) -> bytes:
    """Scatter of p (x) vs H (y); every S2T token is drawn, other tokens are subsampled if many."""
    plt = _pyplot()
    prob = np.asarray(prob, dtype=np.float64)
    ent = np.asarray(entropy, dtype=np.float64)
    # log axes: the floors follow the data, zero entropies are drawn on the floor
    xfloor = max(float(prob[prob > 0].min()) * 0.5 if (prob > 0).any() else ENTROPY_FLOOR, 1e-12)
    yfloor = max(float(ent[ent > 0].min()) * 0.5 if (ent > 0).any() else ENTROPY_FLOOR, 1e-12)
    xfloor, yfloor = min(xfloor, tau_p * 0.1, ENTROPY_FLOOR), min(yfloor, max(tau_h, 1e-12) * 0.1, ENTROPY_FLOOR)
    prob = np.clip(prob, xfloor, 1.0)
    ent = np.clip(ent, yfloor, None)
    adv = np.asarray(advantage, dtype=np.float64)
    s2t = np.asarray(s2t, dtype=bool)
    others = np.nonzero(~s2t)[0]
    if others.size > MAX_SCATTER_POINTS:
        others = np.sort(np.random.default_rng(seed).choice(others, MAX_SCATTER_POINTS, replace=False))
    fig, ax = plt.subplots(figsize=(7, 5))
    ymax = max(float(ent.max()) * 1.5, tau_h * 2, 1.0)
    ax.add_patch(plt.Rectangle((xfloor, yfloor), max(tau_p - xfloor, 0), max(tau_h - yfloor, 0),
                               color="#f4a6a6", alpha=0.35, lw=0, label=f"S2T region (p<{tau_p:g}, H<{tau_h:.3g})"))
    for sign, color, name in ((1, "#2a9d4b", "A > 0"), (-1, "#d1495b", "A < 0"), (0, "#9a9a9a", "A = 0")):
        idx = others[np.sign(adv[others]) == sign]
        if idx.size:
            ax.scatter(prob[idx], ent[idx], s=6, alpha=0.45, color=color, lw=0, label=f"{name} ({idx.size})")
    if s2t.any():
        ax.scatter(prob[s2t], ent[s2t], s=60, marker="*", color="black", label=f"S2T tokens ({int(s2t.sum())})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(xfloor * 0.8, 1.2)
    ax.set_ylim(yfloor * 0.8, ymax)
    ax.set_xlabel("token probability p = π(a)")
    ax.set_ylabel("entropy H (nats)")
    ax.set_title("Sampled tokens: probability vs entropy")
    ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
    ax.grid(True, which="major", alpha=0.3)
    return _png(fig)


def entropy_change_scatter_png(delta_h, grad_proxy, advantage, s2t, seed: int = 0) -> bytes:
    """Scatter of the gradient-norm² proxy (x) vs the first-order entropy change ΔH/η (y, symlog);
    S2T tokens drawn as stars, the others coloured by the sign of A and subsampled if many."""
    plt = _pyplot()
    dh = np.asarray(delta_h, dtype=np.float64)
    g = np.asarray(grad_proxy, dtype=np.float64)
    adv = np.asarray(advantage, dtype=np.float64)
    s2t = np.asarray(s2t, dtype=bool)
    others = np.nonzero(~s2t)[0]
    if others.size > MAX_SCATTER_POINTS:
        others = np.sort(np.random.default_rng(seed).choice(others, MAX_SCATTER_POINTS, replace=False))
    fig, ax = plt.subplots(figsize=(7, 5))
    for sign, color, name in ((1, "#2a9d4b", "A > 0"), (-1, "#d1495b", "A < 0"), (0, "#9a9a9a", "A = 0")):
        idx = others[np.sign(adv[others]) == sign]
        if idx.size:
            ax.scatter(g[idx], dh[idx], s=6, alpha=0.45, color=color, lw=0, label=f"{name} ({idx.size})")
    if s2t.any():
        ax.scatter(g[s2t], dh[s2t], s=60, marker="*", color="black", label=f"S2T tokens ({int(s2t.sum())})")
    nz = np.abs(dh[dh != 0])
    ax.set_yscale("symlog", linthresh=float(np.quantile(nz, 0.1)) if nz.size else 1e-6)
    ax.axhline(0.0, color="#555", lw=0.6)
    ax.set_xlim(-0.05, 2.05)
    ax.set_xlabel("gradient-norm² proxy 1 − 2p + Σπ²")
    ax.set_ylabel("first-order entropy change ΔH / η")
    ax.set_title("Each token's own update: entropy change vs gradient size")
    ax.legend(loc="upper left", fontsize=8, framealpha=0.9)
    ax.grid(True, which="major", alpha=0.3)
    return _png(fig)


def grad_proxy_hist_png(grad_proxy, s2t) -> bytes:
    """Density histograms of 1 − 2p + Σπ² ∈ [0, 2] for the S2T set and for the other tokens."""
    plt = _pyplot()
    g = np.asarray(grad_proxy, dtype=np.float64)
    s2t = np.asarray(s2t, dtype=bool)
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(0.0, 2.0, 41)
    ax.hist(g[~s2t], bins=bins, color="#4c78a8", alpha=0.7, label=f"other tokens ({int((~s2t).sum())})")
    if s2t.any():
        ax.hist(g[s2t], bins=bins, color="#e45756", alpha=0.8, label=f"S2T tokens ({int(s2t.sum())})")
    ax.set_yscale("log")
    ax.set_xlabel("gradient-norm² proxy ‖∇_z log π(a)‖² = 1 − 2p + Σπ²")
    ax.set_ylabel("tokens")
    ax.set_title("Per-token gradient-norm² (max 2: p → 0 with the mass on another token)")
    ax.legend(fontsize=8)
    return _png(fig)


def _as_band(series) -> SimpleNamespace:
    """A run's `Series` (or a plain (steps, values) pair) or a group's `Band`, as one shape."""
    if hasattr(series, "mean"):
        return series
    steps, values = np.asarray(series[0]), np.asarray(series[1], dtype=np.float64)
    return SimpleNamespace(steps=steps, mean=values, lo=values, hi=values, n=1,
                           stderr=getattr(series, "stderr", None), problems=getattr(series, "problems", None),
                           samples=getattr(series, "samples", None), method=getattr(series, "method", None))


def _same_curve(a: dict | None, b: dict | None) -> bool:
    """Every label has the same points in both panels (training reward and accuracy with 0/1 rewards)."""
    if not a or not b or set(a) != set(b):
        return False
    return all(np.array_equal(a[k].steps, b[k].steps) and np.allclose(a[k].mean, b[k].mean, rtol=0, atol=1e-9)
               for k in a)


def _flat_limits(ax, values: np.ndarray, curve) -> None:
    """A panel whose values are all equal gets a range that shows it (not matplotlib's ±0.05 around the
    value) and says so."""
    values = values[np.isfinite(values)]
    if values.size == 0 or float(values.max() - values.min()) > 1e-12 * max(1.0, float(abs(values).max())):
        return
    v = float(values[0])
    if curve.lower is not None and curve.lower <= v:
        bottom = curve.lower
        top = 2 * v - bottom if v > bottom else bottom + 1.0
        if curve.upper is not None and top > curve.upper:
            top = curve.upper
        if top <= v:  # the value is the upper bound
            top = v + 0.05 * (v - bottom)
    else:
        half = 0.5 * max(abs(v), 1.0) if v else 0.5
        bottom, top = v - half, v + half
    ax.set_ylim(bottom, top)
    ax.text(0.5, 0.85, f"{curve.fmt(v / curve.scale)} at every logged step", transform=ax.transAxes,
            ha="center", fontsize=8, color="#555")


def _heldout_title(bands: dict) -> tuple[str, bool]:
    """The held-out panel's title (the evaluation's size when all share it, what the bars are) and
    whether the sizes differ (then the panel lists each one)."""
    sizes = {(b.problems, b.samples) for b in bands.values()}
    bars = {"min..max over runs" if b.n > 1 else "± standard error over problems"
            for b in bands.values() if b.n > 1 or b.stderr is not None}
    title = CURVES[HELDOUT].title
    if len(sizes) == 1 and heldout_size_text(*next(iter(sizes))):
        title += f", {heldout_size_text(*next(iter(sizes)))}"
    elif len(sizes) > 1:
        title += " (evaluations of different sizes)"
    if bars:
        title += "; bars: " + ", ".join(sorted(bars))
    return title, len(sizes) > 1


def curves_figure(panels: dict[str, dict], window: int = 1, suptitle: str | None = None):
    """The matplotlib figure of `curves_png` (the caller closes it)."""
    plt = _pyplot()
    import textwrap

    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    bands = {name: {label: _as_band(s) for label, s in per.items()} for name, per in panels.items() if per}
    titles = {}
    if _same_curve(bands.get(REWARD), bands.get(TRAIN_ACCURACY)):  # 0/1 rewards: one panel says both
        del bands[TRAIN_ACCURACY]
        titles[REWARD] = f"{CURVES[REWARD].title} (= training accuracy: every reward is 0 or 1)"
    if S2T_MASKED in bands:
        titles[S2T_MASKED] = s2t_title({applies_s2t(b.method) for b in bands[S2T_MASKED].values()})

    styles = ("-", "--", ":", "-.")  # identical curves (stapo with nothing masked vs justrl) stay visible
    labels = list(dict.fromkeys(label for per in bands.values() for label in per))
    color = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    style = {label: styles[i % len(styles)] for i, label in enumerate(labels)}
    names = list(bands)
    cols = min(3, max(1, len(names)))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        curve = CURVES.get(name) or Curve(name, "", "", (name,), lower=None)
        per = bands[name]
        shown = []
        if name == HELDOUT:
            title, differ = _heldout_title(per)
            span = max(float(np.ptp(np.concatenate([b.steps for b in per.values()]))), 1.0)
            for i, (label, b) in enumerate(per.items()):
                x = np.asarray(b.steps, dtype=np.float64) + 0.012 * span * (i - (len(per) - 1) / 2)  # side by side
                y = np.asarray(b.mean, dtype=np.float64) * curve.scale
                if b.n > 1:
                    yerr = np.vstack([y - np.asarray(b.lo) * curve.scale, np.asarray(b.hi) * curve.scale - y])
                elif b.stderr is not None:
                    yerr = np.nan_to_num(np.asarray(b.stderr, dtype=np.float64)) * curve.scale
                else:
                    yerr = None
                size = heldout_size_text(b.problems, b.samples) or "size not recorded"
                ax.errorbar(x, y, yerr=yerr, fmt="o", ls="none", ms=5, capsize=3, color=color[label],
                            label=f"{run_label(label, b.method)}: {size}")
                shown.append(y)
            if differ:
                ax.legend(fontsize=7)
        else:
            title = titles.get(name, curve.title)
            if window > 1:
                title += f" — {window}-step moving average"
            for label, b in per.items():
                y = np.asarray(b.mean, dtype=np.float64) * curve.scale
                ax.plot(b.steps, y, color=color[label], ls=style[label], marker="." if len(b.steps) < 30 else None,
                        lw=1.4)
                if b.n > 1 and len(b.steps) > 1:
                    ax.fill_between(b.steps, np.asarray(b.lo) * curve.scale, np.asarray(b.hi) * curve.scale,
                                    color=color[label], alpha=0.18, lw=0)
                elif b.n > 1:  # one step: the band is a bar
                    ax.vlines(b.steps, np.asarray(b.lo) * curve.scale, np.asarray(b.hi) * curve.scale,
                              color=color[label], alpha=0.4, lw=6)
                shown.append(y)
        ax.set_title(textwrap.fill(title, 48), fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(curve.axis)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # optimizer steps: no "1.5" ticks
        steps = {int(k) for b in per.values() for k in b.steps}
        if len(steps) == 1:  # one logged step: its tick only
            ax.set_xticks(sorted(steps))
        ax.ticklabel_format(axis="y", useOffset=False)  # absolute values, not "1e-6 + 11.92"
        ax.grid(True, alpha=0.3)
        _flat_limits(ax, np.concatenate(shown), curve)
    spare = list(axes.flat)[len(names):]
    for ax in spare:
        ax.axis("off")
    # one legend for the figure: a run (or group) has one colour and line style in every panel
    runs_of = {label: max(per[label].n for per in bands.values() if label in per) for label in labels}
    method_of = {label: next(per[label].method for per in bands.values() if label in per) for label in labels}
    handles = [Line2D([], [], color=color[label], ls=style[label], marker=".") for label in labels]
    texts = [run_label(label, method_of[label]) + (f" (mean of {runs_of[label]} runs; band, bars: min..max)"
                                                   if runs_of[label] > 1 else "") for label in labels]
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    if spare:  # in the first empty cell of the grid
        spare[0].legend(handles, texts, loc="center", fontsize=9, frameon=False, title="runs")
    else:  # below the panels
        fig.legend(handles, texts, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(labels), 3),
                   fontsize=8, frameon=False)
    return fig


def curves_png(panels: dict[str, dict], window: int = 1, suptitle: str | None = None) -> bytes:
    """`panels[curve][label]`: a run's `stapo.analyze.runs.Series` (or a plain (steps, values) pair), or a
    group's `stapo.analyze.runs.Band` (its mean over its runs, drawn with a min..max band when it has
    several). One panel per curve (three a row) with the title, y-axis label and unit of
    `stapo.analyze.curves.CURVES`; a line per label, one legend for the figure. Held-out accuracy is
    drawn as points with error bars (± standard error for a run, min..max for a group) and the
    evaluation's size; the training accuracy panel is left out where it equals the reward (0/1
    rewards); a constant curve gets a range that shows it. `window` > 1: the per-step curves were
    smoothed over that many steps (said in their titles)."""
    return _png(curves_figure(panels, window, suptitle))
