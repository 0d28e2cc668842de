"""Readouts ``y = g(z)``, the per-step losses with their gradients ``dl/dz``, and rewards.

The loss is pinned so results compare across algorithms and papers::

    L = (1/B) * sum_{t,b} mask[t,b] * l(t,b)

    "mse"            l = 0.5 * ||y - target||^2,  y = g(z)   (identity readout: 0.5 ||z - target||^2)
    "cross_entropy"  l = -log softmax(z)[target]              (targets are class indices)
    "bce"            l = sum_k softplus(z_k) - target_k z_k   (binary cross-entropy on the logits)

"cross_entropy" and "bce" read z as logits, so they pair with the readout that turns
logits into the probabilities they score (softmax, resp. sigmoid) or with identity;
any other pairing raises rather than computing something nobody asked for. "mse"
goes through the readout, so with softmax it carries the dense softmax
Jacobian: ``dl/dz = J_g(z)^T (y - target)`` with ``J = diag(y) - y y^T``.

A reward ``R(h_1..h_T)`` is any differentiable function of the trajectory; the loss is
then ``L - R`` and ``reward_grad`` gives ``dR/dh_t`` by autograd on R alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["READOUTS", "LOSSES", "DEFAULT_LOSS", "check_readout", "check_loss", "default_loss",
           "readout", "loss_and_grad", "reward_grad"]

READOUTS = ("identity", "softmax", "sigmoid")
LOSSES = ("mse", "cross_entropy", "bce")
_COMPATIBLE = {
    "mse": READOUTS,
    "cross_entropy": ("identity", "softmax"),
    "bce": ("identity", "sigmoid"),
}

# the loss a readout is scored with when none is named: its probabilities' own likelihood
DEFAULT_LOSS = {"identity": "mse", "softmax": "cross_entropy", "sigmoid": "bce"}


def default_loss(readout_name: str) -> str:
    """The loss that goes with a readout when ``loss=`` is not given: softmax ->
    "cross_entropy", sigmoid -> "bce", identity -> "mse"."""
    return DEFAULT_LOSS[check_readout(readout_name)]


def check_readout(name: str) -> str:
    if name not in READOUTS:
        raise ValueError(f"unknown readout {name!r}; known readouts: {', '.join(READOUTS)}")
    return name


def check_loss(name: str, readout_name: str) -> str:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(LOSSES)}")
    if readout_name not in _COMPATIBLE[name]:
        raise ValueError(
            f"loss {name!r} reads z as logits and pairs with readout "
            f"{' or '.join(repr(r) for r in _COMPATIBLE[name])}, but the model's readout is "
            f"{readout_name!r}"
        )
    return name


def readout(z: Tensor, name: str) -> Tensor:
    """``y = g(z)`` over the last axis."""
    if name == "identity":
        return z
    if name == "softmax":
        return torch.softmax(z, dim=-1)
    if name == "sigmoid":
        return torch.sigmoid(z)
    raise ValueError(f"unknown readout {name!r}; known readouts: {', '.join(READOUTS)}")


def loss_and_grad(
    z: Tensor, target: Tensor, weight: Tensor, *, loss: str, readout_name: str
) -> tuple[Tensor, Tensor]:
    """Weighted loss and its gradient with respect to the logits.

    Args:
        z: (..., K) readout pre-activations (any leading shape, e.g. (T, B) or (B,)).
        target: (..., K) float, or (...) int64 class indices for "cross_entropy".
        weight: (...) per-example weights, ``mask / B``.

    Returns:
        ``(sum(weight * l), weight[..., None] * dl/dz)``: a scalar and a (..., K) tensor.
    """
    w = weight.unsqueeze(-1)
    if loss == "mse":
        y = readout(z, readout_name)
        r = y - target
        l = 0.5 * (r * r).sum(-1)
        if readout_name == "identity":
            dz = r
        elif readout_name == "softmax":
            # J^T r with J = diag(y) - y y^T (the dense softmax Jacobian), without forming J
            dz = y * (r - (y * r).sum(-1, keepdim=True))
        else:  # sigmoid
            dz = r * y * (1.0 - y)
    elif loss == "cross_entropy":
        logp = F.log_softmax(z, dim=-1)
        l = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        dz = logp.exp()
        dz.scatter_add_(-1, target.unsqueeze(-1), torch.full_like(l, -1.0).unsqueeze(-1))
    elif loss == "bce":
        l = (F.softplus(z) - target * z).sum(-1)
        dz = torch.sigmoid(z) - target
    else:
        raise ValueError(f"unknown loss {loss!r}; known losses: {', '.join(LOSSES)}")
    return (weight * l).sum(), w * dz


def reward_grad(reward, hs: Tensor) -> tuple[Tensor, Tensor]:
    """``R(h_1..h_T)`` and ``dR/dh_t`` (T, B, H) by autograd on R alone (not the recurrence).

    R receives a copy of the trajectory (never a buffer the algorithm reuses) and must
    return a real scalar tensor that depends differentiably on it, finite, with a finite
    gradient; anything else raises a clear error."""
    from .errors import NonFiniteError

    with torch.enable_grad():
        h = hs.detach().clone().requires_grad_(True)
        R = reward(h)
        if not isinstance(R, Tensor):
            raise TypeError(f"reward must return a scalar torch.Tensor of R(h), got "
                            f"{type(R).__name__}")
        if R.dim() != 0:
            raise ValueError(f"reward must return a scalar tensor (shape ()), got shape "
                             f"{tuple(R.shape)}")
        if not R.is_floating_point() or R.is_complex():
            raise TypeError(f"reward must return a real floating scalar, got dtype {R.dtype}")
        if not R.requires_grad:
            raise TypeError("reward must be differentiable in h: R(h) returned a tensor with no "
                            "gradient path to h (did it detach, call .item() or go through "
                            "NumPy?)")
        if not bool(torch.isfinite(R)):
            raise NonFiniteError(f"reward returned {float(R.detach())}: R(h) must be finite",
                                 quantity="reward")
        (dR,) = torch.autograd.grad(R, h, allow_unused=True)
    if dR is None:
        dR = torch.zeros_like(hs)
    elif not bool(torch.isfinite(dR).all()):
        raise NonFiniteError("the reward's gradient dR/dh has NaN or Inf entries",
                             quantity="dR/dh")
    return R.detach(), dR
