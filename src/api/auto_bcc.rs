//! Auto BCC (R15): a user's smart address, and the operator's catch-all
//! mailbox (door 2) that logs mail for users whose own mailbox is not
//! connected. The rule itself lives in `routing`; this room hands out
//! addresses and connects the catch-all.

use axum::{Json, extract::State, http::StatusCode};
use serde::{Deserialize, Serialize};

use super::{
    AppState,
    error::ErrorBody,
    error::{ApiError, ApiJson, ApiPath, check_email, check_id},
    mailboxes::{self, ConnectBody, MailboxStatus},
};
use crate::{
    ingest::{smart_senders, smart_senders_setting, smart_token_setting},
    model::{CATCH_ALL_LOCATION, CATCH_ALL_USER},
};

/// The smart address of (location, user), recorded so the catch-all can
/// find them by its token. The address itself is derived, never stored.
pub fn register(state: &AppState, location_id: &str, user_id: &str) -> Result<String, ApiError> {
    let token_setting = smart_token_setting(&state.smart.token_of(location_id, user_id));
    if state.store.setting(&token_setting)?.is_none() {
        state.store.put_setting(
            &token_setting,
            format!("{location_id}\0{user_id}").as_bytes(),
        )?;
    }
    Ok(state.smart.address(location_id, user_id))
}

#[utoipa::path(
    get,
    path = "/locations/{location_id}/users/{user_id}/auto-bcc",
    tag = "auto-bcc",
    params(("location_id" = String, Path), ("user_id" = String, Path)),
    responses((status = 200, description = "The smart address", body = SmartAddress)),
)]
/// `GET /v1/locations/{location}/users/{user}/auto-bcc`: the user's smart
/// address, connected mailbox or not, and the addresses the catch-all takes
/// as theirs.
pub async fn address(
    State(state): State<AppState>,
    ApiPath((location_id, user_id)): ApiPath<(String, String)>,
) -> Result<Json<SmartAddress>, ApiError> {
    check_id("location_id", &location_id)?;
    check_id("user_id", &user_id)?;
    let address = register(&state, &location_id, &user_id)?;
    let senders = senders(&state, &location_id, &user_id)?;
    Ok(Json(SmartAddress { address, senders }))
}

/// A user's smart address and the addresses the catch-all takes as theirs.
#[derive(Serialize, utoipa::ToSchema)]
pub struct SmartAddress {
    address: String,
    senders: Vec<String>,
}

fn senders(state: &AppState, location_id: &str, user_id: &str) -> Result<Vec<String>, ApiError> {
    Ok(smart_senders(state.store.as_ref(), location_id, user_id)?)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SendersBody {
    #[schema(max_items = 20)]
    senders: Vec<String>,
}

/// The most addresses one user may send from, for the catch-all.
const MAX_SENDERS: usize = 20;

#[utoipa::path(
    put,
    path = "/locations/{location_id}/users/{user_id}/auto-bcc",
    tag = "auto-bcc",
    params(("location_id" = String, Path), ("user_id" = String, Path)),
    request_body = SendersBody,
    responses((status = 200, description = "Stored", body = SmartAddress)),
)]
/// `PUT /v1/locations/{location}/users/{user}/auto-bcc` `{"senders": [...]}`:
/// the addresses the user sends from. The catch-all (door 2) logs only mail
/// from these (or from their connected mailbox): the smart address alone is
/// not enough, since a contact's reply-all carries it too.
pub async fn put_senders(
    State(state): State<AppState>,
    ApiPath((location_id, user_id)): ApiPath<(String, String)>,
    ApiJson(body): ApiJson<SendersBody>,
) -> Result<Json<SmartAddress>, ApiError> {
    check_id("location_id", &location_id)?;
    check_id("user_id", &user_id)?;
    if body.senders.len() > MAX_SENDERS {
        return Err(ApiError::invalid(format!(
            "senders: at most {MAX_SENDERS} addresses"
        )));
    }
    let mut senders = Vec::with_capacity(body.senders.len());
    for (i, sender) in body.senders.iter().enumerate() {
        let sender = check_email(&format!("senders[{i}]"), sender)?;
        if !senders.contains(&sender) {
            senders.push(sender);
        }
    }
    let value =
        serde_json::to_vec(&senders).map_err(|e| ApiError::invalid(format!("senders: {e}")))?;
    state
        .store
        .put_setting(&smart_senders_setting(&location_id, &user_id), &value)?;
    let address = register(&state, &location_id, &user_id)?;
    Ok(Json(SmartAddress { address, senders }))
}

fn no_catch_all() -> ApiError {
    ApiError::not_found("no Auto BCC catch-all mailbox is connected")
}

#[utoipa::path(
    put,
    path = "/auto-bcc/mailbox",
    tag = "auto-bcc",
    request_body = ConnectBody,
    responses(
        (status = 200, description = "Connected", body = MailboxStatus),
        (status = 409, description = "Another location connected this address with other servers or login", body = ErrorBody),
        (status = 422, description = "A field is invalid, or the server refused the login", body = ErrorBody),
        (status = 503, description = "The server cannot take the login now; retry", body = ErrorBody),
    ),
)]
/// `PUT /v1/auto-bcc/mailbox`: connects the operator's catch-all (same body
/// as a user's mailbox). Its MX receives the smart addresses' mail.
pub async fn put(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<ConnectBody>,
) -> Result<Json<MailboxStatus>, ApiError> {
    let request = mailboxes::connect_request(body)?;
    Ok(Json(
        mailboxes::connect_mailbox(&state, CATCH_ALL_LOCATION, CATCH_ALL_USER, request).await?,
    ))
}

#[utoipa::path(
    get,
    path = "/auto-bcc/mailbox",
    tag = "auto-bcc",
    responses(
        (status = 200, description = "How the catch-all stands", body = MailboxStatus),
        (status = 404, description = "No catch-all is connected", body = ErrorBody),
    ),
)]
pub async fn get(State(state): State<AppState>) -> Result<Json<MailboxStatus>, ApiError> {
    mailboxes::status(&state, CATCH_ALL_LOCATION, CATCH_ALL_USER)?
        .map(Json)
        .ok_or_else(no_catch_all)
}

#[utoipa::path(
    delete,
    path = "/auto-bcc/mailbox",
    tag = "auto-bcc",
    responses(
        (status = 204, description = "Disconnected"),
        (status = 404, description = "No catch-all is connected", body = ErrorBody),
    ),
)]
pub async fn delete(State(state): State<AppState>) -> Result<StatusCode, ApiError> {
    match mailboxes::disconnect(&state, CATCH_ALL_LOCATION, CATCH_ALL_USER)? {
        true => Ok(StatusCode::NO_CONTENT),
        false => Err(no_catch_all()),
    }
}
