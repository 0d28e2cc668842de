"""Gradient algorithms, one file each, all with the interface of ``base.Algorithm``."""

from .base import Algorithm, StepOutput
from .bptt import bptt
from .eprop import eprop
from .kf_rtrl import kf_rtrl
from .rflo import rflo
from .rtrl import rtrl
from .snap import snap1
from .tbptt import tbptt
from .uoro import uoro

__all__ = ["Algorithm", "StepOutput", "bptt"]
__all__ += ["eprop", "rflo", "snap1", "uoro", "kf_rtrl"]
__all__ += ["rtrl", "tbptt"]
