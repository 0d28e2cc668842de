"""One-step recurrent cells and their elementwise nonlinearities.

The vanilla (Elman) cell and its leaky generalisation, in DESIGN.md's notation::

    a_t = W_in x_t + W_rec h_{t-1} + b_rec            pre-activation
    h_t = (1 - alpha) h_{t-1} + alpha * phi(a_t)      alpha = 1: the vanilla cell

A cell is one step; the time loop belongs to the algorithms. Every activation
carries its derivative written in terms of ``(a, phi(a))`` so that the backward
passes reuse the forward values (``tanh' = 1 - h^2``), and its inverse where one
exists (seed 000's input as a function of output, ``b = f^-1(x) - W x``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Activation", "ACTIVATIONS", "get_activation", "cell_step", "pre_activation"]


class Activation(NamedTuple):
    """An elementwise nonlinearity ``phi`` with ``phi'`` and, where defined, ``phi^-1``."""

    name: str
    fn: Callable[[Tensor], Tensor]
    # deriv(a, fa) = phi'(a), given a and fa = phi(a); uses whichever is cheaper.
    deriv: Callable[[Tensor, Tensor], Tensor]
    # inverse(x) = phi^-1(x), or None when phi is not invertible.
    inverse: Callable[[Tensor], Tensor] | None
    # the open interval phi maps onto (the domain of the inverse).
    range: tuple[float, float]
    # True when deriv ignores ``a`` (tanh, sigmoid): the forward pass then need not keep a.
    deriv_from_output: bool = False


def _softplus_inverse(x: Tensor) -> Tensor:
    # log(exp(x) - 1) written stably: x + log(1 - exp(-x))
    return x + torch.log(-torch.expm1(-x))


ACTIVATIONS: dict[str, Activation] = {
    "tanh": Activation(
        "tanh", torch.tanh, lambda a, fa: 1.0 - fa * fa, torch.atanh, (-1.0, 1.0), True
    ),
    "sigmoid": Activation(
        "sigmoid", torch.sigmoid, lambda a, fa: fa * (1.0 - fa), torch.logit, (0.0, 1.0), True
    ),
    "relu": Activation(
        "relu", torch.relu, lambda a, fa: (a > 0).to(a.dtype), None, (0.0, float("inf"))
    ),
    "identity": Activation(
        "identity",
        lambda a: a,
        lambda a, fa: torch.ones_like(a),
        lambda x: x,
        (float("-inf"), float("inf")),
    ),
    "softplus": Activation(
        "softplus",
        torch.nn.functional.softplus,
        lambda a, fa: torch.sigmoid(a),
        _softplus_inverse,
        (0.0, float("inf")),
    ),
}


def get_activation(name: str | Activation) -> Activation:
    """Look up an activation by name; an unknown name lists the known ones."""
    if isinstance(name, Activation):
        return name
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(ACTIVATIONS))
        raise ValueError(f"unknown activation {name!r}; known activations: {known}") from None


def pre_activation(W_in: Tensor, W_rec: Tensor, b_rec: Tensor, h: Tensor, x: Tensor) -> Tensor:
    """``a = W_in x + W_rec h + b_rec`` for a batch: h (B, H), x (B, D) -> (B, H)."""
    return torch.addmm(torch.addmm(b_rec, x, W_in.T), h, W_rec.T)


def cell_step(
    W_in: Tensor,
    W_rec: Tensor,
    b_rec: Tensor,
    h: Tensor,
    x: Tensor,
    *,
    activation: str | Activation = "tanh",
    alpha: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """One step of the (leaky) cell.

    Args:
        h: (B, H) previous hidden state h_{t-1}.
        x: (B, D) input x_t.

    Returns:
        ``(h_t, a_t, phi(a_t))``, each (B, H).
    """
    act = get_activation(activation)
    a = pre_activation(W_in, W_rec, b_rec, h, x)
    fa = act.fn(a)
    h_new = fa if alpha == 1.0 else torch.lerp(h, fa, alpha)
    return h_new, a, fa
