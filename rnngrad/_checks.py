"""Input validation shared by the public entry points.

Every message names what was given and what was expected.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

from .errors import NonFiniteError

__all__ = [
    "check_batch_size",
    "check_step_inputs",
    "check_outputs_finite",
    "check_int",
    "check_seed_value",
    "check_inputs",
    "check_targets",
    "check_mask",
    "check_h0",
    "check_finite",
    "check_params_finite",
    "check_tensor",
]


def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


def _param(model: nn.Module) -> Tensor:
    return model.W_out


def _type_name(t: object) -> str:
    mod = type(t).__module__
    return f"{mod}.{type(t).__name__}" if mod not in ("builtins",) else type(t).__name__


def check_int(name: str, value: object, *, minimum: int = 1) -> int:
    """An int (numpy ints too, not bool) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r} "
                        f"({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_batch_size(batch_size: object) -> int:
    return check_int("batch_size", batch_size)


def check_positive_float(name: str, value: object) -> float:
    """A finite number > 0 (not a bool, not a string)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive float, got {value!r} ({type(value).__name__})")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive float, got {value!r}")
    return float(value)


def check_seed_value(name: str, seed: object) -> int:
    """A seed torch.Generator.manual_seed takes: an int in [0, 2**63)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be an int in [0, 2**63), got {seed!r} "
                        f"({type(seed).__name__})")
    if not 0 <= seed < 2**63:
        raise ValueError(f"{name} must be an int in [0, 2**63), got {seed!r}")
    return int(seed)


def check_tensor(name: str, t: object, model: nn.Module, *, floating: bool = True) -> Tensor:
    """A tensor on the model's device (and, if floating, of the model's dtype)."""
    ref = _param(model)
    if ref.is_meta:
        raise ValueError("the model is on the meta device (shapes without data), where nothing "
                         "can be computed: build it on a real device, or move it with "
                         "model.to_empty(device='cpu') and load its weights")
    if ref.is_complex() or not ref.is_floating_point():
        raise TypeError(f"the model's parameters are {ref.dtype}, but rnngrad takes real "
                        "floating parameters (float32 or float64): model.to(torch.float64); "
                        "a complex parameter is kept as its real and imaginary parts, as "
                        "rnngrad.cells.LRU does")
    if not isinstance(t, Tensor):
        hint = " (convert it with torch.as_tensor)" if hasattr(t, "__array__") else ""
        raise TypeError(f"{name} must be a torch.Tensor, got {_type_name(t)}{hint}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on device {t.device} but the model is on {ref.device}")
    if floating and t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but the model's parameters are {ref.dtype}")
    return t


def check_finite(name: str, t: Tensor, *, step: int | None = None) -> None:
    # one reduction first: a NaN or Inf entry always makes the sum non-finite; only then
    # (or on overflow of a finite sum) is the tensor searched entry by entry
    if not t.is_floating_point() or bool(torch.isfinite(t.sum())):
        return
    _raise_non_finite(name, t, step=step)


def _raise_non_finite(name: str, t: Tensor, *, step: int | None = None, what: str = "",
                      hint: str = "") -> None:
    finite = torch.isfinite(t)
    if bool(finite.all()):
        return
    bad = (~finite).nonzero()
    n = bad.shape[0]
    first = tuple(int(i) for i in bad[0])
    at = f" at step {step}" if step is not None else ""
    raise NonFiniteError(f"{what}{name}{at} contains {n} NaN or Inf entries (first at index "
                         f"{first}){hint}", quantity=name, step=step)


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
    if mask.is_complex():
        raise TypeError(f"mask must be real (bool, integer or floating), got dtype {mask.dtype}")
    if mask.dim() == 1 and mask.shape[0] == T:
        mask = mask.unsqueeze(1).expand(T, B)
    if tuple(mask.shape) != (T, B):
        raise ValueError(f"mask has shape {_shape(mask)} but expected ({T}, {B}) or ({T},)")
    mask = mask.to(ref.dtype).contiguous()  # a transposed mask is valid input
    check_finite("mask", mask)
    return mask


def check_h0(model: nn.Module, h0: Tensor | None, B: int) -> Tensor:
    """h0 (B, H) or (H,) or None -> (B, H)."""
    ref = _param(model)
    H = model.hidden_size
    if h0 is None:
        return torch.zeros(B, H, dtype=ref.dtype, device=ref.device)
    check_tensor("h0", h0, model)
    if h0.is_complex() or not h0.is_floating_point():
        raise TypeError(f"h0 must be a real floating tensor, got dtype {h0.dtype}")
    if h0.dim() == 1 and h0.shape[0] == H:
        h0 = h0.expand(B, H)
    if tuple(h0.shape) != (B, H):
        raise ValueError(f"h0 has shape {_shape(h0)} but expected ({B}, {H}) or ({H},)")
    check_finite("h0", h0)
    return h0


# ---- the online interface: one step's inputs, and what a step produced -----------------


