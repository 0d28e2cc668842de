"""e-prop (Bellec et al. 2020, "A solution to the learning dilemma for recurrent networks
of spiking neurons", Nat. Commun. 11:3625), for the rate cells of DESIGN.md.

The classical factorization (Bellec et al. 2020) writes the gradient as
``dL/dtheta = sum_t dL/dh_t . dh_t/dtheta``; e-prop replaces the total ``dL/dh_t`` by
the immediate learning signal and keeps, of the influence ``dh_t/dtheta``, only the
path through each unit's own state (the leak), not through ``W_rec``::

    pre_t        = [h_{t-1}; x_t; 1]                                  (P = H + D + 1)
    trace_t[i,j] = (1 - alpha) trace_{t-1}[i,j] + alpha phi'(a_t^i) pre_t^j
    L_t          = B dl_t/dz_t  (+ dl_t/dh_t of a reward)             (H,)
    grad[i,j]    = sum_t L_t^i trace_t[i,j]      over [W_rec | W_in | b_rec]

with ``B = W_out^T`` ("symmetric": then ``L_t = dl_t/dh_t`` exactly) or a fixed random
matrix ("random": Bellec's random e-prop). ``W_out`` and ``b_out`` get their exact
gradient ``sum_t dl_t/dz_t h_t^T``.

Equivalently, e-prop is the exact gradient of the loss in the graph where ``h_{t-1}``
is cut where it enters ``a_t`` through ``W_rec`` (Bellec's stop-gradient), while the
leak ``(1 - alpha) h_{t-1}`` keeps its path. For ``alpha = 1`` the trace is the
immediate ``phi'(a_t) pre_t^T`` and e-prop is truncated BPTT with k = 1.

Storage: for alpha = 1 the trace is never formed: the step's gradient is one GEMM
``(L_t * phi'(a_t))^T pre_t`` over the batch. For alpha < 1 the low-pass filter of
``phi'(a_s^i) pre_s^j`` over s does not factor (phi' changes with s), so the trace is
kept whole, (B, H, P). On ``rnngrad.RNN`` a step touches it twice: the update in
place, one batched outer product accumulated with beta = 1 - alpha (``baddbmm_``), and
the contraction, one batched GEMV over the units (``_online.update_and_contract``; above
8 MiB block by block of rows, each contracted while in cache). ``pre_t`` lives in the
state's workspace; nothing of the trace's size is allocated per step.

Approximate (exact only where noted above). Online. Cost per step: time O(B H P),
memory O(B H P) (alpha < 1) or O(B P) (alpha = 1), constant in T.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from . import _sequence as _seq
from . import _traces_network as _net
from ._network import check_network, is_rnn
from ._online import (
    Work,
    check_seed,
    emit,
    forward,
    learning_signal,
    rows_of,
    update_and_contract,
    workspace,
)
from .base import Algorithm, StepOutput

__all__ = ["eprop", "EpropState", "FEEDBACKS"]

FEEDBACKS = ("symmetric", "random")


class EpropState(NamedTuple):
    h: Tensor  # (B, H) h_t
    trace: Tensor | None  # (B, H, P) e_t; None for alpha = 1 (never formed)
    feedback: Tensor | None  # (K, H) fixed random B^T; None: symmetric (the current W_out)
    c: float | None  # (1 - alpha)^t = dh_t/dh_0 along the leak; None unless h0 is tracked
    work: Work | None = None  # buffers reused by every step (rnngrad.RNN only)


def random_feedback(model, seed: int) -> Tensor:
    """A fixed (K, H) feedback matrix, drawn like ``W_out``: U(-1/sqrt(H), 1/sqrt(H)).

    Drawn on the CPU in float64 from ``seed`` and then cast, so the same seed gives the
    same matrix on every device and dtype.
    """
    K, H = model.W_out.shape
    g = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(H)
    Bt = torch.empty(K, H, dtype=torch.float64).uniform_(-bound, bound, generator=g)
    return Bt.to(dtype=model.W_out.dtype, device=model.W_out.device)


def trace_rule(name: str, feedback: str, seed: int, *, cost_note: str = "",
               cells: tuple | None = None) -> Algorithm:
    """The eligibility-trace rule shared by e-prop and RFLO (they differ in the default
    feedback and in the paper). ``cells``: the cell classes the rule is defined for
    (None: any cell whose parameters are owned by units)."""
    if feedback not in FEEDBACKS:
        raise ValueError(f"feedback must be one of {', '.join(map(repr, FEEDBACKS))}, "
                         f"got {feedback!r}")
    check_seed(seed)

    def check(model) -> Tensor | None:
        """Refuse a model the rule is not defined for; the feedback matrix (None: W_out)."""
        if not is_rnn(model):
            check_network(model, f"{name}()")
            if cells is not None:
                other = [type(c).__name__ for _, c in model.layers() if not isinstance(c, cells)]
                if other:
                    raise ValueError(
                        f"{name}() is defined for the Elman form phi(W_in x + W_rec h + b): "
                        f"rnngrad.RNN or a Network of {', '.join(c.__name__ for c in cells)} "
                        f"layers; got cells {', '.join(other)}. eprop() and snap1() take any "
                        "cell")
            _net.check_owned(model, f"{name}()")
        return random_feedback(model, seed) if feedback == "random" else None

    def init(model, batch_size: int, *, h0: Tensor | None = None) -> EpropState:
        if not is_rnn(model):
            fb = check(model)
            return _net.init(model, batch_size, h0, fb, ("eligibility",) * model.num_layers)
        p = model.W_rec
        H, D = model.hidden_size, model.input_size
        h = (torch.zeros(batch_size, H, dtype=p.dtype, device=p.device) if h0 is None
             else h0)
        trace = None
        if model.alpha != 1.0:
            trace = torch.zeros(batch_size, H, H + D + 1, dtype=p.dtype, device=p.device)
        fb = random_feedback(model, seed) if feedback == "random" else None
        return EpropState(h, trace, fb, None if h0 is None else 1.0, workspace(model, batch_size))

    def step(model, state: EpropState, x_t: Tensor, target_t: Tensor | None = None, *,
             mask_t: Tensor | None = None, loss: str = "mse", dh_t: Tensor | None = None):
        if not is_rnn(model):
            return _net.step(model, "eligibility", state, x_t, target_t, mask_t, loss, dh_t)
        alpha = model.alpha
        with torch.no_grad():
            f = forward(model, state.h, x_t, target_t, mask_t, loss, state.work)
            fb = model.W_out if state.feedback is None else state.feedback
            L = learning_signal(f.dz, fb, dh_t)
            trace = state.trace
            G = None
            if trace is not None:
                d3, pre3 = f.dphi.unsqueeze(2), f.pre.unsqueeze(1)

                def update(X, rows):
                    # trace_t = (1 - alpha) trace_{t-1} + (alpha phi'(a_t)) pre_t^T, in place: a
                    # batched outer product accumulated with beta, one pass over the trace
                    if torch.compiler.is_compiling() and rows is None and X.shape[0] > 1:
                        # rnngrad.compile: one fused pass, as in snap1()
                        X.mul_(1.0 - alpha).addcmul_(d3, pre3, value=alpha)
                        return
                    X.baddbmm_(rows_of(d3, rows), pre3, beta=1.0 - alpha, alpha=alpha)

                G = update_and_contract(trace, update, L)  # sum_b L_t^i trace_t[i, j]
            elif L is not None:
                G = (L * f.dphi).T @ f.pre  # sum_b L_t^i phi'(a_t^i) pre_t^j: one GEMM
            c = None if state.c is None else state.c * (1.0 - alpha)
            grads = emit(model, f, G)
            if grads is not None and c is not None:
                grads["h0"] = L * c if L is not None else torch.zeros_like(f.h)
        return state._replace(h=f.h, trace=trace, c=c), StepOutput(f.h, f.z, f.loss), grads

    def flush(model, state: EpropState):
        return state, None

    def sequence(model, inputs, targets, mask, h0, loss, reward):
        # the adjoint of the traces' recursion (_sequence): the same sum, at BPTT's cost
        fb = check(model)
        return _seq.sequence(model, ("eligibility",) * model.num_layers, fb, inputs, targets,
                             mask, h0, loss, reward)

    mem = "O(B H (H + D + 1)) for alpha < 1, O(B (H + D)) for alpha = 1"
    return Algorithm(
        name=f"{name}(feedback={feedback!r}, seed={seed})" if feedback == "random"
        else f"{name}(feedback={feedback!r})",
        init=init,
        step=step,
        flush=flush,
        exact=False,
        online=True,
        cost=f"time O(B H (H + D + K)) per step; memory {mem}{cost_note}; per sequence "
             "(rnngrad.gradient): BPTT's shape, no trace formed",
        sequence=sequence,
    )


def eprop(feedback: str = "symmetric", *, seed: int = 0) -> Algorithm:
    """e-prop (Bellec et al. 2020): eligibility traces times a learning signal.

    Args:
        feedback: "symmetric" (learning signal through ``W_out^T``) or "random" (through a
            fixed random matrix drawn like ``W_out``; Bellec's random e-prop).
        seed: seeds the random feedback matrix (ignored for "symmetric").

    With ``init(model, B, h0=h0)`` it emits ``grads["h0"] = sum_t (1 - alpha)^t L_t``, the
    same approximation (the leak path only) applied to the initial state.

    Any ``rnngrad.Network`` whose parameters are owned by units: traces through each
    cell's ``eligibility_jacobian`` (Bellec et al.'s forms for the built-in cells, e.g.
    the LSTM's ``eps_t = f_t eps_{t-1} + dc_t/dtheta``; for a user's cell without one,
    the per-unit block of the state Jacobian), the top layer's learning signal passed
    down the stack within each step (``_traces_network``).
    """
    return trace_rule("eprop", feedback, seed)
