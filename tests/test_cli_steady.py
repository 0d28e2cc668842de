"""``rnngrad train --model steady``: config.json and test metrics at every logged step."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from steady_refs import _seed_and_one_thread  # noqa: F401  (tiny GEMMs: one thread)

from rnngrad.cli import main
from rnngrad.steady import SteadyClassifier, train_steady


def test_train_steady_writes_config_and_test_metrics(tmp_path, capsys):
    out = tmp_path / "st"
    argv = ["train", "--task", "digits", "--model", "steady", "--algorithm", "rbp_gmres",
            "--hidden", "12", "--steps", "5", "--log-every", "2", "--batch-size", "16",
            "--lr", "0.02", "--seed", "3", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "config.json" in printed

    config = json.loads((out / "config.json").read_text())
    assert config == {
        "task": "digits", "model": "steady", "algorithm": "rbp_gmres", "hidden": 12,
        "activation": "tanh", "dtype": "float32", "steps": 5, "lr": 0.02, "batch_size": 16,
        "seed": 3, "log_every": 2, "optimizer": "adam", "max_spectral_norm": 0.9,
        "init_scale": 0.4, "n_inputs": 64, "n_classes": 10, "method": "anderson",
        "damping": 1.0, "tol": None, "max_iter": 500, "backward_method": "gmres",
    }

    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [2, 4, 5]
    assert list(rows[0]) == ["step", "loss", "test_loss", "test_acc", "residual", "iterations"]
    for r in rows:
        assert 0.0 <= float(r["test_acc"]) <= 1.0 and float(r["test_loss"]) > 0.0

    # the config reproduces the run: the same model from the library gives the same last row
    model = SteadyClassifier(config["hidden"], activation=config["activation"],
                             seed=config["seed"], backward_method=config["backward_method"],
                             init_scale=config["init_scale"], dtype=torch.float32)
    metrics = train_steady(model, steps=config["steps"], lr=config["lr"],
                           batch_size=config["batch_size"], seed=config["seed"],
                           max_spectral_norm=config["max_spectral_norm"])
    assert float(rows[-1]["test_acc"]) == pytest.approx(metrics["test_accuracy"], abs=1e-12)
    assert float(rows[-1]["test_loss"]) == pytest.approx(metrics["test_loss"], rel=1e-6)
    state = torch.load(out / "model.pt")
    assert torch.equal(state["W"], model.W.detach())


def test_train_steady_rejects_log_every_zero(tmp_path, capsys):
    rc = main(["train", "--model", "steady", "--steps", "2", "--log-every", "0",
               "--out", str(tmp_path / "z"), "--no-progress"])
    assert rc == 2
    assert "--log-every must be >= 1, got 0" in capsys.readouterr().err
