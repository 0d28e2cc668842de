"""Where the time of a sequence form goes: each phase of one e-prop gradient as a fraction
of BPTT's whole gradient on the same network (T = 200, B = 64, D = 32, one thread, CPU
time, median of 3): the forward with the linearization (``linearize_sequence`` or
``forward_states``), the lambda recursion (``_adjoint``), the weight GEMMs with the
weighted signal (``_param_grad``), and the rest (readout, emit's vjp, checks).

    python benchmarks/sequence_cost_phases.py LSTM,ALIF,LRU,GRU,Elman 64,256 \\
        > benchmarks/sequence_cost_phases.txt
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

import rnngrad
from rnngrad.algorithms import _sequence as S
from rnngrad.cells import ALIF, GRU, LRU, LSTM, Elman

T, B, D, K = 200, 64, 32, 10
CELLS = {"ALIF": ALIF, "LSTM": LSTM, "GRU": GRU, "LRU": LRU, "Elman": Elman}
acc: dict[str, float] = {}


def timed(obj, name: str, label: str) -> None:
    f = getattr(obj, name)

    def g(*a, **k):
        t = time.thread_time()
        r = f(*a, **k)
        acc[label] = acc.get(label, 0.0) + time.thread_time() - t
        return r

    setattr(obj, name, g)


def main() -> None:
    torch.set_num_threads(1)
    timed(S, "_adjoint", "adjoint")
    timed(S, "_param_grad", "weight GEMMs")
    timed(S, "_weighted", "weighted")
    for cname in sys.argv[1].split(","):
        for H in map(int, sys.argv[2].split(",")):
            cell = CELLS[cname](D, H)
            if hasattr(type(cell), "linearize_sequence"):
                timed(cell, "linearize_sequence", "forward+linearization")
            elif hasattr(type(cell), "forward_states"):
                timed(cell, "forward_states", "forward")
            net = rnngrad.Network(cell, K)
            x, y = torch.randn(T, B, D), torch.randn(T, B, K)
            algo = rnngrad.eprop()
            rnngrad.gradient(net, x[:5], y[:5], algorithm=algo)
            bt, rt, parts = [], [], []
            for _ in range(3):
                t = time.thread_time()
                rnngrad.gradient(net, x, y)
                bt.append(time.thread_time() - t)
                acc.clear()
                t = time.thread_time()
                rnngrad.gradient(net, x, y, algorithm=algo)
                rt.append(time.thread_time() - t)
                parts.append(dict(acc))
            b, r = statistics.median(bt), statistics.median(rt)
            p = {k: statistics.median(d.get(k, 0.0) for d in parts) for k in parts[0]}
            rest = r - sum(v for k, v in p.items() if k != "weighted")  # weighted: in the GEMMs
            phases = " ".join(f"{k} {v:.3f} ({v / b:.2f} BPTT)" for k, v in p.items())
            print(f"{cname} {H} bptt {b:.3f} eprop {r:.3f} ratio {r / b:.2f} | {phases} "  # noqa: T201
                  f"| rest {rest:.3f} ({rest / b:.2f} BPTT)")


if __name__ == "__main__":
    main()
