"""An independent reference: the network as a plain Python loop, differentiated by autograd.

Nothing here uses rnngrad's forward pass or losses, so the tests compare two
independent computations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACT = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "relu": torch.relu,
    "identity": lambda a: a,
    "softplus": F.softplus,
}


def reference_loss(model, inputs, targets=None, *, loss="mse", mask=None, h0=None, reward=None,
                   params=None, detach_every=None):
    """The pinned loss L = (1/B) sum_{t,b} mask l (minus R), by a plain loop.

    params: dict of tensors to use instead of the model's (so autograd can differentiate).
    detach_every: cut the hidden state from the graph every k steps (truncated BPTT).
    """
    p = dict(model.named_parameters()) if params is None else params
    T, B, _ = inputs.shape
    H = model.hidden_size
    phi = ACT[model.activation]
    alpha = model.alpha
    h = torch.zeros(B, H, dtype=inputs.dtype) if h0 is None else h0.expand(B, H)
    if mask is None:
        mask = torch.ones(T, B, dtype=inputs.dtype)
    elif mask.dim() == 1:
        mask = mask[:, None].expand(T, B)
    mask = mask.to(inputs.dtype)
    total = 0.0
    hs = []
    for t in range(T):
        if detach_every is not None and t > 0 and t % detach_every == 0:
            h = h.detach()
        a = inputs[t] @ p["W_in"].T + h @ p["W_rec"].T + p["b_rec"]
        h = (1 - alpha) * h + alpha * phi(a)
        hs.append(h)
        if targets is None:
            continue
        z = h @ p["W_out"].T + p["b_out"]
        if loss == "mse":
            if model.readout == "identity":
                y = z
            elif model.readout == "softmax":
                y = torch.softmax(z, -1)
            else:
                y = torch.sigmoid(z)
            l = 0.5 * ((y - targets[t]) ** 2).sum(-1)
        elif loss == "cross_entropy":
            l = F.cross_entropy(z, targets[t], reduction="none")
        else:
            l = F.binary_cross_entropy_with_logits(z, targets[t], reduction="none").sum(-1)
        total = total + (mask[t] * l).sum() / B
    if reward is not None:
        total = total - reward(torch.stack(hs))
    return total


def reference_grads(model, inputs, targets=None, *, h0=None, **kw):
    """Autograd gradients of reference_loss: (loss, dict name -> grad[, "h0"])."""
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    leaves = dict(params)
    if h0 is not None:
        h0 = h0.detach().clone().requires_grad_(True)
        leaves["h0"] = h0
    L = reference_loss(model, inputs, targets, params=params, h0=h0, **kw)
    gs = torch.autograd.grad(L, list(leaves.values()), allow_unused=True)
    out = {n: (torch.zeros_like(v) if g is None else g) for (n, v), g in zip(leaves.items(), gs)}
    return L.detach(), out


def rel_err(a, b):
    """||a - b|| / max(||b||, 1e-300): the relative error the tests bound."""
    return float((a - b).norm() / max(float(b.norm()), 1e-300))


def max_rel_err(grads, ref):
    return max(rel_err(grads[k], ref[k]) for k in ref)
