"""The MLflow model registry: a version tagged with where its data and code are recorded, found again from a run
or an alias, and the promotion gate applied. The decision itself is pure
(evaluate/promotion.py); `promote` is the one place an alias moves, and the pipeline flow calls it once the run
is recorded; `promote_registered` applies the gate again to a version registered earlier, from what MLflow recorded
(after a reviewer's verdict). The version's description is written here too: what a reviewer reads first."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient

from sftops.config import Config
from sftops.errors import ConfigError, SftopsError
from sftops.evaluate import parity
from sftops.evaluate.cost import cost_beside_quality, cost_line
from sftops.evaluate.promotion import (
    CHALLENGER,
    CHAMPION,
    Champion,
    Decision,
    behaviour_checks,
    decide,
    metric_family,
    suite_results,
)
from sftops.redact import redact, tracking_credentials
from sftops.tracking.evaluations import (
    GATE_INPUTS_ARTIFACT,
    comparable_result,
    evaluation_run,
    latest_evaluation,
    log_evaluation,
    report_url,
)
from sftops.tracking.review_state import review_state, reviewed_by
from sftops.tracking.runs import load_manifest
from sftops.tracking.store import shared, store_of, tracking_uri
from sftops.tracking.tags import (
    ANYWHERE,
    EXPORT_PREFIX,
    RESTORABLE,
    RESTORE,
    RESTORE_WHERE,
    VERSIONED,
    VERSIONED_REASON,
)

# How the promotion gate measures a champion: (model folder, curated folder) -> (metrics, generations table).
Measure = Callable[[Path, Path], tuple[dict, dict]]


def version_tags(run_info: dict[str, Any]) -> dict[str, str]:
    return MlflowClient(store_of(run_info)).get_model_version(run_info["registered_model"], run_info["version"]).tags


def run_version_tags(run_id: str, tracking: str | None = None) -> dict[str, str]:
    """The tags of the model version registered from a run ({} when it registered none)."""
    versions = MlflowClient(tracking or tracking_uri()).search_model_versions(f"run_id='{run_id}'")
    return dict(versions[0].tags) if versions else {}


def record_version(run_info: dict[str, Any], tags: dict[str, str]) -> None:
    """Tag the registered version (and its run) with where its data and code are recorded."""
    client = MlflowClient(store_of(run_info))
    for key, value in tags.items():
        client.set_model_version_tag(run_info["registered_model"], run_info["version"], key, value)
        client.set_tag(run_info["run_id"], key, value)


_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def resolve_run_id(target: str, tracking: str | None = None) -> str:
    """The run behind models:/NAME/VERSION, models:/NAME@ALIAS, runs:/ID/... or a bare run id."""
    client = MlflowClient(tracking or tracking_uri())
    try:
        if target.startswith("models:/"):
            name, _, rest = target[len("models:/") :].partition("/")
            if "@" in name:
                name, alias = name.split("@", 1)
                return client.get_model_version_by_alias(name, alias).run_id
            return client.get_model_version(name, rest.strip("/")).run_id
        if target.startswith("runs:/"):
            return target[len("runs:/") :].split("/", 1)[0]
        if _RUN_ID.match(target):
            return client.get_run(target).info.run_id
    except mlflow.exceptions.MlflowException as exc:
        raise ConfigError(
            f"{target}: not found in the MLflow store {tracking or tracking_uri()} ({exc.error_code})"
        ) from None
    raise ConfigError(f"{target!r} is not models:/NAME/VERSION, models:/NAME@ALIAS, runs:/ID/... or a run id")


def registered_version(target: str, tracking: str | None = None) -> tuple[str, str]:
    """(NAME, VERSION) of models:/NAME/VERSION, or of the version models:/NAME@ALIAS points to."""
    name, _, version = target.removeprefix("models:/").partition("/")
    if not target.startswith("models:/") or not (version.strip("/") or "@" in name) or (version and "@" in name):
        raise ConfigError(f"{target!r} is not models:/NAME/VERSION or models:/NAME@ALIAS")
    client = MlflowClient(tracking or tracking_uri())
    try:
        if "@" in name:
            name, alias = name.split("@", 1)
            return name, str(client.get_model_version_by_alias(name, alias).version)
        return name, str(client.get_model_version(name, version.strip("/")).version)
    except mlflow.exceptions.MlflowException as exc:
        raise ConfigError(
            f"{target}: not found in the MLflow store {redact(tracking or tracking_uri())} ({exc.error_code})"
        ) from None


def model_uri(target: str, tracking: str | None = None) -> str:
    """A loadable MLflow model URI: a bare run id means the model that run logged (models:/m-...), whatever its
    name (runs:/ID/model for runs logged before models were named after their registered model)."""
    if not _RUN_ID.match(target):
        return target
    outputs = MlflowClient(tracking or tracking_uri()).get_run(resolve_run_id(target, tracking)).outputs
    logged = outputs.model_outputs if outputs else []
    return f"models:/{logged[0].model_id}" if logged else f"runs:/{target}/model"


# The promotion gate.


def current_champion(name: str, metric: str, tracking: str, identity: dict[str, Any]) -> Champion | None:
    """The version the `champion` alias points to, with its result on `metric` comparable with an evaluation
    of this identity (the same test split digest and the settings the metric depends on), if it has one."""
    client = MlflowClient(tracking)
    try:
        version = str(client.get_model_version_by_alias(name, CHAMPION).version)
    except mlflow.exceptions.MlflowException:
        return None  # no such model or no such alias yet
    key = identity["keys"][metric_family(metric)]
    value = comparable_result(client, name, version, metric, metric_family(metric), key)
    return Champion(version, value, key if value is not None else None)


def gate(
    run_info: dict[str, Any],
    metrics: dict[str, Any],
    primary_metric: str,
    margin: float,
    versioned: tuple[bool, str] = (True, "versioned"),
    review: tuple[str, str] = ("pending", ""),
    require_review: bool = False,
) -> tuple[Decision, Champion | None]:
    """What the promotion gate decides for this version's evaluation against today's champion, with the version's
    review state (nothing moves)."""
    if primary_metric not in metrics["tuned"]:
        raise ConfigError(
            f"evaluate.primary_metric={primary_metric!r} was not measured "
            "(set evaluate.num_generations > 0 for generation metrics)"
        )
    champion = current_champion(run_info["registered_model"], primary_metric, store_of(run_info), metrics["evaluation"])
    checks = metrics.get("data_checks", {"passed": True, "note": "no data checks recorded"})
    decision = decide(
        primary_metric,
        metrics["tuned"][primary_metric],
        metrics["evaluation"]["keys"][metric_family(primary_metric)],
        str(run_info["version"]),
        champion,
        margin,
        (checks["passed"], checks["note"]),
        versioned,
        suite_results(metrics),
        base_value=metrics["base"].get(primary_metric),
        budgets=behaviour_checks(metrics),
        selection=metrics.get("selection"),
        served=parity.verdict(metrics),
        review=review,
        require_review=require_review,
    )
    return decision, champion


def preview(run_info: dict[str, Any], metrics: dict[str, Any], primary_metric: str, margin: float) -> dict[str, Any]:
    """What the gate would decide, for the evaluation's report: the evaluate stage never moves an alias, the
    pipeline flow's promote step does, once the run's data is versioned."""
    decision, champion = gate(run_info, metrics, primary_metric, margin)
    reason = decision.reason
    if champion and champion.value is None and champion.version != str(run_info["version"]):
        reason = (
            f"champion v{champion.version} has no {primary_metric} result on this test split with these settings: "
            "the promote step measures it there first, then compares"
        )
    return {
        **decision.as_dict(),
        "alias": f"{decision.alias} (preview)",
        "reason": f"{reason}; applied once the run's data is versioned (the pipeline flow's promote step)",
    }


def promote(
    run_info: dict[str, Any],
    metrics: dict[str, Any],
    primary_metric: str,
    margin: float,
    measure: Measure | None = None,
    require_review: bool = False,
) -> Decision:
    """The promotion gate applied: decide (promotion.decide) from the version's test metrics, its data checks
    and versioning tags, its review state (tracking.require_review: only an approved version becomes champion)
    and the champion's linked result on the same evaluation; where the champion has none, measure it there first
    (`measure`: evaluate.champion.measurer; its result is then linked too). Then point the decided alias at the
    version, record the decision on the version and its run, and describe the version for reviewers."""
    store = store_of(run_info)
    client = MlflowClient(store)
    name, version = run_info["registered_model"], str(run_info["version"])
    tags = client.get_model_version(name, version).tags
    versioned, review = versioning(tags, store), (review_state(tags), reviewed_by(tags))
    family = metric_family(primary_metric)
    evaluated = evaluation_run(client, run_info["run_id"], family, metrics["evaluation"]["keys"][family])
    decision, champion = gate(run_info, metrics, primary_metric, margin, versioned, review, require_review)
    unmeasured = ""
    if champion and champion.value is None and champion.version != version and measure and evaluated:
        try:
            evaluate_champion(store, name, champion.version, evaluated, measure)
        except SftopsError as exc:  # a champion that no longer loads or fits: decided without it, and said so
            unmeasured = f" (measuring champion v{champion.version} on this test set failed: {exc})"
        decision, _ = gate(run_info, metrics, primary_metric, margin, versioned, review, require_review)
    decision = replace(decision, reason=decision.reason + unmeasured)
    _record_decision(client, run_info, decision)
    describe(run_info, metrics, decision, evaluated)
    return decision


def promote_registered(store: str, name: str, version: str, cfg: Config) -> Decision:
    """The promotion gate applied again to version `version` of `name`, registered and evaluated earlier, from what
    MLflow recorded: its latest evaluation against the base (the gate's inputs, GATE_INPUTS_ARTIFACT on that
    evaluation run), its tags (versioning, review) and today's champion, with cfg's evaluate.primary_metric,
    evaluate.promotion_margin and tracking.require_review; the alias moves as `promote` decides. What a
    reviewer's verdict triggers: `sftops review promote models:/NAME/VERSION` (and the registry's webhook)."""
    from sftops.evaluate.champion import measurer  # loads model code only when a champion must be measured

    store = tracking_credentials(store)
    found = MlflowClient(store).get_model_version(name, str(version))
    run_info = {
        "run_id": found.run_id,
        "registered_model": name,
        "version": str(found.version),
        "tracking_uri": redact(store),
    }
    metrics = recorded_evaluation(store, found.run_id, f"models:/{name}/{version}")
    return promote(
        run_info,
        metrics,
        cfg.evaluate.primary_metric,
        cfg.evaluate.promotion_margin,
        measurer(cfg),
        cfg.tracking.require_review,
    )


def recorded_evaluation(store: str, training_run_id: str, shown: str) -> dict[str, Any]:
    """The gate's inputs as the latest evaluation of a training run's model against its base logged them (a
    champion measured alone has no base, and no gate inputs)."""
    import json
    import tempfile

    client = MlflowClient(store)
    evaluated = latest_evaluation(client, training_run_id, "metrics.test_base_nll >= 0")
    if evaluated is None:
        raise ConfigError(
            f"{shown}: no evaluation against its base is recorded in {redact(store)}; fix: run `sftops evaluate` "
            "on it (or the pipeline flow) first"
        )
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(evaluated, GATE_INPUTS_ARTIFACT, tmp)
        except mlflow.exceptions.MlflowException:
            raise ConfigError(
                f"{shown}: its evaluation run {evaluated} has no {GATE_INPUTS_ARTIFACT} (logged by "
                "evaluations since the review gate); fix: evaluate it again (`sftops evaluate`)"
            ) from None
        return json.loads(Path(path).read_text())


def versioning(tags: dict[str, str], store: str) -> tuple[bool, str]:
    """Whether the gate counts the version as versioned, and why: its data and code recorded in git and DVC, and,
    for a registry other machines read (store.shared), restorable anywhere, not only where it ran."""
    versioned, reason = (
        tags.get(VERSIONED) == "true",
        tags.get(VERSIONED_REASON, "no record of its data in git and DVC"),
    )
    if versioned and shared(store) and tags.get(RESTORABLE) != ANYWHERE:
        where = tags.get(RESTORE_WHERE, "the machine that ran it")
        return False, (
            f"the registry {redact(store)} is shared, but the record is restorable only in {where} ({reason}); "
            "fix: set record.push_to in params.yaml to a git remote, with a default DVC remote in .dvc/config"
        )
    return versioned, reason


def evaluate_champion(store: str, name: str, version: str, evaluated: str, measure: Measure) -> str:
    """Measure version `version` on the test split the challenger's evaluation run `evaluated` logged, and log
    the result as that version's new evaluation run (linked to its model and to the same dataset)."""
    import tempfile

    from sftops.tracking.evaluations import TEST_SPLIT_ARTIFACT, dataset_source
    from sftops.tracking.models import local_model_dir

    mlflow.set_tracking_uri(store)
    champion = MlflowClient(store).get_model_version(name, version)
    with tempfile.TemporaryDirectory() as tmp:
        split = mlflow.artifacts.download_artifacts(run_id=evaluated, artifact_path=TEST_SPLIT_ARTIFACT, dst_path=tmp)
        curated = Path(split)
        metrics, table = measure(local_model_dir(f"models:/{name}/{version}", store), curated)
        run_info = {"run_id": champion.run_id, "registered_model": name, "version": version}
        source = dataset_source(MlflowClient(store), evaluated)
        return log_evaluation(run_info, metrics, table, [], [], curated / "test.parquet", source, store)


