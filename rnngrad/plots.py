"""Plots written to PNG files (matplotlib's Agg backend; nothing is shown on screen).

``plot_curve``: one training run. ``plot_learning_curves`` and ``plot_alignment``: many
runs side by side (``compare`` and ``sweep``), one line per name with a mean +- std band
over seeds. Each line has its own colour, dash pattern and marker (markers staggered),
so that curves lying on top of each other (BPTT and RTRL are the same gradient) stay
visible, and the legend sits outside the axes, never on the curves.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import IO

__all__ = ["plot_curve", "plot_series", "plot_learning_curves", "plot_alignment", "line_styles",
           "band", "band_limits"]

_DASHES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path | IO[bytes], dpi: int) -> None:
    fig.savefig(path, dpi=dpi, format="png", bbox_inches="tight")


def line_styles(n: int) -> list[dict]:
    """``n`` distinct (colour, dash, marker) styles for ``ax.plot``; no two lines share
    their dash and marker, and markers of successive lines are placed at staggered steps."""
    out = []
    for i in range(n):
        out.append({"color": f"C{i % 10}", "linestyle": _DASHES[i % len(_DASHES)],
                    "marker": _MARKERS[i % len(_MARKERS)], "markersize": 5,
                    "markerfacecolor": "none", "markevery": (i % 4, 4)})
    return out


def _mean_std(v: list[float]) -> tuple[float, float]:
    v = [x for x in v if not math.isnan(x)]
    if not v:
        return float("nan"), 0.0
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return m, sd


def band(records: list[dict], name: str, key: str, *, by: str = "algorithm"):
    """``(steps, mean, lo, hi)`` of ``key`` over the seeds of the records of ``name``."""
    steps = sorted({r["step"] for r in records if r[by] == name and key in r})
    mean, lo, hi = [], [], []
    for s in steps:
        m, sd = _mean_std([float(r[key]) for r in records
                           if r[by] == name and r["step"] == s and key in r])
        mean.append(m)
        lo.append(m - sd)
        hi.append(m + sd)
    return steps, mean, lo, hi


def band_limits(lows: list[float], highs: list[float], *, include: tuple[float, ...] = (),
                clamp: tuple[float, float] | None = None, pad: float = 0.05
                ) -> tuple[float, float]:
    """y-limits that show every band whole (and the values in ``include``), padded."""
    vals = [v for v in [*lows, *highs, *include] if not math.isnan(v) and not math.isinf(v)]
    if not vals:
        return (0.0, 1.0)
    lo, hi = min(vals), max(vals)
    if clamp is not None:
        lo, hi = max(lo, clamp[0]), min(hi, clamp[1])
    span = (hi - lo) or 1.0
    return lo - pad * span, hi + pad * span


def _lines(ax, records, names, key, by, *, clamp=None):
    lows, highs = [], []
    for name, style in zip(names, line_styles(len(names))):
        s, m, lo, hi = band(records, name, key, by=by)
        if not s:
            continue
        if clamp is not None:
            lo = [max(v, clamp[0]) for v in lo]
            hi = [min(v, clamp[1]) for v in hi]
        if len(s) <= style["markevery"][0]:  # too short for its staggered markers (a run
            style = {**style, "markevery": None}  # stopped early): mark every point
        ax.plot(s, m, label=name, **style)
        ax.fill_between(s, lo, hi, color=style["color"], alpha=0.15, linewidth=0)
        lows += lo
        highs += hi
    return lows, highs


def learning_curves_figure(curves: list[dict], names: list[str], *, by: str = "algorithm",
                           title: str = "", loss_label: str = "test loss per counted step",
                           baselines: dict[str, float] | None = None):
    """The figure ``plot_learning_curves`` saves (the caller closes it)."""
    plt = _pyplot()
    with_acc = any("test_acc" in c for c in curves)
    fig, axes = plt.subplots(1, 2 if with_acc else 1, figsize=(12 if with_acc else 7, 4.5),
                             squeeze=False)
    ax = axes[0][0]
    _lines(ax, curves, names, "test_loss", by)
    for label, level in (baselines or {}).items():
        ax.axhline(level, color="gray", ls=":", lw=1)
        ax.text(0, level, label, color="gray", fontsize=7, va="bottom")
    ax.set_xlabel("training step (batch)")
    ax.set_ylabel(loss_label)
    ax.set_title(f"{title}: mean +- std over seeds" if title else "mean +- std over seeds")
    if with_acc:
        acc = axes[0][1]
        _lines(acc, curves, names, "test_acc", by)
        acc.set_xlabel("training step (batch)")
        acc.set_ylabel("test accuracy")
        acc.set_title("test accuracy: mean +- std over seeds")
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8,
                       borderaxespad=0.0)
    fig.tight_layout()
    return fig


def plot_learning_curves(curves: list[dict], path: str | Path | IO[bytes], names: list[str],
                         **kw) -> None:
    """Test loss (and accuracy, when the records have it) against step, one line per name.

    ``curves``: records with ``by`` (default "algorithm"), "seed", "step", "test_loss" and
    optionally "test_acc"; ``baselines``: horizontal reference levels, label -> value.
    """
    fig = learning_curves_figure(curves, names, **kw)
    _save(fig, path, 120)
    _pyplot().close(fig)


def alignment_figure(aligns: list[dict], names: list[str], *, by: str = "algorithm",
                     reference: str = "BPTT", params: str = "W_in, W_rec, b_rec"):
    """The figure ``plot_alignment`` saves (the caller closes it)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lows, highs = _lines(ax, aligns, names, "cosine", by, clamp=(-1.0, 1.0))
    ax.axhline(0.0, color="gray", lw=0.8)
    ax.axhline(1.0, color="gray", lw=0.8, ls=":")
    ax.set_ylim(*band_limits(lows, highs, include=(0.0, 1.0)))
    ax.set_xlabel("training step (batch)")
    ax.set_ylabel(f"cosine with {reference}'s gradient")
    ax.set_title(f"gradient alignment with {reference} (the exact reference) on {params}",
                 fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, borderaxespad=0.0)
    fig.tight_layout()
    return fig


