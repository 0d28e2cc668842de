"""An independent reference for any rnngrad.Network: its own forward (a plain loop over the
cells' ``step``) differentiated by torch.autograd, with the pinned loss written out here."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def step_loss(z, target, readout, loss):
    if loss == "mse":
        y = {"identity": z, "softmax": torch.softmax(z, -1), "sigmoid": torch.sigmoid(z)}[readout]
        return 0.5 * ((y - target) ** 2).sum(-1)
    if loss == "cross_entropy":
        return F.cross_entropy(z, target, reduction="none")
    return F.binary_cross_entropy_with_logits(z, target, reduction="none").sum(-1)


def net_loss(net, inputs, targets, *, loss="mse", mask=None, state0=None, reward=None,
             detach_every=None, params=None, stepper=None):
    """L = (1/B) sum_{t,b} mask l (- R(h^L)), by a loop over ``net.step``.

    params: network-named tensors to use (default: the network's own parameters).
    detach_every: the whole state detached every k steps (TBPTT(k)).
    stepper: ``stepper(l, cell, params, state, x) -> state`` replacing layer l's step
        (to build the graphs the approximate rules differentiate exactly).
    """
    T, B, _ = inputs.shape
    P = dict(net.named_parameters()) if params is None else params
    layer_params = net.layer_params(P)
    state = net.init_state(B) if state0 is None else state0
    if mask is None:
        mask = torch.ones(T, B, dtype=inputs.dtype)
    total = inputs.new_zeros(())
    hs = []
    for t in range(T):
        if detach_every is not None and t > 0 and t % detach_every == 0:
            state = tuple(type(s)(*(c.detach() for c in s)) for s in state)
        x, new = inputs[t], []
        for l, ((_, cell), p, s) in enumerate(zip(net.layers(), layer_params, state)):
            s = cell.step(p, s, x) if stepper is None else stepper(l, cell, p, s, x)
            x = cell.emit(p, s, x)
            new.append(s)
        state = tuple(new)
        hs.append(x)
        if targets is not None:
            z = x @ P["W_out"].T + P["b_out"]
            total = total + (mask[t] * step_loss(z, targets[t], net.readout, loss)).sum() / B
    if reward is not None:
        total = total - reward(torch.stack(hs))
    return total


def net_grads(net, inputs, targets, *, state0=None, **kw):
    """Autograd gradients of ``net_loss``: dict keyed like named_parameters (+ "h0": a
    tuple of per-layer states, when state0 is given)."""
    P = {n: p.detach().clone().requires_grad_(True) for n, p in net.named_parameters()}
    leaves = list(P.values())
    s0 = None
    if state0 is not None:
        s0 = tuple(type(s)(*(c.detach().clone().requires_grad_(True) for c in s)) for s in state0)
        leaves += [c for s in s0 for c in s]
    L = net_loss(net, inputs, targets, params=P, state0=s0, **kw)
    gs = torch.autograd.grad(L, leaves, allow_unused=True)
    gs = [torch.zeros_like(v) if g is None else g for v, g in zip(leaves, gs)]
    out = dict(zip(P, gs[:len(P)]))
    if s0 is not None:
        it = iter(gs[len(P):])
        out["h0"] = tuple(type(s)(*(next(it) for _ in s)) for s in s0)
    return L.detach(), out


def flat(g):
    """A gradient value (tensor or nested states) -> one flat tensor."""
    if isinstance(g, torch.Tensor):
        return g.reshape(-1)
    return torch.cat([flat(x) for x in g])


def max_rel_err(grads, ref):
    worst = 0.0
    for k, r in ref.items():
        a, b = flat(grads[k]), flat(r)
        worst = max(worst, float((a - b).norm() / max(float(b.norm()), 1e-300)))
    return worst


def detached(s):
    return type(s)(*(c.detach() for c in s))


def unit_cut_step(cell, p, s, x):
    """The step with, for each unit i, every other unit's previous state detached: the
    value is the step's; the gradient to the previous state flows only within units."""
    U = cell.n_units
    cols = []
    for i in range(U):
        keep = torch.zeros(U, dtype=s[0].dtype)
        keep[i] = 1.0
        mixed = type(s)(*(c.detach() + keep * (c - c.detach()) for c in s))
        new = cell.step(p, mixed, x)
        cols.append([c[:, i] for c in new])
    return type(s)(*(torch.stack([col[k] for col in cols], 1) for k in range(len(s))))


def spatial_grads(net, inputs, targets, *, layer_step=unit_cut_step, state0=None, **kw):
    """The gradient the per-unit trace rules (SnAp-1; e-prop on a cell whose eligibility is
    its local Jacobian) compute, as autograd of one graph per layer: layer l stepped by
    ``layer_step`` (cross-unit paths cut), the layers above it seeing their own previous
    state detached (only the same step's path from layer l to the loss), the layers
    below unchanged. Layer l's parameters (and initial state) take their gradient from
    graph l; W_out and b_out from the full graph."""
    out = {}
    _, full = net_grads(net, inputs, targets, state0=state0, **kw)
    out["W_out"], out["b_out"] = full["W_out"], full["b_out"]
    h0 = []
    for l, (prefix, _) in enumerate(net.layers()):

        def stepper(k, cell, p, s, x, _l=l):
            if k == _l:
                return layer_step(cell, p, s, x)
            if k > _l:
                return cell.step(p, detached(s), x)
            return cell.step(p, s, x)

        _, g = net_grads(net, inputs, targets, state0=state0, stepper=stepper, **kw)
        out.update({n: v for n, v in g.items() if n.startswith(prefix) and n != "h0"})
        if state0 is not None:
            h0.append(g["h0"][l])
    if state0 is not None:
        out["h0"] = tuple(h0)
    return out
