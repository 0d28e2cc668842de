"""Backpropagation through time, written out by hand (Werbos 1990).

Forward (DESIGN.md's notation)::

    a_t = W_in x_t + W_rec h_{t-1} + b_rec,  h_t = (1 - alpha) h_{t-1} + alpha phi(a_t)
    z_t = W_out h_t + b_out

Backward, from ``u_{T+1} = 0`` and ``delta_{T+1} = 0``::

    hbar_t  = W_out^T dl/dz_t (+ dl/dh_t from a reward)       immediate term
    delta_t = hbar_t + W_rec^T u_{t+1} + (1 - alpha) delta_{t+1}   dL/dh_t, total
    u_t     = alpha phi'(a_t) * delta_t                         dL/da_t = dL/db_rec(t)

    dW_rec = sum_t u_t h_{t-1}^T,  dW_in = sum_t u_t x_t^T,  db_rec = sum_t u_t
    dW_out = sum_t dl/dz_t h_t^T,  db_out = sum_t dl/dz_t
    dh_0   = W_rec^T u_1 + (1 - alpha) delta_1                  (initial state)

For alpha = 1 this is recurrent backprop's (Almeida 1987; Pineda 1987)
``x^(t) = W^T u(t+1) + dR/dx(t)``, ``u(t) = D(t) x^(t)``.
``u_t`` is the sensitivity of the loss to the bias at step t (the sensitivity
lemma, ``dL/dW_rec = sum_t u_t h_{t-1}^T``); ``bptt(sensitivities=True)`` returns it
as ``grads["u"]`` (T, B, H).

Only the u recursion is sequential (one (B, H) x (H, H) GEMM per step); every weight
gradient is then one GEMM over the stacked (T*B) rows.

Exact. Not online: memory O(T B (D + H)), time O(T B H (D + H)) per sequence.

Every model is an ``rnngrad.Network`` (``rnngrad.RNN`` is one Elman layer under flat
names): the pass above is the Elman cell's own ``backward_sequence``, and each layer of
any other cell runs its own (``_bptt_network``). ``sensitivities=True`` works on any
network whose cells give u_t (``gives_sensitivities``: Elman); for a stack ``grads["u"]``
is a tuple, one (T, B, H_l) per layer, bottom first.

Checkpointing (``bptt(checkpoint=c)``; Chen et al. 2016, "Training deep nets with
sublinear memory cost"): keep h only at ``t = 0, c, 2c, ...``, and in the backward
pass recompute each segment's h_t and phi'(a_t) from its checkpoint; the adjoint
``dL/dh`` at a segment's start (this pass's ``dh_0``) is the immediate term added
at the previous segment's last step. Same gradient, memory O((T/c + c) B H) for
the states.
"""

from __future__ import annotations

from ..cells.elman import backward
from . import _bptt_network as _net
from ._network import Workspace, check_sensitivities
from .base import Algorithm

__all__ = ["bptt", "checkpointed_bptt", "backward"]


def bptt(*, sensitivities: bool = False, checkpoint: int | None = None) -> Algorithm:
    """Exact backpropagation through time.

    Args:
        sensitivities: also return the per-step sensitivities ``u_t = dL/db_rec(t)``
            as ``grads["u"]`` of shape (T, B, H) (a tuple of them, one per layer, for a
            stack); the cells must give them (Elman does).
        checkpoint: None stores the whole trajectory. An int c >= 1 keeps the state
            only every c steps and recomputes each segment of c steps during the
            backward pass (see ``checkpointed_bptt``): exact, with memory
            O((T/c + c) B H + T B (D + K)) instead of O(T B (D + H)); c ~ sqrt(T)
            minimises it. The price is one more forward pass.

    Online use: ``step`` stores the trajectory and emits nothing; ``flush`` runs the
    backward pass over everything since the last flush and cuts the state there.
    """
    if checkpoint is not None:
        return checkpointed_bptt(checkpoint, sensitivities=sensitivities)
    return _algorithm(None, sensitivities)


def checkpointed_bptt(c: int, *, sensitivities: bool = False) -> Algorithm:
    """Exact BPTT that stores the state only every c steps and recomputes segments backward.

    Forward: s_0, s_c, s_2c, ... are kept (T/c states), with the inputs and dl/dz_t
    (the readout gradients dW_out, db_out accumulate on the fly). Backward, from the
    last segment to the first: rerun the segment's forward pass from its checkpoint,
    run the cells' backward pass on it with the adjoint of the later segments as its
    ``d_state``, and drop it. Peak memory O((T/c + c) B H) for the states plus
    O(T B (D + K)) for inputs and dl/dz (the caller holds the inputs anyway); with a
    reward, ``dR/dh_t`` (T, B, H) is also kept, since R is a function of the whole
    trajectory.

    Also ``bptt(checkpoint=c)``. Use via ``rnngrad.gradient`` (the sequence path) or
    init/step/flush (the step path stores x_t, dl/dz_t and every c-th state).
    """
    if not isinstance(c, int) or isinstance(c, bool) or c < 1:
        raise ValueError(f"checkpoint must be an int c >= 1 (store h every c steps) or None, "
                         f"got {c!r}")
    return _algorithm(c, sensitivities)


def _algorithm(c: int | None, sensitivities: bool) -> Algorithm:
    who = "bptt(sensitivities=True)"
    # buffers kept between this algorithm object's calls, per thread (see Workspace)
    workspace = Workspace()

    def init(model, batch_size: int, *, h0=None):
        if sensitivities:
            check_sensitivities(model, who)
        return _net.init(model, batch_size, h0, keep=c is None, sensitivities=sensitivities)

    def step(model, state, x_t, target_t=None, *, mask_t=None, loss="mse", dh_t=None):
        return _net.step(model, c, state, x_t, target_t, mask_t, loss, dh_t)

    def flush(model, state):
        return _net.flush(model, c, state)

    def sequence(model, inputs, targets, mask, h0, loss, reward):
        if sensitivities:
            check_sensitivities(model, who)
        return _net.sequence(model, c, inputs, targets, mask, h0, loss, reward,
                             sensitivities=sensitivities, workspace=workspace)

    flags = ([f"checkpoint={c}"] if c is not None else []) + \
        (["sensitivities=True"] if sensitivities else [])
    if c is None:
        cost = "time O(B H (D + H)) per step; memory O(T B (D + H)), grows with T"
    else:
        cost = (f"time O(B H (D + H)) per step plus one recomputed forward; memory "
                f"O((T/c + c) B H + T B (D + K)) with c={c}")
    return Algorithm(
        name=f"bptt({', '.join(flags)})",
        init=init,
        step=step,
        flush=flush,
        exact=True,
        online=False,
        cost=cost,
        sequence=sequence,
    )
