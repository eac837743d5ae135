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
#   API_CHECK_UNSEEDED=1 scripts/api-check.sh      without the mail stack
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
# With the test mail stack up (scripts/mailstack/start.sh), the run starts
# from a connected mailbox, a contact and a send, so generated requests reach
# the handlers' real work and not only their 404s.
# Found where scripts/mailstack/start.sh writes it. Without the stack the run
# would only meet 404s, so it is refused unless API_CHECK_UNSEEDED=1 asks
# for exactly that.
STACK_ENV=${MAILSTACK_RUNTIME:-${TMPDIR:-/tmp}/mailbridge-mailstack}/stack.env
SEEDED=""
EXTRA_ROOTS=""
if [ ! -f "$STACK_ENV" ] && [ -z "${API_CHECK_UNSEEDED:-}" ]; then
    echo "api-check: no mail stack at $STACK_ENV (start scripts/mailstack/start.sh," >&2
    echo "or set API_CHECK_UNSEEDED=1 to run against an empty daemon)" >&2
    exit 1
fi
if [ -f "$STACK_ENV" ]; then
    # shellcheck disable=SC1090
    . "$STACK_ENV"
    SEEDED=1
    EXTRA_ROOTS="[tls]
extra_roots = [\"$MAILSTACK_CA_CERT\"]"
fi
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

$EXTRA_ROOTS
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
touch "$WORK/schemathesis.toml"
if [ -n "$SEEDED" ]; then
    # Any refused call ends the script (set -e): a run that could not seed
    # fails rather than passing on 404s.
    python3 - "$PORT" "$KEY" "$MAILSTACK_DOMAIN" "$MAILSTACK_IMAPS_PORT" "$MAILSTACK_SUBMISSIONS_PORT" \
        > "$WORK/schemathesis.toml" <<'PY'
import json, sys, urllib.request
port, key, domain, imaps, submissions = sys.argv[1:]
base = f"http://127.0.0.1:{port}/v1"

def call(method, path, body):
    request = urllib.request.Request(
        base + path, method=method, data=json.dumps(body).encode(),
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)

call("PUT", "/locations/L1/contacts/c1",
     {"emails": [f"alice@{domain}"], "name": "Alice", "assigned_user_ids": ["u1"]})
call("PUT", "/locations/L1/users/u1/mailbox", {
    "email": f"carol@{domain}", "provider": "imap",
    "auth": {"type": "password", "password": "carolpw"},
    "imap": {"host": "127.0.0.1", "port": int(imaps), "security": "tls"},
    "smtp": {"host": "127.0.0.1", "port": int(submissions), "security": "tls"}})
sent = call("POST", "/locations/L1/users/u1/messages",
            {"contact_id": "c1", "subject": "seed", "text": "hello"})
print("[parameters]")
for name, value in {"location_id": "L1", "user_id": "u1", "contact_id": "c1",
                    "id": sent["id"], "mailbox": f"carol@{domain}"}.items():
    print(f"{name} = {json.dumps(value)}")
PY
fi
set +e
# Run from the scratch folder: schemathesis keeps a replay cache where it runs,
# and a run must not replay another's.
(cd "$WORK" && SCHEMATHESIS_HOOKS=scripts.api_check.hooks PYTHONPATH="$OLDPWD" \
"$VENV/bin/schemathesis" --no-color --config-file "$WORK/schemathesis.toml" run "http://127.0.0.1:$PORT/openapi.json" \
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
