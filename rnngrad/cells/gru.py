"""The GRU cell, PyTorch's equations, with its hand-derived whole-sequence BPTT.

Shapes: x_t (B, D), h_t (B, H); parameters in PyTorch's layout and gate order r, z, n:
``W_ih (3H, D)``, ``W_hh (3H, H)``, ``b_ih (3H,)``, ``b_hh (3H,)``; a subscript r, z or n
is that gate's block of H rows (``W_hn = W_hh[2H:3H]``).

Forward (one step; ``torch.nn.GRU`` computes exactly this)::

    gi_t = W_ih x_t + b_ih                      (B, 3H)  input part of every gate
    gh_t = W_hh h_{t-1} + b_hh                  (B, 3H)  recurrent part of every gate
    a_r  = gi_r + gh_r,       r_t = sigmoid(a_r)    (B, H)   reset gate
    a_z  = gi_z + gh_z,       z_t = sigmoid(a_z)    (B, H)   update gate
    a_n  = gi_n + r_t gh_n,   n_t = tanh(a_n)       (B, H)   candidate: the reset gate scales
                                                             W_hn h_{t-1} + b_hn, bias included
    h_t  = (1 - z_t) n_t + z_t h_{t-1}          (B, H)   = n_t + z_t (h_{t-1} - n_t)

Backward, t = T down to 1; ``hbar_t = dL/dh_t`` arriving from outside (readout, next
layer; plus ``d_state.h`` at t = T), and the terms from step T + 1 zero::

    delta_t = hbar_t + z_{t+1} delta_{t+1} + W_hh^T dgh_{t+1}   (B, H)  dL/dh_t, total
    dn_t    = delta_t (1 - z_t)                                 (B, H)  dL/dn_t
    da_n    = dn_t (1 - n_t^2)                                  (B, H)  dL/da_n
    dgh_n   = r_t da_n                                          (B, H)  dL/dgh_n
    da_r    = da_n gh_n r_t (1 - r_t)                           (B, H)  dL/da_r
    da_z    = delta_t (h_t - n_t) (1 - z_t)                     (B, H)  dL/da_z, using
                                                                        h_t - n_t = z_t (h_{t-1} - n_t)
    dgi_t   = [da_r, da_z, da_n]                                (B, 3H) dL/dgi_t
    dgh_t   = [da_r, da_z, dgh_n]                               (B, 3H) dL/dgh_t
    dW_ih = sum_t dgi_t^T x_t       (3H, D)    db_ih = sum_t dgi_t    (3H,)
    dW_hh = sum_t dgh_t^T h_{t-1}   (3H, H)    db_hh = sum_t dgh_t    (3H,)
    dx_t  = dgi_t W_ih              (B, D)     dh_0  = z_1 delta_1 + W_hh^T dgh_1

Only the delta recursion is sequential (one (B, 3H) x (3H, H) GEMM per step, and two
GEMMs (r, z | n) per forward step); the input projections of all steps are one GEMM,
and each weight gradient is one GEMM per gate group over the stacked (T B) rows. The
backward pass writes dgh_t over the stored [r, z, n] and da_n over gh_n, so it allocates
no (T, B, 3H) buffer, and a forward cache serves one backward pass.

Structure declared for the online rules (one state component h, C = 1; every
parameter owned row by row, G = 3). The per-gate factors, each (B, H)::

    d_n = dh_t/d a_n = (1 - z_t)(1 - n_t^2)
    d_r = dh_t/d a_r = d_n gh_n r_t (1 - r_t)
    d_z = dh_t/d a_z = (h_{t-1} - n_t) z_t (1 - z_t)
    Di  = [d_r, d_z, d_n]        (B, 3, H)  through gi (W_ih, b_ih)
    Dh  = [d_r, d_z, r_t d_n]    (B, 3, H)  through gh (W_hh, b_hh): the n gate carries r_t

    immediate       W_ih: Immediate(Di, x_t), b_ih: (Di, 1), W_hh: (Dh, h_{t-1}), b_hh: (Dh, 1)
    jacobian        diag(z_t) + sum_g diag(Dh_g) W_hh[g]          (B, H, H)
    input_jacobian  sum_g diag(Di_g) W_ih[g]                      (B, H, D)
    local           z_t + sum_g Dh_g W_hh[g H + i, i]             (B, H, 1, 1): SnAp-1, every
                    path within unit i, its own h_{t-1} through the gates included
    eligibility     z_t                                           (B, H, 1, 1): e-prop's
                    convention (Bellec et al. 2020): h_{t-1} where it enters the gates through
                    W_hh (the unit's own entry included) is held fixed; only the carry
                    z_t h_{t-1} remains
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .base import Cell, Immediate, Linearization, check_factory
from .elman import check_sizes

__all__ = ["GRU", "GRUState", "SequenceCache", "gate_parameters", "gate_sum"]


class GRUState(NamedTuple):
    """The GRU's state: the hidden state ``h`` (B, H)."""

    h: Tensor  # (B, H)


