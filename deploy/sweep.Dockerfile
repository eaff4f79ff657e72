# syntax=docker/dockerfile:1
# The sweep image: reprotune's whole environment (torch, DVC, Ray) and git, for the Ray nodes of a
# `reprotune sweep` on Kubernetes (deploy/sweep-rayjob.yaml). No project, data or model inside: each
# experiment clones the project from its git remote and pulls its data from the DVC remote.
#   docker build -f deploy/sweep.Dockerfile -t REGISTRY/reprotune-sweep:0.1.0 .
# (The serving image, ./Dockerfile, is the small one: ONNX Runtime and Ray Serve, no torch.)
FROM python:3.11.14-slim-trixie

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    GIT_TERMINAL_PROMPT=0

# git clones the project and pushes the experiments. Debian's stable git moves with its security
# updates: pinning one version would make the build fail on the next one.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# reprotune with every dependency at the versions in constraints.txt (torch's Linux wheels bring CUDA),
# and DVC's S3 support for a team's bucket. The experiments run the cloned commit's own code (its src/
# first on the import path), so this install provides the dependencies; rebuild when constraints.txt changes.
RUN --mount=type=bind,target=/tmp/reprotune,rw \
    pip install --no-cache-dir -c /tmp/reprotune/constraints.txt /tmp/reprotune "dvc[s3]"

# A numeric user, so Kubernetes' runAsNonRoot can check it; KubeRay's images use uid 1000 too.
RUN useradd --create-home --uid 1000 --user-group reprotune
USER 1000:1000
WORKDIR /home/reprotune
