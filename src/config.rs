//! The daemon's settings: embedded defaults, then a TOML file, then
//! `MAILBRIDGE_…` environment variables (`__` between levels).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use figment::{
    Figment,
    providers::{Env, Format as _, Serialized, Toml},
};
use serde::{Deserialize, Serialize};

use crate::model::{Endpoint, Provider, Security};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub storage: StorageConfig,
    pub api: ApiConfig,
    pub webhooks: Vec<WebhookConfig>,
    pub tls: TlsConfig,
    pub providers: ProvidersConfig,
    pub sync: SyncConfig,
    pub delivery: DeliveryConfig,
    pub sending: SendingConfig,
    pub log: LogConfig,
    pub auto_bcc: AutoBccConfig,
    pub network: NetworkConfig,
    pub retention: RetentionConfig,
}

/// `[retention]`: how long what grows is kept (docs/architecture.md lists
/// every stored tree and file set with its rule). Durations read like
/// `"30d"`, `"12h"`, `"1h30m"`, `"10s"`; `"0"` or `"forever"` keeps for good.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// Message sources (for `/raw` and attachments). Unset:
    /// `storage.raw_retention_days`.
    pub messages: Option<HumanDuration>,
    /// History records, and what is known of synced messages no longer in
    /// a watched folder (their records, R21 marks and threads).
    pub history: HumanDuration,
    /// Settled CRM sends.
    pub sends: HumanDuration,
    pub dead_letters: HumanDuration,
    /// How often the sweep runs.
    pub sweep_every: HumanDuration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        const DAY: u64 = 24 * 3600;
        Self {
            messages: None,
            history: HumanDuration(Duration::from_secs(400 * DAY)),
            sends: HumanDuration(Duration::from_secs(30 * DAY)),
            dead_letters: HumanDuration(Duration::from_secs(30 * DAY)),
            sweep_every: HumanDuration(Duration::from_secs(3600)),
        }
    }
}

impl Config {
    /// The store's retention rules: `[retention]`, with `messages` from
    /// `storage.raw_retention_days` when unset.
    pub fn retention(&self) -> crate::store::Retention {
        let keep = |duration: Duration| (!duration.is_zero()).then_some(duration);
        let messages = match &self.retention.messages {
            Some(messages) => messages.0,
            None => Duration::from_secs(self.storage.raw_retention_days.saturating_mul(24 * 3600)),
        };
        crate::store::Retention {
            messages: keep(messages),
            history: keep(self.retention.history.0),
            sends: keep(self.retention.sends.0),
            dead_letters: keep(self.retention.dead_letters.0),
            ..Default::default()
        }
    }
}

/// A duration written for people: `"400d"`, `"1h30m"`, `"10s"`, `"250ms"`
/// (units ms, s, m, h, d, w), `"0"` or `"forever"` for none; a TOML integer
/// is seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl std::str::FromStr for HumanDuration {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text == "0" || text.eq_ignore_ascii_case("forever") {
            return Ok(Self(Duration::ZERO));
        }
        let wrong = || {
            format!(
                "{text:?} is not a duration: write a number and a unit (ms, s, m, h, d, w), as in \"30d\" or \"1h30m\""
            )
        };
        let mut total = Duration::ZERO;
        let mut rest = text;
        if rest.is_empty() {
            return Err(wrong());
        }
        while !rest.is_empty() {
            let digits = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            let number: u64 = rest[..digits].parse().map_err(|_| wrong())?;
            rest = rest[digits..].trim_start();
            let unit_len = rest
                .find(|c: char| !c.is_ascii_alphabetic())
                .unwrap_or(rest.len());
            let unit_ms: u64 = match &rest[..unit_len] {
                "ms" => 1,
                "s" | "sec" | "secs" => 1_000,
                "m" | "min" | "mins" => 60_000,
                "h" | "hour" | "hours" => 3_600_000,
                "d" | "day" | "days" => 86_400_000,
                "w" | "week" | "weeks" => 7 * 86_400_000,
                _ => return Err(wrong()),
            };
            rest = rest[unit_len..].trim_start();
            let part = number.checked_mul(unit_ms).ok_or_else(wrong)?;
            total = total
                .checked_add(Duration::from_millis(part))
                .ok_or_else(wrong)?;
        }
        Ok(Self(total))
    }
}

