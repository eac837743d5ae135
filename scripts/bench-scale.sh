#!/usr/bin/env bash
# The scale run (issue 11): restarts the mail stack sized for N mailboxes and
# takes every figure in one run: examples/bench_scale (connect, memory,
# latency next to a bare IDLE client, the 100-mailbox fan-out, restart) and
# examples/bench_outbox (10,000 waiting events drained). Prints the machine
# first, so the figures can go into BENCHMARKS.md as they are.
#
#   scripts/bench-scale.sh N
#
# The stack is stopped at the end; scripts/mailstack/start.sh brings back the
# default one the tests use.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:?usage: scripts/bench-scale.sh MAILBOXES}

SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo -E"

# Two sessions per mailbox, 100 bare IDLE clients and some room. From a few
# thousand mailboxes on, idle sessions must hibernate: one imap process per
# session costs about 0.55 MiB of Dovecot's memory each (see
# scripts/mailstack/NOTES.md).
MAX_CONN=$(( N * 2 + 1000 ))
HIBERNATE=0
[ "$N" -ge 2000 ] && HIBERNATE=1

$SUDO scripts/mailstack/stop.sh >/dev/null 2>&1 || true
$SUDO env MAILSTACK_LOAD_USERS="$N" MAILSTACK_MAX_CONN="$MAX_CONN" \
    MAILSTACK_HIBERNATE="$HIBERNATE" scripts/mailstack/start.sh >/dev/null
trap '$SUDO scripts/mailstack/stop.sh >/dev/null 2>&1 || true' EXIT

cargo build --release --bin mailbridge --example bench_scale --example bench_outbox
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)," \
    "$(free -g | awk '/^Mem:/ {print $2}') GiB RAM, $(uname -sr)"
echo "stack: MAILSTACK_LOAD_USERS=$N MAILSTACK_MAX_CONN=$MAX_CONN MAILSTACK_HIBERNATE=$HIBERNATE"
echo "command: scripts/bench-scale.sh $N ($(git rev-parse --short HEAD))"
echo
target/release/examples/bench_scale "$N"
echo
target/release/examples/bench_outbox 10000 10
