//! Connecting, inspecting and disconnecting a user's mailbox (an integration).

use axum::{Json, extract::State, http::StatusCode};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{
    AppState,
    error::ErrorBody,
    error::{ApiError, ApiJson, ApiPath, ApiQuery, check_email, check_id},
};
use crate::{
    event_data::{self, DetachReason, MailboxLifecycle, ThreadDetached},
    imap::{
        ConnectError, checked,
        connection::{ImapSession, is_loopback},
        folders,
    },
    model::{
        Credentials, Endpoint, Event, FolderCursor, FolderRole, Integration, Login, Mailbox,
        MailboxState, Provider, SaveSent, Security, SendStatus,
    },
    oauth::TokenError,
    send_queue,
    sync_status::{FolderStatus, SyncStatus},
};

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConnectBody {
    #[schema(example = "me@example.com")]
    email: String,
    provider: Provider,
    auth: AuthBody,
    /// Optional with the gmail and outlook presets.
    #[serde(default)]
    imap: Option<Endpoint>,
    #[serde(default)]
    smtp: Option<Endpoint>,
    /// Sends allowed per rolling 24 hours (R14).
    #[serde(default)]
    daily_send_limit: Option<u32>,
    #[serde(default)]
    save_sent: SaveSent,
    /// Folders to watch beside INBOX and Sent; omitted keeps the mailbox's list.
    #[serde(default)]
    #[schema(max_items = 20)]
    folders: Option<Vec<String>>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
enum AuthBody {
    /// LOGIN/PLAIN; `username` defaults to the address.
    Password {
        #[serde(default)]
        username: Option<String>,
        password: String,
    },
    /// Tokens from the CRM's own consent screen.
    #[serde(rename = "oauth2")]
    OAuth2 {
        #[serde(default)]
        username: Option<String>,
        refresh_token: String,
        #[serde(default)]
        access_token: Option<String>,
        /// RFC 3339.
        #[serde(default)]
        expires_at: Option<String>,
    },
}

/// What connecting a mailbox takes, from a PUT or from a finished sign-in.
pub struct ConnectRequest {
    pub address: String,
    pub provider: Provider,
    pub credentials: Credentials,
    pub imap: Option<Endpoint>,
    pub smtp: Option<Endpoint>,
    pub daily_send_limit: Option<u32>,
    pub save_sent: SaveSent,
    /// None keeps the mailbox's list (empty for a new one).
    pub folders: Option<Vec<String>>,
}

/// At most this many listed folders per mailbox: each is one more IMAP session.
pub const MAX_LISTED_FOLDERS: usize = 20;

/// Checks the listed folders: names a server could have, none twice, none
/// already watched as INBOX.
fn check_folders(folders: &[String]) -> Result<(), ApiError> {
    if folders.len() > MAX_LISTED_FOLDERS {
        return Err(ApiError::invalid(format!(
            "folders: at most {MAX_LISTED_FOLDERS} folders can be listed"
        )));
    }
    for (index, name) in folders.iter().enumerate() {
        let field = format!("folders[{index}]");
        if name.is_empty() || name.len() > 512 {
            return Err(ApiError::invalid(format!(
                "{field} must be a folder name of 1 to 512 bytes"
            )));
        }
        no_line_breaks(&field, &[name])?;
        if name.eq_ignore_ascii_case("INBOX") {
            return Err(ApiError::invalid(format!(
                "{field}: INBOX is always watched"
            )));
        }
        if folders[..index].contains(name) {
            return Err(ApiError::invalid(format!(
                "{field}: \"{name}\" is listed twice"
            )));
        }
    }
    Ok(())
}

fn no_line_breaks(field: &str, values: &[&str]) -> Result<(), ApiError> {
    if values
        .iter()
        .any(|v| v.contains(['\r', '\n', '\0', '\x01']))
    {
        return Err(ApiError::invalid(format!(
            "{field} must not contain CR, LF, NUL or ^A"
        )));
    }
    Ok(())
}

fn credentials_of(address: &str, auth: AuthBody) -> Result<Credentials, ApiError> {
    match auth {
        AuthBody::Password { username, password } => {
            let username = username.unwrap_or_else(|| address.to_string());
            if username.is_empty() || password.is_empty() {
                return Err(ApiError::invalid(
                    "auth.username and auth.password must not be empty",
                ));
            }
            no_line_breaks("auth.username and auth.password", &[&username, &password])?;
            Ok(Credentials::Password { username, password })
        }
        AuthBody::OAuth2 {
            username,
            refresh_token,
            access_token,
            expires_at,
        } => {
            let username = username.unwrap_or_else(|| address.to_string());
            if refresh_token.trim().is_empty() {
                return Err(ApiError::invalid("auth.refresh_token must not be empty"));
            }
            no_line_breaks(
                "auth.username, auth.refresh_token and auth.access_token",
                &[
                    &username,
                    &refresh_token,
                    access_token.as_deref().unwrap_or(""),
                ],
            )?;
            let expires_at = expires_at
                .map(|text| {
                    DateTime::parse_from_rfc3339(&text)
                        .map(|t| t.with_timezone(&Utc))
                        .map_err(|e| {
                            ApiError::invalid(format!(
                                "auth.expires_at must be an RFC 3339 time: {e}"
                            ))
                        })
                })
                .transpose()?;
            Ok(Credentials::OAuth2 {
                username,
                refresh_token,
                access_token: access_token.filter(|t| !t.is_empty()),
                expires_at,
                issued_at: None,
            })
        }
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct MailboxStatus {
    email: String,
    provider: Provider,
    /// `connecting` until every watched folder's session is logged in and
    /// caught up (after a restart too), `active` then, `error` while one
    /// fails, `needs_reauth` once the credentials were refused for good.
    state: MailboxState,
    last_error: Option<String>,
    connected_at: DateTime<Utc>,
    sent_last_24h: u32,
    daily_send_limit: Option<u32>,
    smart_bcc_address: String,
    save_sent: SaveSent,
    /// The folders listed to watch beside INBOX and Sent.
    folders: Vec<String>,
    /// Each watched folder's session.
    watched: Vec<FolderStatus>,
}

/// How a mailbox's sync stands: `needs_reauth` is stored (it outlives a
/// restart); the rest is what this process's sessions report.
fn live_state(
    sync_status: &SyncStatus,
    address: &str,
    stored: MailboxState,
    stored_error: &Option<String>,
) -> (MailboxState, Option<String>) {
    match stored {
        MailboxState::NeedsReauth => (MailboxState::NeedsReauth, stored_error.clone()),
        _ => sync_status.mailbox_state(address),
    }
}

fn status_of(
    state: &AppState,
    mailbox: &Mailbox,
    integration: &Integration,
) -> Result<MailboxStatus, ApiError> {
    let (sent_last_24h, _) = state
        .store
        .quota_use(&mailbox.address, Utc::now().timestamp_millis())?;
    let (live, last_error) = live_state(
        &state.sync_status,
        &mailbox.address,
        mailbox.state,
        &mailbox.last_error,
    );
    Ok(MailboxStatus {
        email: mailbox.address.clone(),
        provider: mailbox.provider,
        state: live,
        last_error,
        connected_at: integration.connected_at,
        sent_last_24h,
        daily_send_limit: mailbox.daily_send_limit,
        // Derived, so an integration stored before it was keeps working.
        smart_bcc_address: state
            .smart
            .address(&integration.location_id, &integration.user_id),
        save_sent: mailbox.save_sent,
        folders: mailbox.folders.clone(),
        watched: state.sync_status.folders(&mailbox.address),
    })
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only mailboxes in this state.
    #[param(inline)]
    state: Option<MailboxState>,
    /// At most this many (1 to 1000, default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// One mailbox in an operator's listing.
#[derive(Serialize, utoipa::ToSchema)]
pub struct MailboxSummary {
    email: String,
    provider: Provider,
    state: MailboxState,
    last_error: Option<String>,
    watched: Vec<FolderStatus>,
}

/// A page of mailboxes, in address order.
#[derive(Serialize, utoipa::ToSchema)]
pub struct MailboxPage {
    mailboxes: Vec<MailboxSummary>,
    /// Pass as `cursor` for the next page; null on the last one.
    next_cursor: Option<String>,
}

/// Every connected mailbox (the Auto BCC catch-all too), for operators.
#[utoipa::path(
    get,
    path = "/mailboxes",
    tag = "mailboxes",
    params(ListQuery),
    responses((status = 200, description = "A page of mailboxes", body = MailboxPage)),
)]
pub async fn list(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<MailboxPage>, ApiError> {
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid("limit must be 1 to 1000"));
    }
    let wanted = query.state;
    let store = state.store.clone();
    let sync_status = state.sync_status.clone();
    let page = tokio::task::spawn_blocking(move || {
        let mut summaries = Vec::new();
        let mailboxes =
            store.mailbox_summaries_after(query.cursor.as_deref(), limit, &mut |mailbox| {
                let (live, last_error) = live_state(
                    &sync_status,
                    &mailbox.address,
                    mailbox.state,
                    &mailbox.last_error,
                );
                if wanted.is_some_and(|wanted| wanted != live) {
                    return false;
                }
                summaries.push(MailboxSummary {
                    email: mailbox.address.clone(),
                    provider: mailbox.provider,
                    state: live,
                    last_error,
                    watched: sync_status.folders(&mailbox.address),
                });
                true
            })?;
        let next_cursor = match mailboxes.len() == limit {
            true => mailboxes.last().map(|m| m.address.clone()),
            false => None,
        };
        Ok::<_, crate::store::StoreError>(MailboxPage {
            mailboxes: summaries,
            next_cursor,
        })
    })
    .await
    .map_err(|e| crate::store::StoreError::Engine(format!("listing mailboxes stopped: {e}")))??;
    Ok(Json(page))
}

fn check_endpoint(field: &str, endpoint: &Endpoint) -> Result<(), ApiError> {
    if endpoint.host.is_empty()
        || endpoint.host.len() > 253
        || endpoint
            .host
            .chars()
            .any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(ApiError::invalid(format!(
            "{field}.host is not a host name"
        )));
    }
    if endpoint.port == 0 {
        return Err(ApiError::invalid(format!("{field}.port must not be 0")));
    }
    if endpoint.security == Security::Plain && !is_loopback(&endpoint.host) {
        return Err(ApiError::invalid(format!(
            "{field}.security \"plain\" is only allowed towards a loopback address; use \"tls\" or \"starttls\""
        )));
    }
    Ok(())
}

