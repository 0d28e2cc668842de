import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import rnngrad
from rnngrad.cli import main
from rnngrad.outdir import RunExists
from rnngrad.registry import ALGORITHMS
from rnngrad.runs import run
from rnngrad.tasks import get_task
from rnngrad.train import (
    CheckpointError,
    CheckpointExists,
    ConfigMismatch,
    Diverged,
    load_checkpoint,
    train,
)


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


# ---- runs that survive: resume, divergence, checkpoints ---------------------------------

SPECS = [n + (":3" if ALGORITHMS[n][1] else "") for n in ALGORITHMS]
STREAM = dict(task="stream_add", seq_len=6, stream=True, update_every=2, hidden=4, batch_size=3,
              optimizer="sgd", lr=0.1, log_every=2, dtype="float64")
SEQUENCES = dict(task="adding", seq_len=5, hidden=4, batch_size=3, log_every=2, dtype="float64")


def _resumed_equals_uninterrupted(tmp_path, config, steps=6, cut=3):
    full = run({**config, "steps": steps}).model
    run({**config, "steps": cut}, out=tmp_path / "run", checkpoint_every=cut)  # "interrupted"
    resumed = run({**config, "steps": steps}, out=tmp_path / "run", checkpoint_every=cut,
                  resume=True).model
    return [n for (n, a), b in zip(full.named_parameters(), resumed.parameters())
            if not torch.equal(a, b)]


@pytest.mark.parametrize("spec", SPECS)
def test_every_algorithm_resumes_bit_identically_online_on_a_stream(tmp_path, spec):
    """The stream, the carried algorithm state and the algorithm's generators resume."""
    assert _resumed_equals_uninterrupted(tmp_path, {**STREAM, "algorithm": spec}) == []


@pytest.mark.parametrize("spec", ["uoro", "kf_rtrl"])
def test_randomised_algorithms_resume_bit_identically_per_sequence(tmp_path, spec):
    assert _resumed_equals_uninterrupted(tmp_path, {**SEQUENCES, "algorithm": spec}) == []


def test_resume_without_the_algorithms_generators_would_differ(tmp_path, monkeypatch):
    """The check above has teeth: UORO resumed with fresh noise is not the same run."""
    import rnngrad.train as train_module

    monkeypatch.setattr(train_module, "set_rng_state", lambda algorithm, state: None)
    assert _resumed_equals_uninterrupted(tmp_path, {**STREAM, "algorithm": "uoro"}) != []


def test_checkpoint_every_n_steps_not_only_on_logging_steps(tmp_path):
    seen = []
    run({**SEQUENCES, "algorithm": "bptt", "steps": 10, "log_every": 7}, out=tmp_path,
        checkpoint_every=3, on_event=lambda kind, info: seen.append((kind, info["step"])))
    assert seen == [("start", 0), ("checkpoint", 3), ("checkpoint", 6), ("checkpoint", 9),
                    ("checkpoint", 10)]
    ck = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ck["step"] == 10 and ck["config"]["run"]["algorithm"] == "bptt"


def _finite(state):
    return all(torch.isfinite(t).all() for t in state.values())


