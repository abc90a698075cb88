#!/usr/bin/env bash
# Runs the call-control benchmark end to end on private PostgreSQL and Redis instances (55562, 56509).
# Usage: bash benchmarks/run_call_control.sh [--mode steady|ramp|both] [--rate 30] [--seconds 90] [--talk 28]
#        [--controls 1 2] [--control-cpu 0.3] [--ramp 10 20 30 45 60 80 100] [--ramp-seconds 30] [--nodes 2] [--tenants 4] [--agents 250]
# Quick check: bash benchmarks/run_call_control.sh --mode steady --seconds 20 --talk 10 --controls 1
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
ensure_system_packages
ensure_venv
export PATH="$VENV/bin:$PATH"
cd "$REPO_ROOT"

PG_PORT="${CC_BENCH_PG_PORT:-55562}"
REDIS_PORT="${CC_BENCH_REDIS_PORT:-56509}"
STATE="$(state_dir_for bench-call-control)"
start_postgres "$STATE" "$PG_PORT" contactcenter_bench
# Every run starts from an empty database: no nodes, tenants or calls of an earlier run.
psql_super "$STATE/run" "$PG_PORT" postgres -c "DROP DATABASE IF EXISTS contactcenter_bench WITH (FORCE)" >/dev/null
ensure_database "$STATE/run" "$PG_PORT" contactcenter_bench
start_redis "$STATE/redis" "$REDIS_PORT"
trap 'stop_redis "$REDIS_PORT"; stop_postgres "$STATE"' EXIT
# Nothing of an earlier run (call records and their leases, routing state) may be adopted by this one.
[ "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" flushall)" = "OK" ] || { log "Redis was not emptied"; exit 1; }
export DATABASE_URL="postgresql+asyncpg://cc_app:cc_app@127.0.0.1:$PG_PORT/contactcenter_bench"
export DATABASE_OWNER_URL="postgresql+asyncpg://cc_owner:cc_owner@127.0.0.1:$PG_PORT/contactcenter_bench"
export REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
export CC_LOG_LEVEL="${CC_LOG_LEVEL:-WARNING}"
# CDRs and interactions are counted as the superuser (across the benchmark's tenants).
export CC_BENCH_SUPERUSER_DSN="postgresql://postgres@/contactcenter_bench?host=$STATE/run&port=$PG_PORT"
export CC_BENCH_LOGS="$STATE/logs"
# Their CPU is counted too (the database's backends are the postmaster's children).
export CC_BENCH_PG_PIDFILE="$STATE/pgdata/postmaster.pid"
export CC_BENCH_REDIS_PIDFILE="$STATE/redis/redis.pid"
contactcenter migrate >/dev/null
python benchmarks/call_control.py "$@"
