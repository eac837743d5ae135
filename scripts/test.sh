#!/usr/bin/env bash
# Runs every test against a real mail stack: installs and starts Dovecot +
# Postfix on loopback (scripts/mailstack/start.sh, needs root) and the OAuth2
# provider whose tokens Dovecot accepts (scripts/oauth-test-server/start.sh),
# runs the test suite, the 100-mailbox scale smoke, schemathesis against the live daemon's OpenAPI
# document (scripts/api-check.sh), then the tests that restart the stack (one
# at a time, after the rest), and stops both again, pass or fail.
#
#   scripts/test.sh          every test (what CI runs)
#   scripts/test.sh --soak   only the soak: 10 mailboxes, connections cut every
#                            few seconds, 1,000 messages in, 100 sends out
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo -E"

$SUDO scripts/mailstack/start.sh
stop_stack() {
    $SUDO scripts/oauth-test-server/stop.sh || true
    $SUDO scripts/mailstack/stop.sh || true
}
trap stop_stack EXIT
# writes its key into the stack's runtime dir, so it starts second
$SUDO scripts/oauth-test-server/start.sh

if [ "${1:-}" = "--soak" ]; then
    shift
    cargo test --release --test soak -- --ignored --nocapture "$@"
    exit
fi

cargo test --all-targets "$@"
# The scale run in small (issue 11): 100 mailboxes, one message to all of
# them, a restart; it checks that everything arrived once, never how fast.
cargo run --quiet --example bench_scale -- 100 --smoke
# Schemathesis against the live daemon, from its own /openapi.json.
scripts/api-check.sh
# These restart the shared mail stack, so they run alone.
cargo test --test disruptive -- --ignored --test-threads=1 "$@"
