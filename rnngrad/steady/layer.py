"""The steady state as a differentiable layer (Almeida 1987; Pineda 1987: a deep equilibrium layer).

Forward: the steady state ``x = f(W x + b)`` by :func:`~rnngrad.steady.fixed_point`,
without a graph. Backward: recurrent backprop with the incoming gradient as
``dR/dx``::

    (I - D W^T) u = D dR/dx,   D = diag f'(W x + b);      dR/dW = u x^T,   dR/db = u.

Only ``(W, b, x)`` are kept between the two, whatever the number of forward
iterations (Bai, Kolter & Koltun 2019, "Deep equilibrium models", use the same
implicit backward). :class:`SteadyState` is the ``nn.Module`` shell holding ``W``;
:class:`SteadyClassifier` feeds an image in as the input bias::

    b = U image + c,      x = f(W x + b),      z = V x + d,      p = softmax(z).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..cells import Activation, get_activation
from ._checks import check_dtype, check_int, check_nonnegative, check_seed, shape_str
from .adjoint import check_adjoint_options, recurrent_backprop
from .fixed_point import check_fixed_point_options, fixed_point

__all__ = ["steady_state", "SteadyState", "SteadyClassifier"]


def _check_layer_options(options: dict[str, Any]) -> None:
    """Every solver option up front, so a bad one fails when the layer is built."""
    check_fixed_point_options(
        method=options["method"],
        damping=options["damping"],
        tol=options["tol"],
        max_iter=options["max_iter"],
    )
    check_adjoint_options(
        method=options["backward_method"],
        tol=options.get("backward_tol"),
        max_iter=options.get("backward_max_iter", 1000),
        prefix="backward_",
    )


class _SteadyStateFunction(torch.autograd.Function):
    """x = fixed_point(W, b) forward (no graph); recurrent backprop backward.

    Saves exactly (W, b, x): memory is independent of the forward iterations.
    """

    @staticmethod
    def forward(ctx: Any, W: Tensor, b: Tensor, options: dict[str, Any]) -> Tensor:
        x, _ = fixed_point(
            W,
            b,
            activation=options["activation"],
            method=options["method"],
            damping=options["damping"],
            tol=options["tol"],
            max_iter=options["max_iter"],
        )
        ctx.save_for_backward(W, b, x)
        ctx.options = options
        return x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_x: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        W, b, x = ctx.saved_tensors
        options = ctx.options
        dW, db, _ = recurrent_backprop(
            W,
            b,
            x,
            grad_x.contiguous(),
            activation=options["activation"],
            method=options["backward_method"],
            tol=options["backward_tol"],
            max_iter=options["backward_max_iter"],
        )
        return (
            dW if ctx.needs_input_grad[0] else None,
            db if ctx.needs_input_grad[1] else None,
            None,
        )


def steady_state(
    W: Tensor,
    b: Tensor,
    *,
    activation: str | Activation = "tanh",
    method: str = "anderson",
    damping: float = 1.0,
    tol: float | None = None,
    max_iter: int = 1000,
    backward_method: str = "direct",
    backward_tol: float | None = None,
    backward_max_iter: int = 1000,
) -> Tensor:
    """The steady state ``x = f(W x + b)`` as a differentiable function of (W, b).

    Forward: :func:`fixed_point` without building a graph. Backward:
    :func:`recurrent_backprop` with ``dR/dx`` the incoming gradient. Only
    ``(W, b, x)`` are kept for the backward pass, whatever the number of forward
    iterations. Not twice differentiable.

    Args:
        W: (N, N); b: (N,) or (B, N). Returns x of b's shape.
        method, damping, tol, max_iter: :func:`fixed_point`'s.
        backward_method, backward_tol, backward_max_iter: :func:`recurrent_backprop`'s
            ``method``, ``tol`` and ``max_iter``.

    Raises:
        TypeError, ValueError: an option of the wrong type or range, at once
            (before any iteration).
        ConvergenceError: the forward or the backward solve did not converge.
    """
    options = {
        "activation": get_activation(activation),
        "method": method,
        "damping": damping,
        "tol": tol,
        "max_iter": max_iter,
        "backward_method": backward_method,
        "backward_tol": backward_tol,
        "backward_max_iter": backward_max_iter,
    }
    _check_layer_options(options)
    return _SteadyStateFunction.apply(W, b, options)


class SteadyState(nn.Module):
    """An implicit layer ``b -> x``, ``x = f(W x + b)``, W a (N, N) parameter.

    A thin shell over :func:`steady_state`; ``W`` is drawn from
    ``N(0, (init_scale / sqrt(N))^2)``, whose spectral norm is about
    ``2 init_scale``: below 1 (a contraction for tanh, sigmoid) when
    ``init_scale < 0.5``.
    """

    def __init__(
        self,
        n: int,
        *,
        activation: str | Activation = "tanh",
        method: str = "anderson",
        damping: float = 1.0,
        tol: float | None = None,
        max_iter: int = 1000,
        backward_method: str = "direct",
        backward_tol: float | None = None,
        backward_max_iter: int = 1000,
        init_scale: float = 0.4,
        seed: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        n = check_int("n (the number of units)", n, minimum=1)
        init_scale = check_nonnegative("init_scale", init_scale)
        seed = check_seed("seed", seed, optional=True)
        dtype = check_dtype(dtype)
        self.activation = get_activation(activation)
        self.options = {
            "method": method,
            "damping": damping,
            "tol": tol,
            "max_iter": max_iter,
            "backward_method": backward_method,
            "backward_tol": backward_tol,
            "backward_max_iter": backward_max_iter,
        }
        _check_layer_options(self.options)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        W = torch.randn(n, n, generator=gen, dtype=torch.float64) * (init_scale / math.sqrt(n))
        self.W = nn.Parameter(W.to(dtype))

    def forward(self, b: Tensor) -> Tensor:
        """b (N,) or (B, N) -> x of b's shape."""
        return steady_state(self.W, b, activation=self.activation, **self.options)

    def extra_repr(self) -> str:
        return f"n={self.W.shape[0]}, activation={self.activation.name!r}, {self.options}"


