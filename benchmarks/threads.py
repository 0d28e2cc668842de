"""How many torch threads `rnngrad` should use: `rnngrad train --task digits` for 300 steps
on 1 and on 2 threads, interleaved, each run in a fresh process, with the load average
recorded before each (docs/threads.md).

    python benchmarks/threads.py [--repeats 5] [--csv benchmarks/threads.csv]

Wall time is what a user waits; CPU time (user + system of the run's process) shows the
threads spinning on each other when another process holds a core.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHILD = r"""
import resource, sys, time
from rnngrad.cli import main
t0 = time.perf_counter()
rc = main(["train", "--task", "digits", "--steps", "300", "--hidden", "64", "--batch-size", "32",
           "--log-every", "300", "--no-progress", "--threads", sys.argv[1], "--out", sys.argv[2]])
wall = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_SELF)
print("RESULT", rc, wall, ru.ru_utime + ru.ru_stime, file=sys.stderr)
"""


def one(threads: int, out: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # --threads decides
        env.pop(k, None)
    load = os.getloadavg()
    p = subprocess.run([sys.executable, "-c", CHILD, str(threads), out], env=env,
                       capture_output=True, text=True, check=True)
    _, rc, wall, cpu = next(x for x in p.stderr.splitlines() if x.startswith("RESULT")).split()
    acc = p.stdout.splitlines()[2].split()[-2]  # the table's test_acc
    return {"threads": threads, "wall_s": float(wall), "cpu_s": float(cpu),
            "test_acc": float(acc), "load_1min": load[0], "load_5min": load[1], "rc": int(rc)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--csv", default=str(ROOT / "benchmarks" / "threads.csv"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for n in (1, 2) if rep % 2 == 0 else (2, 1):  # interleaved, alternating order
                rows.append({"repeat": rep, **one(n, f"{tmp}/run-{rep}-{n}")})
                print(rows[-1], flush=True)
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