impl std::fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = self.0.as_millis();
        if ms == 0 {
            return f.write_str("0");
        }
        for (unit, size) in [
            ("d", 86_400_000),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1_000),
        ] {
            if ms.is_multiple_of(size) {
                return write!(f, "{}{unit}", ms / size);
            }
        }
        write!(f, "{ms}ms")
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = HumanDuration;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a duration such as \"30d\", \"12h\" or \"10s\"")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<HumanDuration, E> {
                text.parse().map_err(E::custom)
            }
            fn visit_u64<E: serde::de::Error>(self, secs: u64) -> Result<HumanDuration, E> {
                Ok(HumanDuration(Duration::from_secs(secs)))
            }
            fn visit_i64<E: serde::de::Error>(self, secs: i64) -> Result<HumanDuration, E> {
                u64::try_from(secs)
                    .map(|secs| HumanDuration(Duration::from_secs(secs)))
                    .map_err(|_| E::custom("a duration cannot be negative"))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// Where the bridge may connect (see `egress`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// Whether API callers may point mailboxes (and the operator webhooks
    /// and OAuth endpoints) at loopback and private addresses. True keeps a
    /// self-hoster's LAN mail server working; set false where API callers
    /// are less trusted than the network the daemon runs in. Link-local and
    /// cloud metadata addresses are refused either way.
    pub allow_private: bool,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            allow_private: true,
        }
    }
}

impl NetworkConfig {
    pub fn egress(&self) -> crate::egress::Egress {
        crate::egress::Egress {
            allow_private: self.allow_private,
        }
    }
}

/// Auto BCC (R15).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AutoBccConfig {
    /// The shape of the smart addresses, with one `{token}`:
    /// `"crm+{token}@bcc.example.com"`. Unset: `bcc-{token}@` and
    /// `server.smart_bcc_domain`.
    pub address: Option<String>,
}

impl Config {
    /// The smart addresses' template, from `[auto_bcc] address` or the older
    /// `server.smart_bcc_domain`.
    pub fn smart_address_template(&self) -> String {
        self.auto_bcc
            .address
            .clone()
            .unwrap_or_else(|| format!("bcc-{{token}}@{}", self.server.smart_bcc_domain))
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SendingConfig {
    /// Timeout of one SMTP submission.
    pub timeout_secs: u64,
    /// Retry backoff for transient SMTP failures (jittered, doubling); retried for 24 hours.
    pub retry_min_ms: u64,
    pub retry_max_ms: u64,
}

impl Default for SendingConfig {
    fn default() -> Self {
        Self {
            timeout_secs: 60,
            retry_min_ms: 5_000,
            retry_max_ms: 10 * 60 * 1_000,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Base of OAuth callbacks and attachment URLs.
    pub public_url: String,
    /// How long a graceful shutdown may take before the daemon stops anyway.
    pub shutdown_grace_secs: u64,
    /// Domain of the integrations' Auto BCC addresses (R15).
    pub smart_bcc_domain: String,
    /// Whether `/metrics` answers without the API key (a Prometheus on a
    /// trusted network); false puts it behind the key like `/v1`.
    pub metrics_public: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8787)),
            public_url: "http://127.0.0.1:8787".into(),
            shutdown_grace_secs: 10,
            smart_bcc_domain: "bcc.mailbridge.invalid".into(),
            metrics_public: true,
        }
    }
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    pub path: PathBuf,
    /// Days the source of synced and sent messages is kept for `/raw` and
    /// attachment downloads (0 keeps it forever); `[retention] messages`,
    /// when set, wins.
    pub raw_retention_days: u64,
    /// 32 bytes, base64, that encrypt credentials at rest. When unset, a key is
    /// generated on first start and kept in `encryption_key_file`.
    pub encryption_key: Option<String>,
    /// Where the generated key is kept (created mode 0600 on first start):
    /// by default `<path>/secret.key`; elsewhere (another disk, a secrets
    /// mount), a copy of the data folder alone does not open the credentials.
    pub encryption_key_file: Option<PathBuf>,
    /// Where the store keeps its records: the embedded sled database in
    /// `path` (the default: nothing else to install), or PostgreSQL.
    pub backend: StorageBackend,
    /// `[storage.postgres]`, read when `backend = "postgres"`.
    pub postgres: PostgresConfig,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    #[default]
    Sled,
    Postgres,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgres://user[:password]@host:port/database[?sslmode=require]`,
    /// or libpq's key=value form.
    pub url: Option<String>,
    /// A file holding the URL (for one that carries a password: a secrets
    /// mount rather than the configuration file).
    pub url_file: Option<PathBuf>,
    /// Connections to the database.
    pub pool_size: usize,
    /// The schema the store's tables live in (created when missing).
    pub schema: String,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            url: None,
            url_file: None,
            pool_size: 8,
            schema: "mailbridge".into(),
        }
    }
}

impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password.
        f.debug_struct("PostgresConfig")
            .field("url", &self.url.as_ref().map(|_| "<redacted>"))
            .field("url_file", &self.url_file)
            .field("pool_size", &self.pool_size)
            .field("schema", &self.schema)
            .finish()
    }
}

impl PostgresConfig {
    /// The URL, from `url` or read from `url_file`.
    pub fn connection_url(&self) -> anyhow::Result<String> {
        match (&self.url, &self.url_file) {
            (Some(url), None) => Ok(url.clone()),
            (None, Some(file)) => {
                let url = std::fs::read_to_string(file).map_err(|err| {
                    anyhow::anyhow!(
                        "reading storage.postgres.url_file {}: {err}",
                        file.display()
                    )
                })?;
                let url = url.trim();
                anyhow::ensure!(
                    !url.is_empty(),
                    "storage.postgres.url_file {} is empty",
                    file.display()
                );
                Ok(url.to_string())
            }
            (Some(_), Some(_)) => {
                anyhow::bail!(
                    "storage.postgres.url and storage.postgres.url_file are both set: keep one"
                )
            }
            (None, None) => anyhow::bail!(
                "storage.backend is \"postgres\" but storage.postgres.url (or url_file, or \
                 MAILBRIDGE_STORAGE__POSTGRES__URL) is not set"
            ),
        }
    }
}

impl std::fmt::Debug for StorageConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageConfig")
            .field("path", &self.path)
            .field("raw_retention_days", &self.raw_retention_days)
            .field(
                "encryption_key",
                &self.encryption_key.as_ref().map(|_| "<redacted>"),
            )
            .field("encryption_key_file", &self.encryption_key_file)
            .field("backend", &self.backend)
            .field("postgres", &self.postgres)
            .finish()
    }
}

impl StorageConfig {
    /// The file that holds (or will hold) the generated key.
    pub fn key_file(&self) -> PathBuf {
        self.encryption_key_file
            .clone()
            .unwrap_or_else(|| self.path.join("secret.key"))
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("./mailbridge-data"),
            raw_retention_days: 30,
            encryption_key: None,
            encryption_key_file: None,
            backend: StorageBackend::Sled,
            postgres: PostgresConfig::default(),
        }
    }
}

#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Accepted as `Authorization: Bearer <key>`, besides the key generated on first start.
    pub keys: Vec<String>,
}

