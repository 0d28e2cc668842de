"""Truncated backpropagation through time, streaming (Williams & Peng 1990; Werbos 1990).

The sequence is cut into chunks ``C_1 = [1..k], C_2 = [k+1..2k], ...``. The hidden
state is carried across chunks (the forward pass is the true one) but is a constant
for the gradient at each boundary, so each chunk runs BPTT (each cell's
``backward_sequence``; for Elman, below) on its own, from ``u_{end+1} = 0``::

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

from torch import Tensor

from . import _bptt_network as _net
from ._bptt_network import NetBPTTState
from .base import Algorithm
from .bptt import bptt

__all__ = ["tbptt", "TBPTTState"]


class TBPTTState(NamedTuple):
    h: tuple  # the network's state s_t, one state per layer (RNN: its (B, H) h_t)
    chunk: NetBPTTState  # the pending chunk (fewer than k steps), as BPTT stores it


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
        # BPTT's own step and flush, unchecked: this step's validation covers the chunk (and
        # a compiled step hands the chunk rebuilt, see _compile_io)
        chunk, out, _ = _net.step(model, None, state.chunk, x_t, target_t, mask_t, loss, dh_t)
        grads = None
        if len(chunk.xs) == k:
            chunk, grads = _net.flush(model, None, chunk)  # cuts the state: h_start := h_t
        return TBPTTState(chunk.h, chunk), out, grads

    def flush(model, state: TBPTTState):
        chunk, grads = inner.flush(model, state.chunk)
        return TBPTTState(chunk.h, chunk), grads

    def sequence(model, inputs, targets, mask, h0, loss, reward):
        return _net.truncated_sequence(model, k, inputs, targets, mask, h0, loss, reward)

    step.__rnngrad_compile_io__ = _compile_io(k)

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


_PENDING = ("xs", "dz", "dh", "steps")  # the chunk's lists that grow by one entry a step


def _compile_io(k: int):
    """The ``(before, after)`` pair ``rnngrad.compile`` runs around a compiled step: a step
    that only stores (fewer than k - 1 steps pending) is handed the chunk with its pending
    lists empty, and ``after`` appends the one entry it stored to the lists kept outside the
    graph; the step that emits (k - 1 pending) is handed the chunk whole. The compiled step
    so sees two list lengths, 0 and k - 1, at every position: two graphs, whatever k. The
    numbers are the eager step's."""

    def before(state):
        chunk = state.chunk if isinstance(state, TBPTTState) else None
        if not isinstance(chunk, NetBPTTState) or len(chunk.xs) >= k - 1:
            return state, None  # the emitting step (or a state the step itself refuses)
        kept = {f: getattr(chunk, f) for f in _PENDING if getattr(chunk, f) is not None}
        if any(len(v) != len(chunk.xs) for v in kept.values()):
            return state, None
        # what a storing step does not read, kept out too: h_start and the checkpoint are h
        # itself at a chunk's first step and not after (another graph, for the aliasing), so
        # handed as h at every step (a fresh chunk's layout); track_h0 is True in the first
        # chunk only (with h0 given)
        handed = {f: [] for f in kept}
        kept.update(h_start=chunk.h_start, ckpt=chunk.ckpt, track_h0=chunk.track_h0)
        handed.update(h_start=chunk.h, ckpt=[chunk.h], track_h0=False)
        return state._replace(chunk=chunk._replace(**handed)), kept

    def after(new, ctx):
        if ctx is None:
            return new
        chunk = new.chunk
        for f in _PENDING:  # in place, as the eager step appends
            if f in ctx:
                ctx[f].extend(getattr(chunk, f))
        return new._replace(chunk=chunk._replace(**ctx))

    return before, after
