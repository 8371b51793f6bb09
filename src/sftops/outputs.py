"""Stage outputs are replaced whole or not at all: a stage writes into a temporary folder next to its output,
and only when everything is written is the folder renamed into place. A stage that fails (a bad file, a full
disk, a kill) leaves the previous output exactly as it was, and DVC's last recorded outputs stay usable."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sftops import faults
from sftops.errors import StorageError

# What a full disk, a quota or a file size limit (RLIMIT_FSIZE) look like to a writer.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def no_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in NO_SPACE


def storage_error(exc: OSError, target: Path) -> StorageError:
    return StorageError(
        f"cannot write {target}: {exc.strerror or exc} (free disk space, or point paths.* at a "
        f"larger disk); the previous {target} is unchanged"
    )


@contextmanager
def replaced_whole(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder; when the block completes it becomes `target` (replacing the old one);
    when it raises, `target` is untouched and the temporary folder is removed."""
    target = Path(target)
    tmp, old = target.parent / f".{target.name}.tmp", target.parent / f".{target.name}.old"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run
    if old.exists() and not target.exists():  # a run killed between the two renames below: put the old one back
        old.rename(target)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        faults.disk_full(f"output:{target.name}")
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if no_space(exc):
            raise storage_error(exc, target) from None
        raise
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def write_bytes(path: Path, data: bytes) -> None:
    """Write a file by writing a temporary one and renaming it: readers see the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if no_space(exc):
            raise storage_error(exc, path) from None
        raise
    os.replace(tmp, path)
