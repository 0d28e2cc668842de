"""rnngrad.sweep: the search space, what is refused before anything is written, a trial's
reports, and a real 2-worker Ray Tune sweep (random search, ASHA, resume) through the CLI."""

import json
import math
import os
import socket
import sys
import time

import pytest

from rnngrad.cli import main
from rnngrad.sweep import (
    ClusterUnreachable,
    RayMissing,
    SweepExists,
    load,
    parse_axis,
    run_trial,
    sweep,
)

BASE = {"task": "adding", "seq_len": 4, "hidden": 3, "batch_size": 4, "steps": 8,
        "log_every": 1, "optimizer": "sgd", "clip": None}
TINY = ["--task", "adding", "--seq-len", "4", "--hidden", "3", "--batch-size", "4",
        "--steps", "8", "--log-every", "1", "--optimizer", "sgd", "--clip", "0"]


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("text, kind, expected", [
    ("1e-2,3e-2", float, {"grid": [0.01, 0.03]}),
    ("16", int, {"grid": [16]}),
    ("loguniform:1e-4:1e-1", float, {"loguniform": [1e-4, 0.1]}),
    ("uniform:8:64", int, {"uniform": [8, 64]}),
    ("choice:1e-3,1e-2", float, {"choice": [1e-3, 1e-2]}),
    ("LogUniform:1:2", float, {"loguniform": [1.0, 2.0]}),
])
def test_parse_axis(text, kind, expected):
    assert parse_axis(text, kind) == expected


@pytest.mark.parametrize("text, kind, message", [
    ("logunif:1:2", float, "unknown search space 'logunif'"),
    ("loguniform:0:1", float, "loguniform needs positive bounds"),
    ("loguniform:1e-1:1e-4", float, "LOW < HIGH"),
    ("uniform:1", float, "uniform takes two bounds"),
    ("uniform:a:b", float, "'a' in 'uniform:a:b' is not a float"),
    ("uniform:1.5:8", int, "'1.5' in 'uniform:1.5:8' is not a int"),
    ("choice:", float, "holds no value"),
    ("1e-2,1e-2", float, "repeats a value"),
    ("uniform:0:inf", float, "not a finite number"),
])
def test_a_bad_search_space_string_is_one_clear_error(text, kind, message):
    with pytest.raises(ValueError, match=message) as e:
        parse_axis(text, kind)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("space, kw, message", [
    ({"width": [1]}, {}, "unknown axis 'width'"),
    ({"seed": []}, {}, "'seed' axis is empty"),
    ({"algorithm": ["bptt", "bptt"]}, {}, "'algorithm' axis repeats a value"),
    ({"cell": ["lstm9"]}, {}, "unknown cell 'lstm9'"),
    ({"algorithm": ["bptt", "nope"]}, {}, "unknown algorithm 'nope'"),
    ({"lr": "loguniform:1e-3:1e-1"}, {"scheduler": "asha"}, "asha scheduler stops trials by "
                                                              "a metric, and none was given"),
    ({"lr": "loguniform:1e-3:1e-1"}, {"metric": "test_acc"}, "unknown metric 'test_acc' for "
                                                             "task 'adding'"),
    ({"lr": "loguniform:1e-3:1e-1"}, {"metric": "test_loss", "mode": "best"}, "mode must be"),
    ({"lr": [0.1]}, {"samples": 3}, "every axis is a grid"),
    ({"lr": "uniform:-1:1"}, {}, "lr must be a positive number"),
    ({"lr": "choice:0.1,0.2"}, {"scheduler": "asha", "metric": "test_loss",
                                "grace_period": 8}, r"grace_period must be an int in \[1, "),
    ({"lr": [0.1]}, {"scheduler": "hyperband"}, "unknown scheduler 'hyperband'"),
    ({"lr": [0.1]}, {"workers": 0}, "workers must be a positive int"),
    ({"lr": [0.1]}, {"address": "nohost:port"}, "is not a Ray address"),
    ({"lr": [0.1]}, {"connect_timeout": -1}, "connect_timeout must be a positive number"),
])
def test_bad_input_fails_before_anything_is_written(tmp_path, space, kw, message):
    with pytest.raises(ValueError, match=message):
        sweep(BASE, space, out=tmp_path / "s", **kw)
    assert not (tmp_path / "s").exists()


def _snapshot(directory):
    return {p.relative_to(directory): (p.stat().st_mtime_ns, p.read_bytes())
            for p in directory.rglob("*") if p.is_file()}


