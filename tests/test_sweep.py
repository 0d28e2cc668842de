"""rnngrad.sweep: the grid, trials that fail alone, resuming, and a real 2-worker Ray sweep."""

import csv
import json
import os
import sys

import pytest

import rnngrad.runs
from rnngrad.sweep import RayMissing, SweepExists, expand, sweep, trial_id

BASE = {"task": "adding", "seq_len": 4, "hidden": 3, "batch_size": 4, "steps": 4,
        "log_every": 2, "optimizer": "sgd", "clip": None}


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_expand_varies_the_axes_in_table_order():
    configs = expand(BASE, {"seed": [0, 1], "algorithm": ["bptt", "tbptt:2"], "lr": [0.1]})
    assert [(c["algorithm"], c["seed"]) for c in configs] == [
        ("bptt", 0), ("bptt", 1), ("tbptt:2", 0), ("tbptt:2", 1)]
    assert all(c["cell"] == "elman" and c["lr"] == 0.1 and c["hidden"] == 3 for c in configs)
    ids = [trial_id(c) for c in configs]
    assert len(set(ids)) == 4 and ids[2].startswith("elman-tbptt2-h3-lr0.1-s0-")


@pytest.mark.parametrize("grid, message", [
    ({"width": [1]}, "unknown axis/axes 'width'"),
    ({"seed": []}, "'seed' axis is empty"),
    ({"lr": [0.1, 0.1]}, "'lr' axis repeats a value"),
    ({"cell": ["lstm9"]}, "unknown cell 'lstm9'"),
    ({"algorithm": ["bptt", "nope"]}, "unknown algorithm 'nope'"),
])
def test_a_bad_grid_fails_before_any_trial(tmp_path, grid, message):
    with pytest.raises(ValueError, match=message):
        sweep(BASE, grid, out=tmp_path / "s", backend="serial")
    assert not (tmp_path / "s").exists()


def test_a_failed_trial_is_a_row_and_a_resume_runs_only_what_is_missing(tmp_path, monkeypatch):
    real = rnngrad.runs.run
    calls = []

    def flaky(config, **kw):
        calls.append((config["algorithm"], config["seed"]))
        if config["seed"] == 1 and config["algorithm"] == "eprop":
            raise RuntimeError("worker lost\nsecond line")
        return real(config, **kw)

    monkeypatch.setattr(rnngrad.runs, "run", flaky)
    grid = {"algorithm": ["bptt", "eprop"], "seed": [0, 1], "lr": [0.05, 1e6]}
    rows = sweep(BASE, grid, out=tmp_path, backend="serial")
    by = {(r["algorithm"], r["seed"], r["lr"]): r for r in rows}
    assert len(rows) == 8 and len(calls) == 8
    assert by[("eprop", 1, 0.05)]["status"] == "error"
    assert by[("eprop", 1, 0.05)]["error"] == "RuntimeError: worker lost second line"
    assert by[("bptt", 0, 1e6)]["status"] == "diverged"
    assert "training diverged at step" in by[("bptt", 0, 1e6)]["error"]
    assert by[("bptt", 1, 0.05)]["status"] == "ok" and by[("bptt", 1, 0.05)]["test_mse"] > 0
    table = _csv(tmp_path / "sweep.csv")
    assert [r["status"] for r in table] == [r["status"] for r in rows]
    assert {"trial", "algorithm", "cell", "hidden", "lr", "seed", "test_loss_per_step",
            "test_mse", "wall_s", "status", "error", "task", "steps"} <= set(table[0])
    assert (tmp_path / "learning_curves.png").stat().st_size > 1000
    rec = json.loads((tmp_path / "trials" / rows[0]["trial"] / "result.json").read_text())
    assert rec["config"]["algorithm"] == "bptt" and rec["history"]

    with pytest.raises(SweepExists, match="already holds a sweep"):
        sweep(BASE, grid, out=tmp_path, backend="serial")
    calls.clear()
    started = []
    again = sweep(BASE, grid, out=tmp_path, backend="serial", resume=True,
                  on_start=started.append)
    assert calls == [("eprop", 1), ("eprop", 1)]  # only the failed trials ran again
    assert started == [{"trials": 8, "to_run": 2, "skipped": 6}]
    assert [r["status"] for r in again if r["seed"] == 1 and r["algorithm"] == "eprop"] == [
        "error", "error"]
    # a grid grown by a seed runs only the new trials
    calls.clear()
    monkeypatch.setattr(rnngrad.runs, "run", real)
    grown = sweep(BASE, {**grid, "seed": [0, 1, 2], "algorithm": ["bptt"]}, out=tmp_path,
                  backend="serial", resume=True, on_start=started.append)
    assert started[-1] == {"trials": 6, "to_run": 2, "skipped": 4} and len(grown) == 6


def test_without_ray_the_sweep_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(RayMissing, match=r"pip install 'rnngrad\[ray\]'"):
        sweep(BASE, {"seed": [0]}, out=tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_a_real_two_worker_ray_sweep(tmp_path):
    if os.environ.get("CI") and "ray" not in sys.modules:
        import ray  # noqa: F401  CI installs rnngrad[ray]: a missing Ray fails here
    ray = pytest.importorskip("ray")
    grid = {"algorithm": ["bptt", "eprop"], "lr": [0.05, 1e6], "seed": [0]}
    rows = sweep({**BASE, "track_alignment": 2}, grid, out=tmp_path, workers=2)
    assert not ray.is_initialized()  # the embedded Ray is shut down
    assert [(r["algorithm"], r["lr"], r["status"]) for r in rows] == [
        ("bptt", 0.05, "ok"), ("bptt", 1e6, "diverged"), ("eprop", 0.05, "ok"),
        ("eprop", 1e6, "diverged")]
    hosts = {json.loads((tmp_path / "trials" / r["trial"] / "result.json").read_text())["host"]
            for r in rows}
    assert hosts and "" not in hosts  # every trial recorded where it ran
    assert len(_csv(tmp_path / "sweep.csv")) == 4
    assert (tmp_path / "learning_curves.png").exists() and (tmp_path / "alignment.png").exists()
    # each trial ran `rnngrad train`'s run in its own directory
    assert (tmp_path / "trials" / rows[0]["trial"] / "model.pt").exists()
    started = []
    again = sweep({**BASE, "track_alignment": 2}, grid, out=tmp_path, workers=2, resume=True,
                  on_start=started.append)
    assert started == [{"trials": 4, "to_run": 0, "skipped": 4}]
    assert [r["wall_s"] for r in again] == [r["wall_s"] for r in rows]
