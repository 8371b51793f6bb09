"""Stage outputs are replaced whole: the previous output survives a failed stage and a kill mid-swap."""

from __future__ import annotations

from pathlib import Path

import pytest

from sftops.outputs import replaced_whole


def write(folder: Path, text: str) -> None:
    (folder / "rows.txt").write_text(text)


def test_a_completed_block_replaces_the_output_and_a_failed_one_leaves_it(tmp_path):
    target = tmp_path / "raw"
    with replaced_whole(target) as out:
        write(out, "first")
    with pytest.raises(RuntimeError), replaced_whole(target) as out:
        write(out, "half")
        raise RuntimeError("the stage failed")
    assert (target / "rows.txt").read_text() == "first"
    with replaced_whole(target) as out:
        write(out, "second")
    assert (target / "rows.txt").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # no temporary folders left


def test_a_kill_between_the_renames_leaves_the_previous_output_restored_by_the_next_run(tmp_path):
    target = tmp_path / "raw"
    with replaced_whole(target) as out:
        write(out, "first")
    # What a kill after `target -> .old` and before `.tmp -> target` leaves: no output, the old one aside.
    target.rename(tmp_path / ".raw.old")
    (tmp_path / ".raw.tmp").mkdir()
    with pytest.raises(RuntimeError), replaced_whole(target) as out:
        raise RuntimeError("the next run fails too")
    assert (target / "rows.txt").read_text() == "first"
