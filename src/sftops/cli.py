"""`sftops`: run a pipeline stage (as DVC does), the whole pipeline, plan a run, ask a model a question, or review
a registered version (cli_review.py)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from sftops.config import explain, isolate_outputs, load_config
from sftops.errors import TRANSIENT_EXIT, USER_ERROR_EXIT, ConfigError, DataError, SftopsError, TransientError


def _print(title: str, value: Any) -> None:
    print(f"{title}:\n{json.dumps(value, indent=2, default=_plain)}")


def _plain(value: Any) -> Any:
    """A stage's typed result as JSON: a dataclass as its fields, anything else (paths) as text."""
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else str(value)


def stage(name: str, params: str, overrides: list[str]) -> Any:
    from sftops.pipeline import stage_function

    cfg = load_config(params, overrides)
    return stage_function(name)(cfg)


def show_progress() -> None:
    """The library's INFO lines (a line per training step, what each stage did) on stderr, where DVC and the
    Prefect task that runs the stage pass them on."""
    logger = logging.getLogger("sftops")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _fail(message: str, code: int) -> int:
    from sftops.redact import redact

    stage_name = os.environ.get("DVC_STAGE")  # set by DVC for the stage command it runs
    if stage_name:
        # Without persist, DVC removed the stage's outputs before running it; dvc.lock still names the last good ones.
        message += (
            f" (the last recorded outputs of stage {stage_name!r} are in DVC's cache: `dvc checkout {stage_name}` "
            "restores them)"
        )
    print(f"sftops: {redact(message)}", file=sys.stderr)  # a message may quote a URI with its password
    return code


def _generate(args: argparse.Namespace) -> None:
    """From a local model folder, or from MLflow: models:/NAME/VERSION, models:/NAME@ALIAS, runs:/ID/NAME or a run
    id; with --base, from the base model it was fine-tuned from (its own template and decoding)."""
    if Path(args.model).is_dir():
        from sftops.evaluate.sides import answer_with

        replies = answer_with(Path(args.model), args.prompt, args.max_new_tokens, args.base)
    else:
        from sftops.tracking.models import predict
        from sftops.tracking.registry import model_uri

        uri = model_uri(args.model, args.tracking_uri)
        replies = predict(uri, args.prompt, args.max_new_tokens, args.tracking_uri, args.base)
    for prompt, reply in zip(args.prompt, replies):
        print(f"> {prompt}\n{reply}\n")


def _reproduce(args: argparse.Namespace) -> None:
    from sftops.provenance.reproduce import reproduce
    from sftops.tracking.registry import resolve_run_id, run_version_tags
    from sftops.tracking.runs import load_manifest

    run_id = resolve_run_id(args.target, args.tracking_uri)
    manifest = load_manifest(run_id, args.tracking_uri)
    tags = run_version_tags(run_id, args.tracking_uri)
    result = reproduce(
        manifest, run_id, Path(args.into) if args.into else None, allow_dirty=args.allow_dirty, tags=tags
    )
    print(
        "data: restored through DVC from the version's record"
        if result["data_restored_by_dvc"]
        else "data: the version has no DVC record (made outside the pipeline flow): re-ingested from the sources, "
        "which may have changed since"
    )
    for name, check in result["checks"].items():
        print(f"{'same' if check['match'] else 'DIFFERENT':>9}  {name}")
    print(f"reproduction of run {run_id} in {result['folder']} (details: reproduction.json)")
    if result["failed"]:
        raise DataError(f"not reproduced: {', '.join(result['failed'])} differ from the recorded run")


def _launch(args: argparse.Namespace) -> None:
    """Write the job for launch.target (and submit it and wait, unless --write-only), or run one node here."""
    from sftops.stages.train import run_train
    from sftops.train import launch

    cfg = load_config(args.params, args.overrides)
    if args.node_rank is not None:
        params, _ = launch.job_files(cfg)
        launch.run_node(cfg, launch.write_params(cfg, params), args.node_rank, args.head)
    elif args.write_only:
        params, job = launch.write_job(cfg)
        print(f"{job} (params: {params}):\n{job.read_text()}")
    else:
        _print("train", run_train(cfg))


