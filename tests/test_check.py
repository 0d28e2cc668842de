"""rnngrad.check.run_checks: every exact algorithm agrees with autograd; a wrong one fails."""

from __future__ import annotations

import pytest
import torch

import rnngrad
from rnngrad.check import (
    DEFAULT_CONFIGS,
    CheckConfig,
    CheckRow,
    cell_configs,
    make_problem,
    network_specs,
    reference_gradient,
    relative_error,
    run_checks,
)


def test_every_exact_algorithm_passes_on_every_default_config():
    rows = run_checks()
    assert rows and all(isinstance(r, CheckRow) for r in rows)
    failed = [r for r in rows if not r.passed]
    assert not failed, failed
    names = {r.algorithm for r in rows}
    for expected in ("bptt()", "bptt(checkpoint=1)", "rtrl()", "rtrl(generic=True)",
                     "bptt() [steps]", "tbptt(5) [steps]"):
        assert expected in names
    configs = {r.config for r in rows}
    specs = network_specs()
    assert len(configs) == len(DEFAULT_CONFIGS) + sum(len(cell_configs(s)) for s in specs)
    for spec in ("elman", "gru", "lstm", "gru+elman", "lstm+gru+elman"):
        assert spec in specs and any(f" {spec} " in c for c in configs), spec
    assert max(r.error for r in rows) <= 1e-10


def test_a_users_cell_by_module_and_class(monkeypatch):
    """check(cell="module:Class") imports the cell from the working directory and checks it
    alone and stacked on itself; a cell with a wrong hand-derived backward pass fails
    (for BPTT, not for RTRL, which does not use it), and an unknown class is a clear
    error."""
    import pathlib

    here = pathlib.Path(__file__).parent
    monkeypatch.chdir(here)
    rows = run_checks(cell="cell_zoo:Adaptive")
    assert rows and all(r.passed for r in rows)
    assert any("cell_zoo:Adaptive+cell_zoo:Adaptive" in r.config for r in rows)
    rows = run_checks(cell="cell_zoo:BrokenElman")
    bad = {r.algorithm for r in rows if not r.passed}
    assert "bptt()" in bad and "tbptt(5)" in bad
    assert not any(r.algorithm.startswith("rtrl") for r in rows if not r.passed)
    with pytest.raises(ValueError, match="has no attribute 'Nope'"):
        run_checks(cell="cell_zoo:Nope")
    with pytest.raises(ValueError, match="not a subclass of rnngrad.cells.Cell"):
        run_checks(cell="math:sqrt")


def test_a_wrong_gradient_fails():
    """Truncation at k=1 on T=5 is not the gradient: the check must say so."""
    rows = run_checks(configs=[CheckConfig(T=5)],
                      algorithms=lambda c: {"tbptt(1)": rnngrad.tbptt(1)})
    assert len(rows) == 2 and not any(r.passed for r in rows)
    assert all(r.error > 1e-3 for r in rows)


def test_tolerance_and_dtype_are_used():
    config = CheckConfig(T=4, B=2, H=3)
    rows = run_checks(configs=[config], dtype=torch.float32, tol=1e-4,
                      algorithms=lambda c: {"rtrl()": rnngrad.rtrl()})
    assert rows[0].passed and 0 < rows[0].error <= 1e-4
    rows = run_checks(configs=[config], dtype=torch.float32, tol=1e-14,
                      algorithms=lambda c: {"rtrl()": rnngrad.rtrl()})
    assert not rows[0].passed


def test_reference_and_relative_error():
    config = CheckConfig(T=3, B=2, h0=True)
    model, x, y, mask, h0, _ = make_problem(config)
    loss, ref = reference_gradient(model, x, y, h0=h0)
    assert set(ref) == {"W_in", "W_rec", "b_rec", "W_out", "b_out", "h0"}
    value, grads = rnngrad.gradient(model, x, y, h0=h0)
    assert torch.allclose(loss, value, rtol=1e-13, atol=0)
    assert relative_error(grads, ref) <= 1e-10
    assert relative_error({k: v for k, v in grads.items() if k != "h0"}, ref) == float("inf")
    bumped = dict(grads, W_rec=grads["W_rec"] * (1 + 1e-6))
    assert relative_error(bumped, ref) > 1e-7


def test_bad_config_type():
    with pytest.raises(TypeError, match="CheckConfig"):
        run_checks(configs=[{"T": 3}])
