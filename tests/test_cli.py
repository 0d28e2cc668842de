"""The CLI's subcommands, end to end on tiny settings."""

import csv

import pytest

from rnngrad.cli import main


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "train" in capsys.readouterr().out


def test_check_passes_and_prints_a_table(capsys):
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    for name in ["bptt()", "rtrl()", "tbptt(k >= T)", "bptt(checkpoint=c)", "rtrl(generic=True)"]:
        assert name in out
    assert "checks passed" in out


def test_check_fails_loudly_when_the_tolerance_cannot_be_met(capsys):
    assert main(["check", "--tol", "0"]) == 1
    assert "FAILED" in capsys.readouterr().err


def test_compare_writes_table_and_plots(tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(["compare", "--task", "adding", "--seq-len", "5", "--algorithms", "bptt,eprop",
               "--seeds", "2", "--steps", "6", "--hidden", "8", "--track-every", "3",
               "--out", str(out), "--no-progress"])
    assert rc == 0
    with open(out / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["algorithm"] for r in rows] == ["bptt", "eprop"]
    assert float(rows[0]["cosine_mean"]) == pytest.approx(1.0)
    assert (out / "learning_curves.png").exists() and (out / "alignment.png").exists()
    assert "eprop" in capsys.readouterr().out


def test_train_tracks_alignment(tmp_path):
    out = tmp_path / "run"
    rc = main(["train", "--task", "digits", "--algorithm", "eprop", "--hidden", "8",
               "--steps", "4", "--log-every", "2", "--track-alignment", "2", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert -1.0 <= float(rows[-1]["cosine"]) <= 1.0


def test_train_online_rtrl_on_the_stream(tmp_path):
    rc = main(["train", "--task", "stream_add", "--stream", "--algorithm", "rtrl", "--hidden", "8",
               "--steps", "3", "--update-every", "1", "--optimizer", "sgd", "--lr", "0.05",
               "--log-every", "3", "--out", str(tmp_path / "s"), "--no-progress"])
    assert rc == 0


def test_train_steady_model(tmp_path, capsys):
    rc = main(["train", "--task", "digits", "--model", "steady", "--algorithm", "rbp",
               "--hidden", "16", "--steps", "5", "--log-every", "5", "--out",
               str(tmp_path / "st"), "--no-progress"])
    assert rc == 0
    assert "steady" in capsys.readouterr().out
    assert (tmp_path / "st" / "model.pt").exists()


def test_train_steady_rejects_sequence_algorithms(capsys):
    rc = main(["train", "--model", "steady", "--algorithm", "bptt", "--no-progress"])
    assert rc == 2
    assert "--model steady takes --algorithm rbp" in capsys.readouterr().err


def test_bench_prints_ratios(capsys):
    assert main(["bench", "--hidden", "8", "--repeats", "1"]) == 0
    assert "ratio_vs_nn_rnn" in capsys.readouterr().out


def test_train_steady_rejects_flags_it_would_ignore(capsys):
    rc = main(["train", "--model", "steady", "--alpha", "0.5", "--update-every", "2",
               "--no-progress"])
    assert rc == 2
    assert "does not take --alpha, --update-every" in capsys.readouterr().err


def test_unknown_or_missing_device_is_a_clear_error(capsys):
    assert main(["train", "--device", "nope", "--steps", "1", "--no-progress"]) == 2
    assert "is not a torch device" in capsys.readouterr().err


def test_compare_reports_accuracy_on_a_classification_task(tmp_path):
    out = tmp_path / "cmp"
    rc = main(["compare", "--task", "digits", "--algorithms", "bptt,rflo", "--seeds", "1",
               "--steps", "3", "--hidden", "8", "--track-every", "0", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    with open(out / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert all(0.0 <= float(r["final_test_acc_mean"]) <= 1.0 for r in rows)
