"""Sweeps of training runs on Ray Tune: grids, random search, early stopping, one table.

    space = {"algorithm": ["bptt", "eprop"], "lr": "loguniform:1e-3:1e-1", "seed": [0]}
    df = sweep({"task": "digits", "steps": 200, "hidden": 16}, space, out="runs/sweep",
               samples=4, scheduler="asha", metric="test_loss_per_step")
    df = rnngrad.sweep.load("runs/sweep")      # the same table, as a pandas DataFrame

Each trial is ``rnngrad.runs.run(config)``, the function ``rnngrad train`` runs, on the
base configuration with the trial's values, as a trial of a ``ray.tune.Tuner`` (one CPU
and one torch thread each): by default on an embedded local Ray started with
``num_cpus=workers``; with ``address``, on a running cluster (reached within
``connect_timeout`` seconds, or ``ClusterUnreachable``).

The search space, axis by axis (``AXES``): a list is a grid (``tune.grid_search``); for
the numeric axes ``lr`` and ``hidden`` a string draws values: ``"loguniform:A:B"``,
``"uniform:A:B"`` (integers in [A, B] for ``hidden``) or ``"choice:A,B,C"``
(``tune.loguniform``, ``tune.uniform``, ``tune.choice``; ``parse_axis`` reads them).
Tune takes the product of the grids and draws ``samples`` values of the random axes for
each point of it, from ``search_seed`` (the same draws every time).

Trials report their logged metrics at every logged step (``tune.report``, with ``step``
the training step), so that ``scheduler="asha"`` (Tune's ``ASHAScheduler``, Li et al.
2020) stops the trials whose ``metric`` trails at a rung: rungs at ``grace_period`` x
``reduction_factor`` ** k training steps, below ``steps``.

A trial ends with a status: "ok" (trained every step), "stopped" (stopped early by the
scheduler; its metrics are those of its last report), "diverged" (a non-finite loss or
gradient; no metrics), "error" (it raised: its one-line error in the table, Tune's
traceback in its directory's ``error.txt``). None stops the others.

Everything is written under ``out``, which is Tune's experiment directory
(``Tuner.restore(out)`` works on it): ``sweep.json`` (the sweep's settings), Tune's
state, one directory per trial (Tune's ``result.json`` and ``progress.csv`` of the
reported rows, and the run's ``config.json``, ``metrics.csv``, ``model.pt``,
``curve.png``), and ``sweep.csv`` (one row per trial: the values swept, the training
steps it ran, its last metrics, wall time, status, error, then the rest of its
configuration), ``learning_curves.png`` and, with ``track_alignment``,
``alignment.png``. A directory that holds a sweep is never overwritten: ``resume=True``
continues it through ``Tuner.restore`` (trials that did not finish run again, failed
ones from the start, the others are kept), anything else is refused (``SweepExists``),
before anything is written.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .outdir import LOCK_NAME, OutputDir, atomic_write
from .runs import check_config, make_task

__all__ = ["sweep", "load", "parse_axis", "AXES", "SEARCH_KINDS", "SCHEDULERS", "RAY_PIN",
           "RayMissing", "SweepExists", "ClusterUnreachable"]

AXES = ("algorithm", "cell", "hidden", "lr", "seed")  # the searched axes, in table order
NUMERIC = {"hidden": int, "lr": float}  # the axes that also take a distribution
SEARCH_KINDS = ("loguniform", "uniform", "choice")
SCHEDULERS = ("fifo", "asha")
RAY_PIN = "ray[tune]==2.60.0"
SPEC_NAME = "sweep.json"
TABLE_NAME = "sweep.csv"
# metrics every trial reports; "min" or "max" is better
METRIC_MODES = {"test_loss": "min", "test_loss_per_step": "min", "train_loss": "min",
                "test_acc": "max", "test_mse": "min"}
_STATUS_ORDER = ("ok", "stopped", "diverged", "error")


class RayMissing(ImportError):
    """Ray Tune is not installed."""

    def __init__(self, what: str = "Ray Tune") -> None:
        super().__init__(f"the sweep runs on {what}, which is not installed: pip install "
                         f"'rnngrad[ray]' (or pip install '{RAY_PIN}')")


class SweepExists(ValueError):
    """The output directory holds a sweep (or anything else) and was not asked to resume."""


class ClusterUnreachable(ConnectionError):
    """Nothing answered at the Ray cluster's address within the connection timeout."""


