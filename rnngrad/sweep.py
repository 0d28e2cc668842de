"""A grid of training runs on Ray: one trial per point, gathered into one table and plots.

    grid = {"algorithm": ["bptt", "eprop"], "cell": ["elman"], "hidden": [16, 32],
            "lr": [1e-2, 3e-3], "seed": [0, 1]}
    rows = sweep({"task": "digits", "steps": 200}, grid, out="runs/sweep", workers=2)
    rows = sweep(..., address="auto")          # join a running Ray cluster instead

Each trial is ``rnngrad.runs.run(config)``, the function ``rnngrad train`` runs, on the
base configuration with the trial's values, in a Ray task (one CPU, one torch thread):
by default on an embedded local Ray started with ``num_cpus=workers``; with
``address``, on an existing cluster. So a sweep on 2 cores and one on 200 nodes differ
only in the address. Results come back through Ray, so the table and plots need no
shared filesystem; each trial also writes its own run directory
(``out/trials/<id>/``: metrics.csv, model.pt, ...) on the machine that ran it: on a
cluster, give an ``out`` on a shared filesystem to collect those too.

A trial that fails is a row with status "error" and its error text (the traceback in
``trials/<id>/result.json``); one that diverges (non-finite loss) is status
"diverged"; neither stops the others. Each finished trial is recorded in
``trials/<id>/result.json`` as it ends (``<id>`` names the trial's values and a hash of
its whole configuration): ``resume=True`` skips the trials recorded "ok" or
"diverged" and runs the rest (failed ones again), and a grid grown since runs only its
new points. ``out/sweep.csv`` has one row per trial of the grid: the values swept, final
test metrics, wall time, status, error, then the rest of its configuration;
``learning_curves.png`` (and ``alignment.png`` with ``track_alignment``) plot them as
``compare`` does, one line per point of the grid with a band over seeds.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import logging
import socket
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .outdir import OutputDir, atomic_write
from .runs import check_config

__all__ = ["sweep", "expand", "trial_id", "run_trial", "AXES", "RayMissing", "RAY_PIN",
           "SweepExists"]

AXES = ("algorithm", "cell", "hidden", "lr", "seed")  # the grid's axes, in table order
RAY_PIN = "ray==2.60.0"
DONE = ("ok", "diverged")  # statuses a resumed sweep does not run again


class RayMissing(ImportError):
    """Ray is not installed."""

    def __init__(self) -> None:
        super().__init__(f"the sweep runs on Ray, which is not installed: pip install "
                         f"'rnngrad[ray]' (or pip install {RAY_PIN})")


class SweepExists(ValueError):
    """The output directory holds a sweep and ``resume`` was not asked for."""


def expand(base: Mapping[str, Any], grid: Mapping[str, Sequence]) -> list[dict[str, Any]]:
    """Every point of ``grid`` on top of ``base``: checked configurations, the axes of
    ``AXES`` varying slowest first (so a table reads by algorithm, then cell, ...)."""
    unknown = sorted(set(grid) - set(AXES))
    if unknown:
        raise ValueError(f"the grid has unknown axis/axes {', '.join(map(repr, unknown))}; "
                         f"axes: {', '.join(AXES)}")
    values = []
    for axis in AXES:
        v = list(grid.get(axis, [base.get(axis)] if axis in base else []))
        if axis in grid and not v:
            raise ValueError(f"the grid's {axis!r} axis is empty: give at least one value")
        if len(set(map(repr, v))) != len(v):
            raise ValueError(f"the grid's {axis!r} axis repeats a value: {v}")
        values.append(v)
    out = []
    for point in itertools.product(*(v or [None] for v in values)):
        cfg = dict(base)
        cfg.update({a: x for a, x, v in zip(AXES, point, values) if v})
        out.append(check_config(cfg))
    return out


def trial_id(config: Mapping[str, Any]) -> str:
    """A directory name: the swept values, readable, and a hash of the whole configuration."""
    digest = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]
    alg = str(config["algorithm"]).replace(":", "")
    return (f"{config['cell']}-{alg}-h{config['hidden']}-lr{config['lr']:g}-s{config['seed']}"
            f"-{digest}")


def run_trial(config: dict[str, Any], out: str | None, *, threads: int = 1,
              checkpoint_every: int | None = None) -> dict[str, Any]:
    """One trial: ``rnngrad.runs.run(config)`` in ``out`` (resumed from its checkpoint if
    an earlier attempt left one), never raising: the record says how it ended."""
    import torch

    from .train import Diverged

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    record: dict[str, Any] = {"trial": trial_id(config), "config": config, "status": "ok",
                              "error": "", "traceback": "", "final": {}, "history": [],
                              "host": socket.gethostname()}
    try:
        from .runs import run

        result = run(config, out=out, resume=True, checkpoint_every=checkpoint_every)
        record["final"], record["history"] = result.final, result.history
    except Diverged as e:
        record.update(status="diverged", error=str(e), history=e.history)
    except Exception as e:  # a failed trial is a row of the table, not the end of the sweep
        record.update(status="error", error=_one_line(e), traceback=traceback.format_exc())
    record["wall_s"] = time.perf_counter() - t0
    return record


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _read_record(path: Path) -> dict | None:
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and "status" in rec else None


def sweep(
    base: Mapping[str, Any],
    grid: Mapping[str, Sequence],
    *,
    out: str | Path,
    workers: int = 2,
    address: str | None = None,
    resume: bool = False,
    checkpoint_every: int | None = None,
    backend: str = "ray",
    progress: Callable[[dict[str, Any]], None] | None = None,
    on_start: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every point of ``grid`` (axes ``AXES``) on ``base`` as a trial; write the table
    and plots to ``out``; return the table's rows (one per trial, in grid order).

    Args:
        base: the configuration every trial shares (keys of ``rnngrad.runs.DEFAULTS``).
        grid: axis -> list of values, e.g. ``{"algorithm": ["bptt", "rtrl"], "seed": [0, 1]}``.
        out: the sweep's directory (locked while the sweep runs).
        workers: CPUs of the embedded local Ray (one trial per CPU at a time).
        address: a running Ray cluster's address ("auto", "ray://host:10001"); then
            ``workers`` is not used, the cluster's CPUs are.
        resume: continue a sweep recorded in ``out``: trials recorded "ok" or "diverged"
            are skipped. Without it, a sweep already in ``out`` is an error (``SweepExists``).
        checkpoint_every: each trial checkpoints every so many steps, so a trial cut off
            (a lost node, Ctrl-C) resumes from there.
        backend: "ray", or "serial" (trials one after another in this process, without
            Ray: for debugging).
        progress: called with each finished trial's row.
        on_start: called once with {"trials", "to_run", "skipped"} before trials start.
    """
    if backend not in ("ray", "serial"):
        raise ValueError(f"backend must be 'ray' or 'serial', got {backend!r}")
    if backend == "ray" and address is None and (not isinstance(workers, int)
                                                  or isinstance(workers, bool) or workers < 1):
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    configs = expand(base, grid)
    ids = [trial_id(c) for c in configs]
    if backend == "ray":
        _import_ray()  # fail before anything is written
    with OutputDir(out) as d:
        out = d.path
        spec = out / "sweep.json"
        if spec.exists() and not resume:
            raise SweepExists(f"{out} already holds a sweep: resume it, or use another output "
                              f"directory")
        atomic_write(spec, json.dumps({"base": dict(base), "grid": {k: list(v) for k, v in
                                                                      grid.items()}},
                                      indent=2).encode())
        records: dict[str, dict] = {}
        for tid in ids:
            rec = _read_record(out / "trials" / tid / "result.json")
            if rec is not None and rec["status"] in DONE:
                records[tid] = rec
        todo = [(tid, c) for tid, c in zip(ids, configs) if tid not in records]
        if on_start is not None:
            on_start({"trials": len(ids), "to_run": len(todo), "skipped": len(records)})

        def finished(rec: dict) -> None:
            tdir = out / "trials" / rec["trial"]
            tdir.mkdir(parents=True, exist_ok=True)
            atomic_write(tdir / "result.json", json.dumps(rec, indent=1, default=str).encode())
            records[rec["trial"]] = rec
            if progress is not None:
                progress(_row(rec))

        jobs = [(c, str((out / "trials" / tid).resolve())) for tid, c in todo]
        if jobs and backend == "serial":
            for c, tdir in jobs:
                finished(run_trial(c, tdir, threads=_threads(), checkpoint_every=checkpoint_every))
        elif jobs:
            _run_on_ray(jobs, workers=workers, address=address,
                        checkpoint_every=checkpoint_every, finished=finished)
        ordered = [records[t] for t in ids]
        rows = [_row(r) for r in ordered]
        _write(out, rows, ordered, grid)
    return rows


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _import_ray():
    try:
        import ray
    except ImportError:
        raise RayMissing() from None
    return ray


