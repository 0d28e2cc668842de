"""Steady states of a recurrent network and their gradients (seed 000, Almeida-Pineda).

The network relaxes to a steady state, an implicit function of ``(W, b)``::

    x = f(W x + b)                                  F(x, W, b) = x - f(W x + b) = 0

and a reward (or loss) ``R(x)`` of that state is differentiated by recurrent
backprop. With the slopes ``D = diag f'(W x + b)`` the sensitivity ``u = dR/db``
solves seed 000's adjoint equation::

    (D^-1 - W^T) u = dR/dx          written here as   (I - D W^T) u = D dR/dx,

the same system multiplied through by ``D``, which stays defined where ``f' = 0``
(a saturated or silent unit simply gets ``u_i = 0``). The sensitivity lemma then
gives every gradient from ``u``::

    dR/dW = u x^T,        dR/db = u.

Seed 000's other views are here too. The Lagrangian
``L(x, u, W, b) = R(x) - u^T [f^-1(x) - W x - b]`` is stationary in ``x`` and
``u`` exactly at the steady state and its adjoint, where ``L = R`` and
``dL/dW = u x^T``, ``dL/db = u`` (:func:`lagrangian`). Input as a function of
output, ``b = f^-1(x) - W x``, is unique even where the steady state is not
(:func:`inverse_input`); its Jacobian ``db/dx = D^-1 - W`` is the transpose of
the adjoint's matrix. The feedforward net is the special case of a strictly
lower-triangular ``W``: the iteration reaches the fixed point in N steps and
recurrent backprop is ordinary backprop.

Batches: ``b`` is ``(N,)`` or ``(B, N)``; a batch holds B independent networks
sharing ``W`` (each row its own steady state ``x_b`` and sensitivity ``u_b``).
Then ``dR/dW = sum_b u_b x_b^T`` (one GEMM, ``u^T x``) and ``dR/db`` is ``u``
itself, ``(B, N)``, per example -- sum it over rows when ``b`` is a bias shared
by the batch.

References: L. B. Almeida (1987), F. J. Pineda (1987), "Generalization of
back-propagation to recurrent neural networks"; S. Bai, J. Z. Kolter, V. Koltun
(2019), "Deep equilibrium models"; D. G. Anderson (1965) for the accelerated
fixed-point iteration; Y. Saad, M. Schultz (1986) for GMRES.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..cells import Activation, get_activation
from ..errors import ConvergenceError

__all__ = [
    "FixedPointInfo",
    "fixed_point",
    "recurrent_backprop",
    "lagrangian",
    "inverse_input",
    "steady_state",
    "SteadyState",
    "SteadyClassifier",
    "steady_gradient",
    "train_steady",
]

_FIXED_POINT_METHODS = ("iterate", "anderson")
_ADJOINT_METHODS = ("direct", "iterate", "gmres")


# ----------------------------------------------------------------------------- checks


def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


def _default_tol(dtype: torch.dtype) -> float:
    # 1e-12 in float64, ~1.2e-5 in float32: a hundred round-offs above the floor.
    return max(1e-12, 100.0 * torch.finfo(dtype).eps)


def _check_tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if not bool(torch.isfinite(t).all()):
        bad = (~torch.isfinite(t)).nonzero()
        raise ValueError(
            f"{name} contains {bad.shape[0]} NaN or Inf entries "
            f"(first at index {tuple(int(i) for i in bad[0])})"
        )
    return t


def _check_W(W: object) -> Tensor:
    W = _check_tensor("W", W)
    if W.dim() != 2 or W.shape[0] != W.shape[1]:
        raise ValueError(f"W has shape {_shape(W)} but a square (N, N) matrix is expected")
    return W


def _check_like(name: str, t: object, W: Tensor, *, ref: Tensor | None = None) -> Tensor:
    """A tensor of shape (N,) or (B, N) (or exactly ref's shape), on W's dtype and device."""
    t = _check_tensor(name, t)
    N = W.shape[0]
    if ref is not None:
        if t.shape != ref.shape:
            raise ValueError(f"{name} has shape {_shape(t)} but {_shape(ref)} is expected")
    elif t.dim() not in (1, 2) or t.shape[-1] != N:
        raise ValueError(f"{name} has shape {_shape(t)} but ({N},) or (B, {N}) is expected")
    if t.dtype != W.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but W has dtype {W.dtype}")
    if t.device != W.device:
        raise ValueError(f"{name} is on device {t.device} but W is on {W.device}")
    return t


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")


# ------------------------------------------------------------------------ fixed point


class FixedPointInfo(NamedTuple):
    """Outcome of :func:`fixed_point`."""

    converged: bool
    residual: float  # max over the batch of ||x_b - f(W x_b + b_b)||_2
    iterations: int  # updates of x performed (evaluations of f beyond the first)


def _max_norm(r: Tensor) -> float:
    return float(r.norm(dim=-1).max())


def fixed_point(
    W: Tensor,
    b: Tensor,
    *,
    activation: str | Activation = "tanh",
    x0: Tensor | None = None,
    method: str = "iterate",
    damping: float = 1.0,
    tol: float | None = None,
    max_iter: int = 1000,
    history: int = 5,
    throw: bool = True,
) -> tuple[Tensor, FixedPointInfo]:
    """The steady state ``x = f(W x + b)``.

    ``method="iterate"``: the damped iteration
    ``x <- (1 - damping) x + damping f(W x + b)``, which converges when the map is
    a contraction (e.g. ``||W||_2 < 1`` for tanh); damping < 1 tames oscillation.
    ``method="anderson"``: Anderson acceleration over the last ``history`` pairs
    ``(x_k, f_k)``, ``x <- sum_k alpha_k [(1 - damping) x_k + damping f_k]`` with
    ``alpha = argmin ||sum_k alpha_k (f_k - x_k)||, sum_k alpha_k = 1``, the small
    least-squares problems solved for all rows at once.

    Args:
        W: (N, N) weights.
        b: (N,) or (B, N) inputs (biases); a batch is solved at once.
        x0: initial state, b's shape or (N,); zeros by default.
        tol: on the absolute residual ``||x - f(W x + b)||_2`` of every row;
            default ``max(1e-12, 100 eps)`` of the dtype.
        max_iter: updates allowed.
        history: Anderson's memory m.
        throw: raise :class:`ConvergenceError` when ``tol`` is not reached (or the
            iteration diverges); with ``throw=False`` return the last state and
            ``info.converged == False``.

    Returns:
        ``(x, info)``: x of b's shape; ``info`` a :class:`FixedPointInfo` with the
        residual of the returned x (max over the batch).
    """
    W = _check_W(W)
    b = _check_like("b", b, W)
    act = get_activation(activation)
    _check_choice("method", method, _FIXED_POINT_METHODS)
    if not 0.0 < damping <= 1.0:
        raise ValueError(f"damping must lie in (0, 1], got {damping}")
    if max_iter < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}")
    if history < 1:
        raise ValueError(f"history must be >= 1, got {history}")
    tol = _default_tol(W.dtype) if tol is None else tol
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")

    bb = b.reshape(-1, b.shape[-1])  # (B, N)
    if x0 is None:
        x = torch.zeros_like(bb)
    else:
        x0 = _check_like("x0", x0, W)
        if x0.dim() == 2 and x0.shape != bb.shape:
            raise ValueError(f"x0 has shape {_shape(x0)} but {_shape(b)} is expected")
        x = x0.expand_as(bb).clone()

    with torch.no_grad():
        Wt = W.detach().T
        bb = bb.detach()

        def f_of(x: Tensor) -> Tensor:  # f(W x + b) for every row
            return act.fn(torch.addmm(bb, x, Wt))

        if method == "iterate":
            x, residual, k = _iterate(f_of, x, damping=damping, tol=tol, max_iter=max_iter)
        else:
            x, residual, k = _anderson(
                f_of, x, damping=damping, tol=tol, max_iter=max_iter, m=history
            )

    info = FixedPointInfo(converged=residual <= tol, residual=residual, iterations=k)
    if throw and not info.converged:
        how = "diverged" if not math.isfinite(residual) else "did not converge"
        raise ConvergenceError(
            f"fixed_point ({method}) {how}: residual ||x - f(Wx + b)|| = {residual:.3e} "
            f"> tol {tol:.3e} after {k} iterations (damping {damping}); try damping < 1, "
            f"method='anderson', more max_iter, or a W of smaller spectral norm",
            residual=residual,
            tol=tol,
            iterations=k,
        )
    return x.reshape(b.shape), info


def _iterate(
    f_of: Callable[[Tensor], Tensor], x: Tensor, *, damping: float, tol: float, max_iter: int
) -> tuple[Tensor, float, int]:
    for k in range(max_iter + 1):
        fx = f_of(x)
        residual = _max_norm(fx - x)
        if residual <= tol or k == max_iter or not math.isfinite(residual):
            return x, residual, k
        x = fx if damping == 1.0 else torch.lerp(x, fx, damping)
    raise AssertionError("unreachable")


def _anderson(
    f_of: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    damping: float,
    tol: float,
    max_iter: int,
    m: int,
) -> tuple[Tensor, float, int]:
    Bn, N = x.shape
    X = x.new_zeros(Bn, m, N)  # ring buffer of iterates x_k
    F = x.new_zeros(Bn, m, N)  # and of f(W x_k + b)
    # Tikhonov term relative to the Gram matrix's scale, so that tiny late
    # residuals are not swamped by an absolute regulariser.
    reg = math.sqrt(torch.finfo(x.dtype).eps)
    eye = torch.eye(m, dtype=x.dtype, device=x.device)
    for k in range(max_iter + 1):
        fx = f_of(x)
        residual = _max_norm(fx - x)
        if residual <= tol or k == max_iter or not math.isfinite(residual):
            return x, residual, k
        X[:, k % m], F[:, k % m] = x, fx
        n = min(k + 1, m)
        G = F[:, :n] - X[:, :n]  # (B, n, N) residuals g_k = f_k - x_k
        GG = G @ G.transpose(1, 2)  # (B, n, n)
        scale = GG.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(torch.finfo(x.dtype).tiny)
        z = torch.linalg.solve(
            GG + (reg * scale)[:, None, None] * eye[:n, :n], x.new_ones(Bn, n, 1)
        )
        alpha = z / z.sum(1, keepdim=True)  # (B, n, 1), sum_k alpha_k = 1
        x = (alpha * torch.lerp(X[:, :n], F[:, :n], damping)).sum(1)
    raise AssertionError("unreachable")


# --------------------------------------------------------------- recurrent backprop


def _slopes(act: Activation, W: Tensor, b: Tensor, x: Tensor) -> Tensor:
    """``D = f'(W x + b)``, (B, N), the diagonal of seed 000's slope matrix."""
    a = torch.addmm(b, x, W.T)
    return act.deriv(a, act.fn(a))


@torch.no_grad()  # a hand-derived gradient: it builds no graph of its own
def recurrent_backprop(
    W: Tensor,
    b: Tensor,
    x: Tensor,
    dR_dx: Tensor,
    *,
    activation: str | Activation = "tanh",
    method: str = "direct",
    tol: float | None = None,
    max_iter: int = 1000,
    restart: int = 30,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``R(x)`` at the steady state ``x = f(W x + b)`` by recurrent backprop.

    Solves for the sensitivity ``u = dR/db``::

        (I - D W^T) u = D dR/dx,     D = diag f'(W x + b)

    (seed 000's ``(D^-1 - W^T) u = dR/dx`` multiplied by D), then::

        dR/dW = sum_b u_b x_b^T,     dR/db = u.

    Methods:
        ``"direct"``: dense LU of the (B, N, N) matrices ``I - D W^T``, O(B N^3).
        Raises ValueError when a matrix is singular (zero pivot) or numerically
        singular (pivot ratio ``min|U_ii| / max|U_ii| < N eps``, or a backward
        error of the solve above ``100 N eps``): the steady state is then not a
        locally unique function of ``(W, b)`` and has no gradient.
        ``"iterate"``: the Neumann / fixed-point iteration
        ``u <- D (dR/dx + W^T u)``, the backward pass of the relaxation run to
        convergence; converges when the spectral radius of ``D W^T`` is < 1.
        ``"gmres"``: matrix-free restarted GMRES (restart length ``restart``),
        batched over rows, using only products with ``W``; converges whenever
        the system is nonsingular.

    Args:
        W: (N, N) weights.
        b: (N,) or (B, N) inputs.
        x: the steady state, b's shape (it is not re-checked to be one).
        dR_dx: dR/dx, b's shape.
        tol: for "iterate" and "gmres", on the relative residual
            ``||(I - D W^T) u - D dR/dx|| / ||D dR/dx||`` of every row; default
            ``max(1e-12, 100 eps)`` of the dtype.
        max_iter: for "iterate" and "gmres", updates of u (matrix-vector products).

    Returns:
        ``(dW, db, u)``: dW (N, N) summed over the batch; db = u of b's shape,
        per example.

    Raises:
        ConvergenceError: "iterate" or "gmres" did not reach ``tol`` within
            ``max_iter``; carries the residual, tol and iterations. There is no
            ``throw=False``: an unconverged adjoint is not a gradient.
        ValueError: "direct" met a (numerically) singular system.
    """
    W = _check_W(W)
    b = _check_like("b", b, W)
    x = _check_like("x", x, W, ref=b)
    dR_dx = _check_like("dR_dx", dR_dx, W, ref=b)
    act = get_activation(activation)
    _check_choice("method", method, _ADJOINT_METHODS)
    tol = _default_tol(W.dtype) if tol is None else tol
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    if max_iter < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}")
    if restart < 1:
        raise ValueError(f"restart must be >= 1, got {restart}")

    N = W.shape[0]
    bb, xb, g = (t.reshape(-1, N) for t in (b, x, dR_dx))
    D = _slopes(act, W, bb, xb)  # (B, N)
    r = D * g  # right-hand side D dR/dx
    if method == "direct":
        u = _adjoint_direct(W, D, r)
    elif method == "iterate":
        u = _adjoint_iterate(W, D, g, r, tol=tol, max_iter=max_iter)
    else:

        def matvec(v: Tensor) -> Tensor:  # (I - D W^T) v, row by row
            return v - D * (v @ W)

        u = _gmres(matvec, r, tol=tol, max_iter=max_iter, restart=restart)
    dW = u.T @ xb  # sum_b u_b x_b^T: the sensitivity lemma, one GEMM
    u = u.reshape(b.shape)
    return dW, u, u


