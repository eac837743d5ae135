//! Who the bridge is to a mail server: turns a mailbox's stored credentials
//! into a login (refreshing an OAuth2 access token when it is about to expire,
//! one refresh per mailbox however many sessions ask), tells a refusal that
//! condemns the credentials from one that passes, and records `needs_reauth`
//! (R20) once, with its event, when the credentials are dead.
//!
//! Dead means: the token endpoint answered `invalid_grant` (or the client is
//! no longer allowed), a freshly refreshed token was refused too, or a
//! password was refused twice at least `sync.reauth_confirm_secs` apart.
//! Everything else (`[UNAVAILABLE]`, throttling, a token endpoint 5xx or
//! timeout, the network) is retried with backoff and never turns a mailbox
//! `needs_reauth`.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use chrono::{DateTime, TimeDelta, Utc};

use crate::{
    config::ProvidersConfig,
    event_data::MailboxLifecycle,
    imap::{ConnectError, ImapConnector, connection::ImapSession},
    model::{Credentials, Event, Login, Mailbox, MailboxState, Provider},
    oauth::{ProviderClient, TokenError, TokenHttp},
    store::Store,
    wakeup::Wakeup,
};

/// The soonest a session logs in again to renew its token.
const SHORTEST_RELOGIN: Duration = Duration::from_secs(5);

/// How long after `now` to log in again with a token renewed `margin`
/// before `expires_at`.
fn relogin_after(margin: TimeDelta, expires_at: DateTime<Utc>, now: DateTime<Utc>) -> Duration {
    // Never sooner than this, however short the token: no login storm.
    let floor = margin
        .min(TimeDelta::seconds(30))
        .to_std()
        .unwrap_or_default();
    let left = expires_at
        .checked_sub_signed(margin)
        .map(|renew_at| renew_at - now)
        .and_then(|left| left.to_std().ok())
        .unwrap_or_default();
    // A provider that issues tokens living a second or none (`expires_in`
    // 0) costs a login every few seconds per session, not a storm.
    left.max(floor).max(SHORTEST_RELOGIN)
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The credentials are dead; `needs_reauth` is recorded. Nothing more is
    /// tried until new credentials arrive.
    #[error("the mailbox needs new credentials: {0}")]
    NeedsReauth(String),
    /// No login now; try again later.
    #[error("{0}")]
    Unavailable(String),
    /// The mailbox was disconnected meanwhile.
    #[error("the mailbox is no longer connected")]
    Disconnected,
}

impl From<AuthError> for ConnectError {
    fn from(err: AuthError) -> Self {
        match err {
            AuthError::NeedsReauth(words) => ConnectError::NeedsReauth(words),
            AuthError::Unavailable(words) => ConnectError::Unavailable(words),
            AuthError::Disconnected => ConnectError::Disconnected,
        }
    }
}

/// A login and the stored credentials it was made from: a verdict on the
/// login applies to those credentials only, never to newer ones.
#[derive(Clone, Debug)]
pub struct SignIn {
    pub credentials: Credentials,
    pub login: Login,
}

pub struct Auth {
    store: Arc<dyn Store>,
    providers: ProvidersConfig,
    http: TokenHttp,
    outbox: Wakeup,
    /// An access token is renewed when it has less than this left (or half
    /// its lifetime, when that is shorter).
    refresh_margin: TimeDelta,
    /// A refused password is believed when refused again this much later.
    confirm_after: Duration,
    /// One refresh in flight per mailbox.
    refreshing: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// When a mailbox's password was first refused (not yet believed).
    first_refusal: Mutex<HashMap<String, Instant>>,
}

impl Auth {
    pub fn new(
        store: Arc<dyn Store>,
        providers: ProvidersConfig,
        http: TokenHttp,
        outbox: Wakeup,
        refresh_margin: Duration,
        confirm_after: Duration,
    ) -> Self {
        Self {
            store,
            providers,
            http,
            outbox,
            refresh_margin: TimeDelta::from_std(refresh_margin).unwrap_or(TimeDelta::minutes(5)),
            confirm_after,
            refreshing: Mutex::new(HashMap::new()),
            first_refusal: Mutex::new(HashMap::new()),
        }
    }

    pub fn token_http(&self) -> &TokenHttp {
        &self.http
    }

    pub fn provider_client(&self, provider: Provider) -> Result<ProviderClient, TokenError> {
        ProviderClient::new(&self.providers.settings(provider).oauth)
    }

    /// How long before its expiry a token is renewed: the configured margin,
    /// or half the token's lifetime when that is shorter, so a short-lived
    /// token is not renewed at every login.
    fn margin_for(&self, issued_at: Option<DateTime<Utc>>, expires_at: DateTime<Utc>) -> TimeDelta {
        match issued_at {
            // Never below zero: a token that expires as it is issued (or,
            // by the clock, before) has no lifetime to split.
            Some(issued_at) => self
                .refresh_margin
                .min(((expires_at - issued_at) / 2).max(TimeDelta::zero())),
            None => self.refresh_margin,
        }
    }

