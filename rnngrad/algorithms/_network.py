"""What the algorithms share for any ``rnngrad.Network``: the stack of cells run forward
and backward over a segment, its flattened state, and the readout's signal.

Notation (DESIGN.md): layer l has state ``s^l`` (a NamedTuple of (B, n_c) tensors,
flattened to (B, S_l)), input ``h^{l-1}_t`` (``h^0 = x``) and output
``h^l_t = output(s^l_t)``; the readout reads ``h^L``. The recurrent parameters are
every parameter but ``W_out``, ``b_out``, in ``named_parameters()`` order; layer l's
occupy the contiguous columns ``[offset_l, offset_{l+1})`` of any flattened influence.
"""

from __future__ import annotations

import threading
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..cells.base import Cell, flatten_state, unflatten_state
from ..network import Network

__all__ = ["Bound", "bind", "stack_forward", "stack_backward", "net_step",
           "output_into_state", "state_from_output_grad", "split_flat", "zero_state",
           "flatten_net_state", "unflatten_net_state", "trajectory", "check_network",
           "emit_vjp", "output_influence", "check_real", "unit_mix", "Workspace",
           "check_sensitivities", "pack_sensitivities", "as_state", "state_grad_form",
           "shown", "unshown"]


class Bound(NamedTuple):
    """A network's cells with detached parameters, for one call of an algorithm."""

    cells: list  # the cells, bottom to top
    prefixes: list  # each layer's parameter-name prefix in the network
    params: list  # per layer: dict own name -> detached tensor
    names: list  # per layer: the network names of its parameters, in order
    offsets: list  # per layer: first column of its parameters in a flat influence; + total
    memo: dict  # what an algorithm derives from the binding alone, kept with it (per step
    #             plans: ``_traces_network``); rebuilt with it

    @property
    def L(self) -> int:
        return len(self.cells)


def as_state(model, h0, batch_size: int) -> tuple[tuple | None, bool]:
    """h0 as the network's state (one state per layer) and whether it came as a tensor
    (a one-layer network whose state has one component may take it so; its gradient is
    then given back as a tensor too, ``state_grad_form``)."""
    if isinstance(h0, Tensor):
        return model.coerce_state(h0, batch_size)[0], True
    return h0, False


def shown(model, s: tuple):
    """The network state ``s`` as an algorithm's ``state.h`` shows it: the (B, H) tensor
    for a model that declares ``flat_state`` (``rnngrad.RNN``: one Elman layer, whose
    state is h alone), else the tuple of per-layer states."""
    return s[0].h if getattr(model, "flat_state", False) else s


def unshown(h) -> tuple:
    """The inverse of ``shown``: a tensor is one Elman layer's h."""
    if isinstance(h, Tensor):
        from ..cells.elman import ElmanState

        return (ElmanState(h),)
    return h


def state_grad_form(d0: tuple, as_tensor: bool):
    """``dL/d state_0`` in the form h0 came in: the state, or its one tensor."""
    return d0[0][0] if as_tensor else d0


def check_network(model, who: str) -> None:
    if not isinstance(model, Network):
        raise TypeError(f"{who} takes an rnngrad.Network (or rnngrad.RNN), got "
                        f"{type(model).__name__}")


def check_real(model) -> None:
    """A clear error for a complex parameter (rnngrad's algorithms take real tensors)."""
    for n, p in model.named_parameters():
        if p.is_complex():
            raise TypeError(f"parameter {n} (shape {tuple(p.shape)}) has dtype {p.dtype}, but "
                            "rnngrad's algorithms take real tensors only (float32 or float64): "
                            "write a complex parameter as its real and imaginary parts, as "
                            "rnngrad.cells.LRU does (B_re, B_im)")


def _own_params(cell) -> dict[str, Tensor]:
    """The cell's parameters by its own names, as ``named_parameters`` gives them (the
    common case, a cell without submodules or shared tensors, read off directly)."""
    if not cell._modules:
        own = {n: t for n, t in cell._parameters.items() if t is not None}
        if len({id(t) for t in own.values()}) == len(own):
            return own
    return dict(cell.named_parameters())


# id(model) -> (weak reference to it, per layer (cell, ((name, parameter, data_ptr, shape),
# ...)), Bound); a plain dict (a C lookup per step), its entry dropped with the model
_BOUND: dict = {}


def _forget_bound(key: int) -> None:
    _BOUND.pop(key, None)


