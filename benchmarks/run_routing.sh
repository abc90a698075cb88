#!/usr/bin/env bash
# Runs the routing benchmark end to end on private PostgreSQL and Redis instances.
# Usage: bash benchmarks/run_routing.sh [--tenants 100] [--agents 2000] [--waiting 20000] [--steady-rate 500]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
ensure_system_packages
ensure_venv
export PATH="$VENV/bin:$PATH"
cd "$REPO_ROOT"

PG_PORT=55492
REDIS_PORT=56439
STATE="$(state_dir_for bench-routing)"
start_postgres "$STATE" "$PG_PORT" contactcenter_bench
start_redis "$STATE/redis" "$REDIS_PORT"
trap 'stop_redis "$REDIS_PORT"; stop_postgres "$STATE"' EXIT
export DATABASE_URL="postgresql+asyncpg://cc_app:cc_app@127.0.0.1:$PG_PORT/contactcenter_bench"
export DATABASE_OWNER_URL="postgresql+asyncpg://cc_owner:cc_owner@127.0.0.1:$PG_PORT/contactcenter_bench"
export REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
# Seeding bypasses row-level security with COPY as the superuser (local socket only); the measured paths
# run as the application role.
export CC_BENCH_SUPERUSER_DSN="postgresql://postgres@/contactcenter_bench?host=$STATE/run&port=$PG_PORT"
contactcenter migrate >/dev/null
python benchmarks/routing.py "$@"
