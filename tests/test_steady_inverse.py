"""Input as a function of output (rnngrad/steady/inverse.py), steady state and trajectory."""

from __future__ import annotations

import pytest
import torch
from steady_refs import F64, INVERTIBLE, RTOL, _seed_and_one_thread, rel_err, system  # noqa: F401

from rnngrad.cells import get_activation
from rnngrad.steady import fixed_point, inverse_input


@pytest.mark.parametrize("activation", INVERTIBLE)
def test_inverse_input_round_trip(activation):
    W, _, _ = system(11, 4, scale=0.4)
    lo, hi = get_activation(activation).range
    base = torch.rand(4, 11, dtype=F64)
    x = {"tanh": 1.8 * base - 0.9, "sigmoid": 0.05 + 0.9 * base}.get(activation, 0.1 + base)
    b = inverse_input(W, x, activation=activation)
    x_back, _ = fixed_point(W, b, activation=activation)
    assert rel_err(x_back, x) <= RTOL


def test_inverse_input_unique_where_steady_state_is_not():
    """W = 2I with tanh has three steady states for b = 0; inverse_input maps each back to 0."""
    W = 2.0 * torch.eye(3, dtype=F64)
    x_plus, _ = fixed_point(W, torch.zeros(3, dtype=F64), x0=torch.full((3,), 0.5, dtype=F64))
    x_minus = -x_plus
    for x in (x_plus, x_minus, torch.zeros(3, dtype=F64)):
        assert float(inverse_input(W, x).abs().max()) <= 1e-11
    assert float(x_plus.min()) > 0.9


def test_inverse_input_out_of_range_and_relu_raise():
    W = torch.zeros(3, 3, dtype=F64)
    x = torch.tensor([[0.5, 1.2, -3.0], [0.0, 0.1, 1.0]], dtype=F64)
    with pytest.raises(
        ValueError,
        match=r"3 entries outside the range \(-1\.0, 1\.0\) of tanh.*x\[0, 1\] = 1\.2, x\[0, 2\] = -3, x\[1, 2\] = 1",
    ):
        inverse_input(W, x)
    with pytest.raises(ValueError, match="'relu' has no inverse"):
        inverse_input(W, x.abs(), activation="relu")
