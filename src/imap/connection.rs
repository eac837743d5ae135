//! Opening an authenticated IMAP session: TCP, implicit TLS or STARTTLS (plain
//! only towards loopback), the greeting, and login. Every step has a deadline.

use std::{
    net::IpAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use async_imap::{Client, Session};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::{TlsConnector, client::TlsStream};

use crate::{
    egress::{Egress, EgressError},
    model::{Endpoint, Login, Security},
};

/// A connection to a mail server, encrypted or (loopback only) not.
pub enum MailStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl std::fmt::Debug for MailStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MailStream::Plain(_) => "MailStream::Plain",
            MailStream::Tls(_) => "MailStream::Tls",
        })
    }
}

impl AsyncRead for MailStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MailStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MailStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for MailStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            MailStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MailStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MailStream::Plain(s) => Pin::new(s).poll_flush(cx),
            MailStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MailStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MailStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

pub type ImapSession = Session<MailStream>;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The server refused the credentials; its own words.
    #[error("the server rejected the login: {0}")]
    Rejected(String),
    /// The server refused the login for a reason of its own that passes
    /// (RFC 5530 `[UNAVAILABLE]`, `[INUSE]`, `[LIMIT]`, throttling): not a
    /// verdict on the credentials.
    #[error("the server cannot take the login now: {0}")]
    Unavailable(String),
    /// The credentials are dead and `needs_reauth` is recorded (R20).
    #[error("the mailbox needs new credentials: {0}")]
    NeedsReauth(String),
    /// The mailbox was disconnected meanwhile.
    #[error("the mailbox is no longer connected")]
    Disconnected,
    /// Refused, reset, timed out or not resolved alike: an answer must not
    /// tell an API caller which internal hosts and ports exist (the reason
    /// is logged for the operator).
    #[error("could not connect to {0}")]
    Unreachable(String),
    /// An address the bridge does not connect to (see `egress`).
    #[error("{0}")]
    Forbidden(String),
    #[error("TLS with {host} failed: {reason}")]
    Tls { host: String, reason: String },
    #[error(
        "refusing an unencrypted connection to {0}: security \"plain\" is only allowed towards a loopback address"
    )]
    Insecure(String),
    #[error("IMAP protocol error: {0}")]
    Protocol(String),
    #[error("timed out while {0}")]
    Timeout(&'static str),
}

/// Whether `host` is an IP address rather than a name.
fn is_ip_literal(host: &str) -> bool {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .is_ok()
}

/// Opens sessions with one TLS configuration and one per-step deadline.
#[derive(Clone)]
pub struct ImapConnector {
    tls: Arc<ClientConfig>,
    step_timeout: Duration,
    egress: Egress,
    gate: super::login_gate::LoginGate,
}

/// Words by which servers refuse a login for now rather than for good: RFC 5530
/// codes, Dovecot's "Temporary authentication failure", Gmail's "Too many
/// simultaneous connections" and `[THROTTLED]`, Exchange Online's "Request is
/// throttled" and "Server Unavailable" (see docs/provider-wire-facts.md).
const TRANSIENT_REFUSALS: [&str; 9] = [
    "[UNAVAILABLE]",
    "[INUSE]",
    "[LIMIT]",
    "[THROTTLED]",
    "[OVERQUOTA]",
    "temporary authentication failure",
    "too many simultaneous connections",
    "request is throttled",
    "server unavailable",
];

/// Sorts a refused login: transient words mean "try later", anything else is
/// a refusal of the credentials.
pub fn refusal(words: String) -> ConnectError {
    let lower = words.to_ascii_lowercase();
    if TRANSIENT_REFUSALS
        .iter()
        .any(|marker| lower.contains(&marker.to_ascii_lowercase()))
    {
        ConnectError::Unavailable(words)
    } else {
        ConnectError::Rejected(words)
    }
}

/// SASL XOAUTH2 (Google's and Microsoft's IMAP/SMTP OAuth2 mechanism). On
/// failure the server sends its reason as a second challenge (base64 JSON such
/// as `{"status":"401","schemes":"bearer"}`) and waits for an empty line before
/// its tagged NO; answering anything else leaves the exchange hanging or BAD.
struct XOAuth2<'a> {
    username: &'a str,
    access_token: &'a str,
    sent: bool,
}

impl async_imap::Authenticator for &mut XOAuth2<'_> {
    type Response = Vec<u8>;

    fn process(&mut self, _challenge: &[u8]) -> Vec<u8> {
        if self.sent {
            return Vec::new();
        }
        self.sent = true;
        format!(
            "user={}\x01auth=Bearer {}\x01\x01",
            self.username, self.access_token
        )
        .into_bytes()
    }
}