/// Connects the user's mailbox, or points the integration at another address.
/// Answers once the credentials logged in to the server; nothing is stored
/// when they did not.
#[utoipa::path(
    put,
    path = "/locations/{location_id}/users/{user_id}/mailbox",
    tag = "mailboxes",
    params(("location_id" = String, Path), ("user_id" = String, Path)),
    request_body = ConnectBody,
    responses(
        (status = 200, description = "Connected; sync starts", body = MailboxStatus),
        (status = 409, description = "Another location connected this address with other servers or login (`mailbox_in_use`)", body = ErrorBody),
        (status = 422, description = "A field is invalid, or the server refused the login (`invalid_credentials`) or cannot be reached (`imap_connection_failed`)", body = ErrorBody),
        (status = 503, description = "The server or the provider's token endpoint cannot take the login now; retry", body = ErrorBody),
    ),
)]
pub async fn put(
    State(state): State<AppState>,
    ApiPath((location_id, user_id)): ApiPath<(String, String)>,
    ApiJson(body): ApiJson<ConnectBody>,
) -> Result<Json<MailboxStatus>, ApiError> {
    check_id("location_id", &location_id)?;
    check_id("user_id", &user_id)?;
    let request = connect_request(body)?;
    Ok(Json(
        connect_mailbox(&state, &location_id, &user_id, request).await?,
    ))
}

