"""Training with any gradient algorithm: per sequence, or online on a stream.

Per sequence (``update_every=None``): each step draws a batch, ``rnngrad.gradient``
returns the loss and gradients with the chosen algorithm, and a ``torch.optim``
optimizer steps. Online (``update_every=N``): the algorithm's ``step`` runs through
the sequence and the optimizer is applied every N time steps with what the
algorithm emitted since the last update (RTRL emits every step, TBPTT every k);
for a streaming task (``task.streaming``) the hidden and algorithm state carry
over from one batch to the next, so training runs on one continuous stream.

Writes, when ``out`` is given: ``metrics.csv`` (one row per logged step),
``curve.png`` (learning curve), ``model.pt`` (final ``state_dict``),
``config.json``, and ``checkpoint.pt`` (atomically, every ``checkpoint_every``
steps) from which ``resume=True`` continues to the same result as an
uninterrupted run. The library never prints: progress goes to ``callback``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .algorithms.base import Algorithm, add_grads
from .algorithms.bptt import bptt
from .gradient import gradient, write_grads
from .readouts import loss_and_grad, readout
from .tasks.base import Batch, make_generator

__all__ = ["train", "evaluate", "TrainResult", "OPTIMIZERS", "make_optimizer", "apply_update",
           "online_pass"]

OPTIMIZERS = ("adam", "sgd")


class TrainResult(NamedTuple):
    model: nn.Module
    history: list[dict[str, float]]  # one dict per logged step
    final: dict[str, float]  # the last evaluation on the test set


@torch.no_grad()
def evaluate(model: nn.Module, task, batch: Batch | None = None) -> dict[str, float]:
    """Test loss (the pinned loss), and accuracy (classification) or MSE (regression).

    Accuracy is the fraction of masked steps whose argmax matches the class index;
    MSE is the mean over masked steps and outputs of ``(y - target)^2`` (not halved).
    """
    p = model.W_rec
    batch = (task.test_batch() if batch is None else batch).to(device=p.device, dtype=p.dtype)
    T, B = batch.mask.shape
    h0 = torch.zeros(B, model.hidden_size, dtype=p.dtype, device=p.device)
    from .model import unroll

    hs, _ = unroll(model, batch.inputs, h0, need_deriv=False)
    z = hs @ model.W_out.T + model.b_out
    loss, _ = loss_and_grad(z, batch.targets, batch.mask / B, loss=task.loss,
                            readout_name=model.readout)
    out = {"test_loss": float(loss)}
    m = batch.mask > 0
    n = max(int(m.sum()), 1)
    if task.classification:
        correct = (z.argmax(-1) == batch.targets) & m
        out["test_acc"] = float(correct.sum()) / n
    else:
        y = readout(z, model.readout)
        err = ((y - batch.targets) ** 2).mean(-1)
        out["test_mse"] = float((err * m).sum()) / n
    return out


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    """"adam" or "sgd" over ``params``."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; known optimizers: {', '.join(OPTIMIZERS)}")


