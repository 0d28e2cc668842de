"""Sequential digits: scikit-learn's 8x8 handwritten digits read row by row.

Each image is a sequence of T = 8 rows of D = 8 pixels (scaled to [0, 1]); the
network classifies it with a 10-way softmax at the last step (many-to-one, a mask
with only t = T set). The 1,797 images ship with rnngrad in ``data/digits.npz``
(a copy of ``sklearn.datasets.load_digits()``, BSD-licensed, originally from the
UCI repository), so no download and no scikit-learn are needed at run time.

The train/test split is fixed: a permutation drawn once with seed 0, the first
1,437 images (80%) for training and the last 360 for testing.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import numpy as np
import torch
from torch import Tensor

from .base import Batch, make_generator

__all__ = ["load_digits", "Digits"]

N_TEST = 360


@lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray]:
    with resources.files("rnngrad.tasks").joinpath("data/digits.npz").open("rb") as f:
        data = np.load(f)
        images, labels = data["images"], data["labels"]
    return images, labels


def load_digits(*, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The fixed split: ``(X_train (1437, 8, 8), y_train (1437,), X_test (360, 8, 8), y_test (360,))``.

    Pixels are scaled from 0..16 to [0, 1]; labels are int64 in 0..9.
    """
    images, labels = _load()
    perm = np.random.default_rng(0).permutation(len(labels))
    x = torch.from_numpy(images[perm].astype(np.float64) / 16.0).to(dtype)
    y = torch.from_numpy(labels[perm].astype(np.int64))
    return x[:-N_TEST], y[:-N_TEST], x[-N_TEST:], y[-N_TEST:]


class Digits:
    """Row-by-row sequential digits: T = 8, D = 8, K = 10, cross-entropy at the last step."""

    name = "digits"
    loss = "cross_entropy"
    readout = "softmax"
    classification = True
    input_size = 8
    output_size = 10
    seq_len = 8

    def __init__(self) -> None:
        self.x_train, self.y_train, self.x_test, self.y_test = load_digits()

    def _batch(self, x: Tensor, y: Tensor) -> Batch:
        T, B = self.seq_len, x.shape[0]
        inputs = x.permute(1, 0, 2).contiguous()  # (T, B, 8): row t of each image
        targets = torch.zeros(T, B, dtype=torch.int64)
        targets[-1] = y
        mask = torch.zeros(T, B)
        mask[-1] = 1.0
        return Batch(inputs, targets, mask)

    def batch(self, batch_size: int, *, generator: torch.Generator | int | None = None) -> Batch:
        """A training batch drawn with replacement from the training split."""
        g = make_generator(generator)
        idx = torch.randint(len(self.y_train), (batch_size,), generator=g)
        return self._batch(self.x_train[idx], self.y_train[idx])

    def test_batch(self) -> Batch:
        """The whole test split (360 images) as one batch."""
        return self._batch(self.x_test, self.y_test)
