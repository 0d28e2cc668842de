"""Time-varying weights: the sensitivity lemma per step (trajectory learning).

If the weights and biases of ``x(t) = f(W(t) x(t-1) + b(t))`` may change from step
to step, the gradient with respect to each step's copy is the sensitivity
``u(t) = dR/db(t)`` times that step's presynaptic activity::

    dR/dW(t) = u(t) x(t-1)^T,          dR/db(t) = u(t),

and with weights constant in time the gradient is the sum over t (BPTT's
``dR/dW = sum_t u(t) x(t-1)^T``). (Some texts write ``x_j(t)``; the
presynaptic activity that multiplies ``W(t)`` is ``x(t-1)``.) In rnngrad's RNN
notation ``W = W_rec``, ``b(t) = W_in x_t + b_rec``, ``x(t) = h_t``, so also
``dR/dW_in(t) = u(t) x_t^T``; ``u`` is what ``rnngrad.bptt(sensitivities=True)``
returns as ``grads["u"]``. The lemma needs only that ``W(t)`` and ``b(t)`` enter
through the same pre-activation, so it holds for the leaky cell too.

Batches: a batch shares ``W(t)``, so ``dR/dW(t) = sum_b u_b(t) x_b(t-1)^T``, one
batched GEMM over all t.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_tensor, shape_str

__all__ = ["per_step_gradients"]


def _same_kind(name: str, t: Tensor, ref: Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but u has dtype {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on device {t.device} but u is on {ref.device}")


def per_step_gradients(
    u: Tensor,
    x: Tensor,
    *,
    x0: Tensor | None = None,
    inputs: Tensor | None = None,
) -> dict[str, Tensor]:
    """Gradients with respect to per-step copies of the weights: ``dR/dW(t) = u(t) x(t-1)^T``.

    Args:
        u: (T, B, N) or (T, N), the sensitivities ``u[t-1] = dR/db(t)`` (for an
            ``rnngrad.RNN``: ``grads["u"]`` of ``bptt(sensitivities=True)``).
        x: u's shape, the trajectory ``x[t-1] = x(t)`` (the RNN's hidden states h,
            as its forward returns them).
        x0: ``x(0)``, (N,) or (B, N); zeros when None (the RNN's default h0).
        inputs: (T, B, D) or (T, D), the external inputs ``x_t``; when given,
            ``W_in`` is returned too.

    Returns:
        dict with ``"W_in"`` (T, N, D) (only with ``inputs``), ``"W_rec"`` (T, N, N)
        and ``"b_rec"`` (T, N): per step, summed over the batch. Their sums over t
        are the gradients of the weights shared in time.
    """
    u = check_tensor("u", u)
    if u.dim() not in (2, 3) or u.shape[0] < 1:
        raise ValueError(f"u has shape {shape_str(u)} but (T, B, N) or (T, N) is expected")
    x = check_tensor("x", x)
    if x.shape != u.shape:
        raise ValueError(f"x has shape {shape_str(x)} but u's {shape_str(u)} is expected")
    _same_kind("x", x, u)
    batched = u.dim() == 3
    N = u.shape[-1]
    if x0 is None:
        start = x.new_zeros(x.shape[1:])
    else:
        start = check_tensor("x0", x0)
        if start.shape not in (x.shape[1:], (N,)):
            raise ValueError(
                f"x0 has shape {shape_str(start)} but {shape_str(x[0])} or ({N},) is expected"
            )
        _same_kind("x0", start, u)
        start = start.expand(x.shape[1:])
    x_prev = torch.cat([start[None], x[:-1]])  # x(t-1) for t = 1..T

    def outer(pre: Tensor) -> Tensor:  # sum_b u_b(t) pre_b(t)^T for every t: (T, N, P)
        if batched:
            return u.transpose(1, 2) @ pre
        return u[:, :, None] * pre[:, None, :]

    grads: dict[str, Tensor] = {}
    if inputs is not None:
        inputs = check_tensor("inputs", inputs)
        if inputs.dim() != u.dim() or inputs.shape[:-1] != u.shape[:-1]:
            want = f"({u.shape[0]}, {u.shape[1]}, D)" if batched else f"({u.shape[0]}, D)"
            raise ValueError(f"inputs has shape {shape_str(inputs)} but {want} is expected")
        _same_kind("inputs", inputs, u)
        grads["W_in"] = outer(inputs)
    grads["W_rec"] = outer(x_prev)
    grads["b_rec"] = u.sum(1) if batched else u.clone()
    return grads