/// A connect body, checked.
pub fn connect_request(body: ConnectBody) -> Result<ConnectRequest, ApiError> {
    let address = check_email("email", &body.email)?;
    let credentials = credentials_of(&address, body.auth)?;
    Ok(ConnectRequest {
        address,
        provider: body.provider,
        credentials,
        imap: body.imap,
        smtp: body.smtp,
        daily_send_limit: body.daily_send_limit,
        save_sent: body.save_sent,
        folders: match body.folders {
            Some(folders) => {
                check_folders(&folders)?;
                Some(folders)
            }
            None => None,
        },
    })
}

/// The answer when an integration would move a shared mailbox to another
/// account or other servers.
fn in_use(address: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "mailbox_in_use",
        format!(
            "{address} is connected by other integrations with another login or other IMAP/SMTP servers; connect it with the same username, imap and smtp, or have them disconnect first"
        ),
    )
}

/// Connects (or re-connects, or moves) an integration once the server has
/// taken the credentials.
pub async fn connect_mailbox(
    state: &AppState,
    location_id: &str,
    user_id: &str,
    body: ConnectRequest,
) -> Result<MailboxStatus, ApiError> {
    let (location_id, user_id) = (location_id.to_string(), user_id.to_string());
    let address = body.address.clone();
    let preset = state.providers.settings(body.provider);
    let imap = body
        .imap
        .or(preset.imap)
        .ok_or_else(|| ApiError::invalid("imap is required for provider \"imap\""))?;
    let smtp = body
        .smtp
        .or(preset.smtp)
        .ok_or_else(|| ApiError::invalid("smtp is required for provider \"imap\""))?;
    check_endpoint("imap", &imap)?;
    check_endpoint("smtp", &smtp)?;
    // A mailbox other integrations use keeps its servers; asked before the
    // new server is even contacted (the store checks again as it commits).
    if let Some(stored) = state.store.mailbox(&address)?
        && !(stored.imap.same_server(&imap)
            && stored.smtp.same_server(&smtp)
            && stored
                .credentials
                .username()
                .eq_ignore_ascii_case(body.credentials.username()))
        && state
            .store
            .integrations_of_mailbox(&address)?
            .iter()
            .any(|i| i.location_id != location_id || i.user_id != user_id)
    {
        return Err(in_use(&address));
    }

    // The credentials are checked against the server before anything is stored,
    // and the folders' current ends become this integration's starting point (R2).
    let folders = match body.folders {
        Some(folders) => folders,
        None => state
            .store
            .mailbox(&address)?
            .map(|m| m.folders)
            .unwrap_or_default(),
    };
    let (credentials, baseline, warm) =
        check_login(state, body.provider, &imap, body.credentials, &folders).await?;

    let existing = state.store.integration(&location_id, &user_id)?;
    let now = Utc::now();
    let mut events = Vec::new();
    let mut failed_sends = Vec::new();
    let integration = match existing {
        // Same mailbox, new credentials (R20): keep the starting point, so mail
        // that arrived meanwhile still syncs.
        Some(existing) if existing.mailbox == address => existing,
        other => {
            if let Some(previous) = other {
                // "Update email" (R18): the old mailbox's threads stop syncing
                // here, and nothing queued leaves from the old address.
                events.push(
                    MailboxLifecycle {
                        previous_mailbox: Some(previous.mailbox.clone()),
                        ..MailboxLifecycle::new(&location_id, &user_id, &address)
                    }
                    .event("mailbox.updated"),
                );
                events.extend(detached_threads(state, &previous, &address)?);
                for mut send in state.store.unsettled_sends()? {
                    if send.location_id == location_id
                        && send.user_id == user_id
                        && send.mailbox == previous.mailbox
                        && send.status == SendStatus::Queued
                    {
                        let event = send_queue::failed(
                            &mut send,
                            format!(
                                "the integration's email was changed to {address} before this message left; it was not sent from {}",
                                previous.mailbox
                            ),
                        );
                        failed_sends.push((send, event));
                    }
                }
            } else {
                events.push(
                    MailboxLifecycle::new(&location_id, &user_id, &address)
                        .event("mailbox.connected"),
                );
            }
            Integration {
                location_id: location_id.clone(),
                user_id: user_id.clone(),
                mailbox: address.clone(),
                connected_at: now,
                baseline: baseline.clone(),
                smart_bcc_address: state.smart.address(&location_id, &user_id),
            }
        }
    };
    let mailbox = Mailbox {
        address: address.clone(),
        provider: body.provider,
        credentials,
        imap,
        smtp,
        daily_send_limit: body.daily_send_limit.or(preset.daily_send_limit),
        save_sent: body.save_sent,
        folders,
        state: MailboxState::Connecting,
        last_error: None,
        // Numbered by the store.
        generation: 0,
        connected_at: state
            .store
            .mailbox(&address)?
            .map(|m| m.connected_at)
            .unwrap_or(now),
    };
    if integration.is_catch_all() {
        // The operator's catch-all is no CRM integration: nothing to tell.
        events.clear();
    } else {
        super::auto_bcc::register(state, &location_id, &user_id)?;
    }
    let released = state
        .store
        .connect(&mailbox, &integration, &baseline, &failed_sends, &events)
        .map_err(|err| match err {
            crate::store::StoreError::MailboxInUse => in_use(&address),
            other => other.into(),
        })?;
    if let Some(old) = released {
        state.scheduler.stop(&old);
    }
    // A refusal of the old credentials says nothing about these.
    state.auth.clear_refusals(&address);
    state.signal.notify();
    // The check's logged-in session goes on as the sync's first: one login
    // fewer per connect.
    state.scheduler.start_warm(&address, warm);
    status_of(state, &mailbox, &integration)
}