# What the promote step records on the version: the alias it decided, why, and whether the automatic gate passed
# (`sftops review status` lists the versions that passed and wait for a verdict, and aliases the gate never set).
DECISION, DECISION_REASON, GATE = "promotion.decision", "promotion.reason", "promotion.gate"


def _record_decision(client: MlflowClient, run_info: dict[str, Any], decision: Decision) -> None:
    name, version = run_info["registered_model"], str(run_info["version"])
    # The run first: a user who may write the registered model but not the experiment (a reviewer with EDIT on
    # the model alone) is refused before the version says anything the alias does not.
    client.set_tag(run_info["run_id"], DECISION, decision.alias)
    client.set_tag(run_info["run_id"], DECISION_REASON, decision.reason[:5000])
    client.log_dict(run_info["run_id"], decision.as_dict(), "eval/promotion.json")
    client.set_model_version_tag(name, version, GATE, "passed" if decision.passed_gate else "refused")
    client.set_model_version_tag(name, version, DECISION, decision.alias)
    client.set_model_version_tag(name, version, DECISION_REASON, decision.reason[:5000])
    client.set_registered_model_alias(name, decision.alias, version)
    if decision.alias == CHAMPION:
        # A promoted version is no longer the challenger.
        try:
            if str(client.get_model_version_by_alias(name, CHALLENGER).version) == version:
                client.delete_registered_model_alias(name, CHALLENGER)
        except mlflow.exceptions.MlflowException:
            pass


