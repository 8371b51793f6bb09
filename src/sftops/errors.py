"""Failures the CLI prints as one line (no traceback): user mistakes exit with 2, outages with 75 (EX_TEMPFAIL), so
whoever runs a stage (DVC, the Prefect flow, a shell loop) can tell "fix it" from "try again later". Bugs still
raise with their traceback (exit 1)."""

USER_ERROR_EXIT = 2
TRANSIENT_EXIT = 75  # sysexits.h EX_TEMPFAIL: the same command may succeed later


class SftopsError(Exception):
    """Something the user can fix; the message names the file, row or key, and the fix."""


class ConfigError(SftopsError, ValueError):
    """A params file or override that does not describe a valid run."""


class DataError(SftopsError, ValueError):
    """A source or file that cannot be read as a whole (one bad row is a rejection, not an error)."""


class ModelError(SftopsError, ValueError):
    """A model, tokenizer or chat template that cannot be used for SFT."""


class TrainingError(SftopsError, RuntimeError):
    """Training cannot go on (no examples, a non-finite loss)."""


class TransientError(Exception):
    """Something outside the run stopped answering (a server, a store); the same run may succeed later."""


class TrackingError(TransientError, RuntimeError):
    """The MLflow tracking server stopped answering; the message says what was kept and how to go on."""


class GpuMemoryError(SftopsError, RuntimeError):
    """A step did not fit in GPU memory; the message names the settings that need less of it."""


class StorageError(SftopsError, OSError):
    """An output could not be written (disk full, file size limit): the previous output is left in place."""