/// async-imap renders a NO as `code: None, info: Some("…")`; the server's own
/// words are the part worth showing.
fn server_words(text: &str) -> String {
    text.split_once("info: Some(\"")
        .and_then(|(_, rest)| rest.rsplit_once("\")"))
        .map(|(words, _)| words.replace("\\\"", "\""))
        .unwrap_or_else(|| text.trim().to_string())
}

pub fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

/// TCP keepalive for an IMAP session. An IDLE session is silent for
/// minutes: without probes, a connection that died on the way (NAT timeout, a
/// dropped route) is noticed only at the next IDLE renewal; with them, within
/// about two minutes. The first probe comes after 30 to 59 s of silence and
/// they repeat every 10 to 14 s, drawn per connection: sessions that began
/// together (a restart, thousands of logins in a few minutes) would otherwise
/// probe together for good. At 10,000 sessions on one machine, such bursts
/// overflowed the kernel's backlog queue (`netdev_max_backlog`, 1,000
/// packets); probes were dropped three times running, and thousands of
/// healthy sessions ended at once with "Connection timed out".
fn keepalive() -> socket2::TcpKeepalive {
    socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(30 + fastrand::u64(0..30)))
        .with_interval(Duration::from_secs(10 + fastrand::u64(0..5)))
        .with_retries(3)
}

impl ImapConnector {
    pub fn new(tls: Arc<ClientConfig>, step_timeout: Duration, egress: Egress) -> Self {
        Self {
            tls,
            step_timeout,
            egress,
            gate: super::login_gate::LoginGate::unlimited(),
        }
    }

    /// Every login waits at `gate` for its turn (see `login_gate`).
    pub fn with_login_gate(self, gate: super::login_gate::LoginGate) -> Self {
        Self { gate, ..self }
    }

    pub fn step_timeout(&self) -> Duration {
        self.step_timeout
    }

