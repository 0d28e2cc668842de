"""The online step of eprop(), rflo(), snap1() on rnngrad.RNN (its hand-written Elman
branch) against the same weights as ``rnngrad.Network(rnngrad.cells.Elman(...))`` (the
generic Network path, ``_traces_network``).

One process, one thread, CPU time (``time.thread_time``), the two candidates interleaved
round-robin, the median over repeats of the mean time of one ``algo.step`` over T steps
(after ``init`` and two warm-up steps, not timed). D = 32, K = 10, mse loss with a target
at every step. Ratio: Network / RNN in the same run.

    python benchmarks/isrnn_online.py [--repeats 7] [--steps 20] [--out benchmarks/isrnn_online]
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import rnngrad


def models(D, H, K, alpha):
    torch.manual_seed(0)
    rnn = rnngrad.RNN(D, H, K, alpha=alpha)
    net = rnngrad.Network(rnngrad.cells.Elman(D, H, alpha=alpha), K)
    with torch.no_grad():
        for n in ("W_in", "W_rec", "b_rec"):
            getattr(net.cells[0], n).copy_(getattr(rnn, n))
        net.W_out.copy_(rnn.W_out)
        net.b_out.copy_(rnn.b_out)
    return rnn, net


def time_steps(model, algo, x, y):
    state = algo.init(model, x.shape[1])
    for t in range(2):
        state, _, _ = algo.step(model, state, x[t], y[t])
    t0 = time.thread_time()
    for t in range(2, x.shape[0]):
        state, _, _ = algo.step(model, state, x[t], y[t])
    return (time.thread_time() - t0) / (x.shape[0] - 2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/isrnn_online")
    a = ap.parse_args()
    torch.set_num_threads(1)
    D, K = 32, 10
    algos = {"eprop": rnngrad.eprop, "rflo": rnngrad.rflo, "snap1": rnngrad.snap1}
    rows = []
    for alpha in (1.0, 0.5):
        for H in (64, 256):
            for B in (1, 16):
                rnn, net = models(D, H, K, alpha)
                g = torch.Generator().manual_seed(1)
                x = torch.randn(a.steps + 2, B, D, generator=g)
                y = torch.randn(a.steps + 2, B, K, generator=g)
                for name, make in algos.items():
                    ts = {"RNN": [], "Network": []}
                    for _ in range(a.repeats):
                        for c, m in (("RNN", rnn), ("Network", net)):
                            ts[c].append(time_steps(m, make(), x, y))
                    r, n = statistics.median(ts["RNN"]), statistics.median(ts["Network"])
                    rows.append({"algo": name, "alpha": alpha, "H": H, "B": B,
                                 "rnn_us": round(r * 1e6, 1), "network_us": round(n * 1e6, 1),
                                 "ratio": round(n / r, 3)})
                    print(rows[-1], flush=True)
    load = os.getloadavg()
    out = Path(a.out)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(out.with_suffix(".md"), "w") as f:
        f.write(f"# Online step: rnngrad.RNN branch vs Network(Elman)\n\n"
                f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
                f"1 thread, CPU time, median of {a.repeats} repeats of {a.steps} steps, "
                f"D={D}, K={K}; loadavg {tuple(round(v, 2) for v in load)}.\n\n"
                "| algo | alpha | H | B | RNN us/step | Network us/step | Network/RNN |\n"
                "|---|---|---|---|---|---|---|\n")
        for r in rows:
            f.write(f"| {r['algo']} | {r['alpha']} | {r['H']} | {r['B']} | {r['rnn_us']} | "
                    f"{r['network_us']} | {r['ratio']} |\n")


if __name__ == "__main__":
    main()
