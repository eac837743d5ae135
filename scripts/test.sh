#!/usr/bin/env bash
# Runs every test against a real mail stack: installs and starts Dovecot +
# Postfix on loopback (scripts/mailstack/start.sh, needs root), the OAuth2
# provider whose tokens Dovecot accepts (scripts/oauth-test-server/start.sh)
# and a private PostgreSQL (scripts/postgres/start.sh), runs the test suite
# (the store's on both engines), the integration tests once more on
# PostgreSQL, the 100-mailbox scale smoke, schemathesis against the live daemon's OpenAPI
# document (scripts/api-check.sh), then the tests that restart the stack (one
# at a time, after the rest), and stops both again, pass or fail.
#
#   scripts/test.sh          every test (what CI runs)
#   scripts/test.sh FILTER   only the tests whose name contains FILTER (in the
#                            suite and among those that restart the stack);
#                            fails when no test matches
#   scripts/test.sh --soak   only the soak: 10 mailboxes, connections cut every
#                            few seconds, 1,000 messages in, 100 sends out
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo -E"

$SUDO scripts/mailstack/start.sh
stop_stack() {
    $SUDO scripts/postgres/stop.sh || true
    $SUDO scripts/oauth-test-server/stop.sh || true
    $SUDO scripts/mailstack/stop.sh || true
}
trap stop_stack EXIT
# writes its key into the stack's runtime dir, so it starts second
$SUDO scripts/oauth-test-server/start.sh
$SUDO scripts/postgres/start.sh
# The store's tests and the second integration pass use it; without it
# they fail rather than skip the engine. (Test variables never start with
# MAILBRIDGE_: the daemon reads every such variable as configuration.)
export TEST_REQUIRE_POSTGRES=1

if [ "${1:-}" = "--soak" ]; then
    shift
    cargo test --release --test soak -- --ignored --nocapture "$@"
    exit
fi

# Runs one cargo test command, shows its output, and adds the tests it ran
# (passed or failed) to RAN; a failed run ends the script, and so does a
# run that executed no test (unless a filter chose which).
RAN=0
FILTERED=${1:+yes}
counted() {
    local log rc ran
    log=$(mktemp)
    set +e
    "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    set -e
    ran=$(grep -oE 'test result: [A-Za-z]+\. [0-9]+ passed; [0-9]+ failed' "$log" \
        | awk '{ n += $4 + $6 } END { print n + 0 }')
    rm -f "$log"
    [ "$rc" = 0 ] || exit "$rc"
    RAN=$((RAN + ran))
    if [ "$ran" = 0 ] && [ -z "$FILTERED" ]; then
        echo "test.sh: no test ran in: $*" >&2
        exit 1
    fi
}

if [ $# -gt 0 ]; then
    # A filter: the tests it names, in the suite or among those that restart
    # the stack, and nothing else; a filter that names no test is an error.
    counted cargo test --all-targets -- "$@"
    counted cargo test --test disruptive -- --ignored --test-threads=1 "$@"
    if [ "$RAN" = 0 ]; then
        echo "test.sh: no test matches: $*" >&2
        exit 1
    fi
    exit 0
fi

counted cargo test --all-targets
# The integration tests again, each daemon on PostgreSQL (a schema of its
# own); the store's suite already ran on both engines above.
TEST_STORE_BACKEND=postgres counted cargo test --test '*'
# The vendored crates' own tests (their fixes are ours to keep): async-imap
# with the runtime and the imap-proto the daemon builds it with.
counted cargo test --manifest-path vendor/imap-proto/Cargo.toml --target-dir target/vendored
counted cargo test --manifest-path vendor/async-imap/Cargo.toml --target-dir target/vendored \
    --no-default-features --features runtime-tokio --lib \
    --config 'patch.crates-io.imap-proto.path="vendor/imap-proto"'
# The scale run in small (issue 11): 100 mailboxes, one message to all of
# them, a restart; it checks that everything arrived once, never how fast.
cargo run --quiet --example bench_scale -- 100 --smoke
# Schemathesis against the live daemon, from its own /openapi.json.
scripts/api-check.sh
# These restart the shared mail stack, so they run alone.
counted cargo test --test disruptive -- --ignored --test-threads=1
