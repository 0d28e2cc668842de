"""Training with any gradient algorithm: per sequence, or online on a stream.

Per sequence (``update_every=None``): each step draws a batch, ``rnngrad.gradient``
returns the loss and gradients with the chosen algorithm, and a ``torch.optim``
optimizer steps. Online (``update_every=N``): the algorithm's ``step`` runs through
the sequence and the optimizer is applied every N time steps with what the
algorithm emitted since the last update (RTRL emits every step, TBPTT every k);
for a streaming task (``task.streaming``) the hidden and algorithm state carry
over from one batch to the next, so training runs on one continuous stream.

Nothing silently wrong: a loss, gradient or updated parameter that is not finite stops
training with ``Diverged`` before the update is applied or anything is saved, so the
last checkpoint and ``model.pt`` stay as they were.

Writes, when ``out`` is given (a directory one run owns at a time: ``rnngrad.outdir``):
``metrics.csv`` (one row per logged step, appended and flushed as it is logged, so a
killed run keeps its log), ``curve.png``, ``model.pt`` (final ``state_dict``; its
presence marks a finished run), ``config.json`` (what the run was), and
``checkpoint.pt`` every ``checkpoint_every`` steps; every file but the growing log is
written atomically. A directory holding an earlier run is never overwritten silently:
``resume=True`` continues it, ``overwrite=True`` replaces it, anything else is
``rnngrad.outdir.RunExists``; and every argument is checked (the algorithm applied to
the model included) before the directory is created, so a refused run writes nothing. A checkpoint holds the
configuration, the model, the optimizer, and every random generator and carried state
the run uses (the data generator, the algorithm's generators, the stream and the
algorithm state it carries): ``resume=True`` continues it to the bit-identical result
of an uninterrupted run, and refuses a checkpoint of a different configuration.

``rnngrad.runs.run(config)`` builds a run from a plain dict and calls ``train``. The
library never prints: progress goes to the callbacks.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from . import errors
from .algorithms.base import Algorithm, add_grads, rng_state, set_rng_state
from .algorithms.bptt import bptt
from .gradient import gradient, write_grads
from .metrics import alignment
from .outdir import TRAIN_OUTPUTS, OutputDir, atomic_write, claim, torch_bytes
from .readouts import LOSSES, check_loss, loss_and_grad
from .tasks.base import Batch, make_generator

__all__ = ["train", "evaluate", "TrainResult", "OPTIMIZERS", "make_optimizer", "apply_update",
           "online_pass", "load_checkpoint", "Diverged", "NonFinite", "CheckpointError",
           "ConfigMismatch", "CheckpointExists", "CHECKPOINT", "loss_for"]

OPTIMIZERS = ("adam", "sgd")
CHECKPOINT = "checkpoint.pt"
_FORMAT = 1

# keys a resumed run may change: how long it runs and how often it logs
_RESUMABLE = ("steps", "log_every", "compile")  # compile: the same numbers


class TrainResult(NamedTuple):
    model: nn.Module
    history: list[dict[str, float]]  # one dict per logged step
    final: dict[str, float]  # the last evaluation on the test set


class NonFinite(ArithmeticError):
    """A loss, gradient or parameter that is not finite (raised before the update)."""


# what the algorithms raise when their own computation meets a NaN or an Inf
_ALGORITHM_NONFINITE = getattr(errors, "NonFiniteError", NonFinite)


class Diverged(RuntimeError):
    """Training stopped on a non-finite loss, gradient or parameter.

    ``step``: the step it happened at; ``checkpoint_step``: the step of the checkpoint
    kept (None: none); ``history``: the rows logged before it.
    """

    def __init__(self, message: str, *, step: int, checkpoint_step: int | None,
                 history: list[dict[str, float]]) -> None:
        super().__init__(message)
        self.step = step
        self.checkpoint_step = checkpoint_step
        self.history = history


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read (truncated, corrupt, not rnngrad's)."""


class ConfigMismatch(ValueError):
    """``resume`` found a checkpoint of a different configuration."""


class CheckpointExists(ValueError):
    """A fresh run (no ``resume``) found a checkpoint it would overwrite."""


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


