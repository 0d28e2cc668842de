"""`file:PATH.npz` tasks: your own arrays, every layout and target kind, the split, bad files."""

import csv

import numpy as np
import pytest
import torch

from rnngrad.cli import main
from rnngrad.tasks import get_task
from rnngrad.tasks.file import FileTask

pytestmark = pytest.mark.usefixtures("one_thread")

N, T, D = 20, 6, 3


def _save(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, T, D)).astype(np.float32)
    y = rng.integers(0, 4, size=(N, T))
    return x, y


def test_ntd_and_tnd_are_the_same_task(tmp_path, data):
    x, y = data
    a = get_task(f"file:{_save(tmp_path / 'a.npz', x=x, y=y)}", layout="NTD")
    b = get_task(f"file:{_save(tmp_path / 'b.npz', x=x.swapaxes(0, 1), y=y.T, layout='TND')}")
    assert (a.input_size, a.output_size, a.seq_len, a.loss) == (D, 4, T, "cross_entropy")
    assert a.readout == "softmax" and a.classification
    for u, v in zip(a.batch(7, generator=3), b.batch(7, generator=3)):
        assert torch.equal(u, v)
    for u, v in zip(a.test_batch(), b.test_batch()):
        assert torch.equal(u, v)


def test_batches_are_the_file_rows_time_major(tmp_path, data):
    x, y = data
    task = FileTask(_save(tmp_path / "d.npz", x=x, y=y, layout="NTD"))
    b = task.batch(5, generator=1)
    assert b.inputs.shape == (T, 5, D) and b.inputs.dtype == torch.float32
    assert b.targets.shape == (T, 5) and b.targets.dtype == torch.int64
    assert torch.equal(b.mask, torch.ones(T, 5))
    # each column is one training row of the file, drawn by the generator
    pick = task.train_index[torch.randint(len(task.train_index), (5,),
                                          generator=torch.Generator().manual_seed(1))]
    assert torch.equal(b.inputs, torch.from_numpy(x[pick.numpy()]).transpose(0, 1))
    assert torch.equal(b.targets, torch.from_numpy(y[pick.numpy()]).T)
    assert not torch.equal(b.inputs, task.batch(5, generator=2).inputs)


def test_split_is_reproducible_and_disjoint(tmp_path, data):
    x, y = data
    path = _save(tmp_path / "d.npz", x=x, y=y)
    t1 = FileTask(path, layout="NTD", test_fraction=0.25, split_seed=4)
    t2 = FileTask(path, layout="NTD", test_fraction=0.25, split_seed=4)
    t3 = FileTask(path, layout="NTD", test_fraction=0.25, split_seed=5)
    assert len(t1.test_index) == 5 and len(t1.train_index) == 15
    assert torch.equal(t1.test_index, t2.test_index)
    assert not torch.equal(t1.test_index, t3.test_index)
    assert sorted(torch.cat([t1.train_index, t1.test_index]).tolist()) == list(range(N))
    assert torch.equal(t1.test_batch().inputs,
                       torch.from_numpy(x[t1.test_index.numpy()]).transpose(0, 1))
    # at least one sequence on each side however small the fraction
    tiny = FileTask(path, layout="NTD", test_fraction=0.001)
    assert len(tiny.test_index) == 1


def test_one_class_per_sequence_is_asked_at_the_last_step(tmp_path, data):
    x, _ = data
    y = np.arange(N) % 3
    task = FileTask(_save(tmp_path / "d.npz", x=x, y=y), layout="NTD")
    b = task.test_batch()
    idx = task.test_index.numpy()
    assert torch.equal(b.mask, torch.cat([torch.zeros(T - 1, len(idx)),
                                          torch.ones(1, len(idx))]))
    assert torch.equal(b.targets[-1], torch.from_numpy(y[idx]))
    assert task.output_size == 3


def test_a_mask_in_the_file_is_used(tmp_path, data):
    x, y = data
    mask = np.zeros((N, T), dtype=bool)
    mask[:, 2:4] = True
    task = FileTask(_save(tmp_path / "d.npz", x=x.swapaxes(0, 1), y=y.T, mask=mask.T),
                    layout="TND")
    b = task.batch(4, generator=0)
    assert torch.equal(b.mask, torch.from_numpy(mask[:4].T.astype(np.float32)))