def _run_on_ray(jobs, *, workers, address, checkpoint_every, finished) -> None:
    ray = _import_ray()
    started = False
    if not ray.is_initialized():
        quiet = {"include_dashboard": False, "log_to_driver": False,
                 "logging_level": logging.ERROR, "configure_logging": True}
        if address is None:
            # a small object store: trials return a few KiB each
            ray.init(num_cpus=workers, object_store_memory=128 * 1024 ** 2, **quiet)
        else:
            ray.init(address=address, **quiet)
        started = True
    try:
        remote = ray.remote(num_cpus=1, max_retries=1)(run_trial)
        pending = {remote.remote(c, tdir, threads=1, checkpoint_every=checkpoint_every): c
                   for c, tdir in jobs}
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    config = pending.pop(ref)
                    try:
                        rec = ray.get(ref)
                    except Exception as e:  # the worker died, or Ray could not run it
                        rec = {"trial": trial_id(config), "config": config, "status": "error",
                               "error": _one_line(e).splitlines()[0][:500],
                               "traceback": str(e), "final": {}, "history": [],
                               "wall_s": float("nan"), "host": ""}
                    finished(rec)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
    finally:
        if started:
            ray.shutdown()


def _row(rec: dict) -> dict[str, Any]:
    cfg = rec["config"]
    row: dict[str, Any] = {"trial": rec["trial"]}
    row.update({a: cfg[a] for a in AXES})
    final = rec.get("final") or {}
    for k in ("test_loss", "test_loss_per_step", "test_acc", "test_mse"):
        if k in final:
            row[k] = final[k]
    row["wall_s"] = rec.get("wall_s", float("nan"))
    row["status"] = rec["status"]
    row["error"] = rec.get("error", "")
    row.update({k: v for k, v in cfg.items() if k not in AXES})
    return row


