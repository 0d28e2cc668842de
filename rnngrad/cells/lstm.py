"""The LSTM cell, PyTorch's equations, with its hand-derived whole-sequence BPTT.

Shapes: x_t (B, D), h_t and c_t (B, H); parameters in PyTorch's layout and gate order
i, f, g, o: ``W_ih (4H, D)``, ``W_hh (4H, H)``, ``b_ih (4H,)``, ``b_hh (4H,)``. The state
is ``LSTMState(h, c)``; flattened (``base.flatten_state``) it is ``s = [h | c]`` (B, 2H).

Forward (one step; ``torch.nn.LSTM`` computes exactly this)::

    a_t  = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh      (B, 4H)  pre-activations [a_i, a_f, a_g, a_o]
    i_t  = sigmoid(a_i),  f_t = sigmoid(a_f)           (B, H)   input and forget gates
    g_t  = tanh(a_g),     o_t = sigmoid(a_o)           (B, H)   cell candidate, output gate
    c_t  = f_t c_{t-1} + i_t g_t                       (B, H)   cell state
    tc_t = tanh(c_t)                                   (B, H)
    h_t  = o_t tc_t                                    (B, H)   hidden state (the output)

Backward, t = T down to 1; ``hbar_t = dL/dh_t`` arriving from outside (readout, next
layer; plus ``d_state.h`` at t = T); ``da_{T+1} = 0`` and ``gamma_{T+1} = d_state.c`` (or 0)::

    delta_t = hbar_t + W_hh^T da_{t+1}                 (B, H)   dL/dh_t, total
    dc_t    = gamma_{t+1} + delta_t o_t (1 - tc_t^2)   (B, H)   dL/dc_t, total
    da_o    = delta_t tc_t o_t (1 - o_t)               (B, H)
    da_i    = dc_t g_t i_t (1 - i_t)                   (B, H)
    da_f    = dc_t c_{t-1} f_t (1 - f_t)               (B, H)
    da_g    = dc_t i_t (1 - g_t^2)                     (B, H)
    gamma_t = dc_t f_t                                 (B, H)   dL/dc_{t-1} through the cell
    da_t    = [da_i, da_f, da_g, da_o]                 (B, 4H)  dL/da_t
    dW_ih = sum_t da_t^T x_t       (4H, D)    db_ih = db_hh = sum_t da_t   (4H,)
    dW_hh = sum_t da_t^T h_{t-1}   (4H, H)    dx_t  = da_t W_ih             (B, D)
    dh_0  = W_hh^T da_1,   dc_0 = gamma_1

Only delta and gamma are sequential (one (B, 4H) x (4H, H) GEMM per step); the input
projections of all steps are one GEMM, each weight gradient one GEMM over the stacked
(T B) rows. Inside the loops the gates are kept in the order i, f, o, g (rows of the
weights permuted once per call), so that the three sigmoid gates are one contiguous
block: one sigmoid per step for the three. tanh(c_t) is recomputed in the backward pass
rather than stored, and da_t is written over the stored gates (so a forward cache serves
one backward pass): the fewer fresh (T, B, H) buffers, the fewer page faults.

Structure declared for the online rules (C = 2 components h, c, per unit; every parameter
owned row by row, G = 4). The per-gate factors, each (B, H), with k_t = o_t (1 - tc_t^2)::

    dc_t/da = [g_t i_t (1 - i_t),  c_{t-1} f_t (1 - f_t),  i_t (1 - g_t^2),  0]
    dh_t/da = k_t dc_t/da + [0, 0, 0, tc_t o_t (1 - o_t)]
    D       = [dh_t/da, dc_t/da]                      (B, 2, 4, H)

    immediate       every parameter: Immediate(D, inp), inp = x_t (W_ih), h_{t-1} (W_hh), 1
    jacobian        [[sum_g diag(D_hg) W_hh[g],  diag(k_t f_t)],     (B, 2H, 2H) in [h | c]
                     [sum_g diag(D_cg) W_hh[g],  diag(f_t)   ]]
    input_jacobian  [sum_g diag(D_hg) W_ih[g]; sum_g diag(D_cg) W_ih[g]]   (B, 2H, D)
    local           the (h_i, c_i) x (h_{i,t-1}, c_{i,t-1}) block of the jacobian, the unit's
                    own h_{t-1} through W_hh[g H + i, i] included (SnAp-1)   (B, H, 2, 2)
    eligibility     [[0, k_t f_t], [0, f_t]]    (B, H, 2, 2): e-prop's convention (Bellec
                    et al. 2020): h_{t-1} where it enters the gates through W_hh (the unit's
                    own entry included) is held fixed; only the cell path c_{t-1} -> c_t -> h_t
                    remains, so the h_{t-1} columns are zero
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .base import Cell, Immediate, Linearization
from .gru import SequenceCache, _check_inputs, _diag_blocks, builds_graph, gate_parameters, gate_sum

__all__ = ["LSTM", "LSTMState"]


class LSTMState(NamedTuple):
    """The LSTM's state: the output ``h`` and the memory cell ``c``, each (B, H)."""

    h: Tensor  # (B, H)
    c: Tensor  # (B, H)


