"""Cost of exact RTRL on one LRU layer against its forward step (float32).

    python benchmarks/lru_rtrl.py                 # writes lru_rtrl.csv, lru_rtrl_memory.csv
    python benchmarks/lru_rtrl.py --sizes 64 --batches 1 --repeats 3

Network: ``rnngrad.Network(LRU(H, H), 10)`` (N = H complex units, D = H inputs, a linear
readout of 10). Per step, ``forward`` is the network's step without gradients
(``step``, ``emit``, the readout); ``rtrl`` is ``rnngrad.rtrl().step`` with a target at
every step (the per-unit traces, the loss, the emitted gradient of every parameter), and
``engine`` the same without the online API's input validation (``_traces_network.step``).
Each repeat times ``n`` consecutive steps after a warm-up; the table has the median
over repeats and the spread (min, max) of the per-step time, and the ratio of the
medians. Memory: the bytes of rtrl's state (the network's state and the traces) after T
steps, and the dense influence (B, 2N, |theta|) it does not keep.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import rnngrad  # noqa: E402
from rnngrad.algorithms import _traces_network  # noqa: E402
from rnngrad.cells import LRU  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
K = 10


def make(H: int) -> rnngrad.Network:
    torch.manual_seed(0)
    return rnngrad.Network(LRU(H, H), K)


def per_step(fn, n: int, repeats: int) -> list[float]:
    """Seconds per step of ``fn(t)`` over n steps, once per repeat (after a warm-up)."""
    for t in range(min(n, 3)):
        fn(t)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for t in range(n):
            fn(t)
        out.append((time.perf_counter() - t0) / n)
    return out


def time_sizes(H: int, B: int, repeats: int) -> dict:
    net = make(H)
    cell = net.cells[0]
    p = {k: v.detach() for k, v in cell.params().items()}
    W_out, b_out = net.W_out.detach(), net.b_out.detach()
    n = max(5, min(200, int(2e8 / (B * H * H * 8 + 1e6))))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, B, H, generator=g)
    y = torch.randn(n, B, K, generator=g)
    box = {"s": cell.init_state(B)}

    def forward(t):
        with torch.no_grad():
            s = cell.step(p, box["s"], x[t])
            h = cell.emit(p, s, x[t])
            torch.addmm(b_out, h, W_out.T)
            box["s"] = s

    algo = rnngrad.rtrl()
    box["a"] = algo.init(net, B)
    box["e"] = algo.init(net, B)

    def rtrl(t):
        box["a"], _, _ = algo.step(net, box["a"], x[t], y[t])

    def engine(t):
        box["e"], _, _ = _traces_network.step(net, "local", box["e"], x[t], y[t], None, "mse",
                                              None)

    f, r, e = (per_step(fn, n, repeats) for fn in (forward, rtrl, engine))
    ms = [1e3 * statistics.median(v) for v in (f, r, e)]
    return {"H": H, "B": B, "steps_per_repeat": n, "repeats": repeats,
            "forward_ms": ms[0], "forward_min": 1e3 * min(f), "forward_max": 1e3 * max(f),
            "rtrl_ms": ms[1], "rtrl_min": 1e3 * min(r), "rtrl_max": 1e3 * max(r),
            "engine_ms": ms[2], "engine_min": 1e3 * min(e), "engine_max": 1e3 * max(e),
            "ratio": ms[1] / ms[0], "engine_ratio": ms[2] / ms[0]}


def state_bytes(state) -> int:
    total = 0
    stack = [state]
    while stack:
        v = stack.pop()
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, (tuple, list)):
            stack.extend(v)
    return total


def memory_rows(H: int, B: int, Ts=(1, 10, 100, 1000)) -> list[dict]:
    net = make(H)
    algo = rnngrad.rtrl()
    state = algo.init(net, B)
    g = torch.Generator().manual_seed(2)
    n_params = sum(p.numel() for p in net.cells[0].parameters())
    dense = B * 2 * net.cells[0].state_size * n_params * 4
    rows, t = [], 0
    for T in Ts:
        while t < T:
            x = torch.randn(B, H, generator=g)
            state, _, _ = algo.step(net, state, x, torch.randn(B, K, generator=g))
            t += 1
        rows.append({"H": H, "B": B, "T": T, "state_bytes": state_bytes(state),
                     "dense_influence_bytes": dense})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--csv", default=os.path.join(HERE, "lru_rtrl.csv"))
    ap.add_argument("--memory-csv", default=os.path.join(HERE, "lru_rtrl_memory.csv"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for H in args.sizes:
        for B in args.batches:
            row = time_sizes(H, B, args.repeats)
            row["threads"] = args.threads
            rows.append(row)
            print(f"H={H:5d} B={B:3d}: forward {row['forward_ms']:8.3f} ms "
                  f"[{row['forward_min']:.3f}, {row['forward_max']:.3f}]  rtrl "
                  f"{row['rtrl_ms']:8.3f} ms [{row['rtrl_min']:.3f}, {row['rtrl_max']:.3f}]  "
                  f"ratio {row['ratio']:6.1f}  (engine alone {row['engine_ratio']:.1f})",
                  flush=True)
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    mem = memory_rows(64, 16)
    with open(args.memory_csv, "w", newline="") as f:
        w = csv.DictWriter(f, list(mem[0]))
        w.writeheader()
        w.writerows(mem)
    for r in mem:
        print(f"T={r['T']:5d}: rtrl state {r['state_bytes']} bytes (dense influence would be "
              f"{r['dense_influence_bytes']})")


if __name__ == "__main__":
    main()
