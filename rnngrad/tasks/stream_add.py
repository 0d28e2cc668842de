"""The add task of Marschall, Cho & Savin (2020), a streaming task for online learning.

A random binary stream ``x_t ~ Bernoulli(1/2)`` and the label, which depends on the
inputs ``t1`` and ``t2`` steps back (Marschall et al. 2020, JMLR 21(135), eq. for
the "Add task", after Pitis 2016)::

    y_t = 0.5 + 0.5 x_{t - t1} - 0.25 x_{t - t2}            default t1 = 5, t2 = 9

As in the authors' code (``vanilla-rtrl``, ``Add_Task``) the input carries the
redundant complement, ``[x_t, 1 - x_t]`` (D = 2); the label is the probability
``y_t`` itself (``deterministic=True``) or a coin flip with that probability. The
network reads it with one sigmoid unit (K = 1) and the soft-target cross-entropy
``l = softplus(z) - y z`` (rnngrad's "bce"), which is their two-way softmax
cross-entropy on ``(y, 1 - y)``.

Reference levels of the mean loss (deterministic labels), in nats:
    ``loss_no_memory``        0.662  predicting the marginal mean of y (0.625)
    ``loss_first_dependency`` 0.519  remembering x_{t-t1} only
    ``loss_optimal``          0.454  remembering both (the labels' own entropy)

Two ways to use it:
    batches  ``batch(B)`` gives independent sequences of ``seq_len`` steps; the first
             t2 steps of each are masked out (their labels depend on inputs before it).
             With ``streaming=True`` consecutive ``batch(B)`` calls are instead
             consecutive chunks of one continuous stream per batch element (the task
             carries the last t2 inputs; ``state_dict``/``load_state_dict`` save it),
             only the very first t2 steps masked: use it with an online trainer that
             carries the hidden state across batches.
    stream   ``stream(B)`` yields ``(x_t (B, 2), y_t (B, 1))`` forever.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from .base import Batch, make_generator

__all__ = ["StreamAdd"]


def _entropy(p: float) -> float:
    """Binary entropy in nats."""
    return -sum(q * math.log(q) for q in (p, 1.0 - p) if q > 0)


class StreamAdd:
    """Marschall et al.'s add task: D = 2 ([x_t, 1 - x_t]), K = 1, "bce" on a sigmoid."""

    name = "stream_add"
    loss = "bce"
    readout = "sigmoid"
    classification = False
    input_size = 2
    output_size = 1

    def __init__(self, seq_len: int = 50, *, t1: int = 5, t2: int = 9,
                 deterministic: bool = True, streaming: bool = False,
                 test_size: int = 256, test_seed: int = 12345) -> None:
        for name, v in (("t1", t1), ("t2", t2)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an int >= 1 (steps back), got {v!r}")
        if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
            raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
        if not streaming and seq_len <= max(t1, t2):
            raise ValueError(f"seq_len {seq_len} leaves no labelled step: independent "
                             f"sequences need seq_len > max(t1, t2) = {max(t1, t2)}")
        self.seq_len = seq_len
        self.t1, self.t2 = t1, t2
        self.lag = max(t1, t2)
        self.deterministic = deterministic
        self.streaming = streaming
        self._history: Tensor | None = None  # (lag, B) last inputs of the stream (streaming)
        self._test = self._independent(test_size, make_generator(test_seed))

    # --- reference levels ------------------------------------------------------------
    @property
    def loss_no_memory(self) -> float:
        return _entropy(0.625)

    @property
    def loss_first_dependency(self) -> float:
        return 0.5 * (_entropy(0.375) + _entropy(0.875))

    @property
    def loss_optimal(self) -> float:
        return 0.25 * (_entropy(0.5) + _entropy(0.25) + _entropy(1.0) + _entropy(0.75))

    # --- data --------------------------------------------------------------------------
    def _labels(self, x: Tensor, g: torch.Generator) -> Tensor:
        """y_t for x (lag + T, B) -> (T, B): the last T steps, each with its full history."""
        n = x.shape[0] - self.lag
        y = 0.5 + 0.5 * x[self.lag - self.t1:][:n] - 0.25 * x[self.lag - self.t2:][:n]
        if not self.deterministic:
            y = torch.bernoulli(y, generator=g)
        return y

    def _pack(self, x: Tensor, y: Tensor, mask: Tensor) -> Batch:
        inputs = torch.stack([x, 1.0 - x], dim=-1)  # (T, B, 2)
        return Batch(inputs, y.unsqueeze(-1), mask)

    def _independent(self, B: int, g: torch.Generator) -> Batch:
        T, L = self.seq_len, self.lag
        # draw L unseen steps before the sequence so every label is defined, then mask
        # the steps whose label reaches back before the sequence's first input
        x = torch.bernoulli(torch.full((L + T, B), 0.5), generator=g)
        y = self._labels(x, g)
        mask = torch.ones(T, B)
        mask[:L] = 0.0
        return self._pack(x[L:], y, mask)

    def batch(self, batch_size: int, *, generator: torch.Generator | int | None = None) -> Batch:
        """``seq_len`` steps for ``batch_size`` streams: independent sequences, or the next
        chunk of the continuous stream when ``streaming=True``. inputs (T, B, 2),
        targets (T, B, 1) in [0, 1], mask (T, B)."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        g = make_generator(generator)
        if not self.streaming:
            return self._independent(batch_size, g)
        T, L = self.seq_len, self.lag
        x_new = torch.bernoulli(torch.full((T, batch_size), 0.5), generator=g)
        mask = torch.ones(T, batch_size)
        if self._history is None or self._history.shape[1] != batch_size:
            # a new stream: nothing before it, its first L labels reach back before it
            self._history = torch.zeros(L, batch_size)
            mask[:L] = 0.0
        x = torch.cat([self._history, x_new])
        y = self._labels(x, g)
        self._history = x[-L:].clone()
        return self._pack(x_new, y, mask)

    def test_batch(self) -> Batch:
        """A fixed set of independent sequences (seeded apart from training batches)."""
        return self._test

    def stream(self, batch_size: int, *, generator: torch.Generator | int | None = None
               ) -> Iterator[tuple[Tensor, Tensor]]:
        """``(x_t (B, 2), y_t (B, 1))`` forever, one step at a time. The first ``max(t1,
        t2)`` labels count the unseen steps before the stream as x = 0."""
        g = make_generator(generator)
        L = self.lag
        ring = torch.zeros(L, batch_size)  # ring[t % L] = x_t
        t = 0
        while True:
            x = torch.bernoulli(torch.full((batch_size,), 0.5), generator=g)
            # x_{t - t1} and x_{t - t2} are still in the ring (t1, t2 <= L): read before writing
            a = ring[(t - self.t1) % L]
            b = ring[(t - self.t2) % L]
            y = 0.5 + 0.5 * a - 0.25 * b
            if not self.deterministic:
                y = torch.bernoulli(y, generator=g)
            ring[t % L] = x
            t += 1
            yield torch.stack([x, 1.0 - x], dim=-1), y.unsqueeze(-1)

    def reset(self) -> None:
        """Start a new stream at the next ``batch`` call (streaming mode)."""
        self._history = None

    def state_dict(self) -> dict:
        """The stream's carried history, for checkpoints (streaming mode)."""
        return {"history": None if self._history is None else self._history.clone()}

    def load_state_dict(self, state: dict) -> None:
        """Continue the stream ``state_dict`` saved (streaming mode)."""
        h = state.get("history")
        self._history = None if h is None else h.clone()
