"""Your own data: a task from the arrays of an ``.npz`` file.

``get_task("file:data.npz", layout="NTD")`` reads

    x       inputs, (N, T, D) with layout "NTD" or (T, N, D) with "TND"; any real dtype
    y       targets, one of
              integer class indices (N, T) / (T, N): a class at every step (cross-entropy)
              integer class indices (N,): one class per sequence, asked at the last step
              float (N, T, K) / (T, N, K): a vector at every step (MSE, or BCE with
                  loss="bce" for targets in [0, 1])
              float (N, K): one vector per sequence, at the last step
    mask    optional, (N, T) / (T, N), >= 0: which steps count in the loss (and their
            weight); without it every step counts, or the last one for a per-sequence y
    layout  optional, the string "NTD" or "TND" (``np.savez(..., layout="NTD")``)

The layout comes from the file's ``layout`` array or the ``layout`` argument (both given:
they must agree). The N sequences are split once into a training and a test part by a
permutation drawn from ``split_seed`` (``test_fraction`` of them, at least one, for
testing); training batches are drawn from the training part with replacement from the
batch's generator, and ``test_batch()`` is the whole test part.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from .base import Batch, make_generator

__all__ = ["FileTask", "LAYOUTS"]

LAYOUTS = ("NTD", "TND")
ARRAYS = ("x", "y", "mask", "layout")
LOSSES = {"cross_entropy": "softmax", "mse": "identity", "bce": "sigmoid"}


class FileTask:
    """A task from ``x``, ``y`` and ``mask`` arrays in an ``.npz`` file (see the module).

    Args:
        path: the ``.npz`` file.
        layout: ``"NTD"`` or ``"TND"``, unless the file states it.
        test_fraction: the share of sequences held out for testing, in (0, 1).
        split_seed: the seed of the train/test permutation.
        loss: for float targets, ``"mse"`` (default) or ``"bce"``; class indices always
            train with cross-entropy.
        num_classes: for class indices, K (default: the largest class + 1).
    """

    def __init__(self, path: str | Path, *, layout: str | None = None,
                 test_fraction: float = 0.2, split_seed: int = 0, loss: str | None = None,
                 num_classes: int | None = None) -> None:
        path = Path(path)
        self.name = f"file:{path}"
        x, y, mask, layout = _read(path, layout)
        if not (isinstance(test_fraction, (int, float)) and not isinstance(test_fraction, bool)
                and 0.0 < test_fraction < 1.0):
            raise ValueError(f"{path}: test_fraction must be in (0, 1), got {test_fraction!r}")
        if not isinstance(split_seed, int) or isinstance(split_seed, bool) or split_seed < 0:
            raise ValueError(f"{path}: split_seed must be an int >= 0, got {split_seed!r}")
        if layout == "TND":  # everything stored (N, T, ...) from here on
            x = x.swapaxes(0, 1)
            if y.ndim >= 2 and not (y.ndim == 2 and y.dtype.kind == "f"):
                y = y.swapaxes(0, 1)
            if mask is not None:
                mask = mask.swapaxes(0, 1)
        N, T, D = x.shape
        per_sequence = y.ndim == 1 or (y.ndim == 2 and y.dtype.kind == "f")
        classes = y.dtype.kind in "iu"
        want = ("(N,) or (N, T)" if classes else "(N, K) or (N, T, K)") + f" = {N}, {T}"
        if y.shape[0] != N or (not per_sequence and y.shape[1] != T):
            raise ValueError(f"{path}: y has shape {_stored(y.shape, layout, per_sequence)} "
                             f"but x has N = {N} sequences of T = {T} steps; expected y "
                             f"{want} in layout {layout}")
        if mask is not None and mask.shape != (N, T):
            raise ValueError(f"{path}: mask has shape {_stored(mask.shape, layout, False)} "
                             f"but x is N = {N}, T = {T} ({layout}); expected "
                             f"{(N, T) if layout == 'NTD' else (T, N)}")
        if N < 2:
            raise ValueError(f"{path}: x holds {N} sequence(s); a train/test split needs >= 2")

        if classes:
            if loss not in (None, "cross_entropy"):
                raise ValueError(f"{path}: y holds class indices, which train with "
                                 f"cross_entropy, not loss={loss!r}")
            self.loss = "cross_entropy"
            if y.min() < 0:
                raise ValueError(f"{path}: y holds class indices, but its smallest is "
                                 f"{int(y.min())} (expected >= 0)")
            top = int(y.max()) + 1
            if num_classes is None:
                num_classes = top
            elif (not isinstance(num_classes, int) or isinstance(num_classes, bool)
                  or num_classes < top):
                raise ValueError(f"{path}: num_classes = {num_classes!r} but y holds class "
                                 f"{top - 1} (expected an int >= {top})")
            K = num_classes
        else:
            if num_classes is not None:
                raise ValueError(f"{path}: num_classes applies to integer class indices; y "
                                 f"is {y.dtype}")
            self.loss = "mse" if loss is None else loss
            if self.loss not in ("mse", "bce"):
                raise ValueError(f"{path}: float targets train with loss 'mse' or 'bce', got "
                                 f"{loss!r}")
            if self.loss == "bce" and (y.min() < 0 or y.max() > 1):
                raise ValueError(f"{path}: loss='bce' needs targets in [0, 1]; y spans "
                                 f"[{y.min():g}, {y.max():g}]")
            K = y.shape[-1]
        self.readout = LOSSES[self.loss]
        self.classification = classes
        self.input_size, self.output_size, self.seq_len = D, int(K), T

        # per-sequence targets: asked at every step the mask counts (default: the last)
        if per_sequence:
            y = np.broadcast_to(y[:, None], (N, T, *y.shape[1:]))
            if mask is None:
                mask = np.zeros((N, T), dtype=np.float32)
                mask[:, -1] = 1.0
        if mask is None:
            mask = np.ones((N, T), dtype=np.float32)
        self.x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        self.y = torch.from_numpy(np.ascontiguousarray(
            y, dtype=np.int64 if classes else np.float32))
        self.mask = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))

        n_test = min(max(1, round(test_fraction * N)), N - 1)
        perm = torch.from_numpy(np.random.default_rng(split_seed).permutation(N))
        self.train_index, self.test_index = perm[:-n_test], perm[-n_test:]
        self._test = self._batch(self.test_index)

    def _batch(self, idx: torch.Tensor) -> Batch:
        # (N, T, ...) rows -> time-major (T, B, ...)
        return Batch(self.x[idx].transpose(0, 1).contiguous(),
                     self.y[idx].transpose(0, 1).contiguous(),
                     self.mask[idx].transpose(0, 1).contiguous())

    def batch(self, batch_size: int, *, generator: torch.Generator | int | None = None) -> Batch:
        """``batch_size`` training sequences drawn with replacement."""
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        g = make_generator(generator)
        pick = torch.randint(len(self.train_index), (batch_size,), generator=g)
        return self._batch(self.train_index[pick])

    def test_batch(self) -> Batch:
        """The whole test split as one batch."""
        return self._test


def _stored(shape: tuple, layout: str, per_sequence: bool) -> tuple:
    """A shape as the file stores it (the arrays are turned to N-first on reading)."""
    if layout == "TND" and len(shape) >= 2 and not per_sequence:
        return (shape[1], shape[0], *shape[2:])
    return tuple(shape)


def _read(path: Path, layout: str | None):
    """x, y, mask (or None) and the layout, each array's rank and dtype checked."""
    if not path.is_file():
        raise ValueError(f"file task: {path} is not a file")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise ValueError(f"file task: cannot read {path} as an .npz archive "
                         f"({type(e).__name__}: {e})") from None
    unknown = sorted(set(arrays) - set(ARRAYS))
    if unknown:
        raise ValueError(f"{path}: unknown array(s) {', '.join(unknown)}; expected x, y and "
                         "optionally mask and layout")
    for k in ("x", "y"):
        if k not in arrays:
            raise ValueError(f"{path}: no array {k!r} (it holds: "
                             f"{', '.join(sorted(arrays)) or 'nothing'})")
    stated = None
    if "layout" in arrays:
        a = arrays["layout"]
        if a.shape != () or a.dtype.kind not in "US":
            raise ValueError(f"{path}: layout must be a string array, 'NTD' or 'TND', got "
                             f"{a.dtype} of shape {a.shape}")
        stated = str(a.item() if a.dtype.kind == "U" else a.item().decode())
        if stated not in LAYOUTS:
            raise ValueError(f"{path}: layout is {stated!r}; expected 'NTD' or 'TND'")
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"file task: layout must be 'NTD' or 'TND', got {layout!r}")
    if stated and layout and stated != layout:
        raise ValueError(f"{path}: the file states layout {stated!r} but layout={layout!r} "
                         "was given")
    layout = layout or stated
    if layout is None:
        raise ValueError(f"{path}: the layout is not stated: give layout='NTD' ((N, T, D)) "
                         "or 'TND' ((T, N, D)), or store a 'layout' array in the file")
    x, y, mask = arrays["x"], arrays["y"], arrays.get("mask")
    if x.ndim != 3:
        raise ValueError(f"{path}: x has shape {x.shape}; expected (N, T, D) or (T, N, D)")
    if x.dtype.kind not in "biuf":
        raise ValueError(f"{path}: x has dtype {x.dtype}; expected real numbers")
    if x.size == 0:
        raise ValueError(f"{path}: x of shape {x.shape} is empty")
    if y.dtype.kind == "f":
        if y.ndim not in (2, 3):
            raise ValueError(f"{path}: y is float with shape {y.shape}; float targets need a "
                             "K dimension: (N, K), or (N, T, K) / (T, N, K)")
    elif y.dtype.kind in "iu":
        if y.ndim not in (1, 2):
            raise ValueError(f"{path}: y holds integers of shape {y.shape}; class indices are "
                             "(N,), or (N, T) / (T, N)")
    else:
        raise ValueError(f"{path}: y has dtype {y.dtype}; expected integer class indices or "
                         "float targets")
    for name, a in (("x", x), ("y", y), ("mask", mask)):
        if a is not None and a.dtype.kind == "f" and not np.isfinite(a).all():
            raise ValueError(f"{path}: {name} holds NaN or Inf")
    if mask is not None:
        if mask.dtype.kind not in "biuf":
            raise ValueError(f"{path}: mask has dtype {mask.dtype}; expected bool or numbers")
        if mask.ndim != 2:
            raise ValueError(f"{path}: mask has shape {mask.shape}; expected (N, T) or (T, N)")
        if (mask < 0).any() or not (mask > 0).any():
            raise ValueError(f"{path}: mask must be >= 0 with at least one counted step")
    return x, y, mask, layout
