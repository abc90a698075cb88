#!/usr/bin/env bash
# Shared steps of the two quick-start commands: install what is missing and
# run private PostgreSQL and Redis instances on loopback.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CC_VENV:-$REPO_ROOT/.venv}"
# Found again once packages are installed; known now when PostgreSQL already is (stop_postgres needs it).
PG_VERSION_DIR="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"

log() { printf '\033[1m[contactcenter]\033[0m %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

ensure_system_packages() {
  local missing=()
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql postgresql-contrib)
  if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]} from Debian"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  PG_VERSION_DIR="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
}

ensure_venv() {
  local stamp="$VENV/.installed-$(sha1sum "$REPO_ROOT/pyproject.toml" | cut -c1-12)"
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating virtual environment in $VENV"
    python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
  fi
  if [ ! -f "$stamp" ]; then
    log "installing the package and its dependencies"
    "$VENV/bin/pip" install -q --upgrade pip >/dev/null 2>&1 || true
    "$VENV/bin/pip" install -q -e "$REPO_ROOT[dev]" 2>&1 | grep -v "^WARNING: Location" >&2 || true
    "$VENV/bin/python" -c "import backend.app" >/dev/null
    rm -f "$VENV"/.installed-* && touch "$stamp"
  fi
}

# State lives outside the checkout: the postgres user must reach it, and a
# clone made by mktemp -d is not readable by other users.
state_dir_for() {
  local name="$1"
  local key
  key="$(printf '%s' "$REPO_ROOT" | sha1sum | cut -c1-10)"
  printf '%s/%s-%s' "${CC_STATE_ROOT:-/var/tmp/contactcenter}" "$name" "$key"
}

# start_postgres STATE_DIR PORT DBNAME
start_postgres() {
  local dir="$1" port="$2" db="$3"
  local data="$dir/pgdata" run="$dir/run"
  mkdir -p "$dir" "$run"
  chmod 755 "$(dirname "$dir")" "$dir" 2>/dev/null || true
  chown postgres:postgres "$dir" "$run"
  if [ ! -f "$data/PG_VERSION" ]; then
    log "initialising PostgreSQL in $data"
    runuser -u postgres -- env -C / "$PG_VERSION_DIR/initdb" -D "$data" -U postgres --auth-local=trust \
      --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >/dev/null
    cat >>"$data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$run'
max_connections = 300
shared_buffers = 256MB
fsync = on
synchronous_commit = on
CONF
  fi
  if ! runuser -u postgres -- env -C / "$PG_VERSION_DIR/pg_ctl" -D "$data" status >/dev/null 2>&1; then
    log "starting PostgreSQL on 127.0.0.1:$port"
    runuser -u postgres -- env -C / "$PG_VERSION_DIR/pg_ctl" -D "$data" -l "$dir/postgres.log" -w -t 60 start >/dev/null
  fi
  # Two roles: the owner runs migrations; the application role owns nothing
  # and cannot bypass row-level security.
  psql_super "$run" "$port" postgres <<SQL >/dev/null
DO \$\$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'cc_owner') THEN
    CREATE ROLE cc_owner LOGIN PASSWORD 'cc_owner' CREATEROLE;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'cc_app') THEN
    CREATE ROLE cc_app LOGIN PASSWORD 'cc_app' NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
  END IF;
END \$\$;
SQL
  if [ -n "$db" ]; then ensure_database "$run" "$port" "$db"; fi
}

psql_super() {
  local run="$1" port="$2" db="$3"; shift 3
  runuser -u postgres -- env -C / psql -v ON_ERROR_STOP=1 -q -h "$run" -p "$port" -d "$db" "$@"
}

ensure_database() {
  local run="$1" port="$2" db="$3"
  if ! psql_super "$run" "$port" postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1; then
    psql_super "$run" "$port" postgres -c "CREATE DATABASE \"$db\" OWNER cc_owner" >/dev/null
  fi
  psql_super "$run" "$port" "$db" >/dev/null <<SQL
REVOKE ALL ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO cc_app;
GRANT CONNECT ON DATABASE "$db" TO cc_app;
ALTER SCHEMA public OWNER TO cc_owner;
CREATE EXTENSION IF NOT EXISTS pg_trgm;
CREATE EXTENSION IF NOT EXISTS citext;
SQL
}

stop_postgres() {
  local dir="$1"
  if [ -f "$dir/pgdata/PG_VERSION" ] && runuser -u postgres -- env -C / "$PG_VERSION_DIR/pg_ctl" -D "$dir/pgdata" status >/dev/null 2>&1; then
    log "stopping PostgreSQL ($dir)"
    runuser -u postgres -- env -C / "$PG_VERSION_DIR/pg_ctl" -D "$dir/pgdata" -m fast -w stop >/dev/null || true
  fi
}

# start_redis STATE_DIR PORT
start_redis() {
  local dir="$1" port="$2"
  mkdir -p "$dir"
  if ! redis-cli -h 127.0.0.1 -p "$port" ping >/dev/null 2>&1; then
    log "starting Redis on 127.0.0.1:$port"
    redis-server --bind 127.0.0.1 --port "$port" --dir "$dir" --daemonize yes \
      --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" --appendonly yes \
      --save "" --protected-mode yes >/dev/null
  fi
  # Ready means PONG: while the append-only file is read, PING answers LOADING (and redis-cli exits 0 for that),
  # and a command sent then fails without redis-cli's exit status saying so (a FLUSHALL flushed nothing).
  for _ in $(seq 1 600); do
    [ "$(redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null)" = "PONG" ] && return 0
    sleep 0.1
  done
  log "Redis did not start; see $dir/redis.log"; return 1
}

stop_redis() {
  local port="$1"
  if redis-cli -h 127.0.0.1 -p "$port" ping >/dev/null 2>&1; then
    log "stopping Redis on port $port"
    redis-cli -h 127.0.0.1 -p "$port" shutdown nosave >/dev/null 2>&1 || true
  fi
}
