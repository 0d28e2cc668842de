"""The Linear Recurrent Unit (Orvieto et al. 2023, "Resurrecting recurrent neural networks
for long sequences", ICML), a complex diagonal recurrence kept in real arithmetic, with
the position-wise block of Zucchet et al. (2023, "Online learning of long-range
dependencies", NeurIPS) as an option of its output.

Every parameter is a real tensor (rnngrad refuses complex dtypes): a complex number is
its real and imaginary parts. With N = ``state_size`` and x_t (B, D)::

    lambda = exp(-exp(nu) + i exp(theta))          (N,)  |lambda| = exp(-exp(nu)) < 1
    gamma  = exp(gamma_log)                        (N,)  drawn as sqrt(1 - |lambda|^2)
    u_t    = x_t, or norm(x_t) with norm=True      (B, D) norm: layer norm, no parameters
    h_t    = lambda h_{t-1} + gamma (B u_t)        (B, N) complex, B = B_re + i B_im (N, D)
    y_t    = Re(C h_t) + D u_t                     (B, H) C = C_re + i C_im (H, N); D (H,)
                                                          elementwise when D == H, else (H, D)
    out_t  = y_t                                   the cell's output (emit), or with glu=True
           = (W_1 g_t + b_1) sigmoid(W_2 g_t + b_2), g_t = gelu(y_t)   Zucchet's GLU
             (+ x_t with residual=True)

In real arithmetic, ``h_t = (re, im)``, ``lambda = lr + i li``,
``lr = exp(-exp(nu)) cos(exp(theta))``, ``li = exp(-exp(nu)) sin(exp(theta))``::

    re_t = lr re_{t-1} - li im_{t-1} + gamma (B_re u_t)
    im_t = li re_{t-1} + lr im_{t-1} + gamma (B_im u_t)

Units do not couple (``diagonal = True``): unit n is ``(re_n, im_n)``, C = 2, and owns
``nu[n], theta[n], gamma_log[n]`` and row n of ``B_re``, ``B_im``; ``C_re, C_im, D`` and the
GLU's parameters enter only the output (``emit``) and are owned by no unit. Declared
structure, with ``(a_re, a_im) = lambda h_{t-1}`` and ``(v_re, v_im) = B u_t``::

    local, eligibility   [[lr, -li], [li, lr]]               (B, N, 2, 2), the same for all b
    immediate            nu: -exp(nu) (a_re, a_im)           (d lambda / d nu = -exp(nu) lambda)
                         theta: exp(theta) (-a_im, a_re)     (d lambda / d theta = i e^theta lambda)
                         gamma_log: gamma (v_re, v_im)
                         B_re: (gamma, 0) u_t^T,  B_im: (0, gamma) u_t^T
    jacobian             [[diag lr, -diag li], [diag li, diag lr]]      (B, 2N, 2N)
    input_jacobian       [gamma B_re; gamma B_im] d u_t / d x_t         (B, 2N, D)

RTRL on one LRU layer is then per-unit traces, O(B N (D + 3)) numbers, no S x S influence
(Zucchet et al. 2023): ``rnngrad.rtrl()`` finds the diagonal declaration and does that.

Hand-derived whole-sequence BPTT (``backward_sequence``), from ``delta_{T+1}`` = 0 and
``e_t = dL/dh_t`` arriving through the output, ``(e_re, e_im) = (dy C_re, -dy C_im)``::

    delta_t  = e_t + conj(lambda) delta_{t+1}    (+ d_state at t = T)    dL/dh_t, complex
    d lr     = sum_t Re(conj(delta_t) ... ):  sum_t delta_re h_re,t-1 + delta_im h_im,t-1
    d li     = sum_t delta_im h_re,t-1 - delta_re h_im,t-1
    d nu     = -exp(nu) (lr d lr + li d li),   d theta = exp(theta) (lr d li - li d lr)
    d gamma_log = gamma sum_t (delta_re v_re + delta_im v_im)
    d B_re   = sum_t (gamma delta_re) u_t^T,   d B_im = sum_t (gamma delta_im) u_t^T
    d C_re   = sum_t dy_t h_re,t^T,   d C_im = -sum_t dy_t h_im,t^T,   d D = sum_t dy_t u_t
    dh_0     = conj(lambda) delta_1

The output's backward (GLU, D, C) and the input projections run on all T B rows at once;
only the delta recursion is a loop of elementwise ops. ``emit_vjp`` and
``emit_jacobians`` are the same output derivatives for one step.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Cell, Immediate, Linearization, check_factory, check_number
from .elman import check_sizes

__all__ = ["LRU", "LRUState", "layer_norm"]

EPS = 1e-5  # the layer norm's epsilon


class LRUState(NamedTuple):
    """The LRU's complex state ``h_t`` as its real and imaginary parts, each (B, N)."""

    re: Tensor  # (B, N) Re h_t
    im: Tensor  # (B, N) Im h_t


