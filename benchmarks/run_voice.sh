#!/usr/bin/env bash
# Runs the voice benchmark end to end on private PostgreSQL and Redis instances (55502, 56449).
# Usage: bash benchmarks/run_voice.sh [parse ingest directory chaos] [--ingest-rate 5000] [--directory-rate 500]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
ensure_system_packages
ensure_venv
export PATH="$VENV/bin:$PATH"
cd "$REPO_ROOT"

PG_PORT=55502
REDIS_PORT=56449
STATE="$(state_dir_for bench-voice)"
start_postgres "$STATE" "$PG_PORT" contactcenter_bench
start_redis "$STATE/redis" "$REDIS_PORT"
trap 'stop_redis "$REDIS_PORT"; stop_postgres "$STATE"' EXIT
export DATABASE_URL="postgresql+asyncpg://cc_app:cc_app@127.0.0.1:$PG_PORT/contactcenter_bench"
export DATABASE_OWNER_URL="postgresql+asyncpg://cc_owner:cc_owner@127.0.0.1:$PG_PORT/contactcenter_bench"
export REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
export CC_LOG_LEVEL="${CC_LOG_LEVEL:-WARNING}"
# The chaos part counts rows as the superuser and stops and starts this PostgreSQL itself.
export CC_BENCH_SUPERUSER_DSN="postgresql://postgres@/contactcenter_bench?host=$STATE/run&port=$PG_PORT"
export CC_BENCH_PG_CTL="runuser -u postgres -- env -C / $PG_VERSION_DIR/pg_ctl -D $STATE/pgdata"
export CC_BENCH_PG_LOG="$STATE/postgres.log"
contactcenter migrate >/dev/null
python benchmarks/voice.py "$@"
