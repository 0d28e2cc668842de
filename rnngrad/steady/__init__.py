"""Steady states of a recurrent network and their gradients (Almeida 1987; Pineda 1987).

The network relaxes to a steady state, an implicit function of ``(W, b)``::

    x = f(W x + b)                                  F(x, W, b) = x - f(W x + b) = 0

and a reward ``R(x)`` of that state is differentiated by recurrent backprop::

    (D^-1 - W^T) u = dR/dx,   D = diag f'(W x + b);       dR/dW = u x^T,   dR/db = u.

The modules, one concern each:

- ``fixed_point``: the steady state by damped iteration or Anderson acceleration.
- ``adjoint``: recurrent backprop, ``(I - D W^T) u = D dR/dx`` solved directly
  (LU), by the Neumann iteration, or by GMRES.
- ``layer``: the steady state as an autograd layer (``steady_state``,
  ``SteadyState``) and the digits classifier ``SteadyClassifier``.
- ``inverse``: input as a function of output, ``b = f^-1(x) - W x`` for a steady
  state and ``b(t) = f^-1(x(t)) - W x(t-1)`` for a trajectory, its block
  lower-bidiagonal Jacobian, and the chain rule
  ``dR/dx(t) = D^-1(t) u(t) - W^T u(t+1)``.
- ``trajectory``: time-varying weights, ``dR/dW(t) = u(t) x(t-1)^T``.
- ``lagrangian``: ``L = R(x) - u^T [f^-1(x) - W x - b]``.
- ``train``: the classifier's gradient by hand and its training loop.
"""

from .adjoint import recurrent_backprop
from .fixed_point import FixedPointInfo, fixed_point
from .inverse import (
    inverse_input,
    inverse_trajectory,
    inverse_trajectory_jacobian,
    trajectory_state_gradient,
)
from .lagrangian import lagrangian
from .layer import SteadyClassifier, SteadyState, steady_state
from .train import steady_gradient, train_steady
from .trajectory import per_step_gradients

__all__ = [
    "FixedPointInfo",
    "fixed_point",
    "recurrent_backprop",
    "lagrangian",
    "inverse_input",
    "inverse_trajectory",
    "inverse_trajectory_jacobian",
    "trajectory_state_gradient",
    "per_step_gradients",
    "steady_state",
    "SteadyState",
    "SteadyClassifier",
    "steady_gradient",
    "train_steady",
]
