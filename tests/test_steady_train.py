"""The steady-state digits classifier's hand gradient and training loop (rnngrad/steady/train.py)."""

from __future__ import annotations

import pytest
import torch
from steady_refs import F64, RTOL, _seed_and_one_thread, rel_err  # noqa: F401

from rnngrad.steady import SteadyClassifier, steady_gradient


def test_steady_gradient_equals_autograd():
    model = SteadyClassifier(20, dtype=F64, seed=1, tol=1e-13)
    images = torch.rand(7, 8, 8, dtype=F64)
    labels = torch.randint(0, 10, (7,))
    loss, grads = steady_gradient(model, images, labels)
    assert list(grads) == [name for name, _ in model.named_parameters()]

    # autograd through the implicit layer
    ref_loss = torch.nn.functional.cross_entropy(model(images), labels)
    ref = dict(zip(grads, torch.autograd.grad(ref_loss, list(model.parameters())), strict=True))
    assert float(loss) == pytest.approx(float(ref_loss.detach()), rel=1e-12)
    # and autograd through the unrolled iteration
    b = model.steady_input(images)
    x = torch.zeros_like(b)
    for _ in range(300):
        x = torch.tanh(x @ model.W.T + b)
    unrolled_loss = torch.nn.functional.cross_entropy(x @ model.V.T + model.d, labels)
    unrolled = dict(
        zip(grads, torch.autograd.grad(unrolled_loss, list(model.parameters())), strict=True)
    )
    for name in grads:
        assert grads[name].shape == ref[name].shape
        assert rel_err(grads[name], ref[name]) <= RTOL, name
        assert rel_err(grads[name], unrolled[name]) <= RTOL, name


def test_train_steady_learns_digits():
    from rnngrad.steady import train_steady

    model = SteadyClassifier(32, seed=0)
    seen = []
    metrics = train_steady(
        model, steps=60, lr=2e-2, batch_size=64, seed=0, callback=lambda s, m: seen.append(s)
    )
    assert seen == list(range(1, 61))
    assert metrics["test_accuracy"] >= 0.8
