"""Evidence accumulation (Bellec et al. 2020, Fig. 3; the cue-accumulation task of their
``tutorial_evidence_accumulation_with_alif.py``, after Morcos & Harvey 2016).

A rodent runs along a corridor and sees ``n_cues`` cues, each on its left or its right;
after a delay it must turn to the side where it saw more cues. As spike trains, with
``D = 4 n_channels`` Poisson input neurons in four groups (time in ms, step dt)::

    cue k (k = 0 .. n_cues-1)   group 0 (left) or 1 (right) fires at ``rate`` during
                                [t_interval - t_cue + k t_interval, (k + 1) t_interval)
    recall cue                  group 2 fires at ``rate`` during the last ``t_recall``
    background noise            group 3 fires at ``rate / 4`` all the time

Each example draws its majority side, then every cue independently: on the minority
side with probability ``p_minority`` (0.3). The label is 1 (right) when more than half
of the cues were right, 0 otherwise (n_cues odd: never a tie). It is asked for during
the recall window only, with mask ``1 / t_recall_steps`` there, so the pinned loss is
Bellec's: the cross-entropy averaged over the recall window and the batch. Their
decision is the argmax of the logits averaged over the window (``decide``).

Bellec's settings (the defaults): 7 cues, t_cue = 100 ms, t_interval = 150 ms, and
1200 ms after the last cue interval (recall: the last 150 ms), so
T = 7 x 150 + 1200 = 2250 ms; 40 input neurons at 40 Hz (noise 10 Hz), dt = 1 ms.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import Batch, make_generator

__all__ = ["EvidenceAccumulation"]


def _duration(name: str, value, dt: float, *, minimum: int = 1) -> int:
    if (not isinstance(value, (int, float)) or isinstance(value, bool)
            or not math.isfinite(value)):
        raise ValueError(f"evidence: {name} must be a number of ms, got {value!r}")
    steps = int(round(value / dt))
    if steps < minimum or abs(steps * dt - value) > 1e-9 * max(1.0, abs(value)):
        raise ValueError(f"evidence: {name} = {value!r} ms must be a whole number of steps of "
                         f"dt = {dt:g} ms, at least {minimum}")
    return steps


class EvidenceAccumulation:
    """Bellec et al.'s cue accumulation: D = 4 n_channels spike inputs, K = 2 (left, right),
    cross-entropy over the recall window.

    Args:
        n_cues: the number of cues (odd, >= 1).
        t_cue, t_interval: a cue's duration and the period of cues (ms), t_cue <= t_interval.
        t_wait: from the end of the last cue interval to the end of the trial (ms), the
            recall window included.
        t_recall: the recall window at the end (ms), t_recall <= t_wait.
        dt: the time step (ms).
        n_channels: input neurons per group (four groups).
        rate: the cue and recall neurons' firing rate (Hz); the noise group fires at rate/4.
        p_minority: the probability of each cue being on the minority side (< 0.5).
        test_size, test_seed: the fixed test set (drawn on first use).
    """

    name = "evidence"
    loss = "cross_entropy"
    readout = "softmax"
    classification = True
    output_size = 2

    def __init__(self, n_cues: int = 7, *, t_cue: float = 100.0, t_interval: float = 150.0,
                 t_wait: float = 1200.0, t_recall: float = 150.0, dt: float = 1.0,
                 n_channels: int = 10, rate: float = 40.0, p_minority: float = 0.3,
                 test_size: int = 256, test_seed: int = 12345) -> None:
        if not isinstance(n_cues, int) or isinstance(n_cues, bool) or n_cues < 1 or n_cues % 2 == 0:
            raise ValueError(f"evidence: n_cues must be an odd int >= 1 (so that a side wins), "
                             f"got {n_cues!r}")
        if not isinstance(dt, (int, float)) or isinstance(dt, bool) or not dt > 0:
            raise ValueError(f"evidence: dt must be a positive number of ms, got {dt!r}")
        self.dt = float(dt)
        self.n_cues = n_cues
        self.cue_steps = _duration("t_cue", t_cue, self.dt)
        self.interval_steps = _duration("t_interval", t_interval, self.dt)
        self.wait_steps = _duration("t_wait", t_wait, self.dt)
        self.recall_steps = _duration("t_recall", t_recall, self.dt)
        if self.cue_steps > self.interval_steps:
            raise ValueError(f"evidence: t_cue = {t_cue!r} ms is longer than t_interval = "
                             f"{t_interval!r} ms")
        if self.recall_steps > self.wait_steps:
            raise ValueError(f"evidence: t_recall = {t_recall!r} ms is longer than t_wait = "
                             f"{t_wait!r} ms")
        if not isinstance(n_channels, int) or isinstance(n_channels, bool) or n_channels < 1:
            raise ValueError(f"evidence: n_channels must be a positive int, got {n_channels!r}")
        p = rate * self.dt / 1000.0 if isinstance(rate, (int, float)) else -1.0
        if isinstance(rate, bool) or not (0.0 < p <= 1.0):
            raise ValueError(f"evidence: rate must be in (0, 1000 / dt] Hz (a spike probability "
                             f"per step), got {rate!r}")
        if (not isinstance(p_minority, (int, float)) or isinstance(p_minority, bool)
                or not 0.0 <= p_minority < 0.5):
            raise ValueError(f"evidence: p_minority must be in [0, 0.5), got {p_minority!r}")
        self.n_channels, self.rate, self.p_minority = n_channels, float(rate), float(p_minority)
        self.input_size = 4 * n_channels
        self.seq_len = n_cues * self.interval_steps + self.wait_steps
        self.test_size, self.test_seed = test_size, test_seed
        self._test: Batch | None = None

    def cue_window(self, k: int) -> tuple[int, int]:
        """Steps [start, end) of cue k."""
        end = (k + 1) * self.interval_steps
        return end - self.cue_steps, end

    def batch(self, batch_size: int, *, generator: torch.Generator | int | None = None) -> Batch:
        """``batch_size`` new sequences from ``generator`` (a seed or a torch.Generator):
        inputs (T, B, D), targets (T, B) class indices (the majority side), counted in the recall window, mask (T, B)."""
        g = make_generator(generator)
        B, T, n = batch_size, self.seq_len, self.n_channels
        # the majority side of each example, then each cue: minority with p_minority
        majority = torch.randint(0, 2, (B,), generator=g)
        flip = (torch.rand(self.n_cues, B, generator=g) < self.p_minority).long()
        sides = majority ^ flip  # (n_cues, B): 0 left, 1 right
        p = self.rate * self.dt / 1000.0
        prob = torch.zeros(T, B, 4)
        for k in range(self.n_cues):
            s, e = self.cue_window(k)
            prob[s:e, :, 0] = p * (sides[k] == 0)
            prob[s:e, :, 1] = p * (sides[k] == 1)
        prob[T - self.recall_steps:, :, 2] = p
        prob[:, :, 3] = p / 4
        prob = prob.repeat_interleave(n, dim=2)  # (T, B, 4 n): each group's n neurons
        inputs = (torch.rand(T, B, 4 * n, generator=g) < prob).float()
        label = (sides.sum(0) > self.n_cues // 2).long()
        targets = label.expand(T, B).clone()
        mask = torch.zeros(T, B)
        mask[T - self.recall_steps:] = 1.0 / self.recall_steps
        return Batch(inputs, targets, mask)

    def test_batch(self) -> Batch:
        """A fixed test set (seeded apart from training batches), drawn on first use."""
        if self._test is None:
            self._test = self.batch(self.test_size, generator=self.test_seed)
        return self._test

    def decide(self, z: Tensor) -> Tensor:
        """Bellec et al.'s decision: the argmax of the logits z (T, B, 2) averaged over the
        recall window; (B,) class indices."""
        return z[-self.recall_steps:].mean(0).argmax(-1)

    def accuracy(self, z: Tensor, batch: Batch) -> float:
        """The fraction of trials decided right (``decide`` against the label)."""
        return float((self.decide(z) == batch.targets[-1]).double().mean())
