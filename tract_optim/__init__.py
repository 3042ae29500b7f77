"""tract_optim: TrAct (Petersen, Borgelt, Ermon, NeurIPS 2024) as a drop-in optimizer wrapper."""

from .optimizer import TrActOptimizer

__all__ = ["TrActOptimizer"]
__version__ = "0.1.0"
