# syntax=docker/dockerfile:1
# The serving image: `reprotune serve` (Ray Serve + ONNX Runtime) with the exported model.
#   make demo                                  # or `dvc repro`: writes models/model.onnx + model_card.json
#   docker build -t reprotune-serve:0.1.0 .
#   docker run --init --shm-size=1g --stop-timeout=45 -p 8000:8000 reprotune-serve:0.1.0
# --init reaps Ray's orphaned processes; --shm-size gives Ray's object store /dev/shm (Docker's default is 64 MB);
# --stop-timeout leaves the 30 s drain time to finish before SIGKILL (Docker's default is 10 s).
# Under `docker run --cpus=N`, the replicas' threads follow the container's quota (Ray's CPU count).
# KubeRay (deploy/rayservice.yaml) runs this same image with its own `ray start` command instead.
FROM python:3.11.14-slim-trixie

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0

# Serving runs ONNX Runtime, never torch: the package's full dependencies (torch, torchvision, dvc, ...) would add
# gigabytes. So only what `reprotune serve` and its Ray replicas import goes in, at the versions in constraints.txt,
# and then reprotune itself with --no-deps.
RUN --mount=type=bind,source=constraints.txt,target=/tmp/constraints.txt \
    pip install --no-cache-dir -c /tmp/constraints.txt numpy pillow onnxruntime "ray[serve]" fastapi starlette typer
# rw: the build writes into the source tree, and the mount discards it (no source copy left in the image).
RUN --mount=type=bind,target=/tmp/reprotune,rw \
    pip install --no-cache-dir --no-deps /tmp/reprotune

# A numeric user, so Kubernetes' runAsNonRoot can check it; KubeRay's images use uid 1000 too.
RUN useradd --create-home --uid 1000 --user-group reprotune

# The model, owned by root and read-only to the server. To serve another export without rebuilding, mount its
# folder over this one: docker run -v "$PWD/models:/models:ro" ... (model.onnx and model_card.json side by side).
COPY models/model.onnx models/model_card.json /models/

USER 1000:1000
WORKDIR /home/reprotune

# 8000: the Open Inference Protocol. 8080: Prometheus metrics (a server bound to 0.0.0.0 is meant to be reached,
# so its Ray node listens on the container's network address too; `reprotune.inference.cluster`).
EXPOSE 8000 8080

# Ready once a replica has loaded the model (slim has no curl; the image's python does the request).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4)"]

# Arguments after the image name are appended (--replicas 2, --threads 4, ...); SIGTERM drains, then exits 0.
ENTRYPOINT ["reprotune", "serve", "--host", "0.0.0.0", "--port", "8000", "--model", "/models/model.onnx"]
