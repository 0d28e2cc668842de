"""Input validation shared by the public entry points.

Every message names what was given and what was expected.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = [
    "check_inputs",
    "check_targets",
    "check_mask",
    "check_h0",
    "check_finite",
    "check_params_finite",
    "check_tensor",
]


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _param(model: nn.Module) -> Tensor:
    return model.W_out


def check_tensor(name: str, t: object, model: nn.Module, *, floating: bool = True) -> Tensor:
    """A tensor on the model's device (and, if floating, of the model's dtype)."""
    ref = _param(model)
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on device {t.device} but the model is on {ref.device}")
    if floating and t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but the model's parameters are {ref.dtype}")
    return t


def check_finite(name: str, t: Tensor) -> None:
    # one reduction first: a NaN or Inf entry always makes the sum non-finite; only then
    # (or on overflow of a finite sum) is the tensor searched entry by entry
    if not t.is_floating_point() or bool(torch.isfinite(t.sum())):
        return
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).nonzero()
        n = bad.shape[0]
        first = tuple(int(i) for i in bad[0])
        raise ValueError(f"{name} contains {n} NaN or Inf entries (first at index {first})")


def check_params_finite(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        check_finite(f"parameter {name}", p.detach())


def check_inputs(model: nn.Module, inputs: Tensor) -> tuple[int, int]:
    """inputs (T, B, D) -> (T, B)."""
    check_tensor("inputs", inputs, model)
    D = model.input_size
    if inputs.dim() != 3 or inputs.shape[2] != D or inputs.shape[0] < 1 or inputs.shape[1] < 1:
        raise ValueError(f"inputs has shape {_shape(inputs)} but the model expects (T, B, {D}) "
                         "with T >= 1 and B >= 1")
    check_finite("inputs", inputs)
    return inputs.shape[0], inputs.shape[1]


def check_targets(model: nn.Module, targets: Tensor, loss: str, T: int, B: int) -> Tensor:
    K = model.output_size
    if loss == "cross_entropy":
        check_tensor("targets", targets, model, floating=False)
        if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise TypeError(f"targets for loss 'cross_entropy' are class indices: expected an "
                            f"integer tensor of shape ({T}, {B}), got dtype {targets.dtype}")
        if tuple(targets.shape) != (T, B):
            raise ValueError(f"targets has shape {_shape(targets)} but loss 'cross_entropy' "
                             f"expects class indices of shape ({T}, {B})")
        if targets.numel() and (targets.min() < 0 or targets.max() >= K):
            raise ValueError(f"targets hold class indices in [{int(targets.min())}, "
                             f"{int(targets.max())}] but the model has {K} classes (0..{K - 1})")
        return targets.long()
    check_tensor("targets", targets, model)
    if tuple(targets.shape) != (T, B, K):
        raise ValueError(f"targets has shape {_shape(targets)} but loss {loss!r} expects "
                         f"({T}, {B}, {K})")
    check_finite("targets", targets)
    return targets


def check_mask(model: nn.Module, mask: Tensor | None, T: int, B: int) -> Tensor:
    """mask (T, B) or (T,), bool or float -> (T, B) in the model's dtype."""
    ref = _param(model)
    if mask is None:
        return torch.ones(T, B, dtype=ref.dtype, device=ref.device)
    check_tensor("mask", mask, model, floating=False)
    if mask.dim() == 1 and mask.shape[0] == T:
        mask = mask.unsqueeze(1).expand(T, B)
    if tuple(mask.shape) != (T, B):
        raise ValueError(f"mask has shape {_shape(mask)} but expected ({T}, {B}) or ({T},)")
    mask = mask.to(ref.dtype)
    check_finite("mask", mask)
    return mask


def check_h0(model: nn.Module, h0: Tensor | None, B: int) -> Tensor:
    """h0 (B, H) or (H,) or None -> (B, H)."""
    ref = _param(model)
    H = model.hidden_size
    if h0 is None:
        return torch.zeros(B, H, dtype=ref.dtype, device=ref.device)
    check_tensor("h0", h0, model)
    if h0.dim() == 1 and h0.shape[0] == H:
        h0 = h0.expand(B, H)
    if tuple(h0.shape) != (B, H):
        raise ValueError(f"h0 has shape {_shape(h0)} but expected ({B}, {H}) or ({H},)")
    check_finite("h0", h0)
    return h0