    /// Usable credentials and their login, for credentials not stored yet (a
    /// connect): no per-mailbox lock, nothing written. A password as it is; an
    /// OAuth2 grant with its access token, renewed first when it is missing,
    /// expiring, or the one just `refused`.
    pub async fn usable(
        &self,
        provider: Provider,
        credentials: &Credentials,
        refused: Option<&Login>,
    ) -> Result<SignIn, TokenError> {
        let (username, refresh_token, access_token, expires_at, issued_at) = match credentials {
            Credentials::Password { username, password } => {
                let login = Login::Password {
                    username: username.clone(),
                    password: password.clone(),
                };
                return Ok(SignIn {
                    credentials: credentials.clone(),
                    login,
                });
            }
            Credentials::OAuth2 {
                username,
                refresh_token,
                access_token,
                expires_at,
                issued_at,
            } => (username, refresh_token, access_token, expires_at, issued_at),
        };
        let was_refused = |token: &str| matches!(refused, Some(Login::Bearer { access_token, .. }) if access_token == token);
        let lasts = |at: &DateTime<Utc>| *at - Utc::now() > self.margin_for(*issued_at, *at);
        if let Some(token) = access_token
            && !was_refused(token)
            && expires_at.as_ref().is_none_or(lasts)
        {
            let login = Login::Bearer {
                username: username.clone(),
                access_token: token.clone(),
            };
            return Ok(SignIn {
                credentials: credentials.clone(),
                login,
            });
        }
        let grant = self
            .provider_client(provider)?
            .refresh(&self.http, refresh_token)
            .await?;
        metrics::counter!("mailbridge_oauth_refreshes_total").increment(1);
        let renewed = Credentials::OAuth2 {
            username: username.clone(),
            refresh_token: grant.refresh_token.unwrap_or_else(|| refresh_token.clone()),
            access_token: Some(grant.access_token.clone()),
            expires_at: grant.expires_at,
            issued_at: Some(Utc::now()),
        };
        let login = Login::Bearer {
            username: username.clone(),
            access_token: grant.access_token,
        };
        Ok(SignIn {
            credentials: renewed,
            login,
        })
    }

    fn refresh_lock(&self, address: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.refreshing.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(address.to_string()).or_default().clone()
    }

    /// The login for a stored mailbox. A renewed token is stored before it is
    /// used, so every session and the sender share it; of several callers at
    /// once, one renews and the others use its token.
    pub async fn login(&self, address: &str, refused: Option<&Login>) -> Result<SignIn, AuthError> {
        let lock = self.refresh_lock(address);
        let _one_refresh = lock.lock().await;
        // Read under the lock: a refresh that finished while we waited is used, not repeated.
        let mailbox = self.current(address)?;
        let signed = match self
            .usable(mailbox.provider, &mailbox.credentials, refused)
            .await
        {
            Ok(signed) => signed,
            Err(TokenError::Revoked(words)) => {
                let reason = format!("the provider refused the grant: {words}");
                self.condemn(address, &mailbox.credentials, &reason);
                return Err(AuthError::NeedsReauth(reason));
            }
            Err(err) => return Err(AuthError::Unavailable(err.to_string())),
        };
        if signed.credentials != mailbox.credentials {
            match self
                .store
                .replace_credentials(address, &mailbox.credentials, &signed.credentials)
            {
                Ok(true) => {}
                // New credentials arrived meanwhile (a connect): they win.
                Ok(false) => {
                    return Err(AuthError::Unavailable(
                        "the credentials changed while renewing the token".into(),
                    ));
                }
                Err(err) => return Err(AuthError::Unavailable(format!("storage: {err:#}"))),
            }
        }
        Ok(signed)
    }

    fn current(&self, address: &str) -> Result<Mailbox, AuthError> {
        match self.store.mailbox(address) {
            Ok(Some(mailbox)) if mailbox.state == MailboxState::NeedsReauth => Err(
                AuthError::NeedsReauth(mailbox.last_error.unwrap_or_default()),
            ),
            Ok(Some(mailbox)) => Ok(mailbox),
            Ok(None) => Err(AuthError::Disconnected),
            Err(err) => Err(AuthError::Unavailable(format!("storage: {err:#}"))),
        }
    }

