"""Recurrent cells: one step of a recurrence each, behind one protocol (``base.Cell``).

``Elman`` (leaky or vanilla), ``GRU`` and ``LSTM`` (PyTorch's equations) are built in;
a user subclasses ``Cell``, writes ``init_state``, ``step`` and ``output``, and gets every
algorithm that applies. ``activations`` holds the elementwise nonlinearities.
"""

from .activations import ACTIVATIONS, Activation, get_activation
from .base import Cell, Immediate, Linearization, flatten_state, unflatten_state
from .elman import Elman, ElmanState, cell_step, pre_activation
from .elstm import ELSTM, ELSTMState
from .gru import GRU, GRUState
from .lif import ALIF, LIF, ALIFRefractoryState, ALIFState, LIFRefractoryState, LIFState
from .lru import LRU, LRUState
from .lstm import LSTM, LSTMState
from .surrogate import SURROGATES, Surrogate

__all__ = ["Cell", "Immediate", "Linearization", "flatten_state", "unflatten_state",
           "Elman", "ElmanState", "GRU", "GRUState", "LSTM", "LSTMState",
           "Activation", "ACTIVATIONS", "get_activation",
           "cell_step", "pre_activation"]
__all__ += ["LIF", "ALIF", "LIFState", "LIFRefractoryState", "ALIFState",
            "ALIFRefractoryState", "Surrogate", "SURROGATES"]
__all__ += ["LRU", "LRUState", "ELSTM", "ELSTMState"]