def bind(model) -> Bound:
    """The layers' cells and their parameters, detached, for one call of an algorithm. A
    layer's parameters are its cell's own tensors, which are the network's (``RNN``'s
    ``layers`` keeps its cell on the flat-named ones).

    Kept per model between calls (an online step calls this every step): reused while every
    layer has the same cell, the same parameter objects and each the same storage as its
    detached view (a parameter replaced, or its ``.data`` swapped, rebinds)."""
    layers = model.layers()
    compiling = torch.compiler.is_compiling()  # traced: no cache (data_ptr, weak references)
    hit = None if compiling else _BOUND.get(id(model))
    if hit is not None and hit[0]() is model and len(hit[1]) == len(layers):
        _, sig, bound = hit
        for (prefix, cell), (c, own), bp in zip(layers, sig, bound.prefixes):
            ps = cell._parameters
            if cell is not c or prefix != bp or cell._modules or len(ps) != len(own):
                break
            for n, t, ptr, shape in own:
                if ps.get(n) is not t or t.data_ptr() != ptr or t.shape != shape:
                    break
            else:
                continue
            break
        else:
            W_out = model._parameters.get("W_out")  # not nn.Module's __getattr__ per step
            if not (model.W_out if W_out is None else W_out).is_complex():
                return bound
    cells, prefixes, params, names, offsets = [], [], [], [], []
    sig = []
    off = 0
    for prefix, cell in layers:
        own = _own_params(cell)
        p = {n: t.detach() for n, t in own.items()}
        cells.append(cell)
        prefixes.append(prefix)
        params.append(p)
        names.append([prefix + n for n in own])
        offsets.append(off)
        off += sum(t.numel() for t in p.values())
        if not compiling:
            sig.append((cell, tuple((n, t, t.data_ptr(), t.shape) for n, t in own.items())))
    offsets.append(off)
    if any(t.is_complex() for p in params for t in p.values()) or model.W_out.is_complex():
        check_real(model)  # raises, naming the parameter
    bound = Bound(cells, prefixes, params, names, offsets, {})
    if not compiling:
        import weakref

        key = id(model)
        _BOUND[key] = (weakref.ref(model, lambda _, k=key: _forget_bound(k)), sig, bound)
    return bound


def net_step(net: Bound, state: tuple, x: Tensor) -> tuple[tuple, Tensor]:
    """One step of the stack: ``(state_t, h^L_t)``."""
    new = []
    for cell, p, s in zip(net.cells, net.params, state):
        s = cell.step(p, s, x)
        x = cell.emit(p, s, x)
        new.append(s)
    return tuple(new), x


class Workspace:
    """Buffers an algorithm object keeps between its calls, one dict per thread and per
    layer, for the cells that declare ``uses_workspace`` (their ``forward_sequence`` then
    takes ``workspace=``). Re-allocating a (T, B, H) buffer each call costs page faults
    (about a tenth of BPTT's time at T = 200, B = 64, H = 256); a buffer is valid until
    the algorithm's next call in the same thread, and nothing returned to the caller
    points into it."""

    def __init__(self) -> None:
        self._local = threading.local()

    def layers(self, n: int) -> list[dict]:
        got = getattr(self._local, "layers", None)
        if got is None or len(got) < n:
            got = [{} for _ in range(n)]
            self._local.layers = got
        return got[:n]

    def buffer(self, name: str, shape: tuple, like: Tensor) -> Tensor:
        """The algorithm's own buffer ``name`` of ``shape``, like's dtype and device."""
        bufs = getattr(self._local, "buffers", None)
        if bufs is None:
            bufs = self._local.buffers = {}
        buf = bufs.get(name)
        if buf is None or buf.shape != shape or buf.dtype != like.dtype or buf.device != like.device:
            buf = bufs[name] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return buf


def stack_forward(net: Bound, inputs: Tensor, state0: tuple, *, cache: bool,
                  workspace: Workspace | None = None):
    """Every layer over the whole segment, bottom to top (layer l's outputs are layer
    l + 1's inputs). Returns ``(h^L (T, B, H), state_T, caches, layer_inputs)``.
    ``workspace``: buffers kept between calls, for the cells that declare
    ``uses_workspace`` (with ``cache``: the outputs may then live in those buffers)."""
    x = inputs
    caches, ins, finals = [], [], []
    spaces = workspace.layers(net.L) if workspace is not None and cache else [None] * net.L
    for cell, p, s0, ws in zip(net.cells, net.params, state0, spaces):
        ins.append(x)
        if ws is not None and getattr(cell, "uses_workspace", False):
            x, sT, c = cell.forward_sequence(p, x, s0, cache=cache, workspace=ws)
        else:
            x, sT, c = cell.forward_sequence(p, x, s0, cache=cache)
        caches.append(c)
        finals.append(sT)
    return x, tuple(finals), caches, ins


