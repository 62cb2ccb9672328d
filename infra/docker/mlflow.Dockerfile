# syntax=docker/dockerfile:1.7
# MLflow tracking server (UI, REST API, model registry, proxied artifacts) with basic auth.
# Build context: the repository root (infra/compose.yaml sets it), so the versions come from requirements.lock:
# the four packages below are installed with the lock as a constraint, which pins every transitive dependency
# to the tested version and checks its hash.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_NO_CACHE=1 UV_PYTHON_DOWNLOADS=never \
    VIRTUAL_ENV=/opt/mlflow PATH=/opt/mlflow/bin:$PATH

COPY requirements.lock /tmp/requirements.lock
RUN python -m pip install uv==0.13.9 \
 && uv venv /opt/mlflow \
 && uv pip install --python /opt/mlflow/bin/python --constraint /tmp/requirements.lock \
      mlflow==3.17.2 psycopg2-binary boto3 Flask-WTF \
 && python -m pip uninstall -y uv \
 && rm /tmp/requirements.lock

COPY infra/mlflow/basic_auth.ini /etc/mlflow/basic_auth.ini
COPY --chmod=0755 infra/mlflow/entrypoint.sh /usr/local/bin/mlflow-entrypoint

RUN useradd --uid 10002 --create-home --shell /usr/sbin/nologin mlflow \
 && mkdir -p /run/mlflow && chown mlflow /run/mlflow
USER mlflow
WORKDIR /home/mlflow

EXPOSE 5000
ENTRYPOINT ["mlflow-entrypoint"]
