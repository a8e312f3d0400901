"""Every query's result of one test: the evidence behind mAP, kept for paired comparisons (numpy only:
the report reads it without loading torch).

A test set has thousands of queries (Market-1501 3,368; MSMT17 11,659), and two models tested on the
same set are compared query by query (``reidreg.reporting.bootstrap``). One row per query, in the order
of the query set: its index, pid and camera; whether it is *valid* (it has a true match left after the
gallery items of its own pid and camera are dropped: the protocol of ``reidreg.evaluation.ranking``);
its AP, INP and the 1-based rank of its first true match (NaN, NaN and 0 when it is not valid).

The mean AP over the valid queries equals the reported mAP exactly (the same float64 values, averaged in
the same order), so AP and INP are kept as float64; the labels as int32. Stored as a compressed ``.npz``
(an MSMT17-sized test: about 0.2 MB), written atomically.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from reidreg.run_dir import atomic_writer

# Stored dtype of every column.
COLUMNS = {
    "query_index": np.int32,
    "pid": np.int32,
    "camid": np.int32,
    "valid": np.bool_,
    "ap": np.float64,
    "inp": np.float64,
    "first_match_rank": np.int32,
}


@dataclass  # not frozen: torchmetrics rebuilds dataclasses in a metric's result field by field
class PerQuery:
    """One row per query (module docstring); every field is a 1-D array of the same length."""

    query_index: np.ndarray
    pid: np.ndarray
    camid: np.ndarray
    valid: np.ndarray
    ap: np.ndarray
    inp: np.ndarray
    first_match_rank: np.ndarray

    def __post_init__(self) -> None:
        for column in fields(self):
            values = np.asarray(getattr(self, column.name))
            if values.ndim != 1 or values.size != np.asarray(self.query_index).size:
                raise ValueError(f"per-query column {column.name} has shape {values.shape}, expected 1-D")
            if np.issubdtype(COLUMNS[column.name], np.integer) and values.size:
                bounds = np.iinfo(COLUMNS[column.name])
                if values.min() < bounds.min or values.max() > bounds.max:
                    raise ValueError(f"per-query column {column.name} does not fit in int32")
            setattr(self, column.name, values.astype(COLUMNS[column.name], copy=False))

    @property
    def num_queries(self) -> int:
        return int(self.query_index.size)

    @property
    def num_valid(self) -> int:
        return int(self.valid.sum())

    def mean_ap(self) -> float:
        """The mAP: mean AP over the valid queries."""
        return float(self.ap[self.valid].mean())

    def save(self, path: str | Path) -> Path:
        """Write to ``path`` (compressed npz), atomically."""
        with atomic_writer(path) as file:
            np.savez_compressed(file, **{column: getattr(self, column) for column in COLUMNS})
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> PerQuery:
        """Read a file written by :meth:`save`; ValueError naming the file if it is not one."""
        try:
            with np.load(path, allow_pickle=False) as stored:
                missing = sorted(set(COLUMNS) - set(stored.files))
                if missing:
                    raise ValueError(f"lacks the column(s) {', '.join(missing)}")
                return cls(**{column: stored[column] for column in COLUMNS})
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
            raise ValueError(f"{path} is not a per-query results file ({error})") from None
