# syntax=docker/dockerfile:1.7
# Serving image: `visionflow serve` (FastAPI + ONNX Runtime on the registry's champion), CPU only.
# Build context: the repository root. Versions and hashes come from requirements.lock; only the entries named in
# infra/docker/serve-packages.txt are installed (no torch, no CUDA, no training stack).
#
# SERVE_DEPS=lean (default) is the small image. It requires that the serving path does not import torch;
# the build checks exactly that import path and stops with a message if it does. SERVE_DEPS=full installs the
# whole lock instead (the training stack, about 5.5 GB) for a source tree whose serving path still needs torch.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG SERVE_DEPS=lean
ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_PYTHON_DOWNLOADS=never UV_LINK_MODE=copy
RUN python -m pip install uv==0.13.9
WORKDIR /src
COPY requirements.lock infra/docker/serve-packages.txt ./
# Keep the lock entries (name==version line plus its --hash lines) whose name is in serve-packages.txt.
RUN awk 'NR==FNR { if ($0 !~ /^#/) want[$1]=1; next } \
         /^[A-Za-z0-9]/ { n=tolower($1); sub(/==.*/, "", n); gsub(/[_.]+/, "-", n); keep=(n in want) } \
         keep && !/^ *#/' serve-packages.txt requirements.lock > serve.lock \
 && uv venv /opt/venv \
 && if [ "$SERVE_DEPS" = full ]; then \
      uv pip sync --python /opt/venv/bin/python requirements.lock; \
    else \
      uv pip install --python /opt/venv/bin/python --require-hashes --no-deps -r serve.lock; \
    fi
# visionflow itself, as a wheel built with the lock's hatchling (no build isolation, nothing unpinned fetched)
RUN printf '%s\n' hatchling pathspec pluggy trove-classifiers packaging > build-packages.txt \
 && awk 'NR==FNR { want[$1]=1; next } \
         /^[A-Za-z0-9]/ { n=tolower($1); sub(/==.*/, "", n); gsub(/[_.]+/, "-", n); keep=(n in want) } \
         keep && !/^ *#/' build-packages.txt requirements.lock > build.lock \
 && uv venv /opt/build \
 && uv pip install --python /opt/build/bin/python --require-hashes --no-deps -r build.lock
COPY pyproject.toml README.md ./
COPY src ./src
COPY flows ./flows
RUN uv build --wheel --no-build-isolation --python /opt/build/bin/python --out-dir /wheels . \
 && uv pip install --python /opt/venv/bin/python --no-deps /wheels/*.whl
# Fail the build, not the first request: import what serving imports, including the lazy imports that run on
# the first model load (onnxrt.ort_session) and the first prediction (imageio.decode_with_properties).
RUN /opt/venv/bin/python -c "import visionflow.cli, visionflow.serve, visionflow.tracking, visionflow.registry, visionflow.imageio; from visionflow.onnxrt import ort_session; from visionflow.imageio import decode_with_properties" \
 || { echo >&2 "visionflow's serving path imports a package that is not in the serving image (see above)."; \
      echo >&2 "Build with --build-arg SERVE_DEPS=full, or keep torch out of the serving imports."; exit 1; }

FROM ${PYTHON_IMAGE}
ARG VISIONFLOW_GIT_COMMIT=unknown
LABEL org.opencontainers.image.title="visionflow-serve" \
      org.opencontainers.image.revision="${VISIONFLOW_GIT_COMMIT}"
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    VISIONFLOW_GIT_COMMIT=${VISIONFLOW_GIT_COMMIT} \
    DO_NOT_TRACK=1
COPY --from=build /opt/venv /opt/venv
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin visionflow \
 && mkdir -p /app/data && chown -R visionflow /app
WORKDIR /app
# params.yaml is the configuration `visionflow serve` reads (serve.*, registry.*); mount another over it to change it
COPY --chown=visionflow params.yaml ./
USER visionflow
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=5 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
CMD ["visionflow", "serve", "--host", "0.0.0.0", "--port", "8000"]
