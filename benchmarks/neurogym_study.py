"""Learning rules on neurogym's cognitive tasks: the study of docs/neurogym.md.

Trains every (task, cell, algorithm, seed) with ``rnngrad.runs.run`` (the run ``rnngrad
train`` makes) and records neurogym's own performance measure on the fixed test set: the
output's argmax at each trial's last step against the ground truth there. One thread per
process; each finished run is appended to the CSV at once, a rerun skips the runs already
recorded (so an interrupted study continues), and ``--workers n --worker i`` processes
share the list, worker i starting i/n of the way in (claims in
benchmarks/.neurogym_claims).

    python benchmarks/neurogym_study.py                  # runs, then the table and plot
    python benchmarks/neurogym_study.py --report-only    # table and plot from the CSV

Writes benchmarks/neurogym.csv, benchmarks/neurogym_table.md and docs/neurogym/perf.png.
RFLO (Murray 2019) is defined for the Elman cell only: on the GRU its row is n/a.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TASKS = ["PerceptualDecisionMaking-v0", "DelayMatchSample-v0", "ContextDecisionMaking-v0"]
# ContextDecisionMaking in neurogym 2.3.1 gives no go cue (its fixation input is off after
# the fixation period) and a random delay before its one-step decision period: trained on
# every step, no network can know when to answer (BPTT: performance 0.0). Its loss and
# measure are on the decision period (mask="decision"): decision-period accuracy.
TASK_KWARGS = {"ContextDecisionMaking-v0": {"mask": "decision"}}
CELLS = ["elman", "gru"]
ALGORITHMS = ["bptt", "eprop", "eprop_rand", "rflo", "snap1", "uoro"]
LABELS = {"bptt": "BPTT", "eprop": "e-prop (sym.)", "eprop_rand": "e-prop (random)",
          "rflo": "RFLO", "snap1": "SnAp-1", "uoro": "UORO"}
FIELDS = ["task", "mask", "cell", "algorithm", "seed", "status", "test_perf", "test_acc",
          "test_loss_per_step", "steps", "hidden", "batch_size", "lr", "cpu_s", "load1"]


def run_one(task: str, cell: str, algorithm: str, seed: int, args) -> dict:
    from rnngrad.runs import run

    kwargs = {"test_size": args.test_size, **TASK_KWARGS.get(task, {})}
    row = {"task": task, "mask": kwargs.get("mask", "trial"), "cell": cell, "algorithm": algorithm, "seed": seed,
           "steps": args.steps, "hidden": args.hidden, "batch_size": args.batch_size,
           "lr": args.lr, "load1": round(os.getloadavg()[0], 2)}
    config = {"task": f"neurogym:{task}", "task_kwargs": kwargs,
              "cell": cell, "algorithm": algorithm, "hidden": args.hidden, "steps": args.steps,
              "batch_size": args.batch_size, "lr": args.lr, "seed": seed,
              "log_every": args.steps}
    t0 = time.thread_time()
    try:
        final = run(config).final
    except ValueError as e:  # RFLO on a GRU: the rule is not defined there
        if algorithm == "rflo" and cell != "elman":
            return {**row, "status": "n/a", "test_perf": "", "test_acc": "",
                    "test_loss_per_step": "", "cpu_s": 0.0}
        raise RuntimeError(f"{task} {cell} {algorithm} seed {seed}: {e}") from e
    except ArithmeticError as e:
        return {**row, "status": f"diverged: {e}"[:80], "test_perf": "", "test_acc": "",
                "test_loss_per_step": "", "cpu_s": time.thread_time() - t0}
    return {**row, "status": "ok", "test_perf": final["test_perf"],
            "test_acc": final["test_acc"], "test_loss_per_step": final["test_loss_per_step"],
            "cpu_s": round(time.thread_time() - t0, 2)}


def _stats(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, s


def report(rows: list[dict], table: Path, plot: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["| task | cell | " + " | ".join(LABELS[a] for a in ALGORITHMS) + " |",
             "|---|---|" + "---|" * len(ALGORITHMS)]
    summary: dict[tuple, tuple[float, float, list[float]] | None] = {}
    for task in TASKS:
        for cell in CELLS:
            cells = []
            for algo in ALGORITHMS:
                rs = [r for r in rows if (r["task"], r["cell"], r["algorithm"]) ==
                      (task, cell, algo)]
                ok = [float(r["test_perf"]) for r in rs if r["status"] == "ok"]
                if rs and all(r["status"] == "n/a" for r in rs):
                    cells.append("n/a")
                    summary[task, cell, algo] = None
                elif ok:
                    m, s = _stats(ok)
                    bad = len(rs) - len(ok)
                    cells.append(f"{m:.3f} ± {s:.3f}" + (f" ({bad} diverged)" if bad else ""))
                    summary[task, cell, algo] = (m, s, ok)
                else:
                    cells.append("–")
            lines.append(f"| {task.removesuffix('-v0')} | {cell} | " + " | ".join(cells) + " |")
    lines += ["", "CPU seconds per run (one thread; mean over tasks and seeds; the whole run: "
                  "data, gradients, updates, test):", "",
              "| cell | " + " | ".join(LABELS[a] for a in ALGORITHMS) + " |",
              "|---|" + "---|" * len(ALGORITHMS)]
    for cell in CELLS:
        cpu = []
        for algo in ALGORITHMS:
            xs = [float(r["cpu_s"]) for r in rows
                  if (r["cell"], r["algorithm"], r["status"]) == (cell, algo, "ok")]
            cpu.append(f"{sum(xs) / len(xs):.1f}" if xs else "n/a")
        lines.append(f"| {cell} | " + " | ".join(cpu) + " |")
    seeds = sorted({int(r["seed"]) for r in rows})
    cpu = sum(float(r["cpu_s"]) for r in rows)
    loads = [float(r["load1"]) for r in rows]
    lines += ["", f"neurogym performance on the fixed test set (mean ± std over seeds "
                  f"{', '.join(map(str, seeds))}); {len(rows)} runs, {cpu:.0f} s CPU in all; "
                  f"1-min load average {min(loads):.1f} to {max(loads):.1f} during the runs."]
    table.write_text("\n".join(lines) + "\n")

    fig, axes = plt.subplots(1, len(TASKS), figsize=(4.2 * len(TASKS), 3.6), sharey=True)
    width = 0.38
    for ax, task in zip(axes, TASKS):
        for j, cell in enumerate(CELLS):
            xs, ms = [], []
            for i, algo in enumerate(ALGORITHMS):
                x = i + (j - 0.5) * width
                if (task, cell, algo) in summary and summary[task, cell, algo] is None:
                    ax.text(x, 0.02, "n/a", ha="center", fontsize=7, rotation=90)
                v = summary.get((task, cell, algo))
                if v:
                    xs.append(x)
                    ms.append(v[0])
                    ax.scatter([x] * len(v[2]), v[2], s=7, color="black", zorder=3)
            ax.bar(xs, ms, width, label=cell, color=f"C{j}")
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(ALGORITHMS)), [LABELS[a] for a in ALGORITHMS], rotation=45,
                      ha="right", fontsize=8)
        ax.set_title(task.removesuffix("-v0"), fontsize=10)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("neurogym performance (test)\nbars: mean, dots: seeds")
    axes[-1].legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(plot, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--test-size", type=int, default=256)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--csv", default=str(ROOT / "benchmarks" / "neurogym.csv"))
    p.add_argument("--table", default=str(ROOT / "benchmarks" / "neurogym_table.md"))
    p.add_argument("--plot", default=str(ROOT / "docs" / "neurogym" / "perf.png"))
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--worker", type=int, default=0, help="this worker's index (0-based)")
    p.add_argument("--workers", type=int, default=1,
                   help="workers sharing the CSV, each one process started with its --worker")
    args = p.parse_args()
    torch.set_num_threads(1)
    path = Path(args.csv)
    rows = list(csv.DictReader(path.read_text().splitlines())) if path.exists() else []
    if not args.report_only:
        keys = [(task, cell, algo, seed) for seed in range(args.seeds) for task in TASKS
                for cell in CELLS for algo in ALGORITHMS]  # seed outermost: whole seeds first
        if not 0 <= args.worker < args.workers:
            raise SystemExit(f"--worker must be in 0..{args.workers - 1}, got {args.worker}")
        start = args.worker * len(keys) // args.workers  # worker i starts i/n of the way in
        keys = keys[start:] + keys[:start]
        claims = path.parent / ".neurogym_claims"
        claims.mkdir(exist_ok=True)
        if not path.exists():
            with open(path, "w", newline="") as f:
                csv.DictWriter(f, fieldnames=FIELDS).writeheader()
        for key in keys:
            done = {(r["task"], r["cell"], r["algorithm"], int(r["seed"]))
                    for r in csv.DictReader(path.read_text().splitlines())}
            if key in done:
                continue
            try:  # a run another worker has taken
                os.close(os.open(claims / "-".join(map(str, key)), os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                continue
            row = run_one(*key, args)
            with open(path, "a", newline="") as f:  # one write per row: workers share the file
                csv.DictWriter(f, fieldnames=FIELDS).writerow(row)
            print(f"{' '.join(map(str, key))}: {row['status']} perf {row['test_perf']} "
                  f"({row['cpu_s']} s)", flush=True)
        rows = list(csv.DictReader(path.read_text().splitlines()))
    report(rows, Path(args.table), Path(args.plot))
    print(Path(args.table).read_text())


if __name__ == "__main__":
    main()
