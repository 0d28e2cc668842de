"""UORO is unbiased: the mean of h~ theta~^T over independent draws converges to RTRL's
influence (exact, by autograd) at the rate 1/sqrt(n)."""

import pytest
from online_refs import (
    check_fresh_noise_but_reproducible,
    check_h0_and_eps_raise,
    check_unbiased_gradient,
    check_unbiased_influence,
    run_steps,
)

import rnngrad


def uoro_samples(model, x1, n, seed):
    """n independent UORO estimates of M_T for the one sequence x1 (T, D): a batch of n
    copies of it, each example with its own signs. Returns (n, H, H, P)."""
    x = x1[:, None, :].expand(-1, n, -1).contiguous()
    state = run_steps(rnngrad.uoro(seed=seed), model, x)
    return state.h_tilde[:, :, None, None] * state.theta_tilde[:, None, :, :]


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_unbiased_influence(alpha):
    check_unbiased_influence(uoro_samples, alpha)


def test_gradient_is_unbiased():
    check_unbiased_gradient(rnngrad.uoro)


def test_h0_and_bad_eps_raise():
    check_h0_and_eps_raise(rnngrad.uoro)


def test_fresh_noise_across_sequences_but_reproducible():
    check_fresh_noise_but_reproducible(rnngrad.uoro)
