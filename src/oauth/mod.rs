//! Talking to a provider's OAuth2 authorization server: the authorization URL
//! (code flow with PKCE S256), the code exchange, refreshing access tokens, and
//! learning which account consented. Built on the `oauth2` crate, with our own
//! reqwest client (no redirects followed, the configured TLS roots, timeouts).

pub mod state;

use std::{future::Future, pin::Pin, time::Duration};

use chrono::{DateTime, Utc};
use oauth2::{
    AuthType, AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken, EndpointNotSet,
    EndpointSet, HttpClientError, HttpRequest, HttpResponse, PkceCodeChallenge, PkceCodeVerifier,
    RedirectUrl, RefreshToken, RequestTokenError, Scope, StandardTokenResponse, TokenResponse as _,
    TokenUrl,
    basic::{BasicErrorResponseType, BasicTokenType},
};
use serde::{Deserialize, Serialize};

use crate::{config::OAuthSettings, model::Provider};

/// The `id_token` an OpenID Connect token endpoint adds to its answer.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct IdTokenField {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_token: Option<String>,
}

impl oauth2::ExtraTokenFields for IdTokenField {}

type HttpResult = Result<HttpResponse, HttpClientError<reqwest::Error>>;

type TokenAnswer = StandardTokenResponse<IdTokenField, BasicTokenType>;

type OAuthClient<HasAuthUrl> = oauth2::Client<
    oauth2::basic::BasicErrorResponse,
    TokenAnswer,
    oauth2::basic::BasicTokenIntrospectionResponse,
    oauth2::StandardRevocableToken,
    oauth2::basic::BasicRevocationErrorResponse,
    HasAuthUrl,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointSet,
>;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The grant is dead (`invalid_grant`: revoked, expired, consent withdrawn):
    /// only the user can mend it by signing in again.
    #[error("the provider refused the grant: {0}")]
    Revoked(String),
    /// Worth another try later: 5xx, a timeout, the network.
    #[error("the token endpoint is unavailable: {0}")]
    Transient(String),
    /// The bridge's own OAuth client settings are missing or wrong.
    #[error("{0}")]
    Misconfigured(String),
}

/// Tokens as the provider granted them.
#[derive(Clone)]
pub struct Grant {
    pub access_token: String,
    /// Absent on a refresh at Google (the old one stays valid); Microsoft rotates it.
    pub refresh_token: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
    pub id_token: Option<String>,
}

impl std::fmt::Debug for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grant")
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// Token endpoint requests: no redirects (a redirected POST would carry the
/// code or refresh token elsewhere), bounded in time.
#[derive(Clone)]
pub struct TokenHttp {
    client: reqwest::Client,
}

impl TokenHttp {
    pub fn new(
        tls: rustls::ClientConfig,
        timeout: Duration,
        egress: crate::egress::Egress,
    ) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .dns_resolver(egress.resolver())
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .user_agent(concat!("mailbridge/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self { client })
    }

    /// oauth2's async HTTP seam, served by our reqwest 0.13 client.
    fn adapter(
        &self,
    ) -> impl Fn(HttpRequest) -> Pin<Box<dyn Future<Output = HttpResult> + Send>> + use<> {
        let client = self.client.clone();
        move |request: HttpRequest| {
            let client = client.clone();
            Box::pin(async move {
                let request = reqwest::Request::try_from(request).map_err(Box::new)?;
                let response = client.execute(request).await.map_err(Box::new)?;
                let mut builder = oauth2::http::Response::builder().status(response.status());
                for (name, value) in response.headers() {
                    builder = builder.header(name, value);
                }
                let body = response.bytes().await.map_err(Box::new)?;
                Ok(builder.body(body.to_vec())?)
            })
        }
    }

    /// A GET with a bearer token, answered with JSON (the userinfo endpoint).
    async fn get_json(&self, url: &str, bearer: &str) -> Result<serde_json::Value, String> {
        let response = self
            .client
            .get(url)
            .bearer_auth(bearer)
            .send()
            .await
            .map_err(|e| without_url(&e))?;
        if !response.status().is_success() {
            return Err(format!("answered {}", response.status()));
        }
        response
            .json()
            .await
            .map_err(|e| format!("unreadable answer: {}", without_url(&e)))
    }
}

/// reqwest errors name the URL, which may carry a code or token in its query.
fn without_url(err: &reqwest::Error) -> String {
    let mut text = err.to_string();
    if let Some(url) = err.url() {
        text = text.replace(url.as_str(), "<token endpoint>");
    }
    text
}

/// The OAuth client of one provider, checked for what a flow needs.
pub struct ProviderClient {
    settings: OAuthSettings,
    client_id: String,
    client_secret: Option<String>,
    token_url: TokenUrl,
}

impl ProviderClient {
    /// Fails (naming the missing key) when the provider has no OAuth client configured.
    pub fn new(settings: &OAuthSettings) -> Result<Self, TokenError> {
        let client_id = settings
            .client_id
            .clone()
            .filter(|id| !id.trim().is_empty())
            .ok_or_else(|| {
                TokenError::Misconfigured(format!(
                    "{} is not set: register an OAuth client with the provider and configure it (see README)",
                    settings.key("client_id")
                ))
            })?;
        let client_secret = match (&settings.client_secret, &settings.client_secret_file) {
            (Some(secret), _) => Some(secret.clone()),
            (None, Some(file)) => Some(
                std::fs::read_to_string(file)
                    .map_err(|e| {
                        TokenError::Misconfigured(format!(
                            "{} {}: {e}",
                            settings.key("client_secret_file"),
                            file.display()
                        ))
                    })?
                    .trim()
                    .to_string(),
            ),
            (None, None) => None,
        };
        let token_url = settings
            .token_url
            .clone()
            .ok_or_else(|| {
                TokenError::Misconfigured(format!("{} is not set", settings.key("token_url")))
            })
            .and_then(|url| {
                TokenUrl::new(url).map_err(|e| {
                    TokenError::Misconfigured(format!("{}: {e}", settings.key("token_url")))
                })
            })?;
        Ok(Self {
            settings: settings.clone(),
            client_id,
            client_secret,
            token_url,
        })
    }

