//! "Sign in with Google/Microsoft": the CRM asks for the provider's consent
//! URL (`start`, API key required), the person consents, and the provider
//! sends the browser back to `callback`, which the signed `state` alone
//! authenticates. The callback exchanges the code, learns the account's
//! address, connects the mailbox exactly as a PUT would, and sends the person
//! on to the CRM's `return_to` with the outcome.

use axum::{
    extract::{Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{Html, IntoResponse, Response},
};
use chrono::Utc;
use serde::Deserialize;

use super::{
    AppState,
    error::{ApiError, ApiPath, ApiQuery, ErrorBody, check_id},
    mailboxes::{ConnectRequest, connect_mailbox},
};
use crate::{
    model::{Credentials, Provider, SaveSent, new_id},
    oauth::{
        TokenError,
        state::{FlowState, STATE_LIFETIME_SECS},
    },
};

/// A started flow's nonce is kept under this prefix until its callback takes it.
const FLOW_SETTING: &str = "oauth_flow:";

fn provider_of(name: &str) -> Result<Provider, ApiError> {
    match name {
        "gmail" => Ok(Provider::Gmail),
        "outlook" => Ok(Provider::Outlook),
        "imap" => Ok(Provider::Imap),
        _ => Err(ApiError::not_found(format!(
            "no provider {name:?}; use gmail, outlook or imap"
        ))),
    }
}

fn not_configured(err: TokenError) -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "oauth_not_configured",
        err.to_string(),
    )
}

fn redirect_url(state: &AppState, provider: Provider) -> String {
    format!(
        "{}/v1/oauth/{}/callback",
        state.public_url,
        provider.as_str()
    )
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StartQuery {
    location_id: String,
    user_id: String,
    /// Where the person's browser goes afterwards, with
    /// `?status=connected&email=…` or `?status=error&reason=…`.
    #[serde(default)]
    return_to: Option<String>,
    /// Passed on to the provider to preselect the account.
    #[serde(default)]
    login_hint: Option<String>,
}

/// The provider's consent page, for an `Accept: application/json` caller.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ConsentUrl {
    url: String,
}

