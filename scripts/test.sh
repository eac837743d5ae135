#!/usr/bin/env bash
# Runs every test against a real mail stack: installs and starts Dovecot +
# Postfix on loopback (scripts/mailstack/start.sh, needs root), runs the test
# suite, then the tests that restart the stack (one at a time, after the rest),
# and stops the stack again, pass or fail.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo -E"

$SUDO scripts/mailstack/start.sh
stop_stack() { $SUDO scripts/mailstack/stop.sh || true; }
trap stop_stack EXIT

cargo test --all-targets "$@"
# These restart the shared mail stack, so they run alone.
cargo test --test disruptive -- --ignored --test-threads=1 "$@"
