"""Spiking cells: LIF and ALIF neurons as in Bellec et al. 2020 (Nat. Commun. 11:3625, and
their code, IGITUGraz/eligibility_propagation, ``EligALIF``).

Per unit i, time step dt (ms), ``alpha = exp(-dt / tau_m)``, ``rho = exp(-dt / tau_a)``::

    z_{t-1} = output(state_{t-1})                          the previous step's spikes (B, U)
    a_t = rho a_{t-1} + z_{t-1}                              threshold adaptation (ALIF)
    v_t = alpha v_{t-1} + W_in x_t + W_rec z_{t-1} - v_th z_{t-1}   membrane; the last term
                                                           is the reset by subtraction
    A_t = v_th + beta a_t                                    threshold (LIF: v_th)
    u_t = (v_t - A_t) / v_th,   z_t = H(u_t)                 spike = output(state_t)
    psi_t = dz_t/dv_t = (gamma / v_th) f(u_t)                pseudo-derivative; triangle:
                                                           f(u) = max(0, 1 - |u|), gamma = 0.3

``W_rec``'s diagonal is never used (no self-connections; its gradient is zero). With a
refractory period ``t_ref``, a unit that spikes at step t cannot spike before step
t + n_ref (n_ref = round(t_ref / dt); Bellec's ``n_ref``): ``z_t = 0`` and ``psi_t = 0``
while the counter ``q_t`` (steps left) is positive, and ``q_{t+1} = max(q_t - 1, 0) +
(n_ref - 1) z_t``, a counter with no derivative.

The state is the paper's hidden state ``h = (v, a)`` (plus q with a refractory period);
the spike is the cell's output, a function of the state, so ``z_{t-1}`` is recomputed
from ``state_{t-1}`` inside ``step`` and no spike is ever stored in a state.

Structure declared for the algorithms (per unit, state order v, a; psi = psi_{t-1}, the
pseudo-derivative of the spike that enters step t; W' = W_rec with zero diagonal)::

    jacobian        dv_t/dv_{t-1} = alpha I + (W' - v_th I) diag(psi)
                    dv_t/da_{t-1} = -(W' - v_th I) diag(beta psi)
                    da_t/dv_{t-1} = diag(psi),  da_t/da_{t-1} = diag(rho - beta psi)
    input_jacobian  dv_t/dx_t = W_in,  da_t/dx_t = 0
    immediate       dv_t^i/dW_in[i, j] = x_t^j,  dv_t^i/dW_rec[i, j] = z_{t-1}^j (j != i)
    local           the diagonal blocks: [[alpha - v_th psi, v_th beta psi],
                                          [psi,             rho - beta psi]]   (SnAp-1)
    eligibility     Bellec's: [[alpha, 0], [psi, rho - beta psi]]

e-prop's eligibility holds the recurrent spikes fixed where they enter the membrane
potentials, of other units (W_rec) and of the unit itself: the reset ``- v_th z_{t-1}``
included. That is Bellec et al.'s choice: their ``stop_z_gradients`` detaches z before both
``W_rec z`` and the reset ``z v_th``, and their traces ``eps^v <- alpha eps^v + z_pre`` carry
no reset term; the adaptation ``a_t = rho a_{t-1} + z_{t-1}`` keeps its own spike ("the
eligibility traces of b see the spike of the own neuron"), giving
``eps^a <- (rho - beta psi) eps^a + psi eps^v`` and ``e_t = psi_t (eps^v_t - beta eps^a_t)``
(LIF: ``e_t = psi_t eps^v_t``, eps^v the alpha-filtered presynaptic input). SnAp-1's
``local`` keeps every path within the unit, the reset's ``-v_th psi`` included.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .base import Cell, Immediate, Linearization, check_factory
from .elman import check_sizes
from .surrogate import Surrogate, get_surrogate

__all__ = ["LIF", "ALIF", "LIFState", "LIFRefractoryState", "ALIFState",
           "ALIFRefractoryState", "bellec_beta"]


class LIFState(NamedTuple):
    """A LIF layer's state: the membrane potential ``v`` (B, U)."""

    v: Tensor  # (B, U) membrane potential


