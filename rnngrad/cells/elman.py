"""The Elman cell, leaky or vanilla, with its hand-derived BPTT (Werbos 1990).

In DESIGN.md's notation::

    a_t = W_in x_t + W_rec h_{t-1} + b_rec            pre-activation
    h_t = (1 - alpha) h_{t-1} + alpha * phi(a_t)      alpha = 1: the vanilla cell

Backward (``backward``), from ``u_{T+1} = 0`` and ``delta_{T+1} = 0``::

    hbar_t  = dL/dh_t arriving from outside (readout, next layer, reward)
    delta_t = hbar_t + W_rec^T u_{t+1} + (1 - alpha) delta_{t+1}   dL/dh_t, total
    u_t     = alpha phi'(a_t) * delta_t                         dL/da_t = dL/db_rec(t)
    dW_rec  = sum_t u_t h_{t-1}^T,  dW_in = sum_t u_t x_t^T,  db_rec = sum_t u_t
    dh_0    = W_rec^T u_1 + (1 - alpha) delta_1,   dx_t = W_in^T u_t

Structure declared for the online rules (one state component, so C = 1; every
parameter is owned row by row, G = 1)::

    immediate     d h_t^i / d W[i, j] = alpha phi'(a_t^i) pre_t^j,  pre = x_t | h_{t-1} | 1
    local         d h_t^i / d h_{t-1}^i = (1 - alpha) + alpha phi'(a_t^i) W_rec[i, i]   (SnAp-1)
    eligibility   (1 - alpha): the leak only; h_{t-1} entering through W_rec, the unit's own
                  output included, is held fixed (Bellec et al. 2020's e-prop). A constant,
                  declared as ``eligibility_decay``: e-prop's trace is then updated in one
                  pass, and for alpha = 1 it is the immediate term itself, never stored
    jacobian      (1 - alpha) I + alpha diag(phi'(a_t)) W_rec,  input_jacobian alpha diag(phi') W_in
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .activations import Activation, get_activation
from .base import Cell, Immediate, Linearization, check_factory

Grads = dict[str, Tensor]

__all__ = ["Elman", "ElmanState", "INITS", "cell_step", "pre_activation", "unroll", "backward"]

INITS = ("uniform", "orthogonal", "normal", "identity")


class ElmanState(NamedTuple):
    """The Elman cell's state: the hidden state ``h`` (B, H)."""

    h: Tensor  # (B, H)


class _View:
    """Named tensors with the attributes ``unroll`` and ``backward`` read."""

    def __init__(self, params, cell) -> None:
        self.W_in, self.W_rec, self.b_rec = params["W_in"], params["W_rec"], params["b_rec"]
        self.alpha, self.activation = cell.alpha, cell.activation
        self.hidden_size, self.input_size = cell.hidden_size, cell.input_size

    def parameters(self):
        return iter((self.W_in, self.W_rec, self.b_rec))


def init_recurrent(W_rec: Tensor, init: str) -> None:
    """Draw W_rec (H, H) in place: uniform, orthogonal, normal or identity."""
    H = W_rec.shape[0]
    bound = 1.0 / math.sqrt(H)
    with torch.no_grad():
        if init == "uniform":
            W_rec.uniform_(-bound, bound)
        elif init == "orthogonal":
            nn.init.orthogonal_(W_rec)
        elif init == "normal":
            W_rec.normal_(0.0, bound)
        else:
            W_rec.copy_(torch.eye(H, dtype=W_rec.dtype))


def check_sizes(**sizes) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


