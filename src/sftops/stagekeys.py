"""What a stage's result is made from, hashed: the deps (code and data) and params sections that `dvc.yaml`
declares for the stage, so that a cache outside DVC (the Prefect flow's) agrees with `dvc status` about what
must re-run. Changing `train.*` changes train's key (and evaluate's, through the new model it depends on),
never those of ingest and format.

A key says the inputs are unchanged; a stamp next to the base-eval cache says the outputs made from them are
still in place (a deleted or re-written output must not be skipped over)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import yaml

import sftops
from sftops.config import Config
from sftops.evalcache import cache_root
from sftops.fingerprints import json_sha256, text_sha256
from sftops.jsonio import write_json
from sftops.manifest import dvc_md5

STAGE_FILE = "dvc.yaml"
_PATH_VARIABLE = re.compile(r"\$\{paths\.(\w+)\}")
# Bytecode appears when the code is imported; it is not the code version.
_SKIP = ("__pycache__",)


def stage_spec(stage: str, cfg: Config, root: str | Path = ".") -> dict[str, list[str]] | None:
    """The stage's deps, params and outs from dvc.yaml with ${paths.*} filled from this config (so an experiment
    under runs/<digest>/ hashes its own data); None when there is no dvc.yaml or no such stage."""
    file = Path(root) / STAGE_FILE
    if not file.exists():
        return None
    entry = (yaml.safe_load(file.read_text()) or {}).get("stages", {}).get(stage)
    if entry is None:
        return None
    paths = cfg.paths.model_dump()

    def fill(item: str) -> str:
        return _PATH_VARIABLE.sub(lambda m: paths[m.group(1)], item)

    outs = [fill(o if isinstance(o, str) else next(iter(o))) for o in entry.get("outs", []) + entry.get("metrics", [])]
    return {"deps": [fill(d) for d in entry.get("deps", [])], "params": list(entry.get("params", [])), "outs": outs}


def dep_hash(path: Path, root: Path) -> str | None:
    """DVC's hash of a dep (md5 of a file; the '.dir' hash of a folder); code under src/sftops/ that is not in
    the working folder is hashed where the installed package is. None: the dep does not exist."""
    place = root / path
    if not place.exists() and path.parts[:2] == ("src", "sftops"):
        place = Path(sftops.__file__).parent.joinpath(*path.parts[2:])
    if place.is_dir():
        return dvc_md5(place, skip=_SKIP)
    if place.is_file():
        return hashlib.md5(place.read_bytes()).hexdigest()
    return None


def param_value(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def stage_inputs(stage: str, cfg: Config, root: str | Path = ".") -> dict[str, Any] | None:
    """Everything the stage's result depends on, as DVC sees it: params values by key and deps hashes by path.
    The ingest stage also depends on its local source files where they lie outside data/sources."""
    root = Path(root)
    spec = stage_spec(stage, cfg, root)
    if spec is None:
        return None
    deps = list(spec["deps"])
    if stage == "ingest":
        deps += [s.path for s in cfg.data.sources if s.path and not s.package and not s.hub and (root / s.path).exists()]
    tree = cfg.model_dump(mode="json")
    return {
        "stage": stage,
        "params": {key: param_value(tree, key) for key in spec["params"]},
        "deps": {d: dep_hash(Path(d), root) for d in sorted(set(deps))},
        "outs": spec["outs"],
    }


def stage_key(stage: str, cfg: Config, root: str | Path = ".") -> str | None:
    """The cache key of a stage run; None (do not cache) without a dvc.yaml entry for the stage."""
    inputs = stage_inputs(stage, cfg, root)
    return None if inputs is None else json_sha256(inputs)


def outputs_state(stage: str, cfg: Config, root: str | Path = ".") -> str | None:
    """A cheap fingerprint of the stage's outputs as they are now (file paths, sizes, modification times);
    None when one is missing."""
    spec = stage_spec(stage, cfg, root) or {"outs": []}
    listing = []
    for out in spec["outs"]:
        place = Path(root) / out
        if not place.exists():
            return None
        files = [place] if place.is_file() else sorted(p for p in place.rglob("*") if p.is_file())
        listing += [(p.as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return json_sha256(listing)


def _stamp(stage: str, cfg: Config) -> Path:
    outs = json.dumps([stage, cfg.paths.model_dump()], sort_keys=True)
    return cache_root() / "stages" / f"{text_sha256(outs)[:16]}.json"


def record_outputs(stage: str, cfg: Config, key: str, root: str | Path = ".") -> None:
    """After the stage ran (or was skipped as fresh): these outputs are what the inputs with this key made."""
    write_json(_stamp(stage, cfg), {"stage": stage, "key": key, "outputs": outputs_state(stage, cfg, root)})


def outputs_fresh(stage: str, cfg: Config, key: str | None, root: str | Path = ".") -> bool:
    """Whether the outputs on disk are the ones the inputs with this key made, untouched since."""
    stamp = _stamp(stage, cfg)
    if key is None or not stamp.exists():
        return False
    recorded = json.loads(stamp.read_text())
    current = outputs_state(stage, cfg, root)
    return recorded.get("key") == key and current is not None and recorded.get("outputs") == current
