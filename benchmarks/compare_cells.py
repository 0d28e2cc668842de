"""The comparison in docs/cells.md: GRU and LSTM on the copy task where gating matters,
trained by BPTT, TBPTT, RTRL, SnAp-1, e-prop and UORO from the same weights on the same data.

    python benchmarks/compare_cells.py        # writes docs/cells/{gru,lstm}/ and docs/cells/table.md

Task: copy 5 symbols (of 4) across a delay of 20 blanks, T = 30, cross-entropy on the 5
answer steps (chance: log 4 = 1.386 nats, accuracy 0.25). H = 32, B = 32, Adam 1e-2,
gradient norm clipped at 1, 600 steps, seeds 0, 1, 2; one update per sequence (the
online rules' sums over the sequence, like BPTT's). An Elman network trained by BPTT is
the baseline that shows the gating matters.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from rnngrad.compare import compare  # noqa: E402
from rnngrad.tasks.copy import Copy  # noqa: E402

OUT = HERE.parent / "docs" / "cells"
ALGORITHMS = ["bptt", "tbptt:5", "rtrl", "snap1", "eprop", "uoro"]
SETTINGS = {"seeds": [0, 1, 2], "steps": 600, "hidden": 32, "lr": 1e-2, "batch_size": 32,
            "clip": 1.0, "track_every": 50, "eval_every": 50}


def main() -> None:
    torch.set_num_threads(1)
    task = Copy(length=5, delay=20, n_symbols=4)
    rows_all = []
    for cell, algos in (("gru", ALGORITHMS), ("lstm", ALGORITHMS), ("elman", ["bptt"])):
        t0 = time.perf_counter()
        rows = compare(task, algos, cell=cell, out_dir=OUT / cell, **SETTINGS)
        print(f"{cell}: {time.perf_counter() - t0:.0f} s", flush=True)
        for r in rows:
            rows_all.append({"cell": cell, **r})
    lines = ["| cell | algorithm | final test loss (mean +- std, 3 seeds) | final test accuracy | "
             "cosine with BPTT | ms per time step |", "|---|---|---|---|---|---|"]
    for r in rows_all:
        lines.append(f"| {r['cell']} | {r['algorithm']} | {r['final_test_loss_mean']:.3f} +- "
                     f"{r['final_test_loss_std']:.3f} | {r['final_test_acc_mean']:.3f} +- "
                     f"{r['final_test_acc_std']:.3f} | {r['cosine_mean']:.3f} | "
                     f"{r['ms_per_time_step']:.2f} |")
    (OUT / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
