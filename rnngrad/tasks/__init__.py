"""Tasks on real and standard data, each yielding seeded ``(inputs, targets, mask)`` batches.

A task has ``name``, ``loss``, ``readout``, ``classification``, ``input_size``,
``output_size``, ``seq_len``, ``batch(batch_size, *, generator)`` and ``test_batch()``.
``get_task("adding", seq_len=50)`` builds one by name.
"""

from __future__ import annotations

from .adding import Adding
from .base import Batch, make_generator
from .copy import Copy, CopyPad
from .digits import Digits, load_digits
from .evidence import EvidenceAccumulation
from .sine import Sine
from .stream_add import StreamAdd

__all__ = ["Batch", "make_generator", "Digits", "load_digits", "Adding", "Copy", "Sine",
           "TASKS", "get_task"]

__all__ += ["StreamAdd"]
__all__ += ["EvidenceAccumulation"]

TASKS = {
    "adding": Adding,
    "copy": Copy,
    "zucchet_copy": CopyPad,
    "digits": Digits,
    "evidence": EvidenceAccumulation,
    "sine": Sine,
    "stream_add": StreamAdd,
}


def get_task(name: str, **kwargs):
    """Build a task by name; keyword arguments go to its constructor."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name](**kwargs)
