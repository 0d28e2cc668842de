"""Marschall, Cho & Savin (2020), JMLR 21(135): online learning rules on their add task.

Their set-up, as far as rnngrad follows it (``rnngrad.tasks.StreamAdd``): a binary
stream x_t ~ Bernoulli(1/2) presented as [x_t, 1 - x_t], label
y_t = 0.5 + 0.5 x_{t-5} - 0.25 x_{t-9}, one continuous stream (the hidden state and
every algorithm's influence/traces are carried across chunks), 32 tanh units (alpha = 1),
orthogonal W_rec, a sigmoid readout scored by cross-entropy against y_t, plain SGD.

Where this run departs from theirs, to fit ~10 CPU minutes: B = 8 parallel streams
(their runs have one), an SGD step every 10 time steps on the gradient summed over
them (theirs: every step), learning rate 0.03 (chosen by a short pilot: 0.1 made
KF-RTRL diverge, 0.3 RTRL too), and 3e4 time steps per stream (theirs: far longer runs). BPTT is truncated at the 10-step chunk boundaries
(TBPTT(10), so it cannot see x_{t-9} for most t of a chunk); RTRL is the exact online
reference.

    python benchmarks/reproduce_marschall.py      # ~2.5 min; writes docs/online_comparison/
    python benchmarks/reproduce_marschall.py --lr 0.01 --steps 6000 \
        --out docs/online_comparison/lr0.01           # ~5 min: the slower, longer run
    python benchmarks/reproduce_marschall.py --algorithms uoro \
        --lr-for uoro=0.01,0.003,0.001 --out docs/online_comparison/uoro_lr_sweep

``--algorithms`` runs a subset; ``--lr-for NAME=LR[,LR...]`` gives an algorithm its own
learning rate(s) (several: a sweep, each run labelled with its rate); ``--clip`` clips
the gradient norm before each SGD step.

The table is printed as Markdown for docs/online_comparison.md.
"""

from __future__ import annotations

import csv
import sys
import tempfile
import time
from pathlib import Path

import torch

import rnngrad
from rnngrad.compare import compare
from rnngrad.tasks import StreamAdd

OUT = Path(__file__).resolve().parent.parent / "docs" / "online_comparison"

ALGORITHMS = [
    ("rtrl", rnngrad.rtrl()),
    ("bptt (chunks of 10)", rnngrad.bptt()),
    ("kf_rtrl", rnngrad.kf_rtrl(seed=0)),
    ("uoro", rnngrad.uoro(seed=0)),
    ("snap1", rnngrad.snap1()),
    ("eprop", rnngrad.eprop()),
    ("rflo", rnngrad.rflo(seed=0)),
]


def _parse_lr_for(specs) -> dict[str, list[float]]:
    """``["uoro=0.01,0.003", "rtrl=0.03"]`` -> ``{"uoro": [0.01, 0.003], "rtrl": [0.03]}``."""
    known = {n.split()[0] for n, _ in ALGORITHMS}
    out: dict[str, list[float]] = {}
    for spec in specs or ():
        name, sep, values = spec.partition("=")
        if not sep or name not in known:
            raise ValueError(f"--lr-for takes NAME=LR[,LR...] with NAME in {sorted(known)}, "
                             f"got {spec!r}")
        out[name] = [float(v) for v in values.split(",")]
    return out


def _entries(algorithms, lr: float, lr_for: dict[str, list[float]]):
    """(label, Algorithm, lr) per run: the chosen algorithms, in ALGORITHMS' order, each at
    its own learning rate(s) (``lr_for``) or the common one."""
    chosen = [(n, a) for n, a in ALGORITHMS if algorithms is None or n.split()[0] in algorithms]
    if algorithms is not None:
        unknown = set(algorithms) - {n.split()[0] for n, _ in ALGORITHMS}
        if unknown or not chosen:
            raise ValueError(f"unknown algorithms {sorted(unknown)}; known: "
                             f"{[n.split()[0] for n, _ in ALGORITHMS]}")
    entries = [(n, a, r) for n, a in chosen for r in lr_for.get(n.split()[0], [lr])]
    if len({r for _, _, r in entries}) > 1:  # label each run with its rate
        entries = [(f"{n} (lr {r:g})", a, r) for n, a, r in entries]
    return entries


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        recs = list(csv.DictReader(f))
    for r in recs:
        for k, v in r.items():
            if k == "algorithm":
                continue
            r[k] = int(v) if k in ("seed", "step", "seeds", "steps") else float(v)
    return recs