def _explain(args: argparse.Namespace) -> None:
    try:
        cfg, origin = load_config(args.params, args.overrides), args.params + (" with --set" if args.overrides else "")
    except ConfigError as exc:  # a broken params file is when the keys' meaning is wanted most: still explain them
        cfg, origin = None, f"{args.params} not loaded: {str(exc).splitlines()[-1].strip()}"
    print(explain(args.explain, cfg, origin))


def _plan(args: argparse.Namespace) -> None:
    """The run's estimated peak memory against this machine, and with --measure-steps its time per step."""
    from sftops.plan.summary import plan, render

    cfg = load_config(args.params, args.overrides)
    config_json = Path(args.config_json) if args.config_json else None
    result = plan(cfg, config_json, args.measure_steps)
    print(json.dumps(result, indent=2) if args.json else render(result))


def _where(cfg: Any) -> None:
    from sftops.pipeline import where

    metrics = Path(cfg.paths.metrics)
    if metrics.exists():
        m = json.loads(metrics.read_text())
        print(
            f"held-out response NLL: base {m['base']['nll']:.3f} -> tuned {m['tuned']['nll']:.3f} nats/token "
            f"({m['test_rows']} test rows)"
        )
        if "nll_improvement_ci_low" in m:
            print(
                f"improvement {m['nll_improvement']:+.3f}, {round(100 * m['confidence'])}% CI "
                f"[{m['nll_improvement_ci_low']:+.3f}, {m['nll_improvement_ci_high']:+.3f}], "
                f"win rate {m['win_rate']:.2f}"
            )
    for what, place in where(cfg).items():
        print(f"{what:>13}: {place}")


def _serve_lines(args: argparse.Namespace) -> None:
    """Champion and challenger (or the given models) checked against vLLM's LoRA rules, copied under --into, and
    the `vllm serve` line that serves them side by side."""
    import shutil

    from sftops.export import vllm
    from sftops.tracking.models import local_model_dir

    name = load_config(args.params, args.overrides).tracking.registered_model_name
    wanted = {"champion": args.champion or f"models:/{name}@champion"}
    wanted["challenger"] = args.challenger or f"models:/{name}@challenger"
    folders = {}
    for role, model in wanted.items():
        source = Path(model) if Path(model).is_dir() else local_model_dir(model, args.tracking_uri)
        folders[role] = Path(args.into) / role
        shutil.rmtree(folders[role], ignore_errors=True)
        shutil.copytree(source, folders[role])
    blocks = {role: vllm.check_model(folder, role) for role, folder in folders.items()}
    for role, block in blocks.items():
        print(f"{role} ({wanted[role]}, in {folders[role]}): {vllm.summary(block)}")
    line = vllm.side_by_side(blocks, folders)
    print(line or "not servable side by side as adapters on one base: each line above says why, and what to serve")


