#!/usr/bin/env bash
# Stage the wheels bench/bench_gpu_vs_trl.py needs on the lent GPU machine, which has torch, transformers, peft
# and accelerate but not TRL or datasets, and no network. Run in the repository root; the folder .whl is
# git-ignored (.gitignore) and travels with the run as a carried path. On the device:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
# The versions are the project's pins (pyproject.toml: trl, datasets) and what datasets 5.2 needs beyond the
# device image (dill, multiprocess; pyarrow>=24, which the image may lack: about 50 MB, under the 64 MiB carry),
# and pydantic, which sftops.config needs and the image lacks.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
rm -rf .whl && mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" -d .whl \
    trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pyarrow==25.0.1 \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
ls -la .whl
du -sh .whl
