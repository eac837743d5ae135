//! `POST /v1/inspect?mailbox=…&folder=inbox|sent` with a message's source as
//! the body: what the rules would decide for it, integration by integration,
//! and why. Changes nothing. `mailbridge inspect --mailbox` prints it.

use axum::{
    Json,
    body::Bytes,
    extract::{Query, State},
};
use serde::Deserialize;

use super::{
    AppState,
    error::{ApiError, check_email},
};
use crate::{
    ingest::Verdict,
    model::{FolderRole, Message},
    routing::Routing,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InspectQuery {
    mailbox: String,
    #[serde(default = "inbox")]
    folder: FolderRole,
}

fn inbox() -> FolderRole {
    FolderRole::Inbox
}

pub async fn inspect(
    State(state): State<AppState>,
    Query(query): Query<InspectQuery>,
    raw: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let mailbox = check_email("mailbox", &query.mailbox)?;
    if raw.is_empty() {
        return Err(ApiError::invalid(
            "the body must be the message's source (message/rfc822)",
        ));
    }
    let ingest = state.ingest.clone();
    let folder = query.folder;
    let (message, verdicts) = tokio::task::spawn_blocking(move || {
        let message = crate::mime::parse(&raw);
        ingest
            .explain(&mailbox, folder, &raw)
            .map(|verdicts| (message, verdicts))
    })
    .await
    .map_err(|e| crate::store::StoreError::Engine(format!("inspecting stopped: {e}")))??;
    Ok(Json(describe(&query.mailbox, folder, &message, &verdicts)))
}

/// The verdicts as JSON: the same for the API and `mailbridge inspect`.
pub fn describe(
    mailbox: &str,
    folder: FolderRole,
    message: &Message,
    verdicts: &[Verdict],
) -> serde_json::Value {
    let verdicts: Vec<serde_json::Value> = verdicts
        .iter()
        .map(|verdict| {
            let mut out = serde_json::json!({
                "location_id": verdict.location_id,
                "user_id": verdict.user_id,
            });
            let fields = match &verdict.routing {
                Routing::Ignore(reason) => serde_json::json!({
                    "synced": false,
                    "reason": reason.to_string(),
                }),
                Routing::Deliver {
                    deliveries,
                    new_contacts,
                    ..
                } => serde_json::json!({
                    "synced": true,
                    "thread": verdict.thread_id.clone().unwrap_or_else(|| "new".into()),
                    "deliveries": deliveries.iter().map(|d| serde_json::json!({
                        "location_id": d.route.location_id,
                        "user_id": d.route.user_id,
                        "contact_id": d.route.contact_id,
                        "contact_ids": d.contact_ids,
                        "direction": d.direction,
                        "origin": d.origin,
                        "rule": d.rule,
                    })).collect::<Vec<_>>(),
                    "contacts_created": new_contacts.iter().map(|c| serde_json::json!({
                        "id": c.id, "email": c.email, "name": c.name,
                    })).collect::<Vec<_>>(),
                }),
            };
            if let (Some(out), serde_json::Value::Object(fields)) = (out.as_object_mut(), fields) {
                out.extend(fields);
            }
            out
        })
        .collect();
    serde_json::json!({
        "mailbox": mailbox,
        "folder": folder,
        "message": {
            "message_id": message.message_id,
            "in_reply_to": message.in_reply_to,
            "references": message.references,
            "from": message.from,
            "to": message.to,
            "cc": message.cc,
            "bcc": message.bcc,
            "subject": message.subject,
            "date": message.date,
            "thread_keys": message.thread_keys(),
            "parse_warnings": message.parse_warnings,
        },
        "verdicts": verdicts,
    })
}
