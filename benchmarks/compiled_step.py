"""Per-step time of the compiled online step (``rnngrad.compile``) against the eager step,
PyTorch's own cell + readout step, and the floor of docs/online_floor.md.

    python benchmarks/compiled_step.py                 # the committed table (about 30 min here)
    python benchmarks/compiled_step.py --quick         # B = 1, H = 64 only
    python benchmarks/compiled_step.py --tables-only   # redraw compiled_step.md from the CSV

float32, CPU, D = 32, K = 10, MSE at every step, the state carried from step to step and the
emitted gradients dropped (online training). Candidates of one configuration are timed in
turn, round after round (``--rounds``), each a block of steps of about 5 ms after one
untimed step, in CPU time of this thread (``time.thread_time``) so that other processes'
load falls outside the figure; a figure is the median over rounds. One thread
(``torch.set_num_threads(1)``), then the same compiled functions on two threads (a noisy
column on a shared machine: the load average is recorded beside the table).

- **eager**: the public ``algo.step`` (validation included).
- **compiled**: the public step of ``rnngrad.compile(algo)`` (validation included);
  **compile s**: wall time of its first step (tracing, inductor, the C++ build).
- **torch**: PyTorch's own step under ``no_grad``: ``nn.RNNCell`` / ``nn.GRUCell`` /
  ``nn.LSTMCell`` + ``nn.Linear``, and the plain-PyTorch LRU and ALIF steps below.
- **floor**: ``max(bytes / bandwidth, flops / GEMM rate)`` of docs/online_floor.md for the
  rule's state (3 B H P + H P numbers for a (B, H, P) trace, P = H + D + 1; for the LRU's
  diagonal RTRL the same with its own state), with the bandwidth measured in the same
  run at the state's size (``buf.mul_(-1.0)``) and the GEMM rate of a 1024^2 float32 mm.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import rnngrad  # noqa: E402
from rnngrad.cells import ALIF, GRU, LRU, LSTM  # noqa: E402

D, K = 32, 10
TARGET_S = 5e-3

RULES = {
    "eprop": lambda: rnngrad.eprop(),
    "rflo": lambda: rnngrad.rflo(),
    "snap1": lambda: rnngrad.snap1(),
    "uoro": lambda: rnngrad.uoro(seed=0),
    "rtrl": lambda: rnngrad.rtrl(),
}
# which rules run on which cell (RFLO is defined for Elman; RTRL is online only on the
# diagonal LRU; UORO on the Elman form, its fast path)
CELL_RULES = {
    "elman": ["eprop", "rflo", "snap1", "uoro"],
    "gru": ["eprop", "snap1"],
    "lstm": ["eprop", "snap1"],
    "alif": ["eprop", "snap1"],
    "lru": ["eprop", "snap1", "rtrl"],
}
SIZES_FULL = [(1, 64), (1, 256), (16, 256), (16, 64), (1, 1024), (16, 1024)]
SIZES_QUICK = [(1, 64)]


def make_model(cell: str, H: int):
    torch.manual_seed(0)
    if cell == "elman":
        return rnngrad.RNN(D, H, K)
    c = {"gru": lambda: GRU(D, H), "lstm": lambda: LSTM(D, H),
         "alif": lambda: ALIF(D, H, v_th=0.3), "lru": lambda: LRU(D, H)}[cell]()
    return rnngrad.Network([c], K)


# ---- PyTorch's own steps ---------------------------------------------------------------------

def torch_step(cell: str, H: int, B: int, xs):
    """A closure running one step of PyTorch's cell + nn.Linear under no_grad."""
    torch.manual_seed(0)
    lin = nn.Linear(H, K)
    box = {"t": 0}
    if cell in ("elman", "gru", "lstm"):
        mod = {"elman": nn.RNNCell, "gru": nn.GRUCell, "lstm": nn.LSTMCell}[cell](D, H)
        box["s"] = ((torch.zeros(B, H), torch.zeros(B, H)) if cell == "lstm"
                    else torch.zeros(B, H))

        def run():
            with torch.no_grad():
                x = xs[box["t"] % len(xs)]
                box["t"] += 1
                s = mod(x, box["s"])
                lin(s[0] if cell == "lstm" else s)
                box["s"] = s

        return run
    if cell == "lru":
        # h_t = lambda * h_{t-1} + gamma * (B x_t) (complex diagonal), y = Re(C h) + D x
        lam = torch.polar(torch.rand(H) * 0.1 + 0.9, torch.rand(H) * 0.6)
        gamma = (1 - lam.abs() ** 2).sqrt()
        Bm = torch.randn(H, D, dtype=torch.complex64) / math.sqrt(2 * D)
        Cm = torch.randn(H, H, dtype=torch.complex64) / math.sqrt(H)
        Dm = torch.randn(H, D) / math.sqrt(D)
        box["h"] = torch.zeros(B, H, dtype=torch.complex64)

        def run():
            with torch.no_grad():
                x = xs[box["t"] % len(xs)]
                box["t"] += 1
                h = lam * box["h"] + gamma * (x.to(torch.complex64) @ Bm.T)
                y = (h @ Cm.T).real + x @ Dm.T
                lin(y)
                box["h"] = h

        return run
    # ALIF (Bellec et al. 2020): v' = a v + (1-a) (W x + U z) - z v_th, b' = r b + (1-r) z,
    # z = H(v - v_th - beta b)
    W, U = torch.randn(H, D) / math.sqrt(D), torch.randn(H, H) / math.sqrt(H)
    a, r, beta, v_th = math.exp(-1 / 20), math.exp(-1 / 200), 0.2, 0.3
    box["v"], box["b"], box["z"] = torch.zeros(B, H), torch.zeros(B, H), torch.zeros(B, H)

    def run():
        with torch.no_grad():
            x = xs[box["t"] % len(xs)]
            box["t"] += 1
            z = box["z"]
            v = a * box["v"] + (1 - a) * torch.addmm(x @ W.T, z, U.T) - z * v_th
            b = r * box["b"] + (1 - r) * z
            z = (v - v_th - beta * b > 0).to(v.dtype)
            lin(z)
            box["v"], box["b"], box["z"] = v, b, z

    return run