/// Starts "Sign in with Google/Microsoft" (authorization code with PKCE and
/// offline access).
#[utoipa::path(
    get,
    path = "/oauth/{provider}/start",
    tag = "oauth",
    params(("provider" = String, Path, description = "`gmail` or `outlook`"), StartQuery),
    responses(
        (status = 200, description = "With `Accept: application/json`: the consent page's URL", body = ConsentUrl),
        (status = 302, description = "To the provider's consent page", headers(("Location" = String))),
        (status = 404, description = "No such provider", body = ErrorBody),
        (status = 422, description = "The provider has no OAuth client configured (`oauth_not_configured`), or `return_to` is not an http(s) URL", body = ErrorBody),
    ),
)]
pub async fn start(
    State(state): State<AppState>,
    ApiPath(provider): ApiPath<String>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<StartQuery>,
) -> Result<Response, ApiError> {
    let provider = provider_of(&provider)?;
    check_id("location_id", &query.location_id)?;
    check_id("user_id", &query.user_id)?;
    if let Some(return_to) = &query.return_to {
        let parsed = oauth2::url::Url::parse(return_to)
            .map_err(|e| ApiError::invalid(format!("return_to is not an absolute URL: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(ApiError::invalid("return_to must be an http(s) URL"));
        }
    }
    let client = state
        .auth
        .provider_client(provider)
        .map_err(not_configured)?;
    let flow = FlowState {
        nonce: new_id("flow"),
        provider,
        location_id: query.location_id,
        user_id: query.user_id,
        return_to: query.return_to,
        expires_at: Utc::now().timestamp() + STATE_LIFETIME_SECS,
    };
    let url = client
        .authorize_url(
            &redirect_url(&state, provider),
            &state.oauth_state.sign(&flow),
            &state.oauth_state.verifier(&flow.nonce),
            query.login_hint.as_deref(),
        )
        .map_err(not_configured)?;
    forget_abandoned_flows(&state)?;
    state.store.put_setting(
        &format!("{FLOW_SETTING}{}", flow.nonce),
        &flow.expires_at.to_be_bytes(),
    )?;
    let wants_json = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("application/json"));
    if wants_json {
        Ok(axum::Json(ConsentUrl { url }).into_response())
    } else {
        Ok(found(&url))
    }
}

/// Sign-ins whose person never came back: their state expired, so their
/// nonce can go (at most one per start in the last 10 minutes stays).
fn forget_abandoned_flows(state: &AppState) -> Result<(), ApiError> {
    forget_expired_flows(state.store.as_ref(), Utc::now().timestamp())?;
    Ok(())
}

/// Removes the nonces of sign-ins whose state expired before `now_secs`
/// (issue 21: also on the retention sweep's timer, so a bridge where no
/// sign-in starts again keeps none); returns how many.
pub fn forget_expired_flows(
    store: &dyn crate::store::Store,
    now_secs: i64,
) -> crate::store::StoreResult<usize> {
    let mut removed = 0;
    for (name, value) in store.settings_with_prefix(FLOW_SETTING)? {
        let expires_at = <[u8; 8]>::try_from(value.as_slice())
            .map(i64::from_be_bytes)
            .unwrap_or(0);
        if expires_at < now_secs && store.take_setting(&name)?.is_some() {
            removed += 1;
        }
    }
    Ok(removed)
}

/// What the provider sends back (RFC 6749 §4.1.2).
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CallbackQuery {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    error_description: Option<String>,
}

/// A 302, as browsers and the providers' own flows expect.
fn found(url: &str) -> Response {
    (StatusCode::FOUND, [(header::LOCATION, url.to_string())]).into_response()
}

/// A page for the person when there is nowhere to send them back to.
fn error_page(reason: &str) -> Response {
    let escaped = reason
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    (
        StatusCode::BAD_REQUEST,
        Html(format!(
            "<!doctype html><title>Sign-in failed</title><h1>Sign-in failed</h1><p>{escaped}</p>"
        )),
    )
        .into_response()
}

/// Sends the person on to the CRM with the outcome in the query.
fn back_to(return_to: &str, outcome: &[(&str, &str)]) -> Response {
    match oauth2::url::Url::parse(return_to) {
        Ok(mut url) => {
            url.query_pairs_mut().extend_pairs(outcome);
            found(url.as_str())
        }
        Err(_) => error_page("the return address of this sign-in is not valid"),
    }
}

/// Where the provider sends the person's browser back; the signed `state`
/// authenticates it, not an API key.
#[utoipa::path(
    get,
    path = "/oauth/{provider}/callback",
    tag = "oauth",
    params(("provider" = String, Path), CallbackQuery),
    responses(
        (status = 302, description = "To `return_to`, with the outcome in its query", headers(("Location" = String))),
        (status = 200, description = "Connected, and no `return_to` was given", content_type = "text/html", body = String),
        (status = 400, description = "The sign-in failed, and no `return_to` was given (or the state is not valid)", content(
            (String = "text/html"),
            (ErrorBody = "application/json"),
        )),
    ),
)]
pub async fn callback(
    State(state): State<AppState>,
    ApiPath(provider): ApiPath<String>,
    query: Result<Query<CallbackQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(query)) = query else {
        return error_page("the provider's answer could not be read");
    };
    let Some(flow) = query
        .state
        .as_deref()
        .and_then(|s| state.oauth_state.verify(s).ok())
    else {
        tracing::warn!("OAuth callback with a missing, altered or foreign state refused");
        return error_page("this sign-in link is not valid; start the sign-in again");
    };
    let finish = |outcome: Result<String, String>| {
        match (&flow.return_to, outcome) {
        (Some(to), Ok(email)) => back_to(to, &[("status", "connected"), ("email", &email)]),
        (Some(to), Err(reason)) => back_to(to, &[("status", "error"), ("reason", &reason)]),
        (None, Ok(email)) => Html(format!(
            "<!doctype html><title>Connected</title><h1>Connected</h1><p>{} is connected; you can close this window.</p>",
            email.replace('<', "&lt;")
        ))
        .into_response(),
        (None, Err(reason)) => error_page(&reason),
    }
    };
    if provider_of(&provider).ok() != Some(flow.provider) {
        return finish(Err("the sign-in came back to another provider".into()));
    }
    // Taken once: a replayed state finds nothing.
    let taken = state
        .store
        .take_setting(&format!("{FLOW_SETTING}{}", flow.nonce));
    match taken {
        Ok(Some(_)) => {}
        Ok(None) => {
            tracing::warn!(location = %flow.location_id, "OAuth callback replayed");
            return finish(Err("this sign-in was already used; start it again".into()));
        }
        Err(err) => {
            tracing::error!("reading the sign-in state failed: {err:#}");
            return finish(Err("the bridge could not read its storage; retry".into()));
        }
    }
    if flow.expires_at < Utc::now().timestamp() {
        return finish(Err(
            "the sign-in took longer than 10 minutes; start it again".into(),
        ));
    }
    if let Some(error) = &query.error {
        let reason = match &query.error_description {
            Some(description) => format!("{error}: {description}"),
            None => error.clone(),
        };
        return finish(Err(format!("the provider did not grant access ({reason})")));
    }
    let Some(code) = query.code.as_deref().filter(|c| !c.is_empty()) else {
        return finish(Err("the provider sent no authorization code".into()));
    };
    finish(connect_from_code(&state, &flow, code).await)
}

