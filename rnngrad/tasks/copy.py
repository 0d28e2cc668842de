"""The copy task: memorise a sequence of symbols and reproduce it after a delay.

Input alphabet: ``n_symbols`` data symbols, a blank and a go cue, one-hot
(D = n_symbols + 2). The sequence is ``length`` random symbols, then ``delay``
blanks, then the go cue, then ``length - 1`` blanks while the network answers. The
targets are the symbols, as class indices, on the ``length`` answer steps starting
at the go cue; only those steps count (mask). Chance is ``log(n_symbols)`` in
cross-entropy and ``1/n_symbols`` in accuracy. Many-to-many classification.
"""

from __future__ import annotations

import torch

from .base import Batch, make_generator

__all__ = ["Copy", "CopyPad"]


class Copy:
    """Copy task: T = 2 * length + delay, K = n_symbols, cross-entropy on the answer steps."""

    name = "copy"
    loss = "cross_entropy"
    readout = "softmax"
    classification = True

    def __init__(self, length: int = 5, delay: int = 5, n_symbols: int = 4, *,
                 test_size: int = 1000, test_seed: int = 12345) -> None:
        for name, v, lo in (("length", length, 1), ("delay", delay, 0), ("n_symbols", n_symbols, 2)):
            if not isinstance(v, int) or v < lo:
                raise ValueError(f"copy task needs {name} >= {lo}, got {v!r}")
        self.length, self.delay, self.n_symbols = length, delay, n_symbols
        self.input_size = n_symbols + 2
        self.output_size = n_symbols
        self.seq_len = 2 * length + delay
        self._test = self.batch(test_size, generator=test_seed)

    def batch(self, batch_size: int, *, generator: torch.Generator | int | None = None) -> Batch:
        """``batch_size`` new sequences from ``generator`` (a seed or a torch.Generator):
        inputs (T, B, D), targets (T, B) class indices (the symbols, on the answer steps), mask (T, B)."""
        g = make_generator(generator)
        L, Dl, S, B, T = self.length, self.delay, self.n_symbols, batch_size, self.seq_len
        symbols = torch.randint(0, S, (L, B), generator=g)
        blank, go = S, S + 1
        codes = torch.full((T, B), blank, dtype=torch.int64)
        codes[:L] = symbols
        codes[L + Dl] = go
        inputs = torch.nn.functional.one_hot(codes, S + 2).float()
        targets = torch.zeros(T, B, dtype=torch.int64)
        targets[L + Dl:] = symbols
        mask = torch.zeros(T, B)
        mask[L + Dl:] = 1.0
        return Batch(inputs, targets, mask)

    def test_batch(self) -> Batch:
        """A fixed test set (seeded apart from training batches)."""
        return self._test


class CopyPad:
    """Zucchet et al. (2023)'s padded copy task ("copy-pad-classification" in their code),
    binary patterns: memorise ``length`` random words of ``n_bits`` bits, wait ``pad``
    steps, see a stop token, then reproduce the words.

    Inputs (D = n_bits + 1): the words on steps 0..length-1 (bits on the first n_bits
    channels, Bernoulli(1/2)), zeros during the pad, the stop token (last channel) at step
    ``length + pad``, zeros after. T = 2 length + pad + 1. Targets (K = n_bits): the words
    on the last ``length`` steps, each bit a binary target ("bce", sigmoid readout). The
    mask weights those steps by ``1 / (length n_bits)``, so rnngrad's loss
    ``(1/B) sum mask * sum_k bce`` is the mean binary cross-entropy per bit, Zucchet et
    al.'s loss (their 2-class softmax per bit is a sigmoid of the logit difference),
    ``log 2`` at chance. Their settings: n_bits = 7, pad = 7, length 20 (``pad_length``
    defaults to 7 in their CopyTask; the ``padding_length=5`` their loader passes is not
    read).
    """

    name = "zucchet_copy"
    loss = "bce"
    readout = "sigmoid"
    classification = False

    def __init__(self, length: int = 10, pad: int = 7, n_bits: int = 7, *,
                 test_size: int = 1000, test_seed: int = 12345) -> None:
        for name, v, lo in (("length", length, 1), ("pad", pad, 0), ("n_bits", n_bits, 1)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"zucchet_copy task needs {name} >= {lo}, got {v!r}")
        self.length, self.pad, self.n_bits = length, pad, n_bits
        self.input_size = n_bits + 1
        self.output_size = n_bits
        self.seq_len = 2 * length + pad + 1
        self._test = self.batch(test_size, generator=test_seed)

    def batch(self, batch_size: int, *, generator: torch.Generator | int | None = None) -> Batch:
        g = make_generator(generator)
        L, P, K, B, T = self.length, self.pad, self.n_bits, batch_size, self.seq_len
        words = torch.randint(0, 2, (L, B, K), generator=g).float()
        inputs = torch.zeros(T, B, K + 1)
        inputs[:L, :, :K] = words
        inputs[L + P, :, K] = 1.0
        targets = torch.zeros(T, B, K)
        targets[T - L:] = words
        mask = torch.zeros(T, B)
        mask[T - L:] = 1.0 / (L * K)
        return Batch(inputs, targets, mask)

    def test_batch(self) -> Batch:
        return self._test
