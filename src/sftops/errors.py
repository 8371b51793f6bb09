"""User mistakes, as opposed to bugs: the CLI prints these as one line (no traceback) and exits with 2."""


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


class TrackingError(SftopsError, RuntimeError):
    """The MLflow tracking server stopped answering; the message says what was kept and how to go on."""


class GpuMemoryError(SftopsError, RuntimeError):
    """A step did not fit in GPU memory; the message names the settings that need less of it."""


class StorageError(SftopsError, OSError):
    """An output could not be written (disk full, file size limit): the previous output is left in place."""
