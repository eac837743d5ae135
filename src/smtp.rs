//! Submitting a message over SMTP from a user's own mailbox with lettre:
//! implicit TLS or STARTTLS (plain only towards loopback), the configured extra
//! roots, PLAIN/LOGIN or XOAUTH2 authentication.
//!
//! The conversation is driven step by step, each step under its own deadline:
//! lettre's own timeout covers only the TCP connect, so a server that accepts
//! the connection and then stalls (no greeting, no reply to DATA) would hold
//! the mailbox's queue forever. Errors are sorted into what a retry can fix,
//! what it cannot, and what nobody can tell: once the message's end was
//! written, a lost connection or a silent server leaves its fate unknown.

use std::{path::PathBuf, time::Duration};

use lettre::{
    address::Envelope,
    transport::smtp::{
        authentication::{Credentials as SmtpCredentials, Mechanism},
        client::{AsyncSmtpConnection, Certificate, TlsParameters},
        commands::{Data, Mail, Rcpt},
        extension::{ClientId, Extension, MailBodyParameter, MailParameter},
    },
};

use crate::{
    imap::connection::is_loopback,
    model::{Endpoint, Login, Security},
};

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The server refused for good (5xx); its words.
    #[error("{0}")]
    Permanent(String),
    /// Worth another try later: 4xx, a lost connection or a timeout before
    /// the message was handed over. Nothing was sent.
    #[error("{0}")]
    Transient(String),
    /// The server refused the credentials.
    #[error("{0}")]
    Rejected(String),
    /// The whole message was written but no verdict came back (the connection
    /// dropped, or the server fell silent): it may or may not have been taken.
    #[error("{0}")]
    Unknown(String),
}

#[derive(Clone)]
pub struct Submitter {
    extra_roots: Vec<Vec<u8>>,
    /// The deadline of each step of the conversation.
    timeout: Duration,
    egress: crate::egress::Egress,
}

/// A message's end must arrive at least this fast (a slow link still finishes
/// 25 MB; a stalled one is noticed).
const MIN_UPLOAD_BYTES_PER_SEC: u64 = 64 * 1024;

impl Submitter {
    pub fn new(
        extra_roots: &[PathBuf],
        timeout: Duration,
        egress: crate::egress::Egress,
    ) -> anyhow::Result<Self> {
        let extra_roots = extra_roots
            .iter()
            .map(|p| std::fs::read(p).map_err(|e| anyhow::anyhow!("reading {}: {e}", p.display())))
            .collect::<anyhow::Result<_>>()?;
        Ok(Self {
            extra_roots,
            timeout,
            egress,
        })
    }

    fn tls(&self, host: &str) -> Result<TlsParameters, SubmitError> {
        let mut builder = TlsParameters::builder(host.to_string());
        for pem in &self.extra_roots {
            let certificate = Certificate::from_pem(pem)
                .map_err(|e| SubmitError::Permanent(format!("tls.extra_roots: {e}")))?;
            builder = builder.add_root_certificate(certificate);
        }
        builder
            .build_rustls()
            .map_err(|e| SubmitError::Permanent(format!("TLS setup for {host}: {e}")))
    }