def _adjoint_direct(W: Tensor, D: Tensor, r: Tensor) -> Tensor:
    Bn, N = D.shape
    eye = torch.eye(N, dtype=W.dtype, device=W.device)
    A = eye - D[:, :, None] * W.T  # (B, N, N): I - D W^T
    LU, pivots, info = torch.linalg.lu_factor_ex(A)
    pivot = LU.diagonal(dim1=1, dim2=2).abs()  # (B, N) = |U_ii|
    eps = torch.finfo(W.dtype).eps
    ratio = pivot.min(-1).values / pivot.max(-1).values.clamp_min(torch.finfo(W.dtype).tiny)
    bad = (info != 0) | (ratio < N * eps)
    if bool(bad.any()):
        rows = bad.nonzero().flatten()[:5].tolist()
        worst = float(ratio.min())
        raise ValueError(
            f"recurrent_backprop (direct): the adjoint system (I - D W^T) u = D dR/dx is "
            f"singular for batch rows {rows} (pivot ratio min|U_ii|/max|U_ii| = {worst:.3e} "
            f"< N eps = {N * eps:.3e}); D W^T has an eigenvalue ~1, so the steady state is not "
            f"a locally unique function of (W, b) and has no gradient there"
        )
    u = torch.linalg.lu_solve(LU, pivots, r[:, :, None])[:, :, 0]
    backward_error = (A @ u[:, :, None])[:, :, 0].sub_(r).norm(dim=-1) / (
        torch.linalg.matrix_norm(A) * u.norm(dim=-1) + r.norm(dim=-1)
    ).clamp_min(torch.finfo(W.dtype).tiny)
    if float(backward_error.max()) > 100 * N * eps:
        raise ValueError(
            f"recurrent_backprop (direct): the adjoint system (I - D W^T) u = D dR/dx is "
            f"ill-conditioned: backward error {float(backward_error.max()):.3e} > 100 N eps = "
            f"{100 * N * eps:.3e}"
        )
    return u