/// Printed without secrets: `{:?}` of the configuration may reach a log.
impl std::fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiConfig")
            .field("keys", &format_args!("<{} redacted>", self.keys.len()))
            .finish()
    }
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL without what may carry a secret: user info, query, fragment.
        let url = match reqwest::Url::parse(&self.url) {
            Ok(mut url) => {
                let _ = url.set_username("");
                let _ = url.set_password(None);
                url.set_query(None);
                url.set_fragment(None);
                url.to_string()
            }
            Err(_) => "<not an URL>".to_string(),
        };
        f.debug_struct("WebhookConfig")
            .field("url", &url)
            .field("secret", &"<redacted>")
            .finish()
    }
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    pub url: String,
    /// A Standard Webhooks secret: `whsec_` + base64 of the key.
    pub secret: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM files trusted besides the system roots (private CAs, tests).
    pub extra_roots: Vec<PathBuf>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProvidersConfig {
    pub gmail: ProviderOverrides,
    pub outlook: ProviderOverrides,
    pub imap: ProviderOverrides,
}

/// Per-provider settings; anything unset keeps the built-in preset.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProviderOverrides {
    pub imap: Option<Endpoint>,
    pub smtp: Option<Endpoint>,
    pub daily_send_limit: Option<u32>,
    /// How long one IDLE may last before the bridge re-issues it.
    pub idle_secs: Option<u64>,
    /// Logins per second the provider's IMAP server receives from the bridge.
    pub logins_per_second: Option<u32>,
    /// The OAuth2 client the bridge signs in with ("Sign in with Google/Microsoft").
    pub oauth: OAuthOverrides,
}

/// A provider's OAuth2 client registration; anything unset keeps the preset.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OAuthOverrides {
    pub client_id: Option<String>,
    /// Also `MAILBRIDGE_PROVIDERS__<NAME>__OAUTH__CLIENT_SECRET`, or `client_secret_file`.
    pub client_secret: Option<String>,
    pub client_secret_file: Option<PathBuf>,
    pub auth_url: Option<String>,
    pub token_url: Option<String>,
    pub userinfo_url: Option<String>,
    pub scopes: Option<Vec<String>>,
}

impl std::fmt::Debug for OAuthOverrides {
    // The client secret never reaches a log line through `{:?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuthOverrides")
            .field("client_id", &self.client_id)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("client_secret_file", &self.client_secret_file)
            .field("auth_url", &self.auth_url)
            .field("token_url", &self.token_url)
            .field("userinfo_url", &self.userinfo_url)
            .field("scopes", &self.scopes)
            .finish()
    }
}

/// A provider's effective OAuth2 settings.
#[derive(Clone)]
pub struct OAuthSettings {
    /// Which `[providers.NAME]` these come from, for error messages.
    pub provider: Provider,
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
    pub client_secret_file: Option<PathBuf>,
    pub auth_url: Option<String>,
    pub token_url: Option<String>,
    pub userinfo_url: Option<String>,
    pub scopes: Vec<String>,
}

impl std::fmt::Debug for OAuthSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuthSettings")
            .field("provider", &self.provider)
            .field("client_id", &self.client_id)
            .field("token_url", &self.token_url)
            .finish_non_exhaustive()
    }
}

