"""One engine: the Network path on an Elman layer against the hand-written rnngrad.RNN paths.

Before rnngrad.RNN became a Network of one Elman cell, every exact algorithm had two
implementations: a hand-written Elman path taken on ``rnngrad.RNN`` and the generic
``Network`` path. This script times, in one process, on one thread, in CPU time
(``time.thread_time``), round-robin over the candidates and the median over repeats:

    base RNN       rnngrad.RNN of a baseline commit (its hand-written paths): the anchor
    base Network   Network(Elman) of the same baseline commit
    Network        Network(Elman) of the working tree
    RNN            rnngrad.RNN of the working tree

on the same weights and data, one algorithm object per candidate for every call (as in
a training loop), for bptt (whole sequence, and online init/step/flush),
bptt(checkpoint=14), tbptt(20), bptt with a mask, h0 and a reward, bptt(sensitivities=True)
at H = 64, 256, T = 200, B = 64, D = 32, K = 10, and rtrl (also with h0) at H = 32,
T = 50, B = 8. Ratio: time / base RNN's time in the same run. The baseline package is
taken from git (``git archive BASE rnngrad``) into a temporary folder, imported as
``rnngrad_base``.

    python benchmarks/one_engine.py [--base 4dc90ae] [--repeats 7] [--out benchmarks/one_engine]
"""

from __future__ import annotations

import argparse
import csv
import importlib
import io
import os
import platform
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load_base(commit: str):
    """The rnngrad package of ``commit``, imported as ``rnngrad_base``."""
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "rnngrad"],
                         check=True, capture_output=True).stdout
    tmp = Path(tempfile.mkdtemp(prefix="one_engine_"))
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        tf.extractall(tmp, filter="data")
    (tmp / "rnngrad").rename(tmp / "rnngrad_base")
    sys.path.insert(0, str(tmp))
    return importlib.import_module("rnngrad_base")


def models(lib, D, H, K):
    """RNN and Network(Elman) of ``lib`` with the same weights (seeded RNN, copied)."""
    torch.manual_seed(0)
    rnn = lib.RNN(D, H, K)
    net = lib.Network(lib.cells.Elman(D, H), K)
    with torch.no_grad():
        for n in ("W_in", "W_rec", "b_rec"):
            getattr(net.cells[0], n).copy_(getattr(rnn, n))
        net.W_out.copy_(rnn.W_out)
        net.b_out.copy_(rnn.b_out)
    return rnn, net


def online(lib, model, algo, x, y):
    """init/step/flush over the sequence, the emitted gradients summed."""
    state = algo.init(model, x.shape[1])
    total = {}
    for t in range(x.shape[0]):
        state, _, g = algo.step(model, state, x[t], y[t])
        for k, v in (g or {}).items():
            total[k] = total.get(k, 0) + v
    state, g = algo.flush(model, state)
    for k, v in (g or {}).items():
        total[k] = total.get(k, 0) + v
    return total


def cases(H, T, B, D, K):
    """name -> (factory of the algorithm from a library, function of (lib, model, algo))."""
    x = torch.randn(T, B, D, generator=torch.Generator().manual_seed(1))
    y = torch.randn(T, B, K, generator=torch.Generator().manual_seed(2))
    mask = (torch.rand(T, B, generator=torch.Generator().manual_seed(3)) > 0.3).float()
    h0 = 0.1 * torch.randn(B, H, generator=torch.Generator().manual_seed(4))

    def reward(h):
        return -0.01 * (h ** 2).sum() / h.shape[1]

    def grad(**kw):
        return lambda L, m, a: L.gradient(m, x, y, algorithm=a, **kw)[1]

    return {
        "bptt": (lambda L: L.bptt(), grad()),
        "bptt online": (lambda L: L.bptt(), lambda L, m, a: online(L, m, a, x, y)),
        "bptt(checkpoint=14)": (lambda L: L.bptt(checkpoint=14), grad()),
        "tbptt(20)": (lambda L: L.tbptt(20), grad()),
        "bptt mask+h0+reward": (lambda L: L.bptt(), grad(mask=mask, h0=h0, reward=reward)),
        "bptt(sensitivities=True)": (lambda L: L.bptt(sensitivities=True), grad()),
    }


