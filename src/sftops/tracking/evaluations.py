"""Each evaluation is an MLflow run of its own, a child of the training run, linked to the logged model it
measured (MLflow 3's LoggedModel: the registered version's model_id) and to the test split as an evaluation
dataset (name and digest). The promotion gate reads results back from the logged model; no result is written
into the training run or onto the version's tags, so evaluating again never overwrites an earlier one."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import mlflow
from mlflow import MlflowClient
from mlflow.entities import LoggedModelInput

from sftops.tracking.store import store_of
from sftops.tracking.traces import TEST_SUITE, log_answer_traces

OF_RUN = "sftops.evaluation.of_run"  # the training run of the model evaluated
MODEL = "sftops.evaluation.model"  # NAME/VERSION
MODEL_ID = "sftops.evaluation.model_id"
DATASET_DIGEST = "sftops.evaluation.dataset_digest"
LATEST = "sftops.evaluation.latest_run"  # on the training run: its model's latest evaluation (the way back down)
TRACES = "sftops.evaluation.traces"  # how many answer traces the evaluation logged (tracking/traces.py)
TEST_SPLIT_ARTIFACT = "eval/data"  # the test split itself: the champion can be measured on it from any machine
REPORT_ARTIFACT = "eval/report.html"
# The evaluation as the promotion gate reads it (metrics.json's content with the clock's figures: the run's cost):
# a version is promoted again from it, long after the run's files are gone (registry.promote_registered).
GATE_INPUTS_ARTIFACT = "eval/gate_inputs.json"


def key_param(family: str) -> str:
    return f"comparison_key.{family}"


def model_id(client: MlflowClient, name: str, version: str) -> str | None:
    """The LoggedModel behind a registered version: its model_id, else the models:/m-... source it was
    registered from, else the model its run logged."""
    found = client.get_model_version(name, version)
    if found.model_id:
        return found.model_id
    if (found.source or "").startswith("models:/m-"):
        return found.source[len("models:/") :].split("/")[0]
    outputs = client.get_run(found.run_id).outputs if found.run_id else None
    return outputs.model_outputs[0].model_id if outputs and outputs.model_outputs else None


def _numbers(values: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The numeric values, their keys prefixed; nested blocks, text and nulls are left out."""
    return {f"{prefix}{k}": v for k, v in values.items() if isinstance(v, (int, float))}


# Figures that do not measure a model: counts of rows and answers, the confidence level, the budgets a block was
# held to, the references' lengths (the same for every model). They are the evaluation run's params: as metrics
# each drew a chart of one bar.
CONSTANTS = {
    "test_rows", "test_target_tokens", "generations", "answers", "rows", "confidence", "read", "rejected",
    "duplicates", "train_duplicates", "sampled_out", "contaminated_prompts", "min_length_ratio", "max_degenerate_rise",
    "regression_margin", "reference_words_mean", "reference_words_median", "reference_words_max",
    "words_mean_reference", "informational",
}  # fmt: skip