    fn client(&self) -> OAuthClient<EndpointNotSet> {
        let mut client = oauth2::Client::new(ClientId::new(self.client_id.clone()))
            .set_token_uri(self.token_url.clone())
            // Google and Microsoft both take the secret in the form body.
            .set_auth_type(AuthType::RequestBody);
        if let Some(secret) = &self.client_secret {
            client = client.set_client_secret(ClientSecret::new(secret.clone()));
        }
        client
    }

    fn redirect(&self, redirect_url: &str) -> Result<RedirectUrl, TokenError> {
        RedirectUrl::new(redirect_url.to_string()).map_err(|e| {
            TokenError::Misconfigured(format!(
                "server.public_url gives no valid redirect URL: {e}"
            ))
        })
    }

    /// Where to send the person: code flow, PKCE S256 over `verifier`, a
    /// refresh token (offline access) and a consent prompt (Google re-issues a
    /// refresh token only on consent).
    pub fn authorize_url(
        &self,
        redirect_url: &str,
        state: &str,
        verifier: &PkceCodeVerifier,
        login_hint: Option<&str>,
    ) -> Result<String, TokenError> {
        let auth_url = self
            .settings
            .auth_url
            .clone()
            .ok_or_else(|| {
                TokenError::Misconfigured(format!("{} is not set", self.settings.key("auth_url")))
            })
            .and_then(|url| {
                AuthUrl::new(url).map_err(|e| {
                    TokenError::Misconfigured(format!("{}: {e}", self.settings.key("auth_url")))
                })
            })?;
        let client = self
            .client()
            .set_auth_uri(auth_url)
            .set_redirect_uri(self.redirect(redirect_url)?);
        let state = state.to_string();
        let mut request = client
            .authorize_url(move || CsrfToken::new(state))
            .add_scopes(self.settings.scopes.iter().cloned().map(Scope::new))
            .set_pkce_challenge(PkceCodeChallenge::from_code_verifier_sha256(verifier))
            .add_extra_param("prompt", "consent");
        if self.settings.provider == Provider::Gmail {
            request = request.add_extra_param("access_type", "offline");
        }
        if let Some(hint) = login_hint {
            request = request.add_extra_param("login_hint", hint);
        }
        Ok(request.url().0.to_string())
    }

    pub async fn exchange_code(
        &self,
        http: &TokenHttp,
        redirect_url: &str,
        code: &str,
        verifier: PkceCodeVerifier,
    ) -> Result<Grant, TokenError> {
        let answer = self
            .client()
            .set_redirect_uri(self.redirect(redirect_url)?)
            .exchange_code(AuthorizationCode::new(code.to_string()))
            .set_pkce_verifier(verifier)
            .request_async(&http.adapter())
            .await
            .map_err(token_error)?;
        Ok(grant(answer))
    }

