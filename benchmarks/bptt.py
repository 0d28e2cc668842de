"""BPTT: one forward plus backward, float32, same weights and data, in one run.

    rnngrad.gradient(..., algorithm=bptt())     the hand-derived backward pass
    torch.nn.RNN + nn.Linear + autograd          what users would otherwise write (the anchor)
    torch.nn.RNNCell in a Python loop + autograd

for H in {64, 256, 1024}, T = 200, B = 64, D = 32, K = 10, loss = MSE at every step
(timed round-robin, median over repeats; see rnngrad/bench.py). The whole measurement
is repeated --runs times; the table gives each method's median time over the runs and
the median, lowest and highest ratio to nn.RNN, so one lucky or unlucky run does not
make the figure. Prints the table and writes bptt_results.csv (bptt_results_cuda.csv
with --device cuda) beside this file.

    python benchmarks/bptt.py [--device cuda] [--runs 5] [--repeats 10] [--hidden 64,256,1024]
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
from pathlib import Path

import torch

from rnngrad.bench import bench_bptt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--hidden", default="64,256,1024")
    ap.add_argument("--out", default=None, help="CSV path (default: beside this file)")
    args = ap.parse_args()
    device = torch.device(args.device)
    rows = []
    for H in (int(h) for h in args.hidden.split(",")):
        runs = [bench_bptt(H, device=device, repeats=args.repeats) for _ in range(args.runs)]
        for i, first in enumerate(runs[0]):
            ms = [run[i]["median_ms"] for run in runs]
            ratios = [run[i]["ratio_vs_nn_rnn"] for run in runs]
            rows.append({**{k: first[k] for k in ("device", "H", "T", "B", "D", "K", "method")},
                         "median_ms": round(statistics.median(ms), 2),
                         "ratio_vs_nn_rnn": round(statistics.median(ratios), 3),
                         "ratio_min": min(ratios), "ratio_max": max(ratios), "runs": args.runs})
    dev_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else f"CPU {platform.machine()}, {torch.get_num_threads()} threads")
    r0 = rows[0]
    print(f"BPTT forward+backward, float32, T={r0['T']} B={r0['B']} D={r0['D']} K={r0['K']}, "
          f"{dev_name}, torch {torch.__version__}; {args.runs} runs x median of {args.repeats}")
    cols = ["H", "method", "median_ms", "ratio_vs_nn_rnn", "ratio_min", "ratio_max"]
    w = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    print("  ".join(c.ljust(x) for c, x in zip(cols, w)))
    for r in rows:
        print("  ".join(str(r[c]).ljust(x) for c, x in zip(cols, w)))
    out = Path(args.out) if args.out else Path(__file__).with_name(
        "bptt_results.csv" if device.type == "cpu" else "bptt_results_cuda.csv")
    with open(out, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=[*rows[0], "device_name", "torch"])
        wr.writeheader()
        for r in rows:
            wr.writerow({**r, "device_name": dev_name, "torch": torch.__version__})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