def report_link(run_info: dict[str, Any], metrics: dict[str, Any], primary_metric: str) -> str | None:
    """Where a reviewer opens the report of this version's evaluation; None without one."""
    family = metric_family(primary_metric)
    store = store_of(run_info)
    key = metrics["evaluation"]["keys"][family]
    evaluated = evaluation_run(MlflowClient(store), run_info["run_id"], family, key)
    return report_url(store, evaluated) if evaluated else None


# The version's description: what the MLflow UI shows on its page.


def describe(run_info: dict[str, Any], metrics: dict[str, Any], decision: Decision, evaluated: str | None) -> str:
    """Write the version's description; returns it."""
    store = store_of(run_info)
    client = MlflowClient(store)
    name, version = run_info["registered_model"], str(run_info["version"])
    try:
        manifest = load_manifest(run_info["run_id"], store)
    except ConfigError:
        manifest = {}
    found = client.get_model_version(name, version)
    from sftops.tracking.evaluations import model_id

    pages = review_pages(client, store, run_info, evaluated, model_id(client, name, version))
    text = describe_version(run_info, found.tags, manifest, metrics, decision.as_dict(), evaluated, store, pages)
    client.update_model_version(name, version, description=text)
    if evaluated:
        report_decision(client, evaluated, decision.as_dict())
    return text


