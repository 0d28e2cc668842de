"""From ``torch.nn`` recurrent modules to rnngrad cells and networks.

``from_torch(cls, rnn, linear, readout)`` (behind ``rnngrad.Network.from_torch``) copies a
``torch.nn.RNN`` (tanh or relu), ``GRU`` or ``LSTM`` of any ``num_layers`` and an
``nn.Linear`` readout into a network of rnngrad cells computing the same function::

    torch.nn.RNN   layer l -> Elman(activation=nonlinearity): W_in = weight_ih_l{l},
                   W_rec = weight_hh_l{l}, b_rec = bias_ih_l{l} + bias_hh_l{l}
    torch.nn.GRU   layer l -> GRU:  W_ih, W_hh, b_ih, b_hh = weight_ih_l{l}, weight_hh_l{l}, ...
    torch.nn.LSTM  layer l -> LSTM: the same four, gate order i, f, g, o kept
    nn.Linear      -> W_out = weight, b_out = bias

so that ``net(x)[0]`` equals ``g(linear(rnn(x)[0]))`` (g the readout). The copies have
the module's dtype and device and share no memory with it. A module built with
``bias=False`` gives zero biases (trainable here, unlike there); a ``Linear`` without
bias gives ``b_out = 0``. Dropout between layers is not carried over: the network
equals the module in eval mode. Bidirectional modules, ``batch_first=True`` and LSTM
projections (``proj_size > 0``) are refused with an error.

``share=True`` makes the network hold the module's own ``nn.Parameter`` objects instead
of copies: rnngrad's GRU and LSTM cells use PyTorch's layouts (``W_ih`` (G H, D) with the
gates r, z, n or i, f, g, o; ``b_ih`` and ``b_hh`` apart), so every tensor maps one to
one, and ``rnngrad.gradient(net, ..., set_grad=True)`` writes the module's ``.grad``,
where ``torch.optim`` over the module's parameters finds it. The Elman cell has one
bias ``b_rec`` where ``torch.nn.RNN`` has two: ``bias_hh`` is folded into ``bias_ih``
(``bias_ih += bias_hh``, then ``bias_hh = 0`` with ``requires_grad=False``), the same
function, and ``b_rec`` is ``bias_ih``. A bias the module lacks (``bias=False``) is a
zero tensor here with ``requires_grad=False``.

``to_torch(net)`` (behind ``rnngrad.Network.to_torch``) goes back: a network of Elman
(tanh or relu, ``alpha = 1``), GRU or LSTM layers of one kind and one width, with the
plain readout (``readout_decay = 0``), becomes ``(torch.nn.RNN | GRU | LSTM, nn.Linear)``
with ``num_layers`` = the number of layers, copies of its weights: ``linear(rnn(x)[0])``
is z_t (apply the readout g, ``net.readout``, on top). Anything else is refused, naming
why. ``state_to_torch`` converts a network state to PyTorch's ``hx``.

``state_from_torch(rnn, hx)`` converts PyTorch's initial state (``h0`` (L, B, H), or
``(h0, c0)`` for an LSTM) into the per-layer state tuple ``net(x, h0=...)`` takes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .elman import Elman, ElmanState
from .gru import GRU, GRUState
from .lstm import LSTM, LSTMState

__all__ = ["from_torch", "cells_from_torch", "state_from_torch", "to_torch", "state_to_torch"]

_KINDS = "torch.nn.RNN, torch.nn.GRU or torch.nn.LSTM"


def _check_rnn(rnn: Any) -> None:
    if not isinstance(rnn, (nn.RNN, nn.GRU, nn.LSTM)):
        hint = (" (a single-step cell: use the sequence module instead)"
                if isinstance(rnn, nn.RNNCellBase) else "")
        raise TypeError(f"rnn must be a {_KINDS}, got {type(rnn).__name__}{hint}")
    name = type(rnn).__name__
    if rnn.bidirectional:
        raise ValueError(f"rnn is a bidirectional {name}; rnngrad's cells run forward in "
                         "time only: expected bidirectional=False")
    if rnn.batch_first:
        raise ValueError(f"rnn is a {name} with batch_first=True; rnngrad is time-major "
                         "(T, B, D): expected batch_first=False (transpose the inputs and "
                         "build the module without batch_first)")
    if getattr(rnn, "proj_size", 0):
        raise ValueError(f"rnn is an LSTM with proj_size={rnn.proj_size}; projected LSTMs are "
                         "not supported: expected proj_size=0")


def _copy(dst: Tensor, src: Tensor | None) -> None:
    with torch.no_grad():
        if src is None:
            dst.zero_()
        else:
            dst.copy_(src)


def cells_from_torch(rnn: nn.Module) -> list[Elman | GRU | LSTM]:
    """One rnngrad cell per layer of ``rnn`` (see the module docstring), weights copied."""
    _check_rnn(rnn)
    w = rnn.weight_ih_l0
    kw = {"dtype": w.dtype, "device": w.device}
    cells: list[Elman | GRU | LSTM] = []
    for layer in range(rnn.num_layers):
        D = rnn.input_size if layer == 0 else rnn.hidden_size
        H = rnn.hidden_size

        def get(name: str, layer: int = layer) -> Tensor | None:
            return getattr(rnn, f"{name}_l{layer}", None)

        if isinstance(rnn, nn.RNN):
            act = {"RNN_TANH": "tanh", "RNN_RELU": "relu"}[rnn.mode]
            cell = Elman(D, H, activation=act, **kw)
            _copy(cell.W_in, get("weight_ih"))
            _copy(cell.W_rec, get("weight_hh"))
            b_ih, b_hh = get("bias_ih"), get("bias_hh")
            _copy(cell.b_rec, None if b_ih is None else b_ih.detach() + b_hh.detach())
        else:
            cell = (GRU if isinstance(rnn, nn.GRU) else LSTM)(D, H, **kw)
            for mine, theirs in (("W_ih", "weight_ih"), ("W_hh", "weight_hh"),
                                 ("b_ih", "bias_ih"), ("b_hh", "bias_hh")):
                _copy(getattr(cell, mine), get(theirs))
        cells.append(cell)
    return cells


def from_torch(cls: type, rnn: nn.Module, linear: nn.Linear, readout: str = "identity",
               share: bool = False):
    """``cls(cells_from_torch(rnn), K, readout=readout)`` with the readout copied from
    ``linear``: the same function as ``linear(rnn(x)[0])`` followed by the readout g.
    ``share=True``: the network holds the module's own parameters (module docstring)."""
    if not isinstance(share, bool):
        raise TypeError(f"share must be a bool, got {share!r}")
    _check_rnn(rnn)
    name = type(rnn).__name__
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear must be a torch.nn.Linear (the readout z = W_out h + b_out), "
                        f"got {type(linear).__name__}")
    if linear.in_features != rnn.hidden_size:
        raise ValueError(f"linear has in_features={linear.in_features} but the {name} has "
                         f"hidden_size={rnn.hidden_size}: expected nn.Linear({rnn.hidden_size}, K)")
    w = rnn.weight_ih_l0
    if linear.weight.dtype != w.dtype:
        raise TypeError(f"linear has dtype {linear.weight.dtype} but the {name} has {w.dtype}")
    if linear.weight.device != w.device:
        raise ValueError(f"linear is on device {linear.weight.device} but the {name} is on "
                         f"{w.device}")
    net = cls(cells_from_torch(rnn), linear.out_features, readout=readout)
    _copy(net.W_out, linear.weight)
    _copy(net.b_out, linear.bias)
    if share:
        _share(net, rnn, linear)
    return net


