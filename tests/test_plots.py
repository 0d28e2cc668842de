"""Plots of many runs: curves that overlap stay visible, the legend is off the curves,
and bands are never clipped."""

import matplotlib

matplotlib.use("Agg", force=True)

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from rnngrad.plots import (  # noqa: E402
    alignment_figure,
    band_limits,
    learning_curves_figure,
    line_styles,
)


def _records(names, key, values):
    return [{"algorithm": n, "seed": s, "step": t, key: values(n, s, t)}
            for n in names for s in (0, 1) for t in range(0, 50, 5)]


def test_line_styles_differ_in_dash_and_marker():
    styles = line_styles(8)
    assert len({(s["linestyle"], s["marker"]) for s in styles}) == 8
    assert len({s["color"] for s in styles}) == 8


def test_identical_curves_stay_distinguishable_and_the_legend_is_outside():
    names = ["bptt", "rtrl", "eprop"]
    curves = _records(names, "test_loss", lambda n, s, t: 1.0 / (1 + t))  # bptt == rtrl
    fig = learning_curves_figure(curves, names, title="digits")
    try:
        ax = fig.axes[0]
        lines = [ln for ln in ax.get_lines() if ln.get_label() in names]
        assert [ln.get_label() for ln in lines] == names
        assert lines[0].get_linestyle() != lines[1].get_linestyle()
        assert lines[0].get_marker() != lines[1].get_marker()
        fig.canvas.draw()
        legend = fig.axes[-1].get_legend().get_window_extent()
        for a in fig.axes:
            assert legend.x0 >= a.get_window_extent().x1  # right of every panel
    finally:
        plt.close(fig)


def test_alignment_names_its_reference_and_shows_the_whole_band():
    names = ["uoro", "eprop"]
    aligns = _records(names, "cosine",
                      lambda n, s, t: (-0.6 if s else 0.4) if n == "uoro" else 0.9)
    fig = alignment_figure(aligns, names, reference="bptt()")
    try:
        ax = fig.axes[0]
        assert "bptt()" in ax.get_title() and "reference" in ax.get_title()
        assert "bptt()" in ax.get_ylabel()
        lo, hi = ax.get_ylim()
        # uoro: mean -0.1, std 0.71 over the two seeds: the band reaches about -0.81
        assert lo < -0.8 and hi > 1.0
    finally:
        plt.close(fig)


@pytest.mark.parametrize("lows, highs, expect", [
    ([-0.8], [0.5], (-0.8, 1.0)), ([float("nan")], [2.0], (0.0, 1.0)),
])
def test_band_limits_cover_the_data_and_the_references(lows, highs, expect):
    lo, hi = band_limits(lows, highs, include=(0.0, 1.0), clamp=(-1.0, 1.0))
    assert lo < expect[0] and hi > expect[1]
