"""One training run as a plain dict: what ``rnngrad train`` runs and what a sweep trial is.

    config = {"task": "digits", "algorithm": "rtrl", "hidden": 32, "lr": 1e-2, "seed": 0}
    result = rnngrad.runs.run(config, out="runs/x", checkpoint_every=100)

``DEFAULTS`` lists every key and its default; a configuration is JSON-serialisable, so it
is recorded in ``config.json`` and the checkpoints (``--resume`` compares it), travels to
Ray workers and fills a row of a sweep's table. ``make_task`` and ``make_model`` build
what it names: ``make_model`` is the one place a run's network is built (``rnngrad
train``, sweep trials, ``compare``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .readouts import LOSSES
from .registry import get_algorithm
from .train import OPTIMIZERS, TrainResult, _positive_int, train

__all__ = ["DEFAULTS", "DTYPES", "check_config", "check_cell", "check_device", "make_task",
           "make_model", "run", "log_every_for"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}

# One training run as a plain dict: what `rnngrad train` takes, what a sweep trial is.
# The command line's defaults are these, the same for train, compare and sweep.
DEFAULTS: dict[str, Any] = {
    # task
    "task": "digits", "seq_len": None, "stream": False,
    "task_kwargs": None,  # a dict for the task's constructor (neurogym env_kwargs, file layout)
    # model
    "cell": "elman", "layers": 1, "hidden": 32, "activation": "tanh", "alpha": 1.0,
    "init": "uniform", "dtype": "float32", "device": "cpu",
    # training (loss None: the one that follows the readout; log_every None: steps // 20)
    "algorithm": "bptt", "steps": 300, "lr": 1e-2, "optimizer": "adam", "batch_size": 16,
    "clip": 1.0, "update_every": None, "seed": 0, "log_every": None, "track_alignment": None,
    "loss": None,
    "compile": False,  # online (update_every set): the algorithm's step through rnngrad.compile
}


def log_every_for(steps: int, log_every: int | None = None) -> int:
    """``log_every``, or about 20 evaluations over ``steps`` when it is None."""
    return log_every if log_every is not None else max(1, steps // 20)


def check_device(name: str) -> torch.device:
    """The torch device ``name`` names, if a run can train on it here; a one-line
    ValueError otherwise (not a device, "meta", CUDA without CUDA, an index past the
    devices there are)."""
    if not isinstance(name, (str, torch.device)) or not str(name):
        raise ValueError(f"device must be a torch device name (cpu, cuda, cuda:1), got "
                         f"{name!r}")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"device {str(name)!r} is not a torch device (e.g. cpu, cuda, "
                         "cuda:1)") from None
    if dev.type == "meta":
        raise ValueError("device 'meta' holds shapes but no values: a run cannot train on it; "
                         "use cpu or cuda")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(name)!r} asked for CUDA, but torch "
                             f"{torch.__version__} sees no CUDA device here; use cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"device {str(name)!r}: there are {n} CUDA device(s) here "
                             f"(cuda:0 to cuda:{n - 1})")
        return dev
    if dev.type == "cpu":
        return dev
    try:
        torch.zeros(1, device=dev) + 1
    except Exception as e:  # backends report an absent device in many ways
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"device {str(name)!r} cannot be used here ({reason[:100]}); use cpu "
                         "or cuda") from None
    return dev


def check_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``DEFAULTS`` updated with ``config``, checked; unknown keys are an error."""
    if not isinstance(config, Mapping):
        raise TypeError(f"a run configuration is a dict, got {type(config).__name__}")
    unknown = sorted(set(config) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown configuration key(s) {', '.join(map(repr, unknown))}; "
                         f"known keys: {', '.join(DEFAULTS)}")
    cfg = {**DEFAULTS, **config}
    for k in ("hidden", "layers", "steps", "batch_size"):
        if not _positive_int(cfg[k]):
            raise ValueError(f"{k} must be a positive int, got {cfg[k]!r}")
    for k in ("seq_len", "update_every", "track_alignment", "log_every"):
        if cfg[k] is not None and not _positive_int(cfg[k]):
            raise ValueError(f"{k} must be a positive int or None, got {cfg[k]!r}")
    if not isinstance(cfg["seed"], int) or isinstance(cfg["seed"], bool) or cfg["seed"] < 0:
        raise ValueError(f"seed must be an int >= 0, got {cfg['seed']!r}")
    for k in ("lr", "alpha"):
        v = cfg[k]
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                and math.isfinite(v)):
            raise ValueError(f"{k} must be a positive number, got {v!r}")
    c = cfg["clip"]
    if c is not None and not (isinstance(c, (int, float)) and c > 0 and math.isfinite(c)):
        raise ValueError(f"clip must be a positive number or None (no clipping), got {c!r}")
    if cfg["dtype"] not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {cfg['dtype']!r}")
    if cfg["optimizer"] not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg['optimizer']!r}; known optimizers: "
                         f"{', '.join(OPTIMIZERS)}")
    if not isinstance(cfg["stream"], bool):
        raise ValueError(f"stream must be True or False, got {cfg['stream']!r}")
    if not isinstance(cfg["compile"], bool):
        raise ValueError(f"compile must be True or False, got {cfg['compile']!r}")
    if cfg["compile"] and cfg["update_every"] is None:
        raise ValueError("compile compiles the online step: it needs update_every (online "
                         "learning); per-sequence training runs the whole-sequence path")
    for k in ("task", "cell", "activation", "init", "device", "algorithm"):
        if not isinstance(cfg[k], str) or not cfg[k]:
            raise ValueError(f"{k} must be a non-empty string, got {cfg[k]!r}")
    if cfg["loss"] is not None and cfg["loss"] not in LOSSES:
        raise ValueError(f"unknown loss {cfg['loss']!r}; known losses: {', '.join(LOSSES)}")
    check_device(cfg["device"])
    if cfg["task_kwargs"] is not None and not isinstance(cfg["task_kwargs"], Mapping):
        raise ValueError(f"task_kwargs must be a dict or None, got {cfg['task_kwargs']!r}")
    from .tasks import check_task_name

    check_task_name(cfg["task"])
    check_cell(cfg["cell"])
    get_algorithm(cfg["algorithm"])  # an unknown name fails here, not in the middle of a sweep
    return cfg