    /// A logged-in IMAP session on the mailbox. A refused token is renewed and
    /// tried once more; refused again, the credentials are dead. A refused
    /// password is dead only when it was refused `sync.reauth_confirm_secs`
    /// before too; until then the refusal comes back as `Rejected`.
    pub async fn open_imap(
        &self,
        connector: &ImapConnector,
        address: &str,
    ) -> Result<ImapSession, ConnectError> {
        let mailbox = self.current(address)?;
        let signed = self.login(address, None).await?;
        let refused = match connector.open(&mailbox.imap, &signed.login).await {
            Err(ConnectError::Rejected(words)) => words,
            Ok(session) => {
                self.clear_refusals(address);
                return Ok(session);
            }
            other => return other,
        };
        if let Login::Password { .. } = signed.login {
            if self.password_refused(address) {
                let reason = format!("the IMAP server rejected the login: {refused}");
                self.condemn(address, &signed.credentials, &reason);
                return Err(ConnectError::NeedsReauth(reason));
            }
            return Err(ConnectError::Rejected(refused));
        }
        tracing::info!(
            mailbox = address,
            "the server refused the access token ({refused}); renewing it and trying once more"
        );
        let fresh = self.login(address, Some(&signed.login)).await?;
        match connector.open(&mailbox.imap, &fresh.login).await {
            Err(ConnectError::Rejected(words)) => {
                let reason = format!("the IMAP server refused a freshly renewed token: {words}");
                self.condemn(address, &fresh.credentials, &reason);
                Err(ConnectError::NeedsReauth(reason))
            }
            Ok(session) => {
                self.clear_refusals(address);
                Ok(session)
            }
            other => other,
        }
    }

    /// When a session logged in now should log in again with a renewed token,
    /// before the provider ends it (Gmail and Exchange Online close a session
    /// whose token expired: `* BYE Session expired`, `AccessTokenExpired`).
    pub fn relogin_in(&self, address: &str) -> Option<Duration> {
        let Ok(Some(mailbox)) = self.store.mailbox(address) else {
            return None;
        };
        let Credentials::OAuth2 {
            expires_at: Some(expires_at),
            issued_at,
            ..
        } = mailbox.credentials
        else {
            return None;
        };
        Some(relogin_after(
            self.margin_for(issued_at, expires_at),
            expires_at,
            Utc::now(),
        ))
    }

    /// A password was refused. Returns whether that is now believed: an earlier
    /// refusal lies at least `sync.reauth_confirm_secs` back.
    pub fn password_refused(&self, address: &str) -> bool {
        let mut first = self.first_refusal.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match first.get(address) {
            Some(at) if now.duration_since(*at) >= self.confirm_after => {
                first.remove(address);
                true
            }
            Some(_) => false,
            None => {
                first.insert(address.to_string(), now);
                false
            }
        }
    }

    /// How long to wait before the try that can confirm a refused password.
    pub fn confirm_after(&self) -> Duration {
        self.confirm_after
    }

    /// A login went through, or new credentials arrived: an earlier refusal
    /// says nothing any more.
    pub fn clear_refusals(&self, address: &str) {
        let mut first = self.first_refusal.lock().unwrap_or_else(|p| p.into_inner());
        first.remove(address);
    }

    /// R20: the credentials a refused login was made with are dead. If they
    /// are still the mailbox's, it turns `needs_reauth` and each of its
    /// integrations hears of it once, in one commit; newer credentials are
    /// left alone.
    pub fn condemn(&self, address: &str, used: &Credentials, reason: &str) {
        let result = (|| {
            let events: Vec<Event> = self
                .store
                .integrations_of_mailbox(address)?
                .into_iter()
                // The operator's Auto BCC catch-all is no CRM integration.
                .filter(|i| !i.is_catch_all())
                .map(|i| {
                    MailboxLifecycle {
                        error: Some(reason.to_string()),
                        ..MailboxLifecycle::new(&i.location_id, &i.user_id, address)
                    }
                    .event("mailbox.needs_reauth")
                })
                .collect();
            self.store.mark_needs_reauth(address, used, reason, &events)
        })();
        match result {
            Ok(true) => {
                tracing::warn!(
                    mailbox = address,
                    "credentials refused for good, sync and sending stop until new ones arrive: {reason}"
                );
                metrics::counter!("mailbridge_needs_reauth_total").increment(1);
                self.outbox.notify();
            }
            Ok(false) => {}
            Err(err) => {
                tracing::error!(mailbox = address, "recording needs_reauth failed: {err:#}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A token renewed well before it expires, a short-lived one not at
    /// every moment, and one that is already expired (or lives no time at
    /// all) at most every few seconds; a margin as large as config allows
    /// is no panic.
    #[test]
    fn sessions_log_in_again_before_expiry_and_never_in_a_storm() {
        let now = Utc::now();
        let hour = relogin_after(TimeDelta::minutes(5), now + TimeDelta::hours(1), now);
        assert_eq!(hour, Duration::from_secs(55 * 60));
        let six_seconds = relogin_after(TimeDelta::seconds(3), now + TimeDelta::seconds(6), now);
        assert_eq!(six_seconds, SHORTEST_RELOGIN, "before the 6 s are up");
        for expired in [now, now - TimeDelta::seconds(1)] {
            assert_eq!(
                relogin_after(TimeDelta::zero(), expired, now),
                SHORTEST_RELOGIN
            );
        }
        let huge = relogin_after(TimeDelta::MAX, now + TimeDelta::hours(1), now);
        assert_eq!(huge, Duration::from_secs(30));
    }
}
