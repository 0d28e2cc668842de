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
