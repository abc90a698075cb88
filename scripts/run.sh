#!/usr/bin/env bash
# Quick-start command 1: install what is missing and start the whole product with demo data.
# Ctrl-C stops the API, the worker, Redis and PostgreSQL.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ensure_system_packages
ensure_venv
export PATH="$VENV/bin:$PATH"
cd "$REPO_ROOT"

PG_PORT="${CC_PG_PORT:-55432}"
REDIS_PORT="${CC_REDIS_PORT:-56379}"
API_PORT="${CC_PORT:-8000}"
STATE="$(state_dir_for dev)"
pids=()
started_db=0
if [ -z "${DATABASE_URL:-}" ]; then
  start_postgres "$STATE" "$PG_PORT" contactcenter
  export DATABASE_URL="postgresql+asyncpg://cc_app:cc_app@127.0.0.1:$PG_PORT/contactcenter"
  export DATABASE_OWNER_URL="postgresql+asyncpg://cc_owner:cc_owner@127.0.0.1:$PG_PORT/contactcenter"
  started_db=1
fi
if [ -z "${REDIS_URL:-}" ]; then
  start_redis "$STATE/redis" "$REDIS_PORT"
  export REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
fi
export CC_LOG_JSON="${CC_LOG_JSON:-0}"
# Prompts, recordings and voicemail of the demo live beside its databases (CC_MEDIA_STORAGE=s3 for a bucket).
export CC_MEDIA_LOCAL_ROOT="${CC_MEDIA_LOCAL_ROOT:-$STATE/media}"
export CC_SWITCH_MEDIA_BASE_URL="${CC_SWITCH_MEDIA_BASE_URL:-http://127.0.0.1:$API_PORT}"

stop_all() {
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "$started_db" = 1 ]; then stop_redis "$REDIS_PORT"; stop_postgres "$STATE"; fi
  log "stopped"
}
trap stop_all EXIT INT TERM

log "migrating the database"
contactcenter migrate >/dev/null
log "creating demo data"
demo_lines="$(contactcenter demo 2>/dev/null)"

contactcenter worker >"$STATE/worker.log" 2>&1 &
pids+=($!)
# The switch simulator stands in for a FreeSWITCH node (ESL 8021, control API 8099); CC_SIM_* settings apply.
export CC_SIM_RECORDINGS="${CC_SIM_RECORDINGS:-$STATE/recordings}"
export CC_SIM_CDR_ERR_LOG_DIR="${CC_SIM_CDR_ERR_LOG_DIR:-$STATE/json_cdr_err}"
# mod_http_cache's profile header: the node fetches prompts and uploads recordings with the switch secret.
export CC_SIM_HTTP_CACHE_HEADERS="${CC_SIM_HTTP_CACHE_HEADERS:-x-switch-secret: ${CC_SWITCH_SECRET:-dev-switch-secret}}"
contactcenter switch-sim >"$STATE/switch-sim.log" 2>&1 &
pids+=($!)
# Call control: where the dialplan's `socket` sends each call (CC_CALL_CONTROL_ADDRESS, 127.0.0.1:8084).
# More processes may listen on the same address (SO_REUSEPORT); one that dies has its calls taken over.
contactcenter call-control >"$STATE/call-control.log" 2>&1 &
pids+=($!)
contactcenter serve --host 127.0.0.1 --port "$API_PORT" --workers "${CC_WORKERS:-2}" &
pids+=($!)

for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$API_PORT/readyz" >/dev/null 2>&1 && break
  sleep 0.2
done

cat <<INFO

  Contact center is running.

  API           http://127.0.0.1:$API_PORT/api/v1
  API reference http://127.0.0.1:$API_PORT/schema  (Swagger UI: /schema/swagger)
  Health        http://127.0.0.1:$API_PORT/healthz   /readyz   /metrics
  Worker log    $STATE/worker.log
  Call control  127.0.0.1:8084 (the dialplan's socket target), log $STATE/call-control.log
  Switch sim    ESL 127.0.0.1:${CC_SIM_ESL_PORT:-8021} (password ${CC_SIM_ESL_PASSWORD:-ClueCon}),
                control http://127.0.0.1:${CC_SIM_CONTROL_PORT:-8099}/state, log $STATE/switch-sim.log

  Demo logins (POST /api/v1/auth/login with {"workspace", "email", "password"}):
$(printf '%s\n' "$demo_lines" | sed 's/^/    /')

  Try:  curl -s http://127.0.0.1:$API_PORT/api/v1/auth/login -H 'content-type: application/json' \\
          -d '{"workspace":"acme","email":"owner@acme.test","password":"Demo-Contact-Center-2026"}'

  Ctrl-C stops everything.
INFO
wait "${pids[@]}"
