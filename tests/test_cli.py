"""The CLI's subcommands, end to end on tiny settings."""

import csv
import errno
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

import rnngrad
from rnngrad.cli import _Lines, _progress, main
from rnngrad.outdir import OutputDir


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


# ---- one clear line for every way a run can go wrong -------------------------------------

TINY = ["train", "--task", "adding", "--seq-len", "4", "--hidden", "3", "--batch-size", "4",
        "--steps", "4", "--log-every", "2", "--no-progress"]


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == (f"rnngrad {rnngrad.__version__} "
                                               f"(torch {torch.__version__})")


def test_compare_help_states_the_hidden_size_it_runs(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "number of hidden units H per layer (default: 32)" in text
    assert "exit codes: 0 done; 1 training diverged" in text


def test_a_diverging_run_exits_1_with_one_line(tmp_path, capsys):
    rc = main([*TINY, "--algorithm", "rtrl", "--update-every", "1", "--optimizer", "sgd",
               "--lr", "1e6", "--clip", "0", "--steps", "8", "--checkpoint-every", "1",
               "--out", str(tmp_path)])
    assert rc == 1
    line = _one_line(capsys.readouterr().err)
    # the loss is NaN at step 4 (train's own check or the algorithm's may say so first)
    assert line.startswith("rnngrad train: training diverged at step 4: ")
    assert "the checkpoint of step 3 is kept" in line
    assert not (tmp_path / "model.pt").exists()


def test_resume_without_a_checkpoint_starts_fresh_saying_so(tmp_path, capsys):
    assert main([*TINY, "--out", str(tmp_path), "--resume"]) == 0
    assert _one_line(capsys.readouterr().err) == (f"rnngrad train: no checkpoint in {tmp_path}: "
                                                  "starting fresh")


def test_resume_messages_and_refusals(tmp_path, capsys):
    out = ["--out", str(tmp_path), "--checkpoint-every", "2"]
    assert main([*TINY, *out]) == 0
    capsys.readouterr()
    assert main([*TINY, *out]) == 2  # a fresh run would overwrite the finished one
    assert (f"{tmp_path} holds a finished run (config.json, metrics.csv, model.pt, "
            "checkpoint.pt, ...): continue it with --resume, replace it with --overwrite, or "
            "give another output directory") in _one_line(capsys.readouterr().err)
    assert main([*TINY, *out, "--resume", "--seed", "1"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "is from a different run (seed 0 there, 1 here)" in line
    assert main([*TINY, *out, "--resume", "--steps", "6"]) == 0
    assert _one_line(capsys.readouterr().err) == (
        f"rnngrad train: resuming {tmp_path / 'checkpoint.pt'} from step 4")
    (tmp_path / "checkpoint.pt").write_bytes(b"\x00" * 10)
    assert main([*TINY, *out, "--resume", "--steps", "6"]) == 3
    assert "cannot be read (truncated or corrupt" in _one_line(capsys.readouterr().err)


def test_out_is_a_file(tmp_path, capsys):
    f = tmp_path / "f"
    f.write_text("x")
    assert main([*TINY, "--out", str(f)]) == 3
    assert _one_line(capsys.readouterr().err) == (
        f"rnngrad train: error: {f} is not a directory (it, or a folder above it, is a file)")


@pytest.mark.parametrize("code, says", [(errno.ENOSPC, "no space left on the device writing"),
                                        (errno.EACCES, "cannot write"),
                                        (errno.EROFS, "a read-only place")])
def test_disk_full_or_read_only_is_one_line(tmp_path, capsys, monkeypatch, code, says):
    import rnngrad.train as train_module

    real = train_module.atomic_write

    def failing(path, data):
        if path.name == "checkpoint.pt" and (tmp_path / "checkpoint.pt").exists():
            raise OSError(code, os.strerror(code), str(path))
        real(path, data)

    monkeypatch.setattr(train_module, "atomic_write", failing)
    assert main([*TINY, "--out", str(tmp_path), "--checkpoint-every", "2"]) == 3
    line = _one_line(capsys.readouterr().err)
    assert says in line and str(tmp_path / "checkpoint.pt") in line
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 2  # intact


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_really_read_only_directory(tmp_path, capsys):
    tmp_path.chmod(0o500)
    try:
        assert main([*TINY, "--out", str(tmp_path / "run")]) == 3
    finally:
        tmp_path.chmod(0o700)
    assert "cannot write" in _one_line(capsys.readouterr().err)


def test_a_directory_held_by_another_run(tmp_path, capsys):
    with OutputDir(tmp_path):
        assert main([*TINY, "--out", str(tmp_path)]) == 3
    line = _one_line(capsys.readouterr().err)
    assert f"is in use by another run (pid {os.getpid()} on " in line


def test_the_stream_tasks_losses_are_labelled(tmp_path, capsys):
    assert main(["train", "--task", "stream_add", "--seq-len", "12", "--hidden", "3",
                 "--batch-size", "2", "--steps", "2", "--log-every", "2", "--no-progress",
                 "--out", str(tmp_path)]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    for label in ("test_loss (sum/seq)", "test_loss (per step)", "test_mse (per step)"):
        assert label in header


def test_progress_is_throttled_when_stderr_is_not_a_terminal(capsys):
    bar = _progress(1000, disable=False)
    assert isinstance(bar, _Lines)  # pytest's stderr is not a TTY
    for _ in range(1000):
        bar.update(1)
        bar.set_postfix(loss="0.1")
    assert capsys.readouterr().err == ""  # nothing within 30 s
    lines = _Lines(10, every=0.0)
    lines.set_postfix(loss="0.5")
    lines.update(3)
    assert capsys.readouterr().err == "3/10 loss=0.5\n"


def test_train_progress_in_a_log_is_quiet(tmp_path, capsys, monkeypatch):
    """Without --no-progress and with stderr not a terminal: plain lines, at most every 30 s."""
    import rnngrad.cli as cli

    monkeypatch.setattr(cli, "PLAIN_PROGRESS_EVERY", 0.0)
    args = [a for a in TINY if a != "--no-progress"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("2/4 loss/seq=") and "test_mse/step=" in err[0] and len(err) == 2


def test_sweep_without_ray_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    assert main(["sweep", "--out", str(tmp_path / "s"), "--no-progress"]) == 2
    assert "pip install 'rnngrad[ray]'" in _one_line(capsys.readouterr().err)


def test_compare_needs_no_ray(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    assert main(["compare", "--task", "adding", "--seq-len", "4", "--algorithms", "bptt",
                 "--seeds", "1", "--steps", "2", "--hidden", "3", "--track-every", "0",
                 "--out", str(tmp_path), "--no-progress"]) == 0


def test_sweep_command_table_and_exit_code(tmp_path, capsys, monkeypatch):
    """The CLI's plumbing (the trials run in this process; test_sweep runs them on Ray)."""
    import rnngrad.sweep as sweep_module

    def serial(jobs, *, workers, address, checkpoint_every, finished):
        for config, tdir in jobs:
            finished(sweep_module.run_trial(config, tdir, checkpoint_every=checkpoint_every))

    monkeypatch.setattr(sweep_module, "_run_on_ray", serial)
    monkeypatch.setattr(sweep_module, "_import_ray", lambda: None)
    args = ["sweep", "--task", "adding", "--seq-len", "4", "--algorithms", "bptt,eprop",
            "--hidden", "3,4", "--lr", "0.05", "--seeds", "1", "--steps", "2",
            "--log-every", "2", "--batch-size", "4", "--out", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "adding: 4 trials (4 ok, 0 diverged, 0 failed)" in captured.out
    assert captured.err.strip() == "rnngrad sweep: 4 trials: 4 to run on a local Ray, 2 workers"
    with open(tmp_path / "sweep.csv") as f:
        assert [(r["algorithm"], r["hidden"]) for r in csv.DictReader(f)] == [
            ("bptt", "3"), ("bptt", "4"), ("eprop", "3"), ("eprop", "4")]
    assert main(args) == 2
    assert "already holds a sweep" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    assert "0 to run" in capsys.readouterr().err


KILL_ARGS = ("train", "--task", "adding", "--seq-len", "5", "--hidden", "4", "--batch-size", "4",
             "--steps", "1000", "--log-every", "500", "--dtype", "float64", "--no-progress")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "rnngrad.cli", *args]


def _wait_for(path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < timeout, "no checkpoint appeared"
        time.sleep(0.005)


def test_ctrl_c_says_where_the_checkpoint_is_and_how_to_continue(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cli(*KILL_ARGS, "--checkpoint-every", "20", "--out", str(out)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(out / "checkpoint.pt", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "interrupted; the checkpoint of step" in lines[0] and str(out / "checkpoint.pt") in err
    command = lines[0].split("continue with: ")[1]
    tokens = shlex.split(command)
    assert tokens[0] == "rnngrad" and "--resume" in tokens
    assert main(tokens[1:]) == 0
    assert torch.isfinite(torch.load(out / "model.pt")["W_rec"]).all()
    assert os.path.exists(out / "metrics.csv")


# ---- the command line a person expects --------------------------------------------------

@pytest.mark.parametrize("command, typo, suggestion", [
    ("train", "--hid", "--hidden"),           # an abbreviation is not accepted
    ("train", "--hiden", "--hidden"),
    ("compare", "--algoritms", "--algorithms"),
    ("compare", "--track-alignmnt", "--track-alignment"),
    ("check", "--zzz", None),
])
def test_a_mistyped_flag_shows_the_subcommands_usage_and_the_nearest_flag(
        command, typo, suggestion, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, typo, "3"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: rnngrad {command} ")
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"rnngrad {command}: error: unrecognized argument")
    if suggestion:
        assert last.endswith(f"did you mean {suggestion}?")


def test_train_compare_and_sweep_share_flag_names_and_defaults():
    from rnngrad.cli import build_parser
    from rnngrad.runs import DEFAULTS

    subs = {a.dest: a for a in build_parser()._actions if a.dest == "command"}["command"].choices
    parsed = {c: vars(subs[c].parse_args([])) for c in ("train", "compare", "sweep")}
    for key in ("steps", "batch_size", "optimizer", "clip", "log_every", "activation",
                "layers", "dtype", "device", "loss", "threads", "seq_len", "task"):
        values = {c: p[key] for c, p in parsed.items()}
        assert len(set(map(str, values.values()))) == 1, (key, values)
    assert parsed["train"]["lr"] == parsed["compare"]["lr"] == DEFAULTS["lr"]
    assert parsed["sweep"]["lr"] == [DEFAULTS["lr"]]
    assert parsed["train"]["hidden"] == parsed["compare"]["hidden"] == DEFAULTS["hidden"]
    assert parsed["sweep"]["hidden"] == [DEFAULTS["hidden"]]  # sweep's flags take lists
    assert parsed["train"]["cell"] == parsed["compare"]["cell"] == "elman"
    assert parsed["sweep"]["cell"] == ["elman"]
    assert (parsed["train"]["steps"], parsed["train"]["batch_size"]) == (
        DEFAULTS["steps"], DEFAULTS["batch_size"])


def test_old_spellings_work_and_are_announced_as_deprecated(tmp_path, capsys):
    assert main(["compare", "--task", "adding", "--seq-len", "4", "--algorithms", "bptt,eprop",
                 "--seeds", "1", "--steps", "4", "--hidden", "3", "--track-every", "2",
                 "--out", str(tmp_path), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert err.strip() == ("rnngrad compare: --track-every is deprecated; use "
                           "--track-alignment (same meaning)")
    with open(tmp_path / "alignment.csv") as f:
        assert [r["step"] for r in csv.DictReader(f) if r["algorithm"] == "eprop"] == ["2", "4"]
    from rnngrad.cli import build_parser

    args = build_parser().parse_args(["sweep", "--cells", "gru,lstm"])
    assert args.cell == ["gru", "lstm"] and args._deprecated == [("--cells", "--cell")]


@pytest.mark.parametrize("flags, says", [
    (["--device", "meta"], "--device 'meta' holds shapes but no values"),
    (["--device", "nope"], "--device 'nope' is not a torch device"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "cuda:99"],
     "--device 'cuda"),
    (["--task", "digits", "--seq-len", "5"],
     "seq_len: task 'digits' has no length to set (its sequences are 8 steps); the tasks that "
     "take one: adding, sine, stream_add"),
    (["--task", "digits", "--loss", "mse"], "loss 'mse' does not fit task 'digits'"),
    (["--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
])
@pytest.mark.parametrize("command", ["train", "compare"])
def test_unusable_settings_are_one_line_before_anything_is_written(
        tmp_path, monkeypatch, capsys, flags, says, command):
    if command == "compare" and "--resume" in flags:
        return  # compare has no --resume
    monkeypatch.chdir(tmp_path)
    assert main([command, "--steps", "2", "--no-progress", *flags]) == 2
    assert says in _one_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_unknown_device_before_anything_is_written_on_every_command(tmp_path, monkeypatch,
                                                                    capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--device", "meta"]) == 2
    assert "--device 'meta' holds shapes but no values" in _one_line(capsys.readouterr().err)
    assert main(["sweep", "--device", "meta", "--no-progress"]) == 2
    assert "--device 'meta'" in _one_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_threads_sets_torch_threads(monkeypatch):
    import rnngrad.cli as cli

    asked = []
    monkeypatch.setattr(torch, "set_num_threads", asked.append)
    monkeypatch.setattr(cli, "cmd_check", lambda args: 0)
    build = cli.build_parser

    def parser():
        p = build()
        for a in p._actions:
            if a.dest == "command":
                a.choices["check"].set_defaults(func=cli.cmd_check)
        return p

    monkeypatch.setattr(cli, "build_parser", parser)
    assert main(["check", "--threads", "2"]) == 0
    assert main(["check"]) == 0
    assert asked == [2, cli.DEFAULT_THREADS]
    with pytest.raises(SystemExit):
        main(["check", "--threads", "0"])


def test_train_refuses_a_finished_run_and_overwrite_replaces_it(tmp_path, capsys):
    out = ["--out", str(tmp_path)]
    assert main([*TINY, *out]) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    capsys.readouterr()
    assert main([*TINY, *out, "--seed", "1"]) == 2
    assert _one_line(capsys.readouterr().err) == (
        f"rnngrad train: error: {tmp_path} holds a finished run (config.json, metrics.csv, "
        "model.pt, curve.png): replace it with --overwrite, or give another output directory")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert main([*TINY, *out, "--seed", "1", "--overwrite"]) == 0
    assert '"seed": 1' in (tmp_path / "config.json").read_text()


def test_compare_refuses_a_finished_comparison_and_overwrite_replaces_it(tmp_path, capsys):
    args = ["compare", "--task", "adding", "--seq-len", "4", "--algorithms", "bptt",
            "--seeds", "1", "--steps", "2", "--hidden", "3", "--track-alignment", "0",
            "--out", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    before = (tmp_path / "compare.csv").read_bytes()
    capsys.readouterr()
    assert main([*args, "--steps", "3"]) == 2
    assert "holds a finished run (compare.csv, curves.csv, alignment.csv, " \
           "learning_curves.png): replace it with --overwrite" in _one_line(
               capsys.readouterr().err)
    assert (tmp_path / "compare.csv").read_bytes() == before
    assert main([*args, "--steps", "3", "--overwrite"]) == 0
    assert (tmp_path / "compare.csv").read_bytes() != before


def test_steady_refuses_a_finished_run(tmp_path, capsys):
    args = ["train", "--model", "steady", "--hidden", "8", "--steps", "2", "--log-every", "1",
            "--out", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    with open(tmp_path / "metrics.csv") as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["1", "2"]
    capsys.readouterr()
    assert main(args) == 2
    assert "holds a finished run" in _one_line(capsys.readouterr().err)
    assert main([*args, "--overwrite"]) == 0


def test_tensorboard_missing_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.chdir(tmp_path)
    assert main([*TINY, "--tensorboard", "tb"]) == 2
    assert _one_line(capsys.readouterr().err) == (
        "rnngrad train: error: --tensorboard needs the tensorboard package, which is not "
        "installed: pip install tensorboard")
    assert list(tmp_path.iterdir()) == []


def test_compare_tensorboard_missing_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.chdir(tmp_path)
    assert main(["compare", "--steps", "2", "--no-progress", "--tensorboard", "tb"]) == 2
    assert "--tensorboard needs the tensorboard package" in _one_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_compare_tensorboard_logs_each_run(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(["compare", "--task", "adding", "--seq-len", "4", "--algorithms", "bptt,eprop",
                 "--seeds", "1", "--steps", "4", "--hidden", "3", "--log-every", "2",
                 "--out", str(tmp_path / "cmp"), "--tensorboard", str(tmp_path / "tb"),
                 "--no-progress"]) == 0
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("eprop/seed0/test_loss")] == [0, 2, 4]


def test_tensorboard_logs_as_training_goes(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main([*TINY, "--out", str(tmp_path / "run"), "--tensorboard",
                 str(tmp_path / "tb")]) == 0
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("test_loss")] == [2, 4]
