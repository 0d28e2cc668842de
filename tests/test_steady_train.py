"""The steady-state digits classifier's hand gradient and training loop (rnngrad/steady/train.py)."""

from __future__ import annotations

import pytest
import torch
from steady_refs import F64, RTOL, _seed_and_one_thread, rel_err  # noqa: F401

from rnngrad.steady import SteadyClassifier, SteadyState, steady_gradient, train_steady


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
    model = SteadyClassifier(32, seed=0)
    seen = []
    metrics = train_steady(
        model, steps=60, lr=2e-2, batch_size=64, seed=0, callback=lambda s, m: seen.append(s)
    )
    assert seen == list(range(1, 61))
    assert metrics["test_accuracy"] >= 0.8


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"steps": 1.5}, TypeError, r"steps must be an int >= 0, got 1\.5 \(float\)"),
        ({"steps": -1}, ValueError, r"steps must be an int >= 0, got -1"),
        ({"lr": "0.01"}, TypeError, r"lr must be a finite number > 0, got '0\.01' \(str\)"),
        ({"lr": float("nan")}, ValueError, r"lr must be a finite number > 0, got nan"),
        ({"lr": 0.0}, ValueError, r"lr must be a finite number > 0, got 0\.0"),
        ({"batch_size": 0}, ValueError, r"batch_size must be an int >= 1, got 0"),
        ({"batch_size": 32.0}, TypeError, r"batch_size must be an int >= 1, got 32\.0"),
        ({"seed": "0"}, TypeError, r"seed must be an int, got '0' \(str\)"),
        ({"max_spectral_norm": -0.9}, ValueError, r"max_spectral_norm must be a finite number > 0"),
        ({"eval_every": 0}, ValueError, r"eval_every must be an int >= 1, got 0"),
        ({"callback": 3}, TypeError, r"callback must be callable or None, got int"),
    ],
)
def test_train_steady_bad_arguments_raise(kwargs, error, message):
    with pytest.raises(error, match=message):
        train_steady(SteadyClassifier(4), **kwargs)
    with pytest.raises(TypeError, match="model must be a SteadyClassifier, got SteadyState"):
        train_steady(SteadyState(4))


def test_train_steady_evaluates_at_the_asked_steps():
    model = SteadyClassifier(8, seed=0)
    rows = {}
    metrics = train_steady(
        model, steps=5, batch_size=16, eval_every=2, callback=lambda s, m: rows.update({s: m})
    )
    evaluated = [s for s, m in rows.items() if "test_accuracy" in m]
    assert evaluated == [2, 4, 5]
    assert set(rows[1]) == {"loss", "residual", "iterations"}
    assert 0.0 <= rows[2]["test_accuracy"] <= 1.0 and rows[2]["test_loss"] > 0
    # the last evaluation is of the final model, as is the returned test accuracy
    assert rows[5]["test_accuracy"] == metrics["test_accuracy"]
    assert rows[5]["test_loss"] == pytest.approx(metrics["test_loss"], rel=1e-12)
