"""The data card (markdown + PNG histograms) next to the curated data, and the curated data logged to a real
MLflow store as the run's dataset input with DVC's hash as its digest, with the card as artifacts."""

import hashlib
import json
from pathlib import Path

import matplotlib.image
import pyarrow.parquet as pq
from mlflow import MlflowClient

import sftops.provenance.fingerprints as fingerprints
from conftest import empty_mlflow_store
from sftops.config import Config
from sftops.layout import CARD, HISTOGRAM
from sftops.provenance.manifest import dvc_md5
from sftops.stages.format import run_format
from sftops.stages.ingest import run_ingest
from sftops.tracking import runs


def test_card_and_mlflow_dataset_input(tmp_path, stories_model, gsm8k, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", empty_mlflow_store(tmp_path / "mlflow.db"))
    monkeypatch.setenv("SFTOPS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(fingerprints, "REMEMBER_FROM_BYTES", 0)  # record every file's digests, not only large ones
    lines = (gsm8k / "train.jsonl").read_text().splitlines()[:300]
    Path("gsm.jsonl").write_text("\n".join(lines + lines[:10]) + "\n")  # 10 exact duplicates
    cfg = Config.model_validate(
        {
            "data": {"sources": [{"name": "gsm8k", "path": "gsm.jsonl"}]},
            "model": {"base": str(stories_model), "max_length": 300},
            "tracking": {"experiment": "card-test"},
        }
    )
    run_ingest(cfg)
    stats = run_format(cfg)
    curated = Path(cfg.paths.curated)
    card = (curated / CARD).read_text()
    assert f"{stats['kept']} curated rows from 310 read" in card and stats["duplicates"] >= 10
    assert f"| gsm8k | 310 | 0 | 0 | {stats['duplicates']} |" in card
    assert "policy `drop`" in card and f"rows over max_length: {stats['overflow']['rows_over']}" in card
    image = matplotlib.image.imread(curated / HISTOGRAM)
    assert image.ndim == 3 and image.shape[0] > 100
    assert json.loads((curated / "stats.json").read_text())["self_check"]["rows"] == 64
    # The format stage recorded each file's digests (outside the folder) for train and evaluate to reuse.
    record = json.loads((tmp_path / "cache" / fingerprints.DIGESTS_FILE).read_text())
    for path in (p for p in curated.rglob("*") if p.is_file()):
        stat, data = path.stat(), path.read_bytes()
        entry = record[f"{stat.st_dev}:{stat.st_ino}"]
        assert entry["signature"] == [stat.st_size, stat.st_mtime_ns], path
        assert (entry["md5"], entry["sha256"]) == (hashlib.md5(data).hexdigest(), hashlib.sha256(data).hexdigest())

    with runs.pipeline_run(cfg) as run:
        pass
    client = MlflowClient(run.ids["tracking_uri"])
    logged = client.get_run(run.ids["run_id"])
    [dataset_input] = logged.inputs.dataset_inputs
    assert dataset_input.dataset.name == "curated"
    assert dataset_input.dataset.digest == dvc_md5(curated) == logged.data.tags["data.curated_dvc_md5"]
    splits = {split: len(pq.read_table(curated / f"{split}.parquet")) for split in ("train", "val", "test")}
    assert json.loads(dataset_input.dataset.profile) == {
        "num_rows": sum(splits.values()),
        **{f"{s}_rows": n for s, n in splits.items()},
    }
    assert splits == stats["splits"] and json.loads(dataset_input.dataset.source)["uri"] == str(curated.resolve())
    artifacts = {a.path for a in client.list_artifacts(run.ids["run_id"], "data")}
    assert {f"data/{CARD}", f"data/{HISTOGRAM}", "data/stats.json"} <= artifacts