impl OAuthSettings {
    fn preset(provider: Provider) -> OAuthSettings {
        let owned = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (auth_url, token_url, userinfo_url, scopes) = match provider {
            // https://developers.google.com/identity/protocols/oauth2/web-server
            // https://developers.google.com/workspace/gmail/imap/xoauth2-protocol
            Provider::Gmail => (
                Some("https://accounts.google.com/o/oauth2/v2/auth"),
                Some("https://oauth2.googleapis.com/token"),
                Some("https://openidconnect.googleapis.com/v1/userinfo"),
                owned(&["https://mail.google.com/", "openid", "email"]),
            ),
            // Microsoft identity platform v2, `common` tenant:
            // https://learn.microsoft.com/en-us/exchange/client-developer/legacy-protocols/how-to-authenticate-an-imap-pop-smtp-application-by-using-oauth
            // Its userinfo endpoint (Graph) does not take an Outlook-audience
            // token, so the address comes from the id_token.
            Provider::Outlook => (
                Some("https://login.microsoftonline.com/common/oauth2/v2.0/authorize"),
                Some("https://login.microsoftonline.com/common/oauth2/v2.0/token"),
                None,
                owned(&[
                    "https://outlook.office.com/IMAP.AccessAsUser.All",
                    "https://outlook.office.com/SMTP.Send",
                    "offline_access",
                    "openid",
                    "email",
                ]),
            ),
            // A self-hosted server with its own identity provider: all from config.
            Provider::Imap => (None, None, None, owned(&["openid", "email"])),
        };
        OAuthSettings {
            provider,
            client_id: None,
            client_secret: None,
            client_secret_file: None,
            auth_url: auth_url.map(str::to_string),
            token_url: token_url.map(str::to_string),
            userinfo_url: userinfo_url.map(str::to_string),
            scopes,
        }
    }

    fn with(mut self, overrides: &OAuthOverrides) -> OAuthSettings {
        let pick = |over: &Option<String>, preset: Option<String>| over.clone().or(preset);
        self.client_id = pick(&overrides.client_id, self.client_id);
        self.client_secret = pick(&overrides.client_secret, self.client_secret);
        self.client_secret_file = overrides
            .client_secret_file
            .clone()
            .or(self.client_secret_file);
        self.auth_url = pick(&overrides.auth_url, self.auth_url);
        self.token_url = pick(&overrides.token_url, self.token_url);
        self.userinfo_url = pick(&overrides.userinfo_url, self.userinfo_url);
        if let Some(scopes) = &overrides.scopes {
            self.scopes = scopes.clone();
        }
        self
    }

    /// The config key a missing setting would be set under.
    pub fn key(&self, field: &str) -> String {
        format!("providers.{}.oauth.{field}", self.provider.as_str())
    }
}

/// A provider's effective settings.
#[derive(Clone, Debug)]
pub struct ProviderSettings {
    pub imap: Option<Endpoint>,
    pub smtp: Option<Endpoint>,
    pub daily_send_limit: Option<u32>,
    pub idle: Duration,
    /// The pace of logins to the provider's IMAP server, if it has its own.
    pub logins_per_second: Option<u32>,
    pub oauth: OAuthSettings,
}

impl ProvidersConfig {
    pub fn settings(&self, provider: Provider) -> ProviderSettings {
        let (preset, overrides) = match provider {
            // Gmail drops an idle session after about 10 minutes and sends no
            // keepalive; Exchange Online is reported to do the same.
            Provider::Gmail => (
                ProviderSettings {
                    imap: Some(endpoint("imap.gmail.com", 993)),
                    smtp: Some(endpoint("smtp.gmail.com", 465)),
                    daily_send_limit: Some(500),
                    idle: Duration::from_secs(9 * 60),
                    // Google documents no figure and throttles bursts of
                    // logins ([THROTTLED], "Too many simultaneous
                    // connections"): an even pace well under what 10,000
                    // mailboxes would send at once.
                    logins_per_second: Some(100),
                    oauth: OAuthSettings::preset(provider),
                },
                &self.gmail,
            ),
            Provider::Outlook => (
                ProviderSettings {
                    imap: Some(endpoint("outlook.office365.com", 993)),
                    smtp: Some(Endpoint {
                        host: "smtp.office365.com".into(),
                        port: 587,
                        security: Security::Starttls,
                    }),
                    daily_send_limit: Some(300),
                    idle: Duration::from_secs(9 * 60),
                    // Exchange Online answers bursts with "Request is
                    // throttled. Suggested Backoff Time".
                    logins_per_second: Some(50),
                    oauth: OAuthSettings::preset(provider),
                },
                &self.outlook,
            ),
            // RFC 2177: servers may end IDLE after 30 minutes; stay below 29.
            Provider::Imap => (
                ProviderSettings {
                    imap: None,
                    smtp: None,
                    daily_send_limit: None,
                    idle: Duration::from_secs(25 * 60),
                    logins_per_second: None,
                    oauth: OAuthSettings::preset(provider),
                },
                &self.imap,
            ),
        };
        ProviderSettings {
            imap: overrides.imap.clone().or(preset.imap),
            smtp: overrides.smtp.clone().or(preset.smtp),
            daily_send_limit: overrides.daily_send_limit.or(preset.daily_send_limit),
            idle: overrides
                .idle_secs
                .map(|s| Duration::from_secs(s.clamp(1, 29 * 60)))
                .unwrap_or(preset.idle),
            logins_per_second: overrides.logins_per_second.or(preset.logins_per_second),
            oauth: preset.oauth.with(&overrides.oauth),
        }
    }
}

