"""Data: dataset parsers, the synthetic generator, P×K sampling, transforms and the DataModule.

The LightningDataModule lives in ``reidreg.data.datamodule``; it is not imported here so that the
dataset tools (``python -m reidreg.data.synthetic``) start without loading Lightning.
"""

from reidreg.data.datasets import DatasetError, ReIDDataset, build_dataset

__all__ = ["DatasetError", "ReIDDataset", "build_dataset"]