def test_float_targets_train_with_mse_or_bce(tmp_path, data):
    x, _ = data
    rng = np.random.default_rng(1)
    y = rng.uniform(size=(N, T, 2))
    task = FileTask(_save(tmp_path / "r.npz", x=x, y=y), layout="NTD")
    assert (task.loss, task.readout, task.output_size, task.classification) == (
        "mse", "identity", 2, False)
    b = task.batch(3, generator=0)
    assert b.targets.shape == (T, 3, 2) and b.targets.dtype == torch.float32
    bce = FileTask(tmp_path / "r.npz", layout="NTD", loss="bce")
    assert (bce.loss, bce.readout) == ("bce", "sigmoid")
    # one vector per sequence (N, K): at the last step
    last = FileTask(_save(tmp_path / "s.npz", x=x.swapaxes(0, 1), y=y[:, 0], layout="TND"))
    tb = last.test_batch()
    assert torch.equal(tb.targets[-1], torch.from_numpy(y[last.test_index.numpy(), 0]).float())
    assert tb.mask[:-1].sum() == 0 and bool(tb.mask[-1].all())


def test_integer_and_bool_inputs_become_float(tmp_path):
    x = (np.arange(N * T * D).reshape(N, T, D) % 2).astype(bool)
    task = FileTask(_save(tmp_path / "b.npz", x=x, y=np.zeros(N, dtype=np.int32)), layout="NTD")
    assert task.batch(2, generator=0).inputs.dtype == torch.float32
    assert task.output_size == 1


def test_training_on_a_file_task_learns(tmp_path):
    # remember the sign of the first input: a file task of 400 sequences
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 5, 2)).astype(np.float32)
    y = (x[:, 0, 0] > 0).astype(np.int64)
    path = _save(tmp_path / "sign.npz", x=x, y=y, layout="NTD")
    out = tmp_path / "run"
    assert main(["train", "--task", f"file:{path}", "--task-kwargs", "test_fraction=0.25",
                 "--hidden", "16", "--steps", "150", "--batch-size", "32", "--log-every", "50",
                 "--out", str(out), "--no-progress"]) == 0
    rows = list(csv.DictReader((out / "metrics.csv").read_text().splitlines()))
    assert float(rows[-1]["test_acc"]) > 0.9


# ---- bad input: one line each, naming what was given and what was expected ----------

def _bad(tmp_path, **arrays):
    return _save(tmp_path / "bad.npz", **arrays)


x0 = np.zeros((N, T, D), dtype=np.float32)
y0 = np.zeros((N, T), dtype=np.int64)