# ---------------------------------------------------------------------------- the space


def parse_axis(text: str, kind: type = float) -> dict[str, list]:
    """One axis of the search space from its command-line form.

    ``"1e-2,3e-2"`` is a grid, ``{"grid": [0.01, 0.03]}``; ``"loguniform:1e-4:1e-1"``,
    ``"uniform:A:B"`` and ``"choice:A,B,C"`` draw values: ``{"loguniform": [1e-4, 0.1]}``.
    ``kind`` (``float`` or ``int``) is the type of the values. Raises ``ValueError``
    naming what was given and the forms expected.
    """
    if not isinstance(text, str):
        raise ValueError(f"a search-space axis is a string, got {text!r}")
    forms = (f"a comma-separated list of {kind.__name__}s (a grid), loguniform:LOW:HIGH, "
             f"uniform:LOW:HIGH or choice:A,B,...")
    head, sep, rest = text.partition(":")
    name = head.strip().lower()
    if not sep:
        return {"grid": _numbers(text, kind, forms)}
    if name not in SEARCH_KINDS:
        raise ValueError(f"unknown search space {head!r} in {text!r}; expected {forms}")
    if name == "choice":
        return {"choice": _numbers(rest, kind, forms, what=text)}
    bounds = rest.split(":")
    if len(bounds) != 2:
        raise ValueError(f"{text!r}: {name} takes two bounds, {name}:LOW:HIGH")
    low, high = (_number(b, kind, text, forms) for b in bounds)
    if not low < high:
        raise ValueError(f"{text!r}: the bounds must be LOW < HIGH, got {low} and {high}")
    if name == "loguniform" and low <= 0:
        raise ValueError(f"{text!r}: loguniform needs positive bounds, got {low}")
    return {name: [low, high]}


def _number(s: str, kind: type, text: str, forms: str):
    try:
        v = kind(s.strip())
    except ValueError:
        raise ValueError(f"{s.strip()!r} in {text!r} is not a {kind.__name__}; expected "
                         f"{forms}") from None
    if kind is float and not math.isfinite(v):
        raise ValueError(f"{text!r}: {s.strip()} is not a finite number")
    return v


def _numbers(s: str, kind: type, forms: str, *, what: str | None = None) -> list:
    what = s if what is None else what
    values = [_number(v, kind, what, forms) for v in s.split(",") if v.strip()]
    if not values:
        raise ValueError(f"{what!r} holds no value; expected {forms}")
    if len(set(values)) != len(values):
        raise ValueError(f"{what!r} repeats a value")
    return values


def _axis(name: str, value: Any) -> dict[str, list]:
    """An axis of ``space`` as {kind: values}: a list is a grid, a string is parsed."""
    if name not in AXES:
        raise ValueError(f"the search space has an unknown axis {name!r}; axes: "
                         f"{', '.join(AXES)}")
    if isinstance(value, str) and name in NUMERIC:
        return parse_axis(value, NUMERIC[name])
    if isinstance(value, Mapping) and len(value) == 1:
        kind, values = next(iter(value.items()))
        if kind in ("grid", *SEARCH_KINDS) and name in NUMERIC or kind in ("grid", "choice"):
            return {kind: list(values)}
    if isinstance(value, (list, tuple, range)):
        values = list(value)
        if not values:
            raise ValueError(f"the {name!r} axis is empty: give at least one value")
        if len(set(map(repr, values))) != len(values):
            raise ValueError(f"the {name!r} axis repeats a value: {values}")
        return {"grid": values}
    drawn = ("a list (a grid), or loguniform:LOW:HIGH, uniform:LOW:HIGH, choice:A,B"
             if name in NUMERIC else "a list (a grid)")
    raise ValueError(f"the {name!r} axis must be {drawn}, got {value!r}")


def _probe_values(axis: dict[str, list]) -> list:
    """Values that stand for an axis when its configurations are checked: every value
    of a grid or a choice, the bounds of a range."""
    return next(iter(axis.values()))


def _grid_size(space: dict[str, dict]) -> int:
    return math.prod(len(a["grid"]) for a in space.values() if "grid" in a)


# ----------------------------------------------------------------------- the settings


