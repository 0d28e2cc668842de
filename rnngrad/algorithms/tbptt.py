"""Truncated backpropagation through time, streaming (Williams & Peng 1990; Werbos 1990).

The sequence is cut into chunks ``C_1 = [1..k], C_2 = [k+1..2k], ...``. The hidden
state is carried across chunks (the forward pass is the true one) but is a constant
for the gradient at each boundary, so each chunk runs BPTT (``bptt.backward``) on
its own, from ``u_{end+1} = 0``::

    hbar_t  = W_out^T dl/dz_t (+ dh_t)
    delta_t = hbar_t + W_rec^T u_{t+1} + (1 - alpha) delta_{t+1}    for t in the chunk
    u_t     = alpha phi'(a_t) * delta_t
    g_chunk = sum_{t in chunk} (u_t x_t^T, u_t h_{t-1}^T, u_t)     emitted at the chunk's end

Summed over the chunks this is the gradient of autograd through the loop with the
state detached every k steps. ``tbptt(k)`` with ``k >= T`` is BPTT.

``grads["h0"]`` (when ``init`` got h0) is emitted with the first chunk only: later
chunks start from a detached state, so h0 reaches only the first chunk's losses.
A reward's ``dR/dh_t`` (``dh_t``) enters as an immediate term at its step only.

Exact only for k >= T. Online: memory O(k B (D + H)), time O(B H (D + H)) per step,
one gradient every k steps (the remainder at ``flush``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..cells.elman import unroll
from ..readouts import loss_and_grad, reward_grad
from . import _bptt_network as _net
from ._network import is_rnn
from .base import Algorithm, Grads, add_grads, output_grads
from .bptt import BPTTState, backward, bptt

__all__ = ["tbptt", "TBPTTState"]


class TBPTTState(NamedTuple):
    h: Tensor  # (B, H) h_t (for a Network: its state, one per layer)
    chunk: BPTTState  # the pending chunk (fewer than k steps), as BPTT stores it


def tbptt(k: int) -> Algorithm:
    """Truncated BPTT with chunks of k steps.

    Args:
        k: the truncation length, an int >= 1.

    ``step`` emits one gradient every k steps (of the chunk just finished) and None
    otherwise; ``flush`` emits the last, shorter chunk.
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"tbptt needs a truncation length k, an int >= 1, got {k!r}")
    inner = bptt()

    def init(model, batch_size: int, *, h0=None) -> TBPTTState:
        chunk = inner.init(model, batch_size, h0=h0)
        return TBPTTState(chunk.h, chunk)

    def step(model, state: TBPTTState, x_t: Tensor, target_t: Tensor | None = None, *,
             mask_t: Tensor | None = None, loss: str = "mse", dh_t: Tensor | None = None):
        chunk, out, _ = inner.step(model, state.chunk, x_t, target_t, mask_t=mask_t, loss=loss,
                                   dh_t=dh_t)
        grads = None
        if len(chunk.xs) == k:
            chunk, grads = inner.flush(model, chunk)  # cuts the state: h_start := h_t
        return TBPTTState(chunk.h, chunk), out, grads

    def flush(model, state: TBPTTState):
        chunk, grads = inner.flush(model, state.chunk)
        return TBPTTState(chunk.h, chunk), grads

    def sequence(model, inputs, targets, mask, h0, loss, reward):
        if not is_rnn(model):
            return _net.truncated_sequence(model, k, inputs, targets, mask, h0, loss, reward)
        T, B, _ = inputs.shape
        H, K = model.hidden_size, model.output_size
        with torch.no_grad():
            value = inputs.new_zeros(())
            dh = None
            if reward is not None:  # R needs the whole trajectory: dR/dh_t for every t
                hs_all, _ = unroll(model, inputs, h0, need_deriv=False)
                R, dR = reward_grad(reward, hs_all)
                value = value - R
                dh = -dR
            total: Grads | None = None
            h = h0
            for s in range(0, T, k):
                e = min(s + k, T)
                x = inputs[s:e]
                n = e - s
                hs, dphi = unroll(model, x, h)
                h2 = hs.view(n * B, H)
                if targets is not None:
                    z = torch.addmm(model.b_out, h2, model.W_out.T).view(n, B, K)
                    v, dz = loss_and_grad(z, targets[s:e], mask[s:e] / B, loss=loss,
                                          readout_name=model.readout)
                    value = value + v
                else:
                    dz = hs.new_zeros(n, B, K)
                dz2 = dz.view(n * B, K)
                hbar = (dz2 @ model.W_out).view(n, B, H)
                if dh is not None:
                    hbar = hbar + dh[s:e]
                grads, _, dh0 = backward(model, x, h, hs, dphi, hbar)
                grads.update(output_grads(dz2, h2))
                if s == 0:
                    grads["h0"] = dh0
                total = add_grads(total, grads)
                h = hs[-1].clone()  # a view would keep the chunk alive
        return value, total

    return Algorithm(
        name=f"tbptt(k={k})",
        init=init,
        step=step,
        flush=flush,
        exact=False,
        online=True,
        cost=f"time O(B H (D + H)) per step; memory O(k B (D + H)) with k={k}, constant in T",
        sequence=sequence,
    )
