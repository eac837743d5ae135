#!/usr/bin/env bash
# start.sh - throwaway Dovecot (IMAP + LMTP + oauth2 passdb) + Postfix
# (submission) mail stack on 127.0.0.1 for automated tests.  Debian 12, run as
# root, no systemd needed.  Idempotent: re-running while the stack is up only
# re-checks readiness; re-running after stop.sh rewrites the configs and
# starts again (certs, JWT keys and mail are kept until the runtime dir is
# removed).  See NOTES.md next to this script.
#
# Environment (all optional):
#   MAILSTACK_RUNTIME   runtime dir (configs, certs, keys, mail, logs, sockets)
#                       default: $TMPDIR/mailbridge-mailstack (short: a clone may
#                       live at a long path).  Keep it short:
#                       unix socket paths must stay < 108 bytes.
#   MAILSTACK_DOMAIN    default example.test
#   MAILSTACK_USERS     default "alice bob carol sink"; password = <name>pw
#   MAILSTACK_LOAD_USERS  number of extra users load0..loadN-1 (password loadpw)
#                       for connection-scale tests; default 0
#   MAILSTACK_IMAP_PORT (10143 plain+STARTTLS)  MAILSTACK_IMAPS_PORT (10993)
#   MAILSTACK_SUBMISSION_PORT (10587 plain+STARTTLS, AUTH required)
#   MAILSTACK_SUBMISSIONS_PORT (10465 implicit TLS, AUTH required)
#   MAILSTACK_SMTP_PORT (10025, no AUTH, accepts mail for the local domain only)
#   MAILSTACK_MAIL_UID  uid/gid owning the Maildirs (default 5000, needs no
#                       /etc/passwd entry)
#   MAILSTACK_MAX_CONN  IMAP connection capacity to configure (default 6000)
#   MAILSTACK_NO_POSTFIX=1  start Dovecot only
#   MAILSTACK_AUTO_SENT=1   Gmail-like: mail submitted on the submission ports
#                       is also filed into the sender's "Sent" mailbox
#   MAILSTACK_HIBERNATE=1   park IDLE connections in imap-hibernate after 5s
#                       (fewer imap processes / less memory; see NOTES.md)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RT=${MAILSTACK_RUNTIME:-${TMPDIR:-/tmp}/mailbridge-mailstack}
DOMAIN=${MAILSTACK_DOMAIN:-example.test}
USERS=${MAILSTACK_USERS:-alice bob carol sink}
LOAD_USERS=${MAILSTACK_LOAD_USERS:-0}
IMAP_PORT=${MAILSTACK_IMAP_PORT:-10143}
IMAPS_PORT=${MAILSTACK_IMAPS_PORT:-10993}
SUBMISSION_PORT=${MAILSTACK_SUBMISSION_PORT:-10587}
SUBMISSIONS_PORT=${MAILSTACK_SUBMISSIONS_PORT:-10465}
SMTP_PORT=${MAILSTACK_SMTP_PORT:-10025}
MAIL_UID=${MAILSTACK_MAIL_UID:-5000}
MAX_CONN=${MAILSTACK_MAX_CONN:-6000}
NO_POSTFIX=${MAILSTACK_NO_POSTFIX:-0}
HIBERNATE=${MAILSTACK_HIBERNATE:-0}
AUTO_SENT=${MAILSTACK_AUTO_SENT:-0}

DC_CONF=$RT/etc/dovecot/dovecot.conf
DC_BASE=$RT/run/dovecot
PF_CONF=$RT/etc/postfix
PF_QUEUE=$RT/spool/postfix
PKGS="dovecot-core dovecot-imapd dovecot-lmtpd postfix openssl"

