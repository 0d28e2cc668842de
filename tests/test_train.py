import csv
import json

import pytest
import torch

import rnngrad
from rnngrad.cli import main
from rnngrad.tasks import get_task
from rnngrad.train import train


def test_digits_learns():
    torch.manual_seed(0)
    task = get_task("digits")
    model = rnngrad.RNN(8, 32, 10, readout="softmax")
    result = train(model, task, steps=300, lr=1e-2, batch_size=32, log_every=100)
    assert result.final["test_acc"] > 0.85
    assert len(result.history) == 3


def test_copy_learns_better_than_chance():
    torch.manual_seed(0)
    task = get_task("copy", length=3, delay=2, n_symbols=4)
    model = rnngrad.RNN(task.input_size, 32, 4, readout="softmax")
    result = train(model, task, steps=400, lr=1e-2, batch_size=32, log_every=400)
    assert result.final["test_acc"] > 0.5  # chance is 0.25


def test_online_updates_with_bptt_and_whole_sequence_agree():
    """update_every >= T with BPTT is one update per sequence: the same trajectory."""
    task = get_task("adding", seq_len=6)
    torch.manual_seed(1)
    m1 = rnngrad.RNN(2, 5, 1, dtype=torch.float64)
    m2 = rnngrad.RNN(2, 5, 1, dtype=torch.float64)
    m2.load_state_dict(m1.state_dict())
    train(m1, task, steps=5, lr=1e-2, optimizer="sgd", log_every=5)
    train(m2, task, steps=5, lr=1e-2, optimizer="sgd", log_every=5, update_every=6)
    for (n, a), b in zip(m1.named_parameters(), m2.parameters()):
        assert torch.allclose(a, b, atol=1e-12), n


def test_resume_gives_the_uninterrupted_result(tmp_path):
    task = get_task("digits")

    def run(out, steps, resume=False):
        torch.manual_seed(0)
        m = rnngrad.RNN(8, 16, 10, readout="softmax", dtype=torch.float64)
        return train(m, task, steps=steps, log_every=10, out=out, checkpoint_every=10,
                     resume=resume).model

    full = run(tmp_path / "a", 40)
    run(tmp_path / "b", 20)  # "interrupted" after 20 steps
    resumed = run(tmp_path / "b", 40, resume=True)
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_bad_training_arguments():
    task = get_task("digits")
    m = rnngrad.RNN(8, 4, 10, readout="softmax")
    with pytest.raises(ValueError, match="steps must be a positive int, got 0"):
        train(m, task, steps=0)
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        train(m, task, steps=1, optimizer="rmsprop")
    with pytest.raises(ValueError, match="task 'adding' has input_size 2"):
        train(m, get_task("adding"), steps=1)


def test_cli_train_writes_metrics_plot_and_model(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--task", "digits", "--algorithm", "bptt", "--hidden", "16",
               "--steps", "40", "--log-every", "20", "--out", str(out), "--no-progress"])
    assert rc == 0
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [20, 40]
    assert {"train_loss", "test_loss", "test_acc", "steps_per_s"} <= set(rows[0])
    assert (out / "curve.png").stat().st_size > 1000
    state = torch.load(out / "model.pt")
    assert set(state) == {"W_in", "W_rec", "b_rec", "W_out", "b_out"}
    assert json.loads((out / "config.json").read_text())["algorithm"] == "bptt()"
    printed = capsys.readouterr().out
    assert "test_acc" in printed and "digits" in printed


def test_cli_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ["--task", "--algorithm", "--hidden", "--steps", "--lr", "--seed", "--out",
                 "--update-every", "--batch-size", "--activation", "--alpha", "--resume"]:
        assert flag in text


def test_cli_bad_algorithm(capsys):
    rc = main(["train", "--algorithm", "nope", "--steps", "1", "--no-progress"])
    assert rc == 2
    assert "unknown algorithm 'nope'" in capsys.readouterr().err


def test_resume_on_a_stream_gives_the_uninterrupted_result(tmp_path):
    """Online RTRL on one continuous stream: the stream and the algorithm state resume too."""

    def run(out, steps, resume=False):
        torch.manual_seed(0)
        task = get_task("stream_add", seq_len=10, streaming=True)
        m = rnngrad.RNN(2, 6, 1, readout="sigmoid", dtype=torch.float64)
        return train(m, task, algorithm=rnngrad.rtrl(), steps=steps, optimizer="sgd", lr=0.05,
                     update_every=1, log_every=2, out=out, checkpoint_every=2,
                     resume=resume).model

    full = run(tmp_path / "a", 6)
    run(tmp_path / "b", 4)
    resumed = run(tmp_path / "b", 6, resume=True)
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_online_bptt_is_cut_at_each_update_like_tbptt():
    """--update-every k with BPTT flushes (cuts) at each update: it trains like tbptt(k)."""
    task = get_task("sine", seq_len=6)
    torch.manual_seed(2)
    m1 = rnngrad.RNN(1, 5, 1, dtype=torch.float64)
    m2 = rnngrad.RNN(1, 5, 1, dtype=torch.float64)
    m3 = rnngrad.RNN(1, 5, 1, dtype=torch.float64)
    m2.load_state_dict(m1.state_dict())
    m3.load_state_dict(m1.state_dict())
    for m, algo, every in ((m1, rnngrad.bptt(), 3), (m2, rnngrad.tbptt(3), 3),
                           (m3, rnngrad.bptt(), None)):
        train(m, task, algorithm=algo, steps=3, lr=1e-1, optimizer="sgd", log_every=3,
              update_every=every, batch_size=4)
    for (n, a), b in zip(m1.named_parameters(), m2.parameters()):
        assert torch.allclose(a, b, atol=1e-12), n
    # and it is not the same as one update per sequence
    assert not torch.allclose(m1.W_rec, m3.W_rec, atol=1e-6)
