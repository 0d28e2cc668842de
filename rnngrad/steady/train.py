"""Training the steady-state classifier on the digits by recurrent backprop (Almeida 1987; Pineda 1987).

For :class:`~rnngrad.steady.SteadyClassifier` (``b = U image + c``,
``x = f(W x + b)``, ``z = V x + d``) and the mean cross-entropy ``l``, the
gradient by hand::

    dl/dz = (softmax(z) - onehot) / B,     dl/dx = V^T dl/dz,
    (I - D W^T) u = D dl/dx                (recurrent backprop, D = diag f'(W x + b))
    dl/dW = sum_b u_b x_b^T    dl/dU = sum_b u_b image_b^T    dl/dc = sum_b u_b
    dl/dV = sum_b dl/dz_b x_b^T                               dl/dd = sum_b dl/dz_b

(:func:`steady_gradient`), and Adam on it with W projected back onto
``||W||_2 <= max_spectral_norm`` after every step, which keeps ``x -> f(W x + b)``
a contraction (:func:`train_steady`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor

from ._checks import check_int, check_positive, check_seed, shape_str
from .adjoint import recurrent_backprop
from .fixed_point import FixedPointInfo, fixed_point
from .layer import SteadyClassifier

__all__ = ["steady_gradient", "train_steady"]


def _steady_gradient(
    model: SteadyClassifier, images: Tensor, labels: Tensor
) -> tuple[Tensor, dict[str, Tensor], FixedPointInfo, Tensor]:
    if not isinstance(model, SteadyClassifier):
        raise TypeError(f"model must be a SteadyClassifier, got {type(model).__name__}")
    if not isinstance(labels, Tensor) or labels.dtype != torch.long:
        got = labels.dtype if isinstance(labels, Tensor) else type(labels).__name__
        raise TypeError(f"labels must be an int64 tensor of class indices, got {got}")
    K = model.V.shape[0]
    with torch.no_grad():
        image = model._flat(images)  # (B, P)
        Bn = image.shape[0]
        if labels.shape != (Bn,):
            raise ValueError(f"labels has shape {shape_str(labels)} but ({Bn},) is expected")
        if bool(((labels < 0) | (labels >= K)).any()):
            raise ValueError(f"labels must lie in 0..{K - 1}")
        opt = model.options
        b = torch.addmm(model.c, image, model.U.T)  # b = U image + c
        x, info = fixed_point(
            model.W,
            b,
            activation=model.activation,
            method=opt["method"],
            damping=opt["damping"],
            tol=opt["tol"],
            max_iter=opt["max_iter"],
        )
        z = torch.addmm(model.d, x, model.V.T)  # z = V x + d
        logp = torch.log_softmax(z, dim=-1)
        loss = -logp.gather(1, labels[:, None]).mean()
        dz = logp.exp()
        dz[torch.arange(Bn), labels] -= 1.0
        dz /= Bn  # dloss/dz = (p - onehot) / B
        dR_dx = dz @ model.V  # V^T dloss/dz, row by row
        dW, u, _ = recurrent_backprop(
            model.W, b, x, dR_dx, activation=model.activation, method=opt["backward_method"]
        )
        grads = {
            "U": u.T @ image,  # db/dU: sum_b u_b image_b^T
            "c": u.sum(0),
            "W": dW,
            "V": dz.T @ x,
            "d": dz.sum(0),
        }
    return loss, {name: grads[name] for name, _ in model.named_parameters()}, info, z


def steady_gradient(
    model: SteadyClassifier, images: Tensor, labels: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean cross-entropy of a :class:`SteadyClassifier` and its gradient, by hand.

    ``b = U image + c``, ``x = fixed_point(W, b)``, ``z = V x + d``; then
    ``dl/dz = (softmax(z) - onehot) / B``, ``dl/dx = V^T dl/dz``, u from
    :func:`recurrent_backprop`, and the chain rule through ``b``::

        dl/dW = sum_b u_b x_b^T    dl/dU = sum_b u_b image_b^T    dl/dc = sum_b u_b
        dl/dV = sum_b dl/dz_b x_b^T                                dl/dd = sum_b dl/dz_b

    No graph is built through the iterations.

    Args:
        images: (B, 8, 8) or (B, 64), the model's dtype.
        labels: (B,) int64 class indices.

    Returns:
        ``(loss, grads)``: loss a scalar tensor; grads a dict name -> tensor,
        keyed and ordered like ``model.named_parameters()``.

    Raises:
        ConvergenceError: the fixed point or the adjoint did not converge.
    """
    loss, grads, _, _ = _steady_gradient(model, images, labels)
    return loss, grads