/// `thread.detached` for each of the user's conversations of `previous`'s
/// mailbox: after "update email" they no longer sync there (R18).
fn detached_threads(
    state: &AppState,
    previous: &Integration,
    new_address: &str,
) -> Result<Vec<Event>, ApiError> {
    let now = Utc::now();
    let mut events = Vec::new();
    for thread in state.store.threads_of_mailbox(&previous.mailbox)? {
        // Another user of the location may still use the old mailbox: only
        // this user's conversations stop.
        for route in thread
            .routes
            .iter()
            .filter(|r| r.location_id == previous.location_id && r.user_id == previous.user_id)
        {
            let data = ThreadDetached {
                thread_id: thread.id.clone(),
                location_id: route.location_id.clone(),
                user_id: route.user_id.clone(),
                contact_id: route.contact_id.clone(),
                mailbox: previous.mailbox.clone(),
                reason: DetachReason::MailboxUpdated,
                new_mailbox: Some(new_address.to_string()),
                pinned_to_location_id: None,
            };
            events.push(event_data::event("thread.detached", &thread.id, now, &data));
        }
    }
    Ok(events)
}

async fn check_login(
    state: &AppState,
    provider: Provider,
    imap: &Endpoint,
    credentials: Credentials,
    listed: &[String],
) -> Result<(Credentials, Vec<(FolderRole, FolderCursor)>, ImapSession), ApiError> {
    let token_failure = |err: TokenError| match err {
        TokenError::Revoked(words) => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_credentials",
            format!("auth: the provider refused the refresh token: {words}"),
        ),
        TokenError::Misconfigured(words) => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "oauth_not_configured",
            words,
        ),
        TokenError::Transient(words) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "oauth_provider_unavailable",
            format!("the provider's token endpoint did not answer usefully; retry: {words}"),
        ),
    };
    let mut signed = state
        .auth
        .usable(provider, &credentials, None)
        .await
        .map_err(token_failure)?;
    let mut opened = state.connector.open(imap, &signed.login).await;
    // A handed-over access token may be stale without saying so (no
    // expires_at): renew it once before calling the credentials bad.
    if matches!(opened, Err(ConnectError::Rejected(_)))
        && matches!(signed.login, Login::Bearer { .. })
    {
        signed = state
            .auth
            .usable(provider, &signed.credentials, Some(&signed.login))
            .await
            .map_err(token_failure)?;
        opened = state.connector.open(imap, &signed.login).await;
    }
    let mut session = opened.map_err(|err| match err {
        ConnectError::Rejected(words) => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_credentials",
            format!("auth: the IMAP server rejected the login: {words}"),
        ),
        ConnectError::Unavailable(words) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "imap_unavailable",
            format!("imap: the server cannot take the login now; retry: {words}"),
        ),
        other => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "imap_connection_failed",
            format!("imap: {other}"),
        ),
    })?;
    let credentials = signed.credentials;
    let step = state.connector.step_timeout();
    let failed = |what: &str, err: String| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "imap_connection_failed",
            format!("imap: {what}: {err}"),
        )
    };
    let all = tokio::time::timeout(step, checked::list_all(&mut session))
        .await
        .map_err(|_| failed("listing folders", "timed out".into()))?
        .map_err(|e| failed("listing folders", e.to_string()))?;
    let mut watched = vec![
        (FolderRole::Inbox, Some("INBOX".to_string())),
        (FolderRole::Sent, folders::sent_among(&all)),
    ];
    if provider == Provider::Gmail
        && let Some(all_mail) = all.iter().find(|f| f.is_all && !f.no_select)
    {
        watched.push((FolderRole::All, Some(all_mail.name.clone())));
    }
    for (index, name) in listed.iter().enumerate() {
        let refusal = match all.iter().find(|f| &f.name == name && !f.no_select) {
            None => Some("the mailbox has no folder by that name that holds mail"),
            // Already watched, or where a message is deleted, not filed:
            // listing it would report one move twice.
            Some(f) if Some(&f.name) == folders::sent_among(&all).as_ref() => {
                Some("the Sent folder is always watched")
            }
            Some(f) if f.is_bin => Some("Trash and Junk are not watched for new mail"),
            Some(f) if f.is_all && provider == Provider::Gmail => {
                Some("All Mail is always watched on Gmail")
            }
            // Two names with one hash would share a cursor (FNV-1a, 32 bits).
            Some(_)
                if watched
                    .iter()
                    .any(|(role, _)| *role == FolderRole::listed(name)) =>
            {
                Some("it shares its key with another listed folder; list one of them")
            }
            Some(_) => None,
        };
        if let Some(why) = refusal {
            let _ = tokio::time::timeout(step, session.logout()).await;
            return Err(ApiError::invalid(format!(
                "folders[{index}]: \"{name}\": {why}"
            )));
        }
        watched.push((FolderRole::listed(name), Some(name.clone())));
    }
    // With CONDSTORE the baseline holds HIGHESTMODSEQ too: the first session
    // then finds a folder that did not change since this check caught up by
    // its STATUS alone, and selects it only when it did.
    let condstore = tokio::time::timeout(step, session.capabilities())
        .await
        .map_err(|_| failed("asking the server's capabilities", "timed out".into()))?
        .map_err(|e| failed("asking the server's capabilities", e.to_string()))?
        .has_str("CONDSTORE");
    let figures = if condstore {
        "(UIDNEXT UIDVALIDITY HIGHESTMODSEQ)"
    } else {
        "(UIDNEXT UIDVALIDITY)"
    };
    let mut baseline = Vec::new();
    for (role, folder) in watched {
        let Some(folder) = folder else { continue };
        let status = tokio::time::timeout(step, session.status(&folder, figures))
            .await
            .map_err(|_| failed("reading folder status", "timed out".into()))?
            .map_err(|e| failed("reading folder status", e.to_string()))?;
        if let (Some(uid_validity), Some(next_uid)) = (status.uid_validity, status.uid_next) {
            baseline.push((
                role,
                FolderCursor {
                    // 0: the folder keeps no modseqs (RFC 7162), as if none.
                    highest_modseq: status.highest_modseq.filter(|modseq| *modseq > 0),
                    ..FolderCursor::new(uid_validity, next_uid)
                },
            ));
        }
    }
    Ok((credentials, baseline, session))
}

