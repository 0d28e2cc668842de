"""Train several gradient algorithms side by side and compare them.

Every algorithm starts from the same initial weights and sees the same data stream
(the same seed gives the same initialisation and the same batches to all), so the
differences in the learning curves come from the gradients alone. Per training step
(one batch)::

    per-sequence tasks   g = sum of what the algorithm emits over the batch's sequences
                         (``rnngrad.gradient``), then one optimizer step
    streaming tasks      (``task.streaming``: consecutive batches continue one stream) the
                         hidden state and the algorithm's own state (influence, traces)
                         are carried across batches; BPTT is cut at batch boundaries
    update_every = k     an optimizer step every k time steps inside the batch, the
                         algorithm's state carried across the updates (online learning)

Recorded per run: the test loss (mean loss per counted step, ``sum(mask l) / sum(mask)``,
on ``task.test_batch()`` from h0 = 0) every ``eval_every`` steps; wall time of the gradient
and update (evaluation and alignment excluded) divided by the time steps processed; the
algorithm's memory, measured as the bytes of the tensors in its state at its peak over
one batch (the stored trajectory for BPTT, the influence for RTRL, the traces for
e-prop; the honest figure for what an algorithm keeps, independent of the allocator and
of the process); and every ``track_every`` steps the alignment (``rnngrad.metrics``) of
the gradient it used with the reference's (``bptt()`` by default) on the same batch and
weights. For streaming tasks the reference is BPTT over the batch from the carried state,
i.e. truncated at the batch start; with ``update_every`` it uses the weights of the
batch start while the algorithm's updates inside the batch move them.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .algorithms.base import Algorithm
from .algorithms.bptt import bptt
from .gradient import gradient
from .metrics import METRICS, alignment
from .outdir import OutputDir, atomic_write, claim
from .readouts import loss_and_grad
from .runs import DTYPES, check_device, make_model
from .train import OPTIMIZERS, _check_applies, apply_update, loss_for, make_optimizer, online_pass

__all__ = ["compare", "evaluate_loss", "state_bytes", "OPTIMIZERS", "OUTPUTS"]

# what compare writes into its directory (compare.csv last: its presence marks a finished one)
OUTPUTS = ("compare.csv", "curves.csv", "alignment.csv", "learning_curves.png", "alignment.png")

# alignment is measured on the recurrent parameters (all but the readout's): every
# algorithm here has the exact readout gradient, which would otherwise dominate the cosine
READOUT = ("W_out", "b_out")
# (classification tasks add final_test_acc_mean and final_test_acc_std after the loss)
TABLE_FIELDS = ("algorithm", "final_test_loss_mean", "final_test_loss_std", "ms_per_time_step",
                "state_kib", "cosine_mean", "sign_agreement_mean", "norm_ratio_mean", "seeds",
                "steps")


def evaluate_loss(model, batch, *, loss: str, accuracy: bool = False
                  ) -> float | tuple[float, float]:
    """Mean loss per counted step, ``sum(mask l) / sum(mask)``, from h0 = 0; with
    ``accuracy=True`` also the fraction of counted steps whose argmax is the class."""
    inputs, targets, mask = batch[0], batch[1], batch[2]
    with torch.no_grad():
        _, hs = model(inputs)
        z = hs @ model.W_out.T + model.b_out
        value, _ = loss_and_grad(z, targets, mask, loss=loss, readout_name=model.readout)
        mean = float(value / mask.sum())
        if not accuracy:
            return mean
        counted = mask > 0
        correct = ((z.argmax(-1) == targets) & counted).sum()
        return mean, float(correct) / max(int(counted.sum()), 1)


def state_bytes(state: Any) -> int:
    """Bytes held by the tensors of an algorithm state (NamedTuple, lists, tuples)."""
    if isinstance(state, Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(s) for s in state)
    if isinstance(state, dict):
        return sum(state_bytes(s) for s in state.values())
    return 0


def _peak_state_bytes(model, algo: Algorithm, batch, loss: str) -> int:
    """The largest the algorithm's state gets over one batch (before its flush)."""
    m = copy.deepcopy(model)
    inputs, targets, mask = batch[0], batch[1], batch[2]
    state = algo.init(m, inputs.shape[1])
    peak = state_bytes(state)
    for t in range(inputs.shape[0]):
        state, _, _ = algo.step(m, state, inputs[t], targets[t], mask_t=mask[t], loss=loss)
        peak = max(peak, state_bytes(state))
    algo.flush(m, state)
    return peak


