//! The OAuth2/OIDC provider started by scripts/oauth-test-server/start.sh (on
//! oauth2-mock-server): authorization code with PKCE S256, refresh tokens, and
//! control endpoints that change how it answers. Its access tokens are RS256
//! JWTs whose `email` claim is the address, and the mail stack's Dovecot
//! accepts them for XOAUTH2. Emails compare lower-cased on the server.

use std::{collections::HashMap, path::PathBuf};

use reqwest::{StatusCode, Url, header::LOCATION, redirect::Policy};
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Clone, Debug)]
pub struct OAuthServer {
    /// Base URL of the provider, e.g. `http://127.0.0.1:PORT`.
    pub issuer: String,
    /// Base URL of the control endpoints.
    pub control: String,
    /// Never follows redirects: `authorize` returns the redirect itself.
    http: reqwest::Client,
}

/// Tokens as a CRM that runs its own consent screen would hand them over.
#[derive(Clone, Debug, Deserialize)]
pub struct Grant {
    pub refresh_token: String,
    pub access_token: String,
    /// RFC 3339, e.g. `2026-01-01T12:00:00Z`.
    pub expires_at: String,
}

/// Token-endpoint requests concerning one email since the server started,
/// attempts rather than successes: refused and injected failures count too.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct Stats {
    pub code_exchanges: u64,
    pub refreshes: u64,
    /// Requests answered with an error (refused or injected by `fail_next`).
    pub failed: u64,
}

impl OAuthServer {
    pub fn get() -> OAuthServer {
        let runtime = std::env::var("MAILSTACK_RUNTIME")
            .map(PathBuf::from)
            .unwrap_or_else(|_| std::env::temp_dir().join("mailbridge-mailstack"));
        let env_file = runtime.join("oauth.env");
        let text = std::fs::read_to_string(&env_file).unwrap_or_else(|e| {
            panic!(
                "the OAuth test server is not running ({}: {e}); start it with `sudo scripts/oauth-test-server/start.sh` (after the mail stack) or run scripts/test.sh",
                env_file.display()
            )
        });
        let vars: HashMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
        let var = |k: &str| {
            vars.get(k)
                .map(|v| v.to_string())
                .unwrap_or_else(|| panic!("{k} missing in {}", env_file.display()))
        };
        OAuthServer {
            issuer: var("OAUTH_ISSUER"),
            control: var("OAUTH_CONTROL"),
            http: reqwest::Client::builder()
                .redirect(Policy::none())
                .build()
                .expect("http client"),
        }
    }

    pub fn auth_url(&self) -> String {
        format!("{}/authorize", self.issuer)
    }

    pub fn token_url(&self) -> String {
        format!("{}/token", self.issuer)
    }

    pub fn userinfo_url(&self) -> String {
        format!("{}/userinfo", self.issuer)
    }

    pub fn jwks_url(&self) -> String {
        format!("{}/jwks", self.issuer)
    }

    /// Access tokens issued for `email` from now on live `secs` seconds.
    pub async fn set_lifetime(&self, email: &str, secs: i64) {
        self.post("lifetime", json!({ "email": email, "seconds": secs }))
            .await;
    }

    /// Every refresh token of `email` now gets `invalid_grant`.
    pub async fn revoke(&self, email: &str) {
        self.post("revoke", json!({ "email": email })).await;
    }

    /// The next `count` token-endpoint requests for `email` answer `status`
    /// with `{"error":"temporarily_unavailable"}`.
    pub async fn fail_next(&self, email: &str, status: u16, count: u32) {
        self.post(
            "fail",
            json!({ "email": email, "status": status, "count": count }),
        )
        .await;
    }

    pub async fn grant(&self, email: &str) -> Grant {
        let answer = self.post("grant", json!({ "email": email })).await;
        serde_json::from_value(answer).expect("grant answer")
    }

    pub async fn stats(&self, email: &str) -> Stats {
        let mut url = Url::parse(&format!("{}/stats", self.control)).expect("control URL");
        url.query_pairs_mut().append_pair("email", email);
        let answer = self.send(self.http.get(url), "stats").await;
        serde_json::from_value(answer).expect("stats answer")
    }

    /// Plays the browser on the authorize URL the daemon built, logging in as
    /// `email`; returns the redirect back to the daemon (its callback URL with
    /// `code` and `state`).
    pub async fn authorize(&self, url: &str, email: &str) -> String {
        self.redirect_of(url, ("mock_email", email)).await
    }

    /// Like `authorize`, but the user refuses consent: the callback URL carries
    /// `error=access_denied` and `state`.
    pub async fn deny(&self, url: &str) -> String {
        self.redirect_of(url, ("mock_deny", "1")).await
    }

    async fn redirect_of(&self, url: &str, (key, value): (&str, &str)) -> String {
        let mut url = Url::parse(url).unwrap_or_else(|e| panic!("authorize URL {url:?}: {e}"));
        url.query_pairs_mut().append_pair(key, value);
        let response = self
            .http
            .get(url.clone())
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let status = response.status();
        let location = response
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        match location {
            Some(location) if status == StatusCode::FOUND => location,
            _ => panic!(
                "GET {url}: expected a redirect, got {status}: {}",
                response.text().await.unwrap_or_default()
            ),
        }
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        let request = self
            .http
            .post(format!("{}/{path}", self.control))
            .json(&body);
        self.send(request, path).await
    }

    async fn send(&self, request: reqwest::RequestBuilder, what: &str) -> Value {
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("OAuth control {what}: {e}"));
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        assert!(
            status.is_success(),
            "OAuth control {what}: {status}: {text}"
        );
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("OAuth control {what}: {e} in {text:?}"))
    }
}