def _no_convergence(method: str, residual: float, tol: float, k: int) -> ConvergenceError:
    how = "diverged" if not math.isfinite(residual) else "did not converge"
    hint = (
        "the Neumann series needs spectral radius of D W^T < 1; try method='gmres' or 'direct'"
        if method == "iterate"
        else "try a larger restart or max_iter, or method='direct'"
    )
    return ConvergenceError(
        f"recurrent_backprop ({method}) {how}: relative residual "
        f"||(I - D W^T) u - D dR/dx|| / ||D dR/dx|| = {residual:.3e} > tol {tol:.3e} "
        f"after {k} iterations; {hint}",
        residual=residual,
        tol=tol,
        iterations=k,
    )


def _adjoint_iterate(
    W: Tensor, D: Tensor, g: Tensor, r: Tensor, *, tol: float, max_iter: int
) -> Tensor:
    scale = r.norm(dim=-1).clamp_min(torch.finfo(r.dtype).tiny)
    u = r  # u_0 = D dR/dx, the first term of the Neumann series
    for k in range(max_iter + 1):
        u_next = D * (g + u @ W)  # D (dR/dx + W^T u), row by row
        residual = float(((u_next - u).norm(dim=-1) / scale).max())
        if residual <= tol:
            return u_next  # its residual is smaller still (by the contraction)
        if k == max_iter or not math.isfinite(residual):
            raise _no_convergence("iterate", residual, tol, k)
        u = u_next
    raise AssertionError("unreachable")


