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

Storage (``_traces_network``, for every cell; ``rnngrad.RNN`` is the one-Elman-layer
network): the Elman cell declares its eligibility Jacobian the constant ``1 - alpha``
(``eligibility_decay``). For alpha = 1 the trace is then its immediate term, never
formed: the step's gradient is one GEMM per parameter, ``(L_t * phi'(a_t))^T x_t`` (and
``h_{t-1}``, 1) over the batch. For alpha < 1 the low-pass filter of
``alpha phi'(a_s^i) pre_s^j`` over s does not factor (phi' changes with s: unlike a LIF
neuron's membrane, whose immediate term is the presynaptic vector alone, the filtered
trace is not one (B, P) vector shared by the units), so the trace is kept whole,
(B, H, P), the three parameters side by side in one tensor. A step touches it twice: the
update in place, one batched outer product accumulated with beta = 1 - alpha
(``baddbmm_``), and the contraction, one batched GEMV over the units (above 8 MiB block
by block of rows, each contracted while in cache).

State (decided when the RNN branch went): ``init`` returns the engine's ``NetTraceState``
on every model. On ``rnngrad.RNN`` ``state.h`` is still the (B, H) tensor h_t and
``grads["h0"]`` a (B, H) tensor; the trace, once ``EpropState.trace`` (B, H, P) over
``[W_rec | W_in | b_rec]``, is ``state.traces[0]``: a dict ``W_in``, ``W_rec``, ``b_rec``
-> (B, 1, 1, H, P_p), views of one (B, 1, 1, H, D + H + 1) tensor over
``[W_in | W_rec | b_rec]`` (``state.groups``), and empty for alpha = 1.

Approximate (exact only where noted above). Online. Cost per step: time O(B H P),
memory O(B H P) (alpha < 1) or O(B P) (alpha = 1), constant in T.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _sequence as _seq
from . import _traces_network as _net
from ._network import check_network
from ._online import check_seed
from .base import Algorithm

__all__ = ["eprop", "FEEDBACKS"]

FEEDBACKS = ("symmetric", "random")


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

    def init(model, batch_size: int, *, h0=None) -> _net.NetTraceState:
        fb = check(model)
        return _net.init(model, batch_size, h0, fb, ("eligibility",) * model.num_layers)

    def step(model, state: _net.NetTraceState, x_t: Tensor, target_t: Tensor | None = None, *,
             mask_t: Tensor | None = None, loss: str = "mse", dh_t: Tensor | None = None):
        return _net.step(model, "eligibility", state, x_t, target_t, mask_t, loss, dh_t)

    def flush(model, state: _net.NetTraceState):
        return state, None

    def sequence(model, inputs, targets, mask, h0, loss, reward):
        # the adjoint of the traces' recursion (_sequence): the same sum, at BPTT's cost
        fb = check(model)
        return _seq.sequence(model, ("eligibility",) * model.num_layers, fb, inputs, targets,
                             mask, h0, loss, reward)

    mem = ("O(B H (H + D + 1)) for alpha < 1, O(B (H + D)) for alpha = 1 (Elman; any cell: "
           "O(B C |owned parameters|), none where it declares a zero eligibility_decay)")
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
