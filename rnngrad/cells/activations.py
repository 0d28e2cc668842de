"""Elementwise nonlinearities ``phi`` with ``phi'`` and, where defined, ``phi^-1``.

Every activation carries its derivative written in terms of ``(a, phi(a))`` so that
the backward passes reuse the forward values (``tanh' = 1 - h^2``), and its inverse
where one exists (the input as a function of the output, ``b = f^-1(x) - W x``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Activation", "ACTIVATIONS", "get_activation"]


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