def report_decision(client: MlflowClient, evaluation_run_id: str, decision: dict[str, Any]) -> None:
    """The evaluation run's HTML report with the promote step's decision in place of the gate's preview (the
    report a reviewer opens from the version; reports/report.html, a DVC output, keeps the preview)."""
    import tempfile

    from sftops.evaluate.report import with_decision
    from sftops.tracking.evaluations import REPORT_ARTIFACT

    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = Path(client.download_artifacts(evaluation_run_id, REPORT_ARTIFACT, tmp))
        except (mlflow.exceptions.MlflowException, OSError):
            return  # an evaluation logged without a report (a champion measured for the gate)
        path.write_text(with_decision(path.read_text(encoding="utf-8"), decision), encoding="utf-8")
        client.log_artifact(evaluation_run_id, str(path), str(Path(REPORT_ARTIFACT).parent))


def review_pages(
    client: MlflowClient, store: str, run_info: dict[str, Any], evaluated: str | None, model: str | None
) -> list[tuple[str, str]]:
    """The pages a reviewer opens after the version's, in order, as (label, link): the report, the evaluation run,
    the logged model, the training run."""
    from sftops.tracking import pages as pages_of
    from sftops.tracking.evaluations import REPORT_ARTIFACT

    experiment = client.get_run(run_info["run_id"]).info.experiment_id
    pages = []
    if evaluated:
        pages += [
            ("report", pages_of.artifact(store, evaluated, REPORT_ARTIFACT)),
            ("evaluation run", pages_of.run_page(store, experiment, evaluated)),
        ]
    if model:
        pages.append(("logged model", pages_of.logged_model_page(store, experiment, model)))
    return [*pages, ("training run", pages_of.run_page(store, experiment, run_info["run_id"]))]


