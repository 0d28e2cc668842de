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

The table is printed as Markdown for docs/online_comparison.md.
"""

from __future__ import annotations

import sys
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


def main(steps: int = 3000, lr: float = 0.03, seeds=(0, 1, 2), out: Path = OUT) -> None:
    torch.set_num_threads(1)
    task = StreamAdd(seq_len=10, t1=5, t2=9, streaming=True)
    t0 = time.time()

    def progress(p):
        if p["step"] == p["steps"]:
            print(f"  {p['algorithm']:20s} seed {p['seed']}  test loss {p['test_loss']:.4f}"
                  f"  ({time.time() - t0:.0f} s)", file=sys.stderr)

    rows = compare(task, ALGORITHMS, seeds=seeds, steps=steps, hidden=32, init="orthogonal",
                   optimizer="sgd", lr=lr, batch_size=8, track_every=50, eval_every=100,
                   out_dir=out, progress=progress)
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
    ap.add_argument("--lr", type=float, default=0.03)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    main(args.steps, args.lr, out=args.out)
