"""The figures of `stapo analyze`, rendered to PNG bytes with matplotlib's Agg backend (no display).

    p_vs_entropy_png    token probability vs entropy (log axes), coloured by advantage sign,
                        the S2T region shaded and the S2T tokens highlighted
    grad_proxy_hist_png histogram of the gradient-norm² proxy 1 − 2p + Σπ², S2T vs other tokens
    curves_png          training curves of several runs (or groups of seeds: mean line, min..max
                        band) overlaid, one panel per curve (held-out accuracy included: step 0 =
                        before training), integer step ticks
"""

from __future__ import annotations

import io

import numpy as np

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


def curves_png(panels: dict[str, dict], titles: dict[str, str] | None = None, suptitle: str | None = None) -> bytes:
    """`panels[curve][label]`: a run's `(steps, values)`, or a `stapo.analyze.runs.Band` (a group's mean
    over its runs, drawn with a min..max band when it has several). One panel per curve (three a row),
    one line per label, a legend each; one curve gives a one-panel figure."""
    plt = _pyplot()
    import textwrap

    from matplotlib.ticker import MaxNLocator

    styles = ("-", "--", ":", "-.")  # identical curves (stapo with nothing masked vs justrl) stay visible
    names = list(panels)
    cols = min(3, max(1, len(names)))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for i, (label, series) in enumerate(panels[name].items()):
            if isinstance(series, tuple):
                steps, mean, lo, hi, n = series[0], series[1], None, None, 1
            else:
                steps, mean, lo, hi, n = series.steps, series.mean, series.lo, series.hi, series.n
            color = f"C{i % 10}"
            ax.plot(steps, mean, color=color, ls=styles[i % len(styles)], marker="." if len(steps) < 30 else None,
                    lw=1.4, label=f"{label} (mean of {n})" if n > 1 else label)
            if n > 1 and len(steps) > 1:
                ax.fill_between(steps, lo, hi, color=color, alpha=0.18, lw=0)
            elif n > 1:  # one step: the band is a bar
                ax.vlines(steps, lo, hi, color=color, alpha=0.4, lw=6)
        ax.set_title(textwrap.fill((titles or {}).get(name, name), 48), fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # optimizer steps: no "1.5" ticks
        shown = {int(k) for v in panels[name].values() for k in (v[0] if isinstance(v, tuple) else v.steps)}
        if len(shown) == 1:  # one logged step: its tick only
            ax.set_xticks(sorted(shown))
        ax.ticklabel_format(axis="y", useOffset=False)  # absolute values, not "1e-6 + 11.92"
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return _png(fig)