def _frozen(p: nn.Parameter) -> nn.Parameter:
    """A zero parameter the module does not have: kept at zero (requires_grad=False)."""
    return p.requires_grad_(False)


def _share(net, rnn: nn.Module, linear: nn.Linear) -> None:
    """Put the module's own Parameter objects into the network's cells and readout."""
    for layer, cell in enumerate(net.cells):
        def get(name: str, layer: int = layer) -> nn.Parameter | None:
            return getattr(rnn, f"{name}_l{layer}", None)

        if isinstance(cell, Elman):
            cell.W_in, cell.W_rec = get("weight_ih"), get("weight_hh")
            b_ih, b_hh = get("bias_ih"), get("bias_hh")
            if b_ih is None:
                _frozen(cell.b_rec)
                continue
            with torch.no_grad():  # b_rec = bias_ih + bias_hh, kept in bias_ih alone
                b_ih.add_(b_hh)
                b_hh.zero_()
            b_hh.requires_grad_(False)
            cell.b_rec = b_ih
        else:
            cell.W_ih, cell.W_hh = get("weight_ih"), get("weight_hh")
            for mine, theirs in (("b_ih", "bias_ih"), ("b_hh", "bias_hh")):
                p = get(theirs)
                if p is None:
                    _frozen(getattr(cell, mine))
                else:
                    setattr(cell, mine, p)
    net.W_out = linear.weight
    if linear.bias is None:
        _frozen(net.b_out)
    else:
        net.b_out = linear.bias


