"""``rnngrad.gradient``: the loss and its gradient by any algorithm.

The loss is pinned (see ``rnngrad.readouts``)::

    L = (1/B) * sum_{t,b} mask[t,b] * l(t,b)       and, with a reward R(h_1..h_T),  L - R

``gradient`` validates the input, then either runs the algorithm's whole-sequence
fast path or drives its ``init`` / ``step`` / ``flush`` functions over the sequence
and sums what they emit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ._checks import check_inputs, check_mask, check_params_finite, check_targets
from .algorithms._network import trajectory, unflatten_net_state
from .algorithms.base import Algorithm, Grads, add_grads
from .algorithms.bptt import bptt
from .errors import NonFiniteError
from .network import Network
from .readouts import check_loss, default_loss, reward_grad

__all__ = ["gradient", "write_grads"]


def gradient(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor | None = None,
    *,
    algorithm: Algorithm | None = None,
    loss: str | None = None,
    mask: Tensor | None = None,
    h0: Tensor | None = None,
    reward: Callable[[Tensor], Tensor] | None = None,
    set_grad: bool = False,
) -> tuple[Tensor, Grads]:
    """The pinned loss and its gradients with respect to the model's parameters.

    Args:
        model: an ``rnngrad.Network`` (any cells, any number of layers) or ``rnngrad.RNN``.
        inputs: (T, B, D).
        targets: (T, B, K) float for "mse" and "bce", (T, B) class indices for
            "cross_entropy"; None for no supervised loss (then a reward is required).
        algorithm: ``rnngrad.bptt()`` (default), ``rnngrad.rtrl()``, ``rnngrad.tbptt(k)``, ...
        loss: "mse" | "cross_entropy" | "bce"; None (default): the readout's own, softmax ->
            "cross_entropy", sigmoid -> "bce", identity -> "mse".
        mask: (T, B) or (T,) weights of the steps; None: every step counts.
            Many-to-one is a mask with only the last step set.
        h0: the initial state (zeros if None): one state per layer, as
            ``model.init_state(B)`` gives, or one layer's state alone for a one-layer
            network, or its tensor (B, n) or (n,) when that state has one component (an
            ``RNN``'s h0 is a (B, H) or (H,) tensor); see ``Network.coerce_state``. When
            given, ``grads["h0"]`` is its gradient, in the same form.
        reward: a callable ``R(h)`` of the whole (T, B, H) trajectory of the last layer's
            outputs returning a scalar to be maximised; the returned loss is then ``L - R``.
            ``dR/dh_t`` comes from autograd on R alone; the recurrence is the algorithm's.
        set_grad: also write the gradients into the parameters' ``.grad``
            (replacing what is there), so a ``torch.optim`` optimizer can step.

    Returns:
        ``(loss, grads)``: a 0-dim tensor and a dict keyed like
        ``model.named_parameters()`` (plus "h0" when h0 is given, and whatever extra the
        algorithm was asked for, such as ``bptt(sensitivities=True)``'s "u").
    """
    algorithm = bptt() if algorithm is None else algorithm
    if not isinstance(algorithm, Algorithm):
        raise TypeError(f"algorithm must be an rnngrad algorithm such as rnngrad.bptt(), got "
                        f"{type(algorithm).__name__}")
    if not isinstance(model, Network):
        raise TypeError(f"model must be an rnngrad.Network or rnngrad.RNN, got "
                        f"{type(model).__name__}")
    if not isinstance(set_grad, bool):
        raise TypeError(f"set_grad must be a bool, got {set_grad!r}")
    T, B = check_inputs(model, inputs)
    if loss is None:
        loss = default_loss(model.readout)
    check_loss(loss, model.readout)
    if targets is None and reward is None:
        raise ValueError("nothing to differentiate: give targets, a reward, or both")
    if targets is not None:
        targets = check_targets(model, targets, loss, T, B)
    if reward is not None and not callable(reward):
        raise TypeError(f"reward must be a callable R(h) of the (T, B, H) trajectory, got "
                        f"{type(reward).__name__}")
    mask = check_mask(model, mask, T, B)
    track_h0 = h0 is not None
    h0, spec = model.coerce_state(h0, B)
    check_params_finite(model)

    # a sequence form may decline a model (None): the step loop then runs
    out = None if algorithm.sequence is None else \
        algorithm.sequence(model, inputs, targets, mask, h0, loss, reward)
    if out is None:
        out = _step_loop(algorithm, model, inputs, targets, mask, h0, loss, reward, track_h0)
    value, grads = out
    _check_result(algorithm, model, inputs, h0, value, grads)

    if track_h0:
        if "h0" not in grads:  # a sequence form that does not estimate it (uoro())
            raise ValueError(f"{algorithm.name} does not estimate the gradient w.r.t. the "
                             "initial state h0; call gradient without h0 (the state then "
                             "starts at zero)")
        d0 = grads["h0"]
        if isinstance(d0, torch.Tensor):  # a one-component state's gradient as its tensor
            d0 = unflatten_net_state(d0, h0)
        grads["h0"] = Network.pack_state_grad(d0, spec)
    else:
        grads.pop("h0", None)
    if set_grad:
        write_grads(model, grads)
    return value, grads


def _step_loop(algorithm: Algorithm, model, inputs, targets, mask, h0, loss, reward, track_h0):
    """Drive init / step / flush over the sequence and sum what is emitted."""
    T, B, _ = inputs.shape
    dh = None
    value = inputs.new_zeros(())
    if reward is not None:
        hs = trajectory(model, inputs, h0)
        R, dR = reward_grad(reward, hs)
        value = value - R
        dh = -dR
    state = algorithm.init(model, B, h0=h0 if track_h0 else None)
    total: Grads | None = None
    for t in range(T):
        target_t = None if targets is None else targets[t]
        try:
            state, out, g = algorithm.step(model, state, inputs[t], target_t, mask_t=mask[t],
                                           loss=loss, dh_t=None if dh is None else dh[t])
        except NonFiniteError as e:
            raise NonFiniteError(f"{e} (at step {t + 1} of {T})", quantity=e.quantity,
                                 step=t + 1) from None
        value = value + out.loss
        total = add_grads(total, g)
    state, g = algorithm.flush(model, state)
    total = add_grads(total, g)
    if total is None:  # an algorithm that never emitted: the gradient is zero
        total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    return value, total


def _flat_tensors(v):
    if isinstance(v, torch.Tensor):
        return [v]
    return [t for x in v for t in _flat_tensors(x)]


def _check_result(algorithm, model, inputs, h0, value, grads) -> None:
    """One reduction over the loss and every gradient; on a NaN or Inf, say where it arose:
    the first step whose forward state is not finite, or else the backward pass."""
    tensors = [value.reshape(1)] + [t for g in grads.values() for t in _flat_tensors(g)]
    if bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors)).sum())):
        return
    hs = trajectory(model, inputs, h0)
    finite = torch.isfinite(hs).flatten(1).all(1)
    if not bool(finite.all()):
        t = int((~finite).nonzero()[0]) + 1
        prev = hs[t - 2].abs().max().item() if t > 1 else float("nan")
        raise NonFiniteError(
            f"{algorithm.name}: the forward pass overflowed at step {t} of {inputs.shape[0]}: "
            f"the network's output h_{t} has NaN or Inf entries (largest |h_{t - 1}| = "
            f"{prev:.3g}); the weights or inputs are too large, or the recurrence is unstable",
            quantity="h_t", step=t)
    if not bool(torch.isfinite(value)):
        raise NonFiniteError(f"{algorithm.name}: the loss is {float(value)} though the forward "
                             "pass is finite: the targets, the reward or the readout overflowed",
                             quantity="loss")
    for name, g in grads.items():
        if not all(bool(torch.isfinite(t).all()) for t in _flat_tensors(g)):
            raise NonFiniteError(
                f"{algorithm.name}: grads[{name!r}] has NaN or Inf entries though the forward "
                "pass and the loss are finite: the backward pass (or the algorithm's influence "
                "or traces) overflowed: exploding gradients over the sequence",
                quantity=f"grads[{name!r}]")
    raise NonFiniteError(f"{algorithm.name}: the gradient's entries are finite but too large "
                         "to add up (overflow)", quantity="grads")


def write_grads(model: nn.Module, grads: Grads, *, accumulate: bool = False) -> None:
    """Write ``grads`` into the parameters' ``.grad`` (keys that are not parameters are
    ignored), replacing what is there, or adding to it with ``accumulate=True``."""
    params = dict(model.named_parameters())
    for name, g in grads.items():
        p = params.get(name)
        if p is None:
            continue
        if g.shape != p.shape:
            raise ValueError(f"gradient {name!r} has shape {tuple(g.shape)} but the parameter "
                             f"has shape {tuple(p.shape)}")
        if accumulate and p.grad is not None:
            p.grad.add_(g)
        else:
            p.grad = g.detach().clone()