def _gmres(
    matvec: Callable[[Tensor], Tensor], r: Tensor, *, tol: float, max_iter: int, restart: int
) -> Tensor:
    """Solve ``A u = r`` for every row of r (B, N) by restarted GMRES(m), batched.

    Arnoldi with classical Gram-Schmidt applied twice (CGS2, two batched GEMMs per
    step) and Givens rotations on the Hessenberg matrix, all vectorised over the
    batch; a row stops growing its Krylov space once its residual estimate is
    below tol, and its unused columns are masked out of the triangular solve.
    """
    Bn, N = r.shape
    m = min(restart, N)
    tiny = torch.finfo(r.dtype).tiny
    scale = r.norm(dim=-1).clamp_min(tiny)
    u = torch.zeros_like(r)
    steps = torch.arange(m, device=r.device)
    k = 0
    while True:
        resid = r - matvec(u)
        beta = resid.norm(dim=-1)
        rel = beta / scale
        residual = float(rel.max())
        if residual <= tol:
            return u
        if k >= max_iter or not math.isfinite(residual):
            raise _no_convergence("gmres", residual, tol, k)
        V = r.new_zeros(Bn, m + 1, N)  # Krylov basis
        R = r.new_zeros(Bn, m, m)  # Hessenberg matrix, made upper triangular
        cs, sn = r.new_zeros(Bn, m), r.new_zeros(Bn, m)  # Givens rotations
        g = r.new_zeros(Bn, m + 1)  # rotated beta e_1
        g[:, 0] = beta
        V[:, 0] = resid / beta.clamp_min(tiny)[:, None]
        active = rel > tol
        used = torch.zeros(Bn, dtype=torch.long, device=r.device)
        for j in range(m):
            w = matvec(V[:, j])
            Vj = V[:, : j + 1]
            h = (Vj @ w[:, :, None])[:, :, 0]
            w = w - (h[:, None, :] @ Vj)[:, 0]
            h2 = (Vj @ w[:, :, None])[:, :, 0]  # second pass restores orthogonality
            w = w - (h2[:, None, :] @ Vj)[:, 0]
            h = h + h2
            h_next = w.norm(dim=-1)
            V[:, j + 1] = w / h_next.clamp_min(tiny)[:, None]
            for i in range(j):  # apply the earlier rotations to the new column
                hi, hk = h[:, i].clone(), h[:, i + 1].clone()
                h[:, i] = cs[:, i] * hi + sn[:, i] * hk
                h[:, i + 1] = -sn[:, i] * hi + cs[:, i] * hk
            rho = torch.hypot(h[:, j], h_next)
            # A V_j = 0 (a singular A): rotate by (0, 1) so that the residual
            # estimate keeps its size instead of reading as converged.
            null = rho <= tiny
            cs[:, j] = torch.where(null, 0.0, h[:, j] / rho.clamp_min(tiny))
            sn[:, j] = torch.where(null, 1.0, h_next / rho.clamp_min(tiny))
            h[:, j] = rho
            R[:, : j + 1, j] = h
            g[:, j + 1] = -sn[:, j] * g[:, j]
            g[:, j] = cs[:, j] * g[:, j]
            used = torch.where(active, j + 1, used)
            active = active & (g[:, j + 1].abs() / scale > tol)
            k += 1
            if not bool(active.any()) or k >= max_iter:
                break
        n = j + 1
        # Columns a row did not use become identity rows/columns with zero rhs.
        keep = steps[:n][None, :] < used[:, None]  # (B, n)
        both = keep[:, :, None] & keep[:, None, :]
        eye = torch.eye(n, dtype=r.dtype, device=r.device)
        Rn = torch.where(both, R[:, :n, :n], eye)
        # a zero diagonal (a null column) has a zero rotated rhs: take y_j = 0 there
        Rn = Rn + torch.diag_embed((Rn.diagonal(dim1=1, dim2=2) == 0).to(r.dtype))
        y = torch.linalg.solve_triangular(
            Rn, torch.where(keep, g[:, :n], 0.0)[:, :, None], upper=True
        )
        u = u + (y.transpose(1, 2) @ V[:, :n])[:, 0]


