"""The add task of Marschall et al. (2020): labels, masks, the continuous stream."""

from __future__ import annotations

import pytest
import torch

import rnngrad
from rnngrad.tasks import StreamAdd


def _label(x, t1=5, t2=9):
    """y_t = 0.5 + 0.5 x_{t-t1} - 0.25 x_{t-t2}, for the t with both lags inside x."""
    L = max(t1, t2)
    return 0.5 + 0.5 * x[L - t1:x.shape[0] - t1] - 0.25 * x[L - t2:x.shape[0] - t2]


def test_batch_labels_mask_and_shapes():
    task = StreamAdd(seq_len=30)
    b = task.batch(5, generator=0)
    assert b.inputs.shape == (30, 5, 2) and b.targets.shape == (30, 5, 1)
    x = b.inputs[..., 0]
    assert torch.equal(b.inputs[..., 1], 1 - x) and set(x.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(b.targets[9:, :, 0], _label(x))
    assert torch.equal(b.mask[:9], torch.zeros(9, 5)) and torch.equal(b.mask[9:], torch.ones(21, 5))
    assert torch.equal(task.batch(5, generator=0).inputs, b.inputs)  # seeded
    assert task.test_batch().inputs.shape[1] == 256


def test_streaming_batches_are_one_continuous_stream():
    task = StreamAdd(seq_len=7, t1=2, t2=4, streaming=True)
    g = torch.Generator().manual_seed(1)
    parts = [task.batch(3, generator=g) for _ in range(4)]
    x = torch.cat([p.inputs[..., 0] for p in parts])
    y = torch.cat([p.targets[..., 0] for p in parts])
    assert torch.equal(y[4:], _label(x, 2, 4))
    assert float(parts[0].mask.sum()) == 3 * 3 and all(float(p.mask.sum()) == 21 for p in parts[1:])
    saved = task.state_dict()
    nxt = task.batch(3, generator=5)
    task.load_state_dict(saved)
    assert torch.equal(task.batch(3, generator=5).targets, nxt.targets)
    task.reset()
    assert float(task.batch(3, generator=2).mask.sum()) == 3 * 3


def test_stream_yields_steps_forever():
    task = StreamAdd()
    it = task.stream(4, generator=3)
    xs, ys = zip(*(next(it) for _ in range(40)), strict=True)
    x = torch.stack(xs)[..., 0]
    y = torch.stack(ys)[..., 0]
    assert xs[0].shape == (4, 2) and ys[0].shape == (4, 1)
    assert torch.equal(y[9:], _label(x))


def test_reference_levels_and_sampled_labels():
    task = StreamAdd(deterministic=False)
    assert task.loss_optimal < task.loss_first_dependency < task.loss_no_memory
    assert abs(task.loss_no_memory - 0.6616) < 1e-4
    y = task.batch(64, generator=0).targets
    assert set(y.unique().tolist()) <= {0.0, 1.0}


def test_online_rtrl_learns_the_first_dependency():
    """A few hundred online RTRL steps on the stream beat the no-memory level."""
    torch.manual_seed(0)
    task = StreamAdd(t1=2, t2=4)
    model = rnngrad.RNN(2, 8, 1, readout="sigmoid")
    algo = rnngrad.rtrl()
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    state = algo.init(model, 16)
    losses = []
    for t, (x, y) in enumerate(task.stream(16, generator=0)):
        if t == 600:
            break
        state, out, g = algo.step(model, state, x, y, loss="bce")
        rnngrad.write_grads(model, g)
        opt.step()
        losses.append(float(out.loss))
    late = sum(losses[-100:]) / 100
    assert late < task.loss_no_memory - 0.05, late


def test_bad_arguments():
    with pytest.raises(ValueError, match="t1 must be an int >= 1"):
        StreamAdd(t1=0)
    with pytest.raises(ValueError, match="leaves no labelled step"):
        StreamAdd(seq_len=9)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        StreamAdd().batch(0)
