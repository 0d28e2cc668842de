"""``rnngrad train --compile``: the online step through ``rnngrad.compile``, the same numbers
as the eager run, the compile time reported once; refused without ``--update-every``.

The compiler backend is "aot_eager" here (tracing without inductor's C++ build, seconds
instead of a minute); the inductor path is tested in test_compiled.py."""

from __future__ import annotations

import csv
import functools
import json

import pytest

import rnngrad.algorithms.compiled as compiled
from rnngrad.cli import main

TINY = ["train", "--task", "adding", "--seq-len", "4", "--hidden", "3", "--batch-size", "4",
        "--steps", "3", "--log-every", "1", "--no-progress", "--update-every", "1"]


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setattr(compiled, "compile",
                        functools.partial(compiled.compile, backend="aot_eager"))


def _losses(out):
    with open(out / "metrics.csv") as f:
        return [(float(r["train_loss"]), float(r["test_loss"])) for r in csv.DictReader(f)]


# UORO draws its signs from a torch.Generator outside the compiled graph (a block at a time)
@pytest.mark.parametrize("algorithm", ["eprop", "uoro"])
def test_compiled_run_gives_the_eager_runs_numbers(tmp_path, capsys, aot_eager, algorithm):
    assert main([*TINY, "--algorithm", algorithm, "--out", str(tmp_path / "eager")]) == 0
    assert "online step" not in capsys.readouterr().err
    assert main([*TINY, "--algorithm", algorithm, "--compile",
                 "--out", str(tmp_path / "compiled")]) == 0
    err = capsys.readouterr().err
    assert err.count("rnngrad train: the online step") == 1, err  # reported once
    assert "compiled in" in err, err
    eager, comp = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert len(eager) == len(comp) == 3
    for (a, b), (c, d) in zip(eager, comp):
        assert abs(a - c) <= 1e-5 * abs(a) and abs(b - d) <= 1e-5 * abs(b)
    assert json.loads((tmp_path / "compiled" / "config.json").read_text())["run"]["compile"]


def test_compile_without_update_every_is_refused(tmp_path, capsys):
    args = TINY[:-2]  # without --update-every 1
    assert main([*args, "--compile", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "compile compiles the online step: it needs update_every" in err, err
    assert not (tmp_path / "r").exists()