class LIFRefractoryState(NamedTuple):
    """A LIF layer's state with a refractory period: ``v`` and the refractory
    counter ``q``, each (B, U)."""

    v: Tensor  # (B, U) membrane potential
    q: Tensor  # (B, U) refractory steps left (0: free to spike), integer-valued


class ALIFState(NamedTuple):
    """An ALIF layer's state: the membrane potential ``v`` and the threshold
    adaptation ``a``, each (B, U)."""

    v: Tensor  # (B, U) membrane potential
    a: Tensor  # (B, U) threshold adaptation


class ALIFRefractoryState(NamedTuple):
    """An ALIF layer's state with a refractory period: ``v``, ``a`` and the
    refractory counter ``q``, each (B, U)."""

    v: Tensor  # (B, U) membrane potential
    a: Tensor  # (B, U) threshold adaptation
    q: Tensor  # (B, U) refractory steps left (0: free to spike), integer-valued


def _number(name: str, value, *, positive: bool = True) -> float:
    if (not isinstance(value, (int, float)) or isinstance(value, bool)
            or not math.isfinite(value) or (value <= 0 if positive else value < 0)):
        kind = "a positive" if positive else "a non-negative"
        raise ValueError(f"{name} must be {kind} finite number, got {value!r}")
    return float(value)


def _time_constant(name: str, tau, dt: float) -> float:
    tau = _number(f"{name} (ms)", tau)
    if dt > tau:
        raise ValueError(f"dt = {dt:g} ms is larger than {name} = {tau:g} ms: the Euler step "
                         f"exp(-dt / {name}) would skip the dynamics; use dt <= {name}")
    return tau


def bellec_beta(tau_m: float, tau_a: float, dt: float = 1.0) -> float:
    """Bellec et al.'s heuristic adaptation strength (their evidence-accumulation tutorial):
    ``beta = 1.7 (1 - rho) / (1 - alpha)``; 0.0174 for tau_m = 20, tau_a = 2000, dt = 1 ms."""
    alpha, rho = math.exp(-dt / tau_m), math.exp(-dt / tau_a)
    return 1.7 * (1.0 - rho) / (1.0 - alpha)


