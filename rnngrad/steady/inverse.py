"""Input as a function of output (Almeida 1987; Pineda 1987), for a steady state and for a trajectory.

Steady state. The input that makes ``x`` a steady state of ``x = f(W x + b)`` is::

    b = f^-1(x) - W x,              db/dx = D^-1 - W,   D = diag f'(f^-1(x)),

unique even where x is not a unique function of b (:func:`inverse_input`). The
Jacobian is the transpose of recurrent backprop's matrix ``D^-1 - W^T``.

Trajectory. The network ``x(t) = f(W x(t-1) + b(t))``, t = 1..T, from a given
``x(0)``, is run by the inputs::

    b(t) = f^-1(x(t)) - W x(t-1)                                (:func:`inverse_trajectory`)

and the Jacobian ``db(t)/dx(t') = delta_{t t'} D^-1(t) - delta_{t-1, t'} W`` is
block lower-bidiagonal, ``D(t) = diag f'(W x(t-1) + b(t)) = diag f'(f^-1(x(t)))``
on the diagonal (:func:`inverse_trajectory_jacobian`). The chain rule through
``x -> b -> R`` relates the BPTT sensitivities ``u(t) = dR/db(t)`` to the
derivatives of a reward ``R(x(1), ..., x(T))`` held as a function of the states::

    dR/dx(t) = D^-1(t) u(t) - W^T u(t+1),        u(T+1) = 0     (:func:`trajectory_state_gradient`)

which is ``(db/dx)^T u``; read backwards, ``u(t) = D(t) [dR/dx(t) + W^T u(t+1)]``,
it is BPTT's backward pass. In rnngrad's RNN notation ``W = W_rec``,
``b(t) = W_in x_t + b_rec`` and ``x(t) = h_t`` (the vanilla cell, alpha = 1).

Every function here needs f^-1: x must lie inside f's open range (tanh, sigmoid, softplus,
identity; relu has no inverse). Outside it, or where a result overflows to Inf or
NaN, they raise ValueError naming the entries.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..cells import Activation, get_activation
from ._checks import (
    check_finite_result,
    check_like,
    check_same_kind,
    check_tensor,
    check_W,
    shape_str,
)

__all__ = [
    "inverse_input",
    "inverse_trajectory",
    "inverse_trajectory_jacobian",
    "trajectory_state_gradient",
]


def _invertible(activation: str | Activation) -> Activation:
    act = get_activation(activation)
    if act.inverse is None:
        raise ValueError(
            f"activation {act.name!r} has no inverse, so no input b makes a given x a steady "
            f"state uniquely; use an invertible activation (tanh, sigmoid, softplus, identity)"
        )
    return act


def _check_in_range(act: Activation, x: Tensor, describe: Callable[[tuple[int, ...]], str]) -> None:
    """Every entry of x inside f's open range, or a ValueError naming a few that are not."""
    lo, hi = act.range
    outside = ~((x > lo) & (x < hi))
    if not bool(outside.any()):
        return
    idx = outside.nonzero()
    xd = x.detach()
    shown = ", ".join(
        f"{describe(tuple(ix))} = {float(xd[tuple(ix)]):.6g}" for ix in idx[:4].tolist()
    )
    more = f" and {idx.shape[0] - 4} more" if idx.shape[0] > 4 else ""
    raise ValueError(
        f"x has {idx.shape[0]} entries outside the range ({lo}, {hi}) of {act.name}, "
        f"where f^-1 is defined: {shown}{more}"
    )


def _index(ix: tuple[int, ...]) -> str:
    return f"x[{', '.join(str(i) for i in ix)}]"