log() { printf '[mailstack] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (Dovecot/Postfix masters need it)"
T0=$(date +%s%3N)

# ---------------------------------------------------------------- packages --
install_packages() {
    local missing="" p
    for p in $PKGS; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
            || missing="$missing $p"
    done
    [ -z "$missing" ] && return 0
    log "installing:$missing"
    # Keep apt from starting the distro's own dovecot/postfix (ports 25/143/993)
    # on machines with a SysV init; remove the guard again afterwards.
    local guard=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        guard=1
    fi
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends $missing >/dev/null 2>&1; then
        apt-get update >/dev/null
        apt-get install -y --no-install-recommends $missing >/dev/null
    fi
    [ "$guard" = 1 ] && rm -f /usr/sbin/policy-rc.d
    return 0
}

# ------------------------------------------------------------ pid helpers --
pid_alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
dovecot_pid() { cat "$DC_BASE/master.pid" 2>/dev/null || true; }
postfix_pid() { [ -f "$PF_QUEUE/pid/master.pid" ] && tr -d ' \n' < "$PF_QUEUE/pid/master.pid" || true; }

banner() { # port -> first line sent by the server ('' if none)
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1 && IFS= read -r l <&3 && printf '%s' \"\$l\"" 2>/dev/null || true
}

wait_ready() {
    local deadline=$(( $(date +%s) + ${1:-30} )) ok
    while :; do
        ok=1
        case "$(banner "$IMAP_PORT")" in '* OK'*) ;; *) ok=0 ;; esac
        if [ "$NO_POSTFIX" != 1 ]; then
            case "$(banner "$SUBMISSION_PORT")" in 220*) ;; *) ok=0 ;; esac
            case "$(banner "$SMTP_PORT")" in 220*) ;; *) ok=0 ;; esac
        fi
        [ -S "$DC_BASE/lmtp" ] && [ -S "$DC_BASE/auth-client" ] || ok=0
        [ "$ok" = 1 ] && return 0
        [ "$(date +%s)" -ge "$deadline" ] && return 1
        sleep 0.1
    done
}

print_info() {
    cat <<EOF
mailstack ready on 127.0.0.1  (runtime: $RT)
  IMAP        $IMAP_PORT  (plain + STARTTLS; LOGIN, AUTH=PLAIN, AUTH=XOAUTH2, AUTH=OAUTHBEARER)
  IMAPS       $IMAPS_PORT  (implicit TLS)
  SUBMISSION  $SUBMISSION_PORT  (plain + STARTTLS; AUTH PLAIN LOGIN XOAUTH2 OAUTHBEARER required)
  SUBMISSIONS $SUBMISSIONS_PORT  (implicit TLS)
  SMTP (MX)   $SMTP_PORT  (no auth, only @$DOMAIN recipients)
  LMTP        $DC_BASE/lmtp (unix socket)
  CA cert     $RT/certs/ca.pem   (server cert SAN: DNS:localhost, IP:127.0.0.1)
  users       $(echo $USERS | sed "s/\([^ ]*\)/\1@$DOMAIN/g")  (password: <name>pw)
  JWT HS256   secret (base64) in $RT/oauth2/hs256.secret.b64
  JWT RS256   private key $RT/oauth2/rs256-private.pem
  env file    $RT/stack.env
EOF
}

install_packages

# already running? then only re-check readiness (idempotent)
if pid_alive "$(dovecot_pid)" && { [ "$NO_POSTFIX" = 1 ] || pid_alive "$(postfix_pid)"; }; then
    wait_ready 10 || die "stack is running but not answering; run stop.sh"
    log "already running"
    print_info
    exit 0
fi
# half-running (one daemon died): stop what is left, then start cleanly
if pid_alive "$(dovecot_pid)" || pid_alive "$(postfix_pid)"; then
    MAILSTACK_RUNTIME=$RT "$HERE/stop.sh" || true
fi

# ------------------------------------------------------------- directories --
mkdir -p "$RT"/{etc/dovecot,etc/postfix,run,state/dovecot,log,certs,oauth2/keys/default/HS256,oauth2/keys/default/RS256,mail,spool/postfix,lib/postfix}
chmod 755 "$RT" "$RT/run" "$RT/etc"
chown "$MAIL_UID:$MAIL_UID" "$RT/mail"
chown postfix:postfix "$RT/lib/postfix"; chmod 700 "$RT/lib/postfix"
chmod 755 "$RT/oauth2"   # the auth process (user dovecot) must traverse it to the key dict