# ------------------------------------------------------------ Lagrangian, inverse input


def inverse_input(W: Tensor, x: Tensor, *, activation: str | Activation = "tanh") -> Tensor:
    """Input as a function of output: ``b = f^-1(x) - W x``.

    The unique b for which x is a steady state, even where the steady state is
    not a unique function of b.

    Args:
        W: (N, N) weights.
        x: (N,) or (B, N), every entry inside f's (open) range.

    Returns:
        b of x's shape.

    Raises:
        ValueError: f has no inverse (relu), or entries of x lie outside f's range
            (the message names a few of them and the range).
    """
    W = _check_W(W)
    act = get_activation(activation)
    if act.inverse is None:
        raise ValueError(
            f"activation {act.name!r} has no inverse, so no input b makes a given x a steady "
            f"state uniquely; use an invertible activation (tanh, sigmoid, softplus, identity)"
        )
    x = _check_like("x", x, W)
    lo, hi = act.range
    outside = ~((x > lo) & (x < hi))
    if bool(outside.any()):
        idx = outside.nonzero()
        shown = ", ".join(
            f"x[{', '.join(str(int(i)) for i in ix)}] = {float(x.detach()[tuple(ix)]):.6g}"
            for ix in idx[:4].tolist()
        )
        more = f" and {idx.shape[0] - 4} more" if idx.shape[0] > 4 else ""
        raise ValueError(
            f"x has {idx.shape[0]} entries outside the range ({lo}, {hi}) of {act.name}, "
            f"where f^-1 is defined: {shown}{more}"
        )
    return act.inverse(x) - x @ W.T


def lagrangian(
    x: Tensor,
    u: Tensor,
    W: Tensor,
    b: Tensor,
    R: Callable[[Tensor], Tensor],
    *,
    activation: str | Activation = "tanh",
) -> Tensor:
    """Seed 000's Lagrangian ``L(x, u, W, b) = R(x) - u^T [f^-1(x) - W x - b]``.

    At the steady state and its adjoint (``dL/du = 0`` and ``dL/dx = 0``) it equals
    ``R(x)``, and its partial derivatives holding x and u fixed are the reward
    gradients ``dL/dW = u x^T`` and ``dL/db = u``.

    Args:
        x, u, b: (N,) or (B, N), one shape; x inside f's range.
        W: (N, N).
        R: the reward, x -> scalar tensor (for a batch, summed over rows).

    Returns:
        L, a scalar tensor, differentiable in every argument.
    """
    W = _check_W(W)
    x = _check_like("x", x, W)
    u = _check_like("u", u, W, ref=x)
    b = _check_like("b", b, W, ref=x)
    reward = R(x)
    if not isinstance(reward, Tensor) or reward.dim() != 0:
        got = _shape(reward) if isinstance(reward, Tensor) else type(reward).__name__
        raise ValueError(f"R(x) must return a scalar tensor, got {got}")
    constraint = inverse_input(W, x, activation=activation) - b  # f^-1(x) - W x - b
    return reward - (u * constraint).sum()


