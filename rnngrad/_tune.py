"""The Ray Tune side of ``rnngrad.sweep``: reaching Ray, the trainable, running or
restoring the ``Tuner``, and its results as the sweep's table and plots.

Imported only once Ray Tune is known to be installed (``rnngrad.sweep`` checks); every
argument has been checked there.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import ray
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from .outdir import atomic_write
from .sweep import AXES, NUMERIC, TABLE_NAME, ClusterUnreachable, _plain, _split_address, run_trial


def _wait_for_cluster(address: str, timeout: float) -> None:
    """Connect to the cluster's port until it answers or ``timeout`` seconds pass: Ray's
    own ``ray.init`` retries an unreachable address for minutes, printing as it goes."""
    target = address
    if address == "auto":
        try:
            from ray._private.services import canonicalize_bootstrap_address
        except ImportError:  # another Ray: let ray.init find the cluster
            return
        try:
            target = canonicalize_bootstrap_address("auto")
        except ConnectionError:
            target = None
        if target is None:
            raise ClusterUnreachable("address 'auto': no running Ray cluster found on this "
                                     "machine; start one with `ray start --head`, or leave "
                                     "--address out for a local Ray")
    host, port = _split_address(target)
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            socket.create_connection((host, port), timeout=max(left, 0.05)).close()
            return
        except OSError as e:
            reason = e.strerror or type(e).__name__
        left = deadline - time.monotonic()
        if left <= 0:
            raise ClusterUnreachable(
                f"no Ray cluster answered at {address} ({host}:{port}) within {timeout:g} s "
                f"({reason}); check the address and that `ray start` runs there, or leave "
                f"--address out for a local Ray")
        time.sleep(min(0.2, left))


def connect(*, workers: int, address: str | None, timeout: float) -> bool:
    """Start the embedded Ray or join ``address``; True if this call started it."""
    if ray.is_initialized():
        return False
    opts = {"include_dashboard": False, "log_to_driver": False,
            "logging_level": logging.ERROR, "configure_logging": True}
    if address is None:
        # a small object store: trials send back a few KiB each
        ray.init(num_cpus=workers, object_store_memory=128 * 1024 ** 2, **opts)
    else:
        _wait_for_cluster(address, timeout)
        ray.init(address=address, **opts)
    return True


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore them."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def quiet(*names: str) -> Iterator[None]:
    """Silence Ray's loggers (``names``, by default Tune's) for the block: Tune logs each
    failed trial's traceback, which the table and the trial's error.txt already hold."""
    loggers = [logging.getLogger(n) for n in names or ("ray.tune", "ray.air", "ray.train")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _trainable(config: dict, experiment: str = "", checkpoint_every: int | None = None) -> None:
    # the trial's directory under the sweep's (Tune's own get_trial_dir() points to a
    # staging copy for an actor reused from an earlier trial)
    out = Path(experiment) / _dirname(config, tune.get_context().get_trial_id())
    out.mkdir(parents=True, exist_ok=True)
    run_trial(config, out, tune.report, checkpoint_every=checkpoint_every)


def _dirname(config: Mapping[str, Any], trial_id: str) -> str:
    """A trial's directory: its values, readable, then Tune's trial id."""
    c = {k: _plain(v) for k, v in config.items()}
    alg = str(c["algorithm"]).replace(":", "")
    cell = str(c["cell"]).replace(":", ".")
    return f"{cell}-{alg}-h{c['hidden']}-lr{c['lr']:.3g}-s{c['seed']}-{trial_id}"


def _trial_dirname(trial) -> str:
    return _dirname(trial.config, trial.trial_id)


_PROGRESS: dict[str, Callable | None] = {"fn": None}  # the running sweep's progress callback


class Progress(tune.Callback):
    """Hands each finished trial's row to the running sweep's ``progress``, looked up
    when called: Tune pickles its callbacks with the experiment, and a restored sweep
    brings its own ``progress``."""

    def _send(self, trial, error) -> None:
        fn = _PROGRESS["fn"]
        if fn is not None:
            fn(_row(trial.config, trial.last_result or {}, error, _trial_dirname(trial)))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._send(trial, None)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._send(trial, trial.get_error() or "error")


def finished_trials(out: Path) -> list | None:
    """The trials of the Tune experiment in ``out`` that finished (None: no experiment
    to restore, e.g. a sweep cut off before Tune first saved its state)."""
    if not tune.Tuner.can_restore(str(out.resolve())):
        return None
    return [t for t in tune.ExperimentAnalysis(str(out.resolve())).trials
            if t.status == "TERMINATED"]


def _tune_space(settings: dict) -> dict:
    """The ``param_space`` of the Tuner: the base configuration, and each axis as a
    grid or a distribution (integers for ``hidden``, inclusive bounds)."""
    space: dict[str, Any] = dict(settings["base"])
    for name, axis in settings["space"].items():
        (kind, values), = axis.items()
        integer = NUMERIC.get(name) is int
        if kind == "grid":
            space[name] = values[0] if len(values) == 1 else tune.grid_search(values)
        elif kind == "choice":
            space[name] = tune.choice(values)
        elif kind == "uniform":
            space[name] = (tune.randint(values[0], values[1] + 1) if integer
                           else tune.uniform(*values))
        else:
            space[name] = (tune.lograndint(values[0], values[1] + 1) if integer
                           else tune.loguniform(*values))
    return space


def fit(path: Path, settings: dict, *, restore: bool, rerun: bool, checkpoint_every,
        progress, on_start) -> list[tuple[dict, dict, Any, str, list[dict]]]:
    """Run (or restore and continue) the Tune experiment in ``path``; its trials'
    (config, last metrics, error, directory name, reported rows)."""
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, experiment=str(path),
                             checkpoint_every=checkpoint_every), {"cpu": 1})
    total = settings["trials"]
    # Tune's console output off (the CLI prints), and its loggers: JSON and CSV, no TensorBoard
    env = _environ(RAY_AIR_NEW_OUTPUT="0", TUNE_DISABLE_AUTO_CALLBACK_LOGGERS="1")
    with env, quiet():
        if restore:
            finished = len(finished_trials(path) or [])
            tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True,
                                       resume_errored=False, restart_errored=True)
        else:
            finished = 0
            sched = settings["scheduler"]
            scheduler = None
            if sched["name"] == "asha":
                scheduler = ASHAScheduler(time_attr="step", max_t=sched["max_t"],
                                          grace_period=sched["grace_period"],
                                          reduction_factor=sched["reduction_factor"])
            tuner = tune.Tuner(
                trainable, param_space=_tune_space(settings),
                tune_config=tune.TuneConfig(
                    metric=settings["metric"], mode=settings["mode"],
                    num_samples=settings["samples"], scheduler=scheduler,
                    search_alg=BasicVariantGenerator(random_state=settings["search_seed"]),
                    reuse_actors=True, trial_dirname_creator=_trial_dirname),
                run_config=tune.RunConfig(
                    name=path.name, storage_path=str(path.parent), verbose=0,
                    callbacks=[JsonLoggerCallback(), CSVLoggerCallback(), Progress()]))
        if on_start is not None:
            on_start({"trials": total, "to_run": total - finished, "finished": finished,
                      "resumed": restore})
        if rerun:
            _PROGRESS["fn"] = progress
            try:
                grid = tuner.fit()
            finally:
                _PROGRESS["fn"] = None
        else:
            grid = tune.ResultGrid(tune.ExperimentAnalysis(str(path)))
        # the state Tune saved: on Ctrl-C it saves the trials as they were, then ends the
        # unfinished ones (and returns as if done)
        saved = tune.ExperimentAnalysis(str(path)).trials
        if len(saved) < total or any(t.status not in ("TERMINATED", "ERROR") for t in saved):
            raise KeyboardInterrupt(f"the sweep in {path} was interrupted")
        trials = list(grid._experiment_analysis.trials)
        results = []
        for trial, result in zip(trials, grid):
            frame = result.metrics_dataframe
            history = [] if frame is None else frame.to_dict("records")
            results.append((trial.config, result.metrics or {}, result.error,
                            _trial_dirname(trial), history))
    return results


def _one_line(error: Any) -> str:
    """A trial's error as one line: the exception it raised and its message (from the
    exception Tune hands back, whose ``cause`` is the trial's own, or from the text of
    the trial's ``error.txt``, whose last line names it)."""
    if isinstance(error, str):
        lines = [ln.strip() for ln in error.strip().splitlines() if ln.strip()]
        return (lines[-1] if lines else "error")[:500]
    cause = getattr(error, "cause", None) or error
    text = " ".join(str(cause).split())
    return (f"{type(cause).__name__}: {text}" if text else type(cause).__name__)[:500]


