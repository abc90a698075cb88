#!/usr/bin/env bash
# The customer store's benchmark end to end: private PostgreSQL and Redis, 1,000,000 customers in one tenant and
# 100,000 in each of nine others, screen pop at a steady rate, then a bulk import in a worker process.
# Usage: bash benchmarks/run_customers.sh [--rate 300] [--seconds 60] [--import-rows 200000] [--big 1000000] [--small 100000]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
ensure_system_packages
ensure_venv
export PATH="$VENV/bin:$PATH"
cd "$REPO_ROOT"

PG_PORT="${CC_BENCH_PG_PORT:-55482}"
REDIS_PORT="${CC_BENCH_REDIS_PORT:-56429}"
STATE="$(state_dir_for bench-customers)"
start_postgres "$STATE" "$PG_PORT" contactcenter_bench
start_redis "$STATE/redis" "$REDIS_PORT"
trap 'stop_redis "$REDIS_PORT"; stop_postgres "$STATE"' EXIT
export DATABASE_URL="postgresql+asyncpg://cc_app:cc_app@127.0.0.1:$PG_PORT/contactcenter_bench"
export DATABASE_OWNER_URL="postgresql+asyncpg://cc_owner:cc_owner@127.0.0.1:$PG_PORT/contactcenter_bench"
export REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
export CC_BENCH_STATE="$STATE"
contactcenter migrate >/dev/null
python benchmarks/customers.py "$@"
