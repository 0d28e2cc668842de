"""Measured cost per time step of every gradient algorithm against the hidden size H.

For H in 16..256 (and on to 1024 where affordable): the wall time of ``rnngrad.gradient`` over a sequence of T steps
(batch B, one CPU thread, float32, the best of R repeats) divided by T, and the memory
the algorithm keeps (bytes of the tensors in its state at its peak over the sequence:
the stored trajectory for BPTT, the influence for RTRL, the traces for e-prop/RFLO/
SnAp-1, h~ and theta~ for UORO, u and A for KF-RTRL). The log-log slope over the three
largest H of each algorithm is printed beside the theoretical exponent: below H ~ 256
the fixed cost of a step (~0.1 ms of kernel launches) hides the O(H^2) work, so the
range is extended to H = 1024 for the O(H^2) rules and to 512 for KF-RTRL (O(H^3)).
RTRL is O(H^4) per example: it is capped at H = 128 (H = 256 would take ~10 s per step).

    python benchmarks/online_cost.py            # writes online_cost.csv and online_cost.png

Results are kept beside this script.
"""

from __future__ import annotations

import csv
import math
import sys
import time
from pathlib import Path

import torch

import rnngrad
from rnngrad.compare import _peak_state_bytes

OUT = Path(__file__).resolve().parent
HS = (16, 32, 64, 128, 256, 512, 1024)
MAX_H = {"rtrl": 128, "kf_rtrl": 512}  # the rest go to 1024
T, B, D, K, R = 10, 16, 2, 1, 3
# name, factory, alpha, theoretical time exponent, theoretical memory exponent (in H)
ALGOS = [
    ("bptt", rnngrad.bptt, 1.0, 2, 1),
    ("rtrl", rnngrad.rtrl, 1.0, 4, 3),
    ("eprop", rnngrad.eprop, 1.0, 2, 1),
    ("eprop (leaky)", rnngrad.eprop, 0.5, 2, 2),
    ("rflo", rnngrad.rflo, 1.0, 2, 1),
    ("snap1", rnngrad.snap1, 1.0, 2, 2),
    ("uoro", rnngrad.uoro, 1.0, 2, 2),
    ("kf_rtrl", rnngrad.kf_rtrl, 1.0, 3, 2),
]


def measure(factory, alpha, H):
    torch.manual_seed(0)
    model = rnngrad.RNN(D, H, K, alpha=alpha)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, D, generator=g)
    y = torch.randn(T, B, K, generator=g)
    algo = factory()
    rnngrad.gradient(model, x, y, algorithm=algo)  # warm-up
    best = math.inf
    for _ in range(R):
        t0 = time.perf_counter()
        rnngrad.gradient(model, x, y, algorithm=algo)
        best = min(best, time.perf_counter() - t0)
    mem = _peak_state_bytes(model, algo, (x, y, torch.ones(T, B)), "mse")
    return 1e3 * best / T, mem


def slope(hs, ys):
    """Least-squares log-log slope over the three largest H."""
    pts = [(math.log(h), math.log(y)) for h, y in zip(hs, ys, strict=True)][-3:]
    if len(pts) < 2:
        return float("nan")
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    return (sum((p[0] - mx) * (p[1] - my) for p in pts)
            / sum((p[0] - mx) ** 2 for p in pts))


def main() -> None:
    torch.set_num_threads(1)
    rows, fits = [], []
    for name, factory, alpha, t_exp, m_exp in ALGOS:
        hs, ts, ms = [], [], []
        for H in HS:
            if H > MAX_H.get(name, 1024):
                continue
            ms_step, mem = measure(factory, alpha, H)
            hs.append(H)
            ts.append(ms_step)
            ms.append(mem)
            rows.append({"algorithm": name, "H": H, "B": B, "T": T,
                         "ms_per_step": f"{ms_step:.4g}", "state_kib": f"{mem / 1024:.4g}"})
            print(f"{name:14s} H={H:4d}  {ms_step:9.3f} ms/step  {mem / 1024:10.1f} KiB",
                  file=sys.stderr)
        fits.append({"algorithm": name, "time_exponent": f"{slope(hs, ts):.2f}",
                     "time_theory": t_exp, "memory_exponent": f"{slope(hs, ms):.2f}",
                     "memory_theory": m_exp, "H": hs, "ms": ts, "mem": ms})
    with open(OUT / "online_cost.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(OUT / "online_cost_fit.csv", "w", newline="") as f:
        keys = ["algorithm", "time_exponent", "time_theory", "memory_exponent", "memory_theory"]
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows([{k: r[k] for k in keys} for r in fits])

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for r in fits:
        axes[0].loglog(r["H"], r["ms"], "o-",
                       label=f"{r['algorithm']}: {r['time_exponent']} (theory {r['time_theory']})")
        axes[1].loglog(r["H"], [m / 1024 for m in r["mem"]], "o-",
                       label=f"{r['algorithm']}: {r['memory_exponent']} "
                             f"(theory {r['memory_theory']})")
    axes[0].set_ylabel(f"ms per time step (B={B}, 1 thread)")
    axes[1].set_ylabel(f"state memory, KiB (B={B}, T={T})")
    for ax in axes:
        ax.set_xlabel("hidden units H")
        ax.legend(fontsize=7, title="fitted exponent, three largest H", title_fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(OUT / "online_cost.png", dpi=120)
    for r in fits:
        print(f"{r['algorithm']:14s} time ~ H^{r['time_exponent']} (theory {r['time_theory']})"
              f"   memory ~ H^{r['memory_exponent']} (theory {r['memory_theory']})")


if __name__ == "__main__":
    main()