def _label(cfg: dict, varying: list[str]) -> str:
    parts = []
    for a in varying:
        v = cfg[a]
        parts.append(str(v) if a in ("algorithm", "cell") else
                     f"H={v}" if a == "hidden" else f"lr={v:g}")
    return " ".join(parts) or str(cfg["algorithm"])


def _write(out: Path, rows: list[dict], records: list[dict], grid: Mapping) -> None:
    from .plots import plot_alignment, plot_learning_curves

    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r if k not in keys)
    f = io.StringIO(newline="")
    w = csv.DictWriter(f, fieldnames=keys)
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write(out / "sweep.csv", f.getvalue().encode())

    # one line per point of the grid but the seed, a band over the seeds
    varying = [a for a in AXES if a != "seed" and len({repr(r["config"][a]) for r in records}) > 1]
    curves, aligns, names = [], [], []
    for rec in records:
        label = _label(rec["config"], varying)
        if label not in names:
            names.append(label)
        for h in rec.get("history") or []:
            c = {"label": label, "seed": rec["config"]["seed"], "step": h["step"],
                 "test_loss": h.get("test_loss_per_step", h["test_loss"])}
            if "test_acc" in h:
                c["test_acc"] = h["test_acc"]
            curves.append(c)
            if "cosine" in h:
                aligns.append({"label": label, "seed": rec["config"]["seed"],
                               "step": h["step"], "cosine": h["cosine"]})
    if curves:
        buf = io.BytesIO()
        task = records[0]["config"]["task"]
        plot_learning_curves(curves, buf, names, by="label", title=task)
        atomic_write(out / "learning_curves.png", buf.getvalue())
    if aligns:
        buf = io.BytesIO()
        plot_alignment(aligns, buf, [n for n in names if any(a["label"] == n for a in aligns)],
                       by="label", params="the recurrent parameters")
        atomic_write(out / "alignment.png", buf.getvalue())
