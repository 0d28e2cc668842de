"""The steady state of a recurrent network (Almeida 1987; Pineda 1987), found by iteration.

The network's steady state is the fixed point::

    x = f(W x + b)                                  F(x, W, b) = x - f(W x + b) = 0

found by the damped iteration::

    x_{k+1} = (1 - damping) x_k + damping f(W x_k + b)

which converges when the map is a contraction (``||W||_2 < 1`` with ``|f'| <= 1``),
or by Anderson acceleration (Anderson 1965), which mixes the last m pairs
``(x_k, f_k = f(W x_k + b))``::

    x_{k+1} = sum_k alpha_k [(1 - damping) x_k + damping f_k],
    alpha = argmin ||sum_k alpha_k (f_k - x_k)||_2   subject to   sum_k alpha_k = 1.

Batches: ``b`` is ``(N,)`` or ``(B, N)``, B independent networks sharing ``W``,
iterated together (one GEMM per step). A strictly lower-triangular ``W`` (a
feedforward net) reaches its fixed point exactly after at most N iterations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from ..cells import Activation, get_activation
from ..errors import ConvergenceError
from ._checks import (
    check_bool,
    check_choice,
    check_damping,
    check_int,
    check_like,
    check_tol,
    check_W,
    default_tol,
    shape_str,
)

__all__ = ["FixedPointInfo", "fixed_point"]

FIXED_POINT_METHODS = ("iterate", "anderson")


class FixedPointInfo(NamedTuple):
    """Outcome of :func:`fixed_point`."""

    converged: bool
    residual: float  # max over the batch of ||x_b - f(W x_b + b_b)||_2
    iterations: int  # updates of x performed (evaluations of f beyond the first)


def check_fixed_point_options(
    *, method: object, damping: object, tol: object, max_iter: object, history: object = 5
) -> None:
    """Type and range of the forward solver's options (also used by the implicit layer)."""
    check_choice("method", method, FIXED_POINT_METHODS)
    check_damping(damping)
    check_tol("tol", tol)
    check_int("max_iter", max_iter, minimum=0)
    check_int("history (Anderson's memory m)", history, minimum=1)


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
        method: "iterate" or "anderson".
        damping: a number in (0, 1].
        tol: on the absolute residual ``||x - f(W x + b)||_2`` of every row, a
            finite number >= 0; default (None) ``max(1e-12, 100 eps)`` of the dtype.
        max_iter: updates allowed, an int >= 0.
        history: Anderson's memory m, an int >= 1.
        throw: raise :class:`ConvergenceError` when ``tol`` is not reached (or the
            iteration diverges); with ``throw=False`` return the last state and
            ``info.converged == False``.

    Returns:
        ``(x, info)``: x of b's shape; ``info`` a :class:`FixedPointInfo` with the
        residual of the returned x (max over the batch).

    Raises:
        TypeError, ValueError: an argument of the wrong type, shape or range.
        ConvergenceError: not converged (with ``throw=True``).
    """
    W = check_W(W)
    b = check_like("b", b, W)
    act = get_activation(activation)
    check_fixed_point_options(
        method=method, damping=damping, tol=tol, max_iter=max_iter, history=history
    )
    check_bool("throw", throw)
    damping = float(damping)
    tol = default_tol(W.dtype) if tol is None else float(tol)

    bb = b.reshape(-1, b.shape[-1])  # (B, N)
    if x0 is None:
        x = torch.zeros_like(bb)
    else:
        x0 = check_like("x0", x0, W)
        if x0.dim() == 2 and x0.shape != bb.shape:
            raise ValueError(f"x0 has shape {shape_str(x0)} but {shape_str(b)} is expected")
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


def _max_norm(r: Tensor) -> float:
    return float(r.norm(dim=-1).max())


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
