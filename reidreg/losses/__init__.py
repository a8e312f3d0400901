"""Task losses of the baseline: label-smoothed cross-entropy and batch-hard triplet."""

from reidreg.losses.objective import ReIDLoss
from reidreg.losses.triplet import BatchHardTripletLoss, pairwise_euclidean

__all__ = ["BatchHardTripletLoss", "ReIDLoss", "pairwise_euclidean"]
