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

__all__ = ["Forward", "Work", "workspace", "forward", "row_blocks", "rows_of", "update_and_contract",
           "learning_signal",
           "split_theta", "emit", "generator_for", "random_signs", "check_seed"]


class Forward(NamedTuple):
    h: Tensor  # (B, H) h_t, a new tensor (the caller keeps it)
    dphi: Tensor  # (B, H) phi'(a_t); alpha phi'(a_t) is the diagonal of Mbar_t (and of dh_t/da_t)
    pre: Tensor  # (B, P) [h_{t-1}; x_t; 1], written into the state's workspace
    z: Tensor  # (B, K) z_t
    loss: Tensor  # () this step's loss
    dz: Tensor | None  # (B, K) dl_t/dz_t weighted by mask/B; None without a target


class Work(NamedTuple):
    """Buffers a rule's state keeps so that its steps allocate nothing of their size."""

    pre: Tensor  # (B, P) pre_t = [h_{t-1}; x_t; 1], rewritten every step
    ones: Tensor  # (B, 1) the constant column of pre_t


def workspace(model, batch_size: int) -> Work:
    p = model.W_rec
    P = model.hidden_size + model.input_size + 1
    kw = {"dtype": p.dtype, "device": p.device}
    return Work(torch.empty(batch_size, P, **kw), torch.ones(batch_size, 1, **kw))


def forward(model, h_prev: Tensor, x_t: Tensor, target_t, mask_t, loss: str,
            work: Work) -> Forward:
    """One step of the cell and the readout, with what the online rules need.

    ``pre_t`` is written into the state's workspace (one ``cat`` into it), so no (B, P)
    tensor is made per step; it is overwritten by the next step and never returned.
    """
    act = get_activation(model.activation)
    h, a, fa = cell_step(model.W_in, model.W_rec, model.b_rec, h_prev, x_t,
                         activation=act, alpha=model.alpha)
    dphi = act.deriv(a, fa)
    pre = torch.cat([h_prev, x_t, work.ones], dim=1, out=work.pre)
    z, value, dz = readout_step(model, h, target_t, mask_t, loss)
    return Forward(h, dphi, pre, z, value, dz)


# A (B, H, P) trace larger than BLOCKED_ABOVE bytes is updated and contracted block of rows
# by block of rows, each block BLOCK_BYTES or so: every pass after the first then reads the
# block from cache, where the update left it, and the trace crosses the memory bus once per
# step instead of once per pass (``benchmarks/online_floor.py --no-blocks`` measures what it
# buys). Smaller traces stay whole: there the extra calls cost more than the cache saves.
BLOCK_BYTES = 2 << 20
BLOCKED_ABOVE = 8 << 20


def row_blocks(X: Tensor) -> list[slice] | None:
    """Row blocks of X (B, H, P), or None (one block, X whole) unless X is larger than
    ``BLOCKED_ABOVE``."""
    B, H, P = X.shape
    row = B * P * X.element_size()
    if H * row <= BLOCKED_ABOVE:
        return None
    rows = max(1, BLOCK_BYTES // row)
    return [slice(i, min(i + rows, H)) for i in range(0, H, rows)]


def rows_of(t: Tensor, rows: slice | None) -> Tensor:
    """``t[:, rows]``, or t itself for the whole (no view op on the one-block path)."""
    return t if rows is None else t[:, rows]


def update_and_contract(X: Tensor, update, L: Tensor | None) -> Tensor | None:
    """``update(X[:, rows], rows)`` in place for every row block (``rows`` None: X whole), and,
    when L (B, H) is given, ``G[i, j] = sum_b L[b, i] X[b, i, j]`` of the updated X: a new
    (H, P) tensor.

    Each block is contracted right after its update, while it is in cache: a batched GEMV
    over its units (the (rows, B, P) view of the block is strided, not copied), or a row
    scaling for B = 1. (``torch.einsum("bi,bij->ij")`` copies X one unit at a time here.)
    """
    B, H, P = X.shape
    blocks = row_blocks(X)
    if blocks is None:
        update(X, None)
        if L is None:
            return None
        if B == 1:
            return X[0] * L[0].unsqueeze(1)
        return torch.bmm(L.T.contiguous().unsqueeze(1), X.transpose(0, 1)).view(H, P)
    G = None if L is None else X.new_empty(H, P)
    LT = None if L is None or B == 1 else L.T.contiguous().unsqueeze(1)  # (H, 1, B)
    for rows in blocks:
        Xb = X[:, rows]
        update(Xb, rows)
        if G is None:
            continue
        if B == 1:
            torch.mul(Xb[0], L[0, rows].unsqueeze(1), out=G[rows])
        else:
            torch.bmm(LT[rows], Xb.transpose(0, 1), out=G[rows].unsqueeze(1))
    return G


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
    from .._checks import check_seed_value

    return check_seed_value("seed", seed)
