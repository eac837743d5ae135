//! The messages of a mailbox the bridge set aside (issue 21 item 6): ones the
//! server would not return, or whose handling kept failing. Each was also
//! announced as `message.unprocessable`; this list is for an operator, or a
//! CRM that missed the event.

use axum::{Json, extract::State};
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{
    AppState,
    error::{ApiError, ApiPath, ErrorBody, check_id},
};
use crate::model::{UnprocessableMessage, UnprocessableReason};

/// The messages of the user's mailbox that were set aside.
#[derive(Serialize, utoipa::ToSchema)]
pub struct SkippedPage {
    /// By folder and UID.
    skipped: Vec<SkippedMessage>,
}

/// A message that will not sync, and why.
#[derive(Serialize, utoipa::ToSchema)]
pub struct SkippedMessage {
    /// The folder's name on the server.
    folder: String,
    uid_validity: u32,
    uid: u32,
    /// Its Message-ID, when it could be read.
    message_id: Option<String>,
    reason: UnprocessableReason,
    /// What the last failed try said.
    error: String,
    /// Failed tries before it was set aside.
    attempts: u32,
    first_failed_at: DateTime<Utc>,
    set_aside_at: Option<DateTime<Utc>>,
}

impl From<UnprocessableMessage> for SkippedMessage {
    fn from(record: UnprocessableMessage) -> Self {
        Self {
            folder: record.folder_name,
            uid_validity: record.uid_validity,
            uid: record.uid,
            message_id: record.message_id,
            reason: record.reason,
            error: record.error,
            attempts: record.attempts,
            first_failed_at: record.first_failed_at,
            set_aside_at: record.set_aside_at,
        }
    }
}

/// The messages of the user's mailbox that were set aside after repeated
/// failed tries (each announced as `message.unprocessable`).
#[utoipa::path(
    get,
    path = "/locations/{location_id}/users/{user_id}/mailbox/skipped",
    tag = "mailboxes",
    params(("location_id" = String, Path), ("user_id" = String, Path)),
    responses(
        (status = 200, description = "The messages set aside", body = SkippedPage),
        (status = 404, description = "The user has no mailbox", body = ErrorBody),
    ),
)]
pub async fn list(
    State(state): State<AppState>,
    ApiPath((location_id, user_id)): ApiPath<(String, String)>,
) -> Result<Json<SkippedPage>, ApiError> {
    check_id("location_id", &location_id)?;
    check_id("user_id", &user_id)?;
    let Some(integration) = state.store.integration(&location_id, &user_id)? else {
        return Err(ApiError::not_found(format!(
            "no mailbox connected for user {user_id:?} in location {location_id:?}"
        )));
    };
    let skipped = state
        .store
        .set_aside_messages(&integration.mailbox)?
        .into_iter()
        .map(SkippedMessage::from)
        .collect();
    Ok(Json(SkippedPage { skipped }))
}
