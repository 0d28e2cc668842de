"""Steady states of a recurrent network and their gradients (seed 000); see adjoint.py."""

from .adjoint import (
    FixedPointInfo,
    SteadyClassifier,
    SteadyState,
    fixed_point,
    inverse_input,
    lagrangian,
    recurrent_backprop,
    steady_gradient,
    steady_state,
    train_steady,
)

__all__ = [
    "FixedPointInfo",
    "fixed_point",
    "recurrent_backprop",
    "lagrangian",
    "inverse_input",
    "steady_state",
    "SteadyState",
    "SteadyClassifier",
    "steady_gradient",
    "train_steady",
]
