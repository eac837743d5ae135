#!/usr/bin/env bash
# stop.sh - stops the PostgreSQL start.sh started and removes its cluster.
# Safe to run when nothing is running.
set -uo pipefail

RT=${TEST_POSTGRES_RUNTIME:-${TMPDIR:-/tmp}/mailbridge-postgres}
[ -d "$RT/data" ] || exit 0
BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
RUN=()
[ "$(id -u)" = 0 ] && RUN=(runuser -u postgres --)
if [ -n "$BIN" ]; then
    "${RUN[@]}" "$BIN/pg_ctl" --pgdata="$RT/data" --mode=fast --wait stop >/dev/null 2>&1 || true
fi
rm -rf "$RT"
