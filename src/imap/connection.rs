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

use crate::model::{Credentials, Endpoint, Security};

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
    #[error("cannot reach {0}")]
    Unreachable(String),
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

impl ConnectError {
    /// Whether retrying with the same credentials is pointless (R20).
    pub fn is_rejected_login(&self) -> bool {
        matches!(self, ConnectError::Rejected(_))
    }
}

/// Opens sessions with one TLS configuration and one per-step deadline.
#[derive(Clone)]
pub struct ImapConnector {
    tls: Arc<ClientConfig>,
    step_timeout: Duration,
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

impl ImapConnector {
    pub fn new(tls: Arc<ClientConfig>, step_timeout: Duration) -> Self {
        Self { tls, step_timeout }
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

    /// Connects and logs in.
    pub async fn open(
        &self,
        endpoint: &Endpoint,
        credentials: &Credentials,
    ) -> Result<ImapSession, ConnectError> {
        let address = format!("{}:{}", endpoint.host, endpoint.port);
        if endpoint.security == Security::Plain && !is_loopback(&endpoint.host) {
            return Err(ConnectError::Insecure(endpoint.host.clone()));
        }
        let tcp = self
            .step("connecting", TcpStream::connect(&address), |e| {
                ConnectError::Unreachable(format!("{address}: {e}"))
            })
            .await?;
        let _ = tcp.set_nodelay(true);
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
        match credentials {
            Credentials::Password { username, password } => {
                match tokio::time::timeout(self.step_timeout, client.login(username, password))
                    .await
                {
                    Ok(Ok(session)) => Ok(session),
                    Ok(Err((async_imap::error::Error::No(text), _))) => {
                        Err(ConnectError::Rejected(server_words(&text)))
                    }
                    Ok(Err((async_imap::error::Error::Validate(e), _))) => {
                        Err(ConnectError::Rejected(format!(
                            "credentials contain a character IMAP cannot carry: {e}"
                        )))
                    }
                    Ok(Err((err, _))) => Err(ConnectError::Protocol(format!("login: {err}"))),
                    Err(_) => Err(ConnectError::Timeout("logging in")),
                }
            }
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
    fn plain_is_only_for_loopback() {
        assert!(is_loopback("127.0.0.1"));
        assert!(is_loopback("::1"));
        assert!(is_loopback("[::1]"));
        assert!(is_loopback("localhost"));
        assert!(!is_loopback("imap.gmail.com"));
        assert!(!is_loopback("10.0.0.1"));
    }
}
