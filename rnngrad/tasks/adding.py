"""The adding problem (Hochreiter & Schmidhuber 1997), many-to-one regression.

Each step carries two inputs: a value drawn from U(0, 1) and a marker that is 1 at
exactly two steps (one in the first half of the sequence, one in the second) and 0
elsewhere. The target, read at the last step only, is the sum of the two marked
values. Predicting the mean (1.0) scores the target's variance, 1/6 ~ 0.167, in MSE
(mean of ``(z - y)^2``; note rnngrad's pinned loss is half of that).
"""

from __future__ import annotations

import torch

from .base import Batch, make_generator

__all__ = ["Adding"]


class Adding:
    """Adding problem of length T: D = 2 (value, marker), K = 1, MSE at the last step."""

    name = "adding"
    loss = "mse"
    readout = "identity"
    classification = False
    input_size = 2
    output_size = 1
    baseline_mse = 1.0 / 6.0  # variance of the sum of two U(0, 1): what predicting the mean gets

    def __init__(self, seq_len: int = 50, *, test_size: int = 1000, test_seed: int = 12345) -> None:
        if not isinstance(seq_len, int) or seq_len < 2:
            raise ValueError(f"adding needs seq_len >= 2 (two marked steps), got {seq_len!r}")
        self.seq_len = seq_len
        self._test = self.batch(test_size, generator=test_seed)

    def batch(self, batch_size: int, *, generator: torch.Generator | int | None = None) -> Batch:
        """``batch_size`` new sequences from ``generator`` (a seed or a torch.Generator):
        inputs (T, B, D), targets (T, B, 1) (the sum, at the last step), mask (T, B)."""
        g = make_generator(generator)
        T, B = self.seq_len, batch_size
        values = torch.rand(T, B, generator=g)
        half = T // 2
        first = torch.randint(0, half, (B,), generator=g)
        second = torch.randint(half, T, (B,), generator=g)
        markers = torch.zeros(T, B)
        cols = torch.arange(B)
        markers[first, cols] = 1.0
        markers[second, cols] = 1.0
        inputs = torch.stack([values, markers], dim=-1)
        targets = torch.zeros(T, B, 1)
        targets[-1, :, 0] = values[first, cols] + values[second, cols]
        mask = torch.zeros(T, B)
        mask[-1] = 1.0
        return Batch(inputs, targets, mask)

    def test_batch(self) -> Batch:
        """A fixed test set (seeded apart from training batches)."""
        return self._test