def _named(algorithms) -> list[tuple[str, Algorithm]]:
    from .registry import get_algorithm

    out = []
    for a in algorithms:
        if isinstance(a, str):
            out.append((a, get_algorithm(a)))
        elif isinstance(a, Algorithm):
            out.append((a.name, a))
        elif isinstance(a, tuple) and len(a) == 2 and isinstance(a[1], Algorithm):
            out.append((str(a[0]), a[1]))
        else:
            raise TypeError("algorithms must be CLI names ('eprop'), Algorithms or (name, "
                            f"Algorithm) pairs; got {a!r}")
    if not out:
        raise ValueError("algorithms is empty: give at least one")
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"algorithm names must be distinct, got {names}")
    return out


def compare(
    task,
    algorithms: Sequence,
    *,
    seeds: Sequence[int] = (0,),
    steps: int = 200,
    hidden: int = 32,
    lr: float = 1e-2,
    optimizer: str = "adam",
    batch_size: int = 16,
    update_every: int | None = None,
    track_every: int | None = 20,
    eval_every: int | None = None,
    out_dir: str | Path | None = None,
    progress: Callable[[dict], None] | None = None,
    alpha: float = 1.0,
    activation: str = "tanh",
    init: str = "uniform",
    reference: Algorithm | None = None,
    clip: float | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    cell: str = "elman",
    layers: int = 1,
    loss: str | None = None,
    overwrite: bool = False,
) -> list[dict]:
    """Train each algorithm from the same weights on the same data; tabulate and plot.

    Args:
        task: a task object (``rnngrad.tasks``) or its name for ``rnngrad.tasks.get_task``.
        algorithms: CLI names (``"eprop"``), Algorithms, or (name, Algorithm) pairs.
        seeds: one run per seed and algorithm; a seed fixes the initial weights and data.
        steps: training steps (batches) per run.
        hidden, alpha, activation, init, cell, layers: the network, built by
            ``rnngrad.runs.make_model`` (readout from the task): ``cell`` a name of
            ``rnngrad.registry.CELLS`` or a user's ``module:Class``, ``layers`` of them.
        lr, optimizer ("sgd" | "adam"), clip (max gradient norm or None): the update.
        batch_size: sequences (streams, for a streaming task) per batch.
        update_every: optimizer step every k time steps inside a batch (None: once per batch).
        track_every: alignment with ``reference`` every so many steps (None: never).
        eval_every: test loss every so many steps (default: about 20 points per curve).
        out_dir: where to write ``compare.csv``, ``curves.csv``, ``alignment.csv``,
            ``learning_curves.png``, ``alignment.png`` (None: write nothing). A directory
            holding an earlier comparison is refused before anything runs
            (``rnngrad.outdir.RunExists``) unless ``overwrite``, which replaces it. The
            directory is held from the start; ``curves.csv`` and ``alignment.csv`` grow
            as the runs go (a killed comparison keeps them), ``compare.csv`` comes last.
        progress: called with a dict (algorithm, seed, step, steps, test_loss) at each
            evaluation; the library prints nothing.
        reference: the exact algorithm for alignment (default ``bptt()``).
        dtype, device: of the model and data.
        loss: "mse", "cross_entropy" or "bce"; None: the one that follows the task's
            readout (softmax: cross-entropy, sigmoid: BCE, identity: the task's own).
        overwrite: replace an earlier comparison in ``out_dir``.

    Returns:
        One dict per algorithm with the keys of ``TABLE_FIELDS`` (plus final test accuracy
        mean and std on classification tasks): final test loss mean and
        std over seeds, ms per time step, state memory (KiB), mean alignment (cosine, sign
        agreement, norm ratio) over the tracked steps and seeds.
    """
    if isinstance(task, str):
        from .tasks import get_task

        task = get_task(task)
    named = _named(algorithms)
    for name, v in (("steps", steps), ("hidden", hidden), ("batch_size", batch_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if update_every is not None and (not isinstance(update_every, int) or update_every < 1):
        raise ValueError(f"update_every must be a positive int or None, got {update_every!r}")
    if dtype not in DTYPES.values():
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; known: {', '.join(OPTIMIZERS)}")
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds is empty: give at least one")
    check_device(device)
    loss = loss_for(task, task.readout, loss)
    # every algorithm must apply to the network: checked before anything runs or is written
    probe = make_model({"cell": cell, "layers": layers, "hidden": hidden,
                        "activation": activation, "alpha": alpha, "init": init,
                        "dtype": str(dtype).removeprefix("torch."), "device": str(device),
                        "seed": seeds[0]}, task)
    for _, algo in named:
        _check_applies(algo, probe, batch_size)
    how = None
    if out_dir is not None:
        how = claim(out_dir, outputs=OUTPUTS, overwrite=overwrite, checkpoint=None,
                    finished="compare.csv", resumable=False)
    reference = bptt() if reference is None else reference
    eval_every = eval_every or max(1, steps // 20)
    streaming = bool(getattr(task, "streaming", False))
    test = task.test_batch().to(device=device, dtype=dtype)
    # accuracy where the targets are class indices (cross-entropy tasks)
    classification = bool(getattr(task, "classification", False)) and loss == "cross_entropy"
    # the task's own measure where it has one (neurogym's: the output at a trial's last step)
    performance = getattr(task, "performance", None) if classification else None

    curves: list[dict] = []
    aligns: list[dict] = []
    times: dict[str, list[float]] = {n: [] for n, _ in named}
    mem: dict[str, int] = {}
    dtype_name = str(dtype).removeprefix("torch.")
    curve_fields = ["algorithm", "seed", "step", "test_loss"] + (
        ["test_acc"] if classification else []) + (["test_perf"] if performance else [])
    align_fields = ["algorithm", "seed", "step", *METRICS]
    with contextlib.ExitStack() as stack:
        logs: dict[str, _Log] = {}
        if out_dir is not None:  # held from here; curves.csv and alignment.csv grow as it goes
            held = stack.enter_context(
                OutputDir(out_dir, replace=OUTPUTS if how == "overwrite" else ()))
            logs = {"curves": _Log(held.path / "curves.csv", curve_fields),
                    "alignment": _Log(held.path / "alignment.csv", align_fields)}
        for seed in seeds:
            model0 = make_model({"cell": cell, "layers": layers, "hidden": hidden,
                                 "activation": activation,
                                 "alpha": alpha, "init": init, "dtype": dtype_name,
                                 "device": str(device), "seed": seed}, task)
            recurrent = [n for n, _ in model0.named_parameters() if n not in READOUT]
            for name, algo in named:
                model = copy.deepcopy(model0)
                opt = make_optimizer(optimizer, model.parameters(), lr)
                data = torch.Generator().manual_seed(1_000_003 * seed + 17)
                if hasattr(task, "reset"):
                    task.reset()
                state = None
                elapsed, processed = 0.0, 0

                def record(step: int, _name=name, _seed=seed, _model=model) -> None:
                    if classification:
                        value, acc = evaluate_loss(_model, test, loss=loss, accuracy=True)
                        extra = {"test_acc": acc}
                        if performance is not None:
                            with torch.no_grad():
                                z = _model(test.inputs)[1] @ _model.W_out.T + _model.b_out
                            extra["test_perf"] = performance(z, test)
                    else:
                        value, extra = evaluate_loss(_model, test, loss=loss), {}
                    curves.append({"algorithm": _name, "seed": _seed, "step": step,
                                   "test_loss": value, **extra})
                    if logs:
                        logs["curves"].write(curves[-1])
                    if progress is not None:
                        progress({"algorithm": _name, "seed": _seed, "step": step, "steps": steps,
                                  "test_loss": value})

                record(0)
                for step in range(1, steps + 1):
                    batch = task.batch(batch_size, generator=data).to(device=device, dtype=dtype)
                    inputs, targets, mask = batch
                    if name not in mem:
                        mem[name] = _peak_state_bytes(model, algo, batch, loss)
                    track = track_every is not None and step % track_every == 0
                    online_mode = streaming or update_every is not None
                    # the weights the batch starts from, for the reference (online updates move them)
                    snapshot = copy.deepcopy(model) if track and online_mode else model
                    h_start = state.h if (streaming and state is not None) else None
                    t0 = time.perf_counter()
                    if online_mode:
                        if state is None or not streaming:
                            state = algo.init(model, batch_size)
                        state, _, used = online_pass(model, opt, algo, batch, state, loss,
                                                     update_every, clip)
                        used = used or None
                        elapsed += time.perf_counter() - t0
                    else:
                        _, used = gradient(model, inputs, targets, algorithm=algo, loss=loss,
                                           mask=mask)
                        elapsed += time.perf_counter() - t0
                    if track and used is not None:
                        _, exact = gradient(snapshot, inputs, targets, algorithm=reference,
                                            loss=loss, mask=mask, h0=h_start)
                        a = alignment(used, exact, params=recurrent)["all"]
                        aligns.append({"algorithm": name, "seed": seed, "step": step, **a})
                        if logs:
                            logs["alignment"].write(aligns[-1])
                    if not online_mode:
                        t1 = time.perf_counter()
                        apply_update(model, opt, used, clip)
                        elapsed += time.perf_counter() - t1
                    processed += inputs.shape[0]
                    if step % eval_every == 0 or step == steps:
                        record(step)
                times[name].append(1e3 * elapsed / processed)

        rows = _table(named, seeds, steps, curves, aligns, times, mem)
        if out_dir is not None:
            _write(held.path, rows, curves, aligns, task, reference, recurrent)
    return rows


class _Log:
    """A CSV file that grows as the comparison goes: the header now, each row appended and
    flushed as it is recorded (a killed comparison keeps what it measured)."""

    def __init__(self, path: Path, fields: list[str]) -> None:
        self.path, self.fields = path, fields
        with open(path, "w", newline="") as f:
            csv.DictWriter(f, fieldnames=fields).writeheader()

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields).writerow(row)


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def _std(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _table(named, seeds, steps, curves, aligns, times, mem) -> list[dict]:
    rows = []
    for name, _ in named:
        final = [c["test_loss"] for c in curves if c["algorithm"] == name and c["step"] == steps]
        al = [a for a in aligns if a["algorithm"] == name]
        row = {
            "algorithm": name,
            "final_test_loss_mean": _mean(final),
            "final_test_loss_std": _std(final),
        }
        accs = [c["test_acc"] for c in curves
                if c["algorithm"] == name and c["step"] == steps and "test_acc" in c]
        if accs:
            row["final_test_acc_mean"] = _mean(accs)
            row["final_test_acc_std"] = _std(accs)
        perfs = [c["test_perf"] for c in curves
                 if c["algorithm"] == name and c["step"] == steps and "test_perf" in c]
        if perfs:
            row["final_test_perf_mean"] = _mean(perfs)
            row["final_test_perf_std"] = _std(perfs)
        row |= {
            "ms_per_time_step": _mean(times[name]),
            "state_kib": mem.get(name, 0) / 1024.0,
        }
        for m in METRICS:
            row[f"{m}_mean"] = _mean([a[m] for a in al])
        row["seeds"] = len(seeds)
        row["steps"] = steps
        rows.append(row)
    return rows


def _write(out: Path, rows, curves, aligns, task, reference: Algorithm, recurrent) -> None:
    from .plots import plot_alignment, plot_learning_curves

    # curves.csv and alignment.csv are written as the runs go; compare.csv, last, marks
    # a finished comparison
    names = [r["algorithm"] for r in rows]
    baselines = {label: getattr(task, attr) for attr, label in (
        ("loss_no_memory", "no memory"), ("loss_first_dependency", "t1 only"),
        ("loss_optimal", "optimal")) if hasattr(task, attr)}
    plot_learning_curves(curves, out / "learning_curves.png", names,
                         title=getattr(task, "name", "task"), baselines=baselines)
    if aligns:  # alignment was tracked
        plot_alignment(aligns, out / "alignment.png",
                       [n for n in names if any(a["algorithm"] == n for a in aligns)],
                       reference=reference.name, params=", ".join(recurrent))
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write(out / "compare.csv", buf.getvalue().encode())
