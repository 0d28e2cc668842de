"""Gradient algorithms, one file each, all with the interface of ``base.Algorithm``."""

from .base import Algorithm, StepOutput
from .bptt import bptt

__all__ = ["Algorithm", "StepOutput", "bptt"]
