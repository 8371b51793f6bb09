"""The real things the end-to-end tests run: a temporary git + DVC repository holding the pipeline, and server
processes (`mlflow server`, `prefect server start`, a `prefect worker`) on free loopback ports, polled until
they answer and always stopped. PostgreSQL-backed variants use a fresh database on 127.0.0.1:5432."""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
# The PostgreSQL the team-setup tests use (trust auth); another one: SFTOPS_TEST_POSTGRES=postgresql://user@host:port/db
POSTGRES = os.environ.get("SFTOPS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def sh(*cmd: str, cwd: Path, env: dict | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


def tool_env() -> dict[str, str]:
    # The stages call `sftops`; put this interpreter's scripts folder first on PATH.
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


@functools.cache
def migrated_mlflow_db() -> Path:
    """An empty MLflow SQLite store with every migration applied, made by MLflow itself once per test process: a
    fresh store spends about 5 s in MLflow's schema migrations, a copy of this one nothing."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    folder = Path(tempfile.mkdtemp(prefix="sftops-test-mlflow-"))
    atexit.register(shutil.rmtree, folder, True)
    SqlAlchemyStore(f"sqlite:///{folder / 'mlflow.db'}", str(folder / "artifacts"))
    return folder / "mlflow.db"


def empty_mlflow_store(path: Path) -> str:
    """An empty MLflow SQLite store at `path` (a copy of the migrated one); returns its tracking URI."""
    shutil.copyfile(migrated_mlflow_db(), path)
    return f"sqlite:///{path}"


def small_params(model: Path, data: Path, registered_model: str) -> dict:
    """params.yaml with a small model, source and budget. Sections are updated, not replaced: DVC refuses a stage
    whose declared params keys are missing from params.yaml."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(
        {"sources": [{"name": "gsm8k", "path": str(data)}], "val_fraction": 0.1, "test_fraction": 0.15, "split_seed": 0}
    )
    params["model"].update({"base": str(model), "gguf_file": None, "max_length": 512})
    params["train"].update(
        {"max_steps": 12, "micro_batch_size": 8, "grad_accum_steps": 1, "learning_rate": 0.003, "warmup_ratio": 0.1}
    )
    params["evaluate"].update({"batch_size": 16, "num_generations": 3, "max_new_tokens": 12})
    # These repos test operations (stages, flows, records, promotion), not stories260K's manners: no suite (the
    # three doors of test_operations wrote different suite answers with it: an open question), and no served-model
    # parity check, which would load each registered version again in a process of its own (15-30 s a version on 2
    # cores, for every evaluate of every door); tests/test_serving_parity.py and test_suites_real.py hold parity on
    # stories260K.
    params["evaluate"]["suites"] = []
    params["evaluate"]["parity_rows"] = 0
    params["tracking"]["registered_model_name"] = registered_model
    return params


def git_commit(repo: Path, message: str) -> None:
    sh("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", message, cwd=repo)


