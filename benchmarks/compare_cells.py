"""The comparison in docs/cells.md: GRU and LSTM on the copy task where gating matters,
trained by BPTT, TBPTT, RTRL, SnAp-1, e-prop and UORO from the same weights on the same data.

    python benchmarks/compare_cells.py                    # every model below, then the table
    python benchmarks/compare_cells.py --models lstm      # one of them; the table is rebuilt
                                                          # from every docs/cells/*/compare.csv

Task: copy 5 symbols (of 4) across a delay of 20 blanks, T = 30, cross-entropy on the 5
answer steps (chance: log 4 = 1.386 nats, accuracy 0.25). H = 32, B = 32, Adam 1e-2,
gradient norm clipped at 1, 600 steps, seeds 0, 1, 2; one update per sequence (the
online rules' sums over the sequence, like BPTT's). Models (docs/cells/<model>/):

    gru                 rnngrad.cells.GRU, PyTorch's initialisation
    lstm                rnngrad.cells.LSTM(forget_bias=3): the forget gate starts open
    lstm_pytorch_init   rnngrad.cells.LSTM, PyTorch's initialisation (forget_bias=0)
    elman               one Elman layer (rnngrad.RNN), BPTT only: the baseline that shows
                        the gating matters
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from rnngrad.cells import LSTM  # noqa: E402
from rnngrad.compare import compare  # noqa: E402
from rnngrad.tasks.copy import Copy  # noqa: E402

OUT = HERE.parent / "docs" / "cells"
ALGORITHMS = ["bptt", "tbptt:5", "rtrl", "snap1", "eprop", "uoro"]
SETTINGS = {"seeds": [0, 1, 2], "steps": 600, "hidden": 32, "lr": 1e-2, "batch_size": 32,
            "clip": 1.0, "track_every": 50, "eval_every": 50}


class LSTMOpenForget(LSTM):
    """rnngrad.cells.LSTM with its forget gate's bias raised by 3 at initialisation."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__(input_size, hidden_size, forget_bias=3.0)


# model -> (cell spec for compare(), algorithms)
MODELS = {
    "gru": ("gru", ALGORITHMS),
    "lstm": (f"{__name__}:LSTMOpenForget", ALGORITHMS),
    "lstm_pytorch_init": ("lstm", ALGORITHMS),
    "elman": ("elman", ["bptt"]),
}


def table() -> str:
    lines = ["| model | algorithm | final test loss (mean +- std, 3 seeds) | final test accuracy | "
             "cosine with BPTT | ms per time step |", "|---|---|---|---|---|---|"]
    for model in MODELS:
        path = OUT / model / "compare.csv"
        if not path.exists():
            continue
        with open(path) as f:
            for r in csv.DictReader(f):
                lines.append(
                    f"| {model} | {r['algorithm']} | {float(r['final_test_loss_mean']):.3f} +- "
                    f"{float(r['final_test_loss_std']):.3f} | "
                    f"{float(r['final_test_acc_mean']):.3f} +- "
                    f"{float(r['final_test_acc_std']):.3f} | {float(r['cosine_mean']):.3f} | "
                    f"{float(r['ms_per_time_step']):.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    task = Copy(length=5, delay=20, n_symbols=4)
    for model in args.models:
        cell, algos = MODELS[model]
        t0 = time.perf_counter()
        compare(task, algos, cell=cell, out_dir=OUT / model, **SETTINGS)
        print(f"{model}: {time.perf_counter() - t0:.0f} s", flush=True)
    text = table()
    (OUT / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
