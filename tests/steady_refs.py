"""Shared references for the tests of rnngrad/steady/ (float64, autograd).

Oracles (DESIGN.md): autograd through the converged unrolled iteration; the dense
solve of Almeida and Pineda's ``(D^-1 - W^T) u = dR/dx``; ordinary backprop through the
layers of a feedforward net (strictly lower-triangular W). All in float64 to
relative error <= RTOL = 1e-10 unless a test states otherwise.
"""

from __future__ import annotations

import math

import pytest
import torch

from rnngrad.cells import get_activation

F64 = torch.float64
ACTIVATIONS = ["tanh", "sigmoid", "relu", "softplus", "identity"]
INVERTIBLE = ["tanh", "sigmoid", "softplus", "identity"]
ADJOINT_METHODS = ["direct", "iterate", "gmres"]
RTOL = 1e-10


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    # These tensors are tiny: one thread avoids OpenMP spin-waits on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def system(N: int, B: int | None, *, scale: float = 0.6, seed: int = 0):
    """W with spectral norm about 2 * scale (a contraction for f' <= 1), b, and dR/dx."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(N, N, generator=gen, dtype=F64) * (scale / math.sqrt(N))
    shape = (N,) if B is None else (B, N)
    b = torch.randn(*shape, generator=gen, dtype=F64)
    g = torch.randn(*shape, generator=gen, dtype=F64)
    return W, b, g


def unrolled_reward_gradient(W, b, R, activation, *, K=400):
    """Autograd through K iterations from x = 0 of x <- f(W x + b): dR/dW, dR/db."""
    act = get_activation(activation)
    W = W.clone().requires_grad_()
    b = b.clone().requires_grad_()
    x = torch.zeros_like(b)
    for _ in range(K):
        x = act.fn(x @ W.T + b)
    return torch.autograd.grad(R(x), (W, b))


def unrolled_gradient(W, b, g, activation, *, K=400):
    """:func:`unrolled_reward_gradient` for the linear reward R = g.x."""
    return unrolled_reward_gradient(W, b, lambda x: (g * x).sum(), activation, K=K)
