"""The Lagrangian view of recurrent backprop.

The steady state ``x = f(W x + b)`` is imposed as a constraint with the
multiplier ``u``::

    L(x, u, W, b) = R(x) - u^T [f^-1(x) - W x - b].

It is stationary exactly at the steady state and its adjoint::

    0 = -dL/du = f^-1(x) - W x - b,        0 = dL/dx = dR/dx - (D^-1 - W^T) u,

where ``L = R``, and there its partial derivatives holding x and u fixed are the
reward gradients::

    dR/dW = dL/dW = u x^T,        dR/db = dL/db = u.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from ..cells import Activation
from ._checks import check_like, check_W, shape_str
from .inverse import inverse_input

__all__ = ["lagrangian"]


def lagrangian(
    x: Tensor,
    u: Tensor,
    W: Tensor,
    b: Tensor,
    R: Callable[[Tensor], Tensor],
    *,
    activation: str | Activation = "tanh",
) -> Tensor:
    """The Lagrangian ``L(x, u, W, b) = R(x) - u^T [f^-1(x) - W x - b]``.

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
    W = check_W(W)
    x = check_like("x", x, W)
    u = check_like("u", u, W, ref=x)
    b = check_like("b", b, W, ref=x)
    if not callable(R):
        raise TypeError(f"R must be a callable x -> scalar tensor, got {type(R).__name__}")
    reward = R(x)
    if not isinstance(reward, Tensor) or reward.dim() != 0:
        got = shape_str(reward) if isinstance(reward, Tensor) else type(reward).__name__
        raise ValueError(f"R(x) must return a scalar tensor, got {got}")
    constraint = inverse_input(W, x, activation=activation) - b  # f^-1(x) - W x - b
    return reward - (u * constraint).sum()