def rtrl_cases(T, B, D, H):
    x = torch.randn(T, B, D, generator=torch.Generator().manual_seed(1))
    y = torch.randn(T, B, 10, generator=torch.Generator().manual_seed(2))
    h0 = 0.1 * torch.randn(B, H, generator=torch.Generator().manual_seed(4))
    return {
        "rtrl": (lambda L: L.rtrl(), lambda L, m, a: L.gradient(m, x, y, algorithm=a)[1]),
        "rtrl h0": (lambda L: L.rtrl(),
                    lambda L, m, a: L.gradient(m, x, y, algorithm=a, h0=h0)[1]),
    }


def time_round_robin(cands: dict, repeats: int) -> dict:
    """Median CPU time of each candidate; every repeat runs them all, in a shuffled order
    (so that no candidate always follows the same one)."""
    times = {n: [] for n in cands}
    for f in cands.values():
        f()  # warm-up
    order = list(cands)
    rng = random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)
        for n in order:
            t0 = time.thread_time()
            cands[n]()
            times[n].append(time.thread_time() - t0)
    return {n: statistics.median(ts) for n, ts in times.items()}


def same(g, ref, name):
    for k in ("W_in", "W_rec", "b_rec", "W_out", "b_out"):
        kk = k if k in g else f"cells.0.{k}" if k not in ("W_out", "b_out") else k
        kr = k if k in ref else f"cells.0.{k}" if k not in ("W_out", "b_out") else k
        err = float((g[kk] - ref[kr]).norm() / ref[kr].norm())
        if err > 1e-4:
            raise RuntimeError(f"{name}: {k} differs from the baseline RNN by {err:.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--base", default="4dc90ae", help="baseline commit (the hand-written paths)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--hidden", default="64,256")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "one_engine"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    import rnngrad

    base = load_base(args.base)
    load0 = os.getloadavg()[0]
    rows = []
    T, B, D, K = 200, 64, 32, 10
    jobs = [(H, T, B) for H in map(int, args.hidden.split(","))] + [(32, 50, 8)]
    for H, T_, B_ in jobs:
        libs = {"base": base, "new": rnngrad}
        ms = {k: models(L, D, H, K) for k, L in libs.items()}
        table = rtrl_cases(T_, B_, D, H) if H == 32 else cases(H, T_, B_, D, K)
        for case, (make, f) in table.items():
            cands = {}
            for lab, key, which in (("base RNN", "base", 0), ("base Network", "base", 1),
                                    ("Network", "new", 1), ("RNN", "new", 0)):
                L, m = libs[key], ms[key][which]
                a = make(L)  # one algorithm object for every call, as in a training loop
                try:
                    f(L, m, a)
                except (ValueError, TypeError) as e:
                    rows.append({"case": case, "H": H, "T": T_, "B": B_, "model": lab,
                                 "ms": "", "ratio": "", "note": str(e).split(":")[0][:60]})
                    continue
                cands[lab] = (lambda L=L, m=m, f=f, a=a: f(L, m, a))
            ref = cands["base RNN"]()
            for lab, f in cands.items():
                same(f(), ref, f"{case} {lab}")
            med = time_round_robin(cands, args.repeats)
            anchor = med["base RNN"]
            for lab, s in med.items():
                rows.append({"case": case, "H": H, "T": T_, "B": B_, "model": lab,
                             "ms": round(s * 1e3, 2), "ratio": round(s / anchor, 3), "note": ""})
            print(case, H, {k: round(v / anchor, 3) for k, v in med.items()}, flush=True)
    load1 = os.getloadavg()[0]
    out = Path(args.out)
    head = (f"Network(Elman) against rnngrad.RNN's hand-written paths (baseline {args.base}), "
            f"float32, D={D} K={K}, CPU {platform.machine()} {platform.processor() or ''}, "
            f"one thread, CPU time (time.thread_time), median of {args.repeats} repeats "
            f"(each runs every candidate, in a shuffled order), torch {torch.__version__}. Ratio: time / base RNN's time in the same "
            f"run. Load average (1 min, {os.cpu_count()} CPUs): {load0:.2f} at the start, "
            f"{load1:.2f} at the end.")
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(out.with_suffix(".md"), "w") as f:
        f.write(head + "\n\n| case | H | T | B | model | ms | ratio vs base RNN | note |\n")
        f.write("|---|---:|---:|---:|---|---:|---:|---|\n")
        for r in rows:
            f.write(f"| {r['case']} | {r['H']} | {r['T']} | {r['B']} | {r['model']} | {r['ms']} | "
                    f"{r['ratio']} | {r['note']} |\n")
    print(f"wrote {out.with_suffix('.md')} and .csv")


if __name__ == "__main__":
    main()
