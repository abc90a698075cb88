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
# Voice: the switch simulator stands in for a FreeSWITCH node, configured the way the README says for a
# real one: xml_curl directory and dialplan bindings and mod_json_cdr pointed at the API with the node's
# name and the shared secret, HEARTBEAT every 2 s, CDRs it gives up on left where the worker imports them.
export CC_SWITCH_SECRET="${CC_SWITCH_SECRET:-dev-switch-secret}"
export CC_SIM_HOSTNAME="${CC_SIM_HOSTNAME:-fs-sim-1}"
export CC_SIM_ESL_PORT="${CC_SIM_ESL_PORT:-8021}"
export CC_SIM_CONTROL_PORT="${CC_SIM_CONTROL_PORT:-8099}"
export CC_SIM_XML_CURL_DIRECTORY_URL="http://127.0.0.1:$API_PORT/api/v1/switch/directory"
export CC_SIM_XML_CURL_DIALPLAN_URL="http://127.0.0.1:$API_PORT/api/v1/switch/dialplan"
export CC_SIM_XML_CURL_CREDENTIALS="$CC_SIM_HOSTNAME:$CC_SWITCH_SECRET"
export CC_SIM_CDR_URL="http://127.0.0.1:$API_PORT/api/v1/switch/cdr"
export CC_SIM_CDR_CREDENTIALS="$CC_SIM_HOSTNAME:$CC_SWITCH_SECRET"
export CC_SIM_HEARTBEAT="${CC_SIM_HEARTBEAT:-2}"
export CC_SIM_RECORDINGS="${CC_SIM_RECORDINGS:-$STATE/recordings}"
export CC_SIM_CDR_ERR_LOG_DIR="${CC_SIM_CDR_ERR_LOG_DIR:-$STATE/json_cdr_err}"
export CC_CDR_ERR_LOG_DIR="$CC_SIM_CDR_ERR_LOG_DIR"
export CC_DEMO_SEATS_FILE="$STATE/demo-phones.json"

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

# The worker runs the jobs, the switch watchdog and the nodes' inbound event sockets (it takes the
# simulator's under a Redis lease; start more workers and they share the nodes).
contactcenter worker >"$STATE/worker.log" 2>&1 &
pids+=($!)
# mod_http_cache's profile header: the node fetches prompts and uploads recordings with the switch secret.
export CC_SIM_HTTP_CACHE_HEADERS="${CC_SIM_HTTP_CACHE_HEADERS:-x-switch-secret: $CC_SWITCH_SECRET}"
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

# The agents' softphones register through the simulator: it asks our directory for each seat's digest
# credentials, then tells the worker (sofia::register), and routing marks them voice-registered.
log "registering the demo agents' phones through the switch simulator"
phones="$(python - "$CC_DEMO_SEATS_FILE" "http://127.0.0.1:$CC_SIM_CONTROL_PORT" <<'PY' || true
import json, sys, time
import httpx
seats, control = json.load(open(sys.argv[1])), sys.argv[2]
for _ in range(50):
    try:
        httpx.get(f"{control}/health", timeout=1).raise_for_status()
        break
    except httpx.HTTPError:
        time.sleep(0.2)
for seat in seats:
    body = {"user": seat["user"], "domain": seat["domain"], "transport": "wss", "answer_delay": 2}
    answer = httpx.post(f"{control}/registrations", json=body, timeout=10).json()
    state = "registered" if answer.get("registered") else "REFUSED"
    print(f"    {seat['agent']:<22} sip:{seat['user']}@{seat['domain']}  {state}")
PY
)"

cat <<INFO

  Contact center is running.

  API           http://127.0.0.1:$API_PORT/api/v1
  API reference http://127.0.0.1:$API_PORT/schema  (Swagger UI: /schema/swagger)
  Health        http://127.0.0.1:$API_PORT/healthz   /readyz   /metrics
  Worker log    $STATE/worker.log
  Call control  127.0.0.1:8084 (the dialplan's socket target), log $STATE/call-control.log
  Switch sim    node $CC_SIM_HOSTNAME: ESL 127.0.0.1:$CC_SIM_ESL_PORT (password ${CC_SIM_ESL_PASSWORD:-ClueCon}),
                control http://127.0.0.1:$CC_SIM_CONTROL_PORT/state, log $STATE/switch-sim.log

  Demo logins (POST /api/v1/auth/login with {"workspace", "email", "password"}):
$(printf '%s\n' "$demo_lines" | sed 's/^/    /')

  Phones registered through the simulator:
$phones

  Try:
    # sign in as an agent of acme: their phone registered through the simulator, so voice_registered is true
    TOKEN=\$(curl -s http://127.0.0.1:$API_PORT/api/v1/auth/login -H 'content-type: application/json' \\
      -d '{"workspace":"acme","email":"agent1@acme.test","password":"Demo-Contact-Center-2026"}' | python -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
    curl -s http://127.0.0.1:$API_PORT/api/v1/routing/me/state -H "authorization: Bearer \$TOKEN"
    curl -s -XPUT http://127.0.0.1:$API_PORT/api/v1/routing/me/state -H "authorization: Bearer \$TOKEN" \\
      -H 'content-type: application/json' -d '{"state":"available"}'      # voice_ready: true
    # a caller dials acme's number: the simulator asks our dialplan, which hands the call to call control
    curl -s -XPOST http://127.0.0.1:$CC_SIM_CONTROL_PORT/calls -H 'content-type: application/json' \\
      -d '{"destination":"+33184880100","caller_number":"+33612345678","caller_name":"Alice"}'
    # call control answers it, runs the number's IVR and queues it; the available agent's phone rings and
    #  answers after 2 s (answer_delay): GET /api/v1/voice/calls/<interaction id> shows the bridged call;
    #  the owner, owner@acme.test, reads CDRs afterwards: GET /api/v1/voice/cdrs
    # the node as operators see it: health from heartbeats, and which worker holds its event socket
    #   (sign in at /api/v1/ops/auth/login as ops@provider.test) GET /api/v1/ops/switch-nodes, .../{id}/link
    # a phone unregisters, then registers again
    curl -s -XDELETE http://127.0.0.1:$CC_SIM_CONTROL_PORT/registrations/<sip user>

  Ctrl-C stops everything.
INFO
wait "${pids[@]}"