def _config_arguments(command: argparse.ArgumentParser) -> None:
    """--params and --set, as every command that loads the configuration takes them."""
    command.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    command.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a parameter, e.g. --set train.learning_rate=1e-4 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sftops", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("ingest", "read the sources into data/raw"),
        ("format", "map, de-duplicate and split into data/curated"),
        ("train", "fine-tune the base model, save and register it"),
        ("evaluate", "compare base and fine-tuned model on the test split"),
        ("export", "write the GGUF files and Modelfiles, check them and the adapter against the evaluated model"),
        ("run", "all five stages in order (with --set: under runs/<digest>/, leaving DVC's outputs alone)"),
        ("where", "print where the results of the last run are"),
    ):
        p = sub.add_parser(name, help=help_text)
        _config_arguments(p)
    lau = sub.add_parser(
        "launch", help="run the train stage on launch.nodes nodes (slurm, kubernetes, loopback), or one node of it"
    )
    _config_arguments(lau)
    lau.add_argument(
        "--write-only",
        action="store_true",
        help="write launch/<name>.* (script or manifest) and print it; submit nothing",
    )
    lau.add_argument(
        "--node-rank",
        type=int,
        default=None,
        help="run node K's torchrun agent here (a cluster without Slurm or Kubernetes)",
    )
    lau.add_argument("--head", default="127.0.0.1", help="with --node-rank: the rendezvous host (node 0's address)")
    con = sub.add_parser("config", help="explain a config key or section: type, default, value in params.yaml, meaning")
    con.add_argument(
        "--explain", required=True, metavar="KEY", help="a key (train.learning_rate) or a section (train, data.sources)"
    )
    _config_arguments(con)
    pla = sub.add_parser(
        "plan", help="estimate the run's peak memory from the model's config (no weights), and whether it fits here"
    )
    _config_arguments(pla)
    pla.add_argument(
        "--config-json", default=None, metavar="PATH", help="a model's config.json to plan for instead of model.base"
    )
    pla.add_argument(
        "--measure-steps",
        type=int,
        default=0,
        metavar="N",
        help="also train N steps (after one warm-up) on synthetic max_length rows: time per step, measured peak",
    )
    pla.add_argument("--json", action="store_true", help="print the plan as JSON")
    gen = sub.add_parser("generate", help="answer prompts with a fine-tuned model")
    gen.add_argument(
        "--model",
        required=True,
        help="a model folder (models/model), models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/NAME or a run id",
    )
    gen.add_argument("--prompt", action="append", required=True, help="a question (repeatable)")
    gen.add_argument(
        "--base",
        action="store_true",
        help="answer with the base model MODEL was fine-tuned from (as evaluate does: the adapter switched off, or "
        "the base loaded), to compare its answers with the tuned model's",
    )
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    lines = sub.add_parser(
        "serve-lines",
        help="check champion and challenger against vLLM's LoRA rules and print the `vllm serve` line for both",
    )
    _config_arguments(lines)
    lines.add_argument("--champion", default=None, help="a model folder or URI (default: models:/NAME@champion)")
    lines.add_argument("--challenger", default=None, help="a model folder or URI (default: models:/NAME@challenger)")
    lines.add_argument("--into", default="serving", help="where the two models are copied (default: serving/)")
    lines.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    oai = sub.add_parser(
        "serve-openai",
        help="serve a registered chat model on OpenAI's API (/v1/chat/completions, /v1/models), as MLflow loads it",
    )
    oai.add_argument("model", help="models:/NAME@ALIAS, models:/NAME/VERSION or runs:/ID/model")
    oai.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    oai.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    oai.add_argument("--served-model-name", default=None, help="the id clients name (default: the model's name)")
    rep = sub.add_parser("reproduce", help="re-run the pipeline that made a model, from its manifest, and compare")
    rep.add_argument("target", help="models:/NAME/VERSION, models:/NAME@ALIAS, runs:/ID or a run id")
    rep.add_argument("--into", default=None, help="folder for the reproduction (default: reproductions/<run id>)")
    rep.add_argument(
        "--allow-dirty", action="store_true", help="re-run the recorded commit even if the run had uncommitted changes"
    )
    rep.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    _review_commands(sub)
    return parser


