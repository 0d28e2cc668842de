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

from rnngrad.steady import SteadyState, fixed_point, steady_state


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
