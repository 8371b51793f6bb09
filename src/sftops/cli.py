"""`sftops`: run a pipeline stage (as DVC does), the whole pipeline, or ask a model a question."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from sftops.config import isolate_outputs, load_config
from sftops.errors import SftopsError


def _print(title: str, value: Any) -> None:
    print(f"{title}:\n{json.dumps(value, indent=2, default=str)}")


def stage(name: str, params: str, overrides: list[str]) -> Any:
    from sftops.pipeline import STAGES

    cfg = load_config(params, overrides)
    return STAGES[name](cfg)


def _generate(args: argparse.Namespace) -> None:
    if Path(args.model).is_dir():
        from sftops.generation import answer
        from sftops.modeling import load_finetuned

        model, tokenizer = load_finetuned(Path(args.model))
        replies = answer(model, tokenizer, args.prompt, args.max_new_tokens)
    else:  # runs:/<id>/model, models:/<name>/<version>, models:/<name>@<alias>
        import mlflow

        from sftops.tracking import tracking_uri

        mlflow.set_tracking_uri(args.tracking_uri or tracking_uri())
        replies = mlflow.pyfunc.load_model(args.model).predict(args.prompt, params={"max_new_tokens": args.max_new_tokens})
    for prompt, reply in zip(args.prompt, replies):
        print(f"> {prompt}\n{reply}\n")


def _where(cfg: Any) -> None:
    from sftops.pipeline import where

    metrics = Path(cfg.paths.metrics)
    if metrics.exists():
        m = json.loads(metrics.read_text())
        print(f"held-out response NLL: base {m['base']['nll']:.3f} -> tuned {m['tuned']['nll']:.3f} nats/token "
              f"({m['test_rows']} test rows)")
    for what, place in where(cfg).items():
        print(f"{what:>13}: {place}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sftops", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("ingest", "read the sources into data/raw"),
        ("format", "map, de-duplicate and split into data/curated"),
        ("train", "fine-tune the base model, save and register it"),
        ("evaluate", "compare base and fine-tuned model on the test split"),
        ("run", "all four stages in order (with --set: under runs/<digest>/, leaving DVC's outputs alone)"),
        ("where", "print where the results of the last run are"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a parameter, e.g. --set train.learning_rate=1e-4 (repeatable)")
    gen = sub.add_parser("generate", help="answer prompts with a fine-tuned model")
    gen.add_argument("--model", required=True, help="a model folder (models/model), runs:/ID/model or models:/NAME@ALIAS")
    gen.add_argument("--prompt", action="append", required=True, help="a question (repeatable)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            _generate(args)
        elif args.command in ("where", "run"):
            cfg = isolate_outputs(load_config(args.params, args.overrides), args.overrides)
            if args.command == "run":
                from sftops.pipeline import run_all

                _print("results", run_all(cfg))
            _where(cfg)
        else:
            _print(args.command, stage(args.command, args.params, args.overrides))
    except SftopsError as exc:
        print(f"sftops: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