def to_torch(net) -> tuple[nn.Module, nn.Linear]:
    """``(torch.nn.RNN | GRU | LSTM, nn.Linear)`` computing the network's z_t, weights
    copied (see the module docstring); a clear error for a network they cannot express."""
    layers = [c for _, c in net.layers()]
    names = ", ".join(type(c).__name__ for c in layers)
    for i, c in enumerate(layers):
        if type(c) not in (Elman, GRU, LSTM):
            raise TypeError(f"to_torch: cells[{i}] is a {type(c).__name__}, which torch.nn has "
                            "no module for: torch.nn.RNN, GRU and LSTM are stacks of "
                            "rnngrad.cells.Elman (tanh or relu, alpha=1), GRU or LSTM layers")
    kind = type(layers[0])
    if any(type(c) is not kind for c in layers):
        raise TypeError(f"to_torch: the network mixes cell types ({names}); a torch.nn.RNN, "
                        "GRU or LSTM stacks layers of one type")
    H = layers[0].hidden_size
    for i, c in enumerate(layers):
        if c.hidden_size != H:
            raise ValueError(f"to_torch: cells[{i}] has hidden_size {c.hidden_size} but cells[0] "
                             f"has {H}; torch.nn's num_layers stacks layers of one width")
        if kind is Elman:
            if c.activation != layers[0].activation:
                raise ValueError(f"to_torch: cells[{i}] has activation {c.activation!r} but "
                                 f"cells[0] has {layers[0].activation!r}; torch.nn.RNN has one "
                                 "nonlinearity for all its layers")
            if c.activation not in ("tanh", "relu"):
                raise ValueError(f"to_torch: cells[{i}] is an Elman cell with activation "
                                 f"{c.activation!r}; torch.nn.RNN has tanh and relu only")
            if c.alpha != 1.0:
                raise ValueError(f"to_torch: cells[{i}] is a leaky Elman cell (alpha="
                                 f"{c.alpha:g}); torch.nn.RNN has no leak: expected alpha=1")
    if net.readout_decay:
        raise ValueError(f"to_torch: the network has a leaky readout (readout_decay="
                         f"{net.readout_decay:g}); nn.Linear is the plain readout "
                         "z = W_out h + b_out: expected readout_decay=0")
    w = net.W_out
    kw = {"dtype": w.dtype, "device": w.device}
    D, L, K = layers[0].input_size, len(layers), net.output_size
    if kind is Elman:
        rnn = nn.RNN(D, H, num_layers=L, nonlinearity=layers[0].activation, **kw)
    else:
        rnn = (nn.GRU if kind is GRU else nn.LSTM)(D, H, num_layers=L, **kw)
    for layer, c in enumerate(layers):
        def put(name: str, value: Tensor | None, layer: int = layer) -> None:
            _copy(getattr(rnn, f"{name}_l{layer}"), value)

        if kind is Elman:
            put("weight_ih", c.W_in)
            put("weight_hh", c.W_rec)
            put("bias_ih", c.b_rec)
            put("bias_hh", None)
        else:
            for mine, theirs in (("W_ih", "weight_ih"), ("W_hh", "weight_hh"),
                                 ("b_ih", "bias_ih"), ("b_hh", "bias_hh")):
                put(theirs, getattr(c, mine))
    linear = nn.Linear(H, K, **kw)
    _copy(linear.weight, net.W_out)
    _copy(linear.bias, net.b_out)
    return rnn, linear


