"""Tasks on real and standard data, each yielding seeded ``(inputs, targets, mask)`` batches."""

from .base import Batch, make_generator
from .digits import Digits, load_digits
from .stream_add import StreamAdd

__all__ = ["Batch", "make_generator", "Digits", "load_digits"]
__all__ += ["StreamAdd"]