def layer_norm(x: Tensor) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the last dimension, no parameters (B, D)."""
    return F.layer_norm(x, x.shape[-1:], eps=EPS)


def _gelu_deriv(y: Tensor) -> Tensor:
    """d gelu(y) / dy = Phi(y) + y phi(y) (the exact, erf form of ``F.gelu``)."""
    return 0.5 * (1 + torch.erf(y / math.sqrt(2))) + y * torch.exp(-0.5 * y * y) / math.sqrt(
        2 * math.pi)


def _layer_norm_backward(x: Tensor, dn: Tensor) -> Tensor:
    """The adjoint of ``layer_norm`` at x for a cotangent dn: ``(dn - mean(dn) - n
    mean(n dn)) / sigma``."""
    n = layer_norm(x)
    sigma = torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + EPS)
    return (dn - dn.mean(-1, keepdim=True) - n * (n * dn).mean(-1, keepdim=True)) / sigma


def _layer_norm_jacobian(x: Tensor) -> Tensor:
    """d norm(x) / d x per example (B, D, D): ``(I - 1/D - n n^T / D) / sigma``."""
    Dn = x.shape[-1]
    n = layer_norm(x)
    sigma = torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + EPS)  # (B, 1)
    eye = torch.eye(Dn, dtype=x.dtype, device=x.device)
    J = eye - 1.0 / Dn - n.unsqueeze(2) * n.unsqueeze(1) / Dn
    return J / sigma.unsqueeze(2)


class LRU(Cell):
    """The Linear Recurrent Unit (Orvieto et al. 2023); see the module docstring.

    Args:
        input_size: D.  hidden_size: H, the width of the output.
        state_size: N, the number of complex units (default H).
        r_min, r_max: |lambda| is drawn so that |lambda|^2 is uniform on [r_min^2, r_max^2].
        max_phase: arg(lambda) is drawn uniform on [0, max_phase].
        norm: layer-normalise x_t (no parameters) before B and D (Zucchet's prenorm).
        glu: the output is Zucchet et al.'s GLU of gelu(y_t) (W_1, b_1, W_2, b_2 (H, H)).
        residual: add x_t to the output (needs input_size == hidden_size).
        dtype, device: of the parameters.

    Parameters: ``nu, theta, gamma_log (N,)``, ``B_re, B_im (N, D)``, ``C_re, C_im (H, N)``,
    ``D`` ((H,) when D == H, else (H, D)) and, with glu, ``W_1, W_2 (H, H)``, ``b_1, b_2 (H,)``.
    State: ``LRUState(re, im)``, each (B, N).
    """

    diagonal = True

    def __init__(self, input_size: int, hidden_size: int, *, state_size: int | None = None,
                 r_min: float = 0.0, r_max: float = 1.0, max_phase: float = 2 * math.pi,
                 norm: bool = False, glu: bool = False, residual: bool = False,
                 dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        N = hidden_size if state_size is None else state_size
        check_sizes(input_size=input_size, hidden_size=hidden_size, state_size=N)
        check_factory(dtype, device)
        r_min = check_number("r_min", r_min, low=0.0, high=1.0)
        r_max = check_number("r_max", r_max, low=0.0, high=1.0)
        max_phase = check_number("max_phase", max_phase, low=0.0, low_open=True)
        for flag, v in (("norm", norm), ("glu", glu), ("residual", residual)):
            if not isinstance(v, bool):
                raise TypeError(f"{flag} must be a bool, got {v!r}")
        if not (0.0 <= r_min < r_max <= 1.0):
            raise ValueError(f"need 0 <= r_min < r_max <= 1, got r_min={r_min!r}, "
                             f"r_max={r_max!r}")
        if residual and input_size != hidden_size:
            raise ValueError(f"residual=True adds x_t to the output and needs input_size == "
                             f"hidden_size, got {input_size} and {hidden_size}")
        self.input_size, self.hidden_size, self.state_size = input_size, hidden_size, N
        self.r_min, self.r_max, self.max_phase = float(r_min), float(r_max), float(max_phase)
        self.norm, self.glu, self.residual = bool(norm), bool(glu), bool(residual)
        kw = {"dtype": dtype, "device": device}
        H, Dn = hidden_size, input_size
        self.nu = nn.Parameter(torch.empty(N, **kw))
        self.theta = nn.Parameter(torch.empty(N, **kw))
        self.gamma_log = nn.Parameter(torch.empty(N, **kw))
        self.B_re = nn.Parameter(torch.empty(N, Dn, **kw))
        self.B_im = nn.Parameter(torch.empty(N, Dn, **kw))
        self.C_re = nn.Parameter(torch.empty(H, N, **kw))
        self.C_im = nn.Parameter(torch.empty(H, N, **kw))
        self.D = nn.Parameter(torch.empty(H, **kw) if Dn == H else torch.empty(H, Dn, **kw))
        if self.glu:
            self.W_1 = nn.Parameter(torch.empty(H, H, **kw))
            self.b_1 = nn.Parameter(torch.empty(H, **kw))
            self.W_2 = nn.Parameter(torch.empty(H, H, **kw))
            self.b_2 = nn.Parameter(torch.empty(H, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Orvieto et al.'s initialisation: lambda uniform on the ring r_min <= |lambda| <=
        r_max (in |lambda|^2) with phase in [0, max_phase], gamma = sqrt(1 - |lambda|^2),
        B ~ N(0, 1/(2 D)), C ~ N(0, 1/N), D ~ N(0, 1) (N(0, 1/D) as a matrix); the GLU's
        weights N(0, 1/H) and zero biases (flax's Dense, as Zucchet et al.'s code)."""
        N, Dn, H = self.state_size, self.input_size, self.hidden_size
        with torch.no_grad():
            u1 = torch.rand_like(self.nu)
            nu = -0.5 * torch.log(u1 * (self.r_max ** 2 - self.r_min ** 2) + self.r_min ** 2)
            self.nu.copy_(torch.log(nu))
            self.theta.copy_(torch.log(self.max_phase * torch.rand_like(self.theta)))
            self.gamma_log.copy_(0.5 * torch.log1p(-torch.exp(-2 * nu)))
            self.B_re.normal_(0.0, 1.0 / math.sqrt(2 * Dn))
            self.B_im.normal_(0.0, 1.0 / math.sqrt(2 * Dn))
            self.C_re.normal_(0.0, 1.0 / math.sqrt(N))
            self.C_im.normal_(0.0, 1.0 / math.sqrt(N))
            self.D.normal_(0.0, 1.0 if self.D.dim() == 1 else 1.0 / math.sqrt(Dn))
            if self.glu:
                self.W_1.normal_(0.0, 1.0 / math.sqrt(H))
                self.W_2.normal_(0.0, 1.0 / math.sqrt(H))
                self.b_1.zero_()
                self.b_2.zero_()

    def extra_repr(self) -> str:
        opts = [n for n in ("norm", "glu", "residual") if getattr(self, n)]
        return (f"input_size={self.input_size}, hidden_size={self.hidden_size}, "
                f"state_size={self.state_size}" + "".join(f", {o}=True" for o in opts))

    @property
    def n_units(self) -> int:
        return self.state_size

    def param_blocks(self) -> dict[str, int | None]:
        out: dict[str, int | None] = {"nu": 1, "theta": 1, "gamma_log": 1, "B_re": 1, "B_im": 1}
        for n, _ in self.named_parameters():
            out.setdefault(n, None)  # C_re, C_im, D, the GLU's: only in the output
        return out

    def init_state(self, batch_size: int) -> LRUState:
        p = self.B_re
        z = torch.zeros(batch_size, self.state_size, dtype=p.dtype, device=p.device)
        return LRUState(z, z.clone())

    # ---- one step ---------------------------------------------------------------------

    def _input(self, x: Tensor) -> Tensor:
        return layer_norm(x) if self.norm else x

    @staticmethod
    def eigenvalues(params) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(lr, li, exp(nu), exp(theta))``: lambda's real and imaginary parts (N,)."""
        e_nu, e_th = torch.exp(params["nu"]), torch.exp(params["theta"])
        r = torch.exp(-e_nu)
        return r * torch.cos(e_th), r * torch.sin(e_th), e_nu, e_th

    def _parts(self, params, state: LRUState, x: Tensor):
        lr, li, e_nu, e_th = self.eigenvalues(params)
        gamma = torch.exp(params["gamma_log"])
        u = self._input(x)
        v_re, v_im = u @ params["B_re"].T, u @ params["B_im"].T            # B u_t
        a_re = lr * state.re - li * state.im                                 # lambda h_{t-1}
        a_im = li * state.re + lr * state.im
        new = LRUState(torch.addcmul(a_re, gamma, v_re), torch.addcmul(a_im, gamma, v_im))
        return new, u, lr, li, e_nu, e_th, gamma, a_re, a_im, v_re, v_im

    def step(self, params, state: LRUState, x: Tensor) -> LRUState:
        return self._parts(params, state, x)[0]

    def emit(self, params, state: LRUState, x: Tensor) -> Tensor:
        return self._out(params, state.re, state.im, self._input(x), x)[0]

    def _out(self, params, re: Tensor, im: Tensor, u: Tensor, x: Tensor):
        """The output from rows (n, N) of the state and (n, D) of the input: ``(out (n, H),
        cache)`` with cache what ``_out_backward`` needs (y, and the GLU's g, a_1, s_2)."""
        y = re @ params["C_re"].T - im @ params["C_im"].T                    # Re(C h_t)
        Dp = params["D"]
        y = y + (u * Dp if Dp.dim() == 1 else u @ Dp.T)                     # + D u_t
        cache = (y,)
        out = y
        if self.glu:
            g = F.gelu(y)
            a1 = torch.addmm(params["b_1"], g, params["W_1"].T)
            s2 = torch.sigmoid(torch.addmm(params["b_2"], g, params["W_2"].T))
            out = a1 * s2
            cache = (y, g, a1, s2)
        if self.residual:
            out = out + x
        return out, cache

    def _out_backward(self, params, re: Tensor, im: Tensor, u: Tensor, cache, dout: Tensor):
        """The adjoint of ``_out`` on rows: ``(grads of C_re, C_im, D and the GLU's
        parameters, dy (n, H), d_re, d_im (n, N), du (n, D))``; the residual's dx is the
        caller's."""
        grads = {}
        y = cache[0]
        dy = dout
        if self.glu:
            _, g, a1, s2 = cache
            da1 = dout * s2                                   # d out / d a_1 = s_2
            dz2 = dout * a1 * s2 * (1 - s2)                   # through the sigmoid
            grads["W_1"], grads["b_1"] = da1.T @ g, da1.sum(0)
            grads["W_2"], grads["b_2"] = dz2.T @ g, dz2.sum(0)
            dg = da1 @ params["W_1"] + dz2 @ params["W_2"]
            dy = dg * _gelu_deriv(y)
        grads["C_re"], grads["C_im"] = dy.T @ re, (dy.T @ im).neg_()
        Dp = params["D"]
        if Dp.dim() == 1:
            grads["D"], du = (dy * u).sum(0), dy * Dp
        else:
            grads["D"], du = dy.T @ u, dy @ Dp
        return grads, dy, dy @ params["C_re"], (dy @ params["C_im"]).neg_(), du

    def _input_backward(self, x: Tensor, du: Tensor) -> Tensor:
        return _layer_norm_backward(x, du) if self.norm else du

    def emit_vjp(self, params, state: LRUState, x: Tensor, g: Tensor):
        u = self._input(x)
        _, cache = self._out(params, state.re, state.im, u, x)
        grads, _, d_re, d_im, du = self._out_backward(params, state.re, state.im, u, cache, g)
        dx = self._input_backward(x, du)
        if self.residual:
            dx = dx + g
        return grads, torch.cat((d_re, d_im), 1), dx

    def emit_jacobians(self, params, state: LRUState, x: Tensor):
        """``(G_s (B, H, 2N), G_x (B, H, D), G_p (B, H, n_params))``: with
        ``G_y = d out / d y`` (the GLU's Jacobian, or the identity), G_s = G_y [C_re, -C_im],
        G_x = G_y D du/dx (+ I), and G_p's columns, in parameter order, zero for the
        step's parameters and ``G_y[:, :, k] h_n`` etc. for the output's."""
        u = self._input(x)
        _, cache = self._out(params, state.re, state.im, u, x)
        B, H, N, Dn = x.shape[0], self.hidden_size, self.state_size, self.input_size
        eye = torch.eye(H, dtype=x.dtype, device=x.device)
        if self.glu:
            y, g, a1, s2 = cache
            Gy = (s2.unsqueeze(2) * params["W_1"] + (a1 * s2 * (1 - s2)).unsqueeze(2)
                  * params["W_2"]) * _gelu_deriv(y).unsqueeze(1)
        else:
            Gy = eye.expand(B, H, H)
        Gs = torch.cat((Gy @ params["C_re"], -(Gy @ params["C_im"])), 2)
        Dp = params["D"]
        Gu = Gy * Dp if Dp.dim() == 1 else Gy @ Dp                            # (B, H, D)
        Gx = torch.matmul(Gu, _layer_norm_jacobian(x)) if self.norm else Gu
        if self.residual:
            Gx = Gx + eye
        cols = []
        for name, p in params.items():
            if name in ("C_re", "C_im"):
                h = state.re if name == "C_re" else -state.im
                cols.append((Gy.unsqueeze(3) * h.view(B, 1, 1, N)).reshape(B, H, -1))
            elif name == "D":
                cols.append(Gy * u.unsqueeze(1) if p.dim() == 1 else
                            (Gy.unsqueeze(3) * u.view(B, 1, 1, Dn)).reshape(B, H, -1))
            elif name in ("W_1", "b_1", "W_2", "b_2"):
                _, g, a1, s2 = cache
                d = s2 if name.endswith("1") else a1 * s2 * (1 - s2)          # (B, H)
                inp = g if name.startswith("W") else g.new_ones(B, 1)
                full = torch.zeros(B, H, H, inp.shape[1], dtype=x.dtype, device=x.device)
                full.diagonal(dim1=1, dim2=2).copy_(d.unsqueeze(1) * inp.unsqueeze(2))
                cols.append(full.reshape(B, H, -1))
            else:
                cols.append(x.new_zeros(B, H, p.numel()))
        return Gs, Gx, torch.cat(cols, 2)

    def linearize(self, params, state: LRUState, x: Tensor, *, need=()) -> Linearization:
        new, u, lr, li, e_nu, e_th, gamma, a_re, a_im, v_re, v_im = \
            self._parts(params, state, x)
        if not need:
            return Linearization(new)
        B, N = new.re.shape
        out = {}
        if "local" in need or "eligibility" in need:
            blk = torch.stack((torch.stack((lr, -li), -1), torch.stack((li, lr), -1)), -2)
            blk = blk.expand(B, N, 2, 2)  # (B, N, 2, 2)
            if "local" in need:
                out["local"] = blk
            if "eligibility" in need:
                out["eligibility"] = blk
        if "immediate" in need:
            ones = u.new_ones(B, 1, 1)
            zero = torch.zeros_like(gamma)
            g_re = torch.stack((gamma, zero)).view(1, 2, 1, N).expand(B, 2, 1, N)
            g_im = torch.stack((zero, gamma)).view(1, 2, 1, N).expand(B, 2, 1, N)
            uu = u.unsqueeze(1)
            out["immediate"] = {
                "nu": Immediate(torch.stack((a_re, a_im), 1).mul_(-e_nu).unsqueeze(2), ones),
                "theta": Immediate(torch.stack((-a_im, a_re), 1).mul_(e_th).unsqueeze(2), ones),
                "gamma_log": Immediate(torch.stack((v_re, v_im), 1).mul_(gamma).unsqueeze(2),
                                       ones),
                "B_re": Immediate(g_re, uu),
                "B_im": Immediate(g_im, uu),
            }
        if "jacobian" in need:
            J = u.new_zeros(B, 2 * N, 2 * N)
            J[:, :N, :N].diagonal(dim1=1, dim2=2).copy_(lr.expand(B, N))
            J[:, :N, N:].diagonal(dim1=1, dim2=2).copy_((-li).expand(B, N))
            J[:, N:, :N].diagonal(dim1=1, dim2=2).copy_(li.expand(B, N))
            J[:, N:, N:].diagonal(dim1=1, dim2=2).copy_(lr.expand(B, N))
            out["jacobian"] = J
        if "input_jacobian" in need:
            gB = torch.cat((params["B_re"], params["B_im"])) * gamma.repeat(2).unsqueeze(1)
            if self.norm:
                out["input_jacobian"] = torch.matmul(gB, _layer_norm_jacobian(x))
            else:
                out["input_jacobian"] = gB.expand(B, 2 * N, self.input_size)
        return Linearization(new, **out)

    def linearize_sequence(self, params, inputs: Tensor, state0: LRUState, *, need=()):
        """The forward pass over the sequence (``forward_sequence``'s, the states written
        into (T + 1, B, N) buffers) and ``linearize`` at every step from what it keeps, the
        input projections ``B u_t`` included: ``(prev, new, outputs, Linearization on the
        (T B) rows)``, and with ``"emit_vjp"`` in ``need`` a fifth item, ``emit_vjp`` on
        the rows from the output layer's forward values (no second evaluation of it).
        ``"weigh"``: each immediate term as ``Immediate.weigh`` (per unit, lambda's two
        rows folded: ``nu``: ``-e^nu (lam_re a_re + lam_im a_im)``, and so on)."""
        T, B, Dn = inputs.shape
        N = self.state_size
        NR = T * B
        with torch.no_grad():
            lr, li, e_nu, e_th = self.eigenvalues(params)
            gamma = torch.exp(params["gamma_log"])
            x2 = inputs.reshape(NR, Dn)
            u = self._input(x2)
            V = (u @ torch.cat((params["B_re"], params["B_im"])).T).view(T, B, 2 * N)
            RE, IM = V.new_empty(T + 1, B, N), V.new_empty(T + 1, B, N)
            RE[0], IM[0] = state0.re, state0.im
            GV = V * gamma.repeat(2)                                      # gamma B u_t, all t
            Rs, Is = RE.unbind(0), IM.unbind(0)
            for t in range(T):
                re, im = Rs[t], Is[t]
                torch.addcmul(GV[t, :, :N], lr, re, out=Rs[t + 1]).addcmul_(li, im, value=-1.0)
                torch.addcmul(GV[t, :, N:], li, re, out=Is[t + 1]).addcmul_(lr, im)
            del GV
            pre, pim = RE[:-1].reshape(NR, N), IM[:-1].reshape(NR, N)
            nre, nim = RE[1:].reshape(NR, N), IM[1:].reshape(NR, N)
            out, ecache = self._out(params, nre, nim, u, x2)
        prev, new = LRUState(RE[:-1], IM[:-1]), LRUState(RE[1:], IM[1:])
        rows_new = LRUState(nre, nim)
        if "jacobian" in need or "input_jacobian" in need:
            lin = self.linearize(params, LRUState(pre, pim), x2, need=need)
        else:
            lin = self._sequence_linearization(params, pre, pim, u, V.view(NR, 2 * N), lr, li,
                                               e_nu, e_th, gamma, rows_new, need)
        if "emit_vjp" not in need:
            return prev, new, out.view(T, B, -1), lin

        def emit_vjp(g: Tensor):
            """``emit_vjp`` on the (T B) rows, from the output layer's kept values."""
            with torch.no_grad():
                grads, _, d_re, d_im, du = self._out_backward(params, nre, nim, u, ecache, g)
                dx = self._input_backward(x2, du)
                if self.residual:
                    dx = dx + g
            return grads, torch.cat((d_re, d_im), 1), dx

        return prev, new, out.view(T, B, -1), lin, emit_vjp

    @torch.no_grad()
    def _sequence_linearization(self, params, pre, pim, u, V, lr, li, e_nu, e_th, gamma, new,
                                need) -> Linearization:
        NR, N = pre.shape
        out = {}
        if "local" in need or "eligibility" in need:
            blk = torch.stack((torch.stack((lr, -li), -1), torch.stack((li, lr), -1)), -2)
            blk = blk.expand(NR, N, 2, 2)  # the same for every row
            for field in ("local", "eligibility"):
                if field in need:
                    out[field] = blk
        if "immediate" in need:
            a_re = lr * pre - li * pim                                      # lambda h_{t-1}
            a_im = li * pre + lr * pim
            v_re, v_im = V[:, :N], V[:, N:]
            ones = u.new_ones(NR, 1, 1)
            uu = u.unsqueeze(1)
            if "weigh" in need:
                def w_nu(lam):                      # -e^nu (lam_re a_re + lam_im a_im)
                    w = torch.mul(lam[:, 0], a_re)
                    return w.addcmul_(lam[:, 1], a_im).mul_(-e_nu).unsqueeze(1)

                def w_theta(lam):                   # e^theta (lam_im a_re - lam_re a_im)
                    w = torch.mul(lam[:, 1], a_re)
                    return w.addcmul_(lam[:, 0], a_im, value=-1.0).mul_(e_th).unsqueeze(1)

                def w_gamma(lam):                   # gamma (lam_re v_re + lam_im v_im)
                    w = torch.mul(lam[:, 0], v_re)
                    return w.addcmul_(lam[:, 1], v_im).mul_(gamma).unsqueeze(1)

                def w_re(lam):
                    return (lam[:, 0] * gamma).unsqueeze(1)

                def w_im(lam):
                    return (lam[:, 1] * gamma).unsqueeze(1)

                out["immediate"] = {"nu": Immediate(None, ones, None, w_nu),
                                    "theta": Immediate(None, ones, None, w_theta),
                                    "gamma_log": Immediate(None, ones, None, w_gamma),
                                    "B_re": Immediate(None, uu, None, w_re),
                                    "B_im": Immediate(None, uu, None, w_im)}
            else:
                zero = torch.zeros_like(gamma)
                g_re = torch.stack((gamma, zero)).view(1, 2, 1, N).expand(NR, 2, 1, N)
                g_im = torch.stack((zero, gamma)).view(1, 2, 1, N).expand(NR, 2, 1, N)
                out["immediate"] = {
                    "nu": Immediate(torch.stack((a_re, a_im), 1).mul_(-e_nu).unsqueeze(2), ones),
                    "theta": Immediate(torch.stack((-a_im, a_re), 1).mul_(e_th).unsqueeze(2),
                                       ones),
                    "gamma_log": Immediate(torch.stack((v_re, v_im), 1).mul_(gamma).unsqueeze(2),
                                           ones),
                    "B_re": Immediate(g_re, uu),
                    "B_im": Immediate(g_im, uu),
                }
        return Linearization(new, **out)

    # ---- whole-sequence BPTT ----------------------------------------------------------

    def forward_sequence(self, params, inputs: Tensor, state0: LRUState, *, cache: bool = False):
        """``(outputs (T, B, H), state_T, cache)``: the input projection of every step in one
        GEMM, the recurrence a loop of elementwise ops, the output on all T B rows at once."""
        T, B, Dn = inputs.shape
        N = self.state_size
        lr, li, _, _ = self.eigenvalues(params)
        gamma = torch.exp(params["gamma_log"])
        x2 = inputs.reshape(T * B, Dn)
        u = self._input(x2)
        V = (u @ torch.cat((params["B_re"], params["B_im"])).T).view(T, B, 2 * N)
        GV = V * gamma.repeat(2)                                # gamma B u_t, all t
        re, im = state0
        res, ims = [], []
        for t in range(T):
            re, im = (torch.addcmul(GV[t, :, :N], lr, re).addcmul_(li, im, value=-1.0),
                      torch.addcmul(GV[t, :, N:], li, re).addcmul_(lr, im))
            res.append(re)
            ims.append(im)
        RE, IM = torch.stack(res), torch.stack(ims)
        out, ecache = self._out(params, RE.view(T * B, N), IM.view(T * B, N), u, x2)
        saved = (u, V, RE, IM, ecache) if cache else None
        return out.view(T, B, -1), LRUState(re, im), saved

    def forward_states(self, params, inputs: Tensor, state0: LRUState):
        """``(LRUState of (T + 1, B, N) components: s_0..s_T, outputs (T, B, H))``: the
        forward pass above, keeping the states (what the sequence forms of the truncated
        rules linearize at)."""
        with torch.no_grad():
            out, _, (_, _, RE, IM, _) = self.forward_sequence(params, inputs, state0, cache=True)
        return LRUState(torch.cat((state0.re.unsqueeze(0), RE)),
                        torch.cat((state0.im.unsqueeze(0), IM))), out

    def backward_sequence(self, params, inputs: Tensor, state0: LRUState, cache,
                          d_outputs: Tensor, d_state: LRUState | None = None, *,
                          input_grad: bool = True):
        if cache is None:
            raise ValueError("backward_sequence needs the cache of forward_sequence(..., "
                             "cache=True)")
        u, V, RE, IM, ecache = cache
        T, B, Dn = inputs.shape
        N = self.state_size
        lr, li, e_nu, e_th = self.eigenvalues(params)
        gamma = torch.exp(params["gamma_log"])
        grads, _, e_re, e_im, du = self._out_backward(
            params, RE.view(T * B, N), IM.view(T * B, N), u, ecache,
            d_outputs.reshape(T * B, -1))
        e_re, e_im = e_re.view(T, B, N), e_im.view(T, B, N)
        # delta_t = e_t + conj(lambda) delta_{t+1}; d_state joins at t = T
        dre = e_re.clone()
        dim_ = e_im.clone()
        if d_state is not None:
            dre[-1] += d_state.re
            dim_[-1] += d_state.im
        for t in range(T - 2, -1, -1):
            nr, ni = dre[t + 1], dim_[t + 1]
            dre[t].addcmul_(lr, nr).addcmul_(li, ni)
            dim_[t].addcmul_(lr, ni).addcmul_(li, nr, value=-1.0)
        prev_re = torch.cat((state0.re.unsqueeze(0), RE[:-1]))
        prev_im = torch.cat((state0.im.unsqueeze(0), IM[:-1]))
        d_lr = (dre * prev_re + dim_ * prev_im).sum((0, 1))
        d_li = (dim_ * prev_re - dre * prev_im).sum((0, 1))
        grads["nu"] = -e_nu * (lr * d_lr + li * d_li)
        grads["theta"] = e_th * (lr * d_li - li * d_lr)
        Dl = torch.cat((dre, dim_), 2).view(T * B, 2 * N)               # (delta_re | delta_im)
        grads["gamma_log"] = gamma * (Dl * V.view(T * B, 2 * N)).view(T * B, 2, N).sum((0, 1))
        dV = Dl * gamma.repeat(2)                                       # dL / d(B u_t)
        dBcat = dV.T @ u                                                # (2N, D)
        grads["B_re"], grads["B_im"] = dBcat[:N], dBcat[N:]
        d_inputs = None
        if input_grad:
            du = du + dV @ torch.cat((params["B_re"], params["B_im"]))
            dx = self._input_backward(inputs.reshape(T * B, Dn), du)
            if self.residual:
                dx = dx + d_outputs.reshape(T * B, -1)
            d_inputs = dx.view(T, B, Dn)
        r0, i0 = dre[0], dim_[0]
        d0 = LRUState(lr * r0 + li * i0, lr * i0 - li * r0)             # conj(lambda) delta_1
        return {n: grads[n] for n in params}, d_inputs, d0