def test_a_directory_that_holds_anything_is_refused_and_left_as_it_was(tmp_path):
    space = {"algorithm": ["bptt"], "lr": "loguniform:1e-3:1e-1"}
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "sweep.json").write_text(json.dumps({"samples": 3}))
    (finished / "sweep.csv").write_text("trial\n")
    run = tmp_path / "run"  # a finished `rnngrad train` run
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "model.pt").write_bytes(b"weights")
    before = {d: _snapshot(d) for d in (finished, run)}
    with pytest.raises(SweepExists, match="already holds a finished sweep .* --resume"):
        sweep(BASE, space, out=finished, samples=2)
    for resume in (False, True):
        with pytest.raises(SweepExists, match=r"is not empty \(it holds config.json, "
                                              r"model.pt\) and holds no sweep"):
            sweep(BASE, space, out=run, samples=2, resume=resume)
    with pytest.raises(SweepExists, match=r"holds one with other settings \(base, samples, "):
        sweep(BASE, space, out=finished, samples=2, resume=True)
    assert {d: _snapshot(d) for d in (finished, run)} == before


def test_without_ray_tune_the_sweep_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(RayMissing, match=r"pip install 'rnngrad\[ray\]'"):
        sweep(BASE, {"seed": [0]}, out=tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_an_unreachable_cluster_is_one_line_after_the_timeout(tmp_path, capsys):
    pytest.importorskip("ray.tune")
    port = _free_port()  # nothing listens there
    out = tmp_path / "s"
    code = main(["sweep", *TINY, "--address", f"127.0.0.1:{port}", "--connect-timeout", "0.5",
                 "--out", str(out), "--no-progress"])
    assert code == 2
    line = _one_line(capsys.readouterr().err)
    assert f"no Ray cluster answered at 127.0.0.1:{port}" in line and "within 0.5 s" in line
    assert not out.exists()
    t0 = time.monotonic()  # Ray's own retries go on for minutes; this gives up on time
    with pytest.raises(ClusterUnreachable, match=f"at ray://127.0.0.1:{port} "):
        sweep(BASE, {"seed": [0]}, out=out, address=f"ray://127.0.0.1:{port}",
              connect_timeout=1.0)
    assert 0.9 < time.monotonic() - t0 < 10
    assert not out.exists()


@pytest.mark.usefixtures("one_thread")
def test_a_trial_reports_every_logged_step_then_how_it_ended(tmp_path):
    reports = []
    assert run_trial({**BASE, "steps": 3, "lr": 0.05}, tmp_path / "ok", reports.append) == "ok"
    assert [r["step"] for r in reports] == [1, 2, 3]
    assert [r["status"] for r in reports] == ["running", "running", "ok"]
    assert (tmp_path / "ok" / "model.pt").exists()  # the run was saved before "ok"
    reports.clear()
    assert run_trial({**BASE, "lr": 1e6}, tmp_path / "big", reports.append) == "diverged"
    last = reports[-1]
    assert last["status"] == "diverged" and "training diverged at step" in last["error"]
    assert math.isnan(last["test_loss"]) and last["step"] <= 8
    with pytest.raises(ValueError, match="stream needs a streaming task"):
        run_trial({**BASE, "lr": 0.05, "stream": True}, tmp_path / "bad", reports.append)


def test_a_row_says_how_each_trial_ended():
    pytest.importorskip("ray.tune")
    from rnngrad._tune import _row

    config = {**BASE, "algorithm": "bptt", "cell": "elman", "lr": 0.1, "seed": 0}
    metrics = {"step": 8, "test_loss": 0.5, "test_loss_per_step": 0.5, "test_mse": 1.0,
               "time_total_s": 1.5}
    ok = _row(config, {**metrics, "status": "ok", "error": ""}, None, "t0")
    assert (ok["status"], ok["steps_done"], ok["test_loss"], ok["wall_s"]) == ("ok", 8, 0.5, 1.5)
    stopped = _row(config, {**metrics, "step": 2, "status": "running"}, None, "t1")
    assert (stopped["status"], stopped["steps_done"]) == ("stopped", 2)
    diverged = _row(config, {"step": 3, "test_loss": float("nan"), "status": "diverged",
                             "error": "training diverged at step 3"}, None, "t2")
    assert diverged["status"] == "diverged" and "test_loss" not in diverged

    class RemoteError(Exception):  # what Ray hands back: the trial's exception as .cause
        cause = RuntimeError("the cell is broken\non purpose")

    failed = _row(config, {}, RemoteError("Traceback ..."), "t3")
    assert failed["status"] == "error" and failed["steps_done"] == 0
    assert failed["error"] == "RuntimeError: the cell is broken on purpose"
    text = "Traceback (most recent call last):\n  File ...\nValueError: bad cell\n"
    assert _row(config, {}, text, "t4")["error"] == "ValueError: bad cell"  # error.txt
    assert list(failed)[:7] == ["trial", "algorithm", "cell", "hidden", "lr", "seed",
                                "steps_done"]


def test_a_real_two_worker_tune_sweep_random_search_asha_and_resume(tmp_path, capsys,
                                                                    monkeypatch):
    if os.environ.get("CI") and "ray" not in sys.modules:
        import ray.tune  # noqa: F401  CI installs rnngrad[ray]: a missing Ray Tune fails here
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.tune")
    monkeypatch.chdir(tmp_path)  # anything written outside --out would show up here
    out = tmp_path / "s"
    args = ["sweep", *TINY, "--algorithms", "bptt,eprop", "--lr", "loguniform:1e-4:1",
            "--samples", "4", "--scheduler", "asha", "--grace-period", "1",
            "--reduction-factor", "2", "--metric", "test_loss", "--workers", "2",
            "--out", str(out), "--no-progress"]
    assert main(args) == 0
    assert not ray.is_initialized()  # the embedded Ray is shut down
    captured = capsys.readouterr()
    assert _one_line(captured.err) == (
        "rnngrad sweep: 8 trials: 8 to run on a local Ray, 2 workers; ASHA stops trials by "
        "test_loss (min) at rungs of 1 x 2^k steps")
    assert "adding: 8 trials (" in captured.out and "best by test_loss (min): " in captured.out
    df = load(out)
    assert len(df) == 8 and list(df["algorithm"]) == ["bptt"] * 4 + ["eprop"] * 4
    assert set(df["status"]) <= {"ok", "stopped"}
    # random search: 8 distinct learning rates drawn log-uniformly in [1e-4, 1]
    assert df["lr"].nunique() == 8 and df["lr"].between(1e-4, 1).all()
    # ASHA stopped some trials early, at a rung (1, 2 or 4 steps), and let others finish
    stopped = df[df["status"] == "stopped"]
    assert len(stopped) >= 1 and set(stopped["steps_done"]) <= {1, 2, 4}
    finished = df[df["status"] == "ok"]
    assert len(finished) >= 1 and (finished["steps_done"] == 8).all()
    assert df["test_loss"].notna().all()
    for trial in finished["trial"]:  # each finished trial is `rnngrad train`'s run
        assert (out / trial / "model.pt").exists() and (out / trial / "metrics.csv").exists()
    best = df.loc[df["test_loss"].idxmin(), "trial"]
    assert f"best by test_loss (min): {best} (" in captured.out
    assert (out / "learning_curves.png").stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    # Tune's experiment directory is --out itself
    assert any(p.name.startswith("experiment_state") for p in out.iterdir())
    assert json.loads((out / "sweep.json").read_text())["space"]["lr"] == {
        "loguniform": [1e-4, 1.0]}

    table = (out / "sweep.csv").read_bytes()
    assert main(args) == 2  # a finished sweep is never overwritten
    assert "already holds a finished sweep" in _one_line(capsys.readouterr().err)
    other = [*args[:-3], "--lr", "loguniform:1e-3:1", "--out", str(out), "--no-progress"]
    assert main([*other, "--resume"]) == 2
    assert "other settings (space.lr differ)" in _one_line(capsys.readouterr().err)
    assert (out / "sweep.csv").read_bytes() == table
    assert main([*args, "--resume"]) == 0  # Tuner.restore: nothing left to run
    assert "8 trials: 0 to run on a local Ray, 2 workers, 8 finished before (kept)" in (
        capsys.readouterr().err)
    again = load(out)
    assert list(again["trial"]) == list(df["trial"])
    assert list(again["status"]) == list(df["status"])


@pytest.mark.parametrize("args, message", [
    (["--lr", "logunif:1e-4:1e-1"], "argument --lr: unknown search space 'logunif'"),
    (["--hidden", "uniform:8"], "argument --hidden: 'uniform:8': uniform takes two bounds"),
    (["--lr", "loguniform:1e-3:1e-1", "--samples", "2", "--metric", "test_acc"],
     "unknown metric 'test_acc' for task 'adding'"),
    (["--samples", "2"], "every axis is a grid"),
    (["--lr", "choice:0.1,0.2", "--scheduler", "asha", "--grace-period", "8"],
     "grace_period must be an int in [1, steps = 8)"),
])
def test_the_command_line_refuses_a_bad_search_and_writes_nothing(tmp_path, capsys, args,
                                                                  message):
    out = tmp_path / "s"
    try:
        code = main(["sweep", *TINY, *args, "--out", str(out), "--no-progress"])
    except SystemExit as e:  # argparse's own refusal (usage, then the error)
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