def _settings(base: Mapping[str, Any], space: Mapping[str, Any], *, samples: int,
              scheduler: str | None, metric: str | None, mode: str | None,
              grace_period: int | None, reduction_factor: int, search_seed: int) -> dict:
    """Every argument checked and made explicit: what ``sweep.json`` records."""
    if not isinstance(space, Mapping):
        raise TypeError(f"space is a dict axis -> values, got {type(space).__name__}")
    axes = {name: _axis(name, value) for name, value in space.items()}
    cfg = check_config({k: v for k, v in base.items()})
    for name in AXES:  # an axis left out of the space takes the base's value
        axes.setdefault(name, {"grid": [cfg[name]]})
    axes = {name: axes[name] for name in AXES}
    for name, axis in axes.items():  # every value checked before any trial runs
        for v in _probe_values(axis):
            check_config({**cfg, name: v})
    fixed = {k: v for k, v in cfg.items() if k not in AXES}
    random_axes = [n for n, a in axes.items() if "grid" not in a]
    if not (isinstance(samples, int) and not isinstance(samples, bool) and samples >= 1):
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    if samples > 1 and not random_axes:
        raise ValueError(f"samples={samples} draws values of a random axis, but every axis "
                         f"is a grid: give one as loguniform:, uniform: or choice:")
    if not isinstance(search_seed, int) or isinstance(search_seed, bool) or search_seed < 0:
        raise ValueError(f"search_seed must be an int >= 0, got {search_seed!r}")
    scheduler = "fifo" if scheduler is None else scheduler
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; schedulers: {', '.join(SCHEDULERS)}")
    task = make_task(cfg)
    logged = [m for m in METRIC_MODES
              if m != ("test_mse" if task.classification else "test_acc")]
    if metric is None:
        if scheduler == "asha":
            raise ValueError(f"the asha scheduler stops trials by a metric, and none was "
                             f"given: name one of {', '.join(logged)}")
        if mode is not None:
            raise ValueError(f"mode={mode!r} needs a metric: name one of {', '.join(logged)}")
    elif metric not in logged:
        raise ValueError(f"unknown metric {metric!r} for task {cfg['task']!r}; its trials "
                         f"report {', '.join(logged)}")
    else:
        mode = METRIC_MODES[metric] if mode is None else mode
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    sched: dict[str, Any] = {"name": scheduler}
    if scheduler == "asha":
        steps = cfg["steps"]
        grace = cfg["log_every"] if grace_period is None else grace_period
        if not (isinstance(grace, int) and not isinstance(grace, bool) and 1 <= grace < steps):
            raise ValueError(f"grace_period must be an int in [1, steps = {steps}), got "
                             f"{grace!r}")
        if not (isinstance(reduction_factor, int) and not isinstance(reduction_factor, bool)
                and reduction_factor >= 2):
            raise ValueError(f"reduction_factor must be an int >= 2, got {reduction_factor!r}")
        rungs = []
        while grace * reduction_factor ** len(rungs) < steps:
            rungs.append(grace * reduction_factor ** len(rungs))
        sched.update(time_attr="step", max_t=steps, grace_period=grace,
                     reduction_factor=reduction_factor, rungs=rungs)
    return {"base": fixed, "space": axes, "samples": samples, "search_seed": search_seed,
            "metric": metric, "mode": mode if metric is not None else None, "scheduler": sched,
            "trials": _grid_size(axes) * samples}


def _check_out(out: Path, settings: dict, resume: bool) -> bool:
    """Refuse a directory that would be overwritten, or a resume of another sweep; True
    if there is a sweep to continue (``resume`` with none starts one, as ``rnngrad train
    --resume`` does without a checkpoint)."""
    spec = out / SPEC_NAME
    if out.exists() and not out.is_dir():
        raise SweepExists(f"{out} is a file, not a directory: give another --out")
    if not resume or not spec.exists():
        if spec.exists():
            table = out / TABLE_NAME
            done = (f"a finished sweep ({table.name} holds its table)" if table.exists()
                    else "an unfinished sweep")
            raise SweepExists(f"{out} already holds {done}: continue it with --resume, or "
                              f"give another --out; it is never overwritten")
        if out.is_dir():
            held = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME)
            if held:
                shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
                raise SweepExists(f"{out} is not empty (it holds {shown}) and holds no "
                                  f"sweep: give a new or empty --out; nothing there is "
                                  f"overwritten")
        return False
    try:
        before = json.loads(spec.read_text())
    except (OSError, ValueError) as e:
        raise SweepExists(f"--resume: {spec} cannot be read ({e})") from None
    now = json.loads(json.dumps(settings))
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if changed:
        details = []
        for k in changed:
            if isinstance(now.get(k), dict) and isinstance(before.get(k), dict):
                sub = sorted(s for s in set(now[k]) | set(before[k])
                             if now[k].get(s) != before[k].get(s))
                details.extend(f"{k}.{s}" for s in sub)
            else:
                details.append(k)
        raise SweepExists(f"--resume continues the same sweep, but {out} holds one with "
                          f"other settings ({', '.join(details)} differ): run the same "
                          f"command with --resume, or give another --out")
    return True