# the loss that pairs with each readout (the readout turns logits into what it scores)
_LOSS_OF_READOUT = {"softmax": "cross_entropy", "sigmoid": "bce"}


def loss_for(task, readout: str, loss: str | None = None) -> str:
    """The loss a run trains ``task`` with: ``loss`` when given (checked against the
    readout and the task's targets), else the one that follows the readout (softmax:
    cross-entropy, sigmoid: binary cross-entropy, identity: the task's own)."""
    task_loss = task.loss
    if loss is None:
        return _LOSS_OF_READOUT.get(readout, task_loss)
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; known losses: {', '.join(LOSSES)}")
    check_loss(loss, readout)
    if (loss == "cross_entropy") != (task_loss == "cross_entropy"):
        kind = "class indices" if task_loss == "cross_entropy" else "values, not class indices"
        raise ValueError(f"loss {loss!r} does not fit task {task.name!r}: its targets are "
                         f"{kind} (its own loss is {task_loss!r})")
    return loss


# ---- evaluation and updates -------------------------------------------------------------

@torch.no_grad()
def evaluate(model: nn.Module, task, batch: Batch | None = None, *,
             loss: str | None = None) -> dict[str, float]:
    """Test loss, and accuracy (classification) or MSE (regression), through ``model(inputs)``.

    ``test_loss`` is the pinned loss (a sequence's counted steps summed, the mean over
    sequences); ``test_loss_per_step`` is the mean over counted steps. Accuracy is the
    fraction of counted steps whose argmax matches the class index; ``test_mse`` is the
    mean over counted steps and outputs of ``(y - target)^2`` (not halved). ``loss``:
    as for ``loss_for`` (default: the one that follows the model's readout).
    """
    p = model.W_out
    batch = (task.test_batch() if batch is None else batch).to(device=p.device, dtype=p.dtype)
    T, B = batch.mask.shape
    y, h = model(batch.inputs)
    z = h @ model.W_out.T + model.b_out
    name = loss_for(task, model.readout, loss)
    loss, _ = loss_and_grad(z, batch.targets, batch.mask / B, loss=name,
                            readout_name=model.readout)
    m = batch.mask > 0
    n = max(int(m.sum()), 1)
    out = {"test_loss": float(loss), "test_loss_per_step": float(loss) * B / n}
    if task.classification:
        correct = (z.argmax(-1) == batch.targets) & m
        out["test_acc"] = float(correct.sum()) / n
        if hasattr(task, "performance"):  # the task's own measure (neurogym's: last step)
            out["test_perf"] = task.performance(z, batch)
    else:
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


def _all_finite(tensors) -> bool:
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def _first_nonfinite(named: Mapping[str, Tensor]) -> str:
    for n, t in named.items():
        bad = t[~torch.isfinite(t)]
        if bad.numel():
            return f"{float(bad[0])} in {n}"
    return "none found"


def apply_update(model, opt, grads, clip: float | None, *, check: bool = False) -> None:
    """Write ``grads`` into ``.grad``, clip the norm (unless None) and step ``opt``.

    With ``check=True``, raise ``NonFinite`` instead of stepping when an entry of the
    gradient is not finite, and after the step when a parameter has become non-finite.
    """
    write_grads(model, grads)
    params = [p for p in model.parameters() if p.grad is not None]
    if check and params and not _all_finite([p.grad for p in params]):
        named = {n: g for n, g in grads.items() if isinstance(g, Tensor)}
        raise NonFinite(f"the gradient is not finite ({_first_nonfinite(named)})")
    if clip is not None:
        nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    if check and params:
        with torch.no_grad():
            finite = _all_finite(params)
        if not finite:
            raise NonFinite("the update made the parameters non-finite ("
                            f"{_first_nonfinite(dict(model.named_parameters()))})")


def _check_loss(loss: Tensor) -> float:
    value = float(loss)
    if not math.isfinite(value):
        raise NonFinite(f"the loss is {value}")
    return value


# ---- checkpoints ------------------------------------------------------------------------

