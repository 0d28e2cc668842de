"""The output directory: one run at a time, stale locks taken over, whole files only."""

import errno
import json
import os
import subprocess
import sys
import time

import pytest

from rnngrad.outdir import LOCK_NAME, OutputDir, OutputLocked, atomic_write

HOLD = ("import sys, time; from rnngrad.outdir import OutputDir\n"
        "with OutputDir(sys.argv[1]):\n"
        "    print('held', flush=True); time.sleep(60)\n")


def test_a_second_run_is_refused_naming_the_first_runs_pid(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(OutputLocked, match=f"in use by another run \\(pid {proc.pid} on ") \
                as info:
            with OutputDir(tmp_path):
                pass
        assert info.value.pid == proc.pid
    finally:
        proc.kill()
        proc.communicate()
    # killed (-9: no clean-up ran): its lock is stale and is taken over
    assert (tmp_path / LOCK_NAME).exists()
    with OutputDir(tmp_path):
        owner = json.loads((tmp_path / LOCK_NAME).read_text())
        assert owner["pid"] == os.getpid()
    assert not (tmp_path / LOCK_NAME).exists()


def test_the_same_process_cannot_hold_one_directory_twice(tmp_path):
    with OutputDir(tmp_path):
        with pytest.raises(OutputLocked):
            with OutputDir(tmp_path):
                pass
    with OutputDir(tmp_path):  # released
        pass


def test_a_stale_lock_file_with_a_dead_pid_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": "x", "since": "y"}))
    with OutputDir(tmp_path):
        pass


def test_a_file_is_not_an_output_directory(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(NotADirectoryError) as info:
        with OutputDir(f):
            pass
    assert info.value.filename == str(f)


def test_atomic_write_leaves_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    atomic_write(path, b"old")
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as info:
        atomic_write(path, b"new")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary left


def test_temporaries_of_a_killed_writer_are_removed_by_the_next_owner(tmp_path):
    (tmp_path / ".checkpoint.pt.abc123.tmp").write_bytes(b"torn")
    (tmp_path / "keep.tmp").write_bytes(b"not ours")
    with OutputDir(tmp_path):
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME, "keep.tmp"]


def test_temporary_names_never_collide(tmp_path, monkeypatch):
    """Two writers of one file each get their own temporary (mkstemp), unlike `path.tmp`."""
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append(os.path.basename(src))
        time.sleep(0.001)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    for data in (b"a", b"b", b"c"):
        atomic_write(tmp_path / "x", data)
    assert len(set(seen)) == 3 and all(n.startswith(".x.") for n in seen)
    assert (tmp_path / "x").read_bytes() == b"c"


# ---- claim: an earlier run is never overwritten silently ---------------------------------

def test_claim_on_nothing_or_foreign_files_is_new_and_creates_nothing(tmp_path):
    from rnngrad.outdir import claim

    assert claim(tmp_path / "a" / "b") == "new"
    assert not (tmp_path / "a").exists()
    (tmp_path / "notes.txt").write_text("mine")
    assert claim(tmp_path) == "new"


@pytest.mark.parametrize("files, resume, overwrite, answer", [
    (["config.json", "metrics.csv", "model.pt", "checkpoint.pt"], True, False, "resume"),
    (["config.json", "metrics.csv", "model.pt"], False, True, "overwrite"),
    (["config.json", "metrics.csv"], True, False, "overwrite"),  # killed, no checkpoint
    (["config.json", "metrics.csv", "checkpoint.pt"], True, False, "resume"),
])
def test_claim_answers(tmp_path, files, resume, overwrite, answer):
    from rnngrad.outdir import claim

    for name in files:
        (tmp_path / name).write_text("x")
    assert claim(tmp_path, resume=resume, overwrite=overwrite) == answer


@pytest.mark.parametrize("files, resume, says", [
    (["config.json", "metrics.csv", "model.pt", "checkpoint.pt"], False,
     "holds a finished run (config.json, metrics.csv, model.pt, checkpoint.pt): continue it "
     "with --resume, replace it with --overwrite, or give another output directory"),
    (["config.json", "metrics.csv"], False,
     "holds an unfinished run (config.json, metrics.csv): replace it with --overwrite, or give "
     "another output directory"),
    (["model.pt", "metrics.csv"], True,
     "holds a finished run (metrics.csv, model.pt) and no checkpoint to resume from: replace "
     "it with --overwrite, or give another output directory"),
])
def test_claim_refuses_naming_the_run_and_the_ways_forward(tmp_path, files, resume, says):
    from rnngrad.outdir import RunExists, claim

    for name in files:
        (tmp_path / name).write_text("x")
    with pytest.raises(RunExists) as info:
        claim(tmp_path, resume=resume)
    assert str(info.value) == f"{tmp_path} {says}"
    assert info.value.found == [n for n in ("config.json", "metrics.csv", "model.pt",
                                            "checkpoint.pt") if n in files]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)  # untouched


def test_claim_for_a_command_without_resume_and_bad_requests(tmp_path):
    from rnngrad.outdir import RunExists, claim

    (tmp_path / "sweep.csv").write_text("x")
    (tmp_path / "trials").mkdir()
    with pytest.raises(RunExists, match="holds an earlier run \\(sweep.csv, trials\\): "
                                        "replace it with --overwrite"):
        claim(tmp_path, outputs=("sweep.csv", "trials"), checkpoint=None, finished=None,
              resumable=False)
    assert claim(tmp_path, outputs=("sweep.csv", "trials"), checkpoint=None, finished=None,
                 resume=True) == "resume"
    with pytest.raises(ValueError, match="exclude each other"):
        claim(tmp_path, resume=True, overwrite=True)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(NotADirectoryError):
        claim(f)


def test_output_dir_replace_removes_only_the_named_outputs(tmp_path):
    (tmp_path / "metrics.csv").write_text("old")
    (tmp_path / "trials").mkdir()
    (tmp_path / "trials" / "a.csv").write_text("old")
    (tmp_path / "notes.txt").write_text("mine")
    with OutputDir(tmp_path, replace=("metrics.csv", "trials", "model.pt")):
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME, "notes.txt"]
    with pytest.raises(ValueError, match="replace names files in the directory"):
        with OutputDir(tmp_path, replace=("../x",)):
            pass
