//! Events the bridge gave up on: listed for an operator, replayed on
//! request (with their original `webhook-id`, so the CRM can still drop a
//! repeat), or removed; `[retention] dead_letters` removes them after a while.

use axum::{Json, extract::State, http::StatusCode};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{
    AppState,
    error::{ApiError, ApiPath, ApiQuery, ErrorBody},
};
use crate::store::{DeadLetter, Replay};

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// At most this many (1 to 1000, default 100).
    limit: Option<usize>,
    /// The last `id` of the previous page.
    #[param(minimum = 0, maximum = 9223372036854775807_i64)]
    after: Option<i64>,
}

/// One page of dead letters, oldest first.
#[derive(Serialize, utoipa::ToSchema)]
pub struct DeadLetterPage {
    dead_letters: Vec<DeadLetterView>,
}

/// An event the bridge gave up delivering.
#[derive(Serialize, utoipa::ToSchema)]
pub struct DeadLetterView {
    /// Pass it to `POST /v1/dead-letters/{id}/retry`, or as `after`.
    id: String,
    /// The webhook body with its `webhook-id` as `id`; null if the stored
    /// entry could not be read.
    #[schema(value_type = Option<Object>)]
    event: Option<serde_json::Value>,
    attempts: Option<u32>,
    last_error: Option<String>,
    /// The webhook URLs that did acknowledge it.
    delivered_to: Option<Vec<String>>,
    /// Why it was given up.
    reason: String,
    buried_at: Option<DateTime<Utc>>,
}

/// A dead letter back in the outbox.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Requeued {
    id: String,
    status: RequeuedStatus,
}

#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
enum RequeuedStatus {
    Requeued,
}

fn view(letter: &DeadLetter) -> DeadLetterView {
    let event = letter.entry.as_ref().map(|entry| {
        let mut body = entry.event.body();
        if let Some(map) = body.as_object_mut() {
            map.insert("id".into(), entry.event.id.clone().into());
        }
        body
    });
    DeadLetterView {
        id: letter.id.to_string(),
        event,
        attempts: letter.entry.as_ref().map(|e| e.attempts),
        last_error: letter.entry.as_ref().and_then(|e| e.last_error.clone()),
        delivered_to: letter.entry.as_ref().map(|e| e.delivered_to.clone()),
        reason: letter.reason.clone(),
        buried_at: letter.buried_at,
    }
}

#[utoipa::path(
    get,
    path = "/dead-letters",
    tag = "dead-letters",
    params(ListQuery),
    responses((status = 200, description = "A page of dead letters", body = DeadLetterPage)),
)]
pub async fn list(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<DeadLetterPage>, ApiError> {
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    let after = query
        .after
        .map(u64::try_from)
        .transpose()
        .map_err(|_| ApiError::invalid("after must be a dead letter's id (0 or more)"))?;
    let letters = state.store.dead_letters(after, limit)?;
    Ok(Json(DeadLetterPage {
        dead_letters: letters.iter().map(view).collect(),
    }))
}

/// Puts a dead letter back in the outbox, with its original `webhook-id`.
#[utoipa::path(
    post,
    path = "/dead-letters/{id}/retry",
    tag = "dead-letters",
    params(("id" = String, Path)),
    responses(
        (status = 202, description = "Back in the outbox", body = Requeued),
        (status = 404, description = "No such dead letter", body = ErrorBody),
        (status = 409, description = "Its stored entry is unreadable: nothing to send", body = ErrorBody),
    ),
)]
pub async fn retry(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<(StatusCode, Json<Requeued>), ApiError> {
    let not_found = || ApiError::not_found(format!("no dead letter {id:?}"));
    let number: u64 = id.parse().map_err(|_| not_found())?;
    match state.store.replay_dead_letter(number)? {
        Replay::Requeued => {
            state.signal.notify();
            Ok((
                StatusCode::ACCEPTED,
                Json(Requeued {
                    id,
                    status: RequeuedStatus::Requeued,
                }),
            ))
        }
        Replay::Unreadable => Err(ApiError::new(
            StatusCode::CONFLICT,
            "dead_letter_unreadable",
            "this dead letter's stored entry could not be read; there is nothing to send",
        )),
        Replay::NotFound => Err(not_found()),
    }
}

/// Removes a dead letter for good: it is not delivered. Dead letters older
/// than `[retention] dead_letters` go on their own.
#[utoipa::path(
    delete,
    path = "/dead-letters/{id}",
    tag = "dead-letters",
    params(("id" = String, Path)),
    responses(
        (status = 204, description = "Removed"),
        (status = 404, description = "No such dead letter", body = ErrorBody),
    ),
)]
pub async fn delete(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let not_found = || ApiError::not_found(format!("no dead letter {id:?}"));
    let number: u64 = id.parse().map_err(|_| not_found())?;
    if state.store.delete_dead_letter(number)? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(not_found())
    }
}
