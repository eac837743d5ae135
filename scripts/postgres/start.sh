#!/usr/bin/env bash
# start.sh - a private PostgreSQL for the tests: Debian's server binaries,
# initdb into a runtime folder of its own, pg_ctl on a loopback port. No
# system service is used or assumed. Installs the `postgresql` package when
# its binaries are missing (needs root then).
#
#   TEST_POSTGRES_RUNTIME   where the cluster lives
#                           (default: $TMPDIR/mailbridge-postgres)
#   TEST_POSTGRES_PORT      its loopback port (default 55432)
#
# Writes $TEST_POSTGRES_RUNTIME/postgres.env with TEST_POSTGRES_URL,
# which the tests read (tests/support and src/store/suite.rs find it there).
# Stop with stop.sh; starting again on a running cluster is harmless.
set -euo pipefail

RT=${TEST_POSTGRES_RUNTIME:-${TMPDIR:-/tmp}/mailbridge-postgres}
PORT=${TEST_POSTGRES_PORT:-55432}
log() { printf '[postgres] %s\n' "$*" >&2; }

bindir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
if [ -z "$(bindir)" ] || [ ! -x "$(bindir)/initdb" ]; then
    log "installing Debian's postgresql"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq postgresql >/dev/null
fi
BIN=$(bindir)

# initdb refuses to run as root: the cluster belongs to the package's
# `postgres` user then.
RUN=()
if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --home-dir /nonexistent --shell /usr/sbin/nologin postgres
    RUN=(runuser -u postgres --)
fi

mkdir -p "$RT"
[ "$(id -u)" = 0 ] && chown postgres: "$RT"
chmod 700 "$RT"
DATA=$RT/data

if [ ! -s "$DATA/PG_VERSION" ]; then
    log "initdb into $DATA"
    "${RUN[@]}" "$BIN/initdb" --pgdata="$DATA" --username=mailbridge --auth=trust \
        --encoding=UTF8 --locale=C >/dev/null
    cat >> "$DATA/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$RT'
max_connections = 200
shared_buffers = 128MB
logging_collector = off
CONF
fi

if "${RUN[@]}" "$BIN/pg_ctl" --pgdata="$DATA" status >/dev/null 2>&1; then
    log "already running on 127.0.0.1:$PORT"
else
    "${RUN[@]}" "$BIN/pg_ctl" --pgdata="$DATA" --log="$RT/server.log" --wait --timeout=60 start >/dev/null \
        || { tail -20 "$RT/server.log" >&2; exit 1; }
fi

"${RUN[@]}" "$BIN/psql" --host=127.0.0.1 --port="$PORT" --username=mailbridge --dbname=postgres \
    --quiet --tuples-only --no-align \
    --command="SELECT 1 FROM pg_database WHERE datname = 'mailbridge_test'" | grep -q 1 \
    || "${RUN[@]}" "$BIN/createdb" --host=127.0.0.1 --port="$PORT" --username=mailbridge mailbridge_test

URL="postgres://mailbridge@127.0.0.1:$PORT/mailbridge_test"
cat > "$RT/postgres.env" <<ENV
TEST_POSTGRES_URL=$URL
TEST_POSTGRES_BIN=$BIN
TEST_POSTGRES_DATA=$DATA
ENV
chmod 644 "$RT/postgres.env"
log "running: $URL"