    /// Submits `raw` to `recipients`; returns the server's reply to the end of DATA.
    pub async fn submit(
        &self,
        endpoint: &Endpoint,
        login: &Login,
        from: &str,
        recipients: &[String],
        raw: &[u8],
    ) -> Result<String, SubmitError> {
        let (wrapper, starttls) = match endpoint.security {
            Security::Tls => (Some(self.tls(&endpoint.host)?), None),
            Security::Starttls => (None, Some(self.tls(&endpoint.host)?)),
            Security::Plain if is_loopback(&endpoint.host) => (None, None),
            Security::Plain => {
                return Err(SubmitError::Permanent(format!(
                    "refusing an unencrypted SMTP connection to {}",
                    endpoint.host
                )));
            }
        };
        let (mechanisms, secret) = match login {
            Login::Password { password, .. } => {
                (vec![Mechanism::Plain, Mechanism::Login], password)
            }
            Login::Bearer { access_token, .. } => (vec![Mechanism::Xoauth2], access_token),
        };
        let credentials = SmtpCredentials::new(login.username().to_string(), secret.clone());
        let envelope = Envelope::new(
            Some(
                from.parse()
                    .map_err(|e| SubmitError::Permanent(format!("from {from:?}: {e}")))?,
            ),
            recipients
                .iter()
                .map(|r| {
                    r.parse()
                        .map_err(|e| SubmitError::Permanent(format!("recipient {r:?}: {e}")))
                })
                .collect::<Result<_, _>>()?,
        )
        .map_err(|e| SubmitError::Permanent(format!("envelope: {e}")))?;
        let hello = ClientId::default();
        // The addresses checked are the ones connected to: TLS still checks
        // the certificate against the host name.
        let addresses = match tokio::time::timeout(
            self.timeout,
            self.egress.resolve(&endpoint.host, endpoint.port),
        )
        .await
        {
            Ok(Ok(addresses)) => addresses,
            Ok(Err(err @ crate::egress::EgressError::Forbidden(..))) => {
                return Err(SubmitError::Permanent(err.to_string()));
            }
            Ok(Err(err)) => return Err(SubmitError::Transient(err.to_string())),
            Err(_) => {
                return Err(SubmitError::Transient(format!(
                    "could not connect to {}:{}",
                    endpoint.host, endpoint.port
                )));
            }
        };

        // A fresh connection per send: credentials may have changed (a
        // renewed token), and a pool would keep connections logged in with old ones.
        let mut conn = self
            .step(
                "connecting, the greeting and EHLO",
                AsyncSmtpConnection::connect_tokio1(
                    addresses.as_slice(),
                    Some(self.timeout),
                    &hello,
                    wrapper,
                    None,
                ),
            )
            .await?;
        if let Some(parameters) = starttls {
            if !conn.can_starttls() {
                return Err(SubmitError::Permanent(format!(
                    "{} offers no STARTTLS; use \"security\": \"tls\" if it speaks implicit TLS",
                    endpoint.host
                )));
            }
            self.step("starting TLS", conn.starttls(parameters, &hello))
                .await?;
        }
        self.step("authenticating", conn.auth(&mechanisms, &credentials))
            .await?;
        let mut options = Vec::new();
        let non_ascii_address = envelope
            .from()
            .into_iter()
            .chain(envelope.to())
            .any(|address| !AsRef::<str>::as_ref(address).is_ascii());
        if non_ascii_address {
            if !conn.server_info().supports_feature(Extension::SmtpUtfEight) {
                return Err(SubmitError::Permanent(
                    "an address is not ASCII and the server does not offer SMTPUTF8".into(),
                ));
            }
            options.push(MailParameter::SmtpUtfEight);
        }
        if !raw.is_ascii() {
            if !conn.server_info().supports_feature(Extension::EightBitMime) {
                return Err(SubmitError::Permanent(
                    "the message is not 7-bit and the server does not offer 8BITMIME".into(),
                ));
            }
            options.push(MailParameter::Body(MailBodyParameter::EightBitMime));
        }
        self.step(
            "MAIL FROM",
            conn.command(Mail::new(envelope.from().cloned(), options)),
        )
        .await?;
        for recipient in envelope.to() {
            self.step(
                "RCPT TO",
                conn.command(Rcpt::new(recipient.clone(), vec![])),
            )
            .await?;
        }
        self.step("DATA", conn.command(Data)).await?;
        // From here on the message may be taken even if no reply comes.
        let upload =
            self.timeout + Duration::from_secs(raw.len() as u64 / MIN_UPLOAD_BYTES_PER_SEC);
        let response = match tokio::time::timeout(upload, conn.message(raw)).await {
            Ok(Ok(response)) => response,
            // The server answered: its verdict stands.
            Ok(Err(err)) if err.status().is_some() => return Err(classify(&err)),
            Ok(Err(err)) => {
                return Err(SubmitError::Unknown(format!(
                    "the connection failed after the message was handed over, before the server's verdict: {err}"
                )));
            }
            Err(_) => {
                return Err(SubmitError::Unknown(format!(
                    "no verdict on the message within {upload:?} after it was handed over"
                )));
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.quit()).await;
        Ok(format!(
            "{} {}",
            response.code(),
            response.message().collect::<Vec<_>>().join(" ")
        ))
    }

    /// One step before the message is handed over: on timeout nothing was
    /// sent, so it is worth another try.
    async fn step<T>(
        &self,
        what: &str,
        future: impl Future<Output = Result<T, lettre::transport::smtp::Error>>,
    ) -> Result<T, SubmitError> {
        match tokio::time::timeout(self.timeout, future).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => Err(classify(&err)),
            Err(_) => Err(SubmitError::Transient(format!(
                "the SMTP server did not answer within {:?} while {what}",
                self.timeout
            ))),
        }
    }
}

fn classify(err: &lettre::transport::smtp::Error) -> SubmitError {
    let text = format!("{err}");
    // A refused XOAUTH2 token comes back as a `334 <base64 JSON>` challenge,
    // which lettre turns into this client error before any reply code is seen.
    if err.is_client() && text.contains("does not expect a challenge") {
        return SubmitError::Rejected(
            "the server refused the OAuth2 access token (XOAUTH2)".into(),
        );
    }
    let code = err.status().map(|c| c.to_string());
    match code.as_deref() {
        Some("535" | "534" | "530") => SubmitError::Rejected(text),
        Some(_) if err.is_permanent() => SubmitError::Permanent(text),
        _ => SubmitError::Transient(text),
    }
}
