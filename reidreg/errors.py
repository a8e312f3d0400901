"""User-facing errors: bad input that the command line reports in one clear line, without a traceback."""

import re


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


class WriteFailed(RunStopped):
    """A file of the run could not be written (disk full, quota, permissions); the message names it."""

    exit_code = 1


# torch.utils.data re-raises an error of a loader worker (or of the pin-memory thread) in the main process
# as a new exception of the same type whose message is "Caught <Type> in <where>.\nOriginal " followed by
# the worker's formatted traceback (torch._utils.ExceptionWrapper.reraise).
_WORKER_ERROR = re.compile(r"\ACaught (\w+) in [^\n]*\.\nOriginal ")


def message_of(error: BaseException) -> str:
    """The message of ``error`` as the user should read it.

    For an error re-raised from a DataLoader worker, that is the original message (the text after the last
    ``<Type>: `` header of the worker's traceback), not the whole traceback; otherwise ``str(error)``
    (which may list several problems, one per line).
    """
    text = str(error).strip()
    wrapped = _WORKER_ERROR.match(text)
    if wrapped:
        name = wrapped.group(1)
        headers = list(re.finditer(rf"^(?:[\w.]+\.)?{name}(?:: |$)", text[wrapped.end() :], re.M))
        if headers:
            text = text[wrapped.end() + headers[-1].end() :].strip() or name
    return text


def one_line(error: BaseException) -> str:
    """``message_of(error)`` on one line (a multi-line message's lines joined with spaces): for run.json."""
    return " ".join(line.strip() for line in message_of(error).splitlines() if line.strip())
