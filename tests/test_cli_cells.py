"""The command line with any cell: train and compare take --cell and --layers, check takes
--cell (a built-in name or a user's module:Class) and exits 1 on a disagreement."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from rnngrad.cli import main

HERE = Path(__file__).parent
TINY = ["--task", "adding", "--seq-len", "5", "--hidden", "4", "--batch-size", "4",
        "--steps", "3", "--log-every", "3", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_train_a_two_layer_lstm(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--cell", "lstm", "--layers", "2", "--algorithm", "rtrl",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2xlstm" in text
    config = json.loads((out / "config.json").read_text())
    flat = json.dumps(config)
    assert '"cell": "lstm"' in flat and '"layers": 2' in flat
    assert (out / "model.pt").exists()


def test_compare_gru_over_online_rules(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--task", "adding", "--seq-len", "5", "--cell", "gru", "--hidden",
                 "4", "--batch-size", "4", "--steps", "4", "--seeds", "1", "--algorithms",
                 "bptt,tbptt:2,rtrl,snap1,eprop,uoro", "--no-progress", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "adding: gru" in text and "snap1" in text and "uoro" in text
    assert (out / "compare.csv").exists() and (out / "learning_curves.png").exists()


def test_cell_flags_that_do_not_apply(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default --out, runs/adding-ALGORITHM, is under it
    assert main(["train", *TINY, "--cell", "gru", "--activation", "relu"]) == 2
    assert "--activation relu apply to --cell elman only" in capsys.readouterr().err
    assert main(["train", *TINY, "--cell", "nope"]) == 2
    assert "unknown cell 'nope'" in capsys.readouterr().err
    assert main(["train", *TINY, "--cell", "gru", "--algorithm", "kf_rtrl"]) == 2
    assert "kf_rtrl() is defined for one Elman layer" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # a refused command writes nothing


def test_check_a_users_cell(tmp_path, monkeypatch, capsys):
    shutil.copy(HERE / "cell_zoo.py", tmp_path / "mycells.py")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["check", "--cell", "mycells:Adaptive"]) == 0
    text = capsys.readouterr().out
    # 50: rtrl() has a sequence form (diagonal cells), so its step path is checked too
    assert "mycells:Adaptive" in text and "all 50 checks passed" in text
    assert main(["check", "--cell", "mycells:BrokenElman"]) == 1
    assert "FAILED" in capsys.readouterr().err
    assert main(["check", "--cell", "mycells:Missing"]) == 2
    assert "has no attribute 'Missing'" in capsys.readouterr().err
