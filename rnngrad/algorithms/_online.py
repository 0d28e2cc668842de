"""Pieces shared by the approximate online algorithms (e-prop, RFLO, SnAp-1, UORO, KF-RTRL).

Each of them factors the recurrent parameters as one (H, P) matrix
``theta = [W_rec | W_in | b_rec]`` acting on the pre-synaptic vector
``pre_t = [h_{t-1}; x_t; 1]`` (P = H + D + 1), so that ``a_t = theta pre_t`` and the
immediate influence of the sensitivity lemma is
``Mbar_t[k, i, j] = delta_ki alpha phi'(a_t^i) pre_t^j``: a diagonal in (k, i) times
a row vector in j. They differ only in what they keep of ``M_t = J_t M_{t-1} + Mbar_t``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..cells.activations import get_activation
from ..cells.elman import cell_step
from .base import Grads, output_grads, readout_step

__all__ = ["Forward", "forward", "learning_signal", "split_theta", "emit", "generator_for",
           "random_signs", "check_seed"]


class Forward(NamedTuple):
    h: Tensor  # (B, H) h_t
    d: Tensor  # (B, H) alpha phi'(a_t): the diagonal of Mbar_t (and of dh_t/da_t)
    dphi: Tensor  # (B, H) phi'(a_t)
    pre: Tensor  # (B, P) [h_{t-1}; x_t; 1]
    z: Tensor  # (B, K) z_t
    loss: Tensor  # () this step's loss
    dz: Tensor | None  # (B, K) dl_t/dz_t weighted by mask/B; None without a target


def forward(model, h_prev: Tensor, x_t: Tensor, target_t, mask_t, loss: str) -> Forward:
    """One step of the cell and the readout, with what the online rules need."""
    act = get_activation(model.activation)
    h, a, fa = cell_step(model.W_in, model.W_rec, model.b_rec, h_prev, x_t,
                         activation=act, alpha=model.alpha)
    dphi = act.deriv(a, fa)
    d = dphi if model.alpha == 1.0 else dphi * model.alpha
    pre = torch.cat([h_prev, x_t, h_prev.new_ones(h_prev.shape[0], 1)], dim=1)
    z, value, dz = readout_step(model, h, target_t, mask_t, loss)
    return Forward(h, d, dphi, pre, z, value, dz)


def learning_signal(dz: Tensor | None, feedback: Tensor, dh_t: Tensor | None) -> Tensor | None:
    """``L_t = dl_t/dz_t @ feedback (+ dh_t)``: (B, H), or None when the step has no loss.

    feedback is (K, H): ``W_out`` gives the exact ``dl_t/dh_t``, a fixed random matrix
    gives random feedback.
    """
    L = None if dz is None else dz @ feedback
    if dh_t is not None:
        L = dh_t if L is None else L + dh_t
    return L


def split_theta(G: Tensor, H: int, D: int) -> Grads:
    """(H, P) gradient of ``[W_rec | W_in | b_rec]`` -> the named parameter gradients."""
    return {"W_rec": G[:, :H], "W_in": G[:, H:H + D], "b_rec": G[:, H + D]}


def emit(model, f: Forward, G: Tensor | None) -> Grads | None:
    """The step's gradient dict: recurrent part G (H, P) (None: zero) and the exact readout."""
    if f.dz is None and G is None:
        return None
    H, D = model.hidden_size, model.input_size
    if G is None:
        P = H + D + 1
        G = f.h.new_zeros(H, P)
    grads = split_theta(G, H, D)
    if f.dz is None:
        grads["W_out"] = torch.zeros_like(model.W_out)
        grads["b_out"] = torch.zeros_like(model.b_out)
    else:
        grads.update(output_grads(f.dz, f.h))
    return grads


def generator_for(cache: dict, device: torch.device, seed: int) -> torch.Generator:
    """One generator per device, seeded once and then continued across ``init`` calls, so
    that successive sequences draw fresh noise while a run stays reproducible."""
    key = str(device)
    g = cache.get(key)
    if g is None:
        g = torch.Generator(device=device)
        g.manual_seed(seed)
        cache[key] = g
    return g


def random_signs(shape: tuple[int, ...], g: torch.Generator, like: Tensor) -> Tensor:
    """Independent +-1 entries of the given shape, in ``like``'s dtype and device."""
    s = torch.randint(0, 2, shape, generator=g, device=like.device)
    return s.to(like.dtype).mul_(2.0).sub_(1.0)


def check_seed(seed: object) -> int:
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    return seed