# ---- the floor ------------------------------------------------------------------------------

def state_numbers(rule: str, cell: str, H: int, B: int) -> int:
    """Numbers of the rule's largest state tensor (what its step must stream)."""
    P = H + D + 1
    C = {"lstm": 2, "alif": 2, "lru": 2}.get(cell, 1)  # state components per unit
    G = {"gru": 3, "lstm": 4}.get(cell, 1)  # gate groups
    if cell == "lru":
        return B * 2 * H * (2 * D + 2)  # (re, im) of lambda, B and gamma's rows: per unit
    return B * H * P * G * C


def floor_s(rule: str, cell: str, H: int, B: int, bw: float, gemm: float) -> tuple[float, int]:
    N = state_numbers(rule, cell, H, B)
    P = H + D + 1
    bytes_ = (3 * N + H * P) * 4
    flops = 2 * B * H * P
    return max(bytes_ / bw, flops / gemm), N


def bandwidth(numel: int) -> float:
    buf = torch.ones(max(numel, 1024))
    fn = lambda: buf.mul_(-1.0)  # noqa: E731
    t = timed({"bw": fn}, rounds=7)["bw"]
    return 2 * buf.numel() * 4 / t


def gemm_rate() -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    t = timed({"mm": lambda: torch.mm(a, b)}, rounds=5)["mm"]
    return 2 * 1024**3 / t


# ---- timing ---------------------------------------------------------------------------------

def calibrate(fn) -> int:
    fn()
    t0 = time.thread_time()
    fn()
    dt = time.thread_time() - t0
    return max(1, min(200, math.ceil(TARGET_S / max(dt, 1e-6))))


