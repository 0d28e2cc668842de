import pytest
import torch

from rnngrad.tasks import TASKS, get_task, load_digits


@pytest.mark.parametrize("name", sorted(TASKS))
def test_shapes_and_seeding(name):
    task = get_task(name)
    b1 = task.batch(5, generator=7)
    b2 = task.batch(5, generator=7)
    b3 = task.batch(5, generator=8)
    T = task.seq_len
    assert b1.inputs.shape == (T, 5, task.input_size)
    assert b1.mask.shape == (T, 5)
    if task.loss == "cross_entropy":
        assert b1.targets.shape == (T, 5) and b1.targets.dtype == torch.int64
        assert int(b1.targets.max()) < task.output_size
    else:
        assert b1.targets.shape == (T, 5, task.output_size)
    for a, b in zip(b1, b2):
        assert torch.equal(a, b)
    assert not torch.equal(b1.inputs, b3.inputs)
    test = task.test_batch()
    assert test.inputs.shape[0] == T


def test_adding_targets_are_the_marked_sum():
    task = get_task("adding", seq_len=20)
    b = task.batch(64, generator=0)
    marked = (b.inputs[..., 0] * b.inputs[..., 1]).sum(0)
    assert torch.allclose(b.targets[-1, :, 0], marked)
    assert torch.equal(b.inputs[..., 1].sum(0), torch.full((64,), 2.0))
    assert torch.equal(b.mask.sum(0), torch.ones(64))
    assert b.mask[-1].all()


def test_adding_baseline_is_the_target_variance():
    y = get_task("adding").batch(20000, generator=1).targets[-1, :, 0]
    assert abs(float(y.var()) - 1 / 6) < 0.01


def test_copy_answers_are_the_symbols():
    task = get_task("copy", length=3, delay=2, n_symbols=5)
    b = task.batch(8, generator=0)
    shown = b.inputs[:3].argmax(-1)
    assert torch.equal(b.targets[5:], shown)
    assert b.inputs[5, :, 6].eq(1).all()  # the go cue
    assert torch.equal(b.mask.sum(0), torch.full((8,), 3.0))


def test_digits_split_is_fixed_and_matches_scikit_learn():
    xtr, ytr, xte, yte = load_digits()
    assert xtr.shape == (1437, 8, 8) and xte.shape == (360, 8, 8)
    assert float(xtr.max()) == 1.0 and float(xtr.min()) == 0.0
    xtr2, _, _, yte2 = load_digits()
    assert torch.equal(xtr, xtr2) and torch.equal(yte, yte2)
    sk = pytest.importorskip("sklearn.datasets")
    d = sk.load_digits()
    ours = torch.cat([xtr, xte]).reshape(-1, 64) * 16
    theirs = torch.tensor(d.data, dtype=torch.float32)
    # the same images, permuted
    key = lambda t: sorted(map(tuple, t.round().to(torch.int64).tolist()))  # noqa: E731
    assert key(ours) == key(theirs)


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task 'mnist'; known tasks: adding, copy, digits"):
        get_task("mnist")
