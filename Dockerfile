# GPU training image. PyPI's torch wheels for Linux x86_64 bundle their CUDA runtime, so a slim Python base
# only needs the host's NVIDIA driver (run with --gpus all). Dependencies come from pyproject.toml's pins.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_DISABLE_TELEMETRY=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends git=1:2.* make=4.* \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 sft
WORKDIR /home/sft/app

COPY --chown=sft:sft pyproject.toml requirements-nodeps.txt README.md ./
COPY --chown=sft:sft src ./src
RUN pip install . && pip install --no-deps -r requirements-nodeps.txt

COPY --chown=sft:sft . .
USER sft

# Runs the whole pipeline by default; `docker run IMAGE train --set train.max_steps=100` runs one stage.
ENTRYPOINT ["sftops"]
CMD ["run"]