def _base_line(manifest: dict[str, Any], tags: dict[str, str]) -> str:
    """The base model and the revision it was read at: the run manifest's resolved revisions (the version's
    model.revision tag holds the same), the package version for a pkg: base, none for a local folder."""
    model = manifest.get("revisions", {}).get("model", {})
    revision = model.get("resolved") or tags.get("model.revision", "null")
    base = model.get("base") or manifest.get("params", {}).get("model", {}).get("base") or tags.get("base_model", "?")
    shown = revision if revision != "null" else "none (a local folder: its file hashes are in the manifest)"
    return f"**Base**: `{redact(str(base))}` at revision `{shown}`"


def _data_line(tags: dict[str, str]) -> str:
    if tags.get("dvc.experiment"):
        return (
            f"**Data version**: DVC experiment `{tags['dvc.experiment']}` (`{tags.get('git.ref', '?')}`), git commit "
            f"`{tags.get('git.commit', '?')}`, curated data DVC md5 `{tags.get('dvc.curated_md5', '?')}`; "
            f"{tags.get(VERSIONED_REASON, '')}"
            + (f". Restore (in {tags.get(RESTORE_WHERE, '?')}): `{tags[RESTORE]}`" if RESTORE in tags else "")
        )
    return (
        f"**Data version**: not recorded in git and DVC ({tags.get(VERSIONED_REASON, 'no record')}); "
        f"curated data DVC md5 `{tags.get('data.curated_dvc_md5', '?')}`"
    )


def _result_line(metrics: dict[str, Any]) -> str:
    level = round(100 * metrics["confidence"])
    dataset = metrics["evaluation"]["dataset"]
    return (
        f"**Held-out response NLL** {metrics['base']['nll']:.4f} (base) → {metrics['tuned']['nll']:.4f} (tuned): "
        f"improvement {metrics['nll_improvement']:+.4f}, {level}% CI [{metrics['nll_improvement_ci_low']:+.4f}, "
        f"{metrics['nll_improvement_ci_high']:+.4f}], win rate {metrics['win_rate']:.2f}, on {metrics['test_rows']} "
        f"rows of evaluation dataset `{dataset['name']}` (digest `{dataset['digest']}`)"
    )


def _behaviour_line(metrics: dict[str, Any]) -> str | None:
    """The test split's answers, base against tuned (evaluate/behaviour.py); None when nothing was generated."""
    b = metrics.get("behaviour")
    if not b:
        return None
    length = (
        f"length ratio tuned / reference {b['length_ratio_to_reference']:.2f} "
        f"[{b['length_ratio_to_reference_ci_low']:.2f}, {b['length_ratio_to_reference_ci_high']:.2f}], "
        if "length_ratio_to_reference" in b
        else ""
    )
    return (
        f"**Test answers** ({b['answers']} sampled): mean words {b['words_mean_base']:.1f} (base) → "
        f"{b['words_mean_tuned']:.1f} (tuned), {b['words_mean_reference']:.1f} (reference); {length}degenerate "
        f"{b['degenerate_rate_base']:.2f} → {b['degenerate_rate_tuned']:.2f}, stop rate {b['stop_rate_base']:.2f} → "
        f"{b['stop_rate_tuned']:.2f}"
    )


