"""Sine-wave generation: produce ``sin(omega t)`` from a constant frequency cue.

Each sequence draws a frequency ``omega`` from ``[omega_min, omega_max]``; the input
at every step is the cue ``(omega - mean) / half_range`` (D = 1) and the target is
``sin(omega * t)`` (K = 1) at every step (many-to-many regression, MSE). The network
must turn a static input into an oscillation whose frequency follows the cue
(Sussillo & Abbott 2009). Predicting zero scores about 0.5 in MSE.
"""

from __future__ import annotations

import torch

from .base import Batch, make_generator

__all__ = ["Sine"]


class Sine:
    """The sine-generation task (see the module docstring): inputs (T, B, 1), the
    frequency cue; targets (T, B, 1), ``sin(omega t)``; every step counted."""

    name = "sine"
    loss = "mse"
    readout = "identity"
    classification = False
    input_size = 1
    output_size = 1

    def __init__(self, seq_len: int = 50, *, omega_min: float = 0.1, omega_max: float = 0.6,
                 test_size: int = 500, test_seed: int = 12345) -> None:
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"sine needs seq_len >= 1, got {seq_len!r}")
        if not 0 < omega_min < omega_max:
            raise ValueError(f"sine needs 0 < omega_min < omega_max, got {omega_min}, {omega_max}")
        self.seq_len = seq_len
        self.omega_min, self.omega_max = omega_min, omega_max
        self._test = self.batch(test_size, generator=test_seed)

    def batch(self, batch_size: int, *, generator: torch.Generator | int | None = None) -> Batch:
        """``batch_size`` new sequences from ``generator`` (a seed or a torch.Generator):
        inputs (T, B, D), targets (T, B, 1), mask (T, B)."""
        g = make_generator(generator)
        T, B = self.seq_len, batch_size
        lo, hi = self.omega_min, self.omega_max
        omega = lo + (hi - lo) * torch.rand(B, generator=g)
        cue = (omega - 0.5 * (lo + hi)) / (0.5 * (hi - lo))
        inputs = cue.expand(T, B).unsqueeze(-1).clone()
        t = torch.arange(1, T + 1, dtype=torch.float32).unsqueeze(1)
        targets = torch.sin(omega.unsqueeze(0) * t).unsqueeze(-1)
        return Batch(inputs, targets, torch.ones(T, B))

    def test_batch(self) -> Batch:
        """A fixed test set (seeded apart from training batches)."""
        return self._test
