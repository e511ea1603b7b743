#!/usr/bin/env bash
# A throwaway PostgreSQL server for the search's tests and demos: installs nothing, runs Debian's
# postgresql binaries in a temporary folder, listening on 127.0.0.1 only, with trust auth.
#
#   url=$(bash scripts/postgres.sh start DIR)    # prints postgresql://postgres@127.0.0.1:PORT/ktg
#   export KTG_TEST_POSTGRES_URL=$url
#   bash scripts/postgres.sh stop DIR             # stops the server and deletes DIR
#
# DIR (created if missing) holds the URL (DIR/url) and the cluster with its socket and log (or,
# when the postgres user cannot reach DIR, the path of a cluster folder under /tmp).  Without
# DIR a fresh folder under ${TMPDIR:-/tmp} is used; its path is printed on stderr.  As root the
# server runs as the `postgres` user (postgres refuses to run as root).  Exits 3 when no
# PostgreSQL binaries are found (apt-get install postgresql), 1 on any other failure.
set -euo pipefail

die() { echo "postgres.sh: $*" >&2; exit "${2:-1}"; }

find_bin() {
  local d
  if [ -n "${PG_BIN:-}" ] && [ -x "$PG_BIN/postgres" ]; then echo "$PG_BIN"; return; fi
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [ -x "$d/postgres" ] && { echo "$d"; return; }
  done
  d=$(command -v pg_ctl 2>/dev/null || true)
  [ -n "$d" ] && [ -x "$(dirname "$d")/postgres" ] && { dirname "$d"; return; }
  return 1
}

# Run a command as the server's owner (postgres when we are root).
as_owner() {
  if [ "$(id -u)" = 0 ]; then
    if command -v runuser >/dev/null; then runuser -u postgres -- "$@"; else su postgres -s /bin/sh -c "$(printf '%q ' "$@")"; fi
  else
    "$@"
  fi
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
  local dir="${1:-}" bin port url cl
  bin=$(find_bin) || die "no PostgreSQL binaries found (looked in /usr/lib/postgresql/*/bin and PATH): apt-get install postgresql, or set PG_BIN" 3
  if [ -z "$dir" ]; then dir=$(mktemp -d "${TMPDIR:-/tmp}/ktg-postgres.XXXXXX"); echo "postgres.sh: cluster in $dir" >&2; fi
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  [ -e "$dir/cluster_dir" ] && die "$dir already holds a server: stop it first (bash scripts/postgres.sh stop $dir)"
  cl="$dir/cluster"
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || die "running as root but there is no 'postgres' user to run the server as"
    # The postgres user must reach the cluster; a private parent (e.g. pytest's tmp_path) hides
    # DIR from it, so the cluster then lives in a fresh folder under /tmp.
    mkdir -p "$cl" && chown postgres "$cl" && chmod 700 "$cl"
    if ! as_owner test -w "$cl"; then
      rm -rf "$cl"
      cl=$(mktemp -d /tmp/ktg-postgres.XXXXXX)
      chown postgres "$cl"
    fi
  else
    mkdir -p "$cl"
  fi
  echo "$cl" >"$dir/cluster_dir"
  as_owner "$bin/initdb" -D "$cl/data" -U postgres --auth=trust -E UTF8 --no-sync >"$dir/initdb.log" 2>&1 \
    || die "initdb failed; see $dir/initdb.log"
  local tries=0
  while :; do
    port=$(free_port)
    if as_owner "$bin/pg_ctl" -D "$cl/data" -l "$cl/server.log" -w -t 60 \
        -o "-p $port -k $cl -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
        start >/dev/null 2>&1; then
      break
    fi
    tries=$((tries + 1))
    [ $tries -ge 3 ] && die "pg_ctl start failed; see $cl/server.log"
  done
  as_owner "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres ktg >/dev/null 2>&1 \
    || { as_owner "$bin/pg_ctl" -D "$cl/data" -m immediate stop >/dev/null 2>&1 || true; die "createdb failed; see $cl/server.log"; }
  url="postgresql://postgres@127.0.0.1:$port/ktg"
  echo "$url" >"$dir/url"
  echo "$url"
}

stop() {
  local dir="${1:-}" bin cl
  [ -n "$dir" ] || die "usage: bash scripts/postgres.sh stop DIR"
  [ -d "$dir" ] || return 0
  cl=$(cat "$dir/cluster_dir" 2>/dev/null || echo "$dir/cluster")
  if [ -e "$cl/data/PG_VERSION" ]; then
    bin=$(find_bin) || die "no PostgreSQL binaries found to stop the server in $cl" 3
    as_owner "$bin/pg_ctl" -D "$cl/data" -m fast -w stop >/dev/null 2>&1 \
      || as_owner "$bin/pg_ctl" -D "$cl/data" -m immediate stop >/dev/null 2>&1 || true
  fi
  rm -rf "$cl" "$dir"
}

case "${1:-}" in
  start) shift; start "$@" ;;
  stop) shift; stop "$@" ;;
  *) echo "usage: bash scripts/postgres.sh start [DIR] | stop DIR" >&2; exit 2 ;;
esac
