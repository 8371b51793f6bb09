# GPU training image. torch 2.13.0's Linux x86_64 wheels on PyPI are built for CUDA 13.0 (they depend on
# cuda-toolkit 13.0.x and nvidia-cudnn-cu13), so the base is NVIDIA's CUDA 13.0 runtime on Ubuntu 24.04; the host
# needs an NVIDIA driver for CUDA 13.0 (R580 or newer) and `docker run --gpus all`. The pins come from
# pyproject.toml and requirements-nodeps.txt, installed as `make setup` does, with the team extra (S3/GCS DVC
# remotes) instead of the dev extra.
# No secrets inside: the tracking server, the Prefect API and all credentials come from the environment at
# run time (docker run -e MLFLOW_TRACKING_URI=... -e AWS_ACCESS_KEY_ID=...).
FROM nvidia/cuda:13.0.2-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    PATH=/opt/venv/bin:$PATH

# Python 3.12 is Ubuntu 24.04's (the project needs >= 3.11); git and make for DVC and `make`.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12=3.12.* python3.12-venv=3.12.* git=1:2.* make=4.* \
    && rm -rf /var/lib/apt/lists/* \
    && python3.12 -m venv /opt/venv

# The dependency files first, so that code changes do not re-install the dependencies.
WORKDIR /opt/sftops
COPY pyproject.toml requirements-nodeps.txt README.md ./
COPY src ./src
RUN pip install --no-cache-dir "./[team]" \
    && pip install --no-cache-dir --no-deps -r requirements-nodeps.txt

# The base image's `ubuntu` user has uid 1000; the pipeline runs as its own unprivileged user, in a folder it owns
# (stages write data/, models/, reports/ there; mount a volume over it to keep them).
RUN groupadd --gid 1001 sft && useradd --create-home --uid 1001 --gid 1001 sft
WORKDIR /home/sft/app
COPY --chown=1001:1001 . .
USER 1001:1001

# No ENTRYPOINT, so that Prefect's docker and kubernetes workers can run their own command in this image.
#   docker run --gpus all IMAGE                                      the whole pipeline (sftops run)
#   docker run --gpus all IMAGE sftops train --set train.max_steps=100   one stage
#   docker run --gpus all IMAGE python flows/sft_pipeline.py         the Prefect flow
CMD ["sftops", "run"]
