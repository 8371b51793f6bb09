"""The hostile inputs that would be huge, binary or links if committed: written into a folder by the test."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

GOOD = {
    "messages": [
        {"role": "user", "content": "a short question after a huge row?"},
        {"role": "assistant", "content": "a short answer."},
    ]
}


def generate(folder: Path, outside: Path) -> None:
    """Write the generated files into `folder`; `outside` is a folder outside the project for the link target."""
    huge = json.dumps({"prompt": "x" * 30_000_000, "completion": "thirty megabytes"}).encode()  # tens of MB on one line
    (folder / "huge_row.jsonl").write_bytes(huge + b"\n" + json.dumps(GOOD).encode() + b"\n")
    (folder / "deep_nesting.jsonl").write_bytes(b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n")
    (folder / "deep_nesting.json").write_bytes(b"[" * 100_000 + b"]" * 100_000)
    whole = gzip.compress(
        b"".join(json.dumps({"prompt": f"q{i}", "completion": "a"}).encode() + b"\n" for i in range(200))
    )
    (folder / "truncated.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    (folder / "corrupt.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd" + b"\x00garbage" * 8)
    pq.write_table(
        pa.table({"id": [1, 2], "text": ["no schema here", "nor here"]}), folder / "parquet_wrong_schema.parquet"
    )
    pq.write_table(pa.table({"prompt": [1, 2], "completion": [3, 4]}), folder / "parquet_wrong_types.parquet")
    outside.mkdir(parents=True, exist_ok=True)
    secret = outside / "not_data.jsonl"
    secret.write_text(json.dumps({"prompt": "outside the project", "completion": "must not be read"}) + "\n")
    (folder / "link_outside.jsonl").symlink_to(secret)
