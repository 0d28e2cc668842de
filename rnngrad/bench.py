"""Speed measurements as ratios against an anchor timed in the same run.

``bench_bptt`` times one forward plus backward (float32, same weights and data) of
``rnngrad.gradient(..., algorithm=bptt())`` against ``torch.nn.RNN`` + ``nn.Linear``
+ autograd (the anchor) and a ``torch.nn.RNNCell`` Python loop. The candidates are
timed round-robin, so that load from other processes falls on all of them alike;
each figure is the median over the repeats. Used by ``rnngrad bench`` and
``benchmarks/bptt.py``.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from .algorithms.bptt import bptt
from .gradient import gradient
from .model import RNN

__all__ = ["bench_bptt"]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make(H, T, B, D, K, device):
    torch.manual_seed(0)
    model = RNN(D, H, K, device=device)
    x = torch.randn(T, B, D, device=device)
    y = torch.randn(T, B, K, device=device)
    rnn = nn.RNN(D, H, nonlinearity="tanh", device=device)
    lin = nn.Linear(H, K, device=device)
    cell = nn.RNNCell(D, H, nonlinearity="tanh", device=device)
    with torch.no_grad():
        for m in (rnn,):
            m.weight_ih_l0.copy_(model.W_in)
            m.weight_hh_l0.copy_(model.W_rec)
            m.bias_ih_l0.copy_(model.b_rec)
            m.bias_hh_l0.zero_()
        cell.weight_ih.copy_(model.W_in)
        cell.weight_hh.copy_(model.W_rec)
        cell.bias_ih.copy_(model.b_rec)
        cell.bias_hh.zero_()
        lin.weight.copy_(model.W_out)
        lin.bias.copy_(model.b_out)
    return model, rnn, lin, cell, x, y


def run_rnngrad(model, x, y, algorithm):
    loss, grads = gradient(model, x, y, algorithm=algorithm)
    return loss.detach(), grads["W_rec"]


def run_nn_rnn(rnn, lin, x, y):
    rnn.zero_grad(set_to_none=True)
    lin.zero_grad(set_to_none=True)
    h, _ = rnn(x)
    loss = 0.5 * ((lin(h) - y) ** 2).sum() / x.shape[1]
    loss.backward()
    return loss.detach(), rnn.weight_hh_l0.grad


def run_cell_loop(cell, lin, x, y):
    cell.zero_grad(set_to_none=True)
    lin.zero_grad(set_to_none=True)
    h = torch.zeros(x.shape[1], cell.hidden_size, device=x.device)
    hs = []
    for t in range(x.shape[0]):
        h = cell(x[t], h)
        hs.append(h)
    loss = 0.5 * ((lin(torch.stack(hs)) - y) ** 2).sum() / x.shape[1]
    loss.backward()
    return loss.detach(), cell.weight_hh.grad



def bench_bptt(H: int, *, T: int = 200, B: int = 64, D: int = 32, K: int = 10,
               device: str | torch.device = "cpu", repeats: int = 10) -> list[dict]:
    """Median time of one forward + backward for each method; rows with the ratio to nn.RNN."""
    device = torch.device(device)
    model, rnn, lin, cell, x, y = make(H, T, B, D, K, device)
    algo = bptt()  # one algorithm object for all calls, as in a training loop
    cands = {
        "rnngrad bptt()": lambda: run_rnngrad(model, x, y, algo),
        "nn.RNN + autograd": lambda: run_nn_rnn(rnn, lin, x, y),
        "nn.RNNCell loop + autograd": lambda: run_cell_loop(cell, lin, x, y),
    }
    # all three compute the same loss and gradient (float32 round-off)
    ref_loss, ref_g = cands["nn.RNN + autograd"]()
    for name, f in cands.items():
        loss, g = f()
        err = float((g - ref_g).norm() / ref_g.norm())
        if err > 1e-3 or abs(float(loss - ref_loss)) > 1e-3 * abs(float(ref_loss)):
            raise RuntimeError(f"{name} disagrees with nn.RNN: relative error {err:.2e}")
    times: dict[str, list[float]] = {n: [] for n in cands}
    for f in cands.values():  # warm-up
        f()
    for _ in range(repeats):
        for name, f in cands.items():
            sync(device)
            t0 = time.perf_counter()
            f()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    anchor = statistics.median(times["nn.RNN + autograd"])
    return [{"device": str(device), "H": H, "T": T, "B": B, "D": D, "K": K, "method": name,
             "median_ms": round(statistics.median(ts) * 1e3, 2),
             "ratio_vs_nn_rnn": round(statistics.median(ts) / anchor, 3)}
            for name, ts in times.items()]
