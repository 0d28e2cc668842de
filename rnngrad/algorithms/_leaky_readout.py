"""The leaky readout of ``Network(readout_decay=kappa)`` (Bellec et al. 2020) in every algorithm.

    z_t = kappa z_{t-1} + W_out h_t + b_out,   z_0 = 0,   y_t = g(z_t)

so ``z_t = W_out hf_t + c_t b_out`` with the filtered output and its bias count::

    hf_t = kappa hf_{t-1} + h_t      (B, H)     = d z_t / d W_out (rows)
    c_t  = kappa c_{t-1} + 1         ()         = d z_t / d b_out

What each algorithm does with it (dz_t = dl_t/dz_t, weighted by mask / B):

- BPTT, checkpointed, truncated: the backward filter ``dzbar_t = dz_t + kappa dzbar_{t+1}``
  (from the last step of the segment that is differentiated: within a chunk for TBPTT,
  whose chunks cut the readout's state as they cut the cells'), then
  ``hbar_t = W_out^T dzbar_t``, ``dW_out = sum_t dzbar_t h_t^T``, ``db_out = sum_t dzbar_t``.
  Forward-only passes (checkpointing) use the equal ``sum_t dz_t hf_t^T``, ``sum_t c_t dz_t``.
- RTRL: the filtered influence ``Hf_t = kappa Hf_{t-1} + d h_t / d theta`` (the readout's
  filter is one more linear recurrence), ``grad = sum_t (W_out^T dz_t) . Hf_t``.
- the per-unit trace rules (e-prop, SnAp-1, RFLO): Bellec's filtered eligibility trace,
  ``ebar_t = kappa ebar_{t-1} + e_t`` with ``e_t`` the trace of the unit's output, times
  the unfiltered learning signal ``B dz_t``.
- UORO: the filter's state joins the recurrent state (it is a linear recurrence), so the
  rank-one estimate covers its influence too and stays unbiased.

In every case a reward's ``dh_t`` (``-dR/dh_t``) acts on h_t directly: it pairs with the
unfiltered influence. The readout's state ``z`` is carried by the online algorithms for
the value; the gradient's filters ``hf, c`` restart where an algorithm cuts the state.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..readouts import loss_and_grad

__all__ = ["decay", "Leak", "init", "cut", "step", "sequence_readout", "backward_filter",
           "forward_filter"]


def decay(model) -> float:
    """kappa: the model's ``readout_decay`` (0 for rnngrad.RNN and plain readouts)."""
    return float(getattr(model, "readout_decay", 0.0))


class Leak(NamedTuple):
    z: Tensor  # (B, K) z_t, the readout's state: what the next step's value builds on
    hf: Tensor  # (B, H) hf_t since the last cut: d z_t / d W_out
    c: float  # c_t since the last cut: d z_t / d b_out


def init(model, batch_size: int) -> Leak | None:
    """The filter before the first step; None for a plain readout (kappa = 0)."""
    if decay(model) == 0.0:
        return None
    W = model.W_out.detach()
    return Leak(W.new_zeros(batch_size, W.shape[0]), W.new_zeros(batch_size, W.shape[1]), 0.0)


def cut(leak: Leak | None) -> Leak | None:
    """The gradient's filters restart (a cut of the state); the value carries on."""
    if leak is None:
        return None
    return Leak(leak.z, torch.zeros_like(leak.hf), 0.0)


def step(model, leak: Leak, h: Tensor, target_t: Tensor | None, mask_t: Tensor | None,
         loss: str) -> tuple[Leak, Tensor, Tensor, Tensor | None]:
    """One step of the leaky readout: ``(leak_t, z_t (B, K), loss (), dz_t (B, K) or None)``;
    ``leak_t.hf`` and ``leak_t.c`` give the readout's gradients ``dz^T hf``, ``c sum dz``."""
    kappa = decay(model)
    W_out, b_out = model.W_out.detach(), model.b_out.detach()
    z = torch.addmm(b_out, h, W_out.T).add_(leak.z, alpha=kappa)
    new = Leak(z, torch.add(h, leak.hf, alpha=kappa), kappa * leak.c + 1.0)
    if target_t is None:
        return new, z, z.new_zeros(()), None
    B = h.shape[0]
    w = (torch.ones(B, dtype=h.dtype, device=h.device) if mask_t is None else mask_t) / B
    value, dz = loss_and_grad(z, target_t, w, loss=loss, readout_name=model.readout)
    return new, z, value, dz


def sequence_readout(model, hs: Tensor, targets, mask: Tensor, loss: str,
                     z0: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Loss, dl/dz (T, B, K) and z_T of a segment's outputs hs (T, B, H) from the readout's
    state z0 (None: zeros)."""
    T, B, H = hs.shape
    kappa = decay(model)
    W_out, b_out = model.W_out.detach(), model.b_out.detach()
    z = torch.addmm(b_out, hs.reshape(T * B, H), W_out.T).view(T, B, -1)
    prev = z0
    for t in range(T):
        if prev is not None:
            z[t].add_(prev, alpha=kappa)
        prev = z[t]
    if targets is None:
        return hs.new_zeros(()), torch.zeros_like(z), z[-1].clone()
    value, dz = loss_and_grad(z, targets, mask / B, loss=loss, readout_name=model.readout)
    return value, dz, z[-1].clone()


def backward_filter(dz: Tensor, kappa: float) -> Tensor:
    """``dzbar_t = dz_t + kappa dzbar_{t+1}`` over a segment (T, B, K), from its last step;
    dz itself when kappa = 0."""
    if kappa == 0.0:
        return dz
    out = dz.clone()
    for t in range(dz.shape[0] - 2, -1, -1):
        out[t].add_(out[t + 1], alpha=kappa)
    return out


def forward_filter(hs: Tensor, kappa: float, hf0: Tensor | None = None, c0: float = 0.0):
    """``hf_t = kappa hf_{t-1} + h_t`` (T, B, H) and ``c_t = kappa c_{t-1} + 1`` (T,) over a
    segment from ``(hf0, c0)``; hs itself and ones when kappa = 0."""
    T = hs.shape[0]
    if kappa == 0.0:
        return hs, hs.new_ones(T)
    hf = hs.clone()
    c = []
    prev, cp = hf0, c0
    for t in range(T):
        if prev is not None:
            hf[t].add_(prev, alpha=kappa)
        prev = hf[t]
        cp = kappa * cp + 1.0
        c.append(cp)
    return hf, hs.new_tensor(c)
