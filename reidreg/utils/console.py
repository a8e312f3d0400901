"""Logging pieces of the console and the run's log file, named in ``conf/hydra/job_logging/reidreg.yaml``.

Standard library only: Hydra builds these when it configures logging, before the task runs.
"""

from __future__ import annotations

import logging
import sys

# Records of this logger go to the run's log file only (see the YAML): the progress lines of a run whose
# console shows a progress bar instead.
FILE_ONLY_LOGGER = "reidreg.file_only"


class StdoutHandler(logging.StreamHandler):
    """A stream handler that writes to whatever ``sys.stdout`` is when a record is emitted.

    While Rich's live progress bar is shown it redirects ``sys.stdout`` to print other output above the
    bar; a handler holding the original stream would write through the bar and garble the terminal.
    """

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ and setStream assign it; always sys.stdout
        pass


class DropLightningAds(logging.Filter):
    """Drops Lightning's advertising tips (``💡 Tip: ... try installing litlogger / litmodels``).

    Lightning 2.6 logs them at every ``Trainer`` construction and ``fit`` through its ordinary info
    logger, with no option to turn them off (Lightning-AI/pytorch-lightning#21294); raising the
    logger's level would also hide its useful messages (devices, checkpoint restore).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        from_lightning = record.name.startswith(("pytorch_lightning", "lightning"))
        return not (from_lightning and record.getMessage().startswith("💡 Tip:"))
