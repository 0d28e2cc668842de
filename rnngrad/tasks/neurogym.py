"""neurogym's cognitive tasks (Molano-Mazon et al. 2022) as rnngrad tasks.

``get_task("neurogym:PerceptualDecisionMaking-v0", dt=100)`` builds any task registered in
neurogym (the optional extra ``rnngrad[neuro]``, neurogym 2.3.1); keyword arguments other
than ``test_size``, ``test_seed`` and ``mask`` go to the environment's constructor (its
``env_kwargs``: ``dt``, ``timing``, ``sigma``, ...).

A batch is ``B`` trials, each drawn by the environment's own ``new_trial()``: its
observations ``env.ob (T_b, D)`` are the inputs and its ground truth ``env.gt (T_b,)`` the
class targets, time-major and padded with zeros to the longest trial of the batch (the
padding has mask 0). The environment's random state is a fresh copy of the task's
environment seeded from the batch's ``generator``, so a batch depends on the generator
alone.

Fixation: neurogym marks the steps before the response with ground truth 0, the
"fixate" action, and its supervised convention counts them: ``neurogym.Dataset``
concatenates ``gt`` unmasked and its PyTorch example trains ``nn.CrossEntropyLoss`` over
every step, so the network must hold fixation and then answer. ``mask="trial"`` (the
default) follows it: mask 1 on every step of every trial. ``mask="decision"`` counts only
the steps of the environment's period named ``decision`` (where it has one).

Performance: neurogym's own measure (its supervised examples) is whether the argmax of
the network's output at a trial's last step equals the ground truth there
(``performance``). Per-step accuracy under ``mask="trial"`` is dominated by fixation
steps (21 of 22 in PerceptualDecisionMaking), so it is no measure of the decision.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import importlib
import inspect
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .base import Batch, make_generator

__all__ = ["Neurogym", "NeurogymMissing", "neurogym_ids"]

MASKS = ("trial", "decision")


class NeurogymMissing(ImportError, ValueError):
    """neurogym is not installed (a ValueError too: the CLI answers it as bad input)."""

    def __init__(self) -> None:
        super().__init__("the neurogym:ID tasks need neurogym, which is not installed: "
                         "pip install 'rnngrad[neuro]' (neurogym==2.3.1)")


def _registry() -> dict[str, str]:
    """neurogym's task ids -> entry points ``module:attribute`` (collections included)."""
    try:
        from neurogym.envs import registration
    except ImportError:
        raise NeurogymMissing() from None
    return dict(registration.ALL_EXTENDED_ENVS)


def neurogym_ids() -> list[str]:
    """Every task id neurogym registers (some have no supervised ground truth)."""
    return sorted(_registry())


def _make_env(env_id: str, env_kwargs: dict[str, Any]):
    registry = _registry()
    if env_id not in registry:
        close = difflib.get_close_matches(env_id, registry, n=5, cutoff=0.5)
        hint = f"close ones: {', '.join(close)}" if close else \
            f"known ids: {', '.join(sorted(registry))}"
        raise ValueError(f"unknown neurogym task {env_id!r}; {hint}")
    module, _, attr = registry[env_id].partition(":")
    factory = getattr(importlib.import_module(module), attr)
    try:  # a class's own __init__: neurogym's metaclass hides it behind (*args, **kwargs)
        sig = inspect.signature(factory.__init__ if isinstance(factory, type) else factory)
        params = {k: v for k, v in sig.parameters.items() if k != "self"}
    except (TypeError, ValueError):
        params = {}
    unknown = [k for k in env_kwargs if k not in params] if params and not any(
        p.kind is p.VAR_KEYWORD for p in params.values()) else []
    if unknown:
        raise ValueError(f"neurogym task {env_id!r} takes no argument(s) "
                         f"{', '.join(map(repr, unknown))}; its arguments: "
                         f"{', '.join(params)} (and rnngrad's test_size, test_seed, mask)")
    # built from the entry point, not gymnasium.make: no env checker, no wrapper's warnings
    with _quiet():
        try:
            return factory(**env_kwargs)
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise ValueError(f"neurogym task {env_id!r} rejected its arguments "
                             f"{env_kwargs!r}: {_line(e)}") from None


def _line(e: BaseException) -> str:
    """An exception from neurogym as one line."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


@contextlib.contextmanager
def _quiet():
    """gymnasium's warnings about neurogym's own code, not the user's: its env checker on
    metadata, and neurogym's wrappers (yang19, ibl20) reaching through gymnasium wrappers."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*render_modes")
        warnings.filterwarnings("ignore", message=".*to get variables from other wrappers")
        yield


def _seed(env, seed: int) -> None:
    """Seed every random state of a neurogym environment or wrapper (numpy RandomStates)."""
    # the outermost object that defines seed() itself: a gymnasium wrapper forwards an
    # attribute it lacks only with a deprecation warning
    obj = env
    while not any("seed" in vars(c) for c in type(obj).__mro__ if c.__module__.startswith(
            "neurogym")) and hasattr(obj, "env"):
        obj = obj.env
    obj.seed(seed)


