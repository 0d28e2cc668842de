"""Bellec et al. (2020), Nat. Commun. 11:3625, Fig. 3: evidence accumulation with an LSNN
(LIF and ALIF neurons) trained by e-prop, symmetric and random feedback, and by BPTT.

Their setting (``Figure_3_and_S7_e_prop_tutorials/tutorial_evidence_accumulation_with_alif.py``
in IGITUGraz/eligibility_propagation): 50 LIF + 50 ALIF neurons (tau_m = 20 ms, tau_a =
2000 ms, v_th = 0.6, beta = 1.7 (1 - rho) / (1 - alpha) on the ALIF ones, refractory 5 ms,
pseudo-derivative dampening 0.3, no self-connections), a leaky readout tau_out = 20 ms
(kappa = exp(-1/20)), 40 Poisson inputs, 7 cues of 100 ms every 150 ms, 1200 ms more
(recall: the last 150 ms), T = 2250 ms at dt = 1 ms; cross-entropy over the recall
window, firing-rate regularisation towards 10 Hz (coefficient 1, their "simple" form),
Adam with learning rate 0.005, batches of 64, up to 2000 iterations (early stop below 7%
error).

What this run keeps: the neurons (but their refractory period, ``--t-ref`` 0: the
refractory counter is one more state component, a third more e-prop trace), the readout,
the inputs and their rates, the 7 cues, the loss, the regulariser, Adam at 0.005. What
it shortens to fit a shared 2-core CPU:
the trial, T = 500 ms (7 cues of 30 ms every 50 ms, then 150 ms with the recall in the
last 50 ms; their 2250 ms), ``--batch`` 16 and ``--iterations`` 150 (theirs 64 and up to
2000; their README suggests 16 or 8 for hardcoded e-prop when memory is short), one torch
thread. Everything is rnngrad: ``rnngrad.gradient`` with ``rnngrad.eprop()``,
``rnngrad.eprop("random")`` (the generic trace engine on ``rnngrad.cells.ALIF``) and
``rnngrad.bptt()`` (the cell's hand-derived BPTT through the surrogate), and a
``torch.optim.Adam`` step; the regulariser is a reward R(h) of the spike trains.

    python benchmarks/reproduce_bellec.py                  # the table of docs/spiking.md
    python benchmarks/reproduce_bellec.py --algorithms bptt --seeds 1 --iterations 20
    python benchmarks/reproduce_bellec.py --algorithms eprop_random --csv a.csv   # in parallel,
    python benchmarks/reproduce_bellec.py --report a.csv b.csv c.csv              # then merged

Writes ``benchmarks/bellec_evidence.csv`` (one row per algorithm, seed and evaluation)
and ``docs/spiking/accuracy.png``; prints the table as Markdown.
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path

import torch

import rnngrad
from rnngrad.cells import ALIF
from rnngrad.cells.lif import bellec_beta
from rnngrad.tasks import EvidenceAccumulation

ROOT = Path(__file__).resolve().parent.parent
CSV = ROOT / "benchmarks" / "bellec_evidence.csv"
PLOT = ROOT / "docs" / "spiking" / "accuracy.png"

ALGORITHMS = {
    "bptt": lambda seed: rnngrad.bptt(),
    "eprop_symmetric": lambda seed: rnngrad.eprop("symmetric"),
    "eprop_random": lambda seed: rnngrad.eprop("random", seed=seed),
}
FIELDS = ("algorithm", "seed", "iteration", "test_accuracy", "test_loss", "train_loss",
          "rate_hz", "seconds")


def make_task(short: bool) -> EvidenceAccumulation:
    if short:
        return EvidenceAccumulation(7, t_cue=30.0, t_interval=50.0, t_wait=150.0,
                                    t_recall=50.0)
    return EvidenceAccumulation(7)  # Bellec's: T = 2250 ms


def make_network(n_regular: int, n_adaptive: int, seed: int, t_ref: float = 0.0
                 ) -> rnngrad.Network:
    torch.manual_seed(seed)
    beta = [0.0] * n_regular + [bellec_beta(20.0, 2000.0)] * n_adaptive
    cell = ALIF(40, n_regular + n_adaptive, tau_m=20.0, tau_a=2000.0, v_th=0.6, beta=beta,
                t_ref=t_ref, surrogate="triangle", gamma=0.3)
    return rnngrad.Network(cell, 2, readout="softmax", readout_decay=math.exp(-1.0 / 20.0))


def rate_regulariser(f0_hz: float = 10.0, coefficient: float = 1.0, dt: float = 1.0):
    """Bellec's "simple" firing-rate regulariser as a reward (rnngrad minimises L - R):
    ``R(z) = -c sum_j (mean_{t,b} z_j / dt - f0)^2`` with rates per ms."""
    f0 = f0_hz / 1000.0

    def reward(h):
        rate = h.mean((0, 1)) / dt
        return -coefficient * ((rate - f0) ** 2).sum()

    return reward


@torch.no_grad()
def evaluate(net, task, batch):
    cell = net.cells[0]  # the cell's own whole-sequence forward (no graph): fast
    h, _, _ = cell.forward_sequence(cell.params(), batch.inputs,
                                    cell.init_state(batch.mask.shape[1]))
    z = net.readout_z(h)
    T, B = batch.mask.shape
    logp = torch.log_softmax(z, -1).gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1)
    loss = -(batch.mask * logp).sum() / B
    return task.accuracy(z, batch), float(loss), float(h.mean()) * 1000.0


def train(name, seed, *, task, iterations, batch_size, eval_every, lr, n_regular, n_adaptive,
          t_ref=0.0, progress=None):
    net = make_network(n_regular, n_adaptive, seed, t_ref)
    algo = ALGORITHMS[name](seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    reward = rate_regulariser()
    test = task.test_batch()
    rows, t0, train_loss = [], time.time(), float("nan")
    for it in range(iterations + 1):
        if it % eval_every == 0 or it == iterations:
            acc, loss, rate = evaluate(net, task, test)
            rows.append({"algorithm": name, "seed": seed, "iteration": it,
                         "test_accuracy": acc, "test_loss": loss, "train_loss": train_loss,
                         "rate_hz": rate, "seconds": time.time() - t0})
            if progress:
                progress(rows[-1])
        if it == iterations:
            break
        b = task.batch(batch_size, generator=1_000_003 * (seed + 1) + it)
        opt.zero_grad()
        value, _ = rnngrad.gradient(net, b.inputs, b.targets, algorithm=algo,
                                    loss="cross_entropy", mask=b.mask, reward=reward,
                                    set_grad=True)
        opt.step()
        train_loss = float(value)
    return rows


def runs_of(rows, name: str) -> dict[int, list]:
    """One algorithm's rows, grouped by seed."""
    runs: dict[int, list] = {}
    for r in rows:
        if r["algorithm"] == name:
            runs.setdefault(int(r["seed"]), []).append(r)
    return runs


