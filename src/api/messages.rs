//! Sending as the user (R5, R6, R12–R14, R17, R21), the state of a send, a
//! message's source and attachments, and a contact's synced history.

use axum::{
    Json,
    body::Body,
    extract::{Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};
use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::{
    AppState,
    error::{ApiError, ApiJson, ApiPath, check_email, check_id},
};
use crate::{
    compose::{Draft, DraftAttachment, new_message_id, reply_subject},
    model::{
        Direction, EmailAddress, Event, MailboxState, MessageEventData, Origin, SendRecord,
        SendStatus, Thread, ThreadRoute, new_id,
    },
    routing,
    send_queue::submit_copy_path,
    store::SendAcceptance,
};

/// R17: attachments of one send, decoded, in total.
pub const MAX_ATTACHMENT_BYTES: usize = 25 * 1024 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendBody {
    contact_id: String,
    #[serde(default)]
    to: Vec<String>,
    #[serde(default)]
    cc: Vec<String>,
    #[serde(default)]
    bcc: Vec<String>,
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    html: Option<String>,
    #[serde(default)]
    attachments: Vec<AttachmentBody>,
    #[serde(default)]
    reply_to: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AttachmentBody {
    filename: String,
    #[serde(default)]
    content_type: Option<String>,
    content_base64: String,
}

fn no_line_breaks(field: &str, value: &str) -> Result<(), ApiError> {
    if value.chars().any(|c| matches!(c, '\r' | '\n' | '\0')) {
        return Err(ApiError::invalid(format!(
            "{field} must not contain CR, LF or NUL"
        )));
    }
    Ok(())
}

fn addresses(field: &str, values: &[String]) -> Result<Vec<String>, ApiError> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| check_email(&format!("{field}[{i}]"), v))
        .collect()
}

fn send_view(send: &SendRecord) -> serde_json::Value {
    serde_json::json!({
        "id": send.id,
        "status": send.status,
        "error": send.error,
        "message_id": send.message_id,
        "thread_id": send.thread_id,
        "location_id": send.location_id,
        "user_id": send.user_id,
        "contact_id": send.contact_id,
        "mailbox": send.mailbox,
        "created_at": send.created_at,
        "sent_at": send.sent_at,
        "smtp_response": send.smtp_response,
        "attempts": send.attempts,
    })
}