def gate_parameters(cell: nn.Module, G: int, input_size: int, hidden_size: int,
                    dtype: torch.dtype | None, device: torch.device | str | None) -> None:
    """Create W_ih (G H, D), W_hh (G H, H), b_ih, b_hh (G H,) on ``cell`` and draw them
    U(-1/sqrt(H), 1/sqrt(H)), as ``torch.nn.GRU`` / ``LSTM`` do."""
    check_sizes(input_size=input_size, hidden_size=hidden_size)
    check_factory(dtype, device)
    kw = {"dtype": dtype, "device": device}
    H = hidden_size
    cell.W_ih = nn.Parameter(torch.empty(G * H, input_size, **kw))
    cell.W_hh = nn.Parameter(torch.empty(G * H, H, **kw))
    cell.b_ih = nn.Parameter(torch.empty(G * H, **kw))
    cell.b_hh = nn.Parameter(torch.empty(G * H, **kw))
    bound = 1.0 / math.sqrt(H)
    with torch.no_grad():
        for p in (cell.W_ih, cell.W_hh, cell.b_ih, cell.b_hh):
            p.uniform_(-bound, bound)


def gate_sum(D: Tensor, W: Tensor) -> Tensor:
    """``sum_g diag(D[..., g, :]) W[g]``: D (B, ..., G, H), W (G H, P) -> (B, ..., H, P).

    The Jacobian of a cell whose gates are ``W v + ...`` with per-gate factors D; one
    batched GEMM over the units (no (B, G, H, P) intermediate)."""
    G, H = D.shape[-2], D.shape[-1]
    return torch.einsum("...gi,gij->...ij", D, W.view(G, H, -1))


def _diag_blocks(W: Tensor, G: int) -> Tensor:
    """(G H, H) -> (G, H): ``W[g H + i, i]``, the unit's own recurrent weight per gate."""
    H = W.shape[1]
    return W.view(G, H, H).diagonal(dim1=1, dim2=2)


def _check_inputs(cell: Cell, inputs: Tensor) -> None:
    if inputs.dim() != 3 or inputs.shape[2] != cell.input_size:
        raise ValueError(f"inputs has shape {tuple(inputs.shape)} but {type(cell).__name__} "
                         f"expects (T, B, {cell.input_size})")


def builds_graph(params, *tensors: Tensor) -> bool:
    """True when autograd would record: the hand-derived loops (in place) must not run."""
    return torch.is_grad_enabled() and (
        any(t.requires_grad for t in tensors) or any(p.requires_grad for p in params.values()))


