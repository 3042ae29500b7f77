"""tract_optim: TrAct (Petersen, Borgelt, Ermon, NeurIPS 2024) as a drop-in optimizer wrapper."""

from .diagnostics import PrecisionWarning
from .finder import find_first_layer, find_first_layers
from .optimizer import TrActOptimizer
from .preconditioner import TrActPreconditioner

__all__ = [
    "PrecisionWarning",
    "TrActOptimizer",
    "TrActPreconditioner",
    "find_first_layer",
    "find_first_layers",
]
__version__ = "0.1.0"
