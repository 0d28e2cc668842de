"""RFLO: random-feedback local online learning (Murray 2019, "Local online learning in
recurrent networks with random feedback", eLife 8:e43299).

Murray's rule for the leaky rate network ``h_t = (1 - alpha) h_{t-1} + alpha phi(a_t)``::

    pre_t     = [h_{t-1}; x_t; 1]
    J_t[i,j]  = (1 - alpha) J_{t-1}[i,j] + alpha phi'(a_t^i) pre_t^j     (the trace; Murray's p)
    L_t       = B dl_t/dz_t            B: a fixed random (H, K) matrix
    grad[i,j] = sum_t L_t^i J_t[i,j]     over [W_rec | W_in | b_rec]

and the exact gradient for ``W_out``, ``b_out``. It keeps of the influence
``dh_t/dtheta`` only the leak path ``(1 - alpha)`` of each unit's own state, which is
the same truncation as e-prop: RFLO is e-prop with random feedback (Marschall et al.
2020 make the same identification), and ``rflo(feedback="symmetric")`` equals
``eprop()`` exactly. The implementation is shared (``eprop.trace_rule``).

Approximate. Online. Cost per step: time O(B H (H + D + K)); memory O(B H (H + D + 1))
for alpha < 1 (the trace), O(B (H + D)) for alpha = 1 (never formed).
"""

from __future__ import annotations

from .base import Algorithm
from .eprop import trace_rule

__all__ = ["rflo"]


def rflo(feedback: str = "random", *, seed: int = 0) -> Algorithm:
    """RFLO (Murray 2019): eligibility traces with random feedback.

    Args:
        feedback: "random" (default: Murray's fixed random B, drawn like ``W_out``) or
            "symmetric" (``W_out^T``; then identical to ``eprop()``).
        seed: seeds the random feedback matrix.

    Defined for the Elman form: ``rnngrad.RNN``, or an ``rnngrad.Network`` of
    ``rnngrad.cells.Elman`` layers (the top layer's signal passed down within each
    step); any other cell raises.
    """
    from ..cells.elman import Elman

    return trace_rule("rflo", feedback, seed, cells=(Elman,))