def _loop_order(H: int, device) -> Tensor:
    """Row index (4H,): gates i, f, g, o -> i, f, o, g. Swapping two blocks is its own
    inverse, so the same index brings gradients back to PyTorch's order."""
    r = torch.arange(4 * H, device=device)
    return torch.cat((r[:2 * H], r[3 * H:], r[2 * H:3 * H]))


def _with_ones(X: Tensor) -> Tensor:
    """(N, D) -> (N, D + 1): X with a column of ones (the bias as one more input)."""
    return torch.cat((X, X.new_ones(X.shape[0], 1)), 1)


class LSTM(Cell):
    """PyTorch's LSTM cell (gate order i, f, g, o).

    Args:
        input_size: D.  hidden_size: H.
        forget_bias: added to the forget gate's block of ``b_ih`` at initialisation
            (default 0: PyTorch's initialisation exactly). Gers et al. 2000 and
            Jozefowicz et al. 2015 start the forget gate open; docs/cells.md shows an
            LSTM that stays on the copy task's plateau for 600 updates at 0 and learns
            at 3.
        dtype, device: of the parameters.

    Parameters: ``W_ih (4H, D)``, ``W_hh (4H, H)``, ``b_ih (4H,)``, ``b_hh (4H,)``, drawn
    U(-1/sqrt(H), 1/sqrt(H)) like ``torch.nn.LSTM``'s (``weight_ih_l0`` is ``W_ih``, and so
    on). State: ``LSTMState(h, c)``; ``output(state)`` is h.
    """

    def __init__(self, input_size: int, hidden_size: int, *, forget_bias: float = 0.0,
                 dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if (isinstance(forget_bias, bool) or not isinstance(forget_bias, (int, float))
                or not math.isfinite(forget_bias)):
            raise ValueError(f"forget_bias must be a finite number, got {forget_bias!r}")
        self.input_size, self.hidden_size = input_size, hidden_size
        self.forget_bias = float(forget_bias)
        gate_parameters(self, 4, input_size, hidden_size, dtype, device)
        if self.forget_bias:
            with torch.no_grad():
                self.b_ih[hidden_size:2 * hidden_size] += self.forget_bias

    def extra_repr(self) -> str:
        fb = f", forget_bias={self.forget_bias:g}" if self.forget_bias else ""
        return f"input_size={self.input_size}, hidden_size={self.hidden_size}{fb}"

    def init_state(self, batch_size: int) -> LSTMState:
        p = self.W_hh
        z = torch.zeros(batch_size, self.hidden_size, dtype=p.dtype, device=p.device)
        return LSTMState(z, z.clone())

    def output(self, state: LSTMState) -> Tensor:
        return state.h

    def param_blocks(self) -> dict[str, int | None]:
        return {"W_ih": 4, "W_hh": 4, "b_ih": 4, "b_hh": 4}

    def _gates(self, params, state: LSTMState, x: Tensor):
        a = torch.addmm(torch.addmm(params["b_ih"], x, params["W_ih"].T) + params["b_hh"],
                        state.h, params["W_hh"].T)
        a_i, a_f, a_g, a_o = a.chunk(4, 1)
        i, f, g, o = torch.sigmoid(a_i), torch.sigmoid(a_f), torch.tanh(a_g), torch.sigmoid(a_o)
        c = f * state.c + i * g
        tc = torch.tanh(c)
        return i, f, g, o, tc, LSTMState(o * tc, c)

    def step(self, params, state: LSTMState, x: Tensor) -> LSTMState:
        return self._gates(params, state, x)[-1]

    def linearize(self, params, state: LSTMState, x: Tensor, *, need=()) -> Linearization:
        i, f, g, o, tc, new = self._gates(params, state, x)
        if not need:
            return Linearization(new)
        return self._linearization(params, state, x, i, f, g, o, tc, new, need)

    def linearize_sequence(self, params, inputs: Tensor, state0: LSTMState, *, need=()):
        """The forward pass over the sequence and ``linearize`` at every step, from the
        gates the forward keeps (no second evaluation of the step): ``(prev, new, outputs,
        Linearization)``, prev and new the states before and after each step ((T, B, H)
        components, views of one (T + 1, B, H) buffer each), the linearization on the
        (T B) rows (what the sequence forms of the truncated rules use).

        With ``"weigh"`` in ``need`` (and no jacobian asked) the immediate factor D is
        never built: the gate buffer is turned in place into the per-gate factors (as
        ``backward_sequence`` turns it into da_t), and ``Immediate.weigh`` folds D's two
        rows, ``w = lam_h Dh + lam_c Dc = [m Dc_i, m Dc_f, m Dc_g, lam_h tc o (1 - o)]``
        with ``m = lam_c + k lam_h``, into that buffer."""
        if "weigh" not in need or "jacobian" in need or "input_jacobian" in need:
            return self._linearize_sequence_dense(params, inputs, state0, need)
        A, cf, hf = self._forward_kept(params, inputs, state0)
        T, B, H = A.shape[0], A.shape[1], self.hidden_size
        N = T * B
        prev, new = LSTMState(hf[:-1], cf[:-1]), LSTMState(hf[1:], cf[1:])
        G = A.view(N, 4, H)  # post-activation, PyTorch's order i, f, g, o
        i, f, g, o = G.unbind(1)
        c_prev = cf[:-1].reshape(N, H)
        tc = torch.tanh(cf[1:].reshape(N, H))
        k = torch.mul(tc, tc)
        torch.addcmul(o, o, k, value=-1.0, out=k)                         # k = o (1 - tc^2)
        # the per-unit blocks, entries contiguous: Jb[c, d] (N, H); J (N, H, 2, 2) a view
        Jb = A.new_empty(2, 2, N, H)
        torch.mul(k, f, out=Jb[0, 1])                                     # d h / d c_prev
        Jb[1, 1].copy_(f)                                                 # d c / d c_prev
        # the gate buffer, in place, becomes [Dc_i, Dc_f, Dc_g, Dh_o]
        p = torch.mul(g, i)
        torch.addcmul(i, p, g, value=-1.0, out=g)                         # Dc_g = i (1 - g^2)
        torch.addcmul(p, p, i, value=-1.0, out=i)                         # Dc_i = g i (1 - i)
        f.addcmul_(f, f, value=-1.0).mul_(c_prev)                         # Dc_f = c f (1 - f)
        o.addcmul_(o, o, value=-1.0).mul_(tc)                             # Dh_o = tc o (1 - o)
        del p, tc
        out = {}
        if "local" in need:
            dW = _diag_blocks(params["W_hh"], 4)                          # (4, H)
            own_c = torch.mul(i, dW[0], out=Jb[1, 0])
            own_c.addcmul_(f, dW[1]).addcmul_(g, dW[2])
            torch.mul(own_c, k, out=Jb[0, 0]).addcmul_(o, dW[3])
            out["local"] = Jb.permute(2, 3, 0, 1)
        if "eligibility" in need:
            if "local" in need:
                E = Jb.clone()
            else:
                E = Jb
            E[:, 0].zero_()
            out["eligibility"] = E.permute(2, 3, 0, 1)
        if "immediate" in need:
            done = []

            def weigh(lam: Tensor) -> Tensor:
                if done:
                    raise RuntimeError("LSTM.linearize_sequence's weigh is called once")
                done.append(True)
                lam_h, lam_c = lam[:, 0], lam[:, 1]
                m = torch.addcmul(lam_c, lam_h, k, out=k)                 # lam_c + k lam_h
                G[:, :3].mul_(m.unsqueeze(1))
                o.mul_(lam_h)
                return G

            ones = A.new_ones(N, 1, 1)
            out["immediate"] = {
                "W_ih": Immediate(None, inputs.reshape(N, 1, -1), None, weigh),
                "W_hh": Immediate(None, hf[:-1].reshape(N, 1, H), None, weigh),
                "b_ih": Immediate(None, ones, None, weigh),
                "b_hh": Immediate(None, ones, None, weigh)}
        lin = Linearization(new, **out)
        if "emit_vjp" not in need:
            return prev, new, hf[1:], lin

        def emit_vjp(g: Tensor):
            """The output is h: the signal on (h, c) is (g, 0), in a buffer of its own."""
            q = g.new_empty(N, 2, H)
            q[:, 0] = g
            q[:, 1].zero_()
            return {}, q.view(N, 2 * H), None

        return prev, new, hf[1:], lin, emit_vjp

    def block_zeros(self, field: str, C: int) -> frozenset:
        """The entries (c, d) of the per-unit blocks that are zero at every step: e-prop's
        h_{t-1} columns (what the sequence forms skip in their lambda recursion)."""
        return frozenset({(0, 0), (1, 0)}) if field == "eligibility" else frozenset()

    def _linearize_sequence_dense(self, params, inputs: Tensor, state0: LSTMState, need):
        A, cs, hs, _ = self._forward(params, inputs, state0)
        T, B, H = hs.shape
        N = T * B
        prev = LSTMState(torch.cat((state0.h.unsqueeze(0), hs[:-1])),
                         torch.cat((state0.c.unsqueeze(0), cs[:-1])))
        new = LSTMState(hs, cs)
        gates = A.view(N, 4 * H)  # post-activation, loop order i, f, o, g
        i, f, o, g = (gates[:, k * H:(k + 1) * H] for k in range(4))

        def rows(s):
            return LSTMState(*(c.reshape(N, H) for c in s))

        lin = self._linearization(params, rows(prev), inputs.reshape(N, -1), i, f, g, o,
                                  torch.tanh(cs.view(N, H)), rows(new), need)
        return prev, new, hs, lin

    @torch.no_grad()
    def _forward_kept(self, params, inputs: Tensor, state0: LSTMState):
        """The forward pass in PyTorch's gate order: ``(A (T, B, 4H) the post-activation
        gates i, f, g, o, c (T + 1, B, H) = c_0..c_T, h (T + 1, B, H) = h_0..h_T)``."""
        T, B, D = inputs.shape
        H = self.hidden_size
        A = torch.addmm(params["b_ih"] + params["b_hh"], inputs.reshape(T * B, D),
                        params["W_ih"].T).view(T, B, 4 * H)
        W_hh_T = params["W_hh"].T
        cf = A.new_empty(T + 1, B, H)
        hf = A.new_empty(T + 1, B, H)
        cf[0], hf[0] = state0.c, state0.h
        tc = A.new_empty(B, H)
        Cs, Hs, As = cf.unbind(0), hf.unbind(0), A.unbind(0)
        IF, Gs, Os = A[..., :2 * H].unbind(0), A[..., 2 * H:3 * H].unbind(0), A[..., 3 * H:].unbind(0)
        Is, Fs = A[..., :H].unbind(0), A[..., H:2 * H].unbind(0)
        for t in range(T):
            As[t].addmm_(Hs[t], W_hh_T)
            IF[t].sigmoid_()                                              # i, f
            Gs[t].tanh_()                                                 # g
            Os[t].sigmoid_()                                              # o
            c = torch.mul(Fs[t], Cs[t], out=Cs[t + 1]).addcmul_(Is[t], Gs[t])
            torch.mul(Os[t], torch.tanh(c, out=tc), out=Hs[t + 1])
        return A, cf, hf

    def _linearization(self, params, state, x, i, f, g, o, tc, new, need) -> Linearization:
        B, H = tc.shape
        out = {}
        k = o * (1 - tc * tc)                                             # dh_t / dc_t
        D = tc.new_empty(B, 2, 4, H)                                      # (B, 2, 4, H)
        Dh, Dc = D[:, 0], D[:, 1]                                         # written in place
        Dc[:, 0] = g * i * (1 - i)
        Dc[:, 1] = state.c * f * (1 - f)
        Dc[:, 2] = i * (1 - g * g)
        Dc[:, 3] = 0.0
        Dh[:, :3] = Dc[:, :3] * k.unsqueeze(1)
        Dh[:, 3] = tc * o * (1 - o)
        kf = k * f
        if "local" in need or "eligibility" in need:
            zero = torch.zeros_like(f)
            if "local" in need:
                dW = _diag_blocks(params["W_hh"], 4)                      # (4, H)
                own = D[:, :, 0] * dW[0]
                for gate in range(1, 4):  # no (B, 2, 4, H) temporary
                    own.addcmul_(D[:, :, gate], dW[gate])
                out["local"] = torch.stack((torch.stack((own[:, 0], kf), -1),
                                            torch.stack((own[:, 1], f), -1)), -2)
            if "eligibility" in need:
                out["eligibility"] = torch.stack((torch.stack((zero, kf), -1),
                                                  torch.stack((zero, f), -1)), -2)
        if "immediate" in need:
            ones = tc.new_ones(B, 1, 1)
            out["immediate"] = {"W_ih": Immediate(D, x.unsqueeze(1)),
                                "W_hh": Immediate(D, state.h.unsqueeze(1)),
                                "b_ih": Immediate(D, ones), "b_hh": Immediate(D, ones)}
        if "jacobian" in need:
            J = tc.new_zeros(B, 2, H, 2, H)
            J[:, :, :, 0] = gate_sum(D, params["W_hh"])                   # d s_t / d h_{t-1}
            J[:, 0, :, 1].diagonal(dim1=1, dim2=2).copy_(kf)              # d h_t / d c_{t-1}
            J[:, 1, :, 1].diagonal(dim1=1, dim2=2).copy_(f)               # d c_t / d c_{t-1}
            out["jacobian"] = J.view(B, 2 * H, 2 * H)
        if "input_jacobian" in need:
            out["input_jacobian"] = gate_sum(D, params["W_ih"]).reshape(B, 2 * H, -1)
        return Linearization(new, **out)

    # ---- whole-sequence BPTT ----------------------------------------------------------

    def forward_sequence(self, params, inputs: Tensor, state0: LSTMState, *, cache: bool = False):
        """``(outputs (T, B, H), state_T, cache)``; see the module docstring.

        The cache (a ``SequenceCache``) holds the gates (T, B, 4H, order i, f, o, g), c_1..c_T
        and h_1..h_T (the outputs) and [x_t, 1] (T B, D + 1); ``backward_sequence`` overwrites the gates with their
        gradients, so it serves one backward pass. When autograd would record (grad
        enabled and a tensor requiring grad), the outputs come from a plain loop of
        ``step`` so that they stay differentiable.
        """
        _check_inputs(self, inputs)
        if builds_graph(params, inputs, *state0):
            outs, sT, _ = Cell.forward_sequence(self, params, inputs, state0)
            if not cache:
                return outs, sT, None
            with torch.no_grad():
                return outs, sT, SequenceCache(self._forward(params, inputs, state0))
        c = self._forward(params, inputs, state0)
        _, cs, hs, _ = c
        return hs, LSTMState(hs[-1], cs[-1]), (SequenceCache(c) if cache else None)

    def forward_states(self, params, inputs: Tensor, state0: LSTMState):
        """``(LSTMState of (T + 1, B, H) components: s_0..s_T, outputs h_1..h_T)``: the
        forward pass above, keeping the states (what the sequence forms of the truncated
        rules linearize at)."""
        with torch.no_grad():
            _, cs, hs, _ = self._forward(params, inputs, state0)
            h0, c0 = state0
            return LSTMState(torch.cat((h0.unsqueeze(0), hs)), torch.cat((c0.unsqueeze(0), cs))), hs

    @torch.no_grad()
    def _forward(self, params, inputs: Tensor, state0: LSTMState):
        T, B, D = inputs.shape
        H = self.hidden_size
        order = _loop_order(H, inputs.device)
        W_hh = params["W_hh"][order]
        # a_t = [W_ih | b_ih + b_hh] [x_t; 1] + W_hh h_{t-1}: the first term for all t as one
        # GEMM with the bias as a column (no broadcast pass over the (T, B, 4H) result);
        # backward_sequence gets the bias gradient from the same column of dW_ih's GEMM
        X1 = _with_ones(inputs.reshape(T * B, D))
        W1 = torch.cat((params["W_ih"], (params["b_ih"] + params["b_hh"]).unsqueeze(1)), 1)
        A = torch.mm(X1, W1[order].T).view(T, B, 4 * H)
        W_hh_T = W_hh.T
        cs = torch.empty(T, B, H, dtype=A.dtype, device=A.device)
        hs = torch.empty(T, B, H, dtype=A.dtype, device=A.device)
        tc = torch.empty(B, H, dtype=A.dtype, device=A.device)  # tanh(c_t), recomputed later
        Cs, Hs = cs.unbind(0), hs.unbind(0)
        # views made once; A[t] turns from pre-activations into [i, f, o, g] in place
        As, S3, Gs = A.unbind(0), A[..., :3 * H].unbind(0), A[..., 3 * H:].unbind(0)
        Is, Fs, Os = A[..., :H].unbind(0), A[..., H:2 * H].unbind(0), A[..., 2 * H:3 * H].unbind(0)
        h, c = state0
        for t in range(T):
            As[t].addmm_(h, W_hh_T)
            S3[t].sigmoid_()                                              # i, f, o
            Gs[t].tanh_()                                                 # g
            c = torch.mul(Fs[t], c, out=Cs[t]).addcmul_(Is[t], Gs[t])     # c_t
            h = torch.mul(Os[t], torch.tanh(c, out=tc), out=Hs[t])        # h_t = o tanh(c_t)
        return A, cs, hs, X1

    def backward_sequence(self, params, inputs: Tensor, state0: LSTMState, cache,
                          d_outputs: Tensor, d_state: LSTMState | None = None, *,
                          input_grad: bool = True):
        """The adjoint pass of the module docstring. It writes da_t over the cache's
        gates (no (T, B, 4H) buffer is allocated), so a cache serves one call: a second
        raises."""
        T, B, D = inputs.shape
        H = self.hidden_size
        if tuple(d_outputs.shape) != (T, B, H):
            raise ValueError(f"d_outputs has shape {tuple(d_outputs.shape)} but expected "
                             f"({T}, {B}, {H})")
        A, cs, hs, X1 = SequenceCache.take(cache, self)
        with torch.no_grad():
            order = _loop_order(H, A.device)
            W_ih, W_hh = params["W_ih"].detach()[order], params["W_hh"].detach()[order]
            # in place, step t: A[t] = [i, f, o, g] -> da_t = [da_i, da_f, da_o, da_g]
            dAs = A.unbind(0)
            Is, Fs, Os, Gs = (A[..., :H].unbind(0), A[..., H:2 * H].unbind(0),
                              A[..., 2 * H:3 * H].unbind(0), A[..., 3 * H:].unbind(0))
            Cs, hbar = cs.unbind(0), d_outputs.detach().unbind(0)
            c0 = state0.c.detach()
            work = torch.empty(5, B, H, dtype=A.dtype, device=A.device)
            tmp1, tmp2, tmp3, gamma, delta_buf = work.unbind(0)
            if d_state is None:
                delta = hbar[T - 1]
                gamma.zero_()
            else:
                delta = torch.add(hbar[T - 1], d_state.h.detach(), out=delta_buf)
                gamma.copy_(d_state.c.detach())
            for t in range(T - 1, -1, -1):
                i, f, o, g = Is[t], Fs[t], Os[t], Gs[t]
                tc = torch.tanh(Cs[t], out=tmp3)
                k = torch.mul(delta, o, out=tmp1)                         # delta o
                kt = torch.mul(k, tc, out=tmp2)                           # delta o tc
                dc = gamma.add_(k).addcmul_(kt, tc, value=-1.0)           # dc_t, over gamma
                torch.addcmul(kt, kt, o, value=-1.0, out=o)               # da_o = kt (1 - o)
                q = torch.mul(dc, i, out=tmp1)                            # dc i
                qg = torch.mul(q, g, out=tmp2)                            # dc i g
                torch.addcmul(q, qg, g, value=-1.0, out=g)                # da_g = q (1 - g^2)
                torch.addcmul(qg, qg, i, value=-1.0, out=i)               # da_i = qg (1 - i)
                w = torch.mul(dc, Cs[t - 1] if t > 0 else c0, out=tmp1).mul_(f)   # dc c_{t-1} f
                gamma.mul_(f)                                             # gamma_t = dc f
                torch.addcmul(w, w, f, value=-1.0, out=f)                 # da_f = w (1 - f)
                if t > 0:
                    delta = torch.addmm(hbar[t - 1], dAs[t], W_hh, out=delta_buf)
                else:
                    delta = torch.mm(dAs[0], W_hh, out=delta_buf)
            dA2 = A.view(T * B, 4 * H)
            dW_hh = dAs[0].T @ state0.h.detach()
            if T > 1:
                dW_hh.addmm_(dA2[B:].T, hs[:-1].reshape((T - 1) * B, H))
            dW1 = (dA2.T @ X1)[order]                                     # [dW_ih | sum_t da_t]
            grads = {"W_ih": dW1[:, :D].contiguous(), "W_hh": dW_hh[order],
                     "b_ih": dW1[:, D].contiguous(), "b_hh": dW1[:, D].contiguous()}
            d_inputs = (dA2 @ W_ih).view(T, B, D) if input_grad else None
        return grads, d_inputs, LSTMState(delta, gamma)
