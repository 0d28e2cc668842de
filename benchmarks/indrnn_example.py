"""The IndRNN worked example of docs/cells.md: what its declarations buy, per sequence.

The two cells (``IndRNN``: init_state / step / output only; ``FastIndRNN``: the same with
``diagonal = True`` and ``linearize`` giving ``local``, ``eligibility``, ``immediate``) are
run from the code block in docs/cells.md. ``rnngrad.gradient`` with BPTT, SnAp-1, e-prop
and exact RTRL on each, and the step loop those rules ran before the sequence forms
(``algo._replace(sequence=None)``: the online init/step/flush summed), timed on the first
``--old-steps`` steps and scaled to T. T = 200, B = 64, D = 32, K = 10, float32, one
thread, CPU time (``time.thread_time``), median of repeats, every variant interleaved in
one process; ratios to the plain cell's BPTT.

    python benchmarks/indrnn_example.py                   # H = 16, 256
    python benchmarks/indrnn_example.py --sizes 16 --repeats 3

Writes benchmarks/indrnn_example.csv and .md (os.getloadavg() at the start and end).
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import statistics
import time
from pathlib import Path

import torch

import rnngrad

HERE = Path(__file__).resolve().parent
T, B, D, K = 200, 64, 32, 10


def load_cells() -> dict:
    """The code block after "### Worked example: an IndRNN cell" in docs/cells.md, run."""
    doc = (HERE.parent / "docs" / "cells.md").read_text()
    sec = doc.split("### Worked example: an IndRNN cell", 1)[1]
    code = re.search(r"```python\n(.*?)```", sec, re.S).group(1)
    ns: dict = {"__name__": "indrnn_example_cells"}
    exec(compile(code, "docs/cells.md (IndRNN)", "exec"), ns)
    return ns


def cpu(fn) -> float:
    t0 = time.thread_time()
    fn()
    return time.thread_time() - t0


RULES = {"bptt": rnngrad.bptt, "snap1": rnngrad.snap1, "eprop": rnngrad.eprop,
         "rtrl": rnngrad.rtrl}


def measure(cells: dict, H: int, repeats: int, old_steps: int,
            dense_steps: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, D, generator=g)
    y = torch.randn(T, B, K, generator=g)
    nets = {}
    for version in ("IndRNN", "FastIndRNN"):
        torch.manual_seed(0)  # the same weights in both versions
        nets[version] = rnngrad.Network(cells[version](D, H), K)
    def run(v: str, a, n: int = T):
        return lambda k=n: rnngrad.gradient(nets[v], x[:k], y[:k], algorithm=a)

    runs = {(v, r): run(v, mk()) for v in nets for r, mk in RULES.items()}
    for (_, r), fn in runs.items():  # warm-up (and the one-time checks of a user's cell)
        fn(T if r == "bptt" else 2)
    # exact RTRL on the plain cell has no sequence form (no diagonal declared): its dense
    # influence costs O(B H^2 |params|) a step, so it is timed on dense_steps, scaled to T
    dense = {("IndRNN", "rtrl")}
    times: dict = {k: [] for k in runs}
    for _ in range(repeats):  # interleaved
        for k, fn in runs.items():
            times[k].append(cpu(lambda f=fn: f(dense_steps)) * T / dense_steps if k in dense
                            else cpu(fn))
    old = {}
    if old_steps:
        for v in nets:
            for r, mk in RULES.items():
                if r == "bptt" or (v, r) in dense:  # dense: the step loop is its only form
                    continue
                fn = run(v, mk()._replace(sequence=None), old_steps)
                fn()
                old[v, r] = min(cpu(fn) for _ in range(2)) * T / old_steps
    base = statistics.median(times["IndRNN", "bptt"])
    rows = []
    for (v, r), ts in times.items():
        med = statistics.median(ts)
        rows.append({"H": H, "cell": v, "rule": r, "seconds": round(med, 4),
                     "ratio_to_plain_bptt": round(med / base, 3),
                     "old_seconds": round(old[v, r], 4) if (v, r) in old else "",
                     "old_ratio": round(old[v, r] / base, 2) if (v, r) in old else "",
                     "form": ("step loop, dense, scaled" if (v, r) in dense else
                              "bptt" if r == "bptt" else "sequence")})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 256])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--old-steps", type=int, default=20)
    ap.add_argument("--dense-steps", type=int, default=10)
    ap.add_argument("--out", type=Path, default=HERE / "indrnn_example")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cells = load_cells()
    load0 = os.getloadavg()
    rows = [r for H in args.sizes for r in measure(cells, H, args.repeats, args.old_steps,
                                                  max(1, args.dense_steps * 16 // H))]
    load1 = os.getloadavg()
    with open(args.out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = ["# The IndRNN worked example (docs/cells.md): plain against declared", "",
             f"T = {T}, B = {B}, D = {D}, K = {K}, float32, one thread, CPU time, median of "
             f"{args.repeats} interleaved repeats in one process (`benchmarks/indrnn_example.py`)"
             f". Ratios to the plain cell's BPTT at the same H. \"old\": the online step loop "
             f"(`algo._replace(sequence=None)`), the faster of two runs on the first "
             f"{args.old_steps} steps scaled to T. The plain cell's exact RTRL has no sequence "
             f"form (dense influence, O(B H^2 |params|) a step): timed on "
             f"max(1, {args.dense_steps} * 16 / H) steps, scaled to T. Load average at start "
             f"{tuple(round(v, 2) for v in load0)}, at end {tuple(round(v, 2) for v in load1)}"
             " (2 shared cores).", "",
             "| H | cell | rule | form | seconds | / plain BPTT | old seconds | old / plain BPTT |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['H']} | {r['cell']} | {r['rule']} | {r['form']} | {r['seconds']} | "
                     f"{r['ratio_to_plain_bptt']} | {r['old_seconds'] or '-'} | "
                     f"{r['old_ratio'] or '-'} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
