"""Plots written to PNG files (matplotlib's Agg backend; nothing is shown on screen)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_curve", "plot_series"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_curve(history: list[dict[str, float]], path: str | Path, *, title: str = "") -> None:
    """Learning curve: train and test loss against step, and the test metric beside it."""
    plt = _pyplot()
    steps = [r["step"] for r in history]
    metric = "test_acc" if history and "test_acc" in history[0] else "test_mse"
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    ax = axes[0]
    ax.plot(steps, [r["train_loss"] for r in history], label="train loss")
    ax.plot(steps, [r["test_loss"] for r in history], label="test loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (pinned: mean over batch of masked sum)")
    ax.set_yscale("log")
    ax.legend()
    ax = axes[1]
    ax.plot(steps, [r.get(metric, float("nan")) for r in history], color="C2")
    ax.set_xlabel("step")
    ax.set_ylabel("test accuracy" if metric == "test_acc" else "test MSE")
    if metric == "test_mse":
        ax.set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_series(rows: list[dict[str, float]], path: str | Path, *, x: str, ys: list[str],
                title: str = "", logy: bool = True) -> None:
    """One panel per column in ``ys`` against column ``x``."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(ys), figsize=(5 * len(ys), 3.8), squeeze=False)
    for ax, y in zip(axes[0], ys):
        ax.plot([r[x] for r in rows], [r[y] for r in rows])
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        if logy:
            ax.set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
