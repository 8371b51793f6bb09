"""The hostile-input corpus (tests/hostile/): every malformed or hostile file goes through the real ingest and
format stages. A bad row is rejected with its file, row and reason and counts are conserved; a bad file stops
the stage with one line naming it (exit code 2, no traceback); a path that leaves the project is refused."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import error_lines, sftops
from sftops.config import load_config
from sftops.errors import ConfigError, DataError
from sftops.jsonio import read_jsonl
from sftops.stages.format import run_format
from sftops.stages.ingest import run_ingest

HOSTILE = Path(__file__).parent / "hostile"
EXPECTED = yaml.safe_load((HOSTILE / "expected.yaml").read_text())
ROW_FILES = {f: e["rows"] for f, e in EXPECTED.items() if "rows" in e}
ERROR_FILES = {f: e["error"] for f, e in EXPECTED.items() if "error" in e}
CONFIG_ERRORS = {f: e["config_error"] for f, e in EXPECTED.items() if "config_error" in e}
DATA = "data/hostile"
GOOD_ROWS = 40  # a clean source next to the hostile ones, so that every split has rows

pytestmark = pytest.mark.reliability


def source_name(file: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", file)


@pytest.fixture
def hostile_project(tmp_path, tiny_model, monkeypatch):
    """A project folder whose data/hostile/ holds the whole corpus (committed and generated files)."""
    from hostile.generate import generate

    project = tmp_path / "project"
    shutil.copytree(HOSTILE / "files", project / DATA)
    generate(project / DATA, outside=tmp_path / "elsewhere")
    good = [{"prompt": f"clean question number {i}?", "completion": f"clean answer {i}."} for i in range(GOOD_ROWS)]
    (project / DATA / "good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good))
    monkeypatch.chdir(project)

    def params(sources: list[dict], name: str = "params.yaml") -> Path:
        tree = {
            # many hostile sources keep no row: counted here, not stopped (stop_on_empty_source has its own tests)
            "data": {
                "sources": sources,
                "near_duplicate_threshold": None,
                "test_fraction": 0.2,
                "val_fraction": 0.1,
                "stop_on_empty_source": False,
            },
            "model": {"base": str(tiny_model), "max_length": 128},
        }
        Path(name).write_text(yaml.safe_dump(tree))
        return Path(name)

    return project, params


def test_every_hostile_row_is_rejected_with_file_row_and_reason_and_counts_are_conserved(hostile_project, figures):
    _, params = hostile_project
    sources = [{"name": "good", "path": f"{DATA}/good.jsonl"}]
    sources += [{"name": source_name(f), "path": f"{DATA}/{f}"} for f in ROW_FILES]
    cfg = load_config(params(sources))
    run_ingest(cfg)
    stats = run_format(cfg)
    rejected = list(read_jsonl(Path(cfg.paths.curated) / "rejected.jsonl"))
    for file, expected in ROW_FILES.items():
        name = source_name(file)
        counts = stats["sources"][name]
        assert (counts["read"], counts["kept"]) == (expected["read"], expected["kept"]), (file, counts)
        mine = {r["origin"].rsplit("#", 1)[1]: r for r in rejected if r["source"] == name}
        assert len(mine) == counts["read"] - counts["kept"], (file, mine)  # nothing leaves without a record
        assert set(mine) == set(expected["rejected"]), (file, {k: v["reason"] for k, v in mine.items()})
        for place, phrase in expected["rejected"].items():
            record = mine[place]
            assert record["origin"] == f"{DATA}/{file}#{place}", record  # names the file and the row
            assert phrase in record["reason"], (file, record["reason"])
            assert len(json.dumps(record)) < 10_000  # a huge row is recorded shortened, not copied whole
        figures["bad inputs tried"] += 1
        figures["bad inputs rejected with a reason"] += bool(expected["rejected"])
        figures["bad inputs accepted as valid (a BOM, extra keys)"] += not expected["rejected"]
        figures["bad rows rejected with file, row and reason"] += len(mine)
    for counts in stats["sources"].values():
        figures["rows read"] += counts["read"]
        figures["rows accounted for (kept + rejected with a record)"] += counts["kept"] + sum(
            counts[k] for k in ("rejected_ingest", "rejected_format", "duplicates", "sampled_out", "dropped_tokens")
        )
    assert stats["sources"]["good"]["kept"] == GOOD_ROWS


@pytest.mark.parametrize("file", sorted(ERROR_FILES))
def test_every_hostile_file_stops_ingest_with_one_line_naming_it(hostile_project, file, figures):
    _, params = hostile_project
    cfg = load_config(params([{"name": "hostile", "path": f"{DATA}/{file}"}]))
    Path(cfg.paths.raw).mkdir(parents=True)
    (Path(cfg.paths.raw) / "previous.jsonl").write_text("{}\n")
    with pytest.raises(DataError) as err:
        run_ingest(cfg)
    message = str(err.value)
    assert file in message and ERROR_FILES[file] in message, message
    assert "\n" not in message
    assert (Path(cfg.paths.raw) / "previous.jsonl").exists()  # the earlier output is left as it was
    figures["bad inputs tried"] += 1
    figures["bad inputs rejected with a reason"] += 1
    figures["bad files stopped with a one-line error naming them"] += 1


@pytest.mark.parametrize("path", sorted(CONFIG_ERRORS))
def test_a_source_path_leaving_the_project_is_refused_at_load_time(hostile_project, path, figures):
    _, params = hostile_project
    with pytest.raises(ConfigError, match=re.escape(CONFIG_ERRORS[path])):
        load_config(params([{"name": "up", "path": path}]))
    figures["bad inputs tried"] += 1
    figures["bad inputs rejected with a reason"] += 1
    figures["config errors refused with the fix named"] += 1


def test_the_cli_reports_hostile_files_and_paths_in_one_line_without_a_traceback(hostile_project, figures):
    _, params = hostile_project
    cases = [
        ("yaml_alias_bomb.yaml", ERROR_FILES["yaml_alias_bomb.yaml"]),
        ("link_outside.jsonl", "outside"),
        ("truncated.jsonl.gz", "cannot decompress"),
        ("../outside.jsonl", CONFIG_ERRORS["../outside.jsonl"]),
    ]
    for n, (path, phrase) in enumerate(cases):
        file = params([{"name": "hostile", "path": path if path.startswith("..") else f"{DATA}/{path}"}], f"p{n}.yaml")
        done = sftops("ingest", "--params", str(file), timeout=300)
        assert done.returncode == 2, done.stderr[-2000:]
        assert "Traceback" not in done.stderr and phrase in done.stderr, done.stderr[-2000:]
        if not path.startswith(".."):
            assert error_lines(done.stderr) == [
                f"sftops: {DATA}/{path}: " + done.stderr.split(f"{DATA}/{path}: ", 1)[1].strip()
            ], done.stderr
        figures["CLI runs on bad input ending without a traceback"] += 1
