"""What every task yields: seeded ``(inputs, targets, mask)`` batches."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Batch", "make_generator"]


class Batch(NamedTuple):
    """One batch of a task, time-major.

    inputs:  (T, B, D) float
    targets: (T, B, K) float for "mse"/"bce", or (T, B) int64 class indices for "cross_entropy"
    mask:    (T, B) float, 1 where the step counts in the loss
    """

    inputs: Tensor
    targets: Tensor
    mask: Tensor

    def to(self, device=None, dtype=None) -> Batch:
        """Move to a device; cast the float tensors (not class indices) to dtype."""

        def cast(t: Tensor) -> Tensor:
            if t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)

        return Batch(cast(self.inputs), cast(self.targets), cast(self.mask))


def make_generator(seed: int | torch.Generator | None) -> torch.Generator:
    """A CPU torch.Generator from a seed (or the generator itself)."""
    if isinstance(seed, torch.Generator):
        return seed
    g = torch.Generator()
    g.manual_seed(0 if seed is None else int(seed))
    return g