def check_step_inputs(model: nn.Module, B: int, x_t: object, target_t: object, mask_t: object,
                      loss: object, dh_t: object) -> list[tuple[str, Tensor]]:
    """The arguments of an algorithm's ``step`` against the model and the state's batch B:
    shapes, dtypes, devices and class ranges. Returns the floating tensors whose
    finiteness ``check_step_finite`` checks after the step, with the step's outputs, in
    one reduction."""
    from .readouts import check_loss

    if not isinstance(loss, str):
        raise TypeError(f"loss must be a string ('mse', 'cross_entropy' or 'bce'), got {loss!r}")
    check_loss(loss, model.readout)
    W_out = model.W_out
    K, H = W_out.shape
    D = model.input_size
    check_tensor("x_t", x_t, model)
    if x_t.shape != (B, D):
        raise ValueError(f"x_t has shape {_shape(x_t)} but the model and state expect ({B}, {D})")
    floats = [("x_t", x_t)]
    if target_t is not None:
        if loss == "cross_entropy":
            check_tensor("target_t", target_t, model, floating=False)
            if target_t.is_floating_point() or target_t.is_complex() or target_t.dtype == torch.bool:
                raise TypeError(f"target_t for loss 'cross_entropy' holds class indices: an "
                                f"integer tensor of shape ({B},), got dtype {target_t.dtype}")
            if target_t.shape != (B,):
                raise ValueError(f"target_t has shape {_shape(target_t)} but loss "
                                 f"'cross_entropy' expects class indices of shape ({B},)")
            lo, hi = torch.aminmax(target_t)
            lo, hi = torch.stack((lo, hi)).tolist()
            if lo < 0 or hi >= K:
                raise ValueError(f"target_t holds class indices in [{lo}, {hi}] but the model has "
                                 f"{K} classes (0..{K - 1})")
        else:
            check_tensor("target_t", target_t, model)
            if target_t.shape != (B, K):
                raise ValueError(f"target_t has shape {_shape(target_t)} but loss {loss!r} "
                                 f"expects ({B}, {K})")
            floats.append(("target_t", target_t))
    if mask_t is not None:
        check_tensor("mask_t", mask_t, model, floating=False)
        if mask_t.is_complex():
            raise TypeError(f"mask_t must be real, got dtype {mask_t.dtype}")
        if mask_t.shape != (B,):
            raise ValueError(f"mask_t has shape {_shape(mask_t)} but expected ({B},)")
        if mask_t.is_floating_point():
            floats.append(("mask_t", mask_t))
    if dh_t is not None:
        check_tensor("dh_t", dh_t, model)
        if dh_t.shape != (B, H):
            raise ValueError(f"dh_t has shape {_shape(dh_t)} but expected ({B}, {H})")
        floats.append(("dh_t", dh_t))
    return floats


def check_step_finite(who: str, inputs: list[tuple[str, Tensor]], out, grads) -> None:
    """One reduction (and one host sync) over a step's floating inputs, its output h_t, its
    loss and the gradients it emitted; on a NaN or Inf, name the first quantity that has it
    (an input first: a bad input is the caller's, not the algorithm's)."""
    tensors = [t for _, t in inputs] + [out.h, out.loss]
    if grads:
        tensors += [g for g in grads.values() if isinstance(g, Tensor)]
    if math.isfinite(torch.stack(torch._foreach_norm(tensors)).sum().item()):
        return
    for name, t in inputs:  # a bad input is the caller's: named before any output
        _raise_non_finite(name, t)
    check_outputs_finite(who, out, grads)


def check_outputs_finite(who: str, out, grads) -> None:
    """One reduction over what a step produced (h_t, its loss and the emitted gradients);
    on a NaN or Inf, name the first quantity that has it."""
    parts = [out.h.sum(), out.loss.reshape(())]
    tensors = []
    if grads:
        tensors = [g for g in grads.values() if isinstance(g, Tensor)]
        if tensors:
            parts.append(torch.stack(torch._foreach_norm(tensors)).sum())
    if bool(torch.isfinite(torch.stack(parts).sum())):
        return
    hint = (": the forward pass overflowed (weights or inputs too large, or an unstable "
            "recurrence)")
    _raise_non_finite("h_t", out.h, what=f"{who}: ", hint=hint)
    big = float(out.h.abs().max())
    _raise_non_finite("the step's loss", out.loss, what=f"{who}: ",
                      hint=f": the readout or the loss overflowed (largest |h_t| = {big:.3g})")
    for name, g in (grads or {}).items():
        if isinstance(g, Tensor):
            _raise_non_finite(f"grads[{name!r}]", g, what=f"{who}: ",
                              hint=": the algorithm's state (influence, traces) overflowed: "
                                   "exploding gradients over the sequence")
            if not bool(torch.isfinite(g.norm())):
                raise NonFiniteError(
                    f"{who}: grads[{name!r}] has entries so large (up to "
                    f"{float(g.abs().max()):.3g}) that its norm overflows {g.dtype}: exploding "
                    "gradients over the sequence", quantity=f"grads[{name!r}]")
    raise NonFiniteError(f"{who}: the step produced values whose sum overflows (finite "
                         "entries too large to add up)", quantity="outputs")