@pytest.mark.parametrize("arrays, kwargs, match", [
    (dict(x=x0, y=y0), {}, "layout is not stated"),
    (dict(x=x0, y=y0, layout="NTD"), {"layout": "TND"}, "states layout 'NTD'"),
    (dict(x=x0, y=y0), {"layout": "DTN"}, "layout must be 'NTD' or 'TND'"),
    (dict(x=x0, y=y0, layout="XYZ"), {}, "layout is 'XYZ'"),
    (dict(x=x0, y=y0, layout=np.array([1, 2])), {}, "layout must be a string"),
    (dict(y=y0), {"layout": "NTD"}, "no array 'x'"),
    (dict(x=x0), {"layout": "NTD"}, "no array 'y'"),
    (dict(x=x0, y=y0, masks=y0), {"layout": "NTD"}, "unknown array"),
    (dict(x=x0[0], y=y0), {"layout": "NTD"}, r"x has shape \(6, 3\)"),
    (dict(x=x0.astype(complex), y=y0), {"layout": "NTD"}, "x has dtype complex"),
    (dict(x=np.full((N, T, D), np.nan), y=y0), {"layout": "NTD"}, "x holds NaN"),
    (dict(x=x0, y=y0.astype(bool)), {"layout": "NTD"}, "y has dtype bool"),
    (dict(x=x0, y=np.zeros(N)), {"layout": "NTD"}, "float targets need a K dimension"),
    (dict(x=x0, y=np.zeros((N, T, 1, 1), dtype=int)), {"layout": "NTD"}, "class indices are"),
    (dict(x=x0, y=y0[:, :4]), {"layout": "NTD"}, r"y has shape \(20, 4\)"),
    (dict(x=x0, y=y0.T), {"layout": "TND"}, r"y has shape \(6, 20\) but x has N = 6 "),
    (dict(x=x0, y=y0[:5, 0]), {"layout": "NTD"}, r"y has shape \(5,\)"),
    (dict(x=x0, y=y0 - 1), {"layout": "NTD"}, "smallest is -1"),
    (dict(x=x0, y=y0, mask=np.ones((N, 2))), {"layout": "NTD"}, r"mask has shape \(20, 2\)"),
    (dict(x=x0, y=y0, mask=-np.ones((N, T))), {"layout": "NTD"}, "mask must be >= 0"),
    (dict(x=x0, y=y0, mask=np.zeros((N, T))), {"layout": "NTD"}, "at least one counted"),
    (dict(x=x0[:1], y=y0[:1]), {"layout": "NTD"}, "a train/test split needs >= 2"),
    (dict(x=x0, y=y0), {"layout": "NTD", "test_fraction": 1.0}, "test_fraction must be in"),
    (dict(x=x0, y=y0), {"layout": "NTD", "split_seed": -1}, "split_seed must be"),
    (dict(x=x0, y=y0 + 3), {"layout": "NTD", "num_classes": 2}, "num_classes = 2"),
    (dict(x=x0, y=y0), {"layout": "NTD", "loss": "mse"}, "class indices, which train with"),
    (dict(x=x0, y=np.full((N, T, 1), 2.0)), {"layout": "NTD", "loss": "bce"}, r"in \[0, 1\]"),
    (dict(x=x0, y=np.zeros((N, 1))), {"layout": "NTD", "loss": "hinge"}, "'mse' or 'bce'"),
])
def test_bad_files_are_one_line_errors(tmp_path, arrays, kwargs, match):
    path = _bad(tmp_path, **arrays)
    with pytest.raises(ValueError, match=match) as e:
        get_task(f"file:{path}", **kwargs)
    assert "\n" not in str(e.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(ValueError, match="is not a file"):
        get_task(f"file:{tmp_path / 'missing.npz'}", layout="NTD")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match="cannot read .* as an .npz archive"):
        get_task(f"file:{junk}", layout="NTD")
    with pytest.raises(ValueError, match="unknown task 'file:'"):
        get_task("file:")


def test_cli_bad_file_exits_2_and_writes_nothing(tmp_path, capsys):
    path = _bad(tmp_path, x=x0, y=y0)  # no layout
    out = tmp_path / "run"
    assert main(["train", "--task", f"file:{path}", "--steps", "2", "--out", str(out),
                 "--no-progress"]) == 2
    assert "layout is not stated" in capsys.readouterr().err
    assert not out.exists()


def test_task_kwargs_from_the_command_line():
    from rnngrad.runs import check_config
    from rnngrad.tasks import parse_task_kwargs

    assert parse_task_kwargs("layout=NTD test_fraction=0.1 split_seed=3") == {
        "layout": "NTD", "test_fraction": 0.1, "split_seed": 3}
    assert parse_task_kwargs(["dt=20", 'timing={"delay": 500}', "abort=true"]) == {
        "dt": 20, "timing": {"delay": 500}, "abort": True}
    assert parse_task_kwargs(['{"dt": 20, "cohs": [51.2]}']) == {"dt": 20, "cohs": [51.2]}
    assert parse_task_kwargs(None) == {} and parse_task_kwargs("") == {}
    for bad, match in (("dt", "is not key=value"), ("dt=1 dt=2", "given twice"),
                       ("1x=3", "not a valid argument name"), ('{"dt": ', "not a valid JSON"),
                       ("=3", "is not key=value")):
        with pytest.raises(ValueError, match=match):
            parse_task_kwargs(bad)
    with pytest.raises(ValueError, match="task_kwargs must be a dict"):
        check_config({"task_kwargs": "layout=NTD"})
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        check_config({"task": "nope"})
    assert check_config({"task": "file:x.npz", "task_kwargs": {"layout": "NTD"}})["task"] == \
        "file:x.npz"
