#!/usr/bin/env bash
# Runs the foundation's API benchmark end to end: private PostgreSQL and Redis, the API as production
# runs it, wrk and an open-loop generator on loopback. Usage: bash benchmarks/run_api.sh [--steady-seconds 60]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
ensure_system_packages
ensure_venv
command -v wrk >/dev/null 2>&1 || { as_root apt-get install -y -qq wrk >/dev/null; }
export PATH="$VENV/bin:$PATH"
cd "$REPO_ROOT"

PG_PORT=55452
REDIS_PORT=56399
STATE="$(state_dir_for bench)"
start_postgres "$STATE" "$PG_PORT" contactcenter_bench
start_redis "$STATE/redis" "$REDIS_PORT"
trap 'stop_redis "$REDIS_PORT"; stop_postgres "$STATE"' EXIT
export DATABASE_URL="postgresql+asyncpg://cc_app:cc_app@127.0.0.1:$PG_PORT/contactcenter_bench"
export DATABASE_OWNER_URL="postgresql+asyncpg://cc_owner:cc_owner@127.0.0.1:$PG_PORT/contactcenter_bench"
export REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
contactcenter migrate >/dev/null
python benchmarks/api.py "$@"