def _split(flat: dict[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """(metrics, params): each figure by the last part of its key (test_source/chat/rows: rows)."""
    metrics, params = {}, {}
    for key, value in flat.items():
        name = key.rsplit("/", 1)[-1].removeprefix("test_")
        if name in CONSTANTS:
            params[key.replace("test_test_", "test_")] = str(value)
        else:
            metrics[key] = float(value)
    return metrics, params


def split_figures(metrics: dict[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """metrics.json's test-split figures as MLflow metrics (test_base_nll, test_tuned_nll,
    test_nll_improvement_ci_low, test_source/NAME/win_rate (a champion measured alone has no base), and its
    behaviour block's figures as they are named there: test_length_ratio_to_reference, test_degenerate_rise_ci_low,
    test_degenerate_rate_base) and params (the CONSTANTS: test_rows, test_generations, test_confidence,
    test_source/NAME/rows, ...)."""
    flat = {f"test_{who}_{k}": v for who in ("base", "tuned") for k, v in metrics.get(who, {}).items()}
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"test_{key}"] = value
    for source, values in metrics.get("per_source", {}).items():
        flat.update(_numbers(values, f"test_source/{source}/"))
    flat.update(_numbers(metrics.get("behaviour", {}), "test_"))
    flat.update(_numbers(metrics.get("cost", {}), "cost/"))  # the training run's, beside its quality
    return _split(flat)


def suite_figures(name: str, values: dict[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """A suite's figures: metrics suite/NAME/tuned_nll, suite/NAME/regressed (0/1), and its behaviour block's as
    suite/NAME/length_ratio, suite/NAME/degenerate_rise; params its CONSTANTS (suite/NAME/rows, ...)."""
    flat = {f"suite/{name}/{who}_{k}": v for who in ("base", "tuned") for k, v in values[who].items()}
    flat.update(_numbers(values, f"suite/{name}/"))
    flat.update(_numbers(values.get("behaviour", {}), f"suite/{name}/"))
    return _split(flat)


COMPARISON_TABLE = "eval/base_vs_tuned.json"


def comparison_rows(metrics: dict[str, Any]) -> dict[str, list]:
    """Base and tuned side by side, one row per metric measured on both (the test split, then each suite): the
    table the evaluation run shows in its Artifacts tab (MLflow draws one chart per metric key, never two keys
    on one)."""
    rows: dict[str, list] = {"set": [], "metric": [], "base": [], "tuned": [], "tuned - base": []}
    blocks = [("test", metrics), *((f"suite/{n}", v) for n, v in metrics.get("suites", {}).items())]
    for name, block in blocks:
        behaviour = block.get("behaviour", {})
        pairs = {k.removesuffix("_base"): v for k, v in behaviour.items() if k.endswith("_base")}
        base = {**block.get("base", {}), **pairs}
        tuned = {**block.get("tuned", {}), **{k: behaviour.get(f"{k}_tuned") for k in pairs}}
        for key in (k for k in tuned if k in base):
            if isinstance(tuned[key], (int, float)) and isinstance(base[key], (int, float)):
                for column, value in zip(rows, (name, key, base[key], tuned[key], tuned[key] - base[key])):
                    rows[column].append(value)
    return rows


def evaluation_params(identity: dict[str, Any]) -> dict[str, str]:
    """The evaluation's identity as run params: the dataset, every setting, and per metric family the key the
    gate compares."""
    params = {"dataset.name": identity["dataset"]["name"], "dataset.digest": identity["dataset"]["digest"]}
    for settings in identity["settings"].values():
        params.update({f"settings.{k}": str(v) for k, v in settings.items()})
    params.update({key_param(family): key for family, key in identity["keys"].items()})
    return params


def _dataset(test_file: Path, identity: dict[str, Any], source: str):
    import pandas as pd

    frame = pd.read_parquet(test_file, columns=["id", "source"])
    return mlflow.data.from_pandas(
        frame, source=source, name=identity["dataset"]["name"], digest=identity["dataset"]["digest"]
    )


def _log_suites(suites: list[dict[str, Any]], results: dict[str, Any], model: str | None) -> None:
    """Each regression suite as an evaluation dataset named by its digest (the sha256 of its rows as
    evaluated; MLflow keeps 36 characters), its metrics linked to it and to the model."""
    import pandas as pd

    for suite in suites:
        frame = pd.DataFrame({"id": suite["ids"], "origin": suite["origins"]})
        dataset = mlflow.data.from_pandas(
            frame, source=suite["source"], name=f"suite/{suite['name']}", digest=suite["digest"][:32]
        )
        mlflow.log_input(dataset, context="evaluation")
        figures, constants = suite_figures(suite["name"], results[suite["name"]])
        mlflow.log_metrics(figures, model_id=model, dataset=dataset)
        mlflow.log_params(constants)


def log_evaluation(
    run_info: dict[str, Any],
    metrics: dict[str, Any],
    table: dict[str, list],
    files: list[Path],
    suites: list[dict[str, Any]],
    test_file: Path,
    source: str | None = None,
    store: str | None = None,
    suite_tables: dict[str, dict[str, list]] | None = None,
) -> str:
    """A new evaluation run of the version in run_info (the train stage's run.json, in the store that run was
    recorded in unless `store` says): its metrics linked to the logged model and the test dataset, its identity as
    params, the generations table, the files, and (when `source` is not given: this is the test split's first
    evaluation, its source is the local file) the test split itself, named by the dataset input's `artifact` tag;
    and every answer (the test split's `table` and each suite's of `suite_tables`) as a trace a reviewer labels,
    beside the champion's answer to the same prompt where the champion was evaluated on this test split.
    Returns the run id."""
    store = store or store_of(run_info)
    mlflow.set_tracking_uri(store)
    client = MlflowClient(store)
    name, version = run_info["registered_model"], str(run_info["version"])
    model = model_id(client, name, version)
    identity = metrics["evaluation"]
    digest = identity["dataset"]["digest"]
    tags = {
        "mlflow.parentRunId": run_info["run_id"],
        OF_RUN: run_info["run_id"],
        MODEL: f"{name}/{version}",
        DATASET_DIGEST: digest,
        **({MODEL_ID: model} if model else {}),
    }
    experiment = client.get_run(run_info["run_id"]).info.experiment_id
    with mlflow.start_run(experiment_id=experiment, run_name=f"eval-v{version}-{digest[:8]}", tags=tags) as run:
        copy = {}
        if source is None:
            mlflow.log_artifact(str(test_file), artifact_path=TEST_SPLIT_ARTIFACT)
            source, copy = (
                str(test_file.resolve()),
                {"artifact": f"runs:/{run.info.run_id}/{TEST_SPLIT_ARTIFACT}/{test_file.name}"},
            )
        dataset = _dataset(test_file, identity, source)
        mlflow.log_input(dataset, context="evaluation", tags=copy, model=LoggedModelInput(model) if model else None)
        figures, constants = split_figures(metrics)
        mlflow.log_params({**evaluation_params(identity), **constants})
        mlflow.log_metrics(figures, model_id=model, dataset=dataset)
        _log_suites(suites, metrics.get("suites", {}), model)
        if (side_by_side := comparison_rows(metrics))["metric"]:  # a champion measured alone has no base
            mlflow.log_table(side_by_side, artifact_file=COMPARISON_TABLE)
        mlflow.log_table(table, artifact_file="eval/generations.json")
        if "base" in metrics:  # a champion measured alone is one side of a comparison, not the gate's inputs
            mlflow.log_dict(metrics, GATE_INPUTS_ARTIFACT)
        for path in files:
            mlflow.log_artifact(str(path), artifact_path="eval/suites" if path.parent.name == "suites" else "eval")
        tables = {TEST_SUITE: table, **(suite_tables or {})}
        champion = champion_answers(client, experiment, name, version, digest, list(tables))
        mlflow.set_tag(TRACES, log_answer_traces(tables, f"{name}/{version}", model, champion))
    client.set_tag(run_info["run_id"], LATEST, run.info.run_id)
    return run.info.run_id


def champion_answers(
    client: MlflowClient, experiment: str, name: str, version: str, digest: str, suites: list[str]
) -> dict[str, dict[str, str]]:
    """The champion's answers by row id, per suite (the test split's under "test"), from its latest evaluation on
    the test split of this digest; {} when the champion is this version, absent, or never evaluated on it."""
    from sftops.evaluate.promotion import CHAMPION

    try:
        champion = str(client.get_model_version_by_alias(name, CHAMPION).version)
    except mlflow.exceptions.MlflowException:
        return {}
    found = client.search_runs(
        [experiment],
        f"tags.`{MODEL}` = '{name}/{champion}' and tags.`{DATASET_DIGEST}` = '{digest}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if champion == version or not found:
        return {}
    run_id, answers = found[0].info.run_id, {}
    stored = {a.path for a in client.list_artifacts(run_id, "eval")} | {
        a.path for a in client.list_artifacts(run_id, "eval/suites")
    }
    for suite in suites:
        path = "eval/generations.json" if suite == TEST_SUITE else f"eval/suites/{suite}.csv"
        if path in stored:
            answers[suite] = _tuned_answers(client, run_id, path)
    return answers


def _tuned_answers(client: MlflowClient, run_id: str, path: str) -> dict[str, str]:
    import tempfile

    import pandas as pd

    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(run_id, path, tmp)
        if path.endswith(".csv"):
            frame = pd.read_csv(local, keep_default_na=False)
        else:
            frame = pd.read_json(local, orient="split")
    return dict(zip(frame["id"].astype(str), frame["tuned_output"].astype(str)))


def dataset_source(client: MlflowClient, evaluation_run_id: str) -> str:
    """Where an evaluation run's test dataset came from (its MLflow dataset source's URI)."""
    import json

    inputs = client.get_run(evaluation_run_id).inputs.dataset_inputs
    found = [d.dataset for d in inputs if not d.dataset.name.startswith("suite/")]
    return (
        json.loads(found[0].source).get("uri", found[0].source)
        if found
        else f"runs:/{evaluation_run_id}/{TEST_SPLIT_ARTIFACT}"
    )


def latest_evaluation(client: MlflowClient, training_run_id: str, condition: str) -> str | None:
    """The latest evaluation run of a training run's model that meets `condition` (an MLflow search filter)."""
    experiment = client.get_run(training_run_id).info.experiment_id
    runs = client.search_runs(
        [experiment],
        f"tags.`{OF_RUN}` = '{training_run_id}' and {condition}",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def evaluation_run(client: MlflowClient, training_run_id: str, family: str, key: str) -> str | None:
    """The latest evaluation run of a training run's model with this comparison key."""
    return latest_evaluation(client, training_run_id, f"params.`{key_param(family)}` = '{key}'")


def comparable_result(
    client: MlflowClient, name: str, version: str, metric: str, family: str, key: str
) -> float | None:
    """The version's latest tuned `metric` among the results linked to its logged model whose evaluation run
    has this comparison key (the same test split digest and the settings the metric depends on)."""
    model = model_id(client, name, version)
    if model is None:
        return None
    linked = [m for m in client.get_logged_model(model).metrics or [] if m.key == f"test_tuned_{metric}" and m.run_id]
    for result in sorted(linked, key=lambda m: m.timestamp, reverse=True):
        if client.get_run(result.run_id).data.params.get(key_param(family)) == key:
            return result.value
    return None


def report_url(store: str, evaluation_run_id: str) -> str:
    """The evaluation's HTML report: a link a browser opens on an MLflow server (without user:password@), a
    runs:/ URI otherwise."""
    uri = urlsplit(store)
    if uri.scheme in {"http", "https"}:
        server = f"{uri.scheme}://{uri.hostname}" + (f":{uri.port}" if uri.port else "") + uri.path.rstrip("/")
        return f"{server}/get-artifact?path={REPORT_ARTIFACT}&run_uuid={evaluation_run_id}"
    return f"runs:/{evaluation_run_id}/{REPORT_ARTIFACT}"
