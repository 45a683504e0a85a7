#!/usr/bin/env bash
# Start a throwaway PostgreSQL server on loopback for the tests and print its URL; stop it and
# remove what start wrote into <dir> (and <dir> itself once that leaves it empty).
# Usage: eval "$(scripts/postgres.sh start <dir>)"   ...   scripts/postgres.sh stop <dir>
# `halt <dir>` stops the server at once, as a crash would, keeping its data; `restart <dir>` starts
# it again on the same port (the chaos run takes the database away with them).
set -euo pipefail
action=${1:?start|stop}
dir=${2:?data directory}
# A free loopback port unless one is given.
[ -f "$dir/port" ] && saved_port=$(cat "$dir/port") || saved_port=
port=${YOUR_AI_PG_PORT:-${saved_port:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}}
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -n "$bin" ] || bin=$(dirname "$(command -v initdb)")
# PostgreSQL refuses to run as root: run it as the postgres user there.
as_owner() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

case "$action" in
  start)
    mkdir -p "$dir"
    [ "$(id -u)" -eq 0 ] && chown postgres "$dir"
    as_owner "$bin/initdb" -D "$dir/data" -A trust -U postgres >"$dir/initdb.log" 2>&1
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
      -o "-h 127.0.0.1 -p $port -k $dir -c max_connections=200 -c fsync=off" start >/dev/null
    as_owner "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres your_ai_test
    echo "$port" >"$dir/port"
    echo "export YOUR_AI_TEST_POSTGRES=postgresql+psycopg://postgres@127.0.0.1:$port/your_ai_test"
    ;;
  halt)
    as_owner "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null
    ;;
  restart)
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
      -o "-h 127.0.0.1 -p $port -k $dir -c max_connections=200 -c fsync=off" start >/dev/null
    ;;
  stop)
    if [ -d "$dir/data" ]; then
      as_owner "$bin/pg_ctl" -D "$dir/data" -m fast stop >/dev/null || true
      if as_owner "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
        echo "postgres.sh: the server of $dir/data is still running; nothing removed" >&2
        exit 1
      fi
    fi
    # Only what start made (its socket too, should the server have died): a directory given
    # with other files in it keeps them.
    rm -rf "$dir/data"
    rm -f "$dir/initdb.log" "$dir/server.log" "$dir/port" "$dir"/.s.PGSQL.*
    rmdir "$dir" 2>/dev/null || true
    ;;
esac