pub async fn send(
    State(state): State<AppState>,
    ApiPath((location_id, user_id)): ApiPath<(String, String)>,
    headers: HeaderMap,
    ApiJson(mut body): ApiJson<SendBody>,
) -> Result<Response, ApiError> {
    check_id("location_id", &location_id)?;
    check_id("user_id", &user_id)?;
    check_id("contact_id", &body.contact_id)?;
    let idempotency_key = idempotency_key(&headers)?;

    // Validation first: nothing is stored or sent for a refused request.
    let subject_given = body.subject.clone();
    if let Some(subject) = &subject_given {
        no_line_breaks("subject", subject)?;
    }
    let to_given = addresses("to", &body.to)?;
    let cc = addresses("cc", &body.cc)?;
    let bcc = addresses("bcc", &body.bcc)?;
    if body.text.is_none() && body.html.is_none() {
        return Err(ApiError::invalid("text or html is required"));
    }
    let attachments = decode_attachments(std::mem::take(&mut body.attachments))?;

    let not_connected = || {
        ApiError::not_found(format!(
            "no mailbox connected for user {user_id:?} in location {location_id:?}"
        ))
    };
    let integration = state
        .store
        .integration(&location_id, &user_id)?
        .ok_or_else(not_connected)?;
    let mailbox = state
        .store
        .mailbox(&integration.mailbox)?
        .ok_or_else(not_connected)?;
    if mailbox.state == MailboxState::NeedsReauth {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "needs_reauth",
            format!(
                "the mailbox {} needs new credentials before it can send; reconnect it",
                mailbox.address
            ),
        ));
    }
    let contact = state
        .store
        .contact(&location_id, &body.contact_id)?
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "no contact {:?} in location {location_id:?}",
                body.contact_id
            ))
        })?;
    let to = if to_given.is_empty() {
        vec![
            contact
                .emails
                .first()
                .cloned()
                .ok_or_else(|| ApiError::invalid("the contact has no email address"))?,
        ]
    } else {
        to_given
    };

    // Threading (R6, R12, R13).
    let now = Utc::now();
    let route = ThreadRoute {
        location_id: location_id.clone(),
        user_id: user_id.clone(),
        contact_id: contact.id.clone(),
    };
    let ThreadPlan {
        mut thread,
        in_reply_to,
        references,
        detached,
    } = thread_for_send(
        &state,
        &mailbox.address,
        body.reply_to.as_deref(),
        &route,
        now,
    )?;
    let subject = match (subject_given, &body.reply_to) {
        (Some(subject), _) => subject,
        (None, Some(_)) => reply_subject(thread.subject.as_deref().unwrap_or("")),
        (None, None) => {
            return Err(ApiError::invalid(
                "subject is required for a new conversation",
            ));
        }
    };
    let message_id = new_message_id(&mailbox.address);
    thread.remember(Some(&message_id), Some(&subject));

    let send_id = new_id("msg");
    let draft = Draft {
        send_id: send_id.clone(),
        from: mailbox.address.clone(),
        from_name: None,
        to: to.clone(),
        cc: cc.clone(),
        bcc: bcc.clone(),
        subject: subject.clone(),
        text: body.text.clone(),
        html: body.html.clone(),
        attachments,
        message_id: message_id.clone(),
        in_reply_to: in_reply_to.clone(),
        references: references.clone(),
    };
    // Numbered as the source's parts are, so the URLs serve these bytes.
    let attachment_info: Vec<(String, String, usize)> = draft
        .attachments
        .iter()
        .map(|a| (a.filename.clone(), a.content_type.clone(), a.bytes.len()))
        .collect();
    let (submitted, filed) = draft
        .build()
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    let as_address = |email: &String| EmailAddress {
        email: email.clone(),
        name: None,
    };
    let data = MessageEventData {
        id: send_id.clone(),
        location_id: location_id.clone(),
        user_id: user_id.clone(),
        contact_id: contact.id.clone(),
        thread_id: thread.id.clone(),
        mailbox: mailbox.address.clone(),
        direction: Direction::Outbound,
        origin: Origin::Crm,
        message_id: Some(message_id.clone()),
        in_reply_to,
        references,
        from: Some(as_address(&mailbox.address)),
        to: to.iter().map(as_address).collect(),
        cc: cc.iter().map(as_address).collect(),
        bcc: bcc.iter().map(as_address).collect(),
        subject: Some(subject),
        date: Some(now),
        text: body.text,
        html: body.html,
        attachments: attachment_info
            .into_iter()
            .enumerate()
            .map(
                |(index, (filename, content_type, size))| crate::model::AttachmentEventInfo {
                    index,
                    filename,
                    content_type,
                    size,
                    url: format!(
                        "{}/v1/messages/{send_id}/attachments/{index}",
                        state.public_url
                    ),
                },
            )
            .collect(),
    };
    let record = SendRecord {
        id: send_id.clone(),
        location_id: location_id.clone(),
        user_id: user_id.clone(),
        contact_id: contact.id.clone(),
        mailbox: mailbox.address.clone(),
        thread_id: thread.id.clone(),
        message_id: message_id.clone(),
        status: SendStatus::Queued,
        error: None,
        smtp_response: None,
        attempts: 0,
        next_attempt_ms: 0,
        created_at: now,
        sent_at: None,
        idempotency_key,
        recipients: to.iter().chain(&cc).chain(&bcc).cloned().collect(),
        data,
        filed_in_sent: false,
        filing_attempts: 0,
        filing_abandoned: false,
        submitted_message_id: None,
    };
    // Both copies reach the disk before the send is recorded as accepted.
    let filed_path = state.store.raw_path(&send_id);
    let submit_path = submit_copy_path(state.store.as_ref(), &send_id);
    let written = crate::store::write_durably(&filed_path, filed.as_deref().unwrap_or(&submitted))
        .and_then(|()| crate::store::write_durably(&submit_path, &submitted));
    if let Err(err) = written {
        let _ = std::fs::remove_file(&filed_path);
        let _ = std::fs::remove_file(&submit_path);
        return Err(crate::store::StoreError::Io(err).into());
    }
    let acceptance = state.store.accept_send(
        &record,
        &thread,
        mailbox.daily_send_limit,
        now.timestamp_millis(),
    );
    let answer = match acceptance {
        Ok(SendAcceptance::Accepted) => {
            let events: Vec<Event> = detached
                .iter()
                .map(|r| Event {
                    id: new_id("evt"),
                    kind: "thread.detached".into(),
                    timestamp: now,
                    ordering_key: thread.id.clone(),
                    data: serde_json::json!({
                        "thread_id": thread.id,
                        "location_id": r.location_id,
                        "user_id": r.user_id,
                        "contact_id": r.contact_id,
                        "mailbox": mailbox.address,
                        "pinned_to_location_id": location_id,
                    }),
                })
                .collect();
            if !events.is_empty() {
                state.store.enqueue(&events)?;
                state.signal.notify();
            }
            state.send_signal.notify();
            return Ok((StatusCode::ACCEPTED, Json(send_view(&record))).into_response());
        }
        Ok(SendAcceptance::Repeat(first)) => {
            Ok((StatusCode::ACCEPTED, Json(send_view(&first))).into_response())
        }
        Ok(SendAcceptance::LimitReached { retry_at_ms, limit }) => {
            let retry_after = ((retry_at_ms - now.timestamp_millis()).max(0) / 1000 + 1) as u64;
            let retry_at = DateTime::<Utc>::from_timestamp_millis(retry_at_ms).unwrap_or(now);
            let mut error = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "daily_send_limit_reached",
                format!(
                    "the mailbox {} reached its limit of {limit} sends per 24 hours; retry after {}",
                    mailbox.address,
                    retry_at.to_rfc3339()
                ),
            );
            error.retry_after_secs = Some(retry_after);
            Err(error)
        }
        Err(err) => Err(err.into()),
    };
    // Not accepted: the copies are not needed.
    let _ = std::fs::remove_file(&filed_path);
    let _ = std::fs::remove_file(&submit_path);
    answer
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= 255 && !k.chars().any(char::is_control))
        .ok_or_else(|| {
            ApiError::invalid("Idempotency-Key must be 1 to 255 printable characters")
        })?;
    Ok(Some(key.to_string()))
}

