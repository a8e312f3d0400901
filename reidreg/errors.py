"""User-facing errors: bad input that the command line reports in one clear line, without a traceback."""


class ReIDRegError(ValueError):
    """Base class of every error caused by the user's input (config, files, options).

    The command line prints it as one line and exits with ``exit_code``.
    """

    exit_code = 2


class ConfigError(ReIDRegError):
    """A config value is invalid or inconsistent; the message names the option and what was expected."""


class RunStopped(ReIDRegError):
    """The run stopped before its end for a reason it reports in one line; ``status`` goes into run.json."""

    status = "failed"
    exit_code = 3


class TrainingDiverged(RunStopped):
    """The loss or the gradients became non-finite, or the loss exploded (``divergence.*``)."""

    status = "diverged"


class RunInterrupted(RunStopped):
    """A signal (SLURM preemption, ``kill``) stopped the run after it saved its resume point."""

    status = "interrupted"
    exit_code = 4
