"""The implicit layer (rnngrad/steady/layer.py): gradcheck, gradients against the unrolled
iteration and torchdeq, the saved tensors; float64."""

from __future__ import annotations

import pytest
import torch
from steady_refs import (  # noqa: F401
    ADJOINT_METHODS,
    F64,
    RTOL,
    _seed_and_one_thread,
    rel_err,
    system,
    unrolled_gradient,
)

from rnngrad.steady import SteadyClassifier, SteadyState, fixed_point, steady_state


@pytest.mark.parametrize("backward_method", ADJOINT_METHODS)
@pytest.mark.parametrize("batch", [None, 3])
def test_steady_state_gradcheck(backward_method, batch):
    W, b, _ = system(5, batch, scale=0.8)
    W.requires_grad_()
    b.requires_grad_()

    def fn(W, b):
        return steady_state(W, b, backward_method=backward_method, tol=1e-13)

    assert torch.autograd.gradcheck(fn, (W, b))


def test_steady_state_layer_grads_equal_unrolled():
    layer = SteadyState(8, activation="sigmoid", dtype=F64, seed=3, backward_method="gmres")
    b = torch.randn(4, 8, dtype=F64, requires_grad=True)
    g = torch.randn(4, 8, dtype=F64)
    (layer(b) * g).sum().backward()
    dW_ref, db_ref = unrolled_gradient(layer.W.detach(), b.detach(), g, "sigmoid")
    assert rel_err(layer.W.grad, dW_ref) <= RTOL
    assert rel_err(b.grad, db_ref) <= RTOL


def test_steady_state_saves_only_W_b_x():
    """Memory does not depend on the number of forward iterations."""
    W, b, _ = system(16, 4, scale=0.95)
    W.requires_grad_()
    b.requires_grad_()
    counts = []
    for method, damping in [("anderson", 1.0), ("iterate", 1.0), ("iterate", 0.2)]:
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t, saved=saved: saved.append(t) or t, lambda t: t
        ):
            x = steady_state(W, b, method=method, damping=damping)
        _, info = fixed_point(W.detach(), b.detach(), method=method, damping=damping)
        counts.append((info.iterations, sum(t.numel() for t in saved)))
        assert sorted(t.shape for t in saved) == sorted([W.shape, b.shape, x.shape])
        x.sum().backward()
    iterations = [k for k, _ in counts]
    assert len(set(iterations)) == 3 and max(iterations) > 5 * min(iterations)
    assert {n for _, n in counts} == {16 * 16 + 2 * 4 * 16}


@pytest.mark.parametrize("backward_method", ADJOINT_METHODS)
def test_steady_state_grads_equal_torchdeq_implicit_backward(backward_method):
    """rnngrad's steady-state gradient equals torchdeq's implicit (IFT) backward.

    Only where the optional extra torchdeq is installed (``pip install rnngrad[deq]``).
    Tolerances: torchdeq's forward fixed-point iteration stops at an absolute
    residual ``||f(z) - z||_2 < 1e-13`` per row, its backward fixed-point iteration
    at a relative step ``||g_k+1 - g_k|| / ||g_k+1|| < 1e-13``; rnngrad's forward
    at 1e-13 and its adjoint at the float64 default (1e-12). Here ``||W||_2 = 1.05``
    and ``||diag(tanh') W||_2 <= 0.99`` at the steady state (spectral radius
    <= 0.54): both solves are contractions, their errors reach dW and db
    amplified by a modest factor, and the gradients agree well inside
    RTOL = 1e-10 (observed ~1e-14).
    """
    torchdeq = pytest.importorskip("torchdeq")
    W, b, g = system(12, 3)
    W.requires_grad_()
    b.requires_grad_()
    x = steady_state(W, b, tol=1e-13, backward_method=backward_method)
    dW, db = torch.autograd.grad((g * x).sum(), (W, b))

    deq = torchdeq.get_deq(
        core="sliced",
        ift=True,
        f_solver="fixed_point_iter",
        f_max_iter=500,
        f_tol=1e-13,
        b_solver="fixed_point_iter",
        b_max_iter=500,
        b_tol=1e-13,
        b_stop_mode="rel",
    )
    infos = []
    z_out, info = deq(
        lambda z: torch.tanh(torch.addmm(b, z, W.T)),
        torch.zeros_like(b),
        backward_writer=infos.append,
    )
    assert float(info["abs_lowest"].max()) < 1e-13
    dW_deq, db_deq = torch.autograd.grad((g * z_out[-1]).sum(), (W, b))
    assert len(infos) == 1 and float(infos[0]["rel_lowest"].max()) < 1e-13  # IFT backward ran
    assert rel_err(z_out[-1], x) <= RTOL
    assert rel_err(dW_deq, dW) <= RTOL
    assert rel_err(db_deq, db) <= RTOL