# ----------------------------------------------------------------------- steady state


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
        ValueError: f has no inverse (relu); entries of x lie outside f's range
            (the message names a few of them and the range); or b overflowed to
            Inf or NaN (x or W too large for the dtype).
    """
    W = check_W(W)
    act = _invertible(activation)
    x = check_like("x", x, W)
    _check_in_range(act, x, _index)
    b = act.inverse(x) - x @ W.T
    check_finite_result(
        "b",
        b,
        f"b = f^-1(x) - W x is not representable in {W.dtype}; x or W is too large",
        lambda ix: f"b[{', '.join(map(str, ix))}]",
    )
    return b


# ------------------------------------------------------------------------- trajectory


def _check_trajectory(
    W: Tensor, x: object, x0: object | None, name: str = "x"
) -> tuple[Tensor, Tensor]:
    """x (T, N) or (T, B, N) -> (x, x_prev), x_prev = [x(0), x(1), ..., x(T-1)]."""
    x = check_tensor(name, x)
    N = W.shape[0]
    if x.dim() not in (2, 3) or x.shape[-1] != N or x.shape[0] < 1:
        raise ValueError(
            f"{name} has shape {shape_str(x)} but (T, {N}) or (T, B, {N}) with T >= 1 is expected"
        )
    check_same_kind(name, x, W)
    if x0 is None:
        start = x.new_zeros(x.shape[1:])
    else:
        start = check_tensor("x0", x0)
        if start.shape not in (x.shape[1:], (N,)):
            raise ValueError(
                f"x0 has shape {shape_str(start)} but {shape_str(x[0])} or ({N},) is expected"
            )
        check_same_kind("x0", start, W)
        start = start.expand(x.shape[1:])
    return x, torch.cat([start[None], x[:-1]])


def _step(ix: tuple[int, ...], batched: bool) -> str:
    """Index into a (T, [B,] N) tensor -> 'step t=.., [batch row ..,] unit ..' (t from 1)."""
    row = f"batch row {ix[1]}, " if batched else ""
    return f"step t={ix[0] + 1}, {row}unit {ix[-1]}"


def inverse_trajectory(
    W: Tensor,
    x: Tensor,
    *,
    x0: Tensor | None = None,
    activation: str | Activation = "tanh",
) -> Tensor:
    """The inputs that make the network follow the trajectory x: ``b(t) = f^-1(x(t)) - W x(t-1)``.

    Running ``x(t) = f(W x(t-1) + b(t))`` from ``x0`` with these ``b(t)``
    reproduces ``x(1..T)``. Vectorised over t: one GEMM for all ``W x(t-1)``.

    Args:
        W: (N, N) weights.
        x: (T, N) or (T, B, N): ``x[t-1]`` is ``x(t)``, t = 1..T; every entry inside
            f's open range.
        x0: ``x(0)``, (N,) or x's (B, N); zeros when None.

    Returns:
        b of x's shape: ``b[t-1]`` is ``b(t)``.

    Raises:
        ValueError: f has no inverse (relu); entries of x outside f's range (the
            message names the steps, rows and units, t counted from 1); b
            overflowed to Inf or NaN.
    """
    W = check_W(W)
    act = _invertible(activation)
    x, x_prev = _check_trajectory(W, x, x0)
    batched = x.dim() == 3
    _check_in_range(act, x, lambda ix: f"{_step(ix, batched)}: {_index(ix)}")
    b = act.inverse(x) - x_prev @ W.T
    check_finite_result(
        "b(t)",
        b,
        f"b(t) = f^-1(x(t)) - W x(t-1) is not representable in {W.dtype}; x or W is too large",
        lambda ix: _step(ix, batched),
    )
    return b


def _inverse_slopes(act: Activation, x: Tensor, batched: bool) -> Tensor:
    """``D^-1 = 1 / f'(f^-1(x))``, x's shape, raising where it overflows."""
    d_inv = 1.0 / act.deriv(act.inverse(x), x)
    check_finite_result(
        "D^-1(t)",
        d_inv,
        f"f'(f^-1(x(t))) underflows to 0 in {x.dtype}: x(t) is too close to the edge of "
        f"{act.name}'s range",
        lambda ix: _step(ix, batched),
    )
    return d_inv


def inverse_trajectory_jacobian(
    W: Tensor, x: Tensor, *, activation: str | Activation = "tanh"
) -> Tensor:
    """The Jacobian ``db(t)/dx(t')`` of :func:`inverse_trajectory`, dense.

    Block lower-bidiagonal::

        db(t)/dx(t) = D^-1(t),  D(t) = diag f'(f^-1(x(t)));   db(t)/dx(t-1) = -W;   0 elsewhere.

    It does not depend on ``x(0)``. Built without loops (O(T^2 N^2) memory: for
    checks and small problems; :func:`trajectory_state_gradient` applies its
    transpose in O(T N^2)).

    Args:
        W: (N, N); x: (T, N) or (T, B, N), inside f's range.

    Returns:
        ``J`` of shape (T, N, T, N) with ``J[t-1, i, t'-1, j] = db_i(t)/dx_j(t')``
        for x (T, N); (B, T, N, T, N) for x (T, B, N), one Jacobian per batch row
        (the rows do not couple).
    """
    W = check_W(W)
    act = _invertible(activation)
    x, _ = _check_trajectory(W, x, None)
    batched = x.dim() == 3
    _check_in_range(act, x, lambda ix: f"{_step(ix, batched)}: {_index(ix)}")
    d_inv = _inverse_slopes(act, x, batched)
    T, N = x.shape[0], W.shape[0]
    J = W.new_zeros(*x.shape[1:-1], T, N, T, N)  # ([B,] T, N, T, N)
    t = torch.arange(T, device=W.device)
    # J[..., t, :, t, :] is (T, [B,] N, N): the separated advanced indices go first
    J[..., t, :, t, :] = torch.diag_embed(d_inv)
    J[..., t[1:], :, t[:-1], :] = -W
    return J


def trajectory_state_gradient(
    W: Tensor, x: Tensor, u: Tensor, *, activation: str | Activation = "tanh"
) -> Tensor:
    """``dR/dx(t) = D^-1(t) u(t) - W^T u(t+1)``, ``u(T+1) = 0``: the chain rule of recurrent backprop.

    From the BPTT sensitivities ``u(t) = dR/db(t)`` to the derivatives of the
    reward held as a function of the states ``x(1..T)`` (the composition
    ``x -> b -> R``): ``(db/dx)^T u``. ``D(t) = diag f'(f^-1(x(t)))``.

    Args:
        W: (N, N); x: (T, N) or (T, B, N), inside f's range.
        u: x's shape, ``u[t-1] = dR/db(t)`` (e.g. ``grads["u"]`` of
            ``rnngrad.bptt(sensitivities=True)`` with ``W = W_rec``).

    Returns:
        dR/dx of x's shape, ``[t-1]`` for ``x(t)``.
    """
    W = check_W(W)
    act = _invertible(activation)
    x, _ = _check_trajectory(W, x, None)
    u = check_tensor("u", u)
    if u.shape != x.shape:
        raise ValueError(f"u has shape {shape_str(u)} but x's {shape_str(x)} is expected")
    check_same_kind("u", u, W)
    batched = x.dim() == 3
    _check_in_range(act, x, lambda ix: f"{_step(ix, batched)}: {_index(ix)}")
    dR_dx = _inverse_slopes(act, x, batched) * u
    dR_dx[:-1] -= u[1:] @ W  # W^T u(t+1), row by row, for t = 1..T-1
    check_finite_result(
        "dR/dx(t)",
        dR_dx,
        f"not representable in {W.dtype}; u or W is too large",
        lambda ix: _step(ix, batched),
    )
    return dR_dx
