#!/usr/bin/env bash
# stop.sh - stop the server start.sh started (by its pid file, never by name)
# and remove what it wrote into the runtime dir except its log.  Safe to run
# when nothing is running.
set -uo pipefail

RT=${MAILSTACK_RUNTIME:-${TMPDIR:-/tmp}/mailbridge-mailstack}

pid=$(cat "$RT/oauth.pid" 2>/dev/null || true)
key=$(sed -n 's/^OAUTH_KEY_FILE=//p' "$RT/oauth.env" 2>/dev/null || true)
# a stale pid file may name a process that is not ours any more
if [ -n "$pid" ] && tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q 'server\.mjs'; then
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
    printf '[oauth] stopped (pid %s)\n' "$pid" >&2
fi
case "$key" in "$RT"/oauth2/keys/*) rm -f "$key" ;; esac
rm -f "$RT/oauth.env" "$RT/oauth.env.tmp" "$RT/oauth.pid"
exit 0