async fn connect_from_code(
    state: &AppState,
    flow: &FlowState,
    code: &str,
) -> Result<String, String> {
    let client = state
        .auth
        .provider_client(flow.provider)
        .map_err(|e| e.to_string())?;
    let http = state.auth.token_http();
    let grant = client
        .exchange_code(
            http,
            &redirect_url(state, flow.provider),
            code,
            state.oauth_state.verifier(&flow.nonce),
        )
        .await
        .map_err(|e| e.to_string())?;
    let email = client.account_email(http, &grant).await?;
    let refresh_token = grant.refresh_token.clone().ok_or_else(|| {
        "the provider granted no refresh token (offline access); remove the app's access in the account settings and sign in again".to_string()
    })?;
    // Signing in again (after needs_reauth) keeps the mailbox's settings
    // (limit, filing); its servers are always the provider's.
    let existing = state
        .store
        .mailbox(&email)
        .map_err(|e| format!("the bridge could not read its storage; retry ({e})"))?
        .filter(|mailbox| mailbox.provider == flow.provider);
    let request = ConnectRequest {
        address: email.clone(),
        provider: flow.provider,
        credentials: Credentials::OAuth2 {
            username: email.clone(),
            refresh_token,
            access_token: Some(grant.access_token.clone()),
            expires_at: grant.expires_at,
            issued_at: Some(Utc::now()),
        },
        // The provider's own servers (the operator's [providers] settings),
        // never ones stored with the address: a mailbox claimed earlier with
        // another server must not receive this person's access token.
        imap: None,
        smtp: None,
        daily_send_limit: existing.as_ref().and_then(|m| m.daily_send_limit),
        save_sent: existing.map(|m| m.save_sent).unwrap_or(SaveSent::Auto),
        folders: None,
    };
    connect_mailbox(state, &flow.location_id, &flow.user_id, request)
        .await
        .map_err(|err| err.message)?;
    tracing::info!(location = %flow.location_id, user = %flow.user_id, mailbox = %email, "connected through OAuth sign-in");
    Ok(email)
}

#[cfg(test)]
mod retention_tests {
    use super::*;
    use crate::store::Store as _;

    /// Issue 21 item 1: an abandoned sign-in's nonce goes once its state
    /// expired (10 minutes), a live one stays.
    #[test]
    fn expired_sign_in_nonces_go_and_live_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::SledStore::open(
            dir.path(),
            crate::store::secret_box::SecretBox::from_key(&[1; 32]),
        )
        .unwrap();
        let now = 1_900_000_000_i64;
        let started = |nonce: &str, expires_at: i64| {
            store
                .put_setting(&format!("{FLOW_SETTING}{nonce}"), &expires_at.to_be_bytes())
                .unwrap();
        };
        started("flow_old", now - 1);
        started("flow_live", now + STATE_LIFETIME_SECS);
        store.put_setting("unrelated", b"kept").unwrap();
        assert_eq!(forget_expired_flows(&store, now).unwrap(), 1);
        let left: Vec<String> = store
            .settings_with_prefix(FLOW_SETTING)
            .unwrap()
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        assert_eq!(left, vec![format!("{FLOW_SETTING}flow_live")]);
        assert!(store.setting("unrelated").unwrap().is_some());
        assert_eq!(forget_expired_flows(&store, now).unwrap(), 0);
    }
}
