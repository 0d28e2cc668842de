"""Recurrent backprop (rnngrad/steady/adjoint.py) against its oracles: autograd through
the converged unrolled iteration, the dense solve of Almeida and Pineda's ``(D^-1 - W^T) u = dR/dx``,
ordinary backprop for the feedforward special case; float64, relative error <= 1e-10.
"""

from __future__ import annotations

import pytest
import torch
from steady_refs import (  # noqa: F401
    ACTIVATIONS,
    ADJOINT_METHODS,
    F64,
    RTOL,
    _seed_and_one_thread,
    rel_err,
    system,
    unrolled_gradient,
)

from rnngrad.cells import get_activation
from rnngrad.errors import ConvergenceError
from rnngrad.steady import fixed_point, recurrent_backprop


@pytest.mark.parametrize("batch", [None, 4])
@pytest.mark.parametrize("method", ADJOINT_METHODS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_recurrent_backprop_equals_unrolled_autograd(activation, method, batch):
    W, b, g = system(10, batch)
    x, _ = fixed_point(W, b, activation=activation)
    dW, db, u = recurrent_backprop(W, b, x, g, activation=activation, method=method)
    dW_ref, db_ref = unrolled_gradient(W, b, g, activation)
    assert dW.shape == W.shape and db.shape == b.shape
    assert rel_err(dW, dW_ref) <= RTOL
    assert rel_err(db, db_ref) <= RTOL
    assert torch.equal(db, u)


@pytest.mark.parametrize("method", ADJOINT_METHODS)
@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "softplus"])
def test_recurrent_backprop_solves_seed_equation(activation, method):
    """u solves 000's (D^-1 - W^T) u = dR/dx, where every f' > 0."""
    W, b, g = system(16, 3, scale=0.8)
    act = get_activation(activation)
    x, _ = fixed_point(W, b, activation=activation)
    _, _, u = recurrent_backprop(W, b, x, g, activation=activation, method=method)
    a = x @ W.T + b
    D = act.deriv(a, act.fn(a))
    assert bool((D > 0).all())
    A = torch.diag_embed(1.0 / D) - W.T  # (B, N, N)
    u_ref = torch.linalg.solve(A, g)
    assert rel_err(u, u_ref) <= RTOL


def test_recurrent_backprop_where_slope_vanishes():
    """relu's silent units have f' = 0: D^-1 is undefined but (I - D W^T) u = D dR/dx is not."""
    W, b, g = system(12, 6)
    x, _ = fixed_point(W, b, activation="relu")
    a = x @ W.T + b
    silent = a <= 0
    assert bool(silent.any()) and bool((~silent).any())
    for method in ADJOINT_METHODS:
        _, _, u = recurrent_backprop(W, b, x, g, activation="relu", method=method)
        assert bool((u[silent] == 0).all())


@pytest.mark.parametrize("method", ADJOINT_METHODS)
def test_feedforward_special_case_equals_backprop(method):
    """Strictly lower-triangular W: layers 4 -> 5 -> 3 units; x exact after N iterations."""
    sizes = [4, 5, 3]
    N = sum(sizes)
    gen = torch.Generator().manual_seed(1)
    blocks = [
        torch.randn(m, n, generator=gen, dtype=F64) for n, m in zip(sizes, sizes[1:], strict=False)
    ]
    W = torch.zeros(N, N, dtype=F64)
    W[4:9, 0:4], W[9:12, 4:9] = blocks
    b = torch.randn(2, N, generator=gen, dtype=F64)
    g = torch.randn(2, N, generator=gen, dtype=F64)

    # a random strictly lower-triangular W needs exactly N iterations
    W_tri = torch.randn(N, N, generator=gen, dtype=F64).tril(-1)
    _, info = fixed_point(W_tri, b, tol=0.0, max_iter=N)
    assert info.converged and info.residual == 0.0 and info.iterations == N

    x, info = fixed_point(W, b, tol=0.0, max_iter=N)  # depth 3: exact after 3 iterations
    assert info.residual == 0.0 and info.iterations == len(sizes)
    dW, db, _ = recurrent_backprop(W, b, x, g, method=method)

    # ordinary backprop through the layers h0 = f(b0), h1 = f(W1 h0 + b1), h2 = f(W2 h1 + b2)
    W1, W2 = (blk.clone().requires_grad_() for blk in blocks)
    bl = b.clone().requires_grad_()
    b0, b1, b2 = bl[:, :4], bl[:, 4:9], bl[:, 9:]
    h0 = torch.tanh(b0)
    h1 = torch.tanh(h0 @ W1.T + b1)
    h2 = torch.tanh(h1 @ W2.T + b2)
    R = (g * torch.cat([h0, h1, h2], dim=1)).sum()
    dW1, dW2, db_ref = torch.autograd.grad(R, (W1, W2, bl))
    assert rel_err(torch.cat([h0, h1, h2], 1), x) <= 1e-15
    assert rel_err(dW[4:9, 0:4], dW1) <= RTOL
    assert rel_err(dW[9:12, 4:9], dW2) <= RTOL
    assert rel_err(db, db_ref) <= RTOL


