"""Recurrent backprop: the gradient of a reward of the steady state (Almeida 1987; Pineda 1987).

At the steady state ``x = f(W x + b)`` of a network, with the slopes
``D = diag f'(W x + b)``, the sensitivity ``u = dR/db`` of a reward ``R(x)``
solves the adjoint equation::

    (D^-1 - W^T) u = dR/dx          solved here as   (I - D W^T) u = D dR/dx,

the same system multiplied through by ``D``, which stays defined where ``f' = 0``
(a saturated or silent unit simply gets ``u_i = 0``). The sensitivity lemma then
gives every gradient from ``u``::

    dR/dW = u x^T,        dR/db = u.

Three solvers: a dense LU of ``I - D W^T`` (small N), the Neumann iteration
``u <- D (dR/dx + W^T u)`` (the backward pass of the relaxation run to
convergence; needs the spectral radius of ``D W^T`` below 1), and matrix-free
restarted GMRES (Saad & Schultz 1986), which converges for any nonsingular system.

Batches: ``b`` is ``(N,)`` or ``(B, N)``; a batch holds B independent networks
sharing ``W`` (each row its own steady state ``x_b`` and sensitivity ``u_b``).
Then ``dR/dW = sum_b u_b x_b^T`` (one GEMM, ``u^T x``) and ``dR/db`` is ``u``
itself, ``(B, N)``, per example -- sum it over rows when ``b`` is a bias shared
by the batch.

References: L. B. Almeida (1987), F. J. Pineda (1987), "Generalization of
back-propagation to recurrent neural networks"; Y. Saad, M. Schultz (1986), GMRES.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..cells import Activation, get_activation
from ..errors import ConvergenceError
from ._checks import check_choice, check_int, check_like, check_tol, check_W, default_tol

__all__ = ["recurrent_backprop"]

ADJOINT_METHODS = ("direct", "iterate", "gmres")


def check_adjoint_options(
    *, method: object, tol: object, max_iter: object, restart: object = 30, prefix: str = ""
) -> None:
    """Type and range of the adjoint solver's options (also used by the implicit layer)."""
    check_choice(f"{prefix}method", method, ADJOINT_METHODS)
    check_tol(f"{prefix}tol", tol)
    check_int(f"{prefix}max_iter", max_iter, minimum=0)
    check_int("restart (GMRES's restart length)", restart, minimum=1)


def _slopes(act: Activation, W: Tensor, b: Tensor, x: Tensor) -> Tensor:
    """``D = f'(W x + b)``, (B, N), the diagonal of the slope matrix."""
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

    (Almeida and Pineda's ``(D^-1 - W^T) u = dR/dx`` multiplied by D), then::

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
            ``max(1e-12, 100 eps)`` of the dtype (None). A finite number >= 0.
        max_iter: for "iterate" and "gmres", updates of u (matrix-vector
            products), an int >= 0.
        restart: GMRES's restart length, an int >= 1.

    Returns:
        ``(dW, db, u)``: dW (N, N) summed over the batch; db = u of b's shape,
        per example.

    Raises:
        ConvergenceError: "iterate" or "gmres" did not reach ``tol`` within
            ``max_iter``; carries the residual, tol and iterations. There is no
            ``throw=False``: an unconverged adjoint is not a gradient.
        ValueError: "direct" met a (numerically) singular system.
        TypeError, ValueError: an argument of the wrong type, shape or range.
    """
    W = check_W(W)
    b = check_like("b", b, W)
    x = check_like("x", x, W, ref=b)
    dR_dx = check_like("dR_dx", dR_dx, W, ref=b)
    act = get_activation(activation)
    check_adjoint_options(method=method, tol=tol, max_iter=max_iter, restart=restart)
    tol = default_tol(W.dtype) if tol is None else float(tol)

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
