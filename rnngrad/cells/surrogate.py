"""Spikes with a pseudo-derivative: ``z = H(u)`` forward, ``dz/du = gamma f(u)`` backward.

A spiking cell emits ``z = H(u)`` with ``u = (v - A) / v_th`` the distance to the threshold
in units of the threshold (Bellec et al. 2020's ``v_scaled``; ``H(0) = 0``). Its derivative
is zero almost everywhere, so every gradient algorithm uses a pseudo-derivative instead::

    dz/du = gamma f(u),     f(0) = 1,     psi = dz/dv = (gamma / v_th) f(u)

The surrogates here are normalised alike (peak f(0) = 1 and, at the default steepness,
area ``int f = 1``), so ``gamma`` sets the scale of every one of them:

    "triangle"    f(u) = max(0, 1 - |u|)                Bellec et al. 2020 (their default,
                                                        with gamma = 0.3, the "dampening factor")
    "superspike"  f(u) = 1 / (1 + k |u|)^2,   k = 2     Zenke & Ganguli 2018 (fast sigmoid)
    "arctan"      f(u) = 1 / (1 + (pi k u / 2)^2), k = 2  Fang et al. 2021 (SpikingJelly's ATan)

``k`` is the ``steepness`` (area 2/k); the triangle has none. The spike is written so
that it is the same function under ``torch.autograd`` and every ``torch.func`` transform
(``vmap``, ``jvp``, ``vjp``, ``jacrev``): with F the antiderivative of f (F(0) = 0),

    z = H(u) + gamma (F(u) - F(u).detach())

whose value is exactly H(u) (``x - x`` is 0 in floating point for finite x) and whose
derivative is ``gamma F'(u) = gamma f(u)``; no custom ``autograd.Function`` is involved.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["Surrogate", "SURROGATES", "get_surrogate"]

SURROGATES = ("triangle", "superspike", "arctan")
_STEEPNESS = {"triangle": None, "superspike": 2.0, "arctan": 2.0}


def _positive(name: str, value) -> float:
    if (not isinstance(value, (int, float)) or isinstance(value, bool)
            or not math.isfinite(value) or value <= 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


class Surrogate:
    """A Heaviside spike with a pseudo-derivative (see the module docstring).

    Args:
        name: one of ``SURROGATES``: "triangle", "superspike", "arctan".
        gamma: the pseudo-derivative's peak ``dz/du`` at the threshold (> 0).
        steepness: k for "superspike" and "arctan" (default 2: area 1); not for "triangle".
    """

    def __init__(self, name: str = "triangle", *, gamma: float = 0.3,
                 steepness: float | None = None) -> None:
        if name not in SURROGATES:
            raise ValueError(f"unknown surrogate {name!r}; known surrogates: "
                             f"{', '.join(SURROGATES)}")
        self.name = name
        self.gamma = _positive("gamma", gamma)
        if steepness is None:
            steepness = _STEEPNESS[name]
        elif name == "triangle":
            raise ValueError("the triangle surrogate has no steepness (its width is v_th: "
                             "f(u) = max(0, 1 - |u|)); give steepness only for 'superspike' or "
                             "'arctan'")
        else:
            steepness = _positive("steepness", steepness)
        self.steepness = steepness

    def __repr__(self) -> str:
        k = "" if self.steepness is None else f", steepness={self.steepness:g}"
        return f"Surrogate({self.name!r}, gamma={self.gamma:g}{k})"

    def f(self, u: Tensor) -> Tensor:
        """The pseudo-derivative's shape, ``f(u)`` with f(0) = 1 (elementwise)."""
        if self.name == "triangle":
            return (1.0 - u.abs()).clamp(min=0.0)
        k = self.steepness
        if self.name == "superspike":
            return (1.0 + k * u.abs()).square().reciprocal()
        return (1.0 + (0.5 * math.pi * k * u).square()).reciprocal()

    def antiderivative(self, u: Tensor) -> Tensor:
        """F(u) with F' = f and F(0) = 0."""
        if self.name == "triangle":
            w = u.clamp(-1.0, 1.0)
            return w - 0.5 * w * w.abs()
        k = self.steepness
        if self.name == "superspike":
            return u / (1.0 + k * u.abs())
        c = 0.5 * math.pi * k
        return torch.atan(c * u) / c

    def derivative(self, u: Tensor) -> Tensor:
        """``dz/du = gamma f(u)``, the value every algorithm uses for the spike's slope."""
        return self.gamma * self.f(u)

    def derivative_(self, u: Tensor) -> Tensor:
        """``derivative(u)`` written over u (the same numbers, no new buffer)."""
        if type(self).f is not Surrogate.f or type(self).derivative is not Surrogate.derivative:
            return u.copy_(self.derivative(u))
        if self.name == "triangle":
            u.abs_().neg_().add_(1.0).clamp_(min=0.0)         # 1 - |u|, at least 0
        elif self.name == "superspike":
            u.abs_().mul_(self.steepness).add_(1.0).square_().reciprocal_()
        else:
            u.mul_(0.5 * math.pi * self.steepness).square_().add_(1.0).reciprocal_()
        return u.mul_(self.gamma)

    def spike(self, u: Tensor) -> Tensor:
        """``H(u)`` (1 where u > 0), differentiable with slope ``gamma f(u)``."""
        F = self.antiderivative(u)
        return (u > 0).to(u.dtype) + self.gamma * (F - F.detach())


def get_surrogate(spec, gamma: float = 0.3) -> Surrogate:
    """A ``Surrogate`` from its name (with ``gamma``) or the object itself."""
    if isinstance(spec, Surrogate):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"surrogate must be a name ({', '.join(SURROGATES)}) or an "
                        f"rnngrad.cells.Surrogate, got {type(spec).__name__}")
    return Surrogate(spec, gamma=gamma)