/// Checks and decodes the attachments (R17: 25 MB in total). They are consumed
/// one by one, so each base64 text is freed once decoded.
fn decode_attachments(bodies: Vec<AttachmentBody>) -> Result<Vec<DraftAttachment>, ApiError> {
    let mut attachments = Vec::with_capacity(bodies.len());
    let mut total = 0usize;
    for (i, a) in bodies.into_iter().enumerate() {
        no_line_breaks(&format!("attachments[{i}].filename"), &a.filename)?;
        if a.filename.trim().is_empty() {
            return Err(ApiError::invalid(format!(
                "attachments[{i}].filename must not be empty"
            )));
        }
        let content_type = a
            .content_type
            .unwrap_or_else(|| "application/octet-stream".into());
        no_line_breaks(&format!("attachments[{i}].content_type"), &content_type)?;
        // Refuse before decoding when even the base64 text is over the limit.
        if a.content_base64.len() / 4 * 3 > MAX_ATTACHMENT_BYTES + 3 {
            return Err(too_large());
        }
        let bytes = BASE64.decode(a.content_base64.as_bytes()).map_err(|e| {
            ApiError::invalid(format!(
                "attachments[{i}].content_base64 is not base64: {e}"
            ))
        })?;
        total += bytes.len();
        if total > MAX_ATTACHMENT_BYTES {
            return Err(too_large());
        }
        attachments.push(DraftAttachment {
            filename: a.filename,
            content_type,
            bytes,
        });
    }
    Ok(attachments)
}

/// The thread a send belongs to, and what its headers say about it.
struct ThreadPlan {
    thread: Thread,
    in_reply_to: Option<String>,
    references: Vec<String>,
    /// Conversations that stop receiving the thread (R13).
    detached: Vec<ThreadRoute>,
}

