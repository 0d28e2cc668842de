"""Gradient algorithms, one file each, all with the interface of ``base.Algorithm``."""

from .base import Algorithm, StepOutput
from .bptt import bptt
from .rtrl import rtrl
from .tbptt import tbptt

__all__ = ["Algorithm", "StepOutput", "bptt"]
__all__ += ["rtrl", "tbptt"]
