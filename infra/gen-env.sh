#!/usr/bin/env bash
# Writes infra/.env for the compose stack: infra/.env.example with a fresh random value for every secret.
# Refuses to overwrite an existing file (the secrets in it are already baked into the database and the object
# store; replacing them would lock the services out of their own data).
#
#   infra/gen-env.sh            # writes infra/.env
#   infra/gen-env.sh PATH       # writes PATH instead
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
template="$here/.env.example"
target="${1:-$here/.env}"

if [[ -e "$target" ]]; then
  echo "$target already exists; not overwriting it. Delete it first to start over (only with a fresh stack:" >&2
  echo "docker compose -f infra/compose.yaml down -v removes the volumes that hold data keyed to these secrets)." >&2
  exit 1
fi

secret() {  # 24 random bytes as hex: URL-safe, no quoting needed anywhere
  if command -v openssl >/dev/null 2>&1; then
    openssl rand -hex 24
  else
    python3 -c 'import secrets; print(secrets.token_hex(24))'
  fi
}

declare -A values=(
  [POSTGRES_PASSWORD]="$(secret)"
  [MLFLOW_DB_PASSWORD]="$(secret)"
  [PREFECT_DB_PASSWORD]="$(secret)"
  [MINIO_ROOT_PASSWORD]="$(secret)"
  [MLFLOW_TRACKING_PASSWORD]="$(secret)"
  [MLFLOW_FLASK_SERVER_SECRET_KEY]="$(secret)"
  [PREFECT_AUTH_STRING]="admin:$(secret)"
  [VISIONFLOW_SERVE_TOKEN]="$(secret)"
)
if git -C "$here/.." rev-parse HEAD >/dev/null 2>&1; then
  values[VISIONFLOW_GIT_COMMIT]="$(git -C "$here/.." rev-parse HEAD)"
fi

umask 077  # the file holds secrets: owner read/write only
tmp="$(mktemp "$target.XXXXXX")"
trap 'rm -f "$tmp"' EXIT
while IFS= read -r line || [[ -n "$line" ]]; do
  key="${line%%=*}"
  if [[ "$line" != \#* && "$line" == *=* && -n "${values[$key]+set}" ]]; then
    printf '%s=%s\n' "$key" "${values[$key]}"
  else
    printf '%s\n' "$line"
  fi
done < "$template" > "$tmp"

# every secret line of the template must have received a value
if grep -Eq '^(POSTGRES_PASSWORD|MLFLOW_DB_PASSWORD|PREFECT_DB_PASSWORD|MINIO_ROOT_PASSWORD|MLFLOW_TRACKING_PASSWORD|MLFLOW_FLASK_SERVER_SECRET_KEY|PREFECT_AUTH_STRING|VISIONFLOW_SERVE_TOKEN)=$' "$tmp"; then
  echo "internal error: a secret was left empty in $tmp" >&2
  exit 1
fi
mv "$tmp" "$target"
trap - EXIT
echo "wrote $target (mode 600). MLflow login: admin / MLFLOW_TRACKING_PASSWORD; Prefect UI: PREFECT_AUTH_STRING."
