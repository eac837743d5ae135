#!/usr/bin/env bash
# start.sh - the OAuth2/OIDC provider of the integration tests (server.mjs, on
# the npm package oauth2-mock-server) on 127.0.0.1.  Run it after
# scripts/mailstack/start.sh and as the same user (root): it puts its RS256
# public key into the mail stack's key dict, so Dovecot accepts its access
# tokens for XOAUTH2/OAUTHBEARER.  Idempotent; stop.sh stops it.
#
# Environment (optional):
#   MAILSTACK_RUNTIME  the mail stack's runtime dir (default $TMPDIR/mailbridge-mailstack)
#   OAUTH_TEST_PORT    default 0 (any free port)
#
# Writes into the runtime dir:
#   oauth.env    OAUTH_ISSUER, OAUTH_CONTROL, OAUTH_KID, OAUTH_KEY_FILE (tests read it)
#   oauth.pid
#   oauth2/keys/default/RS256/<kid>   the public key (a new kid per start:
#                Dovecot caches keys by kid)
#   log/oauth.log
#
# Provider (OAUTH_ISSUER + path): /.well-known/openid-configuration, /authorize,
# /token, /userinfo, /jwks.  Tokens are RS256 JWTs whose `email` and `sub` are
# the address.  The test plays the browser: it GETs the authorize URL the
# daemon built plus `mock_email=<address>` (who logs in) or `mock_deny=1`
# (-> error=access_denied) and gets a 302 to redirect_uri with code and state.
# /authorize requires client_id and PKCE S256.  /token takes client_id and an
# optional client_secret in the body or as basic auth (the secret's value is
# not checked), wants the same client_id and redirect_uri as /authorize and
# the code_verifier; codes are single use.  A refresh answers without a new
# refresh_token, like Google.
#
# Control (OAUTH_CONTROL + path, JSON, no auth; emails compare lower-cased):
#   POST /lifetime {"email","seconds"}       later access tokens live that long (default 3600)
#   POST /revoke   {"email"}                 every refresh token of that email -> invalid_grant
#   POST /fail     {"email","status","count"} the next `count` token requests for that
#                                            email get `status` + {"error":"temporarily_unavailable"}
#   POST /grant    {"email","seconds"?}      -> {refresh_token, access_token, expires_in, expires_at}
#   GET  /stats?email=...                    -> {code_exchanges, refreshes, failed}: token
#                                            requests for that email (attempts, refused ones too)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RT=${MAILSTACK_RUNTIME:-${TMPDIR:-/tmp}/mailbridge-mailstack}
LOG=$RT/log/oauth.log

log() { printf '[oauth] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

env_var() { sed -n "s/^$1=//p" "$RT/oauth.env" 2>/dev/null; }
answers() {
    local issuer
    issuer=$(env_var OAUTH_ISSUER)
    [ -n "$issuer" ] && curl -fsS -m 2 -o /dev/null "$issuer/.well-known/openid-configuration" 2>/dev/null
}
print_info() { log "ready: issuer $(env_var OAUTH_ISSUER), control $(env_var OAUTH_CONTROL)"; }

command -v node >/dev/null || die "node not found (Node.js 20+ is needed)"
[ -d "$RT/oauth2/keys" ] || die "$RT/oauth2/keys missing: start the mail stack first (scripts/mailstack/start.sh)"

pid=$(cat "$RT/oauth.pid" 2>/dev/null || true)
if [ -n "$pid" ] && tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q 'server\.mjs' && answers; then
    print_info
    exit 0
fi
"$HERE/stop.sh"   # a half-dead or stale instance

# npm ci refreshes node_modules/.package-lock.json, so an older one means the
# lock file changed since the last install.
if [ ! -f "$HERE/node_modules/.package-lock.json" ] \
        || [ "$HERE/package-lock.json" -nt "$HERE/node_modules/.package-lock.json" ]; then
    log "npm ci in $HERE"
    (cd "$HERE" && npm ci --no-audit --no-fund --loglevel=error) >&2 || die "npm ci failed"
fi

mkdir -p "$RT/log"
# setsid: detached from this shell, so it outlives the script
(cd "$HERE" && MAILSTACK_RUNTIME=$RT exec setsid node server.mjs </dev/null >>"$LOG" 2>&1) &
child=$!

deadline=$(( $(date +%s) + 15 ))
until [ -s "$RT/oauth.env" ] && answers; do
    if ! kill -0 "$child" 2>/dev/null || [ "$(date +%s)" -ge "$deadline" ]; then
        tail -30 "$LOG" >&2 || true
        "$HERE/stop.sh"
        die "server not ready (log: $LOG)"
    fi
    sleep 0.1
done
print_info