#[utoipa::path(
    get,
    path = "/locations/{location_id}/users/{user_id}/mailbox",
    tag = "mailboxes",
    params(("location_id" = String, Path), ("user_id" = String, Path)),
    responses(
        (status = 200, description = "How the mailbox stands", body = MailboxStatus),
        (status = 404, description = "The user has no mailbox", body = ErrorBody),
    ),
)]
pub async fn get(
    State(state): State<AppState>,
    ApiPath((location_id, user_id)): ApiPath<(String, String)>,
) -> Result<Json<MailboxStatus>, ApiError> {
    check_id("location_id", &location_id)?;
    check_id("user_id", &user_id)?;
    // The smart address it shows finds its user in the catch-all from now on.
    super::auto_bcc::register(&state, &location_id, &user_id)?;
    status(&state, &location_id, &user_id)?
        .map(Json)
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "no mailbox connected for user {user_id:?} in location {location_id:?}"
            ))
        })
}

/// How an integration's mailbox stands, if it has one.
pub fn status(
    state: &AppState,
    location_id: &str,
    user_id: &str,
) -> Result<Option<MailboxStatus>, ApiError> {
    let Some(integration) = state.store.integration(location_id, user_id)? else {
        return Ok(None);
    };
    let Some(mailbox) = state.store.mailbox(&integration.mailbox)? else {
        return Ok(None);
    };
    Ok(Some(status_of(state, &mailbox, &integration)?))
}