class Neurogym:
    """A neurogym task: ``D`` = the observation size, ``K`` = the number of actions
    (class 0: fixate), cross-entropy over the counted steps.

    Args:
        env_id: a neurogym task id, e.g. ``"PerceptualDecisionMaking-v0"``.
        test_size, test_seed: the fixed test set (``test_size`` trials).
        mask: ``"trial"`` (every step of a trial, neurogym's convention) or ``"decision"``
            (the steps of the period named ``decision``).
        **env_kwargs: the environment's constructor arguments (``dt``, ``timing``, ...).
    """

    loss = "cross_entropy"
    readout = "softmax"
    classification = True

    def __init__(self, env_id: str, *, test_size: int = 512, test_seed: int = 12345,
                 mask: str = "trial", **env_kwargs: Any) -> None:
        if not isinstance(env_id, str) or not env_id:
            raise ValueError(f"neurogym task id must be a non-empty string, got {env_id!r}")
        for k, v in (("test_size", test_size), ("test_seed", test_seed)):
            if not isinstance(v, int) or isinstance(v, bool) or v < (1 if k == "test_size" else 0):
                raise ValueError(f"neurogym: {k} must be an int >= "
                                 f"{1 if k == 'test_size' else 0}, got {v!r}")
        if mask not in MASKS:
            raise ValueError(f"neurogym: mask must be one of {', '.join(MASKS)}, got {mask!r}")
        self.name = f"neurogym:{env_id}"
        self.env_id, self.env_kwargs, self.mask = env_id, dict(env_kwargs), mask
        self._env = _make_env(env_id, self.env_kwargs)
        space = self._env.action_space
        n = getattr(space, "n", None)
        if n is None or getattr(space, "shape", None) != ():
            raise ValueError(f"neurogym task {env_id!r} has action space {space}; rnngrad's "
                             "neurogym tasks need a discrete one (class targets)")
        shape = getattr(self._env.observation_space, "shape", None)
        if shape is None or len(shape) != 1:
            raise ValueError(f"neurogym task {env_id!r} has observations of shape {shape}; "
                             "expected a vector (D,)")
        self.input_size, self.output_size = int(shape[0]), int(n)
        self.test_size, self.test_seed = test_size, test_seed
        self._test = self.batch(test_size, generator=test_seed)
        self.seq_len = self._test.inputs.shape[0]  # the longest test trial

    def _trial(self, env) -> tuple[np.ndarray, np.ndarray, slice]:
        try:
            env.new_trial()
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
            raise ValueError(f"neurogym task {self.env_id!r} could not make a trial with "
                             f"arguments {self.env_kwargs!r}: {_line(e)}") from None
        u = env.unwrapped
        if not getattr(u, "_gt_built", False):
            raise ValueError(f"neurogym task {self.env_id!r} defines no ground truth (gt) for "
                             "its trials: it is a reinforcement-learning task, not a "
                             "supervised one")
        ob, gt = np.asarray(u.ob), np.asarray(u.gt)
        if ob.ndim != 2 or ob.shape[1] != self.input_size or gt.shape != (ob.shape[0],):
            raise ValueError(f"neurogym task {self.env_id!r} gave a trial with ob "
                             f"{ob.shape} and gt {gt.shape}; expected (T, "
                             f"{self.input_size}) and (T,)")
        if gt.dtype.kind not in "iu" or gt.min() < 0 or gt.max() >= self.output_size:
            raise ValueError(f"neurogym task {self.env_id!r} gave ground truth {gt.dtype} in "
                             f"[{gt.min()}, {gt.max()}], not actions 0..{self.output_size - 1} "
                             "of its action space: not a class target")
        if self.mask == "trial":
            counted = slice(0, ob.shape[0])
        elif "decision" in u.start_ind:
            counted = slice(u.start_ind["decision"], u.end_ind["decision"])
        else:
            raise ValueError(f"neurogym task {self.env_id!r} has no period named 'decision' "
                             f"(periods: {', '.join(u.start_ind)}); use mask='trial'")
        return ob, gt, counted

    def batch(self, batch_size: int, *, generator: torch.Generator | int | None = None) -> Batch:
        """``batch_size`` trials, padded to the longest: inputs (T, B, D), targets (T, B)
        int64 (0: fixate), mask (T, B)."""
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        g = make_generator(generator)
        env = copy.deepcopy(self._env)  # no state carried from the last batch
        with _quiet():
            _seed(env, int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
            trials = [self._trial(env) for _ in range(batch_size)]
        T = max(ob.shape[0] for ob, _, _ in trials)
        x = np.zeros((T, batch_size, self.input_size), dtype=np.float32)
        y = np.zeros((T, batch_size), dtype=np.int64)
        m = np.zeros((T, batch_size), dtype=np.float32)
        for b, (ob, gt, counted) in enumerate(trials):  # trial by trial, as neurogym makes them
            x[:ob.shape[0], b] = ob
            y[:ob.shape[0], b] = gt
            m[counted, b] = 1.0
        return Batch(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(m))

    def test_batch(self) -> Batch:
        """The fixed test set (``test_size`` trials from ``test_seed``)."""
        return self._test

    def performance(self, z: Tensor, batch: Batch) -> float:
        """neurogym's measure: the fraction of trials whose output argmax at the last counted
        step (under ``mask="trial"``: the trial's last step) equals the target there.
        ``z``: (T, B, K) logits."""
        counted = batch.mask > 0
        T, B = counted.shape
        last = T - 1 - counted.flip(0).to(torch.int64).argmax(0)  # (B,)
        cols = torch.arange(B, device=z.device)
        right = z[last, cols].argmax(-1) == batch.targets[last, cols]
        return float(right.double().mean())
