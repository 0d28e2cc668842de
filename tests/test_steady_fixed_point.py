"""The steady state x = f(W x + b) by iteration and Anderson (rnngrad/steady/fixed_point.py)."""

from __future__ import annotations

import math

import pytest
import torch
from steady_refs import ACTIVATIONS, F64, _seed_and_one_thread, rel_err, system  # noqa: F401

from rnngrad.cells import get_activation
from rnngrad.errors import ConvergenceError
from rnngrad.steady import fixed_point


@pytest.mark.parametrize("method", ["iterate", "anderson"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fixed_point_batched_equals_rowwise(method, activation):
    W, b, _ = system(12, 5)
    x, info = fixed_point(W, b, activation=activation, method=method)
    act = get_activation(activation)
    assert info.converged and info.residual <= 1e-12
    assert float((x - act.fn(x @ W.T + b)).norm(dim=-1).max()) == pytest.approx(info.residual)
    for i in range(b.shape[0]):
        xi, _ = fixed_point(W, b[i], activation=activation, method=method)
        assert xi.shape == (12,)
        assert rel_err(xi, x[i]) <= 1e-10


def test_anderson_with_damping_and_x0_agree_with_iteration():
    W, b, _ = system(30, 4, scale=0.9)
    x_it, info_it = fixed_point(W, b, method="iterate")
    x_an, info_an = fixed_point(W, b, method="anderson", damping=0.7, history=6)
    x_x0, info_x0 = fixed_point(W, b, x0=x_it)
    assert rel_err(x_an, x_it) <= 1e-10
    assert info_an.iterations < info_it.iterations
    assert info_x0.iterations == 0 and torch.equal(x_x0, x_it)


def test_fixed_point_not_converged_raises_or_reports():
    W, b, _ = system(10, 3, scale=0.9)
    with pytest.raises(ConvergenceError, match=r"residual .* > tol 1\.000e-12 after 3 iterations"):
        fixed_point(W, b, max_iter=3)
    try:
        fixed_point(W, b, max_iter=3)
    except ConvergenceError as err:
        assert err.iterations == 3 and err.tol == 1e-12 and err.residual > 1e-12
    x, info = fixed_point(W, b, max_iter=3, throw=False)
    assert not info.converged and info.iterations == 3 and info.residual > 1e-12
    assert x.shape == b.shape


def test_fixed_point_divergence_raises():
    W = 2.0 * torch.eye(4, dtype=F64)
    b = torch.ones(4, dtype=F64)
    with pytest.raises(ConvergenceError, match=r"diverged: residual .* > tol .* iterations"):
        fixed_point(W, b, activation="identity", max_iter=5000)
    _, info = fixed_point(W, b, activation="identity", max_iter=5000, throw=False)
    assert not info.converged and not math.isfinite(info.residual)


def test_fixed_point_bad_inputs_raise():
    W, b, g = system(4, 2)
    with pytest.raises(ValueError, match=r"W has shape \(4, 3\) but a square"):
        fixed_point(W[:, :3], b)
    with pytest.raises(ValueError, match=r"b has shape \(2, 5\) but \(4,\) or \(B, 4\)"):
        fixed_point(W, torch.zeros(2, 5, dtype=F64))
    with pytest.raises(TypeError, match="b has dtype torch.float32 but W has dtype torch.float64"):
        fixed_point(W, b.float())
    with pytest.raises(
        ValueError, match=r"b contains 1 NaN or Inf entries \(first at index \(1, 2\)\)"
    ):
        bad = b.clone()
        bad[1, 2] = float("nan")
        fixed_point(W, bad)
    with pytest.raises(ValueError, match="damping must lie in"):
        fixed_point(W, b, damping=1.5)


NAN = float("nan")
BAD_OPTIONS = [
    # (option, value, error, message)
    ("tol", "1e-6", TypeError, r"tol must be a finite number >= 0 .*got '1e-6' \(str\)"),
    ("tol", True, TypeError, r"tol must be a finite number >= 0 .*got True \(bool\)"),
    ("tol", NAN, ValueError, r"tol must be a finite number >= 0 .*got nan"),
    ("tol", float("inf"), ValueError, r"tol must be a finite number >= 0 .*got inf"),
    ("tol", -1e-9, ValueError, r"tol must be a finite number >= 0 .*got -1e-09"),
    ("max_iter", 10.0, TypeError, r"max_iter must be an int >= 0, got 10\.0 \(float\)"),
    ("max_iter", "10", TypeError, r"max_iter must be an int >= 0, got '10' \(str\)"),
    ("max_iter", True, TypeError, r"max_iter must be an int >= 0, got True \(bool\)"),
    ("max_iter", -1, ValueError, r"max_iter must be an int >= 0, got -1"),
    ("damping", "0.5", TypeError, r"damping must be a number in \(0, 1\], got '0\.5' \(str\)"),
    ("damping", False, TypeError, r"damping must be a number in \(0, 1\], got False \(bool\)"),
    ("damping", NAN, ValueError, r"damping must be a number in \(0, 1\], got nan"),
    ("damping", 0.0, ValueError, r"damping must lie in \(0, 1\], got 0\.0"),
    ("damping", -0.5, ValueError, r"damping must lie in \(0, 1\], got -0\.5"),
    (
        "method",
        1,
        TypeError,
        r"method must be a string, one of 'iterate', 'anderson'; got 1 \(int\)",
    ),
    ("method", "newton", ValueError, r"method must be one of 'iterate', 'anderson', got 'newton'"),
    ("history", 0, ValueError, r"history \(Anderson's memory m\) must be an int >= 1, got 0"),
    ("history", 2.5, TypeError, r"history \(Anderson's memory m\) must be an int >= 1, got 2\.5"),
    ("history", True, TypeError, r"history \(Anderson's memory m\) must be an int >= 1, got True"),
    ("throw", "yes", TypeError, r"throw must be True or False, got 'yes' \(str\)"),
]


@pytest.mark.parametrize(("option", "value", "error", "message"), BAD_OPTIONS)
def test_fixed_point_bad_options_raise(option, value, error, message):
    W, b, _ = system(4, 2)
    with pytest.raises(error, match=message):
        fixed_point(W, b, **{"method": "anderson", option: value})


def test_fixed_point_accepts_int_tol_and_numpy_ints():
    np = pytest.importorskip("numpy")
    W, b, _ = system(4, 2)
    x, info = fixed_point(W, b, tol=0, max_iter=np.int64(3), throw=False, damping=1)
    assert info.iterations == 3 and x.shape == b.shape