class _Spiking(Cell):
    """What LIF and ALIF share; not a cell on its own."""

    adaptive = False

    def __init__(self, input_size: int, hidden_size: int, *, tau_m: float, dt: float,
                 v_th: float, t_ref: float, surrogate, gamma, dtype, device) -> None:
        super().__init__()
        check_sizes(input_size=input_size, hidden_size=hidden_size)
        check_factory(dtype, device)
        self.input_size, self.hidden_size = input_size, hidden_size
        self.dt = _number("dt (ms)", dt)
        self.tau_m = _time_constant("tau_m", tau_m, self.dt)
        self.alpha = math.exp(-self.dt / self.tau_m)
        self.v_th = _number("v_th", v_th)
        self.t_ref = _number("t_ref (ms)", t_ref, positive=False)
        self.n_ref = int(round(self.t_ref / self.dt))
        if isinstance(surrogate, Surrogate):
            if gamma is not None:
                raise ValueError(f"gamma is set by the surrogate {surrogate!r}; give gamma only "
                                 "with a surrogate name")
            self.surrogate = surrogate
        else:
            self.surrogate = get_surrogate(surrogate, 0.3 if gamma is None else gamma)
        kw = {"dtype": dtype, "device": device}
        U = hidden_size
        self.W_in = nn.Parameter(torch.empty(U, input_size, **kw))
        self.W_rec = nn.Parameter(torch.empty(U, U, **kw))
        self.register_buffer("offdiag", 1.0 - torch.eye(U, **kw), persistent=False)
        self.reset_parameters()

    @property
    def refractory(self) -> bool:
        return self.n_ref > 1

    def reset_parameters(self) -> None:
        """Bellec et al.'s draws: W_in ~ N(0, 1/D), W_rec ~ N(0, 1/U), diagonal zero."""
        with torch.no_grad():
            self.W_in.normal_(0.0, 1.0 / math.sqrt(self.input_size))
            self.W_rec.normal_(0.0, 1.0 / math.sqrt(self.hidden_size))
            self.W_rec.diagonal().zero_()

    def param_blocks(self) -> dict[str, int | None]:
        return {"W_in": 1, "W_rec": 1}

    def _beta(self):
        return 0.0

    def extra_repr(self) -> str:
        ref = f", t_ref={self.t_ref:g}" if self.refractory else ""
        return (f"input_size={self.input_size}, hidden_size={self.hidden_size}, "
                f"tau_m={self.tau_m:g}, dt={self.dt:g}, v_th={self.v_th:g}{ref}, "
                f"surrogate={self.surrogate!r}")

    # ---- the protocol -----------------------------------------------------------------

    def _state_type(self):
        raise NotImplementedError

    def init_state(self, batch_size: int):
        p = self.W_rec
        n = len(self._state_type()._fields)
        return self._state_type()(*(torch.zeros(batch_size, self.hidden_size, dtype=p.dtype,
                                                device=p.device) for _ in range(n)))

    def _u(self, state) -> Tensor:
        """(v - A) / v_th."""
        if self.adaptive:
            return (state.v - self.v_th - self._beta() * state.a) / self.v_th
        return (state.v - self.v_th) / self.v_th

    def _free(self, state) -> Tensor | None:
        """1 where the unit may spike (no refractory steps left); None without refractoriness."""
        return (state.q <= 0).to(state.v.dtype) if self.refractory else None

    def output(self, state) -> Tensor:
        """z = H((v - A) / v_th), zero while refractory; slope psi (the module docstring)."""
        z = self.surrogate.spike(self._u(state))
        free = self._free(state)
        return z if free is None else z * free

    def output_vjp(self, state, g: Tensor) -> Tensor:
        """``(d output / d state)^T g`` flattened (B, S), in closed form: the spike's slope
        psi on v, ``-beta psi`` on a, nothing on the counter (what a vjp of ``output`` gives,
        without autograd: the sequence forms call it on every step's rows at once)."""
        psi = self.surrogate.derivative(self._u(state)) / self.v_th
        free = self._free(state)
        gv = g * psi if free is None else g * psi * free
        parts = [gv]
        if self.adaptive:
            parts.append(gv * -self._beta())
        if self.refractory:
            parts.append(torch.zeros_like(gv))
        return torch.cat(parts, 1) if len(parts) > 1 else gv

    def _advance(self, params, state, x: Tensor, z: Tensor):
        """The new state from the previous one and its spikes z = output(state)."""
        return self._next(state, x @ params["W_in"].T, z, (params["W_rec"] * self.offdiag).T)

    def _next(self, state, current: Tensor, z: Tensor, W_rec_T: Tensor):
        """As ``_advance``, with the input current ``W_in x_t`` (B, U) given."""
        v = torch.addmm(self.alpha * state.v - self.v_th * z + current, z, W_rec_T)
        new = [v]
        if self.adaptive:
            new.append(self.rho * state.a + z)
        if self.refractory:
            # a counter, no derivative (Bellec's stop_gradient on r)
            new.append(((state.q - 1.0).clamp(min=0.0) + (self.n_ref - 1) * z).detach())
        return self._state_type()(*new)

    def step(self, params, state, x: Tensor):
        return self._advance(params, state, x, self.output(state))

    # ---- structure --------------------------------------------------------------------

    def linearize(self, params, state, x: Tensor, *, need=()) -> Linearization:
        with torch.no_grad():
            u = self._u(state)
            z = (u > 0).to(u.dtype)
            psi = self.surrogate.derivative(u) / self.v_th  # dz_{t-1}/dv_{t-1}
            free = self._free(state)
            if free is not None:
                z, psi = z * free, psi * free
            new = self._advance(params, state, x, z)
        if not need:
            return Linearization(new)
        return self._linearization(params, state, x, z, psi, new, need)

    def linearize_sequence(self, params, inputs: Tensor, state0, *, need=()):
        """The forward pass over the sequence and ``linearize`` at every step from the
        spikes and slopes it keeps (no second evaluation of the step): ``(prev, new,
        outputs, Linearization on the (T B) rows)`` (what the sequence forms of the
        truncated rules use). The states, spikes and slopes of every step are written
        into (T + 1, B, U) buffers (prev and new are views of them); the slopes are
        computed after the loop, on every step at once; the per-unit blocks are built
        with their entries contiguous. ``"weigh"`` in ``need``: the immediate factor
        (ones on v) is folded as lambda's v row, no product."""
        if "jacobian" in need or "input_jacobian" in need:
            return self._linearize_sequence_steps(params, inputs, state0, need)
        T, B, U = inputs.shape[0], inputs.shape[1], self.hidden_size
        N = T * B
        C = len(state0)
        fields = [f for f in ("local", "eligibility") if f in need]
        # the blocks' entries, each (T + 1, B, U) (the last step unused); every entry is
        # written below but the counter's (zero). ALIF's (1, 0) entry is psi itself: the
        # forward computes the slopes there
        Jb = None
        if fields:
            Jb = (inputs.new_zeros if self.refractory else inputs.new_empty)(C, C, T + 1, B, U)
        full, Z, psi = self._forward_kept(params, inputs, state0,
                                          Jb[1, 0] if Jb is not None and self.adaptive else None)
        St = type(state0)
        prev, new = St(*(f[:-1] for f in full)), St(*(f[1:] for f in full))
        ps = psi[:-1]  # psi_{t-1}: the slope of the spike entering step t
        out = {}
        for n, field in enumerate(fields):
            if n:
                Jb = Jb.clone()
            J = Jb[:, :, :T]
            if field == "local":  # the reset's -v_th psi (and W_rec[i, i] = 0)
                torch.mul(ps, -self.v_th, out=J[0, 0]).add_(self.alpha)
            else:
                J[0, 0].fill_(self.alpha)
            if self.adaptive:
                bpsi = torch.mul(ps, self.beta, out=J[1, 1])
                if field == "local":
                    torch.mul(bpsi, self.v_th, out=J[0, 1])
                elif not self.refractory:
                    J[0, 1].zero_()
                torch.sub(self.rho, bpsi, out=J[1, 1])
            out[field] = J.permute(2, 3, 4, 0, 1).reshape(N, U, C, C)
        if "immediate" in need:
            x = inputs.reshape(N, 1, -1)
            z = Z[:-1].reshape(N, 1, U)
            if "weigh" in need:
                def weigh(lam: Tensor) -> Tensor:
                    return lam[:, :1]  # D: ones on v, zero elsewhere

                out["immediate"] = {"W_in": Immediate(None, x, None, weigh),
                                    "W_rec": Immediate(None, z, self.offdiag, weigh)}
            else:
                D = psi.new_zeros(1, C, 1, U)
                D[:, 0] = 1.0
                D = D.expand(N, C, 1, U)
                out["immediate"] = {"W_in": Immediate(D, x),
                                    "W_rec": Immediate(D, z, self.offdiag)}
        lin = Linearization(new, **out)
        if "emit_vjp" not in need:
            return prev, new, Z[1:], lin
        ps_new = psi[1:].view(N, U)  # the slopes of the outputs z_1..z_T

        def emit_vjp(g: Tensor):
            """As ``output_vjp`` on the new states, from the slopes the forward kept."""
            q = g.new_empty(N, C, U)
            gv = torch.mul(g, ps_new, out=q[:, 0])
            if self.adaptive:
                torch.mul(gv, -self.beta, out=q[:, 1])
            if self.refractory:
                q[:, -1].zero_()
            return {}, q.view(N, C * U), None

        return prev, new, Z[1:], lin, emit_vjp

    def block_zeros(self, field: str, C: int) -> frozenset:
        """The entries (c, d) of the per-unit blocks that are zero at every step (what the
        sequence forms skip in their lambda recursion): the refractory counter's row and
        column, and in e-prop's block the membrane's dependence on a (Bellec's)."""
        q = C - 1 if self.refractory else -1
        out = {(c, d) for c in range(C) for d in range(C) if q in (c, d)}
        if self.adaptive and field == "eligibility":
            out.add((0, 1))
        return frozenset(out)

    @torch.no_grad()
    def _forward_kept(self, params, inputs: Tensor, state0, num: Tensor | None = None):
        """The forward pass into preallocated buffers: ``(components (T + 1, B, U) each:
        the states s_0..s_T, Z (T + 1, B, U) the spikes z_0..z_T, psi (T + 1, B, U) their
        slopes)``. Per step: u's numerator v - v_th - beta a, the spike (u > 0 as
        numerator > 0, v_th > 0), the new state; u and psi after the loop, in place in
        ``num`` (a (T + 1, B, U) buffer, or a new one)."""
        T, B, _ = inputs.shape
        U = self.hidden_size
        I_in = (inputs.reshape(-1, self.input_size) @ params["W_in"].detach().T).view(T, B, U)
        W_rec_T = (params["W_rec"].detach() * self.offdiag).T
        full = [I_in.new_empty(T + 1, B, U) for _ in state0]
        for f, c in zip(full, state0):
            f[0] = c
        V = full[0].unbind(0)
        A_ = full[1].unbind(0) if self.adaptive else None
        Q = full[-1].unbind(0) if self.refractory else None
        if num is None:
            num = I_in.new_empty(T + 1, B, U)  # (v - v_th - beta a)
        Z = I_in.new_empty(T + 1, B, U)
        Ns, Zs = num.unbind(0), Z.unbind(0)
        free = I_in.new_empty(T + 1, B, U) if self.refractory else None
        Fr = free.unbind(0) if free is not None else None
        tmp = I_in.new_empty(B, U)
        beta, v_th, alpha = self._beta(), self.v_th, self.alpha
        for t in range(T + 1):
            n = torch.sub(V[t], v_th, out=Ns[t])
            if self.adaptive:
                n.sub_(torch.mul(A_[t], beta, out=tmp))
            z = torch.gt(n, 0.0, out=Zs[t])
            if Fr is not None:
                z.mul_(torch.le(Q[t], 0.0, out=Fr[t]))
            if t == T:
                break
            v = torch.mul(V[t], alpha, out=V[t + 1])
            v.sub_(torch.mul(z, v_th, out=tmp)).add_(I_in[t]).addmm_(z, W_rec_T)
            if self.adaptive:
                torch.mul(A_[t], self.rho, out=A_[t + 1]).add_(z)
            if Q is not None:
                torch.sub(Q[t], 1.0, out=Q[t + 1]).clamp_(min=0.0).add_(z, alpha=self.n_ref - 1)
        psi = self.surrogate.derivative_(num.div_(v_th)).div_(v_th)  # over u
        if free is not None:
            psi.mul_(free)
        return full, Z, psi

    def _linearize_sequence_steps(self, params, inputs: Tensor, state0, need):
        kept: list = []
        zs, _, (z_prev, psis) = self._forward(params, inputs, state0, kept)
        full = type(state0)(*(torch.stack(c) for c in zip(*kept)))
        prev = type(state0)(*(f[:-1] for f in full))
        new = type(state0)(*(f[1:] for f in full))
        T, B, U = zs.shape
        N = T * B

        def rows(s):
            return type(s)(*(c.reshape(N, U) for c in s))

        lin = self._linearization(params, rows(prev), inputs.reshape(N, -1),
                                  z_prev.reshape(N, U), psis[:-1].reshape(N, U), rows(new),
                                  need)
        return prev, new, zs, lin

    def _linearization(self, params, state, x, z, psi, new, need) -> Linearization:
        B, U = z.shape
        C = len(new)
        alpha, v_th = self.alpha, self.v_th
        ada = self.adaptive
        beta = self._beta()
        bpsi = beta * psi if ada else None
        out = {}
        if "local" in need or "eligibility" in need:
            for field in ("local", "eligibility"):
                if field not in need:
                    continue
                J = psi.new_zeros(B, U, C, C)
                # the reset's -v_th psi (and W_rec[i, i] = 0) only in SnAp-1's local block
                J[..., 0, 0] = alpha - v_th * psi if field == "local" else alpha
                if ada:
                    if field == "local":
                        J[..., 0, 1] = v_th * bpsi
                    J[..., 1, 0] = psi
                    J[..., 1, 1] = self.rho - bpsi
                out[field] = J
        if "immediate" in need:
            D = psi.new_zeros(1, C, 1, U)
            D[:, 0] = 1.0  # only v_t moves within the step: the same for every example
            D = D.expand(B, C, 1, U)
            # z_{t-1}^j for j != i: one row shared by the units, the diagonal masked
            out["immediate"] = {"W_in": Immediate(D, x.unsqueeze(1)),
                                "W_rec": Immediate(D, z.unsqueeze(1), self.offdiag)}
        if "jacobian" in need:
            S = C * U
            J = psi.new_zeros(B, S, S)
            Wz = params["W_rec"].detach() * self.offdiag
            Wz = Wz - v_th * torch.eye(U, dtype=Wz.dtype, device=Wz.device)  # d v_t / d z_{t-1}
            J[:, :U, :U] = Wz * psi.unsqueeze(1)
            J[:, :U, :U].diagonal(dim1=1, dim2=2).add_(alpha)
            if ada:
                J[:, :U, U:2 * U] = -Wz * bpsi.unsqueeze(1)
                J[:, U:2 * U, :U].diagonal(dim1=1, dim2=2).copy_(psi)
                J[:, U:2 * U, U:2 * U].diagonal(dim1=1, dim2=2).copy_(self.rho - bpsi)
            out["jacobian"] = J
        if "input_jacobian" in need:
            Jx = psi.new_zeros(B, C * U, self.input_size)
            Jx[:, :U] = params["W_in"].detach()
            out["input_jacobian"] = Jx
        return Linearization(new, **out)

    # ---- whole-sequence BPTT through the surrogate -----------------------------------

    def forward_sequence(self, params, inputs: Tensor, state0, *, cache: bool = False):
        """``(outputs z_1..z_T (T, B, U), state_T, cache)``.

        The cache holds z_0..z_{T-1} (T, B, U) and psi_0..psi_T (T + 1, B, U). When autograd
        would record, the outputs come from a loop of ``step`` so that they stay
        differentiable.
        """
        _check_inputs(self, inputs)
        records = torch.is_grad_enabled() and (
            inputs.requires_grad or any(s.requires_grad for s in state0)
            or any(p.requires_grad for p in params.values()))
        if records:
            outs, sT, _ = Cell.forward_sequence(self, params, inputs, state0)
            c = None
            if cache:
                with torch.no_grad():
                    c = self._forward(params, inputs, state0)[2]
            return outs, sT, c
        zs, sT, c = self._forward(params, inputs, state0)
        return zs, sT, (c if cache else None)

    def forward_states(self, params, inputs: Tensor, state0):
        """``(state of (T + 1, B, U) components: s_0..s_T, outputs z_1..z_T)``: the forward
        pass below, keeping the states (what the sequence forms of the truncated rules
        linearize at)."""
        kept: list = []
        zs, _, _ = self._forward(params, inputs, state0, kept)
        return type(state0)(*(torch.stack(c) for c in zip(*kept))), zs

    @torch.no_grad()
    def _forward(self, params, inputs: Tensor, state0, kept: list | None = None):
        T = inputs.shape[0]
        # the input current of every step as one GEMM
        I_in = (inputs.reshape(-1, self.input_size) @ params["W_in"].detach().T).view(
            T, -1, self.hidden_size)
        W_rec_T = (params["W_rec"].detach() * self.offdiag).T
        s = type(state0)(*(c.detach() for c in state0))
        z_prev, psis, zs = [], [], []
        for t in range(T + 1):
            if kept is not None:
                kept.append(s)
            u = self._u(s)
            z = (u > 0).to(u.dtype)
            psi = self.surrogate.derivative(u) / self.v_th
            free = self._free(s)
            if free is not None:
                z, psi = z * free, psi * free
            psis.append(psi)
            if t > 0:
                zs.append(z)
            if t == T:
                break
            z_prev.append(z)
            s = self._next(s, I_in[t], z, W_rec_T)
        return torch.stack(zs), s, (torch.stack(z_prev), torch.stack(psis))

    def backward_sequence(self, params, inputs: Tensor, state0, cache, d_outputs: Tensor,
                          d_state=None, *, input_grad: bool = True):
        """The adjoint pass, from the last step (gz, gv, ga: dL/dz_t, dL/dv_t, dL/da_t)::

            gz_t = dL/dz_t from outside + (W' - v_th I)^T gv_{t+1} + ga_{t+1}
            gv_t = alpha gv_{t+1} + psi_t gz_t,   ga_t = rho ga_{t+1} - beta psi_t gz_t
            dW_in = sum_t gv_t x_t^T,  dW_rec = sum_t gv_t z_{t-1}^T (zero diagonal),
            dx_t = W_in^T gv_t,  dL/d state_0 = (gv_0, ga_0)

        for t = T .. 0 (z_0 = output(state_0) enters step 1 but no loss).
        """
        if cache is None:
            raise ValueError("backward_sequence needs the cache of forward_sequence(..., cache=True)")
        z_prev, psis = cache
        T, B, _ = inputs.shape
        U = self.hidden_size
        if tuple(d_outputs.shape) != (T, B, U):
            raise ValueError(f"d_outputs has shape {tuple(d_outputs.shape)} but expected "
                             f"({T}, {B}, {U})")
        ada = self.adaptive
        with torch.no_grad():
            W_in = params["W_in"].detach()
            Wz = params["W_rec"].detach() * self.offdiag
            Wz = Wz - self.v_th * torch.eye(U, dtype=Wz.dtype, device=Wz.device)
            beta = self._beta()
            d_out = d_outputs.detach()
            gv_all = torch.empty(T, B, U, dtype=d_out.dtype, device=d_out.device)
            gv = ga = None
            for t in range(T, -1, -1):
                gz = d_out[t - 1].clone() if t > 0 else torch.zeros_like(psis[0])
                if gv is not None:
                    gz.addmm_(gv, Wz)
                    if ada:
                        gz.add_(ga)
                pg = psis[t] * gz
                new_gv = pg if gv is None else torch.add(pg, gv, alpha=self.alpha)
                if ada:
                    new_ga = -beta * pg if ga is None else self.rho * ga - beta * pg
                if t == T and d_state is not None:
                    new_gv = new_gv + d_state.v.detach()
                    if ada:
                        new_ga = new_ga + d_state.a.detach()
                gv = new_gv
                if ada:
                    ga = new_ga
                if t > 0:
                    gv_all[t - 1] = gv
            G = gv_all.view(T * B, U)
            dW_rec = (G.T @ z_prev.reshape(T * B, U)) * self.offdiag
            grads = {"W_in": G.T @ inputs.detach().reshape(T * B, -1), "W_rec": dW_rec}
            d_inputs = (G @ W_in).view(T, B, -1) if input_grad else None
            d0 = [gv]
            if ada:
                d0.append(ga)
            if self.refractory:
                d0.append(torch.zeros_like(gv))
        return grads, d_inputs, self._state_type()(*d0)

    # ---- checks -----------------------------------------------------------------------

    def check_state(self, state, batch_size: int, *, name: str = "state") -> None:
        """Shapes, dtype and device as every cell; here also finite values and, with a
        refractory period, a counter q of whole steps in [0, n_ref - 1]."""
        super().check_state(state, batch_size, name=name)
        for f, c in zip(state._fields if hasattr(state, "_fields") else (), state):
            if not bool(torch.isfinite(c).all()):
                raise ValueError(f"{name}.{f} of {type(self).__name__} contains NaN or Inf "
                                 "entries")
        if self.refractory:
            q = state[-1]
            ok = (q >= 0) & (q <= self.n_ref - 1) & (q == q.round())
            if not bool(ok.all()):
                bad = q[~ok].flatten()[0].item()
                raise ValueError(f"{name}.q of {type(self).__name__} counts refractory steps "
                                 f"left and must hold whole numbers in [0, {self.n_ref - 1}] "
                                 f"(n_ref = {self.n_ref}), got {bad!r}")

    def forward(self, x: Tensor, state=None):
        """One step with the cell's own parameters; the state is checked first."""
        if state is None:
            state = self.init_state(x.shape[0])
        else:
            self.check_state(state, x.shape[0])
        return self.step(self.params(), state, x)