/// Disconnects (R19): sync stops at once; nothing synced is deleted.
#[utoipa::path(
    delete,
    path = "/locations/{location_id}/users/{user_id}/mailbox",
    tag = "mailboxes",
    params(("location_id" = String, Path), ("user_id" = String, Path)),
    responses(
        (status = 204, description = "Disconnected"),
        (status = 404, description = "The user has no mailbox", body = ErrorBody),
    ),
)]
pub async fn delete(
    State(state): State<AppState>,
    ApiPath((location_id, user_id)): ApiPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    check_id("location_id", &location_id)?;
    check_id("user_id", &user_id)?;
    if !disconnect(&state, &location_id, &user_id)? {
        return Err(ApiError::not_found(format!(
            "no mailbox connected for user {user_id:?} in location {location_id:?}"
        )));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Removes an integration (R19: sync stops at once; nothing synced is
/// deleted). Returns false if there was none.
pub fn disconnect(state: &AppState, location_id: &str, user_id: &str) -> Result<bool, ApiError> {
    let Some(integration) = state.store.integration(location_id, user_id)? else {
        return Ok(false);
    };
    let events = match integration.is_catch_all() {
        true => Vec::new(),
        false => vec![
            MailboxLifecycle::new(location_id, user_id, &integration.mailbox)
                .event("mailbox.disconnected"),
        ],
    };
    if let Some(gone) = state.store.disconnect(location_id, user_id, &events)?
        && gone.mailbox_released
    {
        state.scheduler.stop(&gone.integration.mailbox);
    }
    state.signal.notify();
    Ok(true)
}
