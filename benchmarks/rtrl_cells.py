"""RTRL on GRU and LSTM: the structured path against ``rtrl(generic=True)``.

    python benchmarks/rtrl_cells.py      # writes rtrl_cells.csv and rtrl_cells.md beside it

``rtrl()`` on a built-in cell takes the state Jacobian J_t from the cell's hand-derived
``linearize`` and adds the immediate term on the diagonal of the unit axes (a parameter
row owned by unit i moves only unit i within a step), so no (B, S, N) tensor of the
immediate term is formed; ``rtrl(generic=True)`` takes J_t and the immediate term from
``vmap(jacrev)`` of the step (S vector-Jacobian products per example). Both then do
the same ``M_t = J_t M_{t-1} + Mbar_t`` GEMM, O(B S^2 N) per step, so the structured
path saves the Jacobians' cost: most at small H, where the GEMM is small.

Setting: one layer, B = 4, T = 10, D = 8, K = 2, float32, ``--threads`` (default 1) and
``--clock`` (default ``cpu``: ``time.thread_time``, which other processes' load barely
moves; ``wall``: ``time.perf_counter``, what the tables before issue 17 used, with 2
threads); each time the median of REPEATS runs of ``rnngrad.gradient`` (the two paths'
gradients checked equal first), timed round-robin; the whole measurement repeated RUNS
times, the median ratio reported with its range. Also ``bptt()`` (hand-derived) on the
same network, for scale. The md records the load average at the start and the end.

    python benchmarks/rtrl_cells.py [--threads 1] [--clock cpu|wall] [--csv PATH]
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import rnngrad  # noqa: E402
from rnngrad.cells import GRU, LSTM  # noqa: E402

B, T, D, K = 4, 10, 8, 2
HS = (8, 16, 32, 64)
REPEATS, RUNS = 5, 3


def problem(cell_cls, H):
    torch.manual_seed(0)
    net = rnngrad.Network(cell_cls(D, H), K)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, D, generator=g)
    y = torch.randn(T, B, K, generator=g)
    return net, x, y


CLOCK = time.thread_time


def timed(fn) -> float:
    t0 = CLOCK()
    fn()
    return CLOCK() - t0


def measure(cell_cls, H) -> dict:
    net, x, y = problem(cell_cls, H)
    cands = {"rtrl()": rnngrad.rtrl(), "rtrl(generic=True)": rnngrad.rtrl(generic=True),
             "bptt()": rnngrad.bptt()}
    ref = rnngrad.gradient(net, x, y, algorithm=cands["rtrl(generic=True)"])[1]
    got = rnngrad.gradient(net, x, y, algorithm=cands["rtrl()"])[1]
    for n in ref:
        err = float((got[n] - ref[n]).norm() / ref[n].norm().clamp_min(1e-30))
        if err > 1e-4:
            raise RuntimeError(f"rtrl() and rtrl(generic=True) disagree on {n}: {err:.1e}")
    ratios, times = [], {n: [] for n in cands}
    for _ in range(RUNS):
        ts = {n: [] for n in cands}
        for _ in range(REPEATS):
            for n, a in cands.items():
                ts[n].append(timed(lambda a=a: rnngrad.gradient(net, x, y, algorithm=a)))
        med = {n: statistics.median(v) for n, v in ts.items()}
        for n in cands:
            times[n].append(med[n])
        ratios.append(med["rtrl()"] / med["rtrl(generic=True)"])
    S = sum(c.shape[1] for c in net.init_state(1)[0])
    N = sum(p.numel() for n, p in net.named_parameters() if n not in ("W_out", "b_out"))
    return {"cell": cell_cls.__name__, "H": H, "S": S, "N": N,
            "rtrl_ms": 1e3 * statistics.median(times["rtrl()"]),
            "generic_ms": 1e3 * statistics.median(times["rtrl(generic=True)"]),
            "bptt_ms": 1e3 * statistics.median(times["bptt()"]),
            "ratio_rtrl_over_generic": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios)}


def main() -> None:
    global CLOCK
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    ap.add_argument("--csv", type=Path, default=HERE / "rtrl_cells.csv",
                    help="the CSV (the md is written beside it, same name)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    CLOCK = time.thread_time if args.clock == "cpu" else time.perf_counter
    if args.clock == "cpu" and args.threads != 1:
        raise SystemExit("--clock cpu times this thread only: use it with --threads 1")
    load0 = os.getloadavg()
    rows = []
    for cell_cls in (GRU, LSTM):
        for H in HS:
            r = measure(cell_cls, H)
            rows.append(r)
            print(f"{r['cell']:4s} H={H:3d}  rtrl() {r['rtrl_ms']:8.1f} ms  generic "
                  f"{r['generic_ms']:8.1f} ms  ratio {r['ratio_rtrl_over_generic']:.2f} "
                  f"[{r['ratio_min']:.2f}, {r['ratio_max']:.2f}]  bptt {r['bptt_ms']:.1f} ms",
                  flush=True)
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                    for r in rows)
    lines = ["| cell | H | state S | params N | rtrl() ms | rtrl(generic=True) ms | ratio "
             "(median, range) | bptt() ms |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['cell']} | {r['H']} | {r['S']} | {r['N']} | {r['rtrl_ms']:.1f} | "
                     f"{r['generic_ms']:.1f} | {r['ratio_rtrl_over_generic']:.2f} "
                     f"({r['ratio_min']:.2f} to {r['ratio_max']:.2f}) | {r['bptt_ms']:.1f} |")
    clock = ("CPU time of the thread (time.thread_time)" if args.clock == "cpu"
             else "wall time")
    load1 = os.getloadavg()
    args.csv.with_suffix(".md").write_text(
        f"RTRL on GRU and LSTM, structured vs torch.func (`benchmarks/rtrl_cells.py`; B={B}, "
        f"T={T}, D={D}, K={K}, float32, {torch.get_num_threads()} thread(s), {clock}, torch "
        f"{torch.__version__}). Ratio < 1: the structured path is faster. Load average "
        f"at the start {load0[0]:.2f}, {load0[1]:.2f}, {load0[2]:.2f}; at the end "
        f"{load1[0]:.2f}, {load1[1]:.2f}, {load1[2]:.2f} (2 shared cores).\n\n"
        + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
