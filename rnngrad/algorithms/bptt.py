"""Backpropagation through time, written out by hand (seeds 000, 002, 004).

Forward (DESIGN.md's notation)::

    a_t = W_in x_t + W_rec h_{t-1} + b_rec,  h_t = (1 - alpha) h_{t-1} + alpha phi(a_t)
    z_t = W_out h_t + b_out

Backward, from ``u_{T+1} = 0`` and ``delta_{T+1} = 0``::

    hbar_t  = W_out^T dl/dz_t (+ dl/dh_t from a reward)       immediate term
    delta_t = hbar_t + W_rec^T u_{t+1} + (1 - alpha) delta_{t+1}   dL/dh_t, total
    u_t     = alpha phi'(a_t) * delta_t                         dL/da_t = dL/db_rec(t)

    dW_rec = sum_t u_t h_{t-1}^T,  dW_in = sum_t u_t x_t^T,  db_rec = sum_t u_t
    dW_out = sum_t dl/dz_t h_t^T,  db_out = sum_t dl/dz_t
    dh_0   = W_rec^T u_1 + (1 - alpha) delta_1                  (seed 004)

For alpha = 1 this is seed 000's ``x^(t) = W^T u(t+1) + dR/dx(t)``, ``u(t) = D(t) x^(t)``.
``u_t`` is the sensitivity of the loss to the bias at step t (seed 000's sensitivity
lemma, ``dL/dW_rec = sum_t u_t h_{t-1}^T``); ``bptt(sensitivities=True)`` returns it
as ``grads["u"]`` (T, B, H).

Only the u recursion is sequential (one (B, H) x (H, H) GEMM per step); every weight
gradient is then one GEMM over the stacked (T*B) rows.

Exact. Not online: memory O(T B (D + H)), time O(T B H (D + H)) per sequence.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..cells import cell_step, get_activation
from ..model import unroll
from ..readouts import loss_and_grad
from .base import Algorithm, Grads, StepOutput, output_grads, readout_step

__all__ = ["bptt", "BPTTState", "backward", "reward_grad"]


class BPTTState(NamedTuple):
    h: Tensor  # (B, H) current hidden state h_t
    h_start: Tensor  # (B, H) hidden state before the pending segment
    track_h0: bool  # emit grads["h0"] (gradient w.r.t. h_start) at the next flush
    xs: list  # pending x_t, each (B, D)
    hs: list  # pending h_t, each (B, H)
    dphi: list  # pending phi'(a_t), each (B, H)
    hbar: list  # pending immediate terms dl/dh_t, each (B, H)
    dz: list  # pending dl/dz_t (weighted by mask / B), each (B, K)


def backward(
    model,
    inputs: Tensor,
    h0: Tensor,
    hs: Tensor,
    dphi: Tensor,
    hbar: Tensor,
) -> tuple[Grads, Tensor, Tensor]:
    """The hand-derived backward pass over one stored segment.

    Args:
        inputs: (T, B, D) x_1..x_T.
        h0: (B, H) the state before the segment.
        hs: (T, B, H) h_1..h_T.
        dphi: (T, B, H) phi'(a_t).
        hbar: (T, B, H) immediate terms dl/dh_t.

    Returns:
        ``(grads, u, dh0)``: W_in, W_rec, b_rec gradients; u_t (T, B, H); dL/dh_0 (B, H).
    """
    T, B, D = inputs.shape
    H = hs.shape[2]
    alpha = model.alpha
    leaky = alpha != 1.0
    W_rec = model.W_rec
    u = torch.empty_like(hbar)
    if leaky:
        scaled = dphi * alpha  # alpha phi'(a_t), once for all t
        delta = hbar[T - 1]
        u[T - 1] = scaled[T - 1] * delta
        for t in range(T - 2, -1, -1):
            delta = torch.addmm(hbar[t], u[t + 1], W_rec).add_(delta, alpha=1.0 - alpha)
            torch.mul(scaled[t], delta, out=u[t])
        dh0 = torch.addmm(delta, u[0], W_rec, beta=1.0 - alpha)
    else:
        torch.mul(dphi[T - 1], hbar[T - 1], out=u[T - 1])
        for t in range(T - 2, -1, -1):
            torch.mul(dphi[t], torch.addmm(hbar[t], u[t + 1], W_rec), out=u[t])
        dh0 = u[0] @ W_rec
    u2 = u.view(T * B, H)
    # dW_rec = sum_t u_t h_{t-1}^T: h_0 pairs with u_1, h_{1..T-1} with u_{2..T}
    dW_rec = u[0].T @ h0
    if T > 1:
        dW_rec = torch.addmm(dW_rec, u[1:].reshape((T - 1) * B, H).T, hs[:-1].reshape((T - 1) * B, H))
    grads = {
        "W_in": u2.T @ inputs.reshape(T * B, D),
        "W_rec": dW_rec,
        "b_rec": u2.sum(0),
    }
    return grads, u, dh0


def reward_grad(reward, hs: Tensor) -> tuple[Tensor, Tensor]:
    """``R(h_1..h_T)`` and ``dR/dh_t`` (T, B, H) by autograd on R alone (not the recurrence)."""
    with torch.enable_grad():
        h = hs.detach().requires_grad_(True)
        R = reward(h)
        if not isinstance(R, Tensor) or R.dim() != 0:
            shape = tuple(R.shape) if isinstance(R, Tensor) else type(R).__name__
            raise ValueError(f"reward must return a scalar tensor, got {shape}")
        (dR,) = torch.autograd.grad(R, h, allow_unused=True)
    if dR is None:
        dR = torch.zeros_like(hs)
    return R.detach(), dR


def bptt(*, sensitivities: bool = False) -> Algorithm:
    """Exact backpropagation through time.

    Args:
        sensitivities: also return the per-step sensitivities ``u_t = dL/db_rec(t)``
            as ``grads["u"]`` of shape (T, B, H).

    Online use: ``step`` stores the trajectory and emits nothing; ``flush`` runs the
    backward pass over everything since the last flush and cuts the state there.
    """

    def init(model, batch_size: int, *, h0: Tensor | None = None) -> BPTTState:
        p = model.W_rec
        track = h0 is not None
        if h0 is None:
            h0 = torch.zeros(batch_size, model.hidden_size, dtype=p.dtype, device=p.device)
        return BPTTState(h0, h0, track, [], [], [], [], [])

    def step(model, state: BPTTState, x_t: Tensor, target_t: Tensor | None = None, *,
             mask_t: Tensor | None = None, loss: str = "mse", dh_t: Tensor | None = None):
        with torch.no_grad():
            act = get_activation(model.activation)
            h, a, fa = cell_step(model.W_in, model.W_rec, model.b_rec, state.h, x_t,
                                 activation=act, alpha=model.alpha)
            z, value, dz = readout_step(model, h, target_t, mask_t, loss)
            if dz is None:
                dz = torch.zeros_like(z)
            hbar = dz @ model.W_out
            if dh_t is not None:
                hbar = hbar + dh_t
            state.xs.append(x_t)
            state.hs.append(h)
            state.dphi.append(act.deriv(a, fa))
            state.hbar.append(hbar)
            state.dz.append(dz)
        return state._replace(h=h), StepOutput(h, z, value), None

    def flush(model, state: BPTTState):
        if not state.xs:
            return state, None
        with torch.no_grad():
            hs = torch.stack(state.hs)
            T, B, H = hs.shape
            grads, u, dh0 = backward(model, torch.stack(state.xs), state.h_start, hs,
                                     torch.stack(state.dphi), torch.stack(state.hbar))
            dz = torch.stack(state.dz)
            grads.update(output_grads(dz.view(T * B, -1), hs.view(T * B, H)))
            if state.track_h0:
                grads["h0"] = dh0
            if sensitivities:
                grads["u"] = u
        h = state.h
        return BPTTState(h, h, False, [], [], [], [], []), grads

    def sequence(model, inputs, targets, mask, h0, loss, reward):
        T, B, _ = inputs.shape
        H, K = model.hidden_size, model.output_size
        with torch.no_grad():
            hs, dphi = unroll(model, inputs, h0)
            h2 = hs.view(T * B, H)
            if targets is not None:
                z = torch.addmm(model.b_out, h2, model.W_out.T).view(T, B, K)
                value, dz = loss_and_grad(z, targets, mask / B, loss=loss,
                                          readout_name=model.readout)
            else:
                value, dz = hs.new_zeros(()), hs.new_zeros(T, B, K)
            dz2 = dz.view(T * B, K)
            hbar = (dz2 @ model.W_out).view(T, B, H)
            if reward is not None:
                R, dR = reward_grad(reward, hs)
                value = value - R
                hbar = hbar - dR
            grads, u, dh0 = backward(model, inputs, h0, hs, dphi, hbar)
            grads.update(output_grads(dz2, h2))
            grads["h0"] = dh0
            if sensitivities:
                grads["u"] = u
        return value, grads

    return Algorithm(
        name="bptt(sensitivities=True)" if sensitivities else "bptt()",
        init=init,
        step=step,
        flush=flush,
        exact=True,
        online=False,
        cost="time O(B H (D + H)) per step; memory O(T B (D + H)), grows with T",
        sequence=sequence,
    )
