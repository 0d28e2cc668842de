"""rnngrad: gradients of recurrent networks by every method, behind one PyTorch API."""

from . import cells, check, steady, tasks
from .algorithms import Algorithm, StepOutput, bptt, eprop, kf_rtrl, rflo, rtrl, snap1, tbptt, uoro
from .algorithms._chunk import run
from .algorithms.compiled import CompileWarning, compile
from .errors import ConvergenceError, NonFiniteError
from .gradient import gradient, write_grads
from .model import RNN
from .network import Network
from .steady import SteadyClassifier, SteadyState

__version__ = "0.1.0"

__all__ = [
    "RNN",
    "Network",
    "cells",
    "gradient",
    "write_grads",
    "bptt",
    "Algorithm",
    "StepOutput",
    "ConvergenceError",
    "NonFiniteError",
    "tasks",
]
__all__ += ["eprop", "rflo", "snap1", "uoro", "kf_rtrl"]
__all__ += ["rtrl", "tbptt", "check"]
__all__ += ["SteadyState", "SteadyClassifier", "steady"]
__all__ += ["compile", "CompileWarning"]
__all__ += ["run"]