def make_repo(
    path: Path,
    model: Path,
    gsm8k: Path,
    rows: int = 160,
    registered_model: str = "tiny-sft",
    extra: tuple[str, ...] = (),
) -> Path:
    """A git + DVC repository with the pipeline (dvc.yaml, the code, and `extra` files such as prefect.yaml) and
    `rows` GSM8K rows as its source, committed in the order git init, dvc init, sources."""
    path.mkdir()
    for item in ("dvc.yaml", "src", "data/sources/README.md", "data/suites", ".gitignore", *extra):
        src, dst = ROOT / item, path / item
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(
            src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
        ) if src.is_dir() else shutil.copy(src, dst)
    lines = (gsm8k / "train.jsonl").read_text().splitlines()[:rows]
    (path / "data/sources/gsm8k.jsonl").write_text("\n".join(lines) + "\n")
    params = small_params(model, Path("data/sources/gsm8k.jsonl"), registered_model)
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    empty_mlflow_store(path / "mlflow.db")  # ignored by git: the project's default store, as the stages find it
    env = tool_env()
    sh("git", "init", "-q", cwd=path)
    git_commit(path, "init")
    sh(sys.executable, "-m", "dvc", "init", "-q", cwd=path, env=env)
    sh(sys.executable, "-m", "dvc", "config", "core.analytics", "false", cwd=path, env=env)
    sh("git", "add", "-A", cwd=path)
    git_commit(path, "pipeline")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll(check: Callable[[], Any], timeout: float, what: str, interval: float = 1.0) -> Any:
    """Call check() until it returns something truthy; fail with `what` after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def http_json(method: str, url: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read() or b"null")


def stop(proc: subprocess.Popen, grace_s: float = 5) -> None:
    """Stop a server or worker and everything it started (it leads its own process group); killed if it takes more
    than grace_s to go (no test needs a graceful shutdown, and the Prefect server's can take half a minute)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@contextmanager
def background(
    cmd: list[str],
    log: Path,
    env: dict | None = None,
    cwd: Path | None = None,
    health: str | None = None,
    timeout: float = 300,
) -> Iterator[subprocess.Popen]:
    """A long-running process, its output in `log`; with `health`, yields once that URL answers 200."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
    try:
        if health:

            def up() -> bool:
                if proc.poll() is not None:
                    raise RuntimeError(f"{cmd[:4]} exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
                return answers(health)

            poll(up, timeout, f"{' '.join(cmd[:4])} answering at {health}")
        yield proc
    finally:
        stop(proc)


# MLflow's server-side job runner (GenAI evaluation jobs, which sftops never submits) starts four huey consumer
# processes with each server, about 12 s of CPU a start; the tests' servers run without it. A value set is kept.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


class MlflowServer:
    """`mlflow server` on a free loopback port: a SQLite store in `folder` unless `backend` is given, and the
    artifacts served from `folder`/artifacts (clients upload through the server, over HTTP). It can be killed
    and started again on the same port and store (a server that went away and came back). `env`: more of the
    server's environment (MLflow's webhook settings, say)."""

    def __init__(self, folder: Path, backend: str | None = None, env: dict[str, str] | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        if backend is None and not (folder / "mlflow.db").exists():
            empty_mlflow_store(folder / "mlflow.db")
        self.store, self.port, self.env = folder, free_port(), env or {}
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--backend-store-uri",
            backend or f"sqlite:///{folder / 'mlflow.db'}",
            "--artifacts-destination",
            str(folder / "artifacts"),
            "--workers",
            "1",
        ]
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 300) -> None:
        log = self.store / "server.log"
        with log.open("a") as out:
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=SERVER_ENV | dict(os.environ) | self.env,
            )

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}:\n{log.read_text()[-4000:]}")
            return answers(f"{self.url}/health")

        try:
            poll(up, timeout, f"mlflow server answering at {self.url}")
        except BaseException:
            self.stop(signal.SIGKILL)
            raise

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            if sig == signal.SIGTERM:
                stop(self.proc)
            elif self.proc.poll() is None:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=30)
        self.proc = None


@contextmanager
def mlflow_server(folder: Path, backend: str | None = None, env: dict[str, str] | None = None) -> Iterator[str]:
    server = MlflowServer(folder, backend, env)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def prefect_env(home: Path, api_url: str | None = None, database: str | None = None) -> dict[str, str]:
    """The environment of a Prefect CLI, server or worker of one test: its own PREFECT_HOME, no prompts."""
    env = tool_env()
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_CLI_PROMPT="false",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_WORKER_QUERY_SECONDS="2",
        PREFECT_WORKER_PREFETCH_SECONDS="5",
    )
    env.pop("PREFECT_API_URL", None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    if database:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database
    return env


@contextmanager
def prefect_server(home: Path, database: str | None = None) -> Iterator[str]:
    """`prefect server start` on a free loopback port with its own PREFECT_HOME (a SQLite database there unless
    `database` is given); yields the API URL."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = prefect_env(home, database=database)
    env["PREFECT_UI_ENABLED"] = "false"  # the API is what the tests use; the UI only costs start-up time
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    api = f"http://127.0.0.1:{port}/api"
    with background(cmd, home / "server.log", env=env, health=f"{api}/health"):
        yield api


def postgres_available() -> str | None:
    """None when PostgreSQL answers at POSTGRES; otherwise why not (the reason a test skips with)."""
    import psycopg2

    try:
        psycopg2.connect(POSTGRES, connect_timeout=5).close()
    except psycopg2.Error as exc:
        return f"no PostgreSQL answers at {POSTGRES} ({str(exc).strip().splitlines()[0]})"
    return None


@contextmanager
def postgres_database(prefix: str) -> Iterator[str]:
    """A fresh, empty database on the test PostgreSQL, dropped afterwards; yields its postgresql:// URL."""
    import psycopg2

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(POSTGRES, connect_timeout=5)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        yield POSTGRES.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def training_runs(client, experiment_name: str = "sftops") -> list:
    """The experiment's training runs: every run but the evaluation runs (tracking.evaluations) hung under them."""
    from sftops.tracking.evaluations import OF_RUN

    experiment = client.get_experiment_by_name(experiment_name)
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return [r for r in runs if OF_RUN not in r.data.tags]


def evaluation_runs(client, training_run_id: str) -> list:
    """The evaluation runs of a training run's model (sftops.tracking.evaluations), oldest first, each fetched whole (a
    search leaves out a run's model inputs)."""
    from sftops.tracking.evaluations import OF_RUN

    experiment = client.get_run(training_run_id).info.experiment_id
    found = client.search_runs(
        [experiment], f"tags.`{OF_RUN}` = '{training_run_id}'", order_by=["attributes.start_time ASC"]
    )
    return [client.get_run(r.info.run_id) for r in found]
