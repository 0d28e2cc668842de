"""Recurrent backprop against autograd through K unrolled iterations: time and peak memory.

Run: ``python benchmarks/steady.py`` (options: ``--threads``, ``--repeats``,
``--quick``, ``--skip-digits``). Writes ``benchmarks/steady_results.csv``,
``benchmarks/steady_memory.png`` and ``benchmarks/steady_digits.png``.

Both sides start from x = 0 and run K iterations of ``x <- tanh(W x + b)``
(B = 32 networks, float32, ``||W||_2 ~ 0.8``), then differentiate
``R = sum(g * x_K)`` with respect to W and b:

- ``autograd``: the anchor. The K iterations are recorded and ``torch.autograd``
  backpropagates through them (BPTT through the relaxation).
- ``rnngrad-<method>``: ``fixed_point(tol=0, max_iter=K, throw=False)`` without a
  graph, then ``recurrent_backprop(method=...)`` at the final state.
- ``torchdeq (ift)``: torchdeq's DEQ with its implicit backward, if
  ``import torchdeq`` works (the optional extra ``pip install rnngrad[deq]``;
  skipped otherwise). ``get_deq(core="sliced", ift=True, f_solver=b_solver=
  "fixed_point_iter")``: the forward runs the same K plain iterations from x = 0
  (``f_tol=0``, ``f_max_iter=K``), the backward solves ``g = J^T g + dR/dz``
  by fixed-point iteration (the Neumann series, as ``rnngrad-iterate`` does) to
  the same relative tolerance as rnngrad's default (``b_stop_mode="rel"``,
  ``b_tol = 100 eps = 1.2e-5`` in float32, ``b_max_iter=1000``). torchdeq
  returns ``f(x_K)`` (one extra evaluation, with a graph) and differentiates
  through it, so its gradient is taken at the same state x_K.

How memory is measured (CPU has no ``max_memory_allocated``): the PyTorch memory
profiler (``torch.profiler.profile(profile_memory=True, record_shapes=True,
with_stack=True)`` and its ``export_memory_timeline(device="cpu")``) records
every allocation and free of the gradient call; ``peak_bytes`` is the maximum of
the live total over that timeline, counting only what the call allocates (W, b,
g exist before it). ``saved_bytes`` is the state kept between forward and
backward: for autograd the distinct storages packed by
``torch.autograd.graph.saved_tensors_hooks``; for rnngrad the x, W, b that
``steady_state`` saves. Time is the median wall time of ``--repeats`` runs of
forward + backward. Ratios are against the autograd anchor of the same (N, K),
measured in the same run. ``grad_rel_diff`` is ``max|dW - dW_autograd| /
max|dW_autograd|``: recurrent backprop differentiates the steady state, so it
matches the unrolled gradient once x_K has converged (K = 10 has not).
``grad_rel_diff_vs_direct`` is ``max|dW - dW_direct| / max|dW_direct|`` against
``rnngrad-direct`` (the LU solve of the adjoint at the same x_K): it compares
the implicit gradients with each other, converged or not. For torchdeq,
``saved_bytes`` is measured with ``saved_tensors_hooks`` around its forward
(what its graph and ``IFTGrad`` keep), plus W, which its backward reaches
through the closure f rather than through a saved tensor.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rnngrad.steady import (  # noqa: E402
    SteadyClassifier,
    fixed_point,
    recurrent_backprop,
    train_steady,
)

HERE = Path(__file__).resolve().parent
CSV = HERE / "steady_results.csv"
B = 32
DTYPE = torch.float32
TORCHDEQ = "torchdeq (ift)"


def problem(N: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(N, N, generator=gen, dtype=torch.float64) * (0.4 / math.sqrt(N))
    b = torch.randn(B, N, generator=gen, dtype=torch.float64)
    g = torch.randn(B, N, generator=gen, dtype=torch.float64)
    return W.to(DTYPE), b.to(DTYPE), g.to(DTYPE)


def grad_autograd(W, b, g, K):
    W = W.detach().requires_grad_()
    b = b.detach().requires_grad_()
    x = torch.zeros_like(b)
    for _ in range(K):
        x = torch.tanh(torch.addmm(b, x, W.T))
    dW, db = torch.autograd.grad((g * x).sum(), (W, b))
    return dW, db, K


def make_grad_rnngrad(method):
    def grad(W, b, g, K):
        x, info = fixed_point(W, b, tol=0.0, max_iter=K, throw=False)
        dW, db, _ = recurrent_backprop(W, b, x, g, method=method)
        return dW, db, info.iterations

    return grad


def torchdeq_version():
    try:
        from importlib.metadata import version

        return version("torchdeq")
    except Exception:
        return None


def make_torchdeq_forward():
    """``forward(W, b, K) -> z`` through torchdeq's DEQ with its implicit backward, or None."""
    try:
        from torchdeq import get_deq
    except ImportError:
        return None
    b_tol = max(1e-12, 100.0 * torch.finfo(DTYPE).eps)  # rnngrad's default adjoint tolerance

    def forward(W, b, K):
        deq = get_deq(
            core="sliced",
            ift=True,
            f_solver="fixed_point_iter",
            f_max_iter=K,
            f_tol=0.0,  # exactly K iterations, like the other methods
            b_solver="fixed_point_iter",
            b_max_iter=1000,
            b_tol=b_tol,
            b_stop_mode="rel",
        )
        z_out, _ = deq(lambda x: torch.tanh(torch.addmm(b, x, W.T)), torch.zeros_like(b))
        return z_out[-1]

    return forward