def table(rows) -> str:
    """Final test accuracy (mean, std over seeds), the best iteration's, the first iteration
    at >= 90%, and seconds per iteration, per algorithm."""
    out = ["| algorithm | final test accuracy | best test accuracy | first eval >= 90% | "
           "firing rate (Hz) | s / iteration |",
           "|---|---|---|---|---|---|"]
    for name in ALGORITHMS:
        runs = runs_of(rows, name)
        if not runs:
            continue
        finals, bests, firsts, rates, speeds = [], [], [], [], []
        for rs in runs.values():
            rs.sort(key=lambda r: int(r["iteration"]))
            accs = [float(r["test_accuracy"]) for r in rs]
            finals.append(accs[-1])
            bests.append(max(accs))
            hit = [int(r["iteration"]) for r in rs if float(r["test_accuracy"]) >= 0.9]
            firsts.append(str(hit[0]) if hit else "-")
            rates.append(float(rs[-1]["rate_hz"]))
            speeds.append(float(rs[-1]["seconds"]) / max(int(rs[-1]["iteration"]), 1))
        f = torch.tensor(finals)
        bst = torch.tensor(bests)
        std = float(f.std()) if len(finals) > 1 else 0.0
        bstd = float(bst.std()) if len(bests) > 1 else 0.0
        out.append(f"| {name} | {float(f.mean()):.3f} ± {std:.3f} | "
                   f"{float(bst.mean()):.3f} ± {bstd:.3f} | {', '.join(firsts)} | "
                   f"{sum(rates) / len(rates):.1f} | {sum(speeds) / len(speeds):.2f} |")
    return "\n".join(out)


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    styles = {"bptt": ("k", "-"), "eprop_symmetric": ("tab:blue", "--"),
              "eprop_random": ("tab:orange", ":")}
    for name, (color, ls) in styles.items():
        runs = runs_of(rows, name)
        if not runs:
            continue
        its = sorted({int(r["iteration"]) for rs in runs.values() for r in rs})
        for ax, key in zip(axes, ("test_accuracy", "test_loss")):
            vals = torch.tensor([[next(float(r[key]) for r in rs if int(r["iteration"]) == i)
                                  for i in its] for rs in runs.values()])
            m, s = vals.mean(0), (vals.std(0) if len(runs) > 1 else torch.zeros(len(its)))
            ax.plot(its, m, color=color, ls=ls, label=f"{name} ({len(runs)} seeds)")
            ax.fill_between(its, m - s, m + s, color=color, alpha=0.15)
    axes[0].axhline(0.5, color="grey", lw=0.8)
    axes[0].set(xlabel="iteration", ylabel="test accuracy", ylim=(0.4, 1.0),
                title="evidence accumulation, T = 500 ms")
    axes[1].set(xlabel="iteration", ylabel="test cross-entropy (recall window)")
    axes[0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1")
    ap.add_argument("--seed", type=int, nargs="+", help="these seeds instead (one process each)")
    ap.add_argument("--iterations", type=int, default=150)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.005)
    ap.add_argument("--neurons", type=int, nargs=2, default=(50, 50), metavar=("LIF", "ALIF"))
    ap.add_argument("--t-ref", type=float, default=0.0,
                    help="refractory period (ms); Bellec's 5 makes e-prop's traces 1.5x larger")
    ap.add_argument("--full", action="store_true", help="Bellec's T = 2250 ms trial")
    ap.add_argument("--csv", type=Path, default=CSV)
    ap.add_argument("--plot", type=Path, default=PLOT)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared, oversubscribed CPU more threads stall)")
    ap.add_argument("--report", type=Path, nargs="+", metavar="CSV",
                    help="train nothing: merge these CSVs into --csv, plot and print the table")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    task = make_task(not args.full)
    rows = []
    if args.report:
        for path in args.report:
            with open(path) as f:
                rows += list(csv.DictReader(f))
        args.algorithms = []
        _write(args.csv, rows)
    seeds = args.seed if args.seed else list(range(args.seeds))
    for name in args.algorithms:
        for seed in seeds:
            rows = [r for r in rows if not (r["algorithm"] == name and int(r["seed"]) == seed)]

            def progress(r, name=name, seed=seed):
                print(f"{name} seed {seed} it {r['iteration']:4d}: test acc "
                      f"{r['test_accuracy']:.3f} loss {r['test_loss']:.3f} rate "
                      f"{r['rate_hz']:.1f} Hz ({r['seconds']:.0f} s)", flush=True)

            rows += train(name, seed, task=task, iterations=args.iterations,
                          batch_size=args.batch, eval_every=args.eval_every, lr=args.lr,
                          n_regular=args.neurons[0], n_adaptive=args.neurons[1],
                          t_ref=args.t_ref, progress=progress)
            _write(args.csv, rows)
    plot(rows, args.plot)
    print(f"T = {task.seq_len} ms (Bellec et al.: 2250 ms), batch {args.batch}, "
          f"{args.iterations} iterations, seeds {sorted({int(r['seed']) for r in rows})}")
    print(table(rows))
    return 0


def _write(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    raise SystemExit(main())