/// R6, R12, R13: a new thread bound to the sending location, or the thread
/// `reply_to` names (a thread id or a Message-ID), pinned to this location.
fn thread_for_send(
    state: &AppState,
    mailbox: &str,
    reply_to: Option<&str>,
    route: &ThreadRoute,
    now: DateTime<Utc>,
) -> Result<ThreadPlan, ApiError> {
    let Some(reply_to) = reply_to else {
        return Ok(ThreadPlan {
            thread: Thread {
                id: new_id("thr"),
                mailbox: mailbox.to_string(),
                routes: vec![route.clone()],
                created_at: now,
                message_ids: Vec::new(),
                subject: None,
            },
            in_reply_to: None,
            references: Vec::new(),
            detached: Vec::new(),
        });
    };
    no_line_breaks("reply_to", reply_to)?;
    let found = match state
        .store
        .thread(reply_to)?
        .filter(|t| t.mailbox == mailbox)
    {
        Some(thread) => Some(thread),
        None => state.store.thread_of(mailbox, &[reply_to.to_string()])?,
    };
    let mut thread = found.ok_or_else(|| {
        ApiError::not_found(format!(
            "reply_to: no thread or message {reply_to:?} in mailbox {mailbox}"
        ))
    })?;
    let in_reply_to = if reply_to.starts_with('<') {
        Some(reply_to.to_string())
    } else {
        thread.message_ids.last().cloned()
    };
    let references = thread.message_ids.clone();
    let (kept, detached) = routing::r13_pin_thread(&thread.routes, route);
    thread.routes = kept;
    Ok(ThreadPlan {
        thread,
        in_reply_to,
        references,
        detached,
    })
}

fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "attachments_too_large",
        format!(
            "attachments may total at most {} MB per message (R17); nothing was sent",
            MAX_ATTACHMENT_BYTES / 1024 / 1024
        ),
    )
}

pub async fn get(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    check_id("id", &id)?;
    let send = state
        .store
        .send(&id)?
        .ok_or_else(|| ApiError::not_found(format!("no message {id:?}")))?;
    Ok(Json(send_view(&send)))
}

fn read_raw(state: &AppState, id: &str) -> Result<Vec<u8>, ApiError> {
    check_id("id", id)?;
    std::fs::read(state.store.raw_path(id)).map_err(|_| {
        ApiError::not_found(format!(
            "no stored source for message {id:?} (unknown, or removed by retention)"
        ))
    })
}

pub async fn raw(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let raw = read_raw(&state, &id)?;
    Ok(([(header::CONTENT_TYPE, "message/rfc822")], Body::from(raw)).into_response())
}

pub async fn attachment(
    State(state): State<AppState>,
    ApiPath((id, index)): ApiPath<(String, usize)>,
) -> Result<Response, ApiError> {
    let raw = read_raw(&state, &id)?;
    let (filename, content_type, bytes) =
        tokio::task::spawn_blocking(move || crate::mime::attachment(&raw, index))
            .await
            .ok()
            .flatten()
            .ok_or_else(|| {
                ApiError::not_found(format!("message {id:?} has no attachment {index}"))
            })?;
    let safe_name: String = filename
        .chars()
        .filter(|c| !c.is_control() && *c != '"' && *c != '\\')
        .collect();
    let content_type = if content_type.chars().any(|c| c.is_control()) {
        "application/octet-stream".to_string()
    } else {
        content_type
    };
    Ok((
        [
            (header::CONTENT_TYPE, content_type),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{safe_name}\""),
            ),
        ],
        Body::from(bytes),
    )
        .into_response())
}

#[derive(Deserialize)]
pub struct HistoryQuery {
    limit: Option<usize>,
    before: Option<DateTime<Utc>>,
}

pub async fn history(
    State(state): State<AppState>,
    ApiPath((location_id, contact_id)): ApiPath<(String, String)>,
    query: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    check_id("location_id", &location_id)?;
    check_id("contact_id", &contact_id)?;
    let Query(query) = query
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "malformed_query", e.body_text()))?;
    let limit = query.limit.unwrap_or(50).clamp(1, 500);
    let messages = state.store.history(
        &location_id,
        &contact_id,
        query.before.map(|b| b.timestamp_millis()),
        limit,
    )?;
    Ok(Json(serde_json::json!({ "messages": messages })))
}