# ------------------------------------------------------------------------------- Ray


def _import_tune():
    """Ray, once Ray Tune is known to be importable (else ``RayMissing``)."""
    try:
        import ray
    except ImportError:
        raise RayMissing("Ray") from None
    try:
        from ray import tune  # noqa: F401
    except ImportError:  # Ray without its [tune] dependencies (pandas, pyarrow, ...)
        raise RayMissing() from None
    return ray


def _split_address(address: str) -> tuple[str, int]:
    """``host:port`` of a Ray address (``ray://host:port`` for Ray Client, 10001 by
    default; ``host:port`` for the head's GCS, 6379 by default)."""
    client = address.startswith("ray://")
    rest = address[len("ray://"):] if client else address
    host, sep, port = rest.rpartition(":")
    if not sep:
        host, port = rest, ("10001" if client else "6379")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address {address!r} is not a Ray address: expected auto, "
                         f"HOST:PORT or ray://HOST:PORT")
    return host, int(port)


# ----------------------------------------------------------------------- one trial


def _plain(value: Any) -> Any:
    """A NumPy scalar (what Tune's samplers draw) as the Python number it holds."""
    return value.item() if hasattr(value, "item") and not isinstance(value, str) else value


def run_trial(config: Mapping[str, Any], out: str | Path | None,
              report: Callable[[dict[str, Any]], None], *,
              checkpoint_every: int | None = None) -> str:
    """One trial: ``rnngrad.runs.run(config)`` in ``out``, each logged row passed to
    ``report`` (``tune.report`` in a sweep) with ``status`` "running", the last one with
    "ok"; a run that diverges reports its step with status "diverged" and NaN metrics.
    Resumes from a checkpoint an earlier attempt left in ``out``. Returns the status;
    any other error is raised (Tune records the trial as failed)."""
    import torch

    from .runs import run
    from .train import Diverged

    torch.set_num_threads(1)
    config = {k: _plain(v) for k, v in config.items()}
    last: dict[str, Any] = {}

    def logged(step: int, row: dict) -> None:
        if step == config["steps"]:  # the final row is reported once the run is saved
            last.update(row)
        else:
            report({**row, "status": "running", "error": ""})

    try:
        run(config, out=out, resume=True, checkpoint_every=checkpoint_every, callback=logged)
    except Diverged as e:
        nan = float("nan")
        report({"step": e.step, **{m: nan for m in METRIC_MODES}, "status": "diverged",
                "error": " ".join(str(e).split())})
        return "diverged"
    report({**last, "status": "ok", "error": ""})
    return "ok"


# ------------------------------------------------------------------------- the sweep