def _suites_line(metrics: dict[str, Any]) -> str | None:
    """Each suite's NLL change and answers, base against tuned; None without suites."""
    parts = []
    for name, v in metrics.get("suites", {}).items():
        b = v.get("behaviour", {})
        answers = (
            f", answers {b['words_mean_base']:.1f} → {b['words_mean_tuned']:.1f} words (ratio {b['length_ratio']:.2f} "
            f"[{b['length_ratio_ci_low']:.2f}, {b['length_ratio_ci_high']:.2f}]), collapsed "
            f"{b['collapsed_rate_base']:.2f} → {b['collapsed_rate_tuned']:.2f}"
            if "length_ratio" in b
            else ""
        )
        verdict = "regressed" if v["regressed"] else "no regression"
        broken = f"; budget broken: {', '.join(b['broken'])}" if b.get("broken") else ""
        parts.append(
            f"`{name}`: NLL {v['base']['nll']:.3f} → {v['tuned']['nll']:.3f}{answers}; {verdict}{broken}"
            + (" (informational)" if v["informational"] else "")
        )
    return f"**Suites**: {'; '.join(parts)}" if parts else None


def _selection_line(metrics: dict[str, Any]) -> str | None:
    selection = metrics.get("selection")
    return f"**Exported step**: {selection['reason']}" if selection else None


def _exports_line(tags: dict[str, str]) -> str | None:
    """The export stage's verdicts (tags export.gguf.QUANT, export.vllm); None before it ran."""
    found = sorted((k.removeprefix(EXPORT_PREFIX), v) for k, v in tags.items() if k.startswith(EXPORT_PREFIX))
    return "**Exports**: " + "; ".join(f"`{name}` {line}" for name, line in found) if found else None


def run_cost(run_info: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The run's cost per 0.1 nats (evaluate/cost.py), from its record: metrics.json leaves clock figures out."""
    return metrics.get("cost") or cost_beside_quality(run_info.get("cost"), metrics)


def describe_version(
    run_info: dict[str, Any],
    tags: dict[str, str],
    manifest: dict[str, Any],
    metrics: dict[str, Any],
    decision: dict[str, Any],
    evaluation_run_id: str | None,
    store: str,
    pages: list[tuple[str, str]] = (),
) -> str:
    """The registered version's description (Markdown, as the MLflow UI renders it): what a reviewer needs
    before opening any run, and links to the pages to open next (`pages`: review_pages)."""
    method = manifest.get("params", {}).get("train", {}).get("method", tags.get("method", "?"))
    lines = [
        _base_line(manifest, tags),
        f"**Method**: {method}",
        _data_line(tags),
        _result_line(metrics),
        _behaviour_line(metrics),
        f"**Cost**: {line}" if (line := cost_line(run_cost(run_info, metrics), decision)) else None,
        _suites_line(metrics),
        _selection_line(metrics),
        f"**Serving parity**: {parity.summary(metrics.get(parity.PARITY_BLOCK) or parity.not_checked('no record'))}",
        _exports_line(tags),
        f"**Promotion gate**: {decision['alias']} ({decision['metric']} {decision['value']:.4f}): {decision['reason']}",
        _report_line(store, evaluation_run_id),
        f"**Runs**: training `{run_info['run_id']}`, evaluation `{evaluation_run_id}` (a child of the training run)",
        "**Review, in order**: " + " → ".join(f"[{label}]({link})" for label, link in pages) if pages else None,
    ]
    return "\n\n".join(line for line in lines if line)  # lines without a figure (behaviour, cost, ...) left out


def _report_line(store: str, evaluation_run_id: str | None) -> str:
    """The report as a link the UI opens, and as the URI Python reads it by."""
    from sftops.tracking import pages as pages_of
    from sftops.tracking.evaluations import REPORT_ARTIFACT

    if not evaluation_run_id:
        return "**Report**: no evaluation run found"
    uri = report_url(store, evaluation_run_id)
    link = f"[{REPORT_ARTIFACT}]({pages_of.artifact(store, evaluation_run_id, REPORT_ARTIFACT)})"
    return f"**Report**: {link}" + ("" if uri.startswith("http") else f" (`{uri}`)")
