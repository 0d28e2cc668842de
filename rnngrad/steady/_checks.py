"""Validation shared by the steady-state modules.

Every message names what was given and what was expected. Options are checked
for type before value: a string, a bool or a float where an int is needed is a
TypeError; a number out of its range, NaN included, is a ValueError.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
from torch import Tensor

__all__: list[str] = []


def shape_str(t: Tensor) -> str:
    return str(tuple(t.shape))


def _got(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


def default_tol(dtype: torch.dtype) -> float:
    # 1e-12 in float64, ~1.2e-5 in float32: a hundred round-offs above the floor.
    return max(1e-12, 100.0 * torch.finfo(dtype).eps)


# -------------------------------------------------------------------- tensors


def check_tensor(name: str, t: object) -> Tensor:
    """A floating-point tensor with only finite entries."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if not bool(torch.isfinite(t).all()):
        bad = (~torch.isfinite(t)).nonzero()
        raise ValueError(
            f"{name} contains {bad.shape[0]} NaN or Inf entries "
            f"(first at index {tuple(int(i) for i in bad[0])})"
        )
    return t


def check_W(W: object) -> Tensor:
    W = check_tensor("W", W)
    if W.dim() != 2 or W.shape[0] != W.shape[1]:
        raise ValueError(f"W has shape {shape_str(W)} but a square (N, N) matrix is expected")
    return W


def check_same_kind(name: str, t: Tensor, W: Tensor) -> None:
    if t.dtype != W.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but W has dtype {W.dtype}")
    if t.device != W.device:
        raise ValueError(f"{name} is on device {t.device} but W is on {W.device}")


def check_like(name: str, t: object, W: Tensor, *, ref: Tensor | None = None) -> Tensor:
    """A tensor of shape (N,) or (B, N) (or exactly ref's shape), on W's dtype and device."""
    t = check_tensor(name, t)
    N = W.shape[0]
    if ref is not None:
        if t.shape != ref.shape:
            raise ValueError(f"{name} has shape {shape_str(t)} but {shape_str(ref)} is expected")
    elif t.dim() not in (1, 2) or t.shape[-1] != N:
        raise ValueError(f"{name} has shape {shape_str(t)} but ({N},) or (B, {N}) is expected")
    check_same_kind(name, t, W)
    return t


# -------------------------------------------------------------------- options


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    known = ", ".join(map(repr, choices))
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, one of {known}; got {_got(value)}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {known}, got {value!r}")
    return value


def check_int(name: str, value: object, *, minimum: int) -> int:
    """An int (not a bool, not a float) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {_got(value)}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)


def _check_real(name: str, value: object, expected: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {_got(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be {expected}, got {value}")
    return value


def check_tol(name: str, value: object) -> float | None:
    """None (the dtype's default) or a finite number >= 0."""
    if value is None:
        return None
    expected = "a finite number >= 0 (or None for the dtype's default)"
    tol = _check_real(name, value, expected)
    if tol < 0:
        raise ValueError(f"{name} must be {expected}, got {tol}")
    return tol


def check_positive(name: str, value: object) -> float:
    """A finite number > 0."""
    x = _check_real(name, value, "a finite number > 0")
    if not x > 0:
        raise ValueError(f"{name} must be a finite number > 0, got {x}")
    return x


def check_nonnegative(name: str, value: object) -> float:
    x = _check_real(name, value, "a finite number >= 0")
    if x < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {x}")
    return x


def check_damping(value: object) -> float:
    expected = "a number in (0, 1]"
    damping = _check_real("damping", value, expected)
    if not 0.0 < damping <= 1.0:
        raise ValueError(f"damping must lie in (0, 1], got {damping}")
    return damping


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {_got(value)}")
    return value


def check_seed(name: str, value: object, *, optional: bool) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        expected = "an int or None" if optional else "an int"
        raise TypeError(f"{name} must be {expected}, got {_got(value)}")
    return int(value)


def check_dtype(value: object) -> torch.dtype:
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise TypeError(
            f"dtype must be a floating-point torch.dtype (torch.float32, torch.float64), "
            f"got {_got(value)}"
        )
    return value


def check_finite_result(
    name: str, t: Tensor, where: str, describe: Callable[[tuple[int, ...]], str]
) -> None:
    """Raise when a computed tensor overflowed; ``describe(index)`` names an entry."""
    finite = torch.isfinite(t)
    if bool(finite.all()):
        return
    bad = (~finite).nonzero()
    first = tuple(int(i) for i in bad[0])
    value = float(t.detach()[first])
    raise ValueError(
        f"{name} overflowed: {bad.shape[0]} entries are Inf or NaN (first: {describe(first)}: "
        f"{name} = {value}); {where}"
    )