def timed(cands: dict, rounds: int) -> dict[str, float]:
    """Median CPU seconds per call of each candidate, interleaved round after round."""
    inner = {k: calibrate(f) for k, f in cands.items()}
    times: dict[str, list[float]] = {k: [] for k in cands}
    for _ in range(rounds):
        for k, f in cands.items():
            f()
            t0 = time.thread_time()
            for _ in range(inner[k]):
                f()
            times[k].append((time.thread_time() - t0) / inner[k])
    return {k: statistics.median(v) for k, v in times.items()}


class Stepper:
    def __init__(self, algo, model, B, xs, ys):
        self.algo, self.model, self.xs, self.ys = algo, model, xs, ys
        self.state = algo.init(model, B)
        self.t = 0

    def __call__(self):
        i = self.t % len(self.xs)
        self.t += 1
        self.state, _, _ = self.algo.step(self.model, self.state, self.xs[i], self.ys[i])


def measure(cell: str, rule: str, B: int, H: int, rounds: int, bw_cache: dict) -> dict:
    torch.set_num_threads(1)
    model = make_model(cell, H)
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(8, B, D, generator=g)
    ys = torch.randn(8, B, K, generator=g)
    eager = Stepper(RULES[rule](), model, B, xs, ys)
    # UORO's draws from a torch.Generator stop a whole-graph trace: it runs eagerly (in
    # pieces it recompiles at every step, its position among its random signs a Python
    # number, and then runs eagerly too: docs/compiled.md)
    comp_algo = rnngrad.compile(RULES[rule]())
    comp = Stepper(comp_algo, model, B, xs, ys)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        comp()
        compile_s = time.perf_counter() - t0
    ref = torch_step(cell, H, B, xs)
    cands = {"eager": eager, "compiled": comp, "torch": ref}
    t1 = timed(cands, rounds)
    torch.set_num_threads(2)
    t2 = timed(cands, max(3, rounds // 2))
    torch.set_num_threads(1)
    if "gemm" not in bw_cache:
        bw_cache["gemm"] = gemm_rate()
    N = state_numbers(rule, cell, H, B)
    if N not in bw_cache:
        bw_cache[N] = bandwidth(N)
    fl, _ = floor_s(rule, cell, H, B, bw_cache[N], bw_cache["gemm"])
    info = comp_algo.compiled
    return {"cell": cell, "rule": rule, "B": B, "H": H,
            "eager_us": t1["eager"] * 1e6, "compiled_us": t1["compiled"] * 1e6,
            "torch_us": t1["torch"] * 1e6, "floor_us": fl * 1e6,
            "compiled_x_torch": t1["compiled"] / t1["torch"],
            "eager_x_torch": t1["eager"] / t1["torch"],
            "compiled_x_floor": t1["compiled"] / fl, "speedup": t1["eager"] / t1["compiled"],
            "eager_us_2t": t2["eager"] * 1e6, "compiled_us_2t": t2["compiled"] * 1e6,
            "torch_us_2t": t2["torch"] * 1e6,
            "compile_s": compile_s, "mode": info.mode, "reason": info.reason or "",
            "graphs": info.graphs, "load": os.getloadavg()[0]}


FIELDS = ["cell", "rule", "B", "H", "eager_us", "compiled_us", "torch_us", "floor_us",
          "compiled_x_torch", "eager_x_torch", "compiled_x_floor", "speedup", "eager_us_2t",
          "compiled_us_2t", "torch_us_2t", "compile_s", "mode", "reason", "graphs", "load"]


def table(rows: list[dict]) -> str:
    head = ("| cell | rule | B | H | eager us | compiled us | torch us | floor us | "
            "compiled x torch | eager x torch | compiled x floor | speed-up | compiled us, "
            "2 threads | torch us, 2 threads | compile s | mode |")
    out = [head, "|" + "---|" * 16]
    for r in rows:
        f = lambda k, nd=1, r=r: f"{float(r[k]):.{nd}f}"  # noqa: E731
        out.append(f"| {r['cell']} | {r['rule']} | {r['B']} | {r['H']} | {f('eager_us')} | "
                   f"{f('compiled_us')} | {f('torch_us')} | {f('floor_us', 2)} | "
                   f"{f('compiled_x_torch', 2)} | {f('eager_x_torch', 2)} | "
                   f"{f('compiled_x_floor', 1)} | {f('speedup', 2)} | {f('compiled_us_2t')} | "
                   f"{f('torch_us_2t')} | {f('compile_s')} | {r['mode']} |")
    return "\n".join(out)


def targets(rows: list[dict]) -> str:
    """The targets: at B = 1 the compiled step within 3x PyTorch's own step (UORO 5x); at
    B = 16 within 2x the floor. Which rows meet them, and by how much the others miss."""
    met, missed = [], []
    for r in rows:
        B = int(r["B"])
        if B == 1:
            limit, x, what = (5.0 if r["rule"] == "uoro" else 3.0), float(r["compiled_x_torch"]), "torch"
        elif B == 16:
            limit, x, what = 2.0, float(r["compiled_x_floor"]), "floor"
        else:
            continue
        name = f"{r['cell']} {r['rule']} B = {B} H = {r['H']}"
        if x <= limit:
            met.append(f"{name} ({x:.2f}x {what})")
        else:
            missed.append(f"{name}: {x:.2f}x {what}, {x / limit:.2f}x over the {limit:g}x target")
    return ("Targets (B = 1: compiled within 3x torch, UORO 5x; B = 16: within 2x the floor).\n\n"
            f"Met ({len(met)}): {', '.join(met) or 'none'}.\n\n"
            f"Missed ({len(missed)}):\n\n" + "".join(f"- {m}\n" for m in missed))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tables-only", action="store_true")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--cells", default=",".join(CELL_RULES))
    ap.add_argument("--sizes", default=None, help="B:H,B:H,... (default: the full list)")
    ap.add_argument("--out", default=str(HERE / "compiled_step"))
    args = ap.parse_args()
    csv_path, md_path = Path(args.out + ".csv"), Path(args.out + ".md")
    if not args.tables_only:
        sizes = SIZES_QUICK if args.quick else SIZES_FULL
        if args.sizes:
            sizes = [tuple(int(v) for v in s.split(":")) for s in args.sizes.split(",")]
        rows, bw_cache = [], {}
        load0 = os.getloadavg()
        for B, H in sizes:
            for cell in args.cells.split(","):
                for rule in CELL_RULES[cell]:
                    if rule == "uoro" and B > 1 and H > 256:
                        continue
                    r = measure(cell, rule, B, H, args.rounds, bw_cache)
                    rows.append(r)
                    with open(csv_path, "w", newline="") as fh:
                        w = csv.DictWriter(fh, FIELDS)
                        w.writeheader()
                        w.writerows(rows)
                    print(f"{cell:6s} {rule:6s} B={B:3d} H={H:5d} eager {r['eager_us']:9.1f} "
                          f"compiled {r['compiled_us']:9.1f} torch {r['torch_us']:8.1f} "
                          f"x torch {r['compiled_x_torch']:6.2f} x floor "
                          f"{r['compiled_x_floor']:6.1f} compile {r['compile_s']:5.1f}s "
                          f"{r['mode']}", flush=True)
        load1 = os.getloadavg()
        print(f"load average before {load0}, after {load1}")
    with open(csv_path) as fh:
        rows = list(csv.DictReader(fh))
    loads = [float(r["load"]) for r in rows]
    md = (f"{table(rows)}\n\nCPU float32, torch {torch.__version__}, one thread unless noted; "
          f"1-minute load average during the run {min(loads):.1f} to {max(loads):.1f} on "
          f"{os.cpu_count()} visible cores (other engineers' jobs).\n\n{targets(rows)}")
    md_path.write_text(md)


if __name__ == "__main__":
    main()
