"""User mistakes end with one clear line on stderr and exit code 2, never a traceback."""

from pathlib import Path

from conftest import sftops

ROOT = Path(__file__).resolve().parents[1]


def test_bad_override_is_one_clear_error(tmp_path):
    proc = sftops("train", "--params", str(ROOT / "params.yaml"), "--set", "train.method=qlora-magic", cwd=tmp_path)
    assert proc.returncode == 2
    assert "train.method: Input should be 'lora', 'dora', 'qlora' or 'full'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_stage_without_its_input_says_which_stage_to_run(tmp_path):
    proc = sftops("format", "--params", str(ROOT / "params.yaml"), cwd=tmp_path)
    assert proc.returncode == 2
    assert "data/raw/chatterbot.jsonl not found: run `sftops ingest`" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_source_file_is_named(tmp_path):
    proc = sftops(
        "ingest",
        "--params",
        str(ROOT / "params.yaml"),
        "--set",
        "data.sources=[{name: x, path: nope.jsonl}]",
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "source 'x': nothing matches 'nope.jsonl'" in proc.stderr