def stack_backward(net: Bound, ins: list, state0: tuple, caches: list, hbar: Tensor,
                   d_state: tuple | None, *, sensitivities: list | None = None
                   ) -> tuple[dict[str, Tensor], tuple]:
    """The adjoint pass over a segment, top layer first: each layer's ``dL/d inputs`` is
    the layer below's ``dL/d outputs``. ``hbar`` (T, B, H) is ``dL/dh^L_t`` from the
    readout (and reward), given up to this call (a cell that declares
    ``backward_overwrites`` writes over it); ``d_state`` the adjoint of ``state_T`` from
    later steps. Returns the recurrent parameters' gradients (network names) and
    ``dL/d state_0``. ``sensitivities``: a list that receives each layer's u_t (T, B, H_l),
    bottom layer first (the cells must declare ``gives_sensitivities``)."""
    grads: dict[str, Tensor] = {}
    d0: list[Any] = [None] * net.L
    us: list[Any] = [None] * net.L
    d = hbar
    for l in range(net.L - 1, -1, -1):
        cell = net.cells[l]
        kw = {"overwrite": True} if getattr(cell, "backward_overwrites", False) else {}
        if sensitivities is not None:
            kw["sensitivities"] = True
        g, d_in, ds0 = cell.backward_sequence(
            net.params[l], ins[l], state0[l], caches[l], d,
            None if d_state is None else d_state[l], input_grad=l > 0, **kw)
        if sensitivities is not None:
            us[l] = g.pop("u")
        grads.update({net.prefixes[l] + n: v for n, v in g.items()})
        d0[l] = ds0
        d = d_in
    if sensitivities is not None:
        sensitivities.extend(us)
    return grads, tuple(d0)


def check_sensitivities(model, who: str) -> None:
    """A clear error unless every layer's cell gives u_t (``gives_sensitivities``)."""
    bad = [f"{type(c).__name__} (layer {i})" for i, (_, c) in enumerate(model.layers())
           if not getattr(c, "gives_sensitivities", False)]
    if bad:
        raise ValueError(f"{who} returns u_t = dL/da_t, the per-step sensitivities of the "
                         "Elman cell's pre-activation (dL/db_rec(t)); the cells "
                         f"{', '.join(bad)} do not give them (a cell declares "
                         "gives_sensitivities and returns grads['u'] from backward_sequence)")


def pack_sensitivities(us: list) -> Any:
    """u per layer -> grads["u"]: the tensor for one layer, a tuple for a stack."""
    return us[0] if len(us) == 1 else tuple(us)


def trajectory(model, inputs: Tensor, h0) -> Tensor:
    """h^L_1..h^L_T (T, B, H) without a graph (for a reward's dR/dh)."""
    with torch.no_grad():
        if isinstance(h0, Tensor):  # one layer's one-component state given as a tensor
            h0 = model.coerce_state(h0, inputs.shape[1])[0]
        return stack_forward(bind(model), inputs, h0, cache=False)[0]


def zero_state(state) -> Any:
    return type(state)(*(torch.zeros_like(s) for s in state))


def output_into_state(cell: Cell, state, g: Tensor) -> Tensor:
    """``(d output / d state)^T g`` flattened to (B, S): the cotangent of the state for a
    cotangent g (B, H) of the output. When ``output`` returns one of the state's
    components (every built-in cell), that is a placement; otherwise a vjp."""
    out = cell.output(state)
    for k, comp in enumerate(state):
        if out is comp:
            parts = [g if j == k else torch.zeros_like(c) for j, c in enumerate(state)]
            return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    from torch.func import vjp

    _, fn = vjp(cell.output, state)
    (ds,) = fn(g)
    return flatten_state(ds)


def unit_mix(J: Tensor, Mv: Tensor, unit_shape: tuple) -> Tensor:
    """``Mv[:, c] <- sum_c' J[:, :, c, c'] * Mv[:, c']`` in place: the per-unit blocks J
    (B, U, C, C) applied to the component axis of Mv (B, C, ...), J's entries viewed as
    ``unit_shape`` to broadcast over the rest. C^2 elementwise ops and one copy of C - 1
    components, no permuted copy of Mv (what an einsum with tiny C x C blocks makes)."""
    C = J.shape[2]
    last = Mv[:, C - 1]
    old = Mv[:, :C - 1].clone()  # the components overwritten before the last is read

    def src(d):
        return last if d == C - 1 else old[:, d]

    for c in range(C - 1):
        if torch.compiler.is_compiling():  # rnngrad.compile: no out= into a strided view
            Mv[:, c].copy_(src(0) * J[:, :, c, 0].reshape(unit_shape))
        else:
            torch.mul(src(0), J[:, :, c, 0].reshape(unit_shape), out=Mv[:, c])
        for d in range(1, C):
            Mv[:, c].addcmul_(src(d), J[:, :, c, d].reshape(unit_shape))
    last.mul_(J[:, :, C - 1, C - 1].reshape(unit_shape))
    for d in range(C - 1):
        last.addcmul_(old[:, d], J[:, :, C - 1, d].reshape(unit_shape))
    return Mv


