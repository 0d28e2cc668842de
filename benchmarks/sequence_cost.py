"""Per-sequence cost of the truncated rules in sequence form, against BPTT of the same network.

``rnngrad.gradient`` with e-prop, RFLO (Elman only), SnAp-1 and exact RTRL on the diagonal
cells (LRU, eLSTM), each timed against ``rnngrad.bptt()`` on the same network and data,
in the same process, interleaved, one thread, CPU time (``time.thread_time``), median of
repeats, float32; T = 200, B = 64, D = 32. The "old" column is the step loop the same
algorithm ran before (``algo._replace(sequence=None)``: the online init/step/flush
summed), the faster of two runs on the first ``--old-steps`` steps, scaled to T (its cost
per step is constant in T), against the median BPTT time; "-" where it was not run.

    python benchmarks/sequence_cost.py                      # H = 64, 256, 1024
    python benchmarks/sequence_cost.py --sizes 64 --repeats 3

Writes benchmarks/sequence_cost.csv and .md (with os.getloadavg() at the start and end).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
from pathlib import Path

import torch

import rnngrad
from rnngrad.cells import ALIF, ELSTM, GRU, LRU, LSTM, Elman

HERE = Path(__file__).resolve().parent
T, B, D, K = 200, 64, 32, 10

CELLS = {
    "Elman": lambda H: Elman(D, H),
    "GRU": lambda H: GRU(D, H),
    "LSTM": lambda H: LSTM(D, H),
    "ALIF": lambda H: ALIF(D, H),
    "LRU": lambda H: LRU(D, H),
    "eLSTM": lambda H: ELSTM(D, H),
}


def rules(cell: str) -> dict:
    out = {"eprop": rnngrad.eprop(), "snap1": rnngrad.snap1()}
    if cell == "Elman":
        out["rflo"] = rnngrad.rflo()
    if cell in ("LRU", "eLSTM"):
        out["rtrl"] = rnngrad.rtrl()
    return out


def cpu(fn) -> float:
    t0 = time.thread_time()
    fn()
    return time.thread_time() - t0


def measure(cell: str, H: int, repeats: int, old_steps: int) -> list[dict]:
    load = round(os.getloadavg()[0], 1)  # the 1-minute load average as this cell starts
    torch.manual_seed(0)
    net = rnngrad.Network(CELLS[cell](H), K)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, D, generator=g)
    y = torch.randn(T, B, K, generator=g)
    algos = rules(cell)
    bptt = rnngrad.bptt()

    def grad(algo, n=T):
        return lambda: rnngrad.gradient(net, x[:n], y[:n], algorithm=algo)

    for a in (bptt, *algos.values()):  # warm-up (and the one-time cell checks)
        grad(a, 5)()
    times = {n: [] for n in ["bptt", *algos]}
    for _ in range(repeats):  # interleaved: each repeat times every variant once
        times["bptt"].append(cpu(grad(bptt)))
        for n, a in algos.items():
            times[n].append(cpu(grad(a)))
    old = {}
    if old_steps:
        for n, a in algos.items():
            step_loop = a._replace(sequence=None)
            grad(step_loop, 2)()  # its own warm-up
            b = statistics.median(times["bptt"])
            o = min(cpu(grad(step_loop, old_steps)) for _ in range(2)) * T / old_steps
            old[n] = o / b
    bp = statistics.median(times["bptt"])
    rows = []
    for n in algos:
        t = statistics.median(times[n])
        rows.append({"cell": cell, "H": H, "rule": n, "bptt_s": round(bp, 4),
                     "rule_s": round(t, 4), "ratio": round(t / bp, 3),
                     "old_ratio": round(old[n], 2) if n in old else "",
                     "repeats": repeats, "old_steps": old_steps or "", "load": load})
    return rows


def bellec(repeats: int, out: str) -> None:
    """One iteration of the evidence-accumulation reproduction (benchmarks/reproduce_bellec.py,
    docs/spiking.md: 100 LIF/ALIF neurons, leaky readout, rate regulariser as a reward,
    its shortened trial T = 500 and batch 16, and Bellec's T = 2250, batch 64): e-prop's
    ``rnngrad.gradient`` (new: the sequence form; old: the step loop) / BPTT's."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("reproduce_bellec",
                                                  HERE / "reproduce_bellec.py")
    rb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rb)
    rows = []
    for short, batch in ((True, 16), (False, 64)):
        task = rb.make_task(short)
        net = rb.make_network(50, 50, 0)
        b = task.batch(batch, generator=1)
        reward = rb.rate_regulariser()
        algos = {"bptt": rnngrad.bptt(), "eprop": rnngrad.eprop(),
                 "eprop_random": rnngrad.eprop("random")}
        algos["eprop_old"] = algos["eprop"]._replace(sequence=None)

        def it(a, net=net, b=b, reward=reward):
            return lambda: rnngrad.gradient(net, b.inputs, b.targets, algorithm=a,
                                            loss="cross_entropy", mask=b.mask, reward=reward)

        for a in algos.values():
            it(a)()
        times = {n: [] for n in algos}
        for _ in range(repeats):
            for n, a in algos.items():
                if n == "eprop_old" and not short and times[n]:
                    continue  # one run of the old path on the full trial
                times[n].append(cpu(it(a)))
        bp = statistics.median(times["bptt"])
        for n in algos:
            t = statistics.median(times[n])
            rows.append({"T": b.inputs.shape[0], "B": batch, "rule": n, "seconds": round(t, 4),
                         "ratio": round(t / bp, 3)})
            print(rows[-1], flush=True)  # noqa: T201 (a script, not the library)
    with open(out + "_bellec.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--cells", nargs="+", default=list(CELLS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--repeats-large", type=int, default=1, help="repeats at H = 1024")
    ap.add_argument("--old-steps", type=int, default=20,
                    help="steps of the old step loop timed (0: skip it)")
    ap.add_argument("--old-max-h", type=int, default=256, help="no old path above this H")
    ap.add_argument("--out", default=str(HERE / "sequence_cost"))
    ap.add_argument("--bellec", action="store_true",
                    help="only the evidence-accumulation iteration (writes *_bellec.csv)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.bellec:
        bellec(args.repeats, args.out)
        return
    load0 = os.getloadavg()
    rows = []
    for H in args.sizes:
        for cell in args.cells:
            rep = args.repeats if H < 1024 else args.repeats_large
            old = args.old_steps if H <= args.old_max_h else 0
            new = measure(cell, H, rep, old)
            rows += new
            for r in new:
                print(r, flush=True)  # noqa: T201 (a script, not the library)
    load1 = os.getloadavg()
    with open(args.out + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [
        "# Per-sequence cost of the truncated rules / BPTT of the same network",
        "",
        f"T = {T}, B = {B}, D = {D}, K = {K}, float32, one thread, CPU time "
        "(`time.thread_time`), median of repeats, interleaved with BPTT in one process "
        "(`benchmarks/sequence_cost.py`). \"new\": `rnngrad.gradient` (the sequence form); "
        "\"old\": the online step loop (`algo._replace(sequence=None)`), timed on the first "
        f"{args.old_steps} steps and scaled to T. Load average at start "
        f"{tuple(round(v, 2) for v in load0)}, at end {tuple(round(v, 2) for v in load1)} "
        f"(2 shared cores); \"load\": the 1-minute load average as the cell's rows began. "
        f"Repeats: {args.repeats} (H = 1024: {args.repeats_large}).",
        "",
        "| cell | H | rule | BPTT (s) | rule (s) | new / BPTT | old / BPTT | load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['cell']} | {r['H']} | {r['rule']} | {r['bptt_s']} | {r['rule_s']} "
                     f"| {r['ratio']} | {r['old_ratio'] or '-'} | {r['load']} |")
    bellec_csv = Path(args.out + "_bellec.csv")
    if bellec_csv.exists():  # the evidence-accumulation iteration, from --bellec
        lines += ["", "## The evidence-accumulation e-prop iteration (docs/spiking.md)", "",
                  "`--bellec`: `rnngrad.gradient` on 100 LIF/ALIF neurons with the leaky "
                  "readout, cross-entropy over the recall window and the rate regulariser "
                  "as a reward; ratio to BPTT's gradient on the same batch (eprop_old: the "
                  "step loop).", "", "| T | B | rule | seconds | / BPTT |", "|---|---|---|---|---|"]
        with open(bellec_csv) as f:
            for r in csv.DictReader(f):
                lines.append(f"| {r['T']} | {r['B']} | {r['rule']} | {r['seconds']} | "
                             f"{r['ratio']} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
