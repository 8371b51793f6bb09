"""Run one pipeline stage, as `sftops <stage>` does, and print what it read: the params keys (every field of the
typed config read through attribute access, or a whole section dumped), the project modules it imported, and the
files in the project folder it opened (Python's audit hook sees every open()).
test_dvc_declarations.py compares them with the stage's entry in dvc.yaml.

    python tests/stage_reads.py <stage> [params.yaml]      # prints one JSON object

Whole-config dumps (Config.flat() and Config.model_dump(), which the train stage logs as the MLflow run's params
and reproducibility manifest) are records of the run, not inputs of its outputs, and are not counted. paths.* is
not counted either: dvc.yaml names those files itself (${paths.*} in deps and outs)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel

import sftops.cli  # noqa: F401 - what `sftops <stage>` imports before the stage
from sftops import config as config_module
from sftops.config import load_config
from sftops.pipeline import stage_function

READ: set[str] = set()
OPENED: set[str] = set()
PLACES: dict[int, str] = {}  # id(config section) -> its dotted key


def _index(model: BaseModel, prefix: str) -> None:
    PLACES[id(model)] = prefix
    for name in type(model).model_fields:
        value = model.__dict__[name]
        if isinstance(value, BaseModel):
            _index(value, f"{prefix}{name}.")


def _recording_getattribute(self, name):
    value = object.__getattribute__(self, name)
    place = PLACES.get(id(self))
    if place is not None and name in type(self).model_fields and not isinstance(value, BaseModel):
        READ.add(f"{place}{name}")
    return value


def _recording_dump(original):
    def dump(self, *args, **kwargs):
        place = PLACES.get(id(self))
        if place:  # a section, not the whole config
            READ.add(place.rstrip("."))
        return original(self, *args, **kwargs)

    return dump


def _record_open(event: str, args: tuple) -> None:
    if event == "open" and isinstance(args[0], (str, Path)):
        path = Path(args[0]).resolve()
        if path.is_relative_to(Path.cwd()):
            OPENED.add(path.relative_to(Path.cwd()).as_posix())


def main() -> None:
    stage, params = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "params.yaml"
    cfg = load_config(params)
    _index(cfg, "")
    sections = [
        c
        for c in vars(config_module).values()
        if isinstance(c, type) and issubclass(c, BaseModel) and c is not BaseModel
    ]
    for cls in sections:
        cls.__getattribute__ = _recording_getattribute
        cls.model_dump = _recording_dump(cls.model_dump)
    sys.addaudithook(_record_open)
    stage_function(stage)(cfg)
    src = Path(config_module.__file__).resolve().parents[1]
    modules = sorted(
        Path(m.__file__).resolve().relative_to(src.parent).as_posix()
        for name, m in list(sys.modules.items())
        if (name == "sftops" or name.startswith("sftops.")) and getattr(m, "__file__", None)
    )
    keys = sorted(k for k in READ if not k.startswith("paths."))
    # A path relative to a directory descriptor (os.open(name, dir_fd=...), as MLflow's artifact store does) is not
    # relative to the working folder: only paths that are there count.
    opened = sorted(p for p in OPENED if Path(p).exists())
    print(json.dumps({"params": keys, "modules": modules, "opened": opened}))


if __name__ == "__main__":
    main()
