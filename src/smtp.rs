//! Submitting a message over SMTP from a user's own mailbox with lettre:
//! implicit TLS or STARTTLS (plain only towards loopback), the configured extra
//! roots, PLAIN/LOGIN or XOAUTH2 authentication. Errors are sorted into what a retry can
//! fix and what it cannot.

use std::{path::PathBuf, time::Duration};

use lettre::{
    AsyncSmtpTransport, AsyncTransport, Tokio1Executor,
    address::Envelope,
    transport::smtp::{
        authentication::{Credentials as SmtpCredentials, Mechanism},
        client::{Certificate, Tls, TlsParameters},
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
    /// Worth another try later: 4xx, a lost connection, a timeout.
    #[error("{0}")]
    Transient(String),
    /// The server refused the credentials.
    #[error("{0}")]
    Rejected(String),
}

#[derive(Clone)]
pub struct Submitter {
    extra_roots: Vec<Vec<u8>>,
    timeout: Duration,
}

impl Submitter {
    pub fn new(extra_roots: &[PathBuf], timeout: Duration) -> anyhow::Result<Self> {
        let extra_roots = extra_roots
            .iter()
            .map(|p| std::fs::read(p).map_err(|e| anyhow::anyhow!("reading {}: {e}", p.display())))
            .collect::<anyhow::Result<_>>()?;
        Ok(Self {
            extra_roots,
            timeout,
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
        let tls = match endpoint.security {
            Security::Tls => Tls::Wrapper(self.tls(&endpoint.host)?),
            Security::Starttls => Tls::Required(self.tls(&endpoint.host)?),
            Security::Plain if is_loopback(&endpoint.host) => Tls::None,
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
        // A fresh transport per send: credentials may have changed (a refreshed
        // token), and a pool would keep connections logged in with old ones.
        let transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&endpoint.host)
            .port(endpoint.port)
            .tls(tls)
            .authentication(mechanisms)
            .credentials(SmtpCredentials::new(
                login.username().to_string(),
                secret.clone(),
            ))
            .timeout(Some(self.timeout))
            .build();
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
        match transport.send_raw(&envelope, raw).await {
            Ok(response) => Ok(format!(
                "{} {}",
                response.code(),
                response.message().collect::<Vec<_>>().join(" ")
            )),
            Err(err) => Err(classify(&err)),
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
