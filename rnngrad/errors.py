"""Exceptions raised by rnngrad."""

from __future__ import annotations


class ConvergenceError(RuntimeError):
    """An iterative solver did not reach its tolerance.

    Carries the figures a user needs to decide what to do next: the residual
    reached, the tolerance asked for and the number of iterations spent.
    """

    def __init__(self, message: str, *, residual: float | None = None,
                 tol: float | None = None, iterations: int | None = None) -> None:
        super().__init__(message)
        self.residual = residual
        self.tol = tol
        self.iterations = iterations


class NonFiniteError(ValueError):
    """A NaN or Inf where rnngrad needs a finite number: in an input, or arising during the
    computation (the forward pass overflowed, the backward pass exploded, a trace blew up).

    ``quantity`` names it (e.g. ``"h_t"``, ``"grads['W_rec']"``, ``"x_t"``) and ``step`` is
    the time step (1-based) where it was found, or None when it is not tied to one.
    """

    def __init__(self, message: str, *, quantity: str | None = None,
                 step: int | None = None) -> None:
        super().__init__(message)
        self.quantity = quantity
        self.step = step