def _row(config: Mapping, metrics: Mapping, error: Any, name: str) -> dict[str, Any]:
    """A row of the table: a trial's values, steps trained, last metrics, status, error,
    then the rest of its configuration."""
    cfg = {k: _plain(v) for k, v in config.items()}
    row: dict[str, Any] = {"trial": name}
    row.update({a: cfg[a] for a in AXES})
    step = _plain(metrics.get("step"))
    row["steps_done"] = int(step) if isinstance(step, (int, float)) and step == step else 0
    reported = metrics.get("status")
    if error is not None:
        status = "error"
    elif reported in ("ok", "diverged"):
        status = reported
    else:  # stopped by the scheduler at its last report
        status = "stopped"
    for k in ("test_loss", "test_loss_per_step", "test_acc", "test_mse", "train_loss"):
        if k in metrics and status in ("ok", "stopped"):
            row[k] = _plain(metrics[k])
    row["wall_s"] = _plain(metrics.get("time_total_s", float("nan")))
    row["status"] = status
    row["error"] = _one_line(error) if error is not None else (metrics.get("error") or "")
    row.update({k: v for k, v in cfg.items() if k not in AXES})
    return row


def _sort_key(settings: dict):
    def key(row: dict):
        out = []
        for a in AXES:
            axis = settings["space"][a]
            values = axis.get("grid") or axis.get("choice") or []
            v = row[a]
            out.append((values.index(v), 0) if v in values else (len(values), v))
        return out, row["trial"]

    return key


