#!/usr/bin/env bash
# stop.sh - stop the Dovecot + Postfix started by start.sh.
# Works from the PID files only (never by process name): TERM the master,
# wait, then TERM/KILL anything still left in the master's session (both
# masters are session leaders: Dovecot via setsid, Postfix daemonizes itself).
# Safe to run when nothing is running.  Keeps the runtime dir (rm -rf it for a
# clean slate).
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RT=${MAILSTACK_RUNTIME:-${TMPDIR:-/tmp}/mailbridge-mailstack}

log() { printf '[mailstack] %s\n' "$*" >&2; }

session_members() { # SID -> pids in that session; reads /proc (no procps needed)
    local want=$1 f st rest p
    for f in /proc/[0-9]*/stat; do
        { read -r st < "$f"; } 2>/dev/null || continue   # process may be gone
        rest=${st##*) }                  # fields after "pid (comm) "
        set -- $rest                     # state ppid pgrp session ...
        if [ "${4:-}" = "$want" ]; then p=${f#/proc/}; echo "${p%/stat}"; fi
    done
}

is_master() { # name pid -> true if pid is still that daemon's master (guards
               # against a stale pid file whose PID got reused)
    local cmd
    cmd=$(tr '\0' ' ' < "/proc/$2/cmdline" 2>/dev/null) || return 1
    case "$1:$cmd" in
        dovecot:*dovecot*) return 0 ;;
        postfix:*postfix/sbin/master*) return 0 ;;
    esac
    return 1
}

stop_master() { # name pid
    local name=$1 pid=$2 i left
    [ -n "$pid" ] || return 0
    if kill -0 "$pid" 2>/dev/null; then
        is_master "$name" "$pid" || { log "$name: pid $pid is not ours any more, skipped"; return 0; }
        # TERM the master and, at the same time, every process of its session:
        # Dovecot's master otherwise spends ~3 s waiting for busy children.
        kill -TERM "$pid" $(session_members "$pid") 2>/dev/null
        for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
        log "$name stopped (pid $pid)"
    fi
    # Dovecot's imap/auth/log processes that still have clients outlive the
    # master (by design: a master restart does not drop IMAP sessions), so
    # sweep the session: TERM, wait up to 2 s, then KILL.
    sleep 0.2
    left=$(session_members "$pid")
    [ -z "$left" ] && return 0
    kill -TERM $left 2>/dev/null
    for i in $(seq 20); do
        sleep 0.1
        left=$(session_members "$pid")
        [ -z "$left" ] && return 0
    done
    kill -KILL $left 2>/dev/null
    return 0
}

# Both at once: each master needs 1.5-3 s to wind down after SIGTERM.
PF_PID=$(cat "$RT/spool/postfix/pid/master.pid" 2>/dev/null | tr -d ' \n')
DC_PID=$(cat "$RT/run/dovecot/master.pid" 2>/dev/null || cat "$RT/run/dovecot.pid" 2>/dev/null || true)
stop_master postfix "$PF_PID" &
stop_master dovecot "$DC_PID" &
wait
rm -f "$RT/run/dovecot.pid" "$RT/run/dovecot/master.pid" "$RT/spool/postfix/pid/master.pid"

# put back the inotify limit start.sh raised
if [ -f "$RT/run/inotify_max_user_instances.orig" ]; then
    cat "$RT/run/inotify_max_user_instances.orig" > /proc/sys/fs/inotify/max_user_instances 2>/dev/null || true
    rm -f "$RT/run/inotify_max_user_instances.orig"
fi
exit 0
