"""``rnngrad.RNN``: one Elman layer and a readout, the classic Elman network and the fastest path.

    a_t = W_in x_t + W_rec h_{t-1} + b_rec
    h_t = (1 - alpha) h_{t-1} + alpha * phi(a_t)
    z_t = W_out h_t + b_out,   y_t = g(z_t)

The module only holds parameters and runs the forward pass; gradients come from
``rnngrad.gradient`` with an algorithm (BPTT, RTRL, ...), never from autograd
through the time loop. ``torch.optim``, ``state_dict`` and ``.to()`` work as usual.

It is the one-layer ``rnngrad.Network`` of an ``rnngrad.cells.Elman`` cell, with the
cell's parameters registered under flat names (``W_in``, not ``cells.0.W_in``).
Every algorithm takes the one Network path on it; its speed comes from what the Elman
cell declares (a hand-derived whole-sequence BPTT with the input projection of every
step as one GEMM, its Jacobian and factored immediate term for RTRL), as any cell's does.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .cells.activations import get_activation  # noqa: F401  (importable from here, as before)
from .cells.elman import INITS, Elman, init_recurrent, unroll  # noqa: F401  (INITS as before)
from .network import Network
from .readouts import check_readout, readout

__all__ = ["RNN", "unroll"]


class RNN(Network):
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

    # the algorithms show its state (state.h, and h0's gradient when h0 came as a tensor) as
    # the (B, H) tensor h_t rather than the tuple (ElmanState(h_t),) of a Network
    flat_state = True

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
        nn.Module.__init__(self)  # not Network's: the cell's parameters are registered flat
        if not isinstance(output_size, int) or isinstance(output_size, bool) or output_size < 1:
            raise ValueError(f"output_size must be a positive int, got {output_size!r}")
        _check_dtype(dtype)
        # the cell's own draws are undone: RNN draws its five parameters in its historical
        # order below, so a seed gives the same network as before cells existed
        dev = torch.device(device) if device is not None else torch.device("cpu")
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            cell = Elman(input_size, hidden_size, activation=activation, alpha=alpha,
                         init=init, dtype=dtype, device=device)
        self.activation = cell.activation
        self.readout = check_readout(readout)
        self.init = init
        # the cell is not a submodule: its parameters are this module's, under flat names
        object.__setattr__(self, "_cell", cell)
        self.W_in, self.W_rec, self.b_rec = cell.W_in, cell.W_rec, cell.b_rec
        kw = {"dtype": dtype, "device": device}
        H, K = hidden_size, output_size
        self.W_out = nn.Parameter(torch.empty(K, H, **kw))
        self.b_out = nn.Parameter(torch.empty(K, **kw))
        self.reset_parameters()

    @property
    def alpha(self) -> float:
        """The leak in (0, 1], the cell's own: setting it changes what every algorithm
        computes from the next call on."""
        return self._cell.alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        if not (isinstance(value, (int, float)) and not isinstance(value, bool)
                and 0.0 < float(value) <= 1.0):
            raise ValueError(f"alpha must be a float in (0, 1], got {value!r}")
        self._cell.alpha = float(value)

    def layers(self) -> list[tuple[str, Elman]]:
        cell = self._cell
        for n in ("W_in", "W_rec", "b_rec"):  # keep the cell on this module's tensors
            if cell._parameters[n] is not self._parameters[n]:
                cell._parameters[n] = self._parameters[n]
        return [("", cell)]

    @property
    def cells(self) -> list[Elman]:
        return [self.layers()[0][1]]

    @property
    def input_size(self) -> int:
        return self.W_in.shape[1]

    @property
    def num_layers(self) -> int:
        return 1

    @property
    def hidden_size(self) -> int:
        return self.W_rec.shape[0]

    @property
    def output_size(self) -> int:
        return self.W_out.shape[0]

    def reset_parameters(self) -> None:
        """Draw ``W_in``, ``b_rec``, ``W_out``, ``b_out`` uniformly in +-1/sqrt(H) (as
        ``torch.nn.RNN``), and ``W_rec`` (H, H) by the ``init`` given."""
        H = self.hidden_size
        bound = 1.0 / math.sqrt(H)
        with torch.no_grad():
            for p in (self.W_in, self.b_rec, self.W_out, self.b_out):
                p.uniform_(-bound, bound)
        init_recurrent(self.W_rec, self.init)

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
        if h0 is not None and not isinstance(h0, Tensor):
            h0 = _h0_tensor(h0)
        h0 = check_h0(self, h0, B)
        h, _ = unroll(self, inputs, h0, need_deriv=False)
        z = torch.addmm(self.b_out, h.reshape(T * B, -1), self.W_out.T).view(T, B, -1)
        return readout(z, self.readout), h


def _h0_tensor(h0):
    """An ``ElmanState`` (or a one-element list of it) given as h0 -> its tensor."""
    if isinstance(h0, (list, tuple)) and len(h0) == 1:
        h0 = h0[0]
    if isinstance(h0, Tensor):
        return h0
    raise TypeError(f"h0 must be a torch.Tensor of shape (B, H) or (H,), got {type(h0).__name__}")


def _check_dtype(dtype) -> None:
    if dtype is None:
        return
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.is_complex:
        raise TypeError(f"dtype must be a real floating torch.dtype (torch.float32 or "
                        f"torch.float64), got {dtype!r}")