def _label(cfg: dict, varying: list[str]) -> str:
    parts = []
    for a in varying:
        v = _plain(cfg[a])
        parts.append(str(v) if a in ("algorithm", "cell") else
                     f"H={v}" if a == "hidden" else f"lr={v:.3g}")
    return " ".join(parts) or str(cfg["algorithm"])


def write_table(out: Path, settings: dict, results: list) -> None:
    """``sweep.csv`` (one row per trial, in the order of the space's axes), the learning
    curves and, when the trials tracked it, their alignment with BPTT."""
    from .plots import plot_alignment, plot_learning_curves

    rows = [_row(config, metrics, error, name)
            for config, metrics, error, name, _ in results]
    order = sorted(range(len(rows)), key=lambda i: _sort_key(settings)(rows[i]))
    rows = [rows[i] for i in order]
    results = [results[i] for i in order]
    columns: list[str] = []
    for r in rows:
        columns.extend(k for k in r if k not in columns)
    metric_cols = [c for c in ("test_loss", "test_loss_per_step", "test_acc", "test_mse",
                               "train_loss") if c in columns]
    head = ["trial", *AXES, "steps_done", *metric_cols, "wall_s", "status", "error"]
    columns = head + [c for c in columns if c not in head]
    buf = io.StringIO()
    pd.DataFrame(rows, columns=columns).to_csv(buf, index=False)
    atomic_write(out / TABLE_NAME, buf.getvalue().encode())

    # one line per point of the space but the seed, a band over the seeds
    varying = [a for a in AXES
               if a != "seed" and len({repr(_plain(c[a])) for c, *_ in results}) > 1]
    curves, aligns, names = [], [], []
    for config, _, _, _, history in results:
        label = _label(config, varying)
        if label not in names:
            names.append(label)
        seed = _plain(config["seed"])
        for h in history:
            loss = h.get("test_loss_per_step", h.get("test_loss"))
            if h.get("status") in ("diverged",) or loss is None or loss != loss:
                continue
            c = {"label": label, "seed": seed, "step": int(h["step"]), "test_loss": loss}
            if h.get("test_acc") == h.get("test_acc") and "test_acc" in h:
                c["test_acc"] = h["test_acc"]
            curves.append(c)
            if h.get("cosine") == h.get("cosine") and "cosine" in h:
                aligns.append({"label": label, "seed": seed, "step": int(h["step"]),
                               "cosine": h["cosine"]})
    task = settings["base"]["task"]
    if curves:
        buf = io.BytesIO()
        plot_learning_curves(curves, buf, [n for n in names if any(c["label"] == n
                                                                  for c in curves)],
                             by="label", title=task)
        atomic_write(out / "learning_curves.png", buf.getvalue())
    if aligns:
        buf = io.BytesIO()
        plot_alignment(aligns, buf, [n for n in names if any(a["label"] == n for a in aligns)],
                       by="label", params="the recurrent parameters")
        atomic_write(out / "alignment.png", buf.getvalue())