def make_grad_torchdeq():
    forward = make_torchdeq_forward()
    if forward is None:
        return None

    def grad(W, b, g, K):
        W = W.detach().requires_grad_()
        b = b.detach().requires_grad_()
        z = forward(W, b, K)
        dW, db = torch.autograd.grad((g * z).sum(), (W, b))
        return dW, db, K

    return grad


def saved_bytes_torchdeq(W, b, K):
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    forward = make_torchdeq_forward()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward(W.detach().requires_grad_(), b.detach().requires_grad_(), K)
    # The backward re-evaluates f through the closure, which keeps W alive without
    # saving it: count W too, as rnngrad's (W, b, x) does.
    storages[W.untyped_storage().data_ptr()] = W.untyped_storage().nbytes()
    return sum(storages.values())


def time_it(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_bytes(fn):
    """Peak of the bytes allocated by fn, from the PyTorch memory profiler's timeline."""
    from torch.profiler import ProfilerActivity, profile

    with profile(
        activities=[ProfilerActivity.CPU],
        profile_memory=True,
        record_shapes=True,
        with_stack=True,
    ) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "timeline.json")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            prof.export_memory_timeline(path, device="cpu")
        with open(path) as f:
            _, sizes = json.load(f)
    return max((sum(row) for row in sizes), default=0)


def saved_bytes_autograd(W, b, K):
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        Wr = W.detach().requires_grad_()
        br = b.detach().requires_grad_()
        x = torch.zeros_like(br)
        for _ in range(K):
            x = torch.tanh(torch.addmm(br, x, Wr.T))
    return sum(storages.values())


def run_gradients(Ns, Ks, repeats):
    methods = {"autograd": grad_autograd}
    for m in ("direct", "iterate", "gmres"):
        methods[f"rnngrad-{m}"] = make_grad_rnngrad(m)
    deq = make_grad_torchdeq()
    if deq is not None:
        methods[TORCHDEQ] = deq
    else:
        print("torchdeq is not installed: its rows are skipped", file=sys.stderr)
    rows = []
    for N in Ns:
        W, b, g = problem(N)
        for K in Ks:
            anchor = None
            direct = methods["rnngrad-direct"](W, b, g, K)[0]  # reference for the implicit grads
            for name, grad in methods.items():
                call = functools.partial(grad, W, b, g, K)
                try:
                    dW, _, iters = call()
                    seconds = time_it(call, repeats)
                    peak = peak_bytes(call)
                except Exception as err:
                    if name != TORCHDEQ:
                        raise
                    # a third-party baseline may not take these options: say so, go on
                    print(f"{name} N={N} K={K} failed: {err!r}", file=sys.stderr)
                    continue
                if name == "autograd":
                    saved = saved_bytes_autograd(W, b, K)
                    anchor = {"seconds": seconds, "peak": peak, "dW": dW}
                elif name == TORCHDEQ:
                    saved = saved_bytes_torchdeq(W, b, K)
                else:
                    saved = sum(t.numel() * t.element_size() for t in (W, b, b))  # W, b, x
                diff = float((dW - anchor["dW"]).abs().max() / anchor["dW"].abs().max())
                diff_direct = float((dW - direct).abs().max() / direct.abs().max())
                rows.append(
                    {
                        "method": name,
                        "N": N,
                        "K": K,
                        "B": B,
                        "dtype": str(DTYPE).removeprefix("torch."),
                        "threads": torch.get_num_threads(),
                        "forward_iterations": iters,
                        "seconds": f"{seconds:.6f}",
                        "peak_bytes": peak,
                        "saved_bytes": saved,
                        "time_ratio_vs_autograd": f"{seconds / anchor['seconds']:.4f}",
                        "peak_ratio_vs_autograd": f"{peak / anchor['peak']:.4f}",
                        "grad_rel_diff": f"{diff:.2e}",
                        "grad_rel_diff_vs_direct": f"{diff_direct:.2e}",
                        "memory_method": "torch.profiler export_memory_timeline peak (allocations"
                        " inside the call); saved_bytes: saved_tensors_hooks / (W, b, x)",
                    }
                )
                print(
                    f"N={N:4d} K={K:5d} {name:16s} {seconds * 1e3:9.2f} ms  "
                    f"peak {peak / 2**20:8.2f} MiB  saved {saved / 2**20:8.2f} MiB  "
                    f"diff {diff:.1e}  vs direct {diff_direct:.1e}",
                    file=sys.stderr,
                )
    return rows


