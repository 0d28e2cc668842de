"""SnAp-1: the sparse n-step approximation of RTRL with n = 1 (Menick, Elsen, Evci,
Osindero, Simonyan & Graves 2021, "Practical real time recurrent learning with a sparse
approximation", ICLR).

RTRL's influence ``M_t[k, i, j] = dh_t^k / dtheta_ij`` obeys
``M_t = J_t M_{t-1} + Mbar_t`` with ``J_t = (1 - alpha) I + alpha diag(phi'(a_t)) W_rec``
and ``Mbar_t[k, i, j] = delta_ki alpha phi'(a_t^i) pre_t^j``. SnAp-1 keeps M only on
the sparsity pattern of ``Mbar`` (k = i: a parameter's influence on its own unit),
so only the diagonal of ``J_t``, the self-recurrence ``W_rec[i, i]`` included, acts::

    pre_t   = [h_{t-1}; x_t; 1]
    Jd_t^i  = (1 - alpha) + alpha phi'(a_t^i) W_rec[i, i]
    M_t[i,j] = Jd_t^i M_{t-1}[i,j] + alpha phi'(a_t^i) pre_t^j
             (alpha = 1: phi'(a_t^i) (W_rec[i, i] M_{t-1}[i,j] + pre_t^j))
    q_t     = W_out^T dl_t/dz_t  (+ dl_t/dh_t of a reward)      exact immediate signal
    grad[i,j] = sum_t q_t^i M_t[i,j]     over [W_rec | W_in | b_rec]

and the exact gradient for ``W_out``, ``b_out``. Where ``W_rec`` is diagonal, ``J_t`` is
diagonal, the dropped entries are zero, and SnAp-1 equals RTRL. Compared with e-prop,
SnAp-1 keeps ``alpha phi' W_rec[i, i]`` in the self-path and uses the exact signal.

On ``rnngrad.RNN`` M is updated in place, two passes (the row scaling by Jd_t, then the
outer product by ``baddbmm_``), and contracted by one batched GEMV over the units; above
8 MiB block by block of rows, so that the second and third pass read from cache.

Approximate. Online. Cost per step for dense ``W_rec``: time O(B H (H + D + K)),
memory O(B H (H + D + 1)), constant in T.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import _sequence as _seq
from . import _traces_network as _net
from ._network import check_network, is_rnn
from ._online import (
    Work,
    emit,
    forward,
    learning_signal,
    rows_of,
    update_and_contract,
    workspace,
)
from .base import Algorithm, StepOutput

__all__ = ["snap1", "SnapState"]


class SnapState(NamedTuple):
    h: Tensor  # (B, H) h_t
    M: Tensor  # (B, H, P) M_t[b, i, j] = dh_t^i / dtheta_ij (the kept entries)
    c: Tensor | None  # (B, H) dh_t^i / dh_0^i (same sparsity); None unless h0 is tracked
    work: Work | None = None  # buffers reused by every step (rnngrad.RNN only)


def snap1() -> Algorithm:
    """SnAp-1 (Menick et al. 2021): RTRL restricted to each unit's own parameters.

    With ``init(model, B, h0=h0)`` it emits ``grads["h0"] = sum_t q_t * c_t`` with
    ``c_t = Jd_t c_{t-1}``, ``c_0 = 1``: the same diagonal approximation of
    ``dh_t/dh_0``.

    Any ``rnngrad.Network`` whose parameters are owned by units (GRU, LSTM, stacks, a
    user's cell): Menick et al.'s pattern, unit i's state components for the parameters
    unit i owns, through the cell's ``local_jacobian`` (``_traces_network``).
    """

    def init(model, batch_size: int, *, h0: Tensor | None = None) -> SnapState:
        if not is_rnn(model):
            check_network(model, "snap1()")
            _net.check_owned(model, "snap1()")
            return _net.init(model, batch_size, h0, None, ("local",) * model.num_layers)
        p = model.W_rec
        H, D = model.hidden_size, model.input_size
        kw = {"dtype": p.dtype, "device": p.device}
        h = torch.zeros(batch_size, H, **kw) if h0 is None else h0
        M = torch.zeros(batch_size, H, H + D + 1, **kw)
        c = None if h0 is None else torch.ones(batch_size, H, **kw)
        return SnapState(h, M, c, workspace(model, batch_size))

    def step(model, state: SnapState, x_t: Tensor, target_t: Tensor | None = None, *,
             mask_t: Tensor | None = None, loss: str = "mse", dh_t: Tensor | None = None):
        if not is_rnn(model):
            return _net.step(model, "local", state, x_t, target_t, mask_t, loss, dh_t)
        alpha = model.alpha
        with torch.no_grad():
            f = forward(model, state.h, x_t, target_t, mask_t, loss, state.work)
            d = f.dphi if alpha == 1.0 else f.dphi * alpha
            Jd = d * model.W_rec.diagonal()  # alpha phi'(a_t^i) W_rec[i, i]
            if alpha != 1.0:
                Jd = Jd.add_(1.0 - alpha)
            c = None if state.c is None else state.c * Jd
            q = learning_signal(f.dz, model.W_out, dh_t)
            Jd3, d3, pre3 = Jd.unsqueeze(2), d.unsqueeze(2), f.pre.unsqueeze(1)

            def update(X, rows):
                # M_t = Jd_t M_{t-1} + (alpha phi'(a_t)) pre_t^T, in place; the row scaling
                # differs per example and unit, so it is a pass of its own (over a cached block)
                if torch.compiler.is_compiling() and rows is None and X.shape[0] > 1:
                    # rnngrad.compile: one fused in-place pass (inductor leaves baddbmm_ an
                    # extern call into a new buffer, copied back); at B = 1 and for a blocked
                    # trace the extern call measured faster (benchmarks/compiled_step.md)
                    X.mul_(Jd3).addcmul_(d3, pre3)
                    return
                X.mul_(rows_of(Jd3, rows)).baddbmm_(rows_of(d3, rows), pre3)

            G = update_and_contract(state.M, update, q)  # sum_b q_t^i M_t[i, j]
            grads = emit(model, f, G)
            if grads is not None and c is not None:
                grads["h0"] = q * c if q is not None else torch.zeros_like(f.h)
        return state._replace(h=f.h, c=c), StepOutput(f.h, f.z, f.loss), grads

    def flush(model, state: SnapState):
        return state, None

    def sequence(model, inputs, targets, mask, h0, loss, reward):
        # the adjoint of the traces' recursion (_sequence): the same sum, at BPTT's cost
        if not is_rnn(model):
            check_network(model, "snap1()")
            _net.check_owned(model, "snap1()")
        return _seq.sequence(model, ("local",) * model.num_layers, None, inputs, targets, mask,
                             h0, loss, reward)

    return Algorithm(
        name="snap1()",
        init=init,
        step=step,
        flush=flush,
        exact=False,
        online=True,
        cost="time O(B H (H + D + K)) per step; memory O(B H (H + D + 1)); per sequence "
             "(rnngrad.gradient): BPTT's shape, no trace formed",
        sequence=sequence,
    )
