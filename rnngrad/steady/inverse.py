"""Input as a function of output (seed 000).

The input that makes ``x`` a steady state of ``x = f(W x + b)`` is::

    b = f^-1(x) - W x,              db/dx = D^-1 - W,   D = diag f'(f^-1(x)),

unique even where x is not a unique function of b (:func:`inverse_input`). The
Jacobian is the transpose of recurrent backprop's matrix ``D^-1 - W^T``. It needs
f^-1: x must lie inside f's open range (tanh, sigmoid, softplus, identity; relu has
no inverse). Outside it, or where b overflows to Inf or NaN, it raises ValueError
naming the entries.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from ..cells import Activation, get_activation
from ._checks import (
    check_finite_result,
    check_like,
    check_W,
)

__all__ = ["inverse_input"]


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
