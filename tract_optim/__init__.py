"""tract_optim: TrAct (Petersen, Borgelt, Ermon, NeurIPS 2024) as a drop-in optimizer wrapper."""

from .finder import find_first_layer, find_first_layers
from .optimizer import TrActOptimizer

__all__ = ["TrActOptimizer", "find_first_layer", "find_first_layers"]
__version__ = "0.1.0"
