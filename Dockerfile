# syntax=docker/dockerfile:1
# tta-serve image, installed by uv from the committed uv.lock.
#
#   docker build --target cpu  -t tta-serve:0.1.0-cpu .     # the default target
#   docker build --target cuda -t tta-serve:0.1.0-cuda .
#
# Both targets hold the same locked environment: the lock resolves torch 2.14.1 from PyPI, whose
# Linux wheel is the CUDA 13.0 build and imports its CUDA libraries (the nvidia-* wheels) even on
# a CPU (without them `import torch` fails: libcudnn.so.9 not found). A slimmer CPU-only torch
# would need another lock. The targets differ in the device and in what the NVIDIA container
# toolkit injects (the driver: 580 or newer for CUDA 13.0).
#
# Base images are pinned by exact version tag, not digest: no registry was reachable when this
# was written, so no digest could be verified. Python 3.11.7 and uv 0.13.9 are the versions the
# tests ran with (tests/deploy/test_containers.py runs this file's commands on the host).
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9

FROM ${UV_IMAGE} AS uv

# --- build: the virtual environment, from the lock only -----------------------------------------
FROM ${PYTHON_IMAGE} AS build
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/opt/venv
WORKDIR /app
# The dependencies first: this layer is rebuilt only when the lock changes.
COPY pyproject.toml uv.lock README.md ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-install-project
COPY adapters adapters
COPY models models
COPY service service
COPY bench bench
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev

# --- runtime: the venv and the sources, a non-root user, volumes for weights and state ----------
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 tta \
    && useradd --system --uid 10001 --gid tta --home-dir /var/lib/tta-serve --no-create-home tta \
    && mkdir -p /var/lib/tta-serve/models /var/lib/tta-serve/state \
    && chown -R tta:tta /var/lib/tta-serve
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
WORKDIR /app
# TTA_ALLOW_UNAUTHENTICATED: the container binds every interface; publish its port only to
# trusted networks, or give it API keys (TTA_API_KEYS_FILE, docs/security.md) and set it false.
# The compiled forward (TTA_ENGINE_MODE=compiled, engine/compiled.py) needs a C++ compiler at run
# time (inductor's CPU backend), which this slim image lacks: add g++ to use it.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TTA_HOST=0.0.0.0 \
    TTA_ALLOW_UNAUTHENTICATED=true \
    TTA_PORT=8000 \
    TTA_MODEL_CACHE_DIR=/var/lib/tta-serve/models \
    TTA_DATA_DIR=/var/lib/tta-serve/state
# Weights (seed this volume offline: docs/observability.md) and the local state store.
VOLUME ["/var/lib/tta-serve/models", "/var/lib/tta-serve/state"]
USER tta
EXPOSE 8000
# Readiness: 200 once the models are loaded and the streams restored (urlopen raises on 503).
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('TTA_PORT', '8000') + '/v2/health/ready', timeout=4)"]
CMD ["tta-serve"]

FROM runtime AS cuda
ENV TTA_DEVICE=cuda \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# The default target (last stage): CPU.
FROM runtime AS cpu
ENV TTA_DEVICE=cpu
