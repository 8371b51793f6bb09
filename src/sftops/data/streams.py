"""Source files as byte streams, decompressed on the fly (gzip, zstandard), so that a reader holds one row at a
time, not the file: JSONL lines with a size bound, the empty-file check, UTF-8 errors placed in the whole file."""

from __future__ import annotations

import codecs
import io
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from sftops.errors import DataError

BOM = b"\xef\xbb\xbf"
CHUNK_BYTES = 1 << 20
HEAD_BYTES = 200  # what a rejected overlong line keeps of itself


def compression(path: Path) -> str | None:
    """'.gz', '.zst' or None, from the file name (data.jsonl.gz, data.csv.zst, ...)."""
    name = path.name.lower()
    return next((comp for comp in (".gz", ".zst") if name.endswith(comp)), None)


class _Decompressing(io.RawIOBase):
    """A decompressor as a raw stream whose read errors name the file: a corrupt archive is a user error."""

    def __init__(self, inner: BinaryIO, path: Path) -> None:
        self._inner, self._path = inner, path

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        try:
            data = self._inner.read(len(buffer))
        except Exception as exc:  # gzip/zstandard raise several types for a corrupt file
            raise DataError(f"{self._path}: cannot decompress ({exc})") from None
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._inner.close()
        super().close()


def open_bytes(path: Path) -> BinaryIO:
    """The file's content as a buffered byte stream, decompressed according to its suffix."""
    comp = compression(path)
    if comp is None:
        return open(path, "rb", buffering=CHUNK_BYTES)
    if comp == ".gz":
        import gzip

        inner: BinaryIO = gzip.open(path, "rb")  # type: ignore[assignment]
    else:
        import zstandard

        inner = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True)
    return io.BufferedReader(_Decompressing(inner, path), buffer_size=CHUNK_BYTES)


def require_content(path: Path) -> None:
    """An empty or whitespace-only file is an error: it is almost always a failed export, not an empty dataset.
    Reads only up to the first byte that is not whitespace (normally the first chunk)."""
    size = 0
    with open_bytes(path) as fh:
        while chunk := fh.read(CHUNK_BYTES):
            if chunk.strip():
                return
            size += len(chunk)
    raise DataError(f"{path}: the file is empty" if size == 0 else f"{path}: the file holds only whitespace")


def bounded_lines(fh: BinaryIO, max_line_bytes: int) -> Iterator[tuple[bytes, int]]:
    """(line, its length in bytes) for each b"\n"-ended line (the last may lack it), a leading BOM dropped,
    never holding more than max(max_line_bytes, HEAD_BYTES) + 1 bytes of a line: a longer line comes as its
    first HEAD_BYTES bytes with its full length, and a longer line of only whitespace as (b"", 0), a blank line
    like any other."""
    limit = max(max_line_bytes, HEAD_BYTES) + 1  # enough to tell a line too long, and to keep its head
    line = fh.readline(limit + len(BOM))
    if line.startswith(BOM):
        line = line[len(BOM) :]
        if not line:  # the file is only the mark
            return
    while line:
        if len(line) <= max_line_bytes:
            yield line, len(line)
        else:
            yield _overlong(fh, line)
        line = fh.readline(limit)


def _overlong(fh: BinaryIO, start: bytes) -> tuple[bytes, int]:
    """The rest of a line too long to hold, read in chunks and counted: (its head, its length)."""
    head, size, blank, piece = start[:HEAD_BYTES], len(start), not start.strip(), start
    while not piece.endswith(b"\n"):
        piece = fh.readline(CHUNK_BYTES)
        if not piece:
            break
        size += len(piece)
        blank = blank and not piece.strip()
    return (b"", 0) if blank else (head, size)


def utf8_error(path: Path) -> str | None:
    """Where the (decompressed) file first breaks UTF-8, worded as bytes.decode('utf-8-sig') words it for the
    whole content, or None where it does not; read in chunks to the end (a decompression error, which reading
    the file whole meets first, is raised)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, error = 0, None  # offset: bytes handed to the decoder before this chunk, after the BOM
    with open_bytes(path) as fh:
        chunk = fh.read(CHUNK_BYTES)
        chunk = chunk[len(BOM) :] if chunk.startswith(BOM) else chunk
        while error is None:
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                error = _decode_message(exc, offset - pending)
            if not chunk:
                return error
            offset += len(chunk)
            chunk = fh.read(CHUNK_BYTES)
        while fh.read(CHUNK_BYTES):
            pass
    return error


def _decode_message(exc: UnicodeDecodeError, shift: int) -> str:
    start, end = shift + exc.start, shift + exc.end
    if end - start == 1:
        return (
            f"'{exc.encoding}' codec can't decode byte 0x{exc.object[exc.start]:02x} in position {start}: {exc.reason}"
        )
    return f"'{exc.encoding}' codec can't decode bytes in position {start}-{end - 1}: {exc.reason}"