# ------------------------------------------------------------ certificates --
# A CA plus a leaf (CA:FALSE, serverAuth, SAN localhost/127.0.0.1).  A single
# self-signed cert made with plain `openssl req -x509` carries CA:TRUE, which
# rustls/webpki rejects as a server cert (CaUsedAsEndEntity).
if [ ! -s "$RT/certs/fullchain.pem" ]; then
    C=$RT/certs
    openssl req -x509 -new -newkey rsa:2048 -nodes -days 3650 -sha256 \
        -subj "/CN=mailstack test CA" -keyout "$C/ca.key" -out "$C/ca.pem" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    openssl req -new -newkey rsa:2048 -nodes -sha256 -subj "/CN=localhost" \
        -keyout "$C/server.key" -out "$C/server.csr" 2>/dev/null
    printf '%s\n' "basicConstraints=critical,CA:FALSE" \
        "keyUsage=critical,digitalSignature,keyEncipherment" \
        "extendedKeyUsage=serverAuth" \
        "subjectAltName=DNS:localhost,IP:127.0.0.1,DNS:mail.$DOMAIN" > "$C/server.ext"
    openssl x509 -req -in "$C/server.csr" -CA "$C/ca.pem" -CAkey "$C/ca.key" \
        -CAcreateserial -days 3650 -sha256 -extfile "$C/server.ext" -out "$C/server.pem" 2>/dev/null
    cat "$C/server.pem" "$C/ca.pem" > "$C/fullchain.pem"
    chmod 600 "$C"/*.key
fi

# ---------------------------------------------------------------- JWT keys --
# Dovecot looks the key up in the dict at  shared/<azp>/<alg>/<kid>
# (azp/kid default to "default"); with fs:posix:prefix=DIR/ that is the file
# DIR/<azp>/<alg>/<kid>.  HMAC keys are stored base64, RSA/EC keys as PEM.
K=$RT/oauth2
if [ ! -s "$K/hs256.secret.b64" ]; then
    openssl rand -base64 32 | tr -d '\n' > "$K/hs256.secret.b64"
    cp "$K/hs256.secret.b64" "$K/keys/default/HS256/default"
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$K/rs256-private.pem" 2>/dev/null
    chmod 644 "$K/rs256-private.pem"   # test-only key; tests may run unprivileged
    openssl pkey -in "$K/rs256-private.pem" -pubout -out "$K/keys/default/RS256/default"
fi
chown -R dovecot:dovecot "$K/keys"   # read by the auth process (runs as 'dovecot')

# ------------------------------------------------------------------- users --
# Users added at run time (tests append their own) survive a restart: only
# missing predefined users are added.
touch "$RT/etc/dovecot/users"
{
    for u in $USERS; do echo "$u@$DOMAIN:{PLAIN}${u}pw::::::"; done
    i=0; while [ "$i" -lt "$LOAD_USERS" ]; do echo "load$i@$DOMAIN:{PLAIN}loadpw::::::"; i=$((i+1)); done
} | while IFS= read -r line; do
    grep -qxF "$line" "$RT/etc/dovecot/users" || printf '%s\n' "$line" >> "$RT/etc/dovecot/users"
done
# Postfix accepts every address of the domain; Dovecot's passwd-file decides
# who exists.  Dovecot re-reads that file when it changes, so a test adds its
# own users (one line appended to etc/dovecot/users) without any restart and
# never shares a mailbox with another test.
printf '/^[^@]+@%s$/ OK\n' "$(echo "$DOMAIN" | sed 's/\./\\./g')" > "$PF_CONF/vmailbox"

# ----------------------------------------------------------------- dovecot --
cat > "$RT/etc/dovecot/oauth2.conf.ext" <<EOF
# oauth2 passdb: validate JWT bearer tokens locally (no IdP, no HTTP).
introspection_mode = local
local_validation_key_dict = fs:posix:prefix=$K/keys/
# claim that must equal the SASL user (user= in XOAUTH2, a= in OAUTHBEARER)
username_attribute = email
EOF

PROC_LIMIT=$(( MAX_CONN + 100 ))
CLIENT_LIMIT=$(( MAX_CONN * 2 + 1000 ))
# A login process (TLS proxy) and imap-hibernate hold about two descriptors
# per connection, and no process may open more than the hard limit on open
# files (20,000 on the 2-core test machine, whatever root asks): past a few
# thousand connections they are spread over more processes.
PER_PROCESS=4000
LOGIN_CLIENTS=$(( CLIENT_LIMIT < PER_PROCESS ? CLIENT_LIMIT : PER_PROCESS ))
LOGIN_PROCESSES=$(( MAX_CONN / PER_PROCESS + 8 ))
HIBERNATE_PROCESSES=$(( MAX_CONN / PER_PROCESS + 2 ))
cat > "$DC_CONF" <<EOF
# generated by start.sh - Dovecot 2.3 syntax
instance_name = mailstack
base_dir = $DC_BASE
state_dir = $RT/state/dovecot
log_path = $RT/log/dovecot.log
protocols = imap lmtp
listen = 127.0.0.1
hostname = mail.$DOMAIN
default_internal_user = dovecot
default_login_user = dovenull
shutdown_clients = yes

mail_uid = $MAIL_UID
mail_gid = $MAIL_UID
first_valid_uid = $MAIL_UID
mail_home = $RT/mail/%d/%n
mail_location = maildir:~/Maildir
# IDLE: inotify gives push; this stat() poll is only the fallback when the
# inotify instance limit (fs.inotify.max_user_instances) is exhausted.
mailbox_idle_check_interval = 2 secs

ssl = yes
ssl_cert = <$RT/certs/fullchain.pem
ssl_key = <$RT/certs/server.key
ssl_dh = </usr/share/dovecot/dh.pem

# tests talk plaintext on 127.0.0.1 too (Dovecot treats loopback as secured
# anyway, this makes it explicit)
disable_plaintext_auth = no
auth_mechanisms = plain login xoauth2 oauthbearer
# fail fast: default is a 2s delay per failure plus an anvil-tracked
# per-IP penalty growing 2,4,8,15s that delays *later* logins from 127.0.0.1
auth_failure_delay = 0
auth_verbose = yes

passdb {
  driver = passwd-file
  args = scheme=PLAIN username_format=%u $RT/etc/dovecot/users
  mechanisms = plain login
}
passdb {
  driver = oauth2
  args = $RT/etc/dovecot/oauth2.conf.ext
  mechanisms = xoauth2 oauthbearer
}
userdb {
  driver = passwd-file
  args = username_format=%u $RT/etc/dovecot/users
}

namespace inbox {
  inbox = yes
  separator = /
  mailbox Drafts {
    special_use = \\Drafts
    auto = subscribe
  }
  mailbox Sent {
    special_use = \\Sent
    auto = subscribe
  }
  mailbox Trash {
    special_use = \\Trash
    auto = subscribe
  }
  mailbox Junk {
    special_use = \\Junk
    auto = subscribe
  }
  mailbox Archive {
    special_use = \\Archive
    auto = subscribe
  }
}

# user+Box@domain delivered over LMTP lands in mailbox "Box" (used by
# MAILSTACK_AUTO_SENT for the Gmail-like copy into Sent)
recipient_delimiter = +
protocol lmtp {
  lmtp_save_to_detail_mailbox = yes
}

protocol imap {
  # default 10 per user+IP; every test connection comes from 127.0.0.1
  mail_max_userip_connections = $CLIENT_LIMIT
}

# capacity: one imap process per connection (default process_limit is 100)
default_process_limit = $PROC_LIMIT
default_client_limit = $CLIENT_LIMIT
default_vsz_limit = 1G

service imap-login {
  inet_listener imap {
    address = 127.0.0.1
    port = $IMAP_PORT
  }
  inet_listener imaps {
    address = 127.0.0.1
    port = $IMAPS_PORT
    ssl = yes
  }
  # high-performance mode: a few long-lived login processes that also proxy
  # TLS, instead of one process per (TLS) connection
  service_count = 0
  process_min_avail = 2
  process_limit = $LOGIN_PROCESSES
  client_limit = $LOGIN_CLIENTS
}
service imap {
  process_limit = $PROC_LIMIT
}
service lmtp {
  unix_listener lmtp {
    mode = 0666
  }
}
service auth {
  # Postfix smtpd talks to this socket for SASL (PLAIN/LOGIN/XOAUTH2)
  unix_listener auth-client {
    mode = 0666
  }
}
service anvil {
  # no listener => auth-penalty disabled (see auth_failure_delay above)
  unix_listener anvil-auth-penalty {
    mode = 0
  }
}
EOF

if [ "$HIBERNATE" = 1 ]; then
    cat >> "$DC_CONF" <<EOF
# IDLE connections idle for 5s are handed to the single imap-hibernate
# process and their imap process exits; a change re-spawns an imap process.
imap_hibernate_timeout = 5s
service imap-hibernate {
  unix_listener imap-hibernate {
    mode = 0660
    group = \$default_internal_group
  }
  client_limit = $PER_PROCESS
  process_limit = $HIBERNATE_PROCESSES
}
service imap {
  # imap (uid $MAIL_UID) must reach the imap-hibernate socket, and
  # imap-hibernate (user dovecot) must reach imap-master to un-hibernate
  extra_groups = \$default_internal_group
  unix_listener imap-master {
    user = \$default_internal_user
  }
}
EOF
fi

# ----------------------------------------------------------------- postfix --
cat > "$PF_CONF/main.cf" <<EOF
# generated by start.sh
compatibility_level = 3.6
queue_directory = $PF_QUEUE
data_directory = $RT/lib/postfix
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
meta_directory = /etc/postfix
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
# no syslog in containers: log to a file through postlogd
maillog_file = $RT/log/postfix.log
maillog_file_prefixes = $RT/log
myhostname = mail.$DOMAIN
mydomain = $DOMAIN
myorigin = \$mydomain
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_peername_lookup = no
smtp_dns_support_level = disabled
biff = no
append_dot_mydomain = no
alias_maps =
alias_database =
local_recipient_maps =
relayhost =
# XOAUTH2 initial responses easily exceed the 2048 default (M365 tokens);
# Dovecot's auth protocol caps a line at 16 KiB anyway.
line_length_limit = 16384
# Gmail accepts about 35 MB per message (SIZE 35882577); the default 10 MB
# would refuse a send with 25 MB of attachments once base64-encoded.
message_size_limit = 41943040
mailbox_size_limit = 0
# local domain -> Dovecot LMTP; every other recipient is rewritten to
# sink@$DOMAIN so "outbound" mail stays inspectable over IMAP
virtual_mailbox_domains = $DOMAIN
virtual_mailbox_maps = regexp:$PF_CONF/vmailbox
virtual_alias_domains =
virtual_alias_maps = regexp:$PF_CONF/virtual_alias.regexp
virtual_transport = lmtp:unix:$DC_BASE/lmtp
# One recipient per LMTP delivery, so Dovecot writes Delivered-To (it does
# not with several): a catch-all MX must leave the smart address it was
# reached by (Auto BCC, door 2), as providers' MX do.
lmtp_destination_recipient_limit = 1
default_transport = error:outbound delivery disabled in test stack
smtpd_tls_chain_files = $RT/certs/server.key, $RT/certs/fullchain.pem
smtpd_tls_security_level = may
smtpd_sasl_type = dovecot
smtpd_sasl_path = $DC_BASE/auth-client
smtpd_sasl_auth_enable = no
smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination
# alice+Sent@ is looked up as alice@ in virtual_mailbox_maps
recipient_delimiter = +
EOF
cat > "$PF_CONF/virtual_alias.regexp" <<EOF
if !/@$(echo "$DOMAIN" | sed 's/\./\\./g')\$/
/^.*\$/ sink@$DOMAIN
endif
EOF
printf '/^([^@+]+)@%s$/ ${1}+Sent@%s\n' "$(echo "$DOMAIN" | sed 's/\./\\./g')" "$DOMAIN" > "$PF_CONF/sent_bcc.regexp"
SUBMISSION_CLEANUP=cleanup
[ "$AUTO_SENT" = 1 ] && SUBMISSION_CLEANUP=subcleanup
# Recipients starting with "reject-" get a permanent 550 at RCPT time, so tests
# can see how a client handles a recipient the server refuses for good.
printf '/^reject-/ 550 5.1.1 mailbox unavailable (test stack)\n' > "$PF_CONF/reject_recipients.regexp"
SUBMISSION_OPTS='  -o cleanup_service_name='$SUBMISSION_CLEANUP'
  -o smtpd_sasl_auth_enable=yes
  -o smtpd_client_restrictions=permit_sasl_authenticated,reject
  -o smtpd_relay_restrictions=permit_sasl_authenticated,reject
  -o smtpd_recipient_restrictions=check_recipient_access,regexp:'$PF_CONF'/reject_recipients.regexp,permit_sasl_authenticated,reject'
cat > "$PF_CONF/master.cf" <<EOF
# generated by start.sh - nothing chrooted (Debian's default chroot
# needs copies of files and sockets inside the queue dir)
# service type  private unpriv  chroot  wakeup  maxproc command + args
127.0.0.1:$SMTP_PORT inet n - n - - smtpd
127.0.0.1:$SUBMISSION_PORT inet n - n - - smtpd
  -o syslog_name=postfix/submission
  -o smtpd_tls_auth_only=no
$SUBMISSION_OPTS
127.0.0.1:$SUBMISSIONS_PORT inet n - n - - smtpd
  -o syslog_name=postfix/submissions
  -o smtpd_tls_wrappermode=yes
$SUBMISSION_OPTS
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
subcleanup unix n       -       n       -       0       cleanup
  -o sender_bcc_maps=regexp:$PF_CONF/sent_bcc.regexp
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
EOF

# Postfix refuses to read a config file modified within the last second or two
# ("pausing to let main.cf cool down", 300ms steps): backdate the files.
touch -d '-1 minute' "$PF_CONF"/*

# ------------------------------------------------------------------ limits --
# One inotify instance per IDLE-ing imap process, all under MAIL_UID, plus a
# transient second one while a process waits for a Maildir dotlock
# (file-dotlock.c creates a private ioloop + io_add_notify).  The kernel
# default of 128 silently turns IDLE push into polling past ~128 connections.
# The old value is saved and put back by stop.sh.
want=$(( MAX_CONN * 3 + 1024 ))
cur=$(cat /proc/sys/fs/inotify/max_user_instances 2>/dev/null || echo 0)
if [ "$cur" -lt "$want" ]; then
    if echo "$want" > /proc/sys/fs/inotify/max_user_instances 2>/dev/null; then
        [ -f "$RT/run/inotify_max_user_instances.orig" ] || echo "$cur" > "$RT/run/inotify_max_user_instances.orig"
    else
        log "WARNING: cannot raise fs.inotify.max_user_instances ($cur); IDLE beyond ~$cur connections falls back to 2s polling"
    fi
fi
# file descriptors: log/stats/anvil each hold one fd per imap process
ulimit -Hn 1048576 2>/dev/null || true
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# ------------------------------------------------------------------- start --
# stale sockets/pid from a previous run would fool the readiness checks
rm -rf "$DC_BASE" "$PF_QUEUE/pid"
: > "$RT/log/dovecot.stderr"
dovecot -c "$DC_CONF" -n >/dev/null 2>"$RT/log/dovecot-config.err" \
    || die "dovecot config error: $(cat "$RT/log/dovecot-config.err")"
# -F keeps the master in the foreground; setsid detaches it from this shell so
# it survives the script and every dovecot process shares one session id.
setsid dovecot -c "$DC_CONF" -F </dev/null >>"$RT/log/dovecot.stderr" 2>&1 &
echo $! > "$RT/run/dovecot.pid"

if [ "$NO_POSTFIX" != 1 ]; then
    # `postfix check` creates the queue dirs with the right owners; postfix
    # prints errors only to a tty or to the maillog, so capture them via
    # `script` to have something to show on failure.
    if ! postfix -c "$PF_CONF" check >/dev/null 2>&1; then
        script -q -c "postfix -c $PF_CONF check" /dev/null >&2 || true
        die "postfix check failed"
    fi
    for i in $(seq 100); do [ -S "$DC_BASE/auth-client" ] && break; sleep 0.05; done
    if ! postfix -c "$PF_CONF" start >/dev/null 2>&1; then
        script -q -c "postfix -c $PF_CONF start" /dev/null >&2 || true
        tail -5 "$RT/log/postfix.log" >&2 || true
        die "postfix start failed"
    fi
fi

if ! wait_ready 30; then
    tail -20 "$RT/log/dovecot.log" "$RT/log/dovecot.stderr" "$RT/log/postfix.log" >&2 2>/dev/null || true
    die "stack not ready after 30s"
fi
# the implicit-TLS port must present a cert that verifies against our CA
if ! openssl s_client -connect "127.0.0.1:$IMAPS_PORT" -CAfile "$RT/certs/ca.pem" \
        -verify_return_error -verify_hostname localhost -brief </dev/null >/dev/null 2>&1; then
    die "TLS check on $IMAPS_PORT failed"
fi

cat > "$RT/stack.env" <<EOF
MAILSTACK_RUNTIME=$RT
MAILSTACK_DOMAIN=$DOMAIN
MAILSTACK_IMAP_PORT=$IMAP_PORT
MAILSTACK_IMAPS_PORT=$IMAPS_PORT
MAILSTACK_SUBMISSION_PORT=$SUBMISSION_PORT
MAILSTACK_SUBMISSIONS_PORT=$SUBMISSIONS_PORT
MAILSTACK_SMTP_PORT=$SMTP_PORT
MAILSTACK_LMTP_SOCKET=$DC_BASE/lmtp
MAILSTACK_CA_CERT=$RT/certs/ca.pem
MAILSTACK_JWT_HS256_SECRET_B64=$(cat "$K/hs256.secret.b64")
MAILSTACK_JWT_RS256_PRIVATE_KEY=$K/rs256-private.pem
MAILSTACK_USERS="$USERS"
MAILSTACK_USERS_FILE=$RT/etc/dovecot/users
MAILSTACK_DOVECOT_LOG=$RT/log/dovecot.log
MAILSTACK_POSTFIX_LOG=$RT/log/postfix.log
MAILSTACK_AUTO_SENT=$AUTO_SENT
MAILSTACK_HIBERNATE=$HIBERNATE
EOF
log "started in $(( $(date +%s%3N) - T0 )) ms"
print_info