    async fn step<T, E: std::fmt::Display>(
        &self,
        what: &'static str,
        future: impl Future<Output = Result<T, E>>,
        wrap: impl FnOnce(String) -> ConnectError,
    ) -> Result<T, ConnectError> {
        match tokio::time::timeout(self.step_timeout, future).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => Err(wrap(format!("{err:#}"))),
            Err(_) => Err(ConnectError::Timeout(what)),
        }
    }

    async fn tls_wrap(
        &self,
        endpoint: &Endpoint,
        tcp: TcpStream,
    ) -> Result<MailStream, ConnectError> {
        let host = endpoint
            .host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let name = ServerName::try_from(host.clone()).map_err(|e| ConnectError::Tls {
            host: host.clone(),
            reason: e.to_string(),
        })?;
        let tls = self
            .step(
                "negotiating TLS",
                TlsConnector::from(self.tls.clone()).connect(name, tcp),
                |reason| ConnectError::Tls {
                    host: host.clone(),
                    reason,
                },
            )
            .await?;
        Ok(MailStream::Tls(Box::new(tls)))
    }

    /// A TCP connection to the first address of `host` that answers, among
    /// those the egress policy allows: the addresses checked are the ones
    /// connected to (no second lookup a DNS answer could change meanwhile).
    async fn connect_checked(&self, host: &str, port: u16) -> Result<TcpStream, ConnectError> {
        let shown = format!("{host}:{port}");
        let addresses = match tokio::time::timeout(
            self.step_timeout,
            self.egress.resolve(host, port),
        )
        .await
        {
            Ok(Ok(addresses)) => addresses,
            // An IP address given is judged openly; a name that resolves to
            // refused addresses answers like one that does not resolve, so
            // the answer does not tell which internal names exist.
            Ok(Err(err @ EgressError::Forbidden(..))) if is_ip_literal(host) => {
                return Err(ConnectError::Forbidden(err.to_string()));
            }
            Ok(Err(err @ EgressError::Forbidden(..))) => {
                tracing::warn!(%shown, "not connecting: {err}");
                return Err(ConnectError::Unreachable(shown));
            }
            Ok(Err(EgressError::Unreachable(_))) | Err(_) => {
                tracing::debug!(%shown, "the IMAP server's name did not resolve in time or at all");
                return Err(ConnectError::Unreachable(shown));
            }
        };
        for address in addresses {
            match tokio::time::timeout(self.step_timeout, TcpStream::connect(address)).await {
                Ok(Ok(tcp)) => return Ok(tcp),
                Ok(Err(err)) => tracing::debug!(%shown, %address, "connecting failed: {err}"),
                Err(_) => tracing::debug!(%shown, %address, "connecting timed out"),
            }
        }
        Err(ConnectError::Unreachable(shown))
    }

    /// Connects and logs in.
    pub async fn open(
        &self,
        endpoint: &Endpoint,
        login: &Login,
    ) -> Result<ImapSession, ConnectError> {
        use futures_util::FutureExt as _;
        let _turn = self.gate.admit(&endpoint.host, endpoint.port).await;
        // imap-proto 0.17 panicked on some malformed answers (the vendored
        // copy no longer does on the two known). Should a parser still
        // panic, a server that makes it must cost a failed login, never the
        // task (or an API request) that asked.
        match std::panic::AssertUnwindSafe(self.open_unguarded(endpoint, login))
            .catch_unwind()
            .await
        {
            Ok(result) => result,
            Err(_) => Err(ConnectError::Protocol(format!(
                "{}:{} sent an answer the IMAP parser could not read",
                endpoint.host, endpoint.port
            ))),
        }
    }

    async fn open_unguarded(
        &self,
        endpoint: &Endpoint,
        login: &Login,
    ) -> Result<ImapSession, ConnectError> {
        if endpoint.security == Security::Plain && !is_loopback(&endpoint.host) {
            return Err(ConnectError::Insecure(endpoint.host.clone()));
        }
        let tcp = self.connect_checked(&endpoint.host, endpoint.port).await?;
        let _ = tcp.set_nodelay(true);
        let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive());
        let client = match endpoint.security {
            Security::Tls => {
                let mut client = Client::new(self.tls_wrap(endpoint, tcp).await?);
                self.greeting(&mut client).await?;
                client
            }
            Security::Plain => {
                let mut client = Client::new(MailStream::Plain(tcp));
                self.greeting(&mut client).await?;
                client
            }
            Security::Starttls => {
                let mut plain = Client::new(tcp);
                match tokio::time::timeout(self.step_timeout, plain.read_response()).await {
                    Ok(Ok(Some(_))) => {}
                    Ok(Ok(None)) => {
                        return Err(ConnectError::Protocol(
                            "connection closed before the greeting".into(),
                        ));
                    }
                    Ok(Err(e)) => return Err(ConnectError::Protocol(format!("greeting: {e}"))),
                    Err(_) => return Err(ConnectError::Timeout("waiting for the greeting")),
                }
                self.step(
                    "starting TLS",
                    plain.run_command_and_check_ok("STARTTLS", None),
                    |e| ConnectError::Protocol(format!("STARTTLS refused: {e}")),
                )
                .await?;
                // No greeting follows STARTTLS; anything buffered before it is dropped.
                Client::new(self.tls_wrap(endpoint, plain.into_inner()).await?)
            }
        };
        let result = match login {
            Login::Password { username, password } => {
                tokio::time::timeout(self.step_timeout, client.login(username, password)).await
            }
            Login::Bearer {
                username,
                access_token,
            } => {
                if [username, access_token]
                    .iter()
                    .any(|s| s.contains(['\r', '\n', '\x01']))
                {
                    return Err(ConnectError::Rejected(
                        "the token or user name contains a character SASL cannot carry".into(),
                    ));
                }
                let mut mechanism = XOAuth2 {
                    username,
                    access_token,
                    sent: false,
                };
                tokio::time::timeout(
                    self.step_timeout,
                    client.authenticate("XOAUTH2", &mut mechanism),
                )
                .await
            }
        };
        match result {
            Ok(Ok(session)) => Ok(session),
            Ok(Err((async_imap::error::Error::No(text), _))) => Err(refusal(server_words(&text))),
            Ok(Err((async_imap::error::Error::Validate(e), _))) => Err(ConnectError::Rejected(
                format!("credentials contain a character IMAP cannot carry: {e}"),
            )),
            Ok(Err((err, _))) => Err(ConnectError::Protocol(format!("login: {err}"))),
            Err(_) => Err(ConnectError::Timeout("logging in")),
        }
    }

    async fn greeting(&self, client: &mut Client<MailStream>) -> Result<(), ConnectError> {
        // async-imap does not read the greeting itself; the next command would hang.
        match tokio::time::timeout(self.step_timeout, client.read_response()).await {
            Ok(Ok(Some(_))) => Ok(()),
            Ok(Ok(None)) => Err(ConnectError::Protocol(
                "connection closed before the greeting".into(),
            )),
            Ok(Err(e)) => Err(ConnectError::Protocol(format!("greeting: {e}"))),
            Err(_) => Err(ConnectError::Timeout("waiting for the greeting")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 11: sessions that begin together do not probe together.
    #[test]
    fn keepalive_probes_are_spread_per_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address");
        let mut idle_times = std::collections::BTreeSet::new();
        let mut intervals = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let stream = std::net::TcpStream::connect(address).expect("connect");
            // Taken off the listener's queue, which would fill otherwise.
            let _accepted = listener.accept().expect("accept");
            let socket = socket2::SockRef::from(&stream);
            socket.set_tcp_keepalive(&keepalive()).expect("keepalive");
            idle_times.insert(socket.tcp_keepalive_time().expect("idle time").as_secs());
            intervals.insert(socket.tcp_keepalive_interval().expect("interval").as_secs());
        }
        assert!(
            idle_times.iter().all(|secs| (30..60).contains(secs)),
            "{idle_times:?}"
        );
        assert!(idle_times.len() >= 20, "spread: {idle_times:?}");
        assert!(
            intervals.iter().all(|secs| (10..15).contains(secs)),
            "{intervals:?}"
        );
        assert!(intervals.len() >= 3, "spread: {intervals:?}");
    }

    #[test]
    fn server_words_are_taken_from_async_imaps_rendering() {
        assert_eq!(
            server_words(
                r#"code: None, info: Some("[AUTHENTICATIONFAILED] Authentication failed.")"#
            ),
            "[AUTHENTICATIONFAILED] Authentication failed."
        );
        assert_eq!(server_words(" plain words "), "plain words");
    }

    #[test]
    fn transient_refusals_are_not_verdicts_on_the_credentials() {
        for words in [
            "[UNAVAILABLE] Temporary authentication failure. [host:2026-12-01]",
            "[INUSE] Mailbox is locked",
            "[LIMIT] Too many connections",
            "[ALERT] Too many simultaneous connections. (Failure)",
            "Success [THROTTLED]",
            "Request is throttled. Suggested Backoff Time: 92415 milliseconds",
            "Server Unavailable. 15",
        ] {
            assert!(
                matches!(refusal(words.into()), ConnectError::Unavailable(_)),
                "{words}"
            );
        }
        for words in [
            "[AUTHENTICATIONFAILED] Authentication failed.",
            "[AUTHENTICATIONFAILED] Invalid credentials (Failure)",
            "AUTHENTICATE failed.",
            "[ALERT] Application-specific password required: https://support.google.com/accounts/answer/185833 (Failure)",
        ] {
            assert!(
                matches!(refusal(words.into()), ConnectError::Rejected(_)),
                "{words}"
            );
        }
    }

    #[test]
    fn plain_is_only_for_loopback() {
        assert!(is_loopback("127.0.0.1"));
        assert!(is_loopback("::1"));
        assert!(is_loopback("[::1]"));
        assert!(is_loopback("localhost"));
        assert!(!is_loopback("imap.gmail.com"));
        assert!(!is_loopback("10.0.0.1"));
    }

    /// Found by the fuzz test (`checked::tests`): imap-proto 0.17 panicked on
    /// a response code followed by non-ASCII text. The vendored copy reads
    /// it: a login so refused is refused with the server's words.
    #[tokio::test]
    async fn a_refusal_with_text_right_after_its_code_is_read_with_the_servers_words() {
        use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let (read, mut write) = socket.into_split();
            write.write_all(b"* OK ready\r\n").await.unwrap();
            let mut lines = tokio::io::BufReader::new(read).lines();
            if let Ok(Some(line)) = lines.next_line().await {
                let tag = line.split(' ').next().unwrap_or("a").to_string();
                let answer = format!("{tag} NO [ALERT]\u{e9}chec de connexion\r\n");
                let _ = write.write_all(answer.as_bytes()).await;
            }
            let _ = lines.next_line().await;
        });
        let connector = ImapConnector::new(
            crate::tls::client_config(&[]).unwrap(),
            Duration::from_secs(5),
            Egress {
                allow_private: true,
            },
        );
        let endpoint = Endpoint {
            host: "127.0.0.1".into(),
            port,
            security: Security::Plain,
        };
        let login = Login::Password {
            username: "me@x.test".into(),
            password: "pw".into(),
        };
        let opened = connector.open(&endpoint, &login).await;
        assert!(
            matches!(opened, Err(ConnectError::Rejected(ref words)) if words == "\u{e9}chec de connexion"),
            "{:?}",
            opened.err()
        );
    }
}
