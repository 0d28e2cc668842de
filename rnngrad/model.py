"""``rnngrad.RNN``: a thin ``nn.Module`` holding the named parameters of the cell.

    a_t = W_in x_t + W_rec h_{t-1} + b_rec
    h_t = (1 - alpha) h_{t-1} + alpha * phi(a_t)
    z_t = W_out h_t + b_out,   y_t = g(z_t)

The module only holds parameters and runs the forward pass; gradients come from
``rnngrad.gradient`` with an algorithm (BPTT, RTRL, ...), never from autograd
through the time loop. ``torch.optim``, ``state_dict`` and ``.to()`` work as usual.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .cells import get_activation
from .readouts import check_readout, readout

__all__ = ["RNN", "unroll"]

INITS = ("uniform", "orthogonal", "normal", "identity")


class RNN(nn.Module):
    """A one-hidden-layer recurrent network with a linear readout.

    Args:
        input_size: D, the size of x_t.
        hidden_size: H, the number of hidden units.
        output_size: K, the size of z_t.
        activation: phi, one of ``rnngrad.cells.ACTIVATIONS`` (tanh, sigmoid, relu, identity, softplus).
        alpha: leak in (0, 1]; 1 is the vanilla cell.
        readout: g, one of identity, softmax, sigmoid.
        init: how W_rec is drawn: "uniform" (PyTorch's U(-1/sqrt(H), 1/sqrt(H)), as for all
            other parameters), "orthogonal" (a random orthogonal matrix, Marschall et al. 2020),
            "normal" (N(0, 1/H)), or "identity" (the identity matrix, with relu the IRNN
            of Le, Jaitly & Hinton 2015).

    Parameters: ``W_in (H, D)``, ``W_rec (H, H)``, ``b_rec (H,)``, ``W_out (K, H)``, ``b_out (K,)``.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        output_size: int,
        *,
        activation: str = "tanh",
        alpha: float = 1.0,
        readout: str = "identity",
        init: str = "uniform",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size),
                            ("output_size", output_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (isinstance(alpha, (int, float)) and 0.0 < float(alpha) <= 1.0):
            raise ValueError(f"alpha must be a float in (0, 1], got {alpha!r}")
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; known inits: {', '.join(INITS)}")
        self.activation = get_activation(activation).name
        self.readout = check_readout(readout)
        self.alpha = float(alpha)
        self.init = init
        kw = {"dtype": dtype, "device": device}
        H, D, K = hidden_size, input_size, output_size
        self.W_in = nn.Parameter(torch.empty(H, D, **kw))
        self.W_rec = nn.Parameter(torch.empty(H, H, **kw))
        self.b_rec = nn.Parameter(torch.empty(H, **kw))
        self.W_out = nn.Parameter(torch.empty(K, H, **kw))
        self.b_out = nn.Parameter(torch.empty(K, **kw))
        self.reset_parameters()

    @property
    def input_size(self) -> int:
        return self.W_in.shape[1]

    @property
    def hidden_size(self) -> int:
        return self.W_rec.shape[0]

    @property
    def output_size(self) -> int:
        return self.W_out.shape[0]

    def reset_parameters(self) -> None:
        H = self.hidden_size
        bound = 1.0 / math.sqrt(H)
        with torch.no_grad():
            for p in (self.W_in, self.b_rec, self.W_out, self.b_out):
                p.uniform_(-bound, bound)
            if self.init == "uniform":
                self.W_rec.uniform_(-bound, bound)
            elif self.init == "orthogonal":
                nn.init.orthogonal_(self.W_rec)
            elif self.init == "normal":
                self.W_rec.normal_(0.0, bound)
            else:
                self.W_rec.copy_(torch.eye(H, dtype=self.W_rec.dtype))

    def extra_repr(self) -> str:
        return (f"input_size={self.input_size}, hidden_size={self.hidden_size}, "
                f"output_size={self.output_size}, activation={self.activation!r}, "
                f"alpha={self.alpha}, readout={self.readout!r}")

    def forward(self, inputs: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Run the network over a sequence.

        Args:
            inputs: (T, B, D).
            h0: (B, H) or (H,) initial state; zeros when None.

        Returns:
            ``(y, h)``: outputs y_t = g(z_t) of shape (T, B, K) and hidden states h_1..h_T (T, B, H).
            Differentiable with ordinary autograd too (useful as a reference), but
            rnngrad's algorithms do not use that graph.
        """
        from ._checks import check_h0, check_inputs

        T, B = check_inputs(self, inputs)
        h0 = check_h0(self, h0, B)
        h, _ = unroll(self, inputs, h0, need_deriv=False)
        z = torch.addmm(self.b_out, h.reshape(T * B, -1), self.W_out.T).view(T, B, -1)
        return readout(z, self.readout), h


def unroll(model: RNN, inputs: Tensor, h0: Tensor, *, need_deriv: bool = True,
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