@pytest.mark.parametrize("diag", [1.0, 1.0 - 1e-16])
def test_direct_singular_raises(diag):
    W = torch.diag(torch.tensor([diag, 0.5], dtype=F64))
    b = torch.zeros(3, 2, dtype=F64)
    x = torch.zeros(3, 2, dtype=F64)
    with pytest.raises(ValueError, match=r"singular for batch rows \[0, 1, 2\]"):
        recurrent_backprop(W, b, x, torch.ones_like(x), activation="identity")


@pytest.mark.parametrize("method", ["iterate", "gmres"])
def test_iterative_adjoint_not_converged_raises(method):
    W = torch.eye(3, dtype=F64)  # I - D W^T = 0: no solution
    x = torch.zeros(2, 3, dtype=F64)
    with pytest.raises(
        ConvergenceError,
        match=rf"\({method}\) did not converge: relative residual .* > tol .* after 50 iterations",
    ):
        recurrent_backprop(
            W, x, x, torch.ones_like(x), activation="identity", method=method, max_iter=50
        )
    W, b, g = system(40, 2, scale=1.0)
    x, _ = fixed_point(W, b, method="anderson")
    with pytest.raises(ConvergenceError, match="after 2 iterations") as err:
        recurrent_backprop(W, b, x, g, method=method, max_iter=2)
    assert err.value.iterations == 2 and err.value.residual > err.value.tol


def test_iterate_adjoint_diverges_where_gmres_converges():
    W = torch.tensor([[1.5, 0.0], [0.3, 0.2]], dtype=F64)  # radius 1.5: Neumann series diverges
    b = torch.zeros(2, dtype=F64)
    x = torch.zeros(2, dtype=F64)
    g = torch.tensor([1.0, -2.0], dtype=F64)
    with pytest.raises(ConvergenceError, match="diverged|did not converge"):
        recurrent_backprop(W, b, x, g, activation="identity", method="iterate")
    _, _, u = recurrent_backprop(W, b, x, g, activation="identity", method="gmres")
    u_ref = torch.linalg.solve(torch.eye(2, dtype=F64) - W.T, g)
    assert rel_err(u, u_ref) <= RTOL


def test_recurrent_backprop_bad_inputs_raise():
    W, b, g = system(4, 2)
    with pytest.raises(ValueError, match=r"dR_dx has shape \(4,\) but \(2, 4\) is expected"):
        recurrent_backprop(W, b, b, g[0])
    with pytest.raises(ValueError, match="method must be one of"):
        recurrent_backprop(W, b, b, g, method="lu")


@pytest.mark.parametrize("method", ["direct", "iterate", "gmres"])
def test_recurrent_backprop_with_parameters_that_require_grad(method):
    """Weights taken straight from an nn.Module: no warning, no graph, the same result."""
    g = torch.Generator().manual_seed(5)
    N = 6
    W = (0.3 * torch.randn(N, N, generator=g, dtype=torch.float64)).requires_grad_(True)
    b = torch.randn(2, N, generator=g, dtype=torch.float64)
    x, _ = fixed_point(W.detach(), b, tol=1e-13)
    dR = torch.randn(2, N, generator=g, dtype=torch.float64)
    dW, db, u = recurrent_backprop(W, b, x, dR, method=method)
    assert dW.grad_fn is None and u.grad_fn is None
    dW2, _, _ = recurrent_backprop(W.detach(), b, x, dR, method=method)
    assert torch.allclose(dW, dW2, rtol=0, atol=0)


NAN = float("nan")
BAD_ADJOINT_OPTIONS = [
    ("method", None, TypeError, r"method must be a string, one of 'direct', 'iterate', 'gmres'"),
    ("method", "lu", ValueError, r"method must be one of 'direct', 'iterate', 'gmres', got 'lu'"),
    ("tol", "tight", TypeError, r"tol must be a finite number >= 0 .*got 'tight' \(str\)"),
    ("tol", NAN, ValueError, r"tol must be a finite number >= 0 .*got nan"),
    ("tol", -1.0, ValueError, r"tol must be a finite number >= 0 .*got -1\.0"),
    ("max_iter", 5.5, TypeError, r"max_iter must be an int >= 0, got 5\.5 \(float\)"),
    ("max_iter", -2, ValueError, r"max_iter must be an int >= 0, got -2"),
    ("restart", 0, ValueError, r"restart \(GMRES's restart length\) must be an int >= 1, got 0"),
    (
        "restart",
        8.0,
        TypeError,
        r"restart \(GMRES's restart length\) must be an int >= 1, got 8\.0",
    ),
    (
        "restart",
        True,
        TypeError,
        r"restart \(GMRES's restart length\) must be an int >= 1, got True",
    ),
]


@pytest.mark.parametrize(("option", "value", "error", "message"), BAD_ADJOINT_OPTIONS)
def test_recurrent_backprop_bad_options_raise(option, value, error, message):
    W, b, g = system(4, 2)
    x, _ = fixed_point(W, b)
    options = {"method": "gmres", option: value}
    with pytest.raises(error, match=message):
        recurrent_backprop(W, b, x, g, **options)