def plot_gradients(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Ns = sorted({r["N"] for r in rows})
    fig, axes = plt.subplots(2, len(Ns), figsize=(5 * len(Ns), 7), squeeze=False)
    for j, N in enumerate(Ns):
        for name in dict.fromkeys(r["method"] for r in rows):
            sel = [r for r in rows if r["N"] == N and r["method"] == name]
            Ks = [r["K"] for r in sel]
            style = "k-o" if name == "autograd" else "-o"
            axes[0][j].loglog(Ks, [r["peak_bytes"] / 2**20 for r in sel], style, label=name)
            axes[1][j].loglog(Ks, [float(r["seconds"]) * 1e3 for r in sel], style, label=name)
        axes[0][j].set_title(f"N = {N}, B = {B}: peak memory of the gradient")
        axes[0][j].set_ylabel("peak MiB (torch memory profiler)")
        axes[1][j].set_ylabel("forward + backward, ms")
        for ax in axes[:, j]:
            ax.set_xlabel("K forward iterations")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][j].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_digits(path):
    """Train the default SteadyClassifier; plot the loss and test accuracy curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rnngrad.tasks.digits import load_digits

    # the timing run: exactly what `rnngrad train --task digits --model steady` does
    timed = train_steady(SteadyClassifier(128, seed=0), steps=300, lr=1e-2, batch_size=64, seed=0)

    _, _, X_test, y_test = load_digits(dtype=torch.float32)
    model = SteadyClassifier(128, seed=0)
    losses, accs = [], []

    def callback(step, m):
        losses.append((step, m["loss"]))
        if step % 25 == 0:
            with torch.no_grad():
                acc = float((model(X_test).argmax(-1) == y_test).float().mean())
            accs.append((step, acc))

    metrics = train_steady(model, steps=300, lr=1e-2, batch_size=64, seed=0, callback=callback)
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    ax[0].semilogy(*zip(*losses, strict=True), lw=0.8)
    ax[0].set_xlabel("Adam step (batch 64)")
    ax[0].set_ylabel("training cross-entropy")
    ax[1].plot(*zip(*accs, strict=True), "o-")
    ax[1].set_xlabel("Adam step")
    ax[1].set_ylabel("test accuracy (360 images)")
    ax[1].set_ylim(0, 1)
    ax[1].grid(True, alpha=0.3)
    fig.suptitle(
        f"Steady-state classifier (N = 128, tanh, recurrent backprop): test accuracy "
        f"{metrics['test_accuracy']:.3f}, training {timed['seconds']:.1f} s "
        f"({torch.get_num_threads()} thread(s))"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return timed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="N = 64 and K <= 100 only")
    parser.add_argument("--skip-digits", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    Ns, Ks = ([64], [10, 100]) if args.quick else ([64, 512], [10, 100, 1000])
    print(
        f"torch {torch.__version__}, torchdeq {torchdeq_version()}, "
        f"{platform.processor() or platform.machine()}, {args.threads} thread(s)",
        file=sys.stderr,
    )
    rows = run_gradients(Ns, Ks, args.repeats)
    with open(CSV, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot_gradients(rows, HERE / "steady_memory.png")
    if not args.skip_digits:
        m = run_digits(HERE / "steady_digits.png")
        print(
            f"digits: test accuracy {m['test_accuracy']:.4f}, train accuracy "
            f"{m['train_accuracy']:.4f}, {m['steps']} steps in {m['seconds']:.1f} s, "
            f"max forward iterations {m['max_iterations']}",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