def plot_alignment(aligns: list[dict], path: str | Path | IO[bytes], names: list[str],
                   **kw) -> None:
    """Cosine of each algorithm's gradient with the reference's against step; the y-axis
    is set from the bands (mean +- std over seeds), so none is clipped."""
    fig = alignment_figure(aligns, names, **kw)
    _save(fig, path, 120)
    _pyplot().close(fig)


def _log_if_positive(ax, values) -> None:
    """A log y-axis where every finite value is positive (a zero loss has no log)."""
    finite = [v for v in values if math.isfinite(v)]
    if finite and min(finite) > 0:
        ax.set_yscale("log")


def plot_curve(history: list[dict[str, float]], path: str | Path | IO[bytes], *,
               title: str = "") -> None:
    """Learning curve: train and test loss against step, and the test metric beside it."""
    plt = _pyplot()
    steps = [r["step"] for r in history]
    metric = "test_acc" if history and "test_acc" in history[0] else "test_mse"
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    ax = axes[0]
    losses = [r["train_loss"] for r in history] + [r["test_loss"] for r in history]
    ax.plot(steps, [r["train_loss"] for r in history], label="train loss")
    ax.plot(steps, [r["test_loss"] for r in history], label="test loss", ls="--")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (counted steps summed, mean over sequences)")
    _log_if_positive(ax, losses)
    ax.legend()
    ax = axes[1]
    values = [r.get(metric, float("nan")) for r in history]
    ax.plot(steps, values, color="C2")
    ax.set_xlabel("step")
    ax.set_ylabel("test accuracy" if metric == "test_acc" else "test MSE per counted step")
    if metric == "test_mse":
        _log_if_positive(ax, values)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path, 110)
    plt.close(fig)


def plot_series(rows: list[dict[str, float]], path: str | Path | IO[bytes], *, x: str,
                ys: list[str], title: str = "", logy: bool = True) -> None:
    """One panel per column in ``ys`` against column ``x``."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(ys), figsize=(5 * len(ys), 3.8), squeeze=False)
    for ax, y in zip(axes[0], ys):
        ax.plot([r[x] for r in rows], [r[y] for r in rows])
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        if logy:
            _log_if_positive(ax, [r[y] for r in rows])
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path, 110)
    plt.close(fig)
