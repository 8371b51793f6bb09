"""The team setup, for real against PostgreSQL on loopback: an MLflow server whose backend store is a PostgreSQL
database and a Prefect server whose database is another, both serving a real run of the pipeline flow. Skips
with the reason where no PostgreSQL answers (SFTOPS_TEST_POSTGRES names another one)."""

from __future__ import annotations

import subprocess
import sys

import psycopg2
import pytest
from mlflow import MlflowClient

import realstack
from realstack import ROOT, http_json, make_repo, postgres_database, prefect_env

MODEL_NAME = "team-sft"


@pytest.fixture
def postgres():
    reason = realstack.postgres_available()
    if reason:
        pytest.skip(reason)


def count(url: str, query: str) -> int:
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute(query)
        return cur.fetchone()[0]


def test_mlflow_and_prefect_servers_on_postgresql_serve_a_pipeline_run(postgres, tmp_path, stories_model, gsm8k):
    repo = make_repo(tmp_path / "repo", stories_model, gsm8k, rows=80, registered_model=MODEL_NAME)
    with postgres_database("sftops_ops_mlflow") as mlflow_db, postgres_database("sftops_ops_prefect") as prefect_db:
        # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3: name the drivers that are installed.
        prefect_db_async = prefect_db.replace("postgresql://", "postgresql+asyncpg://", 1)
        mlflow_store = mlflow_db.replace("postgresql://", "postgresql+psycopg2://", 1)
        with (
            realstack.mlflow_server(tmp_path / "mlflow", backend=mlflow_store) as mlflow_url,
            realstack.prefect_server(tmp_path / "prefect", database=prefect_db_async) as api,
        ):
            env = prefect_env(tmp_path / "prefect", api_url=api)
            env["MLFLOW_TRACKING_URI"] = mlflow_url
            proc = subprocess.run(
                [sys.executable, str(ROOT / "flows/sft_pipeline.py"), "--set", "train.max_steps=2"],
                cwd=repo,
                env=env,
                capture_output=True,
                text=True,
                timeout=900,
            )
            assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]

            [flow_run] = http_json("POST", f"{api}/flow_runs/filter", {})
            assert flow_run["state"]["type"] == "COMPLETED"
            keys = {a["key"] for a in http_json("POST", f"{api}/artifacts/filter", {})}
            assert {"sft-metrics", "sft-data-card", "sft-report"} <= keys
            client = MlflowClient(mlflow_url)
            [run] = realstack.training_runs(client)
            assert run.info.status == "FINISHED" and len(client.get_metric_history(run.info.run_id, "train_loss")) == 2
            [evaluation] = realstack.evaluation_runs(client, run.info.run_id)
            assert evaluation.info.status == "FINISHED" and "test_tuned_nll" in evaluation.data.metrics
            assert client.get_latest_versions(MODEL_NAME)
        # What the servers answered with lives in the PostgreSQL databases.
        assert count(mlflow_db, "SELECT count(*) FROM runs WHERE status = 'FINISHED'") == 2  # training + evaluation
        assert count(mlflow_db, "SELECT count(*) FROM model_versions") == 1
        assert count(prefect_db, "SELECT count(*) FROM flow_run WHERE state_type = 'COMPLETED'") == 1
        # The DVC experiment (the four stages, with the override), record, promote.
        assert count(prefect_db, "SELECT count(*) FROM task_run WHERE state_type = 'COMPLETED'") == 3