# ---------------------------------------------------------------------- implicit layer


class _SteadyStateFunction(torch.autograd.Function):
    """x = fixed_point(W, b) forward (no graph); recurrent backprop backward.

    Saves exactly (W, b, x): memory is independent of the forward iterations.
    """

    @staticmethod
    def forward(ctx: Any, W: Tensor, b: Tensor, options: dict[str, Any]) -> Tensor:
        x, _ = fixed_point(
            W,
            b,
            activation=options["activation"],
            method=options["method"],
            damping=options["damping"],
            tol=options["tol"],
            max_iter=options["max_iter"],
        )
        ctx.save_for_backward(W, b, x)
        ctx.options = options
        return x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_x: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        W, b, x = ctx.saved_tensors
        options = ctx.options
        dW, db, _ = recurrent_backprop(
            W,
            b,
            x,
            grad_x.contiguous(),
            activation=options["activation"],
            method=options["backward_method"],
            tol=options["backward_tol"],
            max_iter=options["backward_max_iter"],
        )
        return (
            dW if ctx.needs_input_grad[0] else None,
            db if ctx.needs_input_grad[1] else None,
            None,
        )


def steady_state(
    W: Tensor,
    b: Tensor,
    *,
    activation: str | Activation = "tanh",
    method: str = "anderson",
    damping: float = 1.0,
    tol: float | None = None,
    max_iter: int = 1000,
    backward_method: str = "direct",
    backward_tol: float | None = None,
    backward_max_iter: int = 1000,
) -> Tensor:
    """The steady state ``x = f(W x + b)`` as a differentiable function of (W, b).

    Forward: :func:`fixed_point` without building a graph. Backward:
    :func:`recurrent_backprop` with ``dR/dx`` the incoming gradient. Only
    ``(W, b, x)`` are kept for the backward pass, whatever the number of forward
    iterations. Not twice differentiable.

    Args:
        W: (N, N); b: (N,) or (B, N). Returns x of b's shape.
    """
    _check_choice("method", method, _FIXED_POINT_METHODS)
    _check_choice("backward_method", backward_method, _ADJOINT_METHODS)
    options = {
        "activation": get_activation(activation),
        "method": method,
        "damping": damping,
        "tol": tol,
        "max_iter": max_iter,
        "backward_method": backward_method,
        "backward_tol": backward_tol,
        "backward_max_iter": backward_max_iter,
    }
    return _SteadyStateFunction.apply(W, b, options)


