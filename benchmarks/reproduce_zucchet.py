"""Zucchet et al. (2023)'s copy-task comparison (their Table 1), scaled to a 2-core CPU.

    python benchmarks/reproduce_zucchet.py                  # every run, then the plot
    python benchmarks/reproduce_zucchet.py --runs lru:bptt,gru:snap1 --seeds 0
    python benchmarks/reproduce_zucchet.py --plot-only      # table and plot from the CSV

Task: ``rnngrad.tasks.CopyPad`` ("zucchet_copy"): 10 words of 4 random bits (theirs: 20
words of 7 bits), a pad of 7 steps, a stop token, then the words back (T = 28); loss the
mean binary cross-entropy per bit over the answer (log 2 = 0.693 at chance), as in their
``copy-pad-classification``.

Models (their architecture, narrower and shallower):
- LRU: 2 layers, ``LRU(8, H, state_size=N, glu=True)`` then ``LRU(H, H, state_size=N,
  norm=True, glu=True, residual=True)`` (their prenorm layer: x + GLU(gelu(LRU(norm(x)))));
  the first layer's B and D take the raw input (their separate linear encoder folded in);
  the layer norm has no parameters; a sigmoid readout of the 7 bits.
- GRU: 2 layers of ``GRU`` (width ``--gru-hidden``), the same readout.

Algorithms: LRU with BPTT, exact RTRL of the whole stack (``rtrl()``, the same gradient as
BPTT, computed forward), spatial RTRL (``rtrl(layers="spatial")``, their "online" rule),
and 1-step truncation (``tbptt(1)``, their "1-step"); GRU with BPTT, SnAp-1 and UORO.
Training as theirs where it fits: Adam (learning rate 1e-2 for every run, where they took
each method's best of a sweep over 1e-3 .. 3.2e-2), batches of 16 (theirs 50), 1000
steps (theirs 25 epochs of 400), cosine decay of the learning rate to 1e-6, the
LRU's nu, theta, gamma_log at half the learning rate (their lr_factor 0.5), gradients
summed over the sequence and applied once per batch; fresh random batches each step
(their 20k fixed samples) and no dropout. Writes one CSV row per evaluation.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import rnngrad  # noqa: E402
from rnngrad.cells import GRU, LRU  # noqa: E402
from rnngrad.tasks import CopyPad  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ALGORITHMS = {
    "lru": {"bptt": rnngrad.bptt, "rtrl": rnngrad.rtrl,
            "spatial": lambda: rnngrad.rtrl(layers="spatial"),
            "1-step": lambda: rnngrad.tbptt(1)},
    "gru": {"bptt": rnngrad.bptt, "snap1": rnngrad.snap1, "uoro": rnngrad.uoro},
}
LABELS = {"bptt": "BPTT", "rtrl": "exact RTRL (stack)", "spatial": "spatial RTRL (online)",
          "1-step": "1-step truncation", "snap1": "SnAp-1", "uoro": "UORO"}


def build(model: str, args, task) -> rnngrad.Network:
    D, K = task.input_size, task.output_size
    if model == "lru":
        H, N = args.hidden, args.state
        cells = [LRU(D, H, state_size=N, glu=True),
                 LRU(H, H, state_size=N, norm=True, glu=True, residual=True)]
    else:
        H = args.gru_hidden
        cells = [GRU(D, H), GRU(H, H)]
    return rnngrad.Network(cells, K, readout="sigmoid")


def evaluate(net, batch) -> tuple[float, float]:
    """Mean BCE per answered bit and the fraction of answered bits right."""
    with torch.no_grad():
        y, _ = net(batch.inputs)
        on = batch.mask > 0
        p, t = y[on].clamp(1e-7, 1 - 1e-7), batch.targets[on]
        bce = -(t * p.log() + (1 - t) * (1 - p).log()).mean()
        acc = ((p > 0.5).float() == t).float().mean()
    return float(bce), float(acc)


def train_one(model: str, algo_name: str, seed: int, args, task, writer) -> None:
    torch.manual_seed(seed)
    net = build(model, args, task)
    algo = ALGORITHMS[model][algo_name]()
    slow = {"nu", "theta", "gamma_log"}
    groups = [{"params": [p for n, p in net.named_parameters() if n.split(".")[-1] not in slow]},
              {"params": [p for n, p in net.named_parameters() if n.split(".")[-1] in slow],
               "lr": args.lr * 0.5}]
    opt = torch.optim.Adam([g for g in groups if g["params"]], lr=args.lr)
    base = [g["lr"] for g in opt.param_groups]
    gen = torch.Generator().manual_seed(1000 + seed)
    test = task.test_batch()
    t0 = time.perf_counter()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            test_loss, test_acc = evaluate(net, test)
            writer.writerow({"model": model, "algorithm": algo_name, "seed": seed,
                             "step": step, "test_loss": f"{test_loss:.5f}",
                             "test_bit_acc": f"{test_acc:.4f}",
                             "seconds": f"{time.perf_counter() - t0:.1f}"})
            args.csv_file.flush()
            print(f"{model} {algo_name} seed {seed} step {step}: test {test_loss:.4f} "
                  f"acc {test_acc:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        if step == args.steps:
            break
        frac = 0.5 * (1 + math.cos(math.pi * step / args.steps))  # cosine decay to 1e-6
        for g, b in zip(opt.param_groups, base):
            g["lr"] = 1e-6 + (b - 1e-6) * frac
        batch = task.batch(args.batch, generator=gen)
        opt.zero_grad(set_to_none=True)
        rnngrad.gradient(net, batch.inputs, batch.targets, algorithm=algo, loss="bce",
                         mask=batch.mask, set_grad=True)
        opt.step()


FIELDS = ["model", "algorithm", "seed", "step", "test_loss", "test_bit_acc", "seconds"]


def summarise(path: str, plot: str | None) -> list[dict]:
    """Final test loss and bit accuracy, mean and std over seeds; the plot of the curves."""
    rows = list(csv.DictReader(open(path)))
    runs: dict = {}
    for r in rows:
        runs.setdefault((r["model"], r["algorithm"]), {}).setdefault(int(r["seed"]), []).append(r)
    table = []
    for (model, algo), seeds in runs.items():
        finals = [max(rs, key=lambda r: int(r["step"])) for rs in seeds.values()]
        loss = torch.tensor([float(r["test_loss"]) for r in finals])
        acc = torch.tensor([float(r["test_bit_acc"]) for r in finals])
        secs = torch.tensor([float(r["seconds"]) for r in finals])
        table.append({"model": model, "algorithm": algo, "seeds": len(finals),
                      "steps": int(finals[0]["step"]),
                      "test_loss": float(loss.mean()), "test_loss_std": float(loss.std())
                      if len(finals) > 1 else 0.0,
                      "bit_acc": float(acc.mean()), "bit_acc_std": float(acc.std())
                      if len(finals) > 1 else 0.0, "seconds": float(secs.mean())})
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
        for ax, model in zip(axes, ("lru", "gru")):
            for (m, algo), seeds in runs.items():
                if m != model:
                    continue
                steps = sorted({int(r["step"]) for rs in seeds.values() for r in rs})
                curves = torch.tensor([[float(r["test_loss"]) for r in sorted(
                    rs, key=lambda r: int(r["step"]))] for rs in seeds.values()
                    if len(rs) == len(steps)])
                mean, std = curves.mean(0), curves.std(0) if len(curves) > 1 else 0 * curves[0]
                ax.plot(steps, mean, label=f"{LABELS[algo]} ({len(curves)} seeds)")
                ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
            ax.axhline(math.log(2), color="gray", ls=":", lw=1, label="chance (log 2)")
            ax.set_title(f"{model.upper()}, 2 layers")
            ax.set_xlabel("training step")
            ax.legend(fontsize=8)
        axes[0].set_ylabel("test loss (BCE per bit)")
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default="lru:bptt,lru:rtrl,lru:spatial,lru:1-step,"
                                      "gru:bptt,gru:snap1,gru:uoro")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--hidden", type=int, default=16, help="LRU model width H")
    ap.add_argument("--state", type=int, default=16, help="LRU complex units N per layer")
    ap.add_argument("--gru-hidden", type=int, default=32)
    ap.add_argument("--length", type=int, default=10, help="pattern length (words)")
    ap.add_argument("--pad", type=int, default=7)
    ap.add_argument("--bits", type=int, default=4, help="bits per word (theirs: 7)")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--csv", default=os.path.join(HERE, "zucchet_copy.csv"))
    ap.add_argument("--plot", default=os.path.join(HERE, "..", "docs", "online_lru",
                                                   "zucchet_copy.png"))
    ap.add_argument("--append", action="store_true", help="add rows to an existing CSV")
    ap.add_argument("--plot-only", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not args.plot_only:
        task = CopyPad(args.length, args.pad, args.bits, test_size=1000)
        mode = "a" if args.append and os.path.exists(args.csv) else "w"
        with open(args.csv, mode, newline="") as f:
            args.csv_file = f
            writer = csv.DictWriter(f, FIELDS)
            if mode == "w":
                writer.writeheader()
            for spec in args.runs.split(","):
                model, algo = spec.split(":")
                for seed in args.seeds:
                    train_one(model, algo, seed, args, task, writer)
    os.makedirs(os.path.dirname(args.plot), exist_ok=True)
    for row in summarise(args.csv, args.plot):
        print(f"{row['model']:4s} {LABELS[row['algorithm']]:24s} seeds {row['seeds']} steps "
              f"{row['steps']}: test loss {row['test_loss']:.4f} +- {row['test_loss_std']:.4f}"
              f", bit acc {row['bit_acc']:.3f} +- {row['bit_acc_std']:.3f}, "
              f"{row['seconds']:.0f} s")


if __name__ == "__main__":
    main()
