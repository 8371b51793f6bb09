"""Rows of Arrow record batches (Parquet files, Hugging Face datasets) as Records, one batch in memory at a time,
each row checked against data.max_row_bytes by the bytes of its values, measured in Arrow without copying."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sftops.data.records import Record, as_row


def value_bytes(array: pa.Array) -> np.ndarray:
    """Bytes of each slot's values: text and binary by length, lists and structs by the sum of their members,
    other types by their width (8 where it has none); a null is 0."""
    kind = array.type
    if pa.types.is_dictionary(kind):
        return value_bytes(array.dictionary_decode())
    if (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
    ):
        return pc.binary_length(array).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    if pa.types.is_map(kind):
        return _members_bytes(array, [array.keys, array.items])
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return _members_bytes(array, [array.flatten()])
    if pa.types.is_struct(kind):
        members = [value_bytes(field) for field in array.flatten()]
        return np.sum(members, axis=0, dtype=np.int64) if members else np.zeros(len(array), np.int64)
    try:
        width = max(kind.bit_width // 8, 1)
    except ValueError:  # no fixed width (e.g. a decimal256 or an extension type)
        width = 8
    valid = pc.is_valid(array).to_numpy(zero_copy_only=False)
    return valid.astype(np.int64) * width


def _members_bytes(array: pa.Array, children: list[pa.Array]) -> np.ndarray:
    """A list-like array's bytes per slot: its flattened members' bytes summed by the slot they belong to."""
    parents = pc.list_parent_indices(array).to_numpy(zero_copy_only=False)
    sizes = np.zeros(len(array), np.int64)
    for child in children:
        np.add.at(sizes, parents, value_bytes(child))
    return sizes


def row_bytes(batch: pa.RecordBatch) -> np.ndarray:
    """Bytes of each row's values, all columns together."""
    sizes = np.zeros(batch.num_rows, np.int64)
    for column in batch.columns:
        sizes += value_bytes(column)
    return sizes


def batch_records(batches: Iterable[pa.RecordBatch], origin: str, max_row_bytes: int) -> Iterator[Record]:
    """A Record for each row of the batches, numbered from 1 across them; a row whose values exceed
    max_row_bytes is rejected with its size (and the start of its repr, for the rejected file)."""
    row = 0
    for batch in batches:
        sizes = row_bytes(batch).tolist()
        for index, item in enumerate(batch.to_pylist()):
            row += 1
            if sizes[index] > max_row_bytes:
                yield Record(
                    f"{origin}#{row}",
                    row,
                    error=f"row too large: {sizes[index]:,} bytes of values, over data.max_row_bytes={max_row_bytes:,}",
                    raw=repr(item)[:200],
                )
            else:
                yield as_row(item, f"{origin}#{row}", row)