def _review_commands(sub: argparse._SubParsersAction) -> None:
    """`sftops review <command>`: approve, reject, promote and status run by cli_review.py, summary and export-suite
    by cli_feedback.py (each module's COMMANDS)."""
    review = sub.add_parser(
        "review", help="review a registered version: approve, reject, promote, status, summary, export-suite"
    )
    commands = review.add_subparsers(dest="review_command", required=True)
    for name, help_text in (
        ("approve", "approve a version (tags review=approved, review.by, review.reason)"),
        ("reject", "reject a version (tags review=rejected, ...): it never becomes champion"),
        ("promote", "apply the promotion gate again to a registered, evaluated version, with its review state"),
        ("status", "list the versions awaiting review, and a champion alias the gate did not set"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument(
            "--tracking-uri",
            default=None,
            help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
        )
        if name != "status":
            command.add_argument("model", metavar="MODEL_URI", help="models:/NAME/VERSION (or models:/NAME@ALIAS)")
        if name in ("approve", "reject"):
            command.add_argument("--reason", required=True, help="why, in a line (the version's tag review.reason)")
        else:
            _config_arguments(command)
        if name == "status":
            command.add_argument(
                "--name", default=None, help="registered model (default: tracking.registered_model_name)"
            )
    _summary_parser(commands)
    _export_suite_parser(commands)


_MODEL_HELP = "models:/NAME/VERSION or models:/NAME@ALIAS (models:/ may be left out)"
_TRACKING_HELP = "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)"


def _summary_parser(commands: argparse._SubParsersAction) -> None:
    command = commands.add_parser(
        "summary",
        help="the reviewers' preferences on a version's answers: rows labelled, win rate with its CI, what lost",
    )
    command.add_argument("model", metavar="MODEL_URI", help=_MODEL_HELP)
    command.add_argument("--json", action="store_true", help="print the summary as JSON")
    command.add_argument("--params", default="params.yaml", help="bootstrap settings from (default: params.yaml)")
    command.add_argument("--tracking-uri", default=None, help=_TRACKING_HELP)


def _export_suite_parser(commands: argparse._SubParsersAction) -> None:
    command = commands.add_parser(
        "export-suite", help="write the labelled prompts where the tuned answer lost as a suite under data/suites/"
    )
    command.add_argument("model", metavar="MODEL_URI", help=_MODEL_HELP)
    command.add_argument("--name", default="hard-cases", help="the suite's name and file name (default: hard-cases)")
    command.add_argument("--folder", default="data/suites", help="where the suite file goes (default: data/suites)")
    command.add_argument("--replace", action="store_true", help="write the file again if it exists")
    command.add_argument("--tracking-uri", default=None, help=_TRACKING_HELP)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("ingest", "format", "train", "evaluate", "export", "run"):
        show_progress()
    try:
        if args.command == "generate":
            _generate(args)
        elif args.command == "launch":
            _launch(args)
        elif args.command == "reproduce":
            _reproduce(args)
        elif args.command == "config":
            _explain(args)
        elif args.command == "plan":
            _plan(args)
        elif args.command == "serve-lines":
            _serve_lines(args)
        elif args.command == "review":
            from sftops import cli_feedback, cli_review

            commands = {**cli_review.COMMANDS, **cli_feedback.COMMANDS}
            commands[args.review_command](args)
        elif args.command == "serve-openai":
            from sftops.tracking.openai_server import serve

            serve(args.model, args.host, args.port, args.served_model_name)
        elif args.command in ("where", "run"):
            cfg = isolate_outputs(load_config(args.params, args.overrides), args.overrides)
            if args.command == "run":
                from sftops.pipeline import run_all

                _print("results", run_all(cfg))
            _where(cfg)
        else:
            _print(args.command, stage(args.command, args.params, args.overrides))
    except SftopsError as exc:
        return _fail(str(exc), USER_ERROR_EXIT)
    except TransientError as exc:
        return _fail(f"{exc}; try again later", TRANSIENT_EXIT)
    except OSError as exc:
        from sftops.outputs import no_space

        if not no_space(exc):
            raise
        return _fail(
            f"out of disk space ({exc}); free some, or point paths.* at a larger disk, and run again", USER_ERROR_EXIT
        )
    except Exception as exc:
        from sftops.redact import redact
        from sftops.tracking.store import refused, unreachable

        if refused(exc):
            user = os.environ.get("MLFLOW_TRACKING_USERNAME", "(no user)")
            return _fail(
                f"the MLflow tracking server refused a request of user {user} "
                f"({redact(str(exc)).splitlines()[0][:300]}): ask an admin for the permission it needs "
                "(docs/review.md#who-may-decide)",
                USER_ERROR_EXIT,
            )
        if not unreachable(exc):
            raise
        return _fail(
            f"the MLflow tracking server or store did not answer ({redact(str(exc)).splitlines()[0][:300]}); "
            "start it (or fix MLFLOW_TRACKING_URI) and run again",
            TRANSIENT_EXIT,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
