//! Events the bridge gave up on: listed for an operator, and replayed on
//! request (with their original `webhook-id`, so the CRM can still drop a
//! repeat).

use axum::{
    Json,
    extract::{Query, State},
    http::StatusCode,
};
use serde::Deserialize;

use super::{
    AppState,
    error::{ApiError, ApiPath},
};
use crate::store::{DeadLetter, Replay};

#[derive(Deserialize)]
pub struct ListQuery {
    limit: Option<usize>,
    /// The last `id` of the previous page.
    after: Option<u64>,
}

fn view(letter: &DeadLetter) -> serde_json::Value {
    let event = letter.entry.as_ref().map(|entry| {
        let mut body = entry.event.body();
        if let Some(map) = body.as_object_mut() {
            map.insert("id".into(), entry.event.id.clone().into());
        }
        body
    });
    serde_json::json!({
        "id": letter.id.to_string(),
        "event": event,
        "attempts": letter.entry.as_ref().map(|e| e.attempts),
        "last_error": letter.entry.as_ref().and_then(|e| e.last_error.clone()),
        "delivered_to": letter.entry.as_ref().map(|e| e.delivered_to.clone()),
        "reason": letter.reason,
        "buried_at": letter.buried_at,
    })
}

pub async fn list(
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(query) = query
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "malformed_query", e.body_text()))?;
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    let letters = state.store.dead_letters(query.after, limit)?;
    Ok(Json(serde_json::json!({
        "dead_letters": letters.iter().map(view).collect::<Vec<_>>(),
    })))
}

pub async fn retry(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let not_found = || ApiError::not_found(format!("no dead letter {id:?}"));
    let number: u64 = id.parse().map_err(|_| not_found())?;
    match state.store.replay_dead_letter(number)? {
        Replay::Requeued => {
            state.signal.notify();
            Ok((
                StatusCode::ACCEPTED,
                Json(serde_json::json!({"id": id, "status": "requeued"})),
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