class GRU(Cell):
    """PyTorch's GRU cell (gate order r, z, n; the reset gate scales ``W_hn h + b_hn``).

    Args:
        input_size: D.  hidden_size: H.
        dtype, device: of the parameters.

    Parameters: ``W_ih (3H, D)``, ``W_hh (3H, H)``, ``b_ih (3H,)``, ``b_hh (3H,)``, drawn
    U(-1/sqrt(H), 1/sqrt(H)) like ``torch.nn.GRU``'s (``weight_ih_l0`` is ``W_ih``, and so
    on). State: ``GRUState(h)``; ``output(state)`` is h.
    """

    def __init__(self, input_size: int, hidden_size: int, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        gate_parameters(self, 3, input_size, hidden_size, dtype, device)

    def extra_repr(self) -> str:
        return f"input_size={self.input_size}, hidden_size={self.hidden_size}"

    def init_state(self, batch_size: int) -> GRUState:
        p = self.W_hh
        return GRUState(torch.zeros(batch_size, self.hidden_size, dtype=p.dtype, device=p.device))

    def output(self, state: GRUState) -> Tensor:
        return state.h

    def param_blocks(self) -> dict[str, int | None]:
        return {"W_ih": 3, "W_hh": 3, "b_ih": 3, "b_hh": 3}

    def _gates(self, params, h: Tensor, x: Tensor):
        gi = torch.addmm(params["b_ih"], x, params["W_ih"].T)
        gh = torch.addmm(params["b_hh"], h, params["W_hh"].T)
        i_r, i_z, i_n = gi.chunk(3, 1)
        h_r, h_z, h_n = gh.chunk(3, 1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(torch.addcmul(i_n, r, h_n))
        return r, z, n, h_n, n + z * (h - n)

    def step(self, params, state: GRUState, x: Tensor) -> GRUState:
        return GRUState(self._gates(params, state.h, x)[-1])

    def linearize(self, params, state: GRUState, x: Tensor, *, need=()) -> Linearization:
        h_prev = state.h
        r, z, n, h_n, h = self._gates(params, h_prev, x)
        if not need:
            return Linearization(GRUState(h))
        return self._linearization(params, h_prev, x, r, z, n, h_n, h, need)

    def linearize_sequence(self, params, inputs: Tensor, state0: GRUState, *, need=()):
        """The forward pass over the sequence and ``linearize`` at every step, from the
        gates the forward keeps (no second evaluation of the step): ``(prev, new, outputs,
        Linearization on the (T B) rows)`` (what the sequence forms of the truncated rules
        use)."""
        if "weigh" in need and "jacobian" not in need and "input_jacobian" not in need:
            return self._linearize_sequence_weigh(params, inputs, state0, need)
        G, HN, hs = self._forward(params, inputs, state0.h)
        T, B, H = hs.shape
        N = T * B
        prev = torch.cat((state0.h.unsqueeze(0), hs[:-1]))
        gates = G.view(N, 3 * H)  # post-activation r, z, n
        r, z, n = (gates[:, k * H:(k + 1) * H] for k in range(3))
        lin = self._linearization(params, prev.view(N, H), inputs.reshape(N, -1), r, z, n,
                                  HN.view(N, H), hs.view(N, H), need)
        return GRUState(prev), GRUState(hs), hs, lin

    @torch.no_grad()
    def _linearize_sequence_weigh(self, params, inputs: Tensor, state0: GRUState, need):
        """``linearize_sequence`` for the sequence forms (``"weigh"``): h_0..h_T in one
        buffer (prev and new are views), the gate buffer turned in place into
        ``Dh = [d_r, d_z, r d_n]`` (as ``backward_sequence`` turns it into dgh_t), ``Di`` one
        (T B, 3, H) buffer, each weighed by lambda in place (``Immediate.weigh``)."""
        T, B, _ = inputs.shape
        H = self.hidden_size
        N = T * B
        full = inputs.new_empty(T + 1, B, H)
        full[0] = state0.h
        G, HN, hs = self._forward(params, inputs, state0.h, hs=full[1:])
        Gv = G.view(N, 3, H)
        r, z, n = Gv.unbind(1)
        hn, hp = HN.view(N, H), full[:-1].reshape(N, H)
        out = {}
        J = z.clone() if ("local" in need or "eligibility" in need) else None  # z_t
        Di = G.new_empty(N, 3, H)
        A = torch.mul(z, -1.0).add_(1.0)                                   # 1 - z
        dn = torch.mul(n, n, out=Di[:, 2]).neg_().add_(1.0).mul_(A)       # d_n
        t1 = torch.sub(hp, n)
        torch.mul(t1, z, out=z).mul_(A)                                   # d_z, over z
        torch.mul(r, -1.0, out=A).add_(1.0)                               # 1 - r
        torch.mul(dn, hn, out=t1).mul_(r)
        torch.mul(dn, r, out=n)                                           # r d_n, over n
        torch.mul(t1, A, out=r)                                           # d_r, over r
        del A, t1
        Di[:, :2] = Gv[:, :2]
        if "local" in need:
            dW = _diag_blocks(params["W_hh"], 3)                           # (3, H)
            J.addcmul_(r, dW[0]).addcmul_(z, dW[1]).addcmul_(n, dW[2])
            out["local"] = J.view(N, H, 1, 1)
        if "eligibility" in need:
            out["eligibility"] = J.view(N, H, 1, 1)
        if "immediate" in need:
            done = []

            def once(D):
                def weigh(lam: Tensor) -> Tensor:
                    if id(D) in done:
                        raise RuntimeError("GRU.linearize_sequence's weigh is called once")
                    done.append(id(D))
                    return D.mul_(lam)                                    # lam (N, 1, H)
                return weigh

            wi, wh = once(Di), once(Gv)
            ones = G.new_ones(N, 1, 1)
            out["immediate"] = {"W_ih": Immediate(None, inputs.reshape(N, 1, -1), None, wi),
                                "W_hh": Immediate(None, hp.view(N, 1, H), None, wh),
                                "b_ih": Immediate(None, ones, None, wi),
                                "b_hh": Immediate(None, ones, None, wh)}
        new = GRUState(full[1:])
        return GRUState(full[:-1]), new, full[1:], Linearization(
            GRUState(full[1:].reshape(N, H)), **out)

    def _linearization(self, params, h_prev, x, r, z, n, h_n, h, need) -> Linearization:
        out = {}
        B, H = h.shape
        W_hh = params["W_hh"]
        d_n = (1 - z) * (1 - n * n)                       # dh_t / d a_n
        d_r = d_n * h_n * r * (1 - r)                     # dh_t / d a_r
        d_z = (h_prev - n) * z * (1 - z)                  # dh_t / d a_z
        Di = torch.stack((d_r, d_z, d_n), 1)              # (B, 3, H): through gi
        Dh = torch.stack((d_r, d_z, d_n * r), 1)          # (B, 3, H): through gh
        if "local" in need:
            loc = (Dh * _diag_blocks(W_hh, 3)).sum(1) + z  # (an einsum copies Dh)
            out["local"] = loc.view(B, H, 1, 1)
        if "eligibility" in need:
            out["eligibility"] = z.reshape(B, H, 1, 1).clone()
        if "immediate" in need:
            ones = h.new_ones(B, 1, 1)
            Di4, Dh4 = Di.unsqueeze(1), Dh.unsqueeze(1)
            out["immediate"] = {"W_ih": Immediate(Di4, x.unsqueeze(1)),
                                "W_hh": Immediate(Dh4, h_prev.unsqueeze(1)),
                                "b_ih": Immediate(Di4, ones),
                                "b_hh": Immediate(Dh4, ones)}
        if "jacobian" in need:
            J = gate_sum(Dh, W_hh)
            J.diagonal(dim1=1, dim2=2).add_(z)
            out["jacobian"] = J
        if "input_jacobian" in need:
            out["input_jacobian"] = gate_sum(Di, params["W_ih"])
        return Linearization(GRUState(h), **out)

    # ---- whole-sequence BPTT ----------------------------------------------------------

    def forward_sequence(self, params, inputs: Tensor, state0: GRUState, *, cache: bool = False):
        """``(outputs (T, B, H), state_T, cache)``; see the module docstring.

        The cache (a ``SequenceCache``) holds r, z, n (T, B, 3H), gh_n (T, B, H) and
        h_1..h_T (the outputs); ``backward_sequence`` overwrites it with the gate
        gradients, so it serves one backward pass. When autograd would record (grad
        enabled and a tensor requiring grad), the outputs come from a plain loop of
        ``step`` so that they stay differentiable.
        """
        _check_inputs(self, inputs)
        if builds_graph(params, inputs, state0.h):
            outs, sT, _ = Cell.forward_sequence(self, params, inputs, state0)
            if not cache:
                return outs, sT, None
            with torch.no_grad():
                return outs, sT, SequenceCache(self._forward(params, inputs, state0.h))
        c = self._forward(params, inputs, state0.h)
        hs = c[2]
        return hs, GRUState(hs[-1]), (SequenceCache(c) if cache else None)

    @torch.no_grad()
    def _forward(self, params, inputs: Tensor, h0: Tensor, hs: Tensor | None = None):
        T, B, D = inputs.shape
        H = self.hidden_size
        W_ih, W_hh, b_ih, b_hh = params["W_ih"], params["W_hh"], params["b_ih"], params["b_hh"]
        # b_hr, b_hz add to the r, z pre-activations outside the reset gate: fold them into
        # the input projection; b_hn stays with W_hn h (the reset gate scales it)
        bias = b_ih.clone()
        bias[:2 * H] += b_hh[:2 * H]
        G = torch.addmm(bias, inputs.reshape(T * B, D), W_ih.T).view(T, B, 3 * H)
        W_rz_T, W_n_T, b_hn = W_hh[:2 * H].T, W_hh[2 * H:].T, b_hh[2 * H:]
        HN = torch.empty(T, B, H, dtype=G.dtype, device=G.device)     # gh_n
        if hs is None:  # (or the caller's (T, B, H) buffer)
            hs = torch.empty(T, B, H, dtype=G.dtype, device=G.device)
        # views made once; G[t] turns from pre-activations into [r, z, n] in place
        RZ, Rs, Zs, Ns = (G[..., :2 * H].unbind(0), G[..., :H].unbind(0),
                          G[..., H:2 * H].unbind(0), G[..., 2 * H:].unbind(0))
        HNs, Hs = HN.unbind(0), hs.unbind(0)
        h = h0
        for t in range(T):
            RZ[t].addmm_(h, W_rz_T).sigmoid_()                            # r_t, z_t
            torch.addmm(b_hn, h, W_n_T, out=HNs[t])                       # gh_n
            n = Ns[t].addcmul_(Rs[t], HNs[t]).tanh_()                      # n_t
            h = torch.lerp(n, h, Zs[t], out=Hs[t])                         # h_t
        return G, HN, hs

    def backward_sequence(self, params, inputs: Tensor, state0: GRUState, cache,
                          d_outputs: Tensor, d_state: GRUState | None = None, *,
                          input_grad: bool = True):
        """The adjoint pass of the module docstring. It writes the gate gradients over
        the cache's gates (no (T, B, 3H) buffer is allocated), so a cache serves one
        call: a second raises."""
        T, B, D = inputs.shape
        H = self.hidden_size
        if tuple(d_outputs.shape) != (T, B, H):
            raise ValueError(f"d_outputs has shape {tuple(d_outputs.shape)} but expected "
                             f"({T}, {B}, {H})")
        G, HN, hs = SequenceCache.take(cache, self)
        with torch.no_grad():
            W_ih, W_hh = params["W_ih"].detach(), params["W_hh"].detach()
            # in place, step t: G[t] = [r, z, n] -> dgh_t = [da_r, da_z, dgh_n] and
            # HN[t] = gh_n -> da_n, so that dgi_t = [G[t][:, :2H], HN[t]]
            dGh = G.unbind(0)
            Rs, Zs, Ns = G[..., :H].unbind(0), G[..., H:2 * H].unbind(0), G[..., 2 * H:].unbind(0)
            HNs, Hs, hbar = HN.unbind(0), hs.unbind(0), d_outputs.detach().unbind(0)
            tmp1, tmp2, tmp3 = torch.empty(3, B, H, dtype=G.dtype, device=G.device).unbind(0)
            ping = torch.empty(2, B, H, dtype=G.dtype, device=G.device).unbind(0)
            delta = (hbar[T - 1] if d_state is None
                     else torch.add(hbar[T - 1], d_state.h.detach(), out=ping[T % 2]))
            for t in range(T - 1, -1, -1):
                r, z, n = Rs[t], Zs[t], Ns[t]
                nxt = ping[t % 2]                                   # delta_{t-1}, first the carry
                if t > 0:
                    torch.addcmul(hbar[t - 1], delta, z, out=nxt)
                else:
                    torch.mul(delta, z, out=nxt)
                dn = torch.addcmul(delta, delta, z, value=-1.0, out=tmp1)   # delta (1 - z)
                s = torch.sub(Hs[t], n, out=tmp2).mul_(delta)               # delta (h_t - n)
                torch.addcmul(s, s, z, value=-1.0, out=z)                   # da_z = s (1 - z)
                rhn = torch.mul(r, HNs[t], out=tmp2)                        # r gh_n
                torch.mul(dn, n, out=tmp3)
                da_n = torch.addcmul(dn, tmp3, n, value=-1.0, out=HNs[t])   # dn (1 - n^2)
                torch.mul(da_n, r, out=n)                                   # dgh_n = r da_n
                q = torch.mul(da_n, rhn, out=tmp1)
                torch.addcmul(q, q, r, value=-1.0, out=r)                   # da_r = q (1 - r)
                delta = nxt.addmm_(dGh[t], W_hh)
            dG2, dN2 = G.view(T * B, 3 * H), HN.view(T * B, H)
            X = inputs.detach().reshape(T * B, D)
            dW_ih = torch.empty_like(W_ih)
            torch.mm(dG2[:, :2 * H].T, X, out=dW_ih[:2 * H])
            torch.mm(dN2.T, X, out=dW_ih[2 * H:])
            # dW_hh = sum_t dgh_t h_{t-1}^T: h_0 pairs with step 1, h_1..h_{T-1} with 2..T
            dW_hh = dGh[0].T @ state0.h.detach()
            if T > 1:
                dW_hh.addmm_(dG2[B:].T, hs[:-1].reshape((T - 1) * B, H))
            db_hh = dG2.sum(0)
            grads = {"W_ih": dW_ih, "W_hh": dW_hh,
                     "b_ih": torch.cat((db_hh[:2 * H], dN2.sum(0))), "b_hh": db_hh}
            d_inputs = None
            if input_grad:
                d_inputs = torch.addmm(dG2[:, :2 * H] @ W_ih[:2 * H], dN2,
                                       W_ih[2 * H:]).view(T, B, D)
        return grads, d_inputs, GRUState(delta)


class SequenceCache:
    """What ``forward_sequence(..., cache=True)`` keeps for ``backward_sequence``.

    The hand-derived backward passes write their gate gradients over the stored gates
    (a (T, B, G H) buffer fewer, whose fresh pages cost about a tenth of the time), so
    a cache serves exactly one backward pass; ``take`` says so clearly on a second.
    """

    __slots__ = ("tensors", "used")

    def __init__(self, tensors: tuple) -> None:
        self.tensors = tensors
        self.used = False

    @staticmethod
    def take(cache: SequenceCache | None, cell: Cell) -> tuple:
        name = type(cell).__name__
        if cache is None:
            raise ValueError("backward_sequence needs the cache of forward_sequence(..., "
                             "cache=True)")
        if not isinstance(cache, SequenceCache):
            raise TypeError(f"cache must come from {name}.forward_sequence(..., cache=True), "
                            f"got {type(cache).__name__}")
        if cache.used:
            raise ValueError(f"this {name} cache was used by an earlier backward_sequence, "
                             "which overwrites it: run forward_sequence(..., cache=True) again")
        cache.used = True
        return cache.tensors
