#!/usr/bin/env bash
# Schemathesis against the live daemon: it reads GET /openapi.json and sends
# generated requests, valid and invalid, to every route with the API key,
# including stateful sequences that follow the document's links. It fails on
# any 5xx, any answer the document does not describe (status, content type,
# headers, body schema), a route that works without the key, a request the
# document calls invalid that is accepted, and any 4xx whose error body does
# not have the contract's shape or whose message names no field
# (scripts/api_check/hooks.py).
#
#   scripts/api-check.sh                 bounded, as CI runs it
#   API_CHECK_EXAMPLES=500 scripts/api-check.sh   a longer run
#
# Needs the daemon built (cargo build; MAILBRIDGE_BIN picks another binary)
# and python3 with venv. Schemathesis is installed from PyPI into a venv under
# target/ once, at a pinned version.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${MAILBRIDGE_BIN:-target/debug/mailbridge}
VENV=${SCHEMATHESIS_VENV:-target/schemathesis-venv}
SCHEMATHESIS_VERSION=4.32.5
EXAMPLES=${API_CHECK_EXAMPLES:-30}

if ! "$VENV/bin/schemathesis" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet "schemathesis==$SCHEMATHESIS_VERSION"
fi

WORK=$(mktemp -d)
DAEMON_PID=""
cleanup() {
    [ -n "$DAEMON_PID" ] && kill "$DAEMON_PID" 2>/dev/null && wait "$DAEMON_PID" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
KEY=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')
cat > "$WORK/config.toml" <<TOML
[server]
listen = "127.0.0.1:$PORT"
public_url = "http://127.0.0.1:$PORT"

[storage]
path = "$WORK/data"

[api]
keys = ["$KEY"]

[sync]
# Generated mailboxes name servers that do not exist: give up on them fast.
step_timeout_secs = 3
TOML

"$BIN" serve --config "$WORK/config.toml" > "$WORK/daemon.log" 2>&1 &
DAEMON_PID=$!
python3 - "$PORT" <<'PY'
import sys, time, urllib.request
deadline = time.monotonic() + 60
while True:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/readyz", timeout=2)
        break
    except Exception:
        if time.monotonic() > deadline:
            sys.exit("the daemon did not become ready in 60 s")
        time.sleep(0.2)
PY

REPORT_DIR=$(realpath -m "${API_CHECK_REPORT_DIR:-target/schemathesis-report}")
VENV=$(realpath "$VENV")
set +e
# Run from the scratch folder: schemathesis keeps a replay cache where it runs,
# and a run must not replay another's.
(cd "$WORK" && SCHEMATHESIS_HOOKS=scripts.api_check.hooks PYTHONPATH="$OLDPWD" \
"$VENV/bin/schemathesis" --no-color run "http://127.0.0.1:$PORT/openapi.json" \
    --header "Authorization: Bearer $KEY" \
    --checks all \
    --exclude-checks positive_data_acceptance \
    --max-examples "$EXAMPLES" \
    --seed 20261201 \
    --workers 1 \
    --request-timeout 30 \
    --suppress-health-check all \
    --report junit --report-dir "$REPORT_DIR")
STATUS=$?
set -e
if grep -q "panicked" "$WORK/daemon.log"; then
    echo "the daemon logged a panic:" >&2
    grep -B2 -A5 "panicked" "$WORK/daemon.log" >&2
    STATUS=1
fi
if ! kill -0 "$DAEMON_PID" 2>/dev/null; then
    echo "the daemon died during the run" >&2
    tail -20 "$WORK/daemon.log" >&2
    STATUS=1
fi
exit $STATUS
