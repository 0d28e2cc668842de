"""The Lagrangian (rnngrad/steady/lagrangian.py): stationary at the steady state and
its adjoint, where L = R and dL/dW = u x^T = dR/dW; float64."""

from __future__ import annotations

import pytest
import torch
from steady_refs import (  # noqa: F401
    F64,
    INVERTIBLE,
    RTOL,
    _seed_and_one_thread,
    rel_err,
    system,
    unrolled_reward_gradient,
)

from rnngrad.steady import fixed_point, lagrangian, recurrent_backprop


@pytest.mark.parametrize("activation", INVERTIBLE)
def test_lagrangian_at_stationary_point(activation):
    W, b, _ = system(9, 3)
    c = torch.randn(3, 9, dtype=F64)

    def R(x):
        return (c * x).sum() + 0.5 * (x**2).sum()

    x, _ = fixed_point(W, b, activation=activation)
    dR_dx = c + x
    _, _, u = recurrent_backprop(W, b, x, dR_dx, activation=activation)

    xs, us, Ws, bs = (t.clone().requires_grad_() for t in (x, u, W, b))
    L = lagrangian(xs, us, Ws, bs, R, activation=activation)
    assert float(L.detach()) == pytest.approx(float(R(x)), rel=RTOL)
    dL_dx, dL_du, dL_dW, dL_db = torch.autograd.grad(L, (xs, us, Ws, bs))
    # stationary in x (the adjoint equation) and in u (the steady-state constraint)
    assert float(dL_dx.abs().max()) <= RTOL * float(dR_dx.abs().max())
    assert float(dL_du.abs().max()) <= 1e-10
    # the partials in (W, b) holding x, u fixed: u x^T and u, and they are dR/dW, dR/db
    assert rel_err(dL_dW, u.T @ x) <= 1e-14
    assert rel_err(dL_db, u) <= 1e-14
    dW_ref, db_ref = unrolled_reward_gradient(W, b, R, activation)
    assert rel_err(dL_dW, dW_ref) <= RTOL
    assert rel_err(dL_db, db_ref) <= RTOL