def state_to_torch(state: tuple) -> Tensor | tuple[Tensor, Tensor]:
    """A network state of Elman, GRU or LSTM layers (one state per layer, each component
    (B, H)) as PyTorch's ``hx``: ``h0`` (L, B, H), or ``(h0, c0)`` for LSTM layers."""
    if not isinstance(state, (tuple, list)) or not state:
        raise TypeError(f"state must be a network state (one state per layer, as "
                        f"net.init_state(B) gives), got {type(state).__name__}")
    kinds = {type(s) for s in state}
    if kinds == {LSTMState}:
        return (torch.stack([s.h for s in state]), torch.stack([s.c for s in state]))
    if kinds <= {ElmanState, GRUState} and len(kinds) == 1:
        return torch.stack([s.h for s in state])
    raise TypeError(f"state must hold ElmanState, GRUState or LSTMState layers of one kind, "
                    f"got {', '.join(sorted(k.__name__ for k in kinds))}")


def state_from_torch(rnn: nn.Module, hx: Tensor | tuple[Tensor, Tensor]) -> tuple:
    """PyTorch's initial state of ``rnn`` as rnngrad's per-layer state tuple.

    Args:
        rnn: the ``torch.nn.RNN``, ``GRU`` or ``LSTM`` the state belongs to.
        hx: ``h0`` (L, B, H) for RNN and GRU, ``(h0, c0)`` (each (L, B, H)) for LSTM, with
            L = num_layers; or the unbatched (L, H) forms, which become (H,) per layer
            (shared over the batch, as ``Network.coerce_state`` reads them).

    Returns:
        ``(state_0, ..., state_{L-1})``: ``ElmanState(h)``, ``GRUState(h)`` or
        ``LSTMState(h, c)`` per layer, views of ``hx``.
    """
    _check_rnn(rnn)
    name, L, H = type(rnn).__name__, rnn.num_layers, rnn.hidden_size
    if isinstance(rnn, nn.LSTM):
        if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
            raise TypeError(f"hx for an LSTM must be a tuple (h0, c0), got {type(hx).__name__}")
        comps, labels = tuple(hx), ("h0", "c0")
    else:
        if not isinstance(hx, Tensor):
            raise TypeError(f"hx for a {name} must be a tensor h0 of shape ({L}, B, {H}), got "
                            f"{type(hx).__name__}")
        comps, labels = (hx,), ("h0",)
    for lab, c in zip(labels, comps):
        if not isinstance(c, Tensor):
            raise TypeError(f"{lab} must be a torch.Tensor, got {type(c).__name__}")
        if c.dim() not in (2, 3) or c.shape[0] != L or c.shape[-1] != H:
            raise ValueError(f"{lab} has shape {tuple(c.shape)} but the {name} expects "
                             f"({L}, B, {H}) (num_layers, batch, hidden_size) or ({L}, {H})")
    if len(comps) == 2 and comps[0].shape != comps[1].shape:
        raise ValueError(f"h0 has shape {tuple(comps[0].shape)} but c0 has "
                         f"{tuple(comps[1].shape)}: expected the same")
    kind = (LSTMState if isinstance(rnn, nn.LSTM)
            else GRUState if isinstance(rnn, nn.GRU) else ElmanState)
    return tuple(kind(*(c[layer] for c in comps)) for layer in range(L))