class Elman(Cell):
    """The (leaky) Elman cell ``h_t = (1 - alpha) h_{t-1} + alpha phi(W_in x_t + W_rec h_{t-1} + b_rec)``.

    Args:
        input_size: D.  hidden_size: H.
        activation: phi, one of ``rnngrad.cells.ACTIVATIONS``.
        alpha: leak in (0, 1]; 1 is the vanilla cell.
        init: W_rec's draw: "uniform" (U(-1/sqrt(H), 1/sqrt(H)), as the other
            parameters), "orthogonal", "normal" (N(0, 1/H)) or "identity" (with relu: IRNN).

    Parameters: ``W_in (H, D)``, ``W_rec (H, H)``, ``b_rec (H,)``. State: ``ElmanState(h)``.
    """

    def __init__(self, input_size: int, hidden_size: int, *, activation: str = "tanh",
                 alpha: float = 1.0, init: str = "uniform", dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        check_sizes(input_size=input_size, hidden_size=hidden_size)
        check_factory(dtype, device)
        if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool)
                and 0.0 < float(alpha) <= 1.0):
            raise ValueError(f"alpha must be a float in (0, 1], got {alpha!r}")
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; known inits: {', '.join(INITS)}")
        self.activation = get_activation(activation).name
        self.alpha = float(alpha)
        self.init = init
        self.input_size, self.hidden_size = input_size, hidden_size
        kw = {"dtype": dtype, "device": device}
        self.W_in = nn.Parameter(torch.empty(hidden_size, input_size, **kw))
        self.W_rec = nn.Parameter(torch.empty(hidden_size, hidden_size, **kw))
        self.b_rec = nn.Parameter(torch.empty(hidden_size, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw ``W_in`` (H, D) and ``b_rec`` (H,) uniformly in +-1/sqrt(H), ``W_rec``
        (H, H) by the ``init`` given."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            self.W_in.uniform_(-bound, bound)
            self.b_rec.uniform_(-bound, bound)
        init_recurrent(self.W_rec, self.init)

    def extra_repr(self) -> str:
        return (f"input_size={self.input_size}, hidden_size={self.hidden_size}, "
                f"activation={self.activation!r}, alpha={self.alpha}")

    def init_state(self, batch_size: int) -> ElmanState:
        p = self.W_rec
        return ElmanState(torch.zeros(batch_size, self.hidden_size, dtype=p.dtype, device=p.device))

    def step(self, params, state: ElmanState, x: Tensor) -> ElmanState:
        act = get_activation(self.activation)
        h = state.h
        a = torch.addmm(torch.addmm(params["b_rec"], x, params["W_in"].T), h, params["W_rec"].T)
        fa = act.fn(a)
        return ElmanState(fa if self.alpha == 1.0 else torch.lerp(h, fa, self.alpha))

    def output(self, state: ElmanState) -> Tensor:
        return state.h

    def param_blocks(self) -> dict[str, int | None]:
        return {"W_in": 1, "W_rec": 1, "b_rec": 1}

    @property
    def eligibility_decay(self) -> float:
        """``eligibility_jacobian`` is this number times the identity at every step: the
        leak 1 - alpha."""
        return 1.0 - self.alpha

    def linearize(self, params, state: ElmanState, x: Tensor, *, need=()) -> Linearization:
        act = get_activation(self.activation)
        alpha = self.alpha
        W_rec = params["W_rec"]
        h_prev = state.h
        # cell_step's operations, without its two calls (an online step calls this each step)
        W_inT, W_recT, diag = _transposed(self, params["W_in"], W_rec)
        a = torch.addmm(torch.addmm(params["b_rec"], x, W_inT), h_prev, W_recT)
        fa = act.fn(a)
        h = fa if alpha == 1.0 else torch.lerp(h_prev, fa, alpha)
        d = act.deriv(a, fa)
        if alpha != 1.0:
            d = d * alpha  # alpha phi'(a_t): dh_t/da_t
        B, H = h.shape
        loc = elig = imm = J = Jx = None
        if "local" in need:
            loc = d * diag
            loc = (loc if alpha == 1.0 else loc.add_(1.0 - alpha)).view(B, H, 1, 1)
        if "eligibility" in need:
            elig = torch.full((B, H, 1, 1), 1.0 - alpha, dtype=h.dtype, device=h.device)
        if "immediate" in need:
            D = d.view(B, 1, 1, H)
            imm = {"W_in": Immediate(D, x.unsqueeze(1)),
                   "W_rec": Immediate(D, h_prev.unsqueeze(1)),
                   "b_rec": Immediate(D, _ones(B, h))}
        if "jacobian" in need:
            J = d.unsqueeze(2) * W_rec
            if alpha != 1.0:
                J.diagonal(dim1=1, dim2=2).add_(1.0 - alpha)
        if "input_jacobian" in need:
            Jx = d.unsqueeze(2) * params["W_in"]
        return Linearization(ElmanState(h), loc, elig, imm, J, Jx)

    def block_zeros(self, field: str, C: int) -> frozenset:
        """e-prop's and RFLO's block ``1 - alpha`` is zero at alpha = 1: the sequence forms'
        lambda recursion then has nothing to carry."""
        return frozenset({(0, 0)}) if field == "eligibility" and self.alpha == 1.0 \
            else frozenset()

    def linearize_sequence(self, params, inputs: Tensor, state0: ElmanState, *, need=()):
        """The forward pass (one GEMM for every step's input) and ``linearize`` at every
        step from phi'(a_t) it keeps (from h_t for tanh and sigmoid): ``(prev, new,
        outputs, Linearization on the (T B) rows)`` (what the sequence forms of the
        truncated rules use)."""
        act = get_activation(self.activation)
        alpha = self.alpha
        per_step = alpha == 1.0 and act.deriv_from_output
        T, B, _ = inputs.shape
        H = self.hidden_size
        N = T * B
        if per_step:  # h_1..h_T written in place after h_0: prev and new are views
            full = inputs.new_empty(T + 1, B, H)
            full[0] = state0.h
            with torch.no_grad():
                hs, dphi = unroll(_View(params, self), inputs, state0.h, need_deriv=False,
                                  out=full[1:])
            prev = full[:-1]
        else:
            hs, dphi = unroll(_View(params, self), inputs, state0.h, need_deriv=True)
            prev = torch.cat((state0.h.unsqueeze(0), hs[:-1]))
        d = (act.deriv(None, hs) if per_step else dphi).reshape(N, H)
        if alpha != 1.0:
            d = d * alpha  # alpha phi'(a_t): dh_t/da_t
        out = {}
        if "local" in need:
            loc = d * params["W_rec"].diagonal()
            out["local"] = (loc if alpha == 1.0 else loc.add_(1.0 - alpha)).view(N, H, 1, 1)
        if "eligibility" in need:
            out["eligibility"] = d.new_full((N, H, 1, 1), 1.0 - alpha)
        if "immediate" in need:
            D = d.view(N, 1, 1, H)
            xs, hp, ones = inputs.reshape(N, 1, -1), prev.reshape(N, 1, H), d.new_ones(N, 1, 1)
            if "weigh" in need:  # lambda phi'(a_t), over phi'(a_t)
                def weigh(lam: Tensor) -> Tensor:
                    return d.view(N, 1, H).mul_(lam)

                out["immediate"] = {"W_in": Immediate(None, xs, None, weigh),
                                    "W_rec": Immediate(None, hp, None, weigh),
                                    "b_rec": Immediate(None, ones, None, weigh)}
            else:
                out["immediate"] = {"W_in": Immediate(D, xs), "W_rec": Immediate(D, hp),
                                    "b_rec": Immediate(D, ones)}
        new = ElmanState(hs)
        return ElmanState(prev), new, hs, Linearization(ElmanState(hs.view(N, H)), **out)

    # ---- whole-sequence BPTT: what the Network algorithms take from this cell -----------
    #
    # The hand-derived pass below (``unroll``, ``backward``) is the one every exact algorithm
    # runs on an Elman layer, ``rnngrad.RNN`` included. Beyond the protocol it declares:
    #   uses_workspace      forward_sequence(..., workspace=) keeps its (T, B, H) buffer in a
    #                       dict the algorithm holds between calls (no fresh pages per call)
    #   backward_overwrites backward_sequence(..., overwrite=True) writes u_t over d_outputs
    #   gives_sensitivities backward_sequence(..., sensitivities=True) also returns
    #                       u_t = dL/da_t = dL/db_rec(t) as grads["u"] (T, B, H)
    #   sequence_cache      the cache rebuilt from the states the online steps produced,
    #                       where caches_from_states says it can
    uses_workspace = True
    backward_overwrites = True
    gives_sensitivities = True

    def _per_step(self) -> bool:
        """Vanilla tanh/sigmoid: phi'(a_t) comes from h_t inside the backward loop, so the
        forward pass keeps no (T, B, H) buffer of phi'."""
        return self.alpha == 1.0 and get_activation(self.activation).deriv_from_output

    def forward_sequence(self, params, inputs: Tensor, state0: ElmanState, *, cache: bool = False,
                         workspace: dict | None = None):
        """``(h_1..h_T, ElmanState(h_T), cache)``: the input projection of every step as one
        GEMM, then one ``addmm`` per step. The cache is ``(hs, dphi)`` (dphi None for a
        vanilla tanh/sigmoid cell). With ``workspace`` (a dict the caller keeps) and no
        graph to build, h_1..h_T are written into a buffer kept there: valid until the next
        call with the same workspace."""
        view = _View(params, self)
        per_step = self._per_step()
        out = None
        if workspace is not None and cache and per_step and not torch.is_grad_enabled():
            T, B, _ = inputs.shape
            out = _buffer(workspace, "h", (T, B, self.hidden_size), inputs)
        hs, dphi = unroll(view, inputs, state0.h, need_deriv=cache and not per_step, out=out)
        return hs, ElmanState(hs[-1]), ((hs, dphi) if cache else None)

    @property
    def caches_from_states(self) -> bool:
        """True when ``sequence_cache`` can rebuild the cache (vanilla tanh or sigmoid)."""
        return self._per_step()

    def sequence_cache(self, params, inputs: Tensor, state0: ElmanState, states: list):
        """The cache ``forward_sequence(..., cache=True)`` would give, from the states
        ``step`` produced over ``inputs`` (a list of T ElmanStates); None when phi' needs
        a_t, which the states do not hold (leaky cell, relu, softplus, identity)."""
        if not self._per_step():
            return None
        return torch.stack([s.h for s in states]), None

    def backward_sequence(self, params, inputs: Tensor, state0: ElmanState, cache, d_outputs: Tensor,
                          d_state: ElmanState | None = None, *, input_grad: bool = True,
                          overwrite: bool = False, sensitivities: bool = False):
        """The adjoint pass of the module docstring (``backward``). ``overwrite``: u_t is
        written over d_outputs (the caller gives it up). ``sensitivities``: grads also
        holds "u", u_t = dL/da_t (T, B, H)."""
        hs, dphi = cache
        hbar = d_outputs if overwrite else d_outputs.clone()
        if d_state is not None:
            hbar[-1] += d_state.h
        view = _View(params, self)
        grads, u, dh0 = backward(view, inputs, state0.h, hs, dphi, hbar, overwrite=True)
        d_inputs = None
        if input_grad:
            T, B, H = u.shape
            d_inputs = (u.view(T * B, H) @ params["W_in"]).view(T, B, -1)
        if sensitivities:
            grads["u"] = u
        return grads, d_inputs, ElmanState(dh0)


_wrapped = torch._C._functorch.is_functorch_wrapped_tensor  # inside vmap / grad


def _transposed(cell, W_in: Tensor, W_rec: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(W_in.T, W_rec.T, W_rec.diagonal())``, the views kept on the cell while
    ``linearize`` is handed the same tensors (an online step's binding; a view follows the
    in-place updates of its parameter). Kept without autograd only (a view made without
    it records no graph), never for a traced or transformed call."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or _wrapped(W_in):
        return W_in.T, W_rec.T, W_rec.diagonal()
    got = cell.__dict__.get("_linearize_views")
    if got is not None and got[0] is W_in and got[1] is W_rec:
        return got[2]
    views = (W_in.T, W_rec.T, W_rec.diagonal())
    object.__setattr__(cell, "_linearize_views", (W_in, W_rec, views))
    return views


_ONES: dict = {}  # (B, dtype, device) -> (B, 1, 1) ones: b_rec's row of an online step


def _ones(B: int, like: Tensor) -> Tensor:
    """b_rec's row (B, 1, 1), made once per batch size, dtype and device (a step's
    ``linearize`` hands it out read-only; a traced or transformed call makes its own)."""
    if torch.compiler.is_compiling() or _wrapped(like):
        return like.new_ones(B, 1, 1)
    key = (B, like.dtype, like.device)
    t = _ONES.get(key)
    if t is None:
        if len(_ONES) >= 64:  # a sweep over many batch sizes keeps the last few
            _ONES.clear()
        t = _ONES[key] = like.new_ones(B, 1, 1)
    return t


def _buffer(workspace: dict, name: str, shape: tuple, like: Tensor) -> Tensor:
    """A buffer of ``shape`` kept in ``workspace`` between calls (one per name)."""
    buf = workspace.get(name)
    if buf is None or buf.shape != shape or buf.dtype != like.dtype or buf.device != like.device:
        buf = torch.empty(shape, dtype=like.dtype, device=like.device)
        workspace[name] = buf
    return buf


def pre_activation(W_in: Tensor, W_rec: Tensor, b_rec: Tensor, h: Tensor, x: Tensor) -> Tensor:
    """``a = W_in x + W_rec h + b_rec`` for a batch: h (B, H), x (B, D) -> (B, H)."""
    return torch.addmm(torch.addmm(b_rec, x, W_in.T), h, W_rec.T)


def cell_step(
    W_in: Tensor,
    W_rec: Tensor,
    b_rec: Tensor,
    h: Tensor,
    x: Tensor,
    *,
    activation: str | Activation = "tanh",
    alpha: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """One step of the (leaky) cell.

    Args:
        h: (B, H) previous hidden state h_{t-1}.
        x: (B, D) input x_t.

    Returns:
        ``(h_t, a_t, phi(a_t))``, each (B, H).
    """
    act = get_activation(activation)
    a = pre_activation(W_in, W_rec, b_rec, h, x)
    fa = act.fn(a)
    h_new = fa if alpha == 1.0 else torch.lerp(h, fa, alpha)
    return h_new, a, fa


def unroll(model, inputs: Tensor, h0: Tensor, *, need_deriv: bool = True,
           out: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """The forward pass, with the input projection of every step as one GEMM.

    Args:
        inputs: (T, B, D); h0: (B, H).

    Returns:
        ``(h, dphi)``: h_1..h_T (T, B, H) and phi'(a_1..a_T) (T, B, H) (None unless need_deriv).
        ``out``, a (T, B, H) buffer, receives the input projection (and, on the in-place
        path, h itself) instead of a new allocation; only without a graph.
    """
    T, B, D = inputs.shape
    H = model.hidden_size
    act = get_activation(model.activation)
    alpha = model.alpha
    W_rec_T = model.W_rec.T
    # a_t = (W_in x_t + b_rec) + W_rec h_{t-1}: the first term for all t at once
    if out is None:
        A = torch.addmm(model.b_rec, inputs.reshape(T * B, D), model.W_in.T).view(T, B, H)
    else:
        A = torch.addmm(model.b_rec, inputs.reshape(T * B, D), model.W_in.T,
                        out=out.view(T * B, H)).view(T, B, H)
    leaky = alpha != 1.0
    builds_graph = torch.is_grad_enabled() and (
        inputs.requires_grad or h0.requires_grad
        or any(p.requires_grad for p in model.parameters()))
    if not leaky and act.deriv_from_output and not builds_graph:
        # no graph to build (tanh, sigmoid): h_t overwrites a_t's input part in place,
        # so the forward pass allocates one (T, B, H) buffer
        h = h0
        for a_t in A.unbind(0):  # views made once, not one indexing op per step
            h = act.fn(a_t.addmm_(h, W_rec_T), out=a_t)
        return A, (act.deriv(None, A) if need_deriv else None)
    a_s: list[Tensor] = []
    f_s: list[Tensor] = []
    hs: list[Tensor] = []
    h = h0
    for t in range(T):
        a = torch.addmm(A[t], h, W_rec_T)
        fa = act.fn(a)
        h = torch.lerp(h, fa, alpha) if leaky else fa
        if not act.deriv_from_output:
            a_s.append(a)
        if leaky:
            f_s.append(fa)
        hs.append(h)
    h_all = torch.stack(hs)
    if not need_deriv:
        return h_all, None
    A_all = None if act.deriv_from_output else torch.stack(a_s)
    dphi = act.deriv(A_all, torch.stack(f_s) if leaky else h_all)
    return h_all, dphi


def backward(
    model,
    inputs: Tensor,
    h0: Tensor,
    hs: Tensor,
    dphi: Tensor | None,
    hbar: Tensor,
    *,
    overwrite: bool = False,
) -> tuple[Grads, Tensor, Tensor]:
    """The hand-derived backward pass over one stored segment.

    Args:
        inputs: (T, B, D) x_1..x_T.
        h0: (B, H) the state before the segment.
        hs: (T, B, H) h_1..h_T.
        dphi: (T, B, H) phi'(a_t); or None for a vanilla cell (alpha = 1) whose phi' is
            a function of its output (tanh, sigmoid), computed step by step from hs.
        hbar: (T, B, H) immediate terms dl/dh_t.
        overwrite: write u into hbar's memory (saves a (T, B, H) buffer).

    Returns:
        ``(grads, u, dh0)``: W_in, W_rec, b_rec gradients; u_t (T, B, H); dL/dh_0 (B, H).
    """
    T, B, D = inputs.shape
    H = hs.shape[2]
    alpha = model.alpha
    leaky = alpha != 1.0
    W_rec = model.W_rec
    if dphi is None:
        act = get_activation(model.activation)
        if leaky or not act.deriv_from_output:
            raise ValueError("dphi=None needs a vanilla cell (alpha = 1) with tanh or sigmoid")
        # u_t = phi'(a_t) * (hbar_t + W_rec^T u_{t+1}), phi' from h_t, in place in hbar
        u = hbar if overwrite else hbar.clone()
        us, hts = u.unbind(0), hs.unbind(0)  # views made once, not per step
        if act.name == "tanh":
            # u_t = g (1 - h_t^2) = g - (g h_t) h_t: two elementwise passes
            us[T - 1].addcmul_(us[T - 1] * hts[T - 1], hts[T - 1], value=-1.0)
            for t in range(T - 2, -1, -1):
                g = us[t].addmm_(us[t + 1], W_rec)
                g.addcmul_(g * hts[t], hts[t], value=-1.0)
        else:
            us[T - 1].mul_(act.deriv(None, hts[T - 1]))
            for t in range(T - 2, -1, -1):
                us[t].addmm_(us[t + 1], W_rec).mul_(act.deriv(None, hts[t]))
        dh0 = u[0] @ W_rec
    elif leaky:
        u = hbar if overwrite else torch.empty_like(hbar)
        scaled = dphi * alpha  # alpha phi'(a_t), once for all t
        delta = hbar[T - 1].clone()
        torch.mul(scaled[T - 1], delta, out=u[T - 1])
        for t in range(T - 2, -1, -1):
            delta = torch.addmm(hbar[t], u[t + 1], W_rec).add_(delta, alpha=1.0 - alpha)
            torch.mul(scaled[t], delta, out=u[t])
        dh0 = torch.addmm(delta, u[0], W_rec, beta=1.0 - alpha)
    else:
        u = hbar if overwrite else torch.empty_like(hbar)
        torch.mul(dphi[T - 1], hbar[T - 1], out=u[T - 1])
        for t in range(T - 2, -1, -1):
            torch.addmm(hbar[t], u[t + 1], W_rec, out=u[t]).mul_(dphi[t])
        dh0 = u[0] @ W_rec
    u2 = u.view(T * B, H)
    # dW_rec = sum_t u_t h_{t-1}^T: h_0 pairs with u_1, h_{1..T-1} with u_{2..T}
    dW_rec = u[0].T @ h0
    if T > 1:
        dW_rec = torch.addmm(dW_rec, u[1:].reshape((T - 1) * B, H).T, hs[:-1].reshape((T - 1) * B, H))
    grads = {
        "W_in": u2.T @ inputs.reshape(T * B, D),
        "W_rec": dW_rec,
        "b_rec": u2.sum(0),
    }
    return grads, u, dh0


