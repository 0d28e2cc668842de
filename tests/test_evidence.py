"""rnngrad.tasks.EvidenceAccumulation: Bellec et al.'s cue accumulation task."""

from __future__ import annotations

import pytest
import torch

from rnngrad.tasks import TASKS, EvidenceAccumulation, get_task


def small(**kw):
    args = dict(n_cues=3, t_cue=20.0, t_interval=30.0, t_wait=60.0, t_recall=20.0)
    args.update(kw)
    return EvidenceAccumulation(**args)


def test_registered_with_bellecs_settings_by_default():
    assert TASKS["evidence"] is EvidenceAccumulation
    task = get_task("evidence")
    assert task.seq_len == 7 * 150 + 1200 == 2250
    assert (task.input_size, task.output_size, task.loss, task.readout) == (
        40, 2, "cross_entropy", "softmax")
    assert task.classification and task.cue_window(0) == (50, 150)
    assert task.cue_window(6) == (950, 1050)


def test_cues_labels_recall_and_mask():
    task = small(n_channels=4, rate=500.0)  # p = 0.5 per step: every window is visible
    b = task.batch(400, generator=0)
    T, B = task.seq_len, 400
    assert b.inputs.shape == (T, B, 16) and set(b.inputs.unique().tolist()) <= {0.0, 1.0}
    # which side each cue was on, read from the spikes; the label is the majority
    right = torch.stack([b.inputs[s:e, :, 4:8].sum((0, 2)) > b.inputs[s:e, :, 0:4].sum((0, 2))
                         for s, e in (task.cue_window(k) for k in range(3))])
    counts = torch.stack([b.inputs[s:e, :, :8].sum((0, 2)) for s, e in
                          (task.cue_window(k) for k in range(3))])
    assert bool((counts > 0).all())
    assert torch.equal(b.targets[-1], (right.sum(0) >= 2).long())
    assert torch.equal(b.targets, b.targets[-1].expand(T, B))  # one label per trial
    # cue groups silent outside their windows; recall only in the last t_recall ms
    silent = torch.ones(T, dtype=torch.bool)
    for k in range(3):
        s, e = task.cue_window(k)
        silent[s:e] = False
    assert b.inputs[silent][:, :, :8].sum() == 0
    assert b.inputs[:-20, :, 8:12].sum() == 0 and b.inputs[-20:, :, 8:12].sum() > 0
    assert b.inputs[:, :, 12:].sum() > 0  # background noise
    assert torch.equal(b.mask[-20:], torch.full((20, B), 1 / 20))
    assert b.mask[:-20].sum() == 0
    # both labels, and the minority side shows up at about p_minority
    assert 0.3 < float(b.targets[-1].double().mean()) < 0.7
    minority = (right != b.targets[-1].bool()).double().mean()
    assert 0.15 < float(minority) < 0.35


def test_rates_and_seeding():
    task = small(rate=40.0, t_wait=2000.0)
    b = task.batch(64, generator=3)
    noise = b.inputs[:, :, 30:].mean()
    assert abs(float(noise) - 0.010) < 0.002  # 10 Hz at dt = 1 ms
    assert torch.equal(b.inputs, task.batch(64, generator=3).inputs)
    assert task.test_batch() is task.test_batch()
    assert task.test_batch().inputs.shape[1] == 256


def test_bellecs_decision():
    task = small()
    b = task.batch(4, generator=1)
    z = torch.zeros(task.seq_len, 4, 2)
    z[-20:, :, 1] = 1.0
    z[-20:, 0, 1] = -1.0  # example 0 says left
    assert task.decide(z).tolist() == [0, 1, 1, 1]
    z[-21] = 100.0 * torch.tensor([1.0, -1.0])  # before the window: ignored
    assert task.decide(z).tolist() == [0, 1, 1, 1]
    assert task.accuracy(z, b) == float((torch.tensor([0, 1, 1, 1]) == b.targets[-1]).double().mean())


@pytest.mark.parametrize("kwargs,message", [
    ({"n_cues": 4}, r"n_cues must be an odd int >= 1"),
    ({"t_cue": 40.0}, r"t_cue = 40.0 ms is longer than t_interval = 30.0 ms"),
    ({"t_recall": 70.0}, r"t_recall = 70.0 ms is longer than t_wait = 60.0 ms"),
    ({"t_cue": 2.5, "dt": 2.0}, r"t_cue = 2.5 ms must be a whole number of steps of dt = 2 ms"),
    ({"dt": 0}, r"dt must be a positive number of ms"),
    ({"rate": 2000.0}, r"rate must be in \(0, 1000 / dt\] Hz"),
    ({"p_minority": 0.5}, r"p_minority must be in \[0, 0.5\)"),
    ({"n_channels": 0}, r"n_channels must be a positive int"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        small(**kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["bptt", "eprop"])
def test_an_lsnn_learns_a_short_evidence_task(algorithm):
    """End to end: 10 LIF + 10 ALIF neurons, a leaky readout, 3 cues in 70 ms; BPTT and
    e-prop (the generic trace engine) both get well above chance in 50 Adam steps."""
    import math

    import rnngrad
    from rnngrad.cells import ALIF
    from rnngrad.cells.lif import bellec_beta

    task = EvidenceAccumulation(3, t_cue=10.0, t_interval=15.0, t_wait=25.0, t_recall=10.0,
                                rate=100.0, test_size=256)
    torch.manual_seed(0)
    cell = ALIF(40, 20, tau_a=200.0, beta=[0.0] * 10 + [bellec_beta(20.0, 200.0)] * 10)
    net = rnngrad.Network(cell, 2, readout="softmax", readout_decay=math.exp(-1 / 20))
    algo = rnngrad.bptt() if algorithm == "bptt" else rnngrad.eprop()
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    test = task.test_batch()

    def accuracy():
        with torch.no_grad():
            _, h = net(test.inputs)
            return task.accuracy(net.readout_z(h), test)

    assert accuracy() < 0.6
    for it in range(50):
        b = task.batch(32, generator=it)
        opt.zero_grad()
        rnngrad.gradient(net, b.inputs, b.targets, algorithm=algo, loss="cross_entropy",
                         mask=b.mask, set_grad=True)
        opt.step()
    assert accuracy() > 0.75