def run(task, entries, *, steps: int, seeds, out: Path, clip: float | None, progress):
    """One ``compare`` per learning rate (the same seeds, so the same initial weights and
    data for all); with several rates, their outputs are merged into ``out``."""
    kw = dict(seeds=seeds, steps=steps, hidden=32, init="orthogonal", optimizer="sgd",
              batch_size=8, track_every=50, eval_every=100, progress=progress, clip=clip)
    lrs = list(dict.fromkeys(r for _, _, r in entries))
    if len(lrs) == 1:  # the default: everything at one rate, compare writes out/ itself
        return compare(task, [(n, a) for n, a, _ in entries], lr=lrs[0], out_dir=out, **kw)
    from rnngrad.compare import _write

    rows, curves, aligns = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, lr in enumerate(lrs):
            group = [(n, a) for n, a, r in entries if r == lr]
            d = Path(tmp) / str(i)
            rows += compare(task, group, lr=lr, out_dir=d, **kw)
            curves += _read_csv(d / "curves.csv")
            aligns += _read_csv(d / "alignment.csv")
    order = {n: i for i, (n, _, _) in enumerate(entries)}
    rows.sort(key=lambda r: order[r["algorithm"]])
    _write(out, rows, curves, aligns, task)
    return rows


def main(steps: int = 3000, lr: float = 0.03, seeds=(0, 1, 2), out: Path = OUT,
         algorithms=None, lr_for: dict[str, list[float]] | None = None,
         clip: float | None = None) -> None:
    torch.set_num_threads(1)
    task = StreamAdd(seq_len=10, t1=5, t2=9, streaming=True)
    entries = _entries(algorithms, lr, lr_for or {})
    t0 = time.time()

    def progress(p):
        if p["step"] == p["steps"]:
            print(f"  {p['algorithm']:20s} seed {p['seed']}  test loss {p['test_loss']:.4f}"
                  f"  ({time.time() - t0:.0f} s)", file=sys.stderr)

    rows = run(task, entries, steps=steps, seeds=seeds, out=out, clip=clip, progress=progress)
    print(f"| algorithm | final test loss (mean +- std, {len(seeds)} seeds) | ms / time step "
          "| state KiB | cosine | sign agreement | norm ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['algorithm']} | {r['final_test_loss_mean']:.4f} +- "
              f"{r['final_test_loss_std']:.4f} | {r['ms_per_time_step']:.3f} | "
              f"{r['state_kib']:.1f} | {r['cosine_mean']:.3f} | "
              f"{r['sign_agreement_mean']:.3f} | {r['norm_ratio_mean']:.3f} |")
    print(f"reference levels: no memory {task.loss_no_memory:.3f}, t1 only "
          f"{task.loss_first_dependency:.3f}, optimal {task.loss_optimal:.3f}; "
          f"total {time.time() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000, help="SGD steps (10 time steps each)")
    ap.add_argument("--lr", type=float, default=0.03,
                    help="learning rate of every algorithm not named in --lr-for")
    ap.add_argument("--algorithms", nargs="+", metavar="NAME",
                    help="run only these (rtrl bptt kf_rtrl uoro snap1 eprop rflo); "
                         "default: all")
    ap.add_argument("--lr-for", action="append", metavar="NAME=LR[,LR...]",
                    help="learning rate(s) of one algorithm, e.g. uoro=0.003; several rates "
                         "run one after the other (a sweep); repeatable")
    ap.add_argument("--clip", type=float, default=None,
                    help="clip the gradient's norm (over all parameters) to this before "
                         "each SGD step (default: no clipping)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    main(args.steps, args.lr, seeds=tuple(range(args.seeds)), out=args.out,
         algorithms=args.algorithms, lr_for=_parse_lr_for(args.lr_for), clip=args.clip)