@pytest.mark.parametrize(
    ("n", "error", "message"),
    [
        (0, ValueError, r"n \(the number of units\) must be an int >= 1, got 0"),
        (-3, ValueError, r"n \(the number of units\) must be an int >= 1, got -3"),
        (2.5, TypeError, r"n \(the number of units\) must be an int >= 1, got 2\.5 \(float\)"),
        (4.0, TypeError, r"n \(the number of units\) must be an int >= 1, got 4\.0 \(float\)"),
        ("4", TypeError, r"n \(the number of units\) must be an int >= 1, got '4' \(str\)"),
        (True, TypeError, r"n \(the number of units\) must be an int >= 1, got True \(bool\)"),
    ],
)
def test_steady_state_layer_size_must_be_a_positive_int(n, error, message):
    with pytest.raises(error, match=message):
        SteadyState(n)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"tol": float("nan")}, ValueError, r"^tol must be a finite number >= 0"),
        ({"max_iter": 100.0}, TypeError, r"^max_iter must be an int >= 0, got 100\.0"),
        ({"damping": "1"}, TypeError, r"^damping must be a number in \(0, 1\], got '1'"),
        ({"method": "broyden"}, ValueError, r"^method must be one of 'iterate', 'anderson'"),
        ({"backward_method": 2}, TypeError, r"^backward_method must be a string, one of"),
        ({"backward_tol": "1e-8"}, TypeError, r"^backward_tol must be a finite number >= 0"),
        ({"backward_max_iter": -5}, ValueError, r"^backward_max_iter must be an int >= 0"),
        ({"init_scale": -1.0}, ValueError, r"^init_scale must be a finite number >= 0"),
        ({"seed": 1.5}, TypeError, r"^seed must be an int or None, got 1\.5 \(float\)"),
        ({"dtype": torch.int64}, TypeError, r"^dtype must be a floating-point torch\.dtype"),
        ({"dtype": "float64"}, TypeError, r"^dtype must be a floating-point torch\.dtype"),
    ],
)
def test_steady_state_layer_options_checked_when_built(options, error, message):
    """A bad option fails at construction, not at the first forward or backward."""
    with pytest.raises(error, match=message):
        SteadyState(4, **options)
    solver_options = {k: v for k, v in options.items() if k not in ("init_scale", "seed", "dtype")}
    if solver_options:
        W, b, _ = system(4, 2)
        with pytest.raises(error, match=message):
            steady_state(W, b, **solver_options)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"hidden": 0}, ValueError, r"hidden \(the number of units N\) must be an int >= 1, got 0"),
        (
            {"hidden": 12.0},
            TypeError,
            r"hidden \(the number of units N\) must be an int >= 1, got 12\.0",
        ),
        (
            {"hidden": "8"},
            TypeError,
            r"hidden \(the number of units N\) must be an int >= 1, got '8'",
        ),
        ({"n_inputs": 0}, ValueError, r"n_inputs \(pixels per image\) must be an int >= 1, got 0"),
        ({"n_classes": True}, TypeError, r"n_classes must be an int >= 1, got True \(bool\)"),
        ({"n_classes": -1}, ValueError, r"n_classes must be an int >= 1, got -1"),
        ({"seed": None}, TypeError, r"seed must be an int, got None \(NoneType\)"),
        ({"tol": -1.0}, ValueError, r"tol must be a finite number >= 0"),
        ({"backward_method": "lu"}, ValueError, r"backward_method must be one of 'direct'"),
    ],
)
def test_steady_classifier_bad_arguments_raise(kwargs, error, message):
    with pytest.raises(error, match=message):
        SteadyClassifier(**{"hidden": 8, **kwargs})