def _describe(model, task, algorithm, **training) -> dict[str, Any]:
    """What ``train`` knows of a run, as plain JSON: the task, the algorithm, the training
    settings and the model's parameter shapes (no reading of cell internals)."""
    p = model.W_out
    return {"task": getattr(task, "name", type(task).__name__), "algorithm": algorithm.name,
            **training,
            "model": {"class": type(model).__name__,
                      "parameters": {n: list(t.shape) for n, t in model.named_parameters()},
                      "dtype": str(p.dtype).removeprefix("torch."), "device": str(p.device)}}


def _differences(saved: Mapping, current: Mapping) -> list[str]:
    """What differs between two recorded configurations, the settings a user gives first
    (the run's configuration), the model's parameter shapes last and in one item."""

    def flat(a: Mapping, b: Mapping, skip=()) -> list[str]:
        return [f"{k} {a.get(k, '(absent)')!r} there, {b.get(k, '(absent)')!r} here"
                for k in sorted(set(a) | set(b))
                if k not in _RESUMABLE and k not in skip and a.get(k) != b.get(k)]

    out = flat(saved.get("run") or {}, current.get("run") or {})
    named = {d.split(" ", 1)[0] for d in out}
    out += flat(saved, current, skip=("run", "model", *named))
    ms, mc = saved.get("model") or {}, current.get("model") or {}
    out += [f"model.{d}" for d in flat(ms, mc, skip=("parameters",))]
    if ms.get("parameters") != mc.get("parameters"):
        out.append("the model's parameter shapes")
    return out


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint; ``CheckpointError`` (one line) if it is unreadable."""
    path = Path(path)
    try:
        ck = torch.load(path, weights_only=False)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch.load reports a torn file in many ways
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} cannot be read (truncated or corrupt: {reason[:120]}); "
                              "delete it to start afresh") from None
    needed = {"format", "config", "step", "model", "optimizer", "data_rng"}
    if not isinstance(ck, dict) or not needed <= set(ck):
        raise CheckpointError(f"{path} is not an rnngrad training checkpoint (it lacks "
                              f"{', '.join(sorted(needed - set(ck) if isinstance(ck, dict) else needed))})")
    if ck["format"] != _FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {ck['format']!r}; this rnngrad "
                              f"reads format {_FORMAT}")
    return ck


# ---- training ---------------------------------------------------------------------------

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
    overwrite: bool = False,
    loss: str | None = None,
    config: Mapping[str, Any] | None = None,
    track_alignment: int | None = None,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    step_callback: Callable[[int, dict[str, Any]], dict[str, float] | None] | None = None,
    on_event: Callable[[str, dict[str, Any]], None] | None = None,
    compile: bool = False,
) -> TrainResult:
    """Train ``model`` on ``task`` with ``algorithm``'s gradients.

    Args:
        model: an ``rnngrad.Network`` (``rnngrad.RNN`` included) whose sizes match the task.
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
        out: directory for metrics.csv, curve.png, model.pt, config.json, checkpoint.pt;
            locked for the run (``rnngrad.outdir.OutputLocked`` if another run holds it).
            A directory holding an earlier run is refused (``rnngrad.outdir.RunExists``,
            nothing written) unless ``resume`` or ``overwrite``.
        checkpoint_every: write checkpoint.pt every this many steps and at the end
            (needs out).
        resume: continue from out/checkpoint.pt if it exists; ``ConfigMismatch`` if it
            is from a different run, ``CheckpointError`` if it cannot be read. A finished
            run with no checkpoint cannot be resumed (``RunExists``); an unfinished one
            with no checkpoint starts afresh (``on_event("start")`` says "resumed": False).
        overwrite: replace the earlier run in ``out`` (its files are removed first).
        loss: "mse", "cross_entropy" or "bce"; None: the one that follows the model's
            readout (softmax: cross-entropy, sigmoid: BCE, identity: the task's own).
        config: the caller's description of the run (JSON-serialisable, e.g. ``run``'s
            configuration), recorded with train's own and compared on resume.
        track_alignment: every this many steps, log ``rnngrad.metrics``' cosine, sign
            agreement and norm ratio of the gradient used against exact BPTT's on the same
            batch and weights (those the batch started from), over the recurrent
            parameters (all but W_out, b_out): keys "cosine", "sign_agreement", "norm_ratio".
            A row is logged at every tracked step as well as every ``log_every`` steps,
            so no measurement is dropped.
        callback: ``callback(step, row)`` after each logged step (progress bars).
        step_callback: ``step_callback(step, info)`` after each batch, with info holding
            "batch", "grads" and "algorithm"; a returned dict is merged into the next
            logged row (e.g. gradient alignment against an exact algorithm).
        on_event: ``on_event(kind, info)``: "start" once the output directory is held
            (info: "step" the run starts after, "resumed", "checkpoint" path or None),
            "checkpoint" after each checkpoint
            (info: "step", "path"), "compiled" once after the first batch of a compiled
            run (info: "seconds" spent compiling, "mode", "reason", "graphs"; see
            ``rnngrad.compile``).
        compile: online (``update_every`` set), run the algorithm's step compiled
            (``rnngrad.compile``; docs/compiled.md); off by default, as measured there it
            does not pay at every size, and each compilation costs seconds to a minute.

    Returns:
        ``TrainResult(model, history, final)``.

    Raises:
        Diverged: a non-finite loss, gradient or parameter; nothing is saved then
            but metrics.csv (the checkpoint and model.pt keep their last good state).
    """
    algorithm = bptt() if algorithm is None else algorithm
    if not isinstance(algorithm, Algorithm):
        raise TypeError(f"algorithm must be an rnngrad algorithm, got {type(algorithm).__name__}")
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be a bool, got {compile!r}")
    if compile and update_every is not None:
        from .algorithms.compiled import compile as compile_step

        algorithm = compile_step(algorithm)
    for name, v in (("steps", steps), ("batch_size", batch_size), ("log_every", log_every)):
        if not _positive_int(v):
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if update_every is not None and not _positive_int(update_every):
        raise ValueError(f"update_every must be a positive int or None, got {update_every!r}")
    if track_alignment is not None and not _positive_int(track_alignment):
        raise ValueError(f"track_alignment must be a positive int or None, got "
                         f"{track_alignment!r}")
    if checkpoint_every is not None and not _positive_int(checkpoint_every):
        raise ValueError(f"checkpoint_every must be a positive int or None, got "
                         f"{checkpoint_every!r}")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if (task.input_size, task.output_size) != (model.input_size, model.output_size):
        raise ValueError(
            f"task {task.name!r} has input_size {task.input_size} and output_size "
            f"{task.output_size} but the model has {model.input_size} and {model.output_size}")
    if checkpoint_every is not None and out is None:
        raise ValueError("checkpoint_every needs an output directory (out)")
    loss = loss_for(task, model.readout, loss)
    _check_applies(algorithm, model, batch_size)
    record = _describe(model, task, algorithm, steps=steps, lr=lr, optimizer=optimizer,
                       batch_size=batch_size, seed=seed, update_every=update_every, clip=clip,
                       log_every=log_every)
    if loss != task.loss:
        record["loss"] = loss
    if config is not None:
        record["run"] = dict(config)
    try:
        config_json = json.dumps(record, indent=2)
    except TypeError as e:
        raise TypeError(f"config must be JSON-serialisable: {e}") from None
    opt = make_optimizer(optimizer, model.parameters(), lr)

    loop = _Loop(model, task, algorithm, opt, steps=steps, batch_size=batch_size, seed=seed,
                 update_every=update_every, clip=clip, log_every=log_every,
                 checkpoint_every=checkpoint_every, record=record, callback=callback,
                 step_callback=step_callback, on_event=on_event, track=track_alignment,
                 loss=loss)
    if out is None:
        loop.start(None, resume=False)
        return loop.run()
    how = claim(out, outputs=TRAIN_OUTPUTS, resume=resume, overwrite=overwrite)
    with OutputDir(out, replace=TRAIN_OUTPUTS if how == "overwrite" else ()) as d:
        loop.start(d.path, resume=how == "resume")
        atomic_write(d.path / "config.json", config_json.encode())
        return loop.run()


def _check_applies(algorithm: Algorithm, model: nn.Module, batch_size: int) -> None:
    """Raise now, before anything is written, if ``algorithm`` does not apply to ``model``
    (``kf_rtrl()`` on a GRU): its ``init`` checks that, on a throw-away state, with every
    random generator left as it was."""
    saved = rng_state(algorithm)
    with torch.random.fork_rng(devices=[]):
        algorithm.init(model, batch_size)
    set_rng_state(algorithm, saved)


class _Loop:
    """The training loop's state, so that a checkpoint is all of it."""

    def __init__(self, model, task, algorithm, opt, *, steps, batch_size, seed, update_every,
                 clip, log_every, checkpoint_every, record, callback, step_callback,
                 on_event, track, loss) -> None:
        self.model, self.task, self.algorithm, self.opt = model, task, algorithm, opt
        self.steps, self.batch_size, self.update_every = steps, batch_size, update_every
        self.clip, self.log_every, self.checkpoint_every = clip, log_every, checkpoint_every
        self.record = record
        self.callback, self.step_callback, self.on_event = callback, step_callback, on_event
        self.track = track
        self.loss = loss
        self.csv_fields: list[str] | None = None
        # alignment on the recurrent part: every algorithm has the exact readout gradient
        self.recurrent = [n for n, _ in model.named_parameters() if n not in ("W_out", "b_out")]
        self.data = make_generator(seed)
        self.streaming = bool(getattr(task, "streaming", False))
        self.stream_state = None
        self.history: list[dict[str, float]] = []
        self.pending = {"train_loss": 0.0, "steps": 0, "extra": {}}
        self.step = 0  # the last step done
        self.out: Path | None = None
        self.checkpoint_step: int | None = None
        self.compile_reported = False

    # -- checkpoints
    def _state(self) -> dict[str, Any]:
        task = self.task
        return {"format": _FORMAT, "config": self.record, "step": self.step,
                "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "data_rng": self.data.get_state(), "algorithm_rng": rng_state(self.algorithm),
                "stream_state": self.stream_state if self.streaming else None,
                "task_state": task.state_dict() if hasattr(task, "state_dict") else None,
                "history": self.history, "pending": self.pending}

    def start(self, out: Path | None, *, resume: bool) -> None:
        self.out = out
        path = out / CHECKPOINT if out is not None else None
        found = path is not None and path.exists()
        if found and not resume:
            raise CheckpointExists(f"{path} holds the checkpoint of an earlier run: resume it, "
                                   f"or delete it (or use another output directory) to start "
                                   f"afresh")
        if found:
            ck = load_checkpoint(path)
            diff = _differences(ck["config"], self.record)
            if diff:
                raise ConfigMismatch(f"{path} is from a different run ({'; '.join(diff[:4])}"
                                     f"{'; ...' if len(diff) > 4 else ''}): resume with the "
                                     f"same settings, or use another output directory")
            if ck["step"] > self.steps:
                raise ConfigMismatch(f"{path} is at step {ck['step']}, beyond the {self.steps} "
                                     f"steps asked for")
            self.model.load_state_dict(ck["model"])
            self.opt.load_state_dict(ck["optimizer"])
            self.data.set_state(ck["data_rng"])
            set_rng_state(self.algorithm, ck.get("algorithm_rng") or {})
            self.stream_state = ck.get("stream_state")
            if ck.get("task_state") is not None and hasattr(self.task, "load_state_dict"):
                self.task.load_state_dict(ck["task_state"])  # where the data stream had got to
            self.history = ck["history"]
            self.pending = ck["pending"]
            self.step = self.checkpoint_step = ck["step"]
            # the log may hold rows past the checkpoint (logged before the run was cut
            # off): keep exactly the checkpoint's, then append from there
            self._rewrite_log()
        if self.on_event is not None:
            self.on_event("start", {"step": self.step, "resumed": found,
                                    "checkpoint": str(path) if path is not None else None})

    def _save_checkpoint(self) -> None:
        path = self.out / CHECKPOINT
        atomic_write(path, torch_bytes(self._state()))
        self.checkpoint_step = self.step
        if self.on_event is not None:
            self.on_event("checkpoint", {"step": self.step, "path": str(path)})

    # -- the loop
    def _one_step(self, step: int) -> None:
        model, task, algorithm = self.model, self.task, self.algorithm
        p = model.W_out
        batch = task.batch(self.batch_size, generator=self.data).to(device=p.device,
                                                                    dtype=p.dtype)
        tracked = self.track is not None and step % self.track == 0
        if self.update_every is None:
            loss, grads = gradient(model, batch.inputs, batch.targets, algorithm=algorithm,
                                   loss=self.loss, mask=batch.mask)
            value = _check_loss(loss)
            if tracked:
                self._align(model, batch, grads, None)
            apply_update(model, self.opt, grads, self.clip, check=True)
        else:
            state = self.stream_state if self.streaming else None
            if state is None:
                state = algorithm.init(model, self.batch_size)
            # the reference sees the weights and hidden state the batch starts from
            before = (copy.deepcopy(model), getattr(state, "h", None) if self.streaming
                      else None) if tracked else None
            self.stream_state, loss, grads = online_pass(
                model, self.opt, algorithm, batch, state, self.loss, self.update_every,
                self.clip, check=True)
            value = _check_loss(loss)
            if tracked and grads:
                snapshot, h_start = before
                self._align(snapshot, batch, grads, h_start)
        self.pending["train_loss"] += value
        self.pending["steps"] += 1
        if self.step_callback is not None:
            got = self.step_callback(step, {"batch": batch, "grads": grads,
                                            "algorithm": algorithm})
            if got:
                self.pending["extra"].update(got)

    def _align(self, model, batch: Batch, grads, h0) -> None:
        with torch.no_grad():
            _, exact = gradient(model, batch.inputs, batch.targets, algorithm=bptt(),
                                loss=self.loss, mask=batch.mask, h0=h0)
            self.pending["extra"].update(alignment(grads, exact, params=self.recurrent)["all"])

    def run(self) -> TrainResult:
        t0 = time.perf_counter()
        done_since_t0 = 0
        for step in range(self.step + 1, self.steps + 1):
            try:
                self._one_step(step)
            except (NonFinite, _ALGORITHM_NONFINITE) as e:
                raise self._diverged(step, e) from None
            self.step = step
            done_since_t0 += 1
            info = self.algorithm.compiled
            if info is not None and not self.compile_reported and info.mode != "pending":
                self.compile_reported = True  # once: the first batch compiled the step
                if self.on_event is not None:
                    self.on_event("compiled", {"seconds": info.seconds, "mode": info.mode,
                                               "reason": info.reason, "graphs": info.graphs})
            tracked = self.track is not None and step % self.track == 0
            if step % self.log_every == 0 or step == self.steps or tracked:
                elapsed = time.perf_counter() - t0
                n = max(self.pending["steps"], 1)
                row = {"step": step, "train_loss": self.pending["train_loss"] / n,
                       **evaluate(self.model, self.task, loss=self.loss),
                       "steps_per_s": done_since_t0 / max(elapsed, 1e-9),
                       **self.pending["extra"]}
                self.history.append(row)
                self._log(row)
                self.pending = {"train_loss": 0.0, "steps": 0, "extra": {}}
                if self.callback is not None:
                    self.callback(step, row)
                t0, done_since_t0 = time.perf_counter(), 0
            if self.checkpoint_every is not None and (step % self.checkpoint_every == 0
                                                      or step == self.steps):
                self._save_checkpoint()

        final = evaluate(self.model, self.task, loss=self.loss)
        if self.out is not None:
            if self.csv_fields is None:  # nothing logged since a resume at the last step
                self._rewrite_log()
            atomic_write(self.out / "model.pt", torch_bytes(self.model.state_dict()))
            from .plots import plot_curve

            buf = io.BytesIO()
            plot_curve(self.history, buf, title=f"{self.task.name}, {self.algorithm.name}")
            atomic_write(self.out / "curve.png", buf.getvalue())
        return TrainResult(self.model, self.history, final)

    # -- the log, growing as the run goes
    def _rewrite_log(self) -> None:
        """metrics.csv from ``history``, whole (atomically)."""
        if self.out is None:
            return
        self.csv_fields = _fields(self.history, self.track)
        atomic_write(self.out / "metrics.csv", _metrics_csv(self.history, self.csv_fields))

    def _log(self, row: dict[str, float]) -> None:
        """Append ``row`` to metrics.csv and flush it; a row with a new column (a
        step_callback's) rewrites the file with the wider header."""
        if self.out is None:
            return
        if self.csv_fields is None or not set(row) <= set(self.csv_fields):
            self._rewrite_log()
            return
        with open(self.out / "metrics.csv", "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.csv_fields).writerow(row)
            f.flush()

    def _diverged(self, step: int, e: Exception) -> Diverged:
        kept = "nothing was saved"
        if self.out is not None:
            # the rows so far are in the log already; the weights are not worth keeping
            if self.checkpoint_step is not None:
                kept = (f"the checkpoint of step {self.checkpoint_step} is kept in "
                        f"{self.out / CHECKPOINT}")
            else:
                kept = "no checkpoint had been written"
            kept += " and model.pt was not written"
        return Diverged(f"training diverged at step {step}: {e}; {kept}. Try a smaller "
                        f"learning rate or gradient clipping", step=step,
                        checkpoint_step=self.checkpoint_step, history=self.history)


def online_pass(model, opt, algorithm: Algorithm, batch: Batch, state, loss: str,
                update_every: int | None, clip: float | None, *, check: bool = False
                ) -> tuple[Any, Tensor, dict]:
    """Step ``algorithm`` through one batch, applying the optimizer during it.

    Every ``update_every`` time steps (and at the end of the batch) the optimizer is
    applied with what the algorithm emitted since the last update; an algorithm that
    is not online (BPTT) is flushed there first, i.e. cut into chunks of
    ``update_every`` steps. ``update_every=None`` updates once, at the end.

    Args:
        state: the algorithm's state to start from (``algorithm.init(...)`` or the state
            carried from the previous batch of a stream).
        check: raise ``NonFinite`` at the first update whose loss or gradient is not
            finite, before applying it (see ``apply_update``).

    Returns:
        ``(state, loss, grads)``: the state after the batch, the batch's pinned loss,
        and the sum of the gradients applied (an empty dict if nothing was emitted).
    """
    T = batch.inputs.shape[0]
    total = pending = None
    value = batch.inputs.new_zeros(())

    def update(pending):
        if check:
            _check_loss(value)
        apply_update(model, opt, pending, clip, check=check)

    chunked = update_every is not None and algorithm.online
    if chunked:
        # chunks of update_every steps with the weights fixed: rnngrad.run (the trace rules
        # in closed form, the traces carried across; any other algorithm steps through)
        from .algorithms._chunk import run

        for s in range(0, T, update_every):
            e = min(s + update_every, T)
            state, out, g = run(algorithm, model, state, batch.inputs[s:e], batch.targets[s:e],
                                mask=batch.mask[s:e], loss=loss)
            value = value + out.loss
            pending = add_grads(pending, g)
            if e < T and pending is not None:
                update(pending)
                total, pending = add_grads(total, pending), None
    for t in range(0 if chunked else T):
        state, out, g = algorithm.step(model, state, batch.inputs[t], batch.targets[t],
                                       mask_t=batch.mask[t], loss=loss)
        value = value + out.loss
        pending = add_grads(pending, g)
        if update_every is not None and (t + 1) % update_every == 0 and t + 1 < T:
            if not algorithm.online:  # BPTT-like: emit what is stored, cut there
                state, g = algorithm.flush(model, state)
                pending = add_grads(pending, g)
            if pending is not None:
                update(pending)
                total, pending = add_grads(total, pending), None
    state, g = algorithm.flush(model, state)
    pending = add_grads(pending, g)
    if pending is not None:
        update(pending)
        total = add_grads(total, pending)
    return state, value, total if total is not None else {}


def _fields(history: list[dict[str, float]], track: int | None) -> list[str]:
    """metrics.csv's columns: every key of the rows, in order of appearance; the alignment
    columns from the start when alignment is tracked (not every row carries them)."""
    keys: list[str] = []
    for row in history:
        keys.extend(k for k in row if k not in keys)
    if track is not None:
        from .metrics import METRICS

        keys.extend(k for k in METRICS if k not in keys)
    return keys


def _metrics_csv(history: list[dict[str, float]], keys: list[str] | None = None) -> bytes:
    keys = _fields(history, None) if keys is None else keys
    f = io.StringIO(newline="")
    w = csv.DictWriter(f, fieldnames=keys)
    w.writeheader()
    for row in history:
        w.writerow(row)
    return f.getvalue().encode()