def _check_inputs(cell: Cell, inputs: Tensor) -> None:
    if inputs.dim() != 3 or inputs.shape[2] != cell.input_size:
        raise ValueError(f"inputs has shape {tuple(inputs.shape)} but {type(cell).__name__} "
                         f"expects (T, B, {cell.input_size})")


class LIF(_Spiking):
    """Leaky integrate-and-fire neurons (Bellec et al. 2020; the module docstring).

    Args:
        input_size: D.  hidden_size: U, the number of neurons.
        tau_m: membrane time constant (ms); alpha = exp(-dt / tau_m).
        dt: the time step (ms), at most tau_m.
        v_th: the firing threshold (> 0); also the reset (by subtraction) and the scale of u.
        t_ref: refractory period (ms): spikes at least round(t_ref / dt) steps apart; 0: none.
        surrogate: "triangle" (Bellec's), "superspike", "arctan" (``rnngrad.cells.surrogate``),
            or a ``Surrogate``.
        gamma: the pseudo-derivative's peak dz/du (default 0.3, Bellec's dampening factor);
            only with a surrogate name.

    Parameters: ``W_in (U, D)``, ``W_rec (U, U)`` (diagonal unused). State: ``LIFState(v)``,
    or ``LIFRefractoryState(v, q)`` with a refractory period. ``output(state)`` is the spikes z.
    """

    def __init__(self, input_size: int, hidden_size: int, *, tau_m: float = 20.0,
                 dt: float = 1.0, v_th: float = 0.6, t_ref: float = 0.0,
                 surrogate: str | Surrogate = "triangle", gamma: float | None = None,
                 dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__(input_size, hidden_size, tau_m=tau_m, dt=dt, v_th=v_th, t_ref=t_ref,
                         surrogate=surrogate, gamma=gamma, dtype=dtype, device=device)

    def _state_type(self):
        return LIFRefractoryState if self.refractory else LIFState


class ALIF(_Spiking):
    """Adaptive leaky integrate-and-fire neurons (Bellec et al. 2020's LSNN units).

    Args: those of ``LIF``, and
        tau_a: adaptation time constant (ms); rho = exp(-dt / tau_a).
        beta: adaptation strength, one number or one per unit (U values, >= 0; 0 makes a
            unit a LIF neuron, as in Bellec's mixed networks). None: Bellec's heuristic
            ``bellec_beta(tau_m, tau_a, dt)`` for every unit.

    Parameters: ``W_in (U, D)``, ``W_rec (U, U)`` (diagonal unused). State:
    ``ALIFState(v, a)``, or ``ALIFRefractoryState(v, a, q)``; ``output(state)`` is z.
    """

    adaptive = True

    def __init__(self, input_size: int, hidden_size: int, *, tau_m: float = 20.0,
                 tau_a: float = 2000.0, dt: float = 1.0, v_th: float = 0.6,
                 beta: float | Sequence[float] | Tensor | None = None, t_ref: float = 0.0,
                 surrogate: str | Surrogate = "triangle", gamma: float | None = None,
                 dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__(input_size, hidden_size, tau_m=tau_m, dt=dt, v_th=v_th, t_ref=t_ref,
                         surrogate=surrogate, gamma=gamma, dtype=dtype, device=device)
        self.tau_a = _time_constant("tau_a", tau_a, self.dt)
        self.rho = math.exp(-self.dt / self.tau_a)
        if beta is None:
            beta = bellec_beta(self.tau_m, self.tau_a, self.dt)
        like = self.W_rec
        if isinstance(beta, (int, float)) and not isinstance(beta, bool):
            b = torch.full((hidden_size,), float(beta), dtype=like.dtype, device=like.device)
        else:
            try:
                b = torch.as_tensor(beta, dtype=like.dtype).to(like.device).flatten()
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(f"beta must be a number, {hidden_size} numbers or None, got "
                                f"{type(beta).__name__}") from None
            if b.numel() != hidden_size:
                raise ValueError(f"beta has {b.numel()} values but the cell has {hidden_size} "
                                 "units: give one number or one per unit")
        if not bool(torch.isfinite(b).all()) or bool((b < 0).any()):
            raise ValueError(f"beta must be finite and >= 0, got {beta!r}")
        self.register_buffer("beta", b)

    def _beta(self):
        return self.beta

    def _state_type(self):
        return ALIFRefractoryState if self.refractory else ALIFState

    def extra_repr(self) -> str:
        b = self.beta
        bs = f"{float(b[0]):g}" if bool((b == b[0]).all()) else "per unit"
        return super().extra_repr() + f", tau_a={self.tau_a:g}, beta={bs}"