def sweep(
    base: Mapping[str, Any],
    space: Mapping[str, Any],
    *,
    out: str | Path,
    samples: int = 1,
    scheduler: str | None = None,
    metric: str | None = None,
    mode: str | None = None,
    grace_period: int | None = None,
    reduction_factor: int = 3,
    search_seed: int = 0,
    workers: int = 2,
    address: str | None = None,
    connect_timeout: float = 30.0,
    resume: bool = False,
    checkpoint_every: int | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    on_start: Callable[[dict[str, Any]], None] | None = None,
):
    """Run the trials of ``space`` on ``base`` with Ray Tune; write the table and plots
    to ``out``; return the table as a pandas DataFrame (what ``load(out)`` reads).

    Args:
        base: the configuration every trial shares (keys of ``rnngrad.runs.DEFAULTS``).
        space: axis (of ``AXES``) -> a list of values (a grid), or for ``lr`` and
            ``hidden`` a distribution ``"loguniform:A:B"``, ``"uniform:A:B"``,
            ``"choice:A,B,..."`` (see ``parse_axis``). Axes left out take ``base``'s value.
        out: the sweep's directory, Tune's experiment directory (locked while it runs).
        samples: values drawn of the random axes for each point of the grid.
        scheduler: None or "fifo" (every trial runs all its steps), or "asha" (Tune's
            ``ASHAScheduler`` on the training step: stops the trials trailing by ``metric``).
        metric: the metric a trial is judged by: test_loss_per_step, test_loss, train_loss,
            and test_acc (classification) or test_mse (regression); needed by "asha".
        mode: "min" or "max" (default: "max" for test_acc, "min" for the others).
        grace_period: steps before ASHA's first rung (default: base's ``log_every``).
        reduction_factor: ASHA keeps 1 in ``reduction_factor`` trials at each rung.
        search_seed: seed of the random draws (the same seed draws the same values).
        workers: CPUs of the embedded local Ray (one trial per CPU at a time).
        address: a running Ray cluster ("auto", "HOST:6379", "ray://HOST:10001"); then
            ``workers`` is not used, the cluster's CPUs are.
        connect_timeout: seconds to wait for ``address`` to answer (``ClusterUnreachable``).
        resume: continue the sweep recorded in ``out`` (the same settings), with
            ``Tuner.restore``: finished trials are kept, the others run (with none
            recorded, start it). Without it, a directory that holds a sweep or anything
            else is refused (``SweepExists``).
        checkpoint_every: each trial checkpoints every so many steps, so that a trial
            cut off (a lost node, Ctrl-C) resumes from there.
        progress: called with each finished trial's row.
        on_start: called once with {"trials", "to_run", "finished", "resumed"} before
            trials start.

    Raises ``KeyboardInterrupt`` when interrupted (Tune has saved the state: resume it).
    """
    settings = _settings(base, space, samples=samples, scheduler=scheduler, metric=metric,
                         mode=mode, grace_period=grace_period,
                         reduction_factor=reduction_factor, search_seed=search_seed)
    if address is None and not (isinstance(workers, int) and not isinstance(workers, bool)
                                and workers >= 1):
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    if address is not None:
        if not isinstance(address, str) or not address:
            raise ValueError(f"address must be a non-empty string, got {address!r}")
        if address != "auto":
            _split_address(address)
    if not (isinstance(connect_timeout, (int, float)) and connect_timeout > 0
            and math.isfinite(connect_timeout)):
        raise ValueError(f"connect_timeout must be a positive number of seconds, got "
                         f"{connect_timeout!r}")
    if checkpoint_every is not None and not (isinstance(checkpoint_every, int)
                                             and checkpoint_every >= 1):
        raise ValueError(f"checkpoint_every must be a positive int or None, got "
                         f"{checkpoint_every!r}")
    out = Path(out)
    resume = _check_out(out, settings, resume)
    ray = _import_tune()
    from . import _tune

    with _tune.quiet():
        finished = _tune.finished_trials(out) if resume else None
    # a resumed sweep whose trials all finished only rebuilds its table: no Ray needed
    rerun = finished is None or len(finished) < settings["trials"]
    started = rerun and _tune.connect(workers=workers, address=address,
                                      timeout=connect_timeout)
    try:
        with OutputDir(out) as d:
            if _check_out(d.path, settings, resume) != resume:  # again, now that it is ours
                raise SweepExists(f"{out} changed while the sweep was starting: run it again")
            path = d.path.resolve()
            atomic_write(path / SPEC_NAME, json.dumps(settings, indent=2).encode())
            results = _tune.fit(path, settings, restore=finished is not None, rerun=rerun,
                                checkpoint_every=checkpoint_every, progress=progress,
                                on_start=on_start)
            _tune.write_table(path, settings, results)
    finally:
        if started:
            ray.shutdown()
    return load(out)


def load(path: str | Path):
    """A sweep's table as a pandas DataFrame: one row per trial, the columns of
    ``sweep.csv`` (trial, the axes, steps_done, the final metrics, wall_s, status, error,
    then the rest of the configuration). ``path``: the sweep's directory or its CSV."""
    try:
        import pandas as pd
    except ImportError:
        raise RayMissing("Ray Tune (pandas)") from None
    path = Path(path)
    table = path / TABLE_NAME if path.is_dir() else path
    if not table.is_file():
        raise FileNotFoundError(f"no sweep table at {table}: give a sweep's directory (it "
                                f"holds {TABLE_NAME} once the sweep has finished)")
    df = pd.read_csv(table, dtype={"trial": str, "algorithm": str, "cell": str,
                                   "status": str, "error": str})
    if "error" in df:
        df["error"] = df["error"].fillna("")
    return df