def train_steady(
    model: SteadyClassifier,
    *,
    steps: int = 300,
    lr: float = 1e-2,
    batch_size: int = 64,
    seed: int = 0,
    max_spectral_norm: float | None = 0.9,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    eval_every: int | None = None,
) -> dict[str, float]:
    """Train a :class:`SteadyClassifier` on the digits with Adam and recurrent backprop.

    Minibatches of ``batch_size`` are drawn from shuffled epochs of the fixed
    training split (:func:`rnngrad.tasks.digits.load_digits`), seeded by ``seed``;
    gradients come from :func:`steady_gradient`. A fixed point or adjoint that
    fails to converge raises :class:`ConvergenceError`: training never continues
    on a wrong gradient.

    Stability: after every Adam step W is scaled back onto the ball
    ``||W||_2 <= max_spectral_norm`` (a projection; None leaves W free). With
    ``|f'| <= 1`` (tanh, sigmoid) and ``max_spectral_norm < 1`` the map
    ``x -> f(W x + b)`` is then a contraction: the steady state exists, is
    unique, and both the forward iteration and the adjoint's Neumann series
    converge, at least as fast as ``max_spectral_norm^k``.

    Args:
        steps: Adam steps, an int >= 0.
        lr: Adam's learning rate, a finite number > 0.
        batch_size: an int >= 1.
        seed: an int; fixes the order of the minibatches.
        max_spectral_norm: a finite number > 0, or None.
        callback: called after every step as ``callback(step, {"loss", "residual",
            "iterations"})`` (step counts from 1; "loss" is the minibatch's).
        eval_every: an int >= 1, or None. At every ``eval_every``-th step and at
            the last, the callback's dict also holds ``test_loss`` and
            ``test_accuracy`` on the full test split, after that step's update.

    Returns:
        dict with ``test_accuracy``, ``test_loss``, ``train_accuracy``,
        ``train_loss`` (full splits, after training), ``steps``, ``seconds``
        (wall time of the training loop, without the evaluations asked for by
        ``eval_every``) and ``max_iterations`` (the most forward iterations any
        step needed).

    Raises:
        TypeError, ValueError: an argument of the wrong type or range.
        ConvergenceError: a fixed point or adjoint did not converge.
    """
    from ..tasks.digits import load_digits

    if not isinstance(model, SteadyClassifier):
        raise TypeError(f"model must be a SteadyClassifier, got {type(model).__name__}")
    steps = check_int("steps", steps, minimum=0)
    lr = check_positive("lr", lr)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    seed = check_seed("seed", seed, optional=False)
    if max_spectral_norm is not None:
        max_spectral_norm = check_positive("max_spectral_norm", max_spectral_norm)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
    if eval_every is not None:
        eval_every = check_int("eval_every", eval_every, minimum=1)
    dtype = model.W.dtype
    X_train, y_train, X_test, y_test = load_digits(dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    params = dict(model.named_parameters())
    n = X_train.shape[0]
    order = torch.randperm(n, generator=gen)
    pos = 0
    max_iterations = 0
    eval_seconds = 0.0
    start = time.perf_counter()
    for step in range(1, steps + 1):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        loss, grads, info, _ = _steady_gradient(model, X_train[idx], y_train[idx])
        for name, g in grads.items():
            params[name].grad = g
        optimizer.step()
        if max_spectral_norm is not None:
            with torch.no_grad():
                sigma = torch.linalg.matrix_norm(model.W, ord=2)
                if sigma > max_spectral_norm:
                    model.W.mul_(max_spectral_norm / sigma)
        max_iterations = max(max_iterations, info.iterations)
        if callback is not None:
            row = {"loss": float(loss), "residual": info.residual, "iterations": info.iterations}
            if eval_every is not None and (step % eval_every == 0 or step == steps):
                t_eval = time.perf_counter()
                row["test_loss"], row["test_accuracy"] = _evaluate(model, X_test, y_test)
                eval_seconds += time.perf_counter() - t_eval
            callback(step, row)
    seconds = time.perf_counter() - start - eval_seconds
    model.zero_grad(set_to_none=True)
    train_loss, train_acc = _evaluate(model, X_train, y_train)
    test_loss, test_acc = _evaluate(model, X_test, y_test)
    return {
        "test_accuracy": test_acc,
        "test_loss": test_loss,
        "train_accuracy": train_acc,
        "train_loss": train_loss,
        "steps": steps,
        "seconds": seconds,
        "max_iterations": max_iterations,
    }


def _evaluate(model: SteadyClassifier, images: Tensor, labels: Tensor) -> tuple[float, float]:
    with torch.no_grad():
        b = model.steady_input(images)
        opt = model.options
        x, _ = fixed_point(
            model.W,
            b,
            activation=model.activation,
            method=opt["method"],
            damping=opt["damping"],
            tol=opt["tol"],
            max_iter=opt["max_iter"],
        )
        z = torch.addmm(model.d, x, model.V.T)
        loss = torch.nn.functional.cross_entropy(z, labels)
        accuracy = (z.argmax(-1) == labels).to(torch.float64).mean()
    return float(loss), float(accuracy)
