#!/bin/sh
# Renders MLflow's basic-auth config from the environment, then starts the tracking server.
# The auth store is the Postgres database mlflow_auth (same server and role as the tracking store), so users and
# permissions survive container rebuilds and are backed up with the rest of the database.
set -eu

: "${MLFLOW_DB_PASSWORD:?MLFLOW_DB_PASSWORD is not set}"
: "${MLFLOW_AUTH_ADMIN_USERNAME:?MLFLOW_AUTH_ADMIN_USERNAME is not set}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?MLFLOW_AUTH_ADMIN_PASSWORD is not set}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?MLFLOW_FLASK_SERVER_SECRET_KEY is not set}"
: "${MLFLOW_AUTH_CONFIG_PATH:=/run/mlflow/basic_auth.ini}"
export MLFLOW_AUTH_CONFIG_PATH

DB_HOST="${MLFLOW_DB_HOST:-postgres}"
DB_USER="${MLFLOW_DB_USER:-mlflow}"
ARTIFACTS="${MLFLOW_ARTIFACTS_DESTINATION:-s3://mlflow/}"

# URL-escape the password; configparser also needs every % doubled in the ini.
PW_URL=$(python -c 'import os, urllib.parse; print(urllib.parse.quote(os.environ["MLFLOW_DB_PASSWORD"], safe=""))')
BACKEND="postgresql://${DB_USER}:${PW_URL}@${DB_HOST}:5432/mlflow"
AUTH_DB="postgresql://${DB_USER}:${PW_URL}@${DB_HOST}:5432/mlflow_auth"

umask 077
mkdir -p "$(dirname "$MLFLOW_AUTH_CONFIG_PATH")"
{
  cat "${MLFLOW_AUTH_TEMPLATE:-/etc/mlflow/basic_auth.ini}"
  printf 'database_uri = %s\n' "$(printf '%s' "$AUTH_DB" | sed 's/%/%%/g')"
} > "$MLFLOW_AUTH_CONFIG_PATH"

# The backend URI goes through the environment (mlflow reads MLFLOW_BACKEND_STORE_URI), not argv, so the
# password does not show in the process list.
MLFLOW_BACKEND_STORE_URI="$BACKEND"
export MLFLOW_BACKEND_STORE_URI
exec mlflow server \
  --host 0.0.0.0 --port 5000 \
  --artifacts-destination "$ARTIFACTS" \
  --app-name basic-auth \
  "$@"