class SteadyState(nn.Module):
    """An implicit layer ``b -> x``, ``x = f(W x + b)``, W a (N, N) parameter.

    A thin shell over :func:`steady_state`; ``W`` is drawn from
    ``N(0, (init_scale / sqrt(N))^2)``, whose spectral norm is about
    ``2 init_scale``: below 1 (a contraction for tanh, sigmoid) when
    ``init_scale < 0.5``.
    """

    def __init__(
        self,
        n: int,
        *,
        activation: str | Activation = "tanh",
        method: str = "anderson",
        damping: float = 1.0,
        tol: float | None = None,
        max_iter: int = 1000,
        backward_method: str = "direct",
        backward_tol: float | None = None,
        backward_max_iter: int = 1000,
        init_scale: float = 0.4,
        seed: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        _check_choice("method", method, _FIXED_POINT_METHODS)
        _check_choice("backward_method", backward_method, _ADJOINT_METHODS)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        W = torch.randn(n, n, generator=gen, dtype=torch.float64) * (init_scale / math.sqrt(n))
        self.W = nn.Parameter(W.to(dtype))
        self.activation = get_activation(activation)
        self.options = {
            "method": method,
            "damping": damping,
            "tol": tol,
            "max_iter": max_iter,
            "backward_method": backward_method,
            "backward_tol": backward_tol,
            "backward_max_iter": backward_max_iter,
        }

    def forward(self, b: Tensor) -> Tensor:
        """b (N,) or (B, N) -> x of b's shape."""
        return steady_state(self.W, b, activation=self.activation, **self.options)

    def extra_repr(self) -> str:
        return f"n={self.W.shape[0]}, activation={self.activation.name!r}, {self.options}"


# -------------------------------------------------------------------- digits classifier


class SteadyClassifier(nn.Module):
    """A steady-state classifier: the image enters as the input bias of the network::

        b = U image + c,      x = f(W x + b),      z = V x + d,      p = softmax(z)

    Parameters: ``U (N, P)``, ``c (N,)``, ``W (N, N)``, ``V (K, N)``, ``d (K,)``
    with P pixels (64) and K classes (10). ``forward`` returns the logits and is
    differentiable through the implicit layer; :func:`steady_gradient` computes
    the same gradient by hand.
    """

    def __init__(
        self,
        hidden: int = 128,
        *,
        n_inputs: int = 64,
        n_classes: int = 10,
        activation: str | Activation = "tanh",
        method: str = "anderson",
        damping: float = 1.0,
        tol: float | None = None,
        max_iter: int = 500,
        backward_method: str = "direct",
        init_scale: float = 0.4,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        for name, value in (("hidden", hidden), ("n_inputs", n_inputs), ("n_classes", n_classes)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        _check_choice("method", method, _FIXED_POINT_METHODS)
        _check_choice("backward_method", backward_method, _ADJOINT_METHODS)
        gen = torch.Generator().manual_seed(seed)

        def draw(*shape: int, std: float) -> nn.Parameter:
            return nn.Parameter(
                (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dtype)
            )

        self.U = draw(hidden, n_inputs, std=1.0 / math.sqrt(n_inputs))
        self.c = nn.Parameter(torch.zeros(hidden, dtype=dtype))
        self.W = draw(hidden, hidden, std=init_scale / math.sqrt(hidden))
        self.V = draw(n_classes, hidden, std=1.0 / math.sqrt(hidden))
        self.d = nn.Parameter(torch.zeros(n_classes, dtype=dtype))
        self.activation = get_activation(activation)
        self.options = {
            "method": method,
            "damping": damping,
            "tol": tol,
            "max_iter": max_iter,
            "backward_method": backward_method,
        }

    def _flat(self, images: Tensor) -> Tensor:
        P = self.U.shape[1]
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() < 2 or images[0].numel() != P:
            raise ValueError(
                f"images has shape {_shape(images)} but (B, {P}) or (B, ...) with {P} "
                f"pixels per image is expected"
            )
        if images.dtype != self.U.dtype:
            raise TypeError(f"images has dtype {images.dtype} but the model is {self.U.dtype}")
        return images.reshape(images.shape[0], P)

    def steady_input(self, images: Tensor) -> Tensor:
        """``b = U image + c``: images (B, 8, 8) or (B, 64) -> (B, N)."""
        return torch.addmm(self.c, self._flat(images), self.U.T)

    def forward(self, images: Tensor) -> Tensor:
        """images (B, 8, 8) or (B, 64) -> logits z (B, K)."""
        x = steady_state(
            self.W,
            self.steady_input(images),
            activation=self.activation,
            method=self.options["method"],
            damping=self.options["damping"],
            tol=self.options["tol"],
            max_iter=self.options["max_iter"],
            backward_method=self.options["backward_method"],
        )
        return torch.addmm(self.d, x, self.V.T)


def _steady_gradient(
    model: SteadyClassifier, images: Tensor, labels: Tensor
) -> tuple[Tensor, dict[str, Tensor], FixedPointInfo, Tensor]:
    if not isinstance(model, SteadyClassifier):
        raise TypeError(f"model must be a SteadyClassifier, got {type(model).__name__}")
    if not isinstance(labels, Tensor) or labels.dtype != torch.long:
        got = labels.dtype if isinstance(labels, Tensor) else type(labels).__name__
        raise TypeError(f"labels must be an int64 tensor of class indices, got {got}")
    K = model.V.shape[0]
    with torch.no_grad():
        image = model._flat(images)  # (B, P)
        Bn = image.shape[0]
        if labels.shape != (Bn,):
            raise ValueError(f"labels has shape {_shape(labels)} but ({Bn},) is expected")
        if bool(((labels < 0) | (labels >= K)).any()):
            raise ValueError(f"labels must lie in 0..{K - 1}")
        opt = model.options
        b = torch.addmm(model.c, image, model.U.T)  # b = U image + c
        x, info = fixed_point(
            model.W,
            b,
            activation=model.activation,
            method=opt["method"],
            damping=opt["damping"],
            tol=opt["tol"],
            max_iter=opt["max_iter"],
        )
        z = torch.addmm(model.d, x, model.V.T)  # z = V x + d
        logp = torch.log_softmax(z, dim=-1)
        loss = -logp.gather(1, labels[:, None]).mean()
        dz = logp.exp()
        dz[torch.arange(Bn), labels] -= 1.0
        dz /= Bn  # dloss/dz = (p - onehot) / B
        dR_dx = dz @ model.V  # V^T dloss/dz, row by row
        dW, u, _ = recurrent_backprop(
            model.W, b, x, dR_dx, activation=model.activation, method=opt["backward_method"]
        )
        grads = {
            "U": u.T @ image,  # db/dU: sum_b u_b image_b^T
            "c": u.sum(0),
            "W": dW,
            "V": dz.T @ x,
            "d": dz.sum(0),
        }
    return loss, {name: grads[name] for name, _ in model.named_parameters()}, info, z


def steady_gradient(
    model: SteadyClassifier, images: Tensor, labels: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean cross-entropy of a :class:`SteadyClassifier` and its gradient, by hand.

    ``b = U image + c``, ``x = fixed_point(W, b)``, ``z = V x + d``; then
    ``dl/dz = (softmax(z) - onehot) / B``, ``dl/dx = V^T dl/dz``, u from
    :func:`recurrent_backprop`, and the chain rule through ``b``::

        dl/dW = sum_b u_b x_b^T    dl/dU = sum_b u_b image_b^T    dl/dc = sum_b u_b
        dl/dV = sum_b dl/dz_b x_b^T                                dl/dd = sum_b dl/dz_b

    No graph is built through the iterations.

    Args:
        images: (B, 8, 8) or (B, 64), the model's dtype.
        labels: (B,) int64 class indices.

    Returns:
        ``(loss, grads)``: loss a scalar tensor; grads a dict name -> tensor,
        keyed and ordered like ``model.named_parameters()``.

    Raises:
        ConvergenceError: the fixed point or the adjoint did not converge.
    """
    loss, grads, _, _ = _steady_gradient(model, images, labels)
    return loss, grads


def train_steady(
    model: SteadyClassifier,
    *,
    steps: int = 300,
    lr: float = 1e-2,
    batch_size: int = 64,
    seed: int = 0,
    max_spectral_norm: float | None = 0.9,
    callback: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Train a :class:`SteadyClassifier` on the digits with Adam and recurrent backprop.

    Minibatches of ``batch_size`` are drawn from shuffled epochs of the fixed
    training split (:func:`rnngrad.tasks.digits.load_digits`), seeded by ``seed``;
    gradients come from :func:`steady_gradient`. A fixed point or adjoint that
    fails to converge raises :class:`ConvergenceError`: training never continues
    on a wrong gradient.

    Stability: after every Adam step W is scaled back onto the ball
    ``||W||_2 <= max_spectral_norm`` (a projection; None leaves W free). With
    ``|f'| <= 1`` (tanh, sigmoid) and ``max_spectral_norm < 1`` the map
    ``x -> f(W x + b)`` is then a contraction: the steady state exists, is
    unique, and both the forward iteration and the adjoint's Neumann series
    converge, at least as fast as ``max_spectral_norm^k``.

    Args:
        callback: called after every step as ``callback(step, {"loss", "residual",
            "iterations"})`` (step counts from 1).

    Returns:
        dict with ``test_accuracy``, ``test_loss``, ``train_accuracy``,
        ``train_loss`` (full splits, after training), ``steps``, ``seconds``
        (wall time of the training loop) and ``max_iterations`` (the most forward
        iterations any step needed).
    """
    from ..tasks.digits import load_digits

    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_positive("lr", lr)
    if max_spectral_norm is not None:
        _check_positive("max_spectral_norm", max_spectral_norm)
    dtype = model.W.dtype
    X_train, y_train, X_test, y_test = load_digits(dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    params = dict(model.named_parameters())
    n = X_train.shape[0]
    order = torch.randperm(n, generator=gen)
    pos = 0
    max_iterations = 0
    start = time.perf_counter()
    for step in range(1, steps + 1):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        loss, grads, info, _ = _steady_gradient(model, X_train[idx], y_train[idx])
        for name, g in grads.items():
            params[name].grad = g
        optimizer.step()
        if max_spectral_norm is not None:
            with torch.no_grad():
                sigma = torch.linalg.matrix_norm(model.W, ord=2)
                if sigma > max_spectral_norm:
                    model.W.mul_(max_spectral_norm / sigma)
        max_iterations = max(max_iterations, info.iterations)
        if callback is not None:
            callback(
                step,
                {"loss": float(loss), "residual": info.residual, "iterations": info.iterations},
            )
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    train_loss, train_acc = _evaluate(model, X_train, y_train)
    test_loss, test_acc = _evaluate(model, X_test, y_test)
    return {
        "test_accuracy": test_acc,
        "test_loss": test_loss,
        "train_accuracy": train_acc,
        "train_loss": train_loss,
        "steps": steps,
        "seconds": seconds,
        "max_iterations": max_iterations,
    }


def _evaluate(model: SteadyClassifier, images: Tensor, labels: Tensor) -> tuple[float, float]:
    with torch.no_grad():
        b = model.steady_input(images)
        opt = model.options
        x, _ = fixed_point(
            model.W,
            b,
            activation=model.activation,
            method=opt["method"],
            damping=opt["damping"],
            tol=opt["tol"],
            max_iter=opt["max_iter"],
        )
        z = torch.addmm(model.d, x, model.V.T)
        loss = torch.nn.functional.cross_entropy(z, labels)
        accuracy = (z.argmax(-1) == labels).to(torch.float64).mean()
    return float(loss), float(accuracy)
