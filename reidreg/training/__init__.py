"""Lightning training: the ReIDModule and the learning-rate schedule."""

from reidreg.training.module import ReIDModule

__all__ = ["ReIDModule"]