# -------------------------------------------------------------------- digits classifier


class SteadyClassifier(nn.Module):
    """A steady-state classifier: the image enters as the input bias of the network::

        b = U image + c,      x = f(W x + b),      z = V x + d,      p = softmax(z)

    Parameters: ``U (N, P)``, ``c (N,)``, ``W (N, N)``, ``V (K, N)``, ``d (K,)``
    with P pixels (64) and K classes (10). ``forward`` returns the logits and is
    differentiable through the implicit layer; :func:`steady_gradient` computes
    the same gradient by hand.
    """

    def __init__(
        self,
        hidden: int = 128,
        *,
        n_inputs: int = 64,
        n_classes: int = 10,
        activation: str | Activation = "tanh",
        method: str = "anderson",
        damping: float = 1.0,
        tol: float | None = None,
        max_iter: int = 500,
        backward_method: str = "direct",
        init_scale: float = 0.4,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        hidden = check_int("hidden (the number of units N)", hidden, minimum=1)
        n_inputs = check_int("n_inputs (pixels per image)", n_inputs, minimum=1)
        n_classes = check_int("n_classes", n_classes, minimum=1)
        init_scale = check_nonnegative("init_scale", init_scale)
        seed = check_seed("seed", seed, optional=False)
        dtype = check_dtype(dtype)
        self.activation = get_activation(activation)
        self.options = {
            "method": method,
            "damping": damping,
            "tol": tol,
            "max_iter": max_iter,
            "backward_method": backward_method,
        }
        _check_layer_options(self.options)
        gen = torch.Generator().manual_seed(seed)

        def draw(*shape: int, std: float) -> nn.Parameter:
            return nn.Parameter(
                (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dtype)
            )

        self.U = draw(hidden, n_inputs, std=1.0 / math.sqrt(n_inputs))
        self.c = nn.Parameter(torch.zeros(hidden, dtype=dtype))
        self.W = draw(hidden, hidden, std=init_scale / math.sqrt(hidden))
        self.V = draw(n_classes, hidden, std=1.0 / math.sqrt(hidden))
        self.d = nn.Parameter(torch.zeros(n_classes, dtype=dtype))

    def _flat(self, images: Tensor) -> Tensor:
        P = self.U.shape[1]
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() < 2 or images[0].numel() != P:
            raise ValueError(
                f"images has shape {shape_str(images)} but (B, {P}) or (B, ...) with {P} "
                f"pixels per image is expected"
            )
        if images.dtype != self.U.dtype:
            raise TypeError(f"images has dtype {images.dtype} but the model is {self.U.dtype}")
        return images.reshape(images.shape[0], P)

    def steady_input(self, images: Tensor) -> Tensor:
        """``b = U image + c``: images (B, 8, 8) or (B, 64) -> (B, N)."""
        return torch.addmm(self.c, self._flat(images), self.U.T)

    def forward(self, images: Tensor) -> Tensor:
        """images (B, 8, 8) or (B, 64) -> logits z (B, K)."""
        x = steady_state(
            self.W,
            self.steady_input(images),
            activation=self.activation,
            method=self.options["method"],
            damping=self.options["damping"],
            tol=self.options["tol"],
            max_iter=self.options["max_iter"],
            backward_method=self.options["backward_method"],
        )
        return torch.addmm(self.d, x, self.V.T)
