"""Recurrent backprop for steady states (rnngrad/steady.py) against its oracles.

Oracles (DESIGN.md): autograd through the converged unrolled iteration; the dense
solve of seed 000's ``(D^-1 - W^T) u = dR/dx``; ordinary backprop through the
layers of a feedforward net (strictly lower-triangular W). All in float64 to
relative error <= 1e-10.
"""

from __future__ import annotations

import math

import pytest
import torch

from rnngrad.cells import get_activation
from rnngrad.errors import ConvergenceError
from rnngrad.steady import (
    SteadyClassifier,
    SteadyState,
    fixed_point,
    inverse_input,
    lagrangian,
    recurrent_backprop,
    steady_gradient,
    steady_state,
)

F64 = torch.float64
ACTIVATIONS = ["tanh", "sigmoid", "relu", "softplus", "identity"]
INVERTIBLE = ["tanh", "sigmoid", "softplus", "identity"]
ADJOINT_METHODS = ["direct", "iterate", "gmres"]
RTOL = 1e-10


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    # These tensors are tiny: one thread avoids OpenMP spin-waits on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def system(N: int, B: int | None, *, scale: float = 0.6, seed: int = 0):
    """W with spectral norm about 2 * scale (a contraction for f' <= 1), b, and dR/dx."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(N, N, generator=gen, dtype=F64) * (scale / math.sqrt(N))
    shape = (N,) if B is None else (B, N)
    b = torch.randn(*shape, generator=gen, dtype=F64)
    g = torch.randn(*shape, generator=gen, dtype=F64)
    return W, b, g


def unrolled_gradient(W, b, g, activation, *, K=400):
    """Autograd through K iterations from x = 0 of x <- f(W x + b): dR/dW, dR/db for R = g.x."""
    act = get_activation(activation)
    W = W.clone().requires_grad_()
    b = b.clone().requires_grad_()
    x = torch.zeros_like(b)
    for _ in range(K):
        x = act.fn(x @ W.T + b)
    dW, db = torch.autograd.grad((g * x).sum(), (W, b))
    return dW, db


# ------------------------------------------------------------------------ fixed point


@pytest.mark.parametrize("method", ["iterate", "anderson"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fixed_point_batched_equals_rowwise(method, activation):
    W, b, _ = system(12, 5)
    x, info = fixed_point(W, b, activation=activation, method=method)
    act = get_activation(activation)
    assert info.converged and info.residual <= 1e-12
    assert float((x - act.fn(x @ W.T + b)).norm(dim=-1).max()) == pytest.approx(info.residual)
    for i in range(b.shape[0]):
        xi, _ = fixed_point(W, b[i], activation=activation, method=method)
        assert xi.shape == (12,)
        assert rel_err(xi, x[i]) <= 1e-10


def test_anderson_with_damping_and_x0_agree_with_iteration():
    W, b, _ = system(30, 4, scale=0.9)
    x_it, info_it = fixed_point(W, b, method="iterate")
    x_an, info_an = fixed_point(W, b, method="anderson", damping=0.7, history=6)
    x_x0, info_x0 = fixed_point(W, b, x0=x_it)
    assert rel_err(x_an, x_it) <= 1e-10
    assert info_an.iterations < info_it.iterations
    assert info_x0.iterations == 0 and torch.equal(x_x0, x_it)


# ----------------------------------------------------------------- recurrent backprop


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


# --------------------------------------------------------------- Lagrangian, inverse


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
    dW_ref, db_ref = _unrolled_reward_gradient(W, b, R, activation)
    assert rel_err(dL_dW, dW_ref) <= RTOL
    assert rel_err(dL_db, db_ref) <= RTOL


def _unrolled_reward_gradient(W, b, R, activation, *, K=400):
    act = get_activation(activation)
    W = W.clone().requires_grad_()
    b = b.clone().requires_grad_()
    x = torch.zeros_like(b)
    for _ in range(K):
        x = act.fn(x @ W.T + b)
    return torch.autograd.grad(R(x), (W, b))


@pytest.mark.parametrize("activation", INVERTIBLE)
def test_inverse_input_round_trip(activation):
    W, _, _ = system(11, 4, scale=0.4)
    lo, hi = get_activation(activation).range
    base = torch.rand(4, 11, dtype=F64)
    x = {"tanh": 1.8 * base - 0.9, "sigmoid": 0.05 + 0.9 * base}.get(activation, 0.1 + base)
    b = inverse_input(W, x, activation=activation)
    x_back, _ = fixed_point(W, b, activation=activation)
    assert rel_err(x_back, x) <= RTOL


def test_inverse_input_unique_where_steady_state_is_not():
    """W = 2I with tanh has three steady states for b = 0; inverse_input maps each back to 0."""
    W = 2.0 * torch.eye(3, dtype=F64)
    x_plus, _ = fixed_point(W, torch.zeros(3, dtype=F64), x0=torch.full((3,), 0.5, dtype=F64))
    x_minus = -x_plus
    for x in (x_plus, x_minus, torch.zeros(3, dtype=F64)):
        assert float(inverse_input(W, x).abs().max()) <= 1e-11
    assert float(x_plus.min()) > 0.9


# --------------------------------------------------------------------- implicit layer


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


# -------------------------------------------------------------------------- digits


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


# --------------------------------------------------------------------- failure modes


def test_fixed_point_not_converged_raises_or_reports():
    W, b, _ = system(10, 3, scale=0.9)
    with pytest.raises(ConvergenceError, match=r"residual .* > tol 1\.000e-12 after 3 iterations"):
        fixed_point(W, b, max_iter=3)
    try:
        fixed_point(W, b, max_iter=3)
    except ConvergenceError as err:
        assert err.iterations == 3 and err.tol == 1e-12 and err.residual > 1e-12
    x, info = fixed_point(W, b, max_iter=3, throw=False)
    assert not info.converged and info.iterations == 3 and info.residual > 1e-12
    assert x.shape == b.shape


def test_fixed_point_divergence_raises():
    W = 2.0 * torch.eye(4, dtype=F64)
    b = torch.ones(4, dtype=F64)
    with pytest.raises(ConvergenceError, match=r"diverged: residual .* > tol .* iterations"):
        fixed_point(W, b, activation="identity", max_iter=5000)
    _, info = fixed_point(W, b, activation="identity", max_iter=5000, throw=False)
    assert not info.converged and not math.isfinite(info.residual)


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


def test_inverse_input_out_of_range_and_relu_raise():
    W = torch.zeros(3, 3, dtype=F64)
    x = torch.tensor([[0.5, 1.2, -3.0], [0.0, 0.1, 1.0]], dtype=F64)
    with pytest.raises(
        ValueError,
        match=r"3 entries outside the range \(-1\.0, 1\.0\) of tanh.*x\[0, 1\] = 1\.2, x\[0, 2\] = -3, x\[1, 2\] = 1",
    ):
        inverse_input(W, x)
    with pytest.raises(ValueError, match="'relu' has no inverse"):
        inverse_input(W, x.abs(), activation="relu")


def test_bad_inputs_raise():
    W, b, g = system(4, 2)
    with pytest.raises(ValueError, match=r"W has shape \(4, 3\) but a square"):
        fixed_point(W[:, :3], b)
    with pytest.raises(ValueError, match=r"b has shape \(2, 5\) but \(4,\) or \(B, 4\)"):
        fixed_point(W, torch.zeros(2, 5, dtype=F64))
    with pytest.raises(TypeError, match="b has dtype torch.float32 but W has dtype torch.float64"):
        fixed_point(W, b.float())
    with pytest.raises(
        ValueError, match=r"b contains 1 NaN or Inf entries \(first at index \(1, 2\)\)"
    ):
        bad = b.clone()
        bad[1, 2] = float("nan")
        fixed_point(W, bad)
    with pytest.raises(ValueError, match=r"dR_dx has shape \(4,\) but \(2, 4\) is expected"):
        recurrent_backprop(W, b, b, g[0])
    with pytest.raises(ValueError, match="method must be one of"):
        recurrent_backprop(W, b, b, g, method="lu")
    with pytest.raises(ValueError, match="damping must lie in"):
        fixed_point(W, b, damping=1.5)


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