    pub async fn refresh(
        &self,
        http: &TokenHttp,
        refresh_token: &str,
    ) -> Result<Grant, TokenError> {
        let answer = self
            .client()
            .exchange_refresh_token(&RefreshToken::new(refresh_token.to_string()))
            .request_async(&http.adapter())
            .await
            .map_err(token_error)?;
        Ok(grant(answer))
    }

    /// The address of the account that consented: the id_token's `email` (or
    /// Microsoft's `preferred_username`), else the userinfo endpoint's `email`.
    pub async fn account_email(&self, http: &TokenHttp, grant: &Grant) -> Result<String, String> {
        if let Some(email) = grant.id_token.as_deref().and_then(email_from_id_token) {
            return Ok(email);
        }
        let Some(url) = &self.settings.userinfo_url else {
            return Err(format!(
                "the provider named no email address: the id_token has no email claim and {} is not set",
                self.settings.key("userinfo_url")
            ));
        };
        let info = http
            .get_json(url, &grant.access_token)
            .await
            .map_err(|e| format!("userinfo: {e}"))?;
        info.get("email")
            .and_then(|v| v.as_str())
            .filter(|e| e.contains('@'))
            .map(crate::model::normalize_email)
            .ok_or_else(|| "userinfo named no email address".to_string())
    }
}

/// Longer than any provider's access tokens live (an hour or a day): a
/// larger `expires_in` is taken as this, not added to the clock (where a
/// large enough one overflowed chrono's dates and panicked).
const LONGEST_TOKEN_LIFETIME: std::time::Duration = std::time::Duration::from_secs(366 * 24 * 3600);

fn grant(answer: TokenAnswer) -> Grant {
    Grant {
        access_token: answer.access_token().secret().clone(),
        refresh_token: answer.refresh_token().map(|t| t.secret().clone()),
        expires_at: answer
            .expires_in()
            .and_then(|d| chrono::TimeDelta::from_std(d.min(LONGEST_TOKEN_LIFETIME)).ok())
            .and_then(|d| Utc::now().checked_add_signed(d)),
        id_token: answer.extra_fields().id_token.clone(),
    }
}

fn token_error(
    err: RequestTokenError<HttpClientError<reqwest::Error>, oauth2::basic::BasicErrorResponse>,
) -> TokenError {
    match err {
        RequestTokenError::ServerResponse(answer) => {
            let words = match answer.error_description() {
                Some(description) => format!("{}: {description}", answer.error()),
                None => answer.error().to_string(),
            };
            match answer.error() {
                // RFC 6749 5.2: the grant (code or refresh token) is invalid,
                // expired or revoked; the client or scope no longer allowed.
                BasicErrorResponseType::InvalidGrant | BasicErrorResponseType::InvalidScope => {
                    TokenError::Revoked(words)
                }
                // The client's registration, not the user's grant: one
                // misconfiguration must not condemn every mailbox.
                BasicErrorResponseType::InvalidClient
                | BasicErrorResponseType::UnauthorizedClient => TokenError::Misconfigured(format!(
                    "the provider does not accept the configured OAuth client: {words}"
                )),
                _ => TokenError::Transient(words),
            }
        }
        RequestTokenError::Request(HttpClientError::Reqwest(e)) => {
            TokenError::Transient(without_url(&e))
        }
        RequestTokenError::Request(other) => TokenError::Transient(other.to_string()),
        // A non-JSON answer (a proxy's 5xx page, typically). The body is not
        // quoted: a half-valid answer may carry a token.
        RequestTokenError::Parse(err, _) => {
            TokenError::Transient(format!("unreadable answer from the token endpoint: {err}"))
        }
        RequestTokenError::Other(words) => TokenError::Transient(words),
    }
}

/// The `email` (or `preferred_username`) claim of an id_token. Its signature
/// is not checked: it came straight from the token endpoint over verified
/// TLS, which OpenID Connect Core 3.1.3.7 accepts in place of a signature. It
/// only names the account; the IMAP login that follows proves it.
pub fn email_from_id_token(id_token: &str) -> Option<String> {
    use base64::Engine as _;
    let payload = id_token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    ["email", "preferred_username"]
        .iter()
        .filter_map(|claim| claims.get(claim)?.as_str())
        .find(|value| value.contains('@'))
        .map(crate::model::normalize_email)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    fn id_token(claims: serde_json::Value) -> String {
        let encode = |v: &serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        format!(
            "{}.{}.sig",
            encode(&serde_json::json!({"alg": "RS256"})),
            encode(&claims)
        )
    }

    /// A token endpoint's `expires_in` is the provider's to choose: however
    /// large, it is a date, never a panic.
    #[test]
    fn any_expires_in_gives_a_date() {
        for (expires_in, at_most_days) in [(3_599u64, 1), (0, 1), (10_000_000_000_000, 366)] {
            let answer: TokenAnswer = serde_json::from_value(serde_json::json!({
                "access_token": "x", "token_type": "Bearer", "expires_in": expires_in
            }))
            .unwrap();
            let expires_at = grant(answer).expires_at.unwrap();
            assert!(expires_at <= Utc::now() + chrono::TimeDelta::days(at_most_days));
        }
    }

    #[test]
    fn the_account_address_comes_from_the_id_token() {
        assert_eq!(
            email_from_id_token(&id_token(serde_json::json!({"email": "Me@Example.com"}))),
            Some("me@example.com".into())
        );
        assert_eq!(
            email_from_id_token(&id_token(
                serde_json::json!({"preferred_username": "me@contoso.com"})
            )),
            Some("me@contoso.com".into())
        );
        assert_eq!(
            email_from_id_token(&id_token(serde_json::json!({"sub": "123"}))),
            None
        );
        assert_eq!(email_from_id_token("garbage"), None);
        assert_eq!(email_from_id_token("a.!!!.c"), None);
    }

    fn settings(provider: Provider) -> OAuthSettings {
        let mut config = crate::config::ProvidersConfig::default();
        let oauth = crate::config::OAuthOverrides {
            client_id: Some("client-1".into()),
            ..Default::default()
        };
        match provider {
            Provider::Gmail => config.gmail.oauth = oauth,
            Provider::Outlook => config.outlook.oauth = oauth,
            Provider::Imap => config.imap.oauth = oauth,
        }
        config.settings(provider).oauth
    }

    #[test]
    fn google_is_asked_for_offline_access_consent_and_pkce() {
        let client = ProviderClient::new(&settings(Provider::Gmail)).unwrap();
        let verifier = PkceCodeVerifier::new("v".repeat(43));
        let url = client
            .authorize_url(
                "https://bridge.example/v1/oauth/gmail/callback",
                "st",
                &verifier,
                None,
            )
            .unwrap();
        let url = oauth2::url::Url::parse(&url).unwrap();
        assert_eq!(url.host_str(), Some("accounts.google.com"));
        let query: std::collections::HashMap<_, _> = url.query_pairs().into_owned().collect();
        assert_eq!(query["response_type"], "code");
        assert_eq!(query["client_id"], "client-1");
        assert_eq!(query["state"], "st");
        assert_eq!(query["code_challenge_method"], "S256");
        assert_eq!(
            query["code_challenge"],
            PkceCodeChallenge::from_code_verifier_sha256(&verifier).as_str()
        );
        assert_eq!(query["access_type"], "offline");
        assert_eq!(query["prompt"], "consent");
        assert_eq!(query["scope"], "https://mail.google.com/ openid email");
    }

    #[test]
    fn microsoft_is_asked_for_imap_smtp_and_offline_access() {
        let client = ProviderClient::new(&settings(Provider::Outlook)).unwrap();
        let verifier = PkceCodeVerifier::new("v".repeat(43));
        let url = client
            .authorize_url("https://b.example/cb", "st", &verifier, None)
            .unwrap();
        let url = oauth2::url::Url::parse(&url).unwrap();
        assert_eq!(url.host_str(), Some("login.microsoftonline.com"));
        assert_eq!(url.path(), "/common/oauth2/v2.0/authorize");
        let query: std::collections::HashMap<_, _> = url.query_pairs().into_owned().collect();
        assert_eq!(
            query["scope"],
            "https://outlook.office.com/IMAP.AccessAsUser.All https://outlook.office.com/SMTP.Send offline_access openid email"
        );
        assert!(!query.contains_key("access_type"));
    }

    #[test]
    fn a_provider_without_client_id_names_the_missing_key() {
        let settings = crate::config::ProvidersConfig::default()
            .settings(Provider::Outlook)
            .oauth;
        match ProviderClient::new(&settings) {
            Err(TokenError::Misconfigured(words)) => {
                assert!(
                    words.contains("providers.outlook.oauth.client_id"),
                    "{words}"
                )
            }
            _ => panic!("expected a configuration error"),
        }
    }
}