@pytest.mark.parametrize("online", [False, True], ids=["per_sequence", "online"])
def test_a_nonfinite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, online):
    """SGD at lr 1e6 without clipping: the loss is NaN at step 4 (per sequence and with an
    update every time step alike); nothing of it reaches the checkpoint or model.pt."""
    config = {**SEQUENCES, "algorithm": "rtrl", "update_every": 1 if online else None,
              "optimizer": "sgd", "lr": 1e6, "clip": None, "steps": 8, "dtype": "float32",
              "seq_len": 6}
    with pytest.raises(Diverged) as info:
        run(config, out=tmp_path, checkpoint_every=1)
    e = info.value
    assert e.step == 4 and e.checkpoint_step == 3
    # (train's own check or the algorithm's may be the one to see the NaN)
    assert str(e).startswith("training diverged at step 4: ")
    assert f"the checkpoint of step 3 is kept in {tmp_path / 'checkpoint.pt'}" in str(e)
    ck = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ck["step"] == 3 and _finite(ck["model"])
    assert not (tmp_path / "model.pt").exists()
    with open(tmp_path / "metrics.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [2]


def test_a_nonfinite_gradient_is_not_applied():
    torch.manual_seed(0)
    m = rnngrad.RNN(2, 3, 1)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    grads = {n: torch.zeros_like(p) for n, p in m.named_parameters()}
    grads["W_rec"][1, 2] = float("inf")
    from rnngrad.train import NonFinite, apply_update

    with pytest.raises(NonFinite, match=r"the gradient is not finite \(inf in W_rec\)"):
        apply_update(m, torch.optim.SGD(m.parameters(), lr=0.1), grads, 1.0, check=True)
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    config = {**SEQUENCES, "algorithm": "bptt", "steps": 4}
    run(config, out=tmp_path, checkpoint_every=2)
    for change, named in (({"lr": 0.5}, "lr 0.01 there, 0.5 here"),
                          ({"seed": 3}, "seed 0 there, 3 here"),
                          ({"algorithm": "rtrl"}, "algorithm"),
                          ({"hidden": 5}, "hidden 4 there, 5 here"),
                          ({"task": "sine"}, "task")):
        with pytest.raises(ConfigMismatch, match="is from a different run") as info:
            run({**config, **change, "steps": 6}, out=tmp_path, checkpoint_every=2,
                resume=True)
        assert named in str(info.value) and "\n" not in str(info.value)
    # longer runs and other logging intervals are the same run
    run({**config, "steps": 6, "log_every": 3}, out=tmp_path, checkpoint_every=2, resume=True)


def test_a_corrupt_checkpoint_is_one_clear_error(tmp_path):
    config = {**SEQUENCES, "algorithm": "bptt", "steps": 4}
    run(config, out=tmp_path, checkpoint_every=2)
    path = tmp_path / "checkpoint.pt"
    data = path.read_bytes()
    for broken in (data[: len(data) // 2], b"", b"not a checkpoint at all"):
        path.write_bytes(broken)
        with pytest.raises(CheckpointError, match="cannot be read") as info:
            run(config, out=tmp_path, checkpoint_every=2, resume=True)
        assert "\n" not in str(info.value)


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.mark.parametrize("checkpoint_every", [2, None])
def test_a_fresh_run_never_overwrites_a_finished_one(tmp_path, checkpoint_every):
    config = {**SEQUENCES, "algorithm": "bptt", "steps": 4}
    run(config, out=tmp_path, checkpoint_every=checkpoint_every)
    before = _files(tmp_path)
    with pytest.raises(RunExists, match="holds a finished run") as info:
        run(config, out=tmp_path, checkpoint_every=checkpoint_every)
    assert "replace it with --overwrite, or give another output directory" in str(info.value)
    assert ("continue it with --resume" in str(info.value)) == (checkpoint_every is not None)
    assert _files(tmp_path) == before  # every byte of every file
    if checkpoint_every is None:  # a finished run with no checkpoint: nothing to resume
        with pytest.raises(RunExists, match="and no checkpoint to resume from"):
            run(config, out=tmp_path, resume=True)
        assert _files(tmp_path) == before
    # CheckpointExists stays the name of the old refusal, for callers that catch it
    assert issubclass(CheckpointExists, ValueError)


def test_overwrite_replaces_the_earlier_run_and_keeps_other_files(tmp_path):
    run({**SEQUENCES, "algorithm": "bptt", "steps": 4, "log_every": 1}, out=tmp_path,
        checkpoint_every=2)
    (tmp_path / "notes.txt").write_text("mine")
    run({**SEQUENCES, "algorithm": "eprop", "steps": 2, "log_every": 2}, out=tmp_path,
        overwrite=True)
    assert not (tmp_path / "checkpoint.pt").exists()  # the earlier run's, removed
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert json.loads((tmp_path / "config.json").read_text())["run"]["algorithm"] == "eprop"
    with open(tmp_path / "metrics.csv") as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["2"]
    with pytest.raises(ValueError, match="exclude each other"):
        run(SEQUENCES, out=tmp_path, resume=True, overwrite=True)


def test_a_refused_run_writes_nothing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"kf_rtrl\(\) is defined for one Elman layer"):
        run({**SEQUENCES, "cell": "gru", "algorithm": "kf_rtrl"}, out=out)
    with pytest.raises(ValueError, match="seq_len: task 'digits' has no length to set"):
        run({"task": "digits", "seq_len": 5}, out=out)
    with pytest.raises(ValueError, match="device 'meta' holds shapes but no values"):
        run({**SEQUENCES, "device": "meta"}, out=out)
    assert not out.exists()


def test_the_log_grows_as_training_goes(tmp_path):
    seen = []

    def callback(step, row):
        with open(tmp_path / "metrics.csv") as f:
            seen.append([int(r["step"]) for r in csv.DictReader(f)])

    run({**SEQUENCES, "steps": 3, "log_every": 1}, out=tmp_path, callback=callback)
    assert seen == [[1], [1, 2], [1, 2, 3]]


def test_a_killed_run_keeps_its_log_and_resume_appends_without_duplicates(tmp_path):
    config = {**SEQUENCES, "algorithm": "rtrl", "steps": 6, "log_every": 1}

    def kill_at_5(step, row):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(config, out=tmp_path, checkpoint_every=3, callback=kill_at_5)
    with open(tmp_path / "metrics.csv") as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["1", "2", "3", "4", "5"]
    run(config, out=tmp_path, checkpoint_every=3, resume=True)  # from the checkpoint of step 3
    whole = tmp_path / "whole"
    run(config, out=whole)
    with open(tmp_path / "metrics.csv") as f, open(whole / "metrics.csv") as g:
        resumed, uninterrupted = list(csv.DictReader(f)), list(csv.DictReader(g))
    assert [r["step"] for r in resumed] == ["1", "2", "3", "4", "5", "6"]
    for a, b in zip(resumed, uninterrupted, strict=True):
        assert {k: v for k, v in a.items() if k != "steps_per_s"} == {
            k: v for k, v in b.items() if k != "steps_per_s"}


def test_alignment_is_logged_every_n_steps_whatever_log_every(tmp_path):
    result = run({**SEQUENCES, "algorithm": "eprop", "steps": 6, "log_every": 6,
                  "track_alignment": 2}, out=tmp_path)
    assert [(r["step"], "cosine" in r) for r in result.history] == [
        (2, True), (4, True), (6, True)]
    with open(tmp_path / "metrics.csv") as f:
        assert all(-1 <= float(r["cosine"]) <= 1 for r in csv.DictReader(f))


def test_the_loss_follows_the_readout():
    from rnngrad.train import loss_for

    digits, adding, stream = get_task("digits"), get_task("adding"), get_task("stream_add")
    assert loss_for(digits, "softmax") == "cross_entropy"
    assert loss_for(stream, "sigmoid") == "bce"
    assert loss_for(adding, "identity") == "mse"
    assert loss_for(stream, "sigmoid", "mse") == "mse"  # through the sigmoid
    with pytest.raises(ValueError, match="its targets are class indices"):
        loss_for(digits, "softmax", "mse")
    with pytest.raises(ValueError, match="pairs with readout 'identity' or 'sigmoid'"):
        loss_for(digits, "softmax", "bce")
    with pytest.raises(ValueError, match="unknown loss 'l1'"):
        loss_for(adding, "identity", "l1")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "rnngrad.cli", *args]


KILL_ARGS = ("train", "--task", "adding", "--seq-len", "5", "--hidden", "4", "--batch-size", "4",
             "--steps", "1000", "--log-every", "500", "--dtype", "float64", "--no-progress")


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < timeout, "no checkpoint appeared"
        time.sleep(0.005)


def test_kill_9_then_resume_equals_the_uninterrupted_run(tmp_path):
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(*KILL_ARGS, "--checkpoint-every", "20", "--out", str(killed)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for(killed / "checkpoint.pt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    step = load_checkpoint(killed / "checkpoint.pt")["step"]
    assert 20 <= step < 1000 and not (killed / "model.pt").exists()
    assert main([*KILL_ARGS, "--checkpoint-every", "20", "--out", str(killed), "--resume"]) == 0
    assert main([*KILL_ARGS, "--out", str(tmp_path / "whole")]) == 0
    a = torch.load(killed / "model.pt")
    b = torch.load(tmp_path / "whole" / "model.pt")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # the temporary files of the killed writer are gone, and so is the lock
    assert sorted(p.name for p in killed.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("extra", [{}, {"update_every": 100},
                                   {"task": "stream_add", "stream": True, "update_every": 12,
                                    "seq_len": 12}], ids=["per_sequence", "online", "stream"])
def test_alignment_is_measured_on_the_weights_the_gradient_saw(extra):
    """BPTT against BPTT is exactly aligned: the reference runs before the update (on the
    batch's starting weights and hidden state), not after it."""
    history = run({**SEQUENCES, "algorithm": "bptt", "steps": 4, "track_alignment": 2,
                   "lr": 0.5, **extra}).history
    tracked = [r for r in history if "cosine" in r]
    assert [r["step"] for r in tracked] == [2, 4]
    for r in tracked:
        assert r["cosine"] == pytest.approx(1.0, abs=1e-12)
        assert r["norm_ratio"] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("cell", ["gru", "lstm", "alif", "lru"])
@pytest.mark.parametrize("spec", ["bptt", "rtrl", "uoro"])
def test_networks_of_any_cell_resume_bit_identically_on_a_stream(tmp_path, cell, spec):
    """A two-layer network of the cell: its state (every component), the stream and the
    algorithm's generators resume as the Elman layer's do."""
    config = {**STREAM, "algorithm": spec, "cell": cell, "layers": 2}
    assert _resumed_equals_uninterrupted(tmp_path, config) == []
