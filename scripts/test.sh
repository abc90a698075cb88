#!/usr/bin/env bash
# Quick-start command 2: install what is missing, then lint, type-check and run every test.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ensure_system_packages
ensure_venv
export PATH="$VENV/bin:$PATH"
cd "$REPO_ROOT"

PG_PORT="${CC_TEST_PG_PORT:-55442}"
REDIS_PORT="${CC_TEST_REDIS_PORT:-56389}"
STATE="$(state_dir_for test)"
started_here=0
if [ -z "${DATABASE_URL:-}" ]; then
  start_postgres "$STATE" "$PG_PORT" ""
  export CC_TEST_PG_SUPERUSER_DSN="postgresql://postgres@/postgres?host=$STATE/run&port=$PG_PORT"
  export CC_TEST_PG_HOSTPORT="127.0.0.1:$PG_PORT"
  export CC_TEST_PG_RUN_DIR="$STATE/run"
  started_here=1
fi
if [ -z "${REDIS_URL:-}" ]; then
  start_redis "$STATE/redis" "$REDIS_PORT"
  export REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
  export CC_TEST_REDIS_DIR="$STATE/redis"
fi
cleanup() {
  if [ "$started_here" = 1 ] && [ -z "${CC_KEEP_SERVICES:-}" ]; then
    stop_redis "$REDIS_PORT"; stop_postgres "$STATE"
  fi
}
trap cleanup EXIT

log "ruff"
ruff check backend tests benchmarks
ruff format --check backend tests benchmarks
log "mypy"
mypy backend
log "pytest"
python -m pytest -q -p no:cacheprovider "$@"