def check_cell(name: str) -> str:
    """``name`` if it names a cell ``make_model`` can build (a name of
    ``rnngrad.registry.CELLS`` or a user's ``module:Class``); a ValueError otherwise."""
    from .registry import get_cell

    get_cell(name)
    return name


def make_task(config: Mapping[str, Any]):
    """The task a configuration names (``task``, ``seq_len``, ``stream``, ``task_kwargs``)."""
    import inspect

    from .tasks import TASKS, get_task

    kw: dict[str, Any] = dict(config.get("task_kwargs") or {})
    if config.get("seq_len") is not None:
        cls = TASKS.get(config["task"])
        if cls is not None and "seq_len" not in inspect.signature(cls).parameters:
            fixed = getattr(cls, "seq_len", None)
            length = f" (its sequences are {fixed} steps)" if isinstance(fixed, int) else ""
            takes = [n for n, c in TASKS.items() if "seq_len" in inspect.signature(c).parameters]
            raise ValueError(f"seq_len: task {config['task']!r} has no length to set{length}; "
                             f"the tasks that take one: {', '.join(takes)}")
        kw["seq_len"] = config["seq_len"]
    if config.get("stream"):
        if config["task"] != "stream_add":
            raise ValueError(f"stream needs a streaming task (stream_add), got "
                             f"{config['task']!r}")
        kw["streaming"] = True
    return get_task(config["task"], **kw)


def make_model(config: Mapping[str, Any], task) -> nn.Module:
    """The network of a training run: the cell, sizes and initialisation ``config`` names,
    the input and output sizes and the readout from ``task``; its initial weights are
    drawn from ``config["seed"]`` (the global torch generator is left as it was).

    This is the one place a run's model is built (``rnngrad train``, sweep trials, compare).
    """
    from .registry import build_network

    cell = check_cell(config.get("cell", "elman"))
    dtype = config.get("dtype", "float32")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    device = torch.device(config.get("device", "cpu"))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.get("seed", 0))
        # one Elman layer is rnngrad.RNN (the fast paths); anything else a Network
        return build_network(cell, task.input_size, config["hidden"], task.output_size,
                             layers=config.get("layers", 1), readout=task.readout,
                             activation=config.get("activation", "tanh"),
                             alpha=config.get("alpha", 1.0), init=config.get("init", "uniform"),
                             dtype=DTYPES[dtype], device=device)


def run(
    config: Mapping[str, Any],
    *,
    out: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    on_event: Callable[[str, dict[str, Any]], None] | None = None,
) -> TrainResult:
    """One training run from a configuration dict (keys of ``DEFAULTS``).

    Builds the task, the algorithm (``rnngrad.registry`` name, e.g. ``"tbptt:10"``) and the
    model (``make_model``), then ``train``s, recording ``config`` in ``config.json`` and
    the checkpoints. ``track_alignment=N`` logs the cosine, sign agreement and norm ratio
    of the gradient used against exact BPTT's on the recurrent parameters every N steps.
    ``resume`` / ``overwrite``: what to do with an earlier run in ``out`` (see ``train``).
    """
    cfg = check_config(config)
    task = make_task(cfg)
    algorithm = get_algorithm(cfg["algorithm"])
    model = make_model(cfg, task)
    return train(model, task, algorithm=algorithm, steps=cfg["steps"], lr=cfg["lr"],
                 optimizer=cfg["optimizer"], batch_size=cfg["batch_size"], seed=cfg["seed"],
                 update_every=cfg["update_every"], clip=cfg["clip"],
                 log_every=log_every_for(cfg["steps"], cfg["log_every"]), loss=cfg["loss"],
                 out=out, checkpoint_every=checkpoint_every, resume=resume,
                 overwrite=overwrite, config=cfg,
                 track_alignment=cfg["track_alignment"], callback=callback, on_event=on_event,
                 compile=cfg["compile"])