def emit_vjp(cell: Cell, params: dict, state, x: Tensor, g: Tensor):
    """The adjoint of a layer's output ``h_t = emit(params, state_t, x_t)`` for a cotangent
    g (B, H): ``(d_params, d_state (B, S), d_x (B, D) or None)``; d_params (summed over the
    batch) is empty and d_x None for a cell whose output is ``output(state)``."""
    if not cell.emits:
        return {}, output_into_state(cell, state, g), None
    return cell.emit_vjp(params, state, x, g)


def output_influence(cell: Cell, params: dict, state, x: Tensor, M: Tensor,
                     Mx: Tensor | None, own: tuple[int, int] | None) -> Tensor:
    """``d h_t / d columns`` (B, H, N) of a layer's output ``h_t = emit(params, state_t, x_t)``
    from the columns' influence on its state, M (B, S, N), and on its input, Mx (B, D, N')
    for the first N' <= N columns (None: the input does not depend on them); ``own`` the
    columns of the layer's own parameters (the direct term of ``emit``). For a cell whose
    output is a state component this is that component's rows of M."""
    if not cell.emits:
        out = cell.output(state)
        off = 0
        for comp in state:
            w = int(comp.shape[-1])
            if out is comp:
                return M[:, off:off + w]
            off += w
        from torch.func import jacrev, vmap

        def single(s):
            return cell.output(unflatten_state(s.unsqueeze(0), state)).squeeze(0)

        return torch.bmm(vmap(jacrev(single))(flatten_state(state)), M)
    Gs, Gx, Gp = cell.emit_jacobians(params, state, x)
    Mh = torch.bmm(Gs, M)
    if Mx is not None:
        Mh[:, :, :Mx.shape[2]].baddbmm_(Gx, Mx)
    if own is not None:
        Mh[:, :, own[0]:own[1]] += Gp
    return Mh


def state_from_output_grad(cell: Cell, state, g: Tensor):
    """As ``output_into_state``, as a state NamedTuple."""
    return unflatten_state(output_into_state(cell, state, g), state)


def split_flat(flat: Tensor, net: Bound, model=None) -> dict[str, Tensor]:
    """A flat (N,) gradient of the recurrent parameters -> network name -> tensor (views
    of ``flat``, in the bound parameters' order and shapes; ``model`` is not needed)."""
    out = {}
    off = 0
    for names, params in zip(net.names, net.params):
        for n, p in zip(names, params.values()):
            k = p.numel()
            out[n] = flat[off:off + k].view(p.shape)
            off += k
    return out


def flatten_net_state(state: tuple) -> Tensor:
    """One state per layer -> (B, S_total)."""
    return torch.cat([flatten_state(s) for s in state], dim=1)


def unflatten_net_state(s: Tensor, like: tuple) -> tuple:
    out, off = [], 0
    for layer in like:
        w = sum(int(c.shape[-1]) for c in layer)
        out.append(unflatten_state(s[..., off:off + w], layer))
        off += w
    return tuple(out)


def through_output(cell: Cell, state, Jx: Tensor) -> Tensor:
    """``Jx @ d output / d state``: (B, S', H) -> (B, S', S), where ``Jx`` is a Jacobian
    with respect to this cell's output (the next layer's input). A placement when
    ``output`` returns one of the state's components; a per-example Jacobian otherwise."""
    out = cell.output(state)
    B, Sp = Jx.shape[0], Jx.shape[1]
    for k, comp in enumerate(state):
        if out is comp:
            parts = [Jx if j == k else Jx.new_zeros(B, Sp, c.shape[-1])
                     for j, c in enumerate(state)]
            return torch.cat(parts, dim=2) if len(parts) > 1 else Jx
    from torch.func import jacrev, vmap

    def single(s):
        st = unflatten_state(s.unsqueeze(0), state)
        return cell.output(st).squeeze(0)

    dout = vmap(jacrev(single))(flatten_state(state))  # (B, H, S)
    return torch.bmm(Jx, dout)