fn endpoint(host: &str, port: u16) -> Endpoint {
    Endpoint {
        host: host.into(),
        port,
        security: Security::Tls,
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyncConfig {
    /// Timeout of every single IMAP network step (connect, login, select, fetch, DONE).
    pub step_timeout_secs: u64,
    /// Reconnect backoff: first delay and cap (jittered, doubling).
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    /// Messages larger than this are not fetched; they are skipped with a logged reason.
    pub max_message_bytes: u32,
    /// A refused password is believed only when a second try at least this
    /// long after the first is refused too (R20): providers refuse good
    /// passwords now and then.
    pub reauth_confirm_secs: u64,
    /// An OAuth2 access token is renewed when less than this is left of it.
    pub token_refresh_margin_secs: u64,
    /// Message sources held in memory at once, across every mailbox: catch-up
    /// batches and sends being submitted or filed. Past it, they wait their turn.
    pub memory_budget_bytes: u64,
    /// IMAP logins under way at once, across every server (connect, TLS,
    /// login); more wait their turn, as after a restart.
    pub max_concurrent_logins: usize,
    /// Logins per second to any one server without a provider pace of its
    /// own (`[providers.NAME] logins_per_second`); 0 for no pace.
    pub logins_per_second: u32,
    /// Where the server has NOTIFY (RFC 5465) and CONDSTORE (RFC 7162), one
    /// session watches all of a mailbox's folders; `false` keeps one session
    /// per folder everywhere.
    pub one_session_per_mailbox: bool,
    /// Mailboxes whose CRM changes (`PATCH`/`DELETE /v1/messages/{id}`) are
    /// being made at once, each over a session of its own; a slow or silent
    /// server holds up only its own mailbox's changes.
    pub change_workers: usize,
    /// How often a watched folder the server does not have (Gmail's All Mail
    /// hidden from IMAP, no Sent folder, a listed folder deleted) is looked
    /// for again; the rest of the mailbox syncs meanwhile.
    pub absent_folder_check_secs: u64,
    /// How long Gmail's All Mail waits for INBOX's watcher to read a message
    /// labelled `\Inbox` before it takes the message itself (it never passes
    /// one over that INBOX has not read).
    pub inbox_handoff_secs: u64,
}

impl Default for SyncConfig {
    fn default() -> Self {
        Self {
            step_timeout_secs: 60,
            reconnect_min_ms: 1_000,
            reconnect_max_ms: 5 * 60 * 1_000,
            max_message_bytes: 50 * 1024 * 1024,
            reauth_confirm_secs: 30,
            token_refresh_margin_secs: 300,
            memory_budget_bytes: 512 * 1024 * 1024,
            max_concurrent_logins: 64,
            logins_per_second: 500,
            one_session_per_mailbox: true,
            change_workers: 8,
            absent_folder_check_secs: 300,
            inbox_handoff_secs: 120,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliveryConfig {
    pub timeout_secs: u64,
    /// Retry backoff: first delay and cap (jittered, doubling).
    pub retry_min_ms: u64,
    pub retry_max_ms: u64,
    /// An event still failing after this long is set aside (and logged) instead of retried.
    pub give_up_after_hours: u64,
    /// Deliveries in flight at once (to different threads).
    pub concurrency: usize,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            timeout_secs: 15,
            retry_min_ms: 5_000,
            retry_max_ms: 60 * 60 * 1_000,
            give_up_after_hours: 72,
            concurrency: 16,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `mailbridge=debug,info`; `RUST_LOG` wins.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Human,
            level: "info".into(),
        }
    }
}

impl Config {
    /// Defaults, then the file (if any), then `MAILBRIDGE_…` variables.
    pub fn load(file: Option<&std::path::Path>) -> anyhow::Result<Config> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            anyhow::ensure!(
                file.exists(),
                "config file {} does not exist",
                file.display()
            );
            figment = figment.merge(Toml::file(file));
        }
        figment = figment.merge(Env::prefixed("MAILBRIDGE_").split("__"));
        let config: Config = figment.extract().context("invalid configuration")?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if self.storage.backend == StorageBackend::Postgres {
            let postgres = &self.storage.postgres;
            anyhow::ensure!(
                postgres.url.is_some() != postgres.url_file.is_some(),
                "storage.backend is \"postgres\": set one of storage.postgres.url \
                 (or MAILBRIDGE_STORAGE__POSTGRES__URL) and storage.postgres.url_file"
            );
            anyhow::ensure!(
                postgres.pool_size >= 1,
                "storage.postgres.pool_size must be at least 1"
            );
            anyhow::ensure!(
                crate::store::engine::postgres::valid_schema_name(&postgres.schema),
                "storage.postgres.schema {:?} must be a plain lower-case name (letters, digits, _)",
                postgres.schema
            );
        }
        anyhow::ensure!(
            self.storage.encryption_key.is_none() || self.storage.encryption_key_file.is_none(),
            "storage.encryption_key and storage.encryption_key_file are both set: keep one"
        );
        for webhook in &self.webhooks {
            anyhow::ensure!(
                webhook.url.starts_with("http://") || webhook.url.starts_with("https://"),
                "webhook url {:?} must start with http:// or https://",
                webhook.url
            );
            crate::webhook::signing::SigningKey::from_secret(&webhook.secret)
                .with_context(|| format!("webhook secret for {}", webhook.url))?;
        }
        anyhow::ensure!(
            self.delivery.concurrency > 0,
            "delivery.concurrency must be at least 1"
        );
        anyhow::ensure!(
            self.sync.change_workers > 0,
            "sync.change_workers must be at least 1"
        );
        anyhow::ensure!(
            !self.retention.sweep_every.0.is_zero(),
            "retention.sweep_every must be longer than 0"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(toml: &str) -> anyhow::Result<Config> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("mailbridge.toml");
        std::fs::write(&file, toml)?;
        Config::load(Some(&file))
    }

    /// Issue 21 item 1: durations as people write them, down to seconds.
    #[test]
    fn durations_read_as_written_and_nonsense_is_refused() {
        let parse = |text: &str| text.parse::<HumanDuration>().map(|d| d.0);
        assert_eq!(parse("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5_400)));
        assert_eq!(parse("2 s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("forever"), Ok(Duration::ZERO));
        assert_eq!(parse("0"), Ok(Duration::ZERO));
        for wrong in ["", "30", "d", "3x", "-1d", "99999999999999999999d"] {
            assert!(parse(wrong).is_err(), "{wrong:?} is refused");
        }
        for shown in ["400d", "1h", "90m", "10s", "1500ms", "0"] {
            assert_eq!(
                parse(shown).unwrap(),
                parse(&HumanDuration(parse(shown).unwrap()).to_string()).unwrap()
            );
            assert_eq!(HumanDuration(parse(shown).unwrap()).to_string(), shown);
        }
    }

    /// Issue 21 item 1: `[retention]` with its defaults, and
    /// `storage.raw_retention_days` still read when `messages` is unset.
    #[test]
    fn retention_reads_its_section_and_the_older_days_key() {
        let day = Duration::from_secs(86_400);
        let defaults = load("").unwrap().retention();
        assert_eq!(defaults.messages, Some(30 * day));
        assert_eq!(defaults.history, Some(400 * day));
        assert_eq!(defaults.sends, Some(30 * day));
        assert_eq!(defaults.dead_letters, Some(30 * day));
        assert_eq!(
            load("").unwrap().retention.sweep_every.0,
            Duration::from_secs(3600)
        );

        let older = load("[storage]\nraw_retention_days = 7\n")
            .unwrap()
            .retention();
        assert_eq!(older.messages, Some(7 * day));
        let forever = load("[storage]\nraw_retention_days = 0\n")
            .unwrap()
            .retention();
        assert_eq!(forever.messages, None);

        let config = load(
            "[storage]\nraw_retention_days = 7\n[retention]\nmessages = \"2s\"\nhistory = \"3s\"\nsends = \"forever\"\ndead_letters = 5\nsweep_every = \"1s\"\n",
        )
        .unwrap();
        let retention = config.retention();
        assert_eq!(
            retention.messages,
            Some(Duration::from_secs(2)),
            "the new key wins"
        );
        assert_eq!(retention.history, Some(Duration::from_secs(3)));
        assert_eq!(retention.sends, None);
        assert_eq!(retention.dead_letters, Some(Duration::from_secs(5)));
        assert_eq!(config.retention.sweep_every.0, Duration::from_secs(1));

        let wrong = load("[retention]\nhistory = \"a year\"\n").unwrap_err();
        assert!(format!("{wrong:#}").contains("not a duration"), "{wrong:#}");
        let never = load("[retention]\nsweep_every = \"0\"\n").unwrap_err();
        assert!(format!("{never:#}").contains("sweep_every"), "{never:#}");
    }

    /// Issue 22 item 1: the backend and its PostgreSQL settings, from the
    /// file or the environment; sled stays the default.
    #[test]
    fn storage_backend_and_postgres_settings() {
        let default = load("").unwrap();
        assert_eq!(default.storage.backend, StorageBackend::Sled);
        let postgres = load(
            "[storage]\nbackend = \"postgres\"\n[storage.postgres]\nurl = \"postgres://u:pw-9f3k@db:5432/m\"\npool_size = 3\nschema = \"bridge\"\n",
        )
        .unwrap();
        assert_eq!(postgres.storage.backend, StorageBackend::Postgres);
        assert_eq!(postgres.storage.postgres.pool_size, 3);
        assert_eq!(postgres.storage.postgres.schema, "bridge");
        assert_eq!(
            postgres.storage.postgres.connection_url().unwrap(),
            "postgres://u:pw-9f3k@db:5432/m"
        );
        assert!(
            !format!("{postgres:?}").contains("pw-9f3k"),
            "the URL's password stays out of the debug output"
        );
        let missing = load("[storage]\nbackend = \"postgres\"\n").unwrap_err();
        assert!(
            format!("{missing:#}").contains("storage.postgres.url"),
            "{missing:#}"
        );
        let bad_schema = load(
            "[storage]\nbackend = \"postgres\"\n[storage.postgres]\nurl = \"postgres://db/m\"\nschema = \"x; DROP\"\n",
        )
        .unwrap_err();
        assert!(
            format!("{bad_schema:#}").contains("schema"),
            "{bad_schema:#}"
        );
        assert!(load("[storage]\nbackend = \"mysql\"\n").is_err());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("url");
        std::fs::write(&file, "postgres://from-file/m\n").unwrap();
        let from_file = load(&format!(
            "[storage]\nbackend = \"postgres\"\n[storage.postgres]\nurl_file = \"{}\"\n",
            file.display()
        ))
        .unwrap();
        assert_eq!(
            from_file.storage.postgres.connection_url().unwrap(),
            "postgres://from-file/m"
        );
    }
}
