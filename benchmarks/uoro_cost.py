"""UORO and KF-RTRL per sequence, against BPTT on the same network.

    python benchmarks/uoro_cost.py                          # appends rows to uoro_cost.csv
    RNNGRAD_ROOT=/path/to/old/checkout python benchmarks/uoro_cost.py --impl old
    python benchmarks/uoro_cost.py --report                 # uoro_cost.md from the CSV

Setting: ``rnngrad.gradient`` over one sequence, T = 200, B = 64, D = 32, K = 10, MSE on
every step, float32, one thread (``torch.set_num_threads(1)``), CPU time of the thread
(``time.thread_time``). Networks: ``rnngrad.RNN``, ``Network(Elman)``, GRU, LSTM, ALIF, LRU
(one layer of H units). Each ratio is an algorithm's time over BPTT's time on the same
network in the same process, the two timed round-robin, median of the repeats (fewer at
H = 1024). Where a whole sequence would take minutes (KF-RTRL, O(B H^3) a step, and the
old online UORO at large H) the algorithm is timed on its first ``steps`` steps and the
time scaled by T / steps: an online rule's step costs the same at every t, and the CSV's
``steps`` column says where that was done. ``--impl old`` runs the code of another
checkout (before the sequence form) for the ratio beside the new one.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, os.environ.get("RNNGRAD_ROOT") or str(HERE.parent))

import torch  # noqa: E402

import rnngrad  # noqa: E402
from rnngrad.cells import ALIF, GRU, LRU, LSTM, Elman  # noqa: E402

T, B, D, K = 200, 64, 32, 10
NETS = ("RNN", "Network(Elman)", "GRU", "LSTM", "ALIF", "LRU")
CSV = HERE / "uoro_cost.csv"
ONLINE_ONLY: tuple = ()  # networks timed on the online steps (none: ALIF has the sequence form)
FIELDS = ["impl", "device", "network", "H", "algorithm", "steps", "seconds", "bptt_seconds",
          "ratio", "repeats", "loadavg"]


def make(name: str, H: int):
    torch.manual_seed(0)
    if name == "RNN":
        return rnngrad.RNN(D, H, K)
    cell = {"Network(Elman)": lambda: Elman(D, H), "GRU": lambda: GRU(D, H),
            "LSTM": lambda: LSTM(D, H), "ALIF": lambda: ALIF(D, H, v_th=0.3),
            "LRU": lambda: LRU(D, H)}[name]()
    return rnngrad.Network(cell, K)


def cpu_time(fn) -> float:
    t0 = time.thread_time()
    fn()
    return time.thread_time() - t0


def measure(net, algo, x, y, repeats: int, steps: int):
    """Median seconds of BPTT over the whole sequence and of algo over its first ``steps``
    steps scaled to T, timed round-robin."""
    xs, ys = x[:steps], y[:steps]
    bp, al = [], []
    rnngrad.gradient(net, xs, ys, algorithm=algo)  # warm-up (caches, first-call costs)
    for _ in range(repeats):
        bp.append(cpu_time(lambda: rnngrad.gradient(net, x, y, algorithm=rnngrad.bptt())))
        al.append(cpu_time(lambda: rnngrad.gradient(net, xs, ys, algorithm=algo)) * T / steps)
    return statistics.median(al), statistics.median(bp)


def run(args) -> None:
    torch.set_num_threads(1)
    rows = []
    for H in args.sizes:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(T, B, D, generator=g)
        y = torch.randn(T, B, K, generator=g)
        reps = args.repeats if H < 1024 else max(1, args.repeats // 3)
        for name in args.nets:
            net = make(name, H)
            cases = [("uoro", rnngrad.uoro(seed=0))]
            if name in ("RNN", "Network(Elman)") and args.kf:
                if name == "RNN" or args.impl != "old":
                    cases.append(("kf_rtrl", rnngrad.kf_rtrl(seed=0)))
            for label, algo in cases:
                steps = T
                if label == "kf_rtrl":
                    steps = min(T, max(2, int(args.kf_budget * 64 ** 2 / H ** 2)))
                elif (args.impl == "old" or name in ONLINE_ONLY) and H > 64:
                    steps = args.old_steps
                sec, bsec = measure(net, algo, x, y, reps, steps)
                row = {"impl": args.impl, "device": "cpu 1 thread", "network": name, "H": H,
                       "algorithm": label, "steps": steps, "seconds": f"{sec:.4f}",
                       "bptt_seconds": f"{bsec:.4f}", "ratio": f"{sec / bsec:.2f}",
                       "repeats": reps, "loadavg": f"{os.getloadavg()[0]:.2f}"}
                print(row, flush=True)
                rows.append(row)
    new = not CSV.exists()
    with CSV.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerows(rows)


def phases(args) -> None:
    """Where the sequence form's time goes (CPU seconds per phase, median of the repeats),
    beside BPTT's whole time: the forward pass and the factors, the signs, the Gram
    matrices, the step loop (J_t h~ and the norms' scalars) and the readout."""
    import functools

    from rnngrad.algorithms import _uoro_sequence as S

    torch.set_num_threads(1)
    acc: dict = {}

    def wrap(name):
        f = getattr(S, name)

        @functools.wraps(f)
        def g(*a, **k):
            t0 = time.thread_time()
            r = f(*a, **k)
            acc[name] = acc.get(name, 0.0) + time.thread_time() - t0
            return r

        setattr(S, name, g)

    for n in ("_gram", "signs", "_elman", "_generic", "run", "_readout"):
        wrap(n)
    rows = []
    for H in args.sizes:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(T, B, D, generator=g)
        y = torch.randn(T, B, K, generator=g)
        for name in args.nets:
            net = make(name, H)
            algo = rnngrad.uoro(seed=0)
            rnngrad.gradient(net, x, y, algorithm=algo)
            samples = []
            for _ in range(args.repeats):
                acc.clear()
                tot = cpu_time(functools.partial(rnngrad.gradient, net, x, y, algorithm=algo))
                bp = cpu_time(functools.partial(rnngrad.gradient, net, x, y,
                                                algorithm=rnngrad.bptt()))
                samples.append((dict(acc), tot, bp))
            med = {k: statistics.median(s[0].get(k, 0.0) for s in samples)
                   for k in ("_elman", "_generic", "signs", "_gram", "run", "_readout")}
            tot = statistics.median(s[1] for s in samples)
            bp = statistics.median(s[2] for s in samples)
            fwd = med["_elman"] + med["_generic"] - med["signs"]
            row = {"network": name, "H": H, "bptt": bp, "uoro": tot, "forward+factors": fwd,
                   "signs": med["signs"], "gram": med["_gram"],
                   "step_loop+gradient_gemms": med["run"] - med["_gram"],
                   "readout": med["_readout"], "loadavg": os.getloadavg()[0]}
            print(row, flush=True)
            rows.append(row)
    out = HERE / "uoro_cost_phases.csv"
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})