def apply_update(model, opt, grads, clip: float | None) -> None:
    """Write ``grads`` into ``.grad``, clip the norm (unless None) and step ``opt``."""
    write_grads(model, grads)
    if clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(
    model: nn.Module,
    task,
    *,
    algorithm: Algorithm | None = None,
    steps: int = 1000,
    lr: float = 1e-2,
    optimizer: str = "adam",
    batch_size: int = 32,
    seed: int = 0,
    update_every: int | None = None,
    clip: float | None = 1.0,
    log_every: int = 50,
    out: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    step_callback: Callable[[int, dict[str, Any]], dict[str, float] | None] | None = None,
) -> TrainResult:
    """Train ``model`` on ``task`` with ``algorithm``'s gradients.

    Args:
        model: an ``rnngrad.RNN`` whose sizes match the task.
        task: an ``rnngrad.tasks`` task (``batch``, ``test_batch``, ``loss``, ...).
        algorithm: any rnngrad algorithm; ``bptt()`` by default.
        steps: number of training batches.
        lr, optimizer: learning rate and "adam" | "sgd".
        batch_size: B, sequences per batch.
        seed: seeds the data stream (initial weights are the caller's: seed torch first).
        update_every: None to update once per sequence; N to apply the optimizer every
            N time steps during the sequence (online learning; needs an online-capable
            algorithm such as rtrl() or tbptt(k)).
        clip: clip the gradient norm to this value before each update (None: no clipping).
        log_every: evaluate on the test set and log every this many steps.
        out: directory for metrics.csv, curve.png, model.pt, config.json, checkpoint.pt.
        checkpoint_every: write checkpoint.pt every this many steps (needs out).
        resume: continue from out/checkpoint.pt if it exists.
        callback: ``callback(step, row)`` after each logged step (progress bars).
        step_callback: ``step_callback(step, info)`` after each batch, with info holding
            "batch", "grads" and "algorithm"; a returned dict is merged into the next
            logged row (e.g. gradient alignment against an exact algorithm).

    Returns:
        ``TrainResult(model, history, final)``.
    """
    algorithm = bptt() if algorithm is None else algorithm
    if not isinstance(algorithm, Algorithm):
        raise TypeError(f"algorithm must be an rnngrad algorithm, got {type(algorithm).__name__}")
    for name, v in (("steps", steps), ("batch_size", batch_size), ("log_every", log_every)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if update_every is not None and (not isinstance(update_every, int) or update_every < 1):
        raise ValueError(f"update_every must be a positive int or None, got {update_every!r}")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if (task.input_size, task.output_size) != (model.input_size, model.output_size):
        raise ValueError(
            f"task {task.name!r} has input_size {task.input_size} and output_size "
            f"{task.output_size} but the model has {model.input_size} and {model.output_size}")
    if checkpoint_every is not None and out is None:
        raise ValueError("checkpoint_every needs an output directory (out)")

    opt = make_optimizer(optimizer, model.parameters(), lr)
    g = make_generator(seed)
    p = model.W_rec
    streaming = bool(getattr(task, "streaming", False))
    history: list[dict[str, float]] = []
    start = 1
    out_dir = Path(out) if out is not None else None
    ckpt_path = out_dir / "checkpoint.pt" if out_dir is not None else None
    stream_state = None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        config = {"task": task.name, "algorithm": algorithm.name, "steps": steps, "lr": lr,
                  "optimizer": optimizer, "batch_size": batch_size, "seed": seed,
                  "update_every": update_every, "clip": clip, "hidden": model.hidden_size,
                  "activation": model.activation, "alpha": model.alpha,
                  "readout": model.readout}
        (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    if resume and ckpt_path is not None and ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        g.set_state(ck["generator"])
        history = ck["history"]
        start = ck["step"] + 1
        stream_state = ck.get("stream_state")
        if ck.get("task_state") is not None and hasattr(task, "load_state_dict"):
            task.load_state_dict(ck["task_state"])  # where the data stream had got to

    extra: dict[str, float] = {}
    t0 = time.perf_counter()
    done_since_log = 0
    train_loss_acc = 0.0
    for step in range(start, steps + 1):
        batch = task.batch(batch_size, generator=g).to(device=p.device, dtype=p.dtype)
        if update_every is None:
            loss, grads = gradient(model, batch.inputs, batch.targets, algorithm=algorithm,
                                   loss=task.loss, mask=batch.mask)
            apply_update(model, opt, grads, clip)
        else:
            state = stream_state if streaming else None
            if state is None:
                state = algorithm.init(model, batch_size)
            stream_state, loss, grads = online_pass(model, opt, algorithm, batch, state,
                                                    task.loss, update_every, clip)
        train_loss_acc += float(loss)
        done_since_log += 1
        if step_callback is not None:
            got = step_callback(step, {"batch": batch, "grads": grads, "algorithm": algorithm})
            if got:
                extra.update(got)
        if step % log_every == 0 or step == steps:
            elapsed = time.perf_counter() - t0
            row = {"step": step, "train_loss": train_loss_acc / done_since_log,
                   **evaluate(model, task), "steps_per_s": done_since_log / max(elapsed, 1e-9),
                   **extra}
            history.append(row)
            extra = {}
            if callback is not None:
                callback(step, row)
            train_loss_acc, done_since_log = 0.0, 0
            if checkpoint_every is not None and (step % checkpoint_every == 0 or step == steps):
                _atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                              "generator": g.get_state(), "history": history, "step": step,
                              "stream_state": stream_state,
                              "task_state": task.state_dict() if streaming else None},
                             ckpt_path)
            t0 = time.perf_counter()

    final = evaluate(model, task)
    if out_dir is not None:
        _write_metrics(history, out_dir / "metrics.csv")
        _atomic_save(model.state_dict(), out_dir / "model.pt")
        from .plots import plot_curve

        plot_curve(history, out_dir / "curve.png", title=f"{task.name}, {algorithm.name}")
    return TrainResult(model, history, final)


def online_pass(model, opt, algorithm: Algorithm, batch: Batch, state, loss: str,
                update_every: int | None, clip: float | None) -> tuple[Any, Tensor, dict]:
    """Step ``algorithm`` through one batch, applying the optimizer during it.

    Every ``update_every`` time steps (and at the end of the batch) the optimizer is
    applied with what the algorithm emitted since the last update; an algorithm that
    is not online (BPTT) is flushed there first, i.e. cut into chunks of
    ``update_every`` steps. ``update_every=None`` updates once, at the end.

    Args:
        state: the algorithm's state to start from (``algorithm.init(...)`` or the state
            carried from the previous batch of a stream).

    Returns:
        ``(state, loss, grads)``: the state after the batch, the batch's pinned loss,
        and the sum of the gradients applied (an empty dict if nothing was emitted).
    """
    T = batch.inputs.shape[0]
    total = pending = None
    value = batch.inputs.new_zeros(())
    for t in range(T):
        state, out, g = algorithm.step(model, state, batch.inputs[t], batch.targets[t],
                                       mask_t=batch.mask[t], loss=loss)
        value = value + out.loss
        pending = add_grads(pending, g)
        if update_every is not None and (t + 1) % update_every == 0 and t + 1 < T:
            if not algorithm.online:  # BPTT-like: emit what is stored, cut there
                state, g = algorithm.flush(model, state)
                pending = add_grads(pending, g)
            if pending is not None:
                apply_update(model, opt, pending, clip)
                total, pending = add_grads(total, pending), None
    state, g = algorithm.flush(model, state)
    pending = add_grads(pending, g)
    if pending is not None:
        apply_update(model, opt, pending, clip)
        total = add_grads(total, pending)
    return state, value, total if total is not None else {}


def _write_metrics(history: list[dict[str, float]], path: Path) -> None:
    keys: list[str] = []
    for row in history:
        keys.extend(k for k in row if k not in keys)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for row in history:
            w.writerow(row)
    os.replace(tmp, path)