def report() -> None:
    rows = list(csv.DictReader(CSV.open()))
    table: dict = {}
    for r in rows:
        table[(r["network"], int(r["H"]), r["algorithm"], r["impl"])] = r
    lines = ["# UORO and KF-RTRL against BPTT, per sequence", "",
             "`python benchmarks/uoro_cost.py` (see its docstring): `rnngrad.gradient`, T = 200, "
             "B = 64, D = 32, K = 10, float32, one thread, CPU time, the time of the algorithm "
             "over BPTT's on the same network in the same process (median of the repeats). "
             "old: the code before the sequence form (online steps summed); new: this "
             "branch. steps < 200: timed on that many steps and scaled to 200 (online "
             "rules cost the same every step).", "",
             "| network | H | algorithm | old / BPTT | new / BPTT | new s | BPTT s | steps timed (old, new) | load |",
             "|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({k[:3] for k in table}, key=lambda k: (k[2], NETS.index(k[0]), k[1]))
    for net, H, algo in keys:
        o = table.get((net, H, algo, "old"))
        n = table.get((net, H, algo, "new"))
        lines.append(
            f"| {net} | {H} | {algo} | {o['ratio'] + 'x' if o else '-'} | "
            f"{n['ratio'] + 'x' if n else '-'} | {n['seconds'] if n else '-'} | "
            f"{n['bptt_seconds'] if n else '-'} | {o['steps'] if o else '-'}, "
            f"{n['steps'] if n else '-'} | {n['loadavg'] if n else o['loadavg']} |")
    ph = HERE / "uoro_cost_phases.csv"
    if ph.exists():
        lines += ["", "Where the sequence form's time goes (`--phases`; CPU seconds, median of 3):",
                  "", "| network | H | BPTT | UORO | forward + factors | signs | Gram | step loop "
                  "+ gradient GEMMs | readout |", "|---|---|---|---|---|---|---|---|---|"]
        for r in csv.DictReader(ph.open()):
            lines.append(f"| {r['network']} | {r['H']} | {r['bptt']} | {r['uoro']} | "
                         f"{r['forward+factors']} | {r['signs']} | {r['gram']} | "
                         f"{r['step_loop+gradient_gemms']} | {r['readout']} |")
    md = HERE / "uoro_cost.md"
    marker = "<!-- notes: kept by --report -->"
    notes = md.read_text().split(marker, 1)[1] if md.exists() and marker in md.read_text() else "\n"
    md.write_text("\n".join(lines) + "\n\n" + marker + notes)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--impl", default="new")
    p.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")],
                   default=[64, 256, 1024])
    p.add_argument("--nets", type=lambda s: s.split(","), default=list(NETS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--old-steps", type=int, default=20)
    p.add_argument("--kf-budget", type=float, default=200.0)
    p.add_argument("--no-kf", dest="kf", action="store_false")
    p.add_argument("--report", action="store_true")
    p.add_argument("--phases", action="store_true")
    args = p.parse_args()
    if args.report:
        report()
    elif args.phases:
        phases(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
