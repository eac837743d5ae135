//! Sending as the user (R5, R6, R12–R14, R17, R21), the state of a send, a
//! message's source and attachments, and a contact's synced history.

use axum::{
    Json,
    body::Body,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{
    AppState,
    error::ErrorBody,
    error::{ApiError, ApiJson, ApiPath, ApiQuery, check_email, check_id},
};
use crate::{
    compose::{Draft, DraftAttachment, new_message_id, reply_subject},
    event_data::{self, DetachReason, ThreadDetached},
    model::{
        Contact, Direction, EmailAddress, Event, Mailbox, MailboxState, MessageEventData, Origin,
        SendRecord, SendStatus, Thread, ThreadRoute, new_id,
    },
    routing,
    store::{NewSend, SendAcceptance, SourceCopy, StoreError},
};

/// R17: attachments of one send, decoded, in total.
pub const MAX_ATTACHMENT_BYTES: usize = 25 * 1024 * 1024;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SendBody {
    /// The contact the mail is for; To defaults to its first address.
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
    /// A thread id or a Message-ID: sends as a reply in that thread.
    #[serde(default)]
    reply_to: Option<String>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct AttachmentBody {
    filename: String,
    #[serde(default)]
    content_type: Option<String>,
    /// The bytes, base64; all attachments of a send total at most 25 MB (R17).
    #[schema(content_encoding = "base64")]
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

/// A CRM send as `POST …/messages` and `GET /v1/messages/{id}` show it.
#[derive(Serialize, utoipa::ToSchema)]
pub struct SendView {
    #[schema(example = "msg_0190f3c2a1b27c3d8e4f5a6b7c8d9e0f")]
    id: String,
    status: SendStatus,
    /// Why a failed send failed.
    error: Option<String>,
    /// The Message-ID the mail carries (the server's, where it replaced ours).
    message_id: String,
    thread_id: String,
    location_id: String,
    user_id: String,
    contact_id: String,
    /// The sending mailbox's address.
    mailbox: String,
    created_at: DateTime<Utc>,
    sent_at: Option<DateTime<Utc>>,
    /// The SMTP server's reply to the end of DATA, once accepted.
    smtp_response: Option<String>,
    attempts: u32,
}

fn send_view(send: &SendRecord) -> SendView {
    SendView {
        id: send.id.clone(),
        status: send.status,
        error: send.error.clone(),
        message_id: send.message_id.clone(),
        thread_id: send.thread_id.clone(),
        location_id: send.location_id.clone(),
        user_id: send.user_id.clone(),
        contact_id: send.contact_id.clone(),
        mailbox: send.mailbox.clone(),
        created_at: send.created_at,
        sent_at: send.sent_at,
        smtp_response: send.smtp_response.clone(),
        attempts: send.attempts,
    }
}

/// A send request that passed every check. Nothing is stored or sent for a
/// refused request, so every check comes before anything else.
struct ValidSend {
    location_id: String,
    user_id: String,
    mailbox: Mailbox,
    contact: Contact,
    /// The contact first, then every other contact of the location assigned
    /// to the user among the recipients (R7: none is created).
    contact_ids: Vec<String>,
    to: Vec<String>,
    cc: Vec<String>,
    bcc: Vec<String>,
    subject: Option<String>,
    reply_to: Option<String>,
    text: Option<String>,
    html: Option<String>,
    idempotency_key: Option<String>,
}

/// How often a send is planned again when an ingest changes its thread at
/// the same moment.
const MAX_THREAD_RETRIES: u32 = 5;

#[utoipa::path(
    post,
    path = "/locations/{location_id}/users/{user_id}/messages",
    tag = "messages",
    params(
        ("location_id" = String, Path),
        ("user_id" = String, Path),
        ("Idempotency-Key" = Option<String>, Header,
            description = "A retry with the same key answers with the first send instead of sending again"),
    ),
    request_body = SendBody,
    responses(
        (status = 202, description = "Accepted and queued for SMTP", body = SendView),
        (status = 404, description = "Unknown contact, or the user has no mailbox", body = ErrorBody),
        (status = 409, description = "The mailbox needs new credentials (`needs_reauth`) or the key was used for another send", body = ErrorBody),
        (status = 413, description = "Attachments over 25 MB (R17)", body = ErrorBody),
        (status = 429, description = "The daily send limit is reached (R14)", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until a send fits in the limit again"))),
    ),
)]
pub async fn send(
    State(state): State<AppState>,
    ApiPath((location_id, user_id)): ApiPath<(String, String)>,
    headers: HeaderMap,
    ApiJson(mut body): ApiJson<SendBody>,
) -> Result<Response, ApiError> {
    let attachment_bodies = std::mem::take(&mut body.attachments);
    let request = validate(&state, location_id, user_id, &headers, body)?;
    // Decoding up to 25 MB of base64 is work for a blocking thread.
    let attachments = tokio::task::spawn_blocking(move || decode_attachments(attachment_bodies))
        .await
        .map_err(|e| ApiError::invalid(format!("attachments could not be decoded: {e}")))??;

    let now = Utc::now();
    let send_id = new_id("msg");
    let mut draft = Draft {
        send_id: send_id.clone(),
        from: request.mailbox.address.clone(),
        from_name: None,
        to: request.to.clone(),
        cc: request.cc.clone(),
        bcc: request.bcc.clone(),
        subject: String::new(),
        text: request.text.clone(),
        html: request.html.clone(),
        attachments,
        message_id: new_message_id(&request.mailbox.address),
        in_reply_to: None,
        references: Vec::new(),
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        let plan = thread_for_send(&state, &request, now)?;
        let composed;
        (draft, composed) = compose(&state, &request, plan, draft, now).await?;
        match accept(&state, &request, &composed, now) {
            Err(Accept::ThreadChanged) if attempt < MAX_THREAD_RETRIES => continue,
            Err(Accept::ThreadChanged) => {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "thread_busy",
                    "the conversation kept changing while the send was accepted; nothing was sent, retry",
                ));
            }
            Err(Accept::Refused(error)) => return Err(error),
            Ok(response) => return Ok(response),
        }
    }
}

/// Step 1: the request's fields, the integration, its mailbox and the contact.
fn validate(
    state: &AppState,
    location_id: String,
    user_id: String,
    headers: &HeaderMap,
    body: SendBody,
) -> Result<ValidSend, ApiError> {
    check_id("location_id", &location_id)?;
    check_id("user_id", &user_id)?;
    check_id("contact_id", &body.contact_id)?;
    let idempotency_key = idempotency_key(headers)?;
    if let Some(subject) = &body.subject {
        no_line_breaks("subject", subject)?;
    }
    if let Some(reply_to) = &body.reply_to {
        no_line_breaks("reply_to", reply_to)?;
    }
    let to_given = addresses("to", &body.to)?;
    let cc = addresses("cc", &body.cc)?;
    let bcc = addresses("bcc", &body.bcc)?;
    if body.text.is_none() && body.html.is_none() {
        return Err(ApiError::invalid("text or html is required"));
    }
    if body.subject.is_none() && body.reply_to.is_none() {
        return Err(ApiError::invalid(
            "subject is required for a new conversation",
        ));
    }

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
    let mut contact_ids = vec![contact.id.clone()];
    for address in to.iter().chain(&cc).chain(&bcc) {
        let mut named = state.store.contacts_by_email(&location_id, address)?;
        named.retain(|c| c.is_assigned_to(&user_id));
        named.sort_by(|a, b| {
            a.created_at
                .cmp(&b.created_at)
                .then_with(|| a.id.cmp(&b.id))
        });
        for other in named {
            if !contact_ids.contains(&other.id) {
                contact_ids.push(other.id);
            }
        }
    }
    Ok(ValidSend {
        location_id,
        user_id,
        mailbox,
        contact,
        contact_ids,
        to,
        cc,
        bcc,
        subject: body.subject,
        reply_to: body.reply_to,
        text: body.text,
        html: body.html,
        idempotency_key,
    })
}

/// A send ready to be accepted: its record, both copies, and its thread.
struct Composed {
    record: SendRecord,
    submitted: Vec<u8>,
    filed: Option<Vec<u8>>,
    plan: ThreadPlan,
}

/// Step 3: the message itself, on a blocking thread (attachments are
/// encoded), and the record of the send. The draft comes back for a retry.
async fn compose(
    state: &AppState,
    request: &ValidSend,
    mut plan: ThreadPlan,
    mut draft: Draft,
    now: DateTime<Utc>,
) -> Result<(Draft, Composed), ApiError> {
    let subject = match &request.subject {
        Some(subject) => subject.clone(),
        None => reply_subject(plan.thread.subject.as_deref().unwrap_or("")),
    };
    plan.thread
        .remember(Some(&draft.message_id), Some(&subject));
    draft.subject = subject.clone();
    draft.in_reply_to = plan.in_reply_to.clone();
    draft.references = plan.references.clone();
    let (draft, built) = tokio::task::spawn_blocking(move || {
        let built = draft.build();
        (draft, built)
    })
    .await
    .map_err(|e| ApiError::invalid(format!("the message could not be built: {e}")))?;
    let (submitted, filed) = built.map_err(|e| ApiError::invalid(e.to_string()))?;

    let send_id = draft.send_id.clone();
    let mailbox = &request.mailbox.address;
    let as_address = |email: &String| EmailAddress {
        email: email.clone(),
        name: None,
    };
    let data = MessageEventData {
        id: send_id.clone(),
        location_id: request.location_id.clone(),
        user_id: request.user_id.clone(),
        contact_id: request.contact.id.clone(),
        contact_ids: request.contact_ids.clone(),
        thread_id: plan.thread.id.clone(),
        mailbox: mailbox.clone(),
        direction: Direction::Outbound,
        origin: Origin::Crm,
        message_id: Some(draft.message_id.clone()),
        in_reply_to: plan.in_reply_to.clone(),
        references: plan.references.clone(),
        from: Some(as_address(mailbox)),
        to: request.to.iter().map(as_address).collect(),
        cc: request.cc.iter().map(as_address).collect(),
        bcc: request.bcc.iter().map(as_address).collect(),
        subject: Some(subject),
        date: Some(now),
        text: request.text.clone(),
        html: request.html.clone(),
        // Numbered as the source's parts are, so the URLs serve these bytes.
        attachments: draft
            .attachments
            .iter()
            .enumerate()
            .map(|(index, a)| crate::model::AttachmentEventInfo {
                index,
                filename: a.filename.clone(),
                content_type: a.content_type.clone(),
                size: a.bytes.len(),
                url: format!(
                    "{}/v1/messages/{send_id}/attachments/{index}",
                    state.public_url
                ),
            })
            .collect(),
    };
    let record = SendRecord {
        id: send_id.clone(),
        location_id: request.location_id.clone(),
        user_id: request.user_id.clone(),
        contact_id: request.contact.id.clone(),
        mailbox: mailbox.clone(),
        thread_id: plan.thread.id.clone(),
        message_id: draft.message_id.clone(),
        status: SendStatus::Queued,
        error: None,
        smtp_response: None,
        attempts: 0,
        next_attempt_ms: 0,
        created_at: now,
        sent_at: None,
        idempotency_key: request.idempotency_key.clone(),
        recipients: request
            .to
            .iter()
            .chain(&request.cc)
            .chain(&request.bcc)
            .cloned()
            .collect(),
        data,
        filed_in_sent: false,
        filing_attempts: 0,
        filing_abandoned: false,
        outcome_checks: 0,
        submitted_message_id: None,
    };
    Ok((
        draft,
        Composed {
            record,
            submitted,
            filed,
            plan,
        },
    ))
}

enum Accept {
    /// The thread changed since it was read: plan again.
    ThreadChanged,
    Refused(ApiError),
}

/// Step 4: one commit records the send, its copies, its thread (with the
/// pin, R13) and the pin's `thread.detached` events; then the queue wakes.
fn accept(
    state: &AppState,
    request: &ValidSend,
    composed: &Composed,
    now: DateTime<Utc>,
) -> Result<Response, Accept> {
    let Composed {
        record,
        submitted,
        filed,
        plan,
    } = composed;
    let thread = &plan.thread;
    let detached: Vec<Event> = plan
        .detached
        .iter()
        .map(|r| {
            let data = ThreadDetached {
                thread_id: thread.id.clone(),
                location_id: r.location_id.clone(),
                user_id: r.user_id.clone(),
                contact_id: r.contact_id.clone(),
                mailbox: request.mailbox.address.clone(),
                reason: DetachReason::Pinned,
                new_mailbox: None,
                pinned_to_location_id: Some(request.location_id.clone()),
            };
            event_data::event("thread.detached", &thread.id, now, &data)
        })
        .collect();
    let acceptance = state.store.accept_send(
        &NewSend {
            record,
            submitted,
            filed: filed.as_deref().unwrap_or(submitted),
            thread,
            thread_before: plan.thread_before.as_ref(),
            events: &detached,
        },
        request.mailbox.daily_send_limit,
        now.timestamp_millis(),
    );
    match acceptance {
        Ok(SendAcceptance::Accepted) => {
            if !detached.is_empty() {
                state.signal.notify();
            }
            state.send_signal.notify();
            Ok((StatusCode::ACCEPTED, Json(send_view(record))).into_response())
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
                    request.mailbox.address,
                    retry_at.to_rfc3339()
                ),
            );
            error.retry_after_secs = Some(retry_after);
            Err(Accept::Refused(error))
        }
        Err(StoreError::ThreadChanged) => Err(Accept::ThreadChanged),
        Err(err) => Err(Accept::Refused(err.into())),
    }
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
    /// The thread as it was read; None for a new one.
    thread_before: Option<Thread>,
    in_reply_to: Option<String>,
    references: Vec<String>,
    /// Conversations that stop receiving the thread (R13).
    detached: Vec<ThreadRoute>,
}

/// Step 2 (R6, R12, R13): a new thread bound to the sending location, or the
/// thread `reply_to` names (a thread id or a Message-ID), pinned to this location.
fn thread_for_send(
    state: &AppState,
    request: &ValidSend,
    now: DateTime<Utc>,
) -> Result<ThreadPlan, ApiError> {
    let mailbox = request.mailbox.address.as_str();
    let route = ThreadRoute {
        location_id: request.location_id.clone(),
        user_id: request.user_id.clone(),
        contact_id: request.contact.id.clone(),
    };
    let Some(reply_to) = request.reply_to.as_deref() else {
        return Ok(ThreadPlan {
            thread: Thread {
                id: new_id("thr"),
                mailbox: mailbox.to_string(),
                routes: vec![route],
                created_at: now,
                message_ids: Vec::new(),
                subject: None,
            },
            thread_before: None,
            in_reply_to: None,
            references: Vec::new(),
            detached: Vec::new(),
        });
    };
    let found = match state
        .store
        .thread(reply_to)?
        .filter(|t| t.mailbox == mailbox)
    {
        Some(thread) => Some(thread),
        None => state.store.thread_of(mailbox, &[reply_to.to_string()])?,
    };
    let before = found.ok_or_else(|| {
        ApiError::not_found(format!(
            "reply_to: no thread or message {reply_to:?} in mailbox {mailbox}"
        ))
    })?;
    // R12: a thread that syncs only to other locations is theirs; replying
    // from here would take it from them.
    if !before.routes.is_empty()
        && !before
            .routes
            .iter()
            .any(|r| r.location_id == request.location_id)
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "thread_in_other_location",
            format!(
                "reply_to: thread {} belongs to another location's conversation; a reply from location {:?} cannot take it (R12)",
                before.id, request.location_id
            ),
        ));
    }
    let in_reply_to = if reply_to.starts_with('<') {
        Some(reply_to.to_string())
    } else {
        before.message_ids.last().cloned()
    };
    let references = before.message_ids.clone();
    let (kept, detached) = routing::r13_pin_thread(&before.routes, &route);
    let mut thread = before.clone();
    thread.routes = kept;
    Ok(ThreadPlan {
        thread,
        thread_before: Some(before),
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

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchBody {
    #[serde(default)]
    seen: Option<bool>,
    #[serde(default)]
    flagged: Option<bool>,
}

/// A change to a synced message, waiting to be made in the mailbox.
#[derive(Serialize, utoipa::ToSchema)]
pub struct QueuedChange {
    id: String,
    status: QueuedStatus,
}

#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
enum QueuedStatus {
    Queued,
}

/// `PATCH /v1/messages/{id}` `{"seen", "flagged"}`: sets or clears the flags
/// in the mailbox (issue 9). Answered at once; made from a durable queue.
#[utoipa::path(
    patch,
    path = "/messages/{id}",
    tag = "messages",
    params(("id" = String, Path, description = "The `data.id` of a message event")),
    request_body = PatchBody,
    responses(
        (status = 202, description = "Queued; made in the mailbox shortly", body = QueuedChange),
        (status = 404, description = "No synced message with this id", body = ErrorBody),
        (status = 409, description = "The mailbox is disconnected or needs new credentials", body = ErrorBody),
    ),
)]
pub async fn patch(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<PatchBody>,
) -> Result<Response, ApiError> {
    if body.seen.is_none() && body.flagged.is_none() {
        return Err(ApiError::invalid("seen or flagged is required"));
    }
    queue_change(&state, &id, body.seen, body.flagged, false)
}

/// `DELETE /v1/messages/{id}`: moves the message to the mailbox's Trash.
#[utoipa::path(
    delete,
    path = "/messages/{id}",
    tag = "messages",
    params(("id" = String, Path, description = "The `data.id` of a message event")),
    responses(
        (status = 202, description = "Queued; moved to the mailbox's Trash shortly", body = QueuedChange),
        (status = 404, description = "No synced message with this id", body = ErrorBody),
        (status = 409, description = "The mailbox is disconnected or needs new credentials", body = ErrorBody),
    ),
)]
pub async fn delete(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    queue_change(&state, &id, None, None, true)
}

fn queue_change(
    state: &AppState,
    id: &str,
    seen: Option<bool>,
    flagged: Option<bool>,
    to_trash: bool,
) -> Result<Response, ApiError> {
    check_id("id", id)?;
    let not_found = || {
        ApiError::not_found(format!(
            "no synced message {id:?} in a connected mailbox (unknown, sent by the CRM, moved out of its folder, or already in Trash)"
        ))
    };
    let (location, _) = state.store.locate_record(id)?.ok_or_else(not_found)?;
    match state.store.mailbox(&location.mailbox)? {
        None => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "mailbox_disconnected",
                format!("the mailbox {} is no longer connected", location.mailbox),
            ));
        }
        Some(mailbox) if mailbox.state == MailboxState::NeedsReauth => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "needs_reauth",
                format!(
                    "the mailbox {} needs new credentials before it can be changed; reconnect it",
                    mailbox.address
                ),
            ));
        }
        Some(_) => {}
    }
    let change = crate::model::MailboxChange {
        record_id: id.to_string(),
        location,
        seen,
        flagged,
        to_trash,
        attempts: 0,
        next_attempt_ms: 0,
        created_at: Utc::now(),
    };
    if !state.store.queue_mailbox_change(&change)? {
        return Err(not_found());
    }
    state.changes_signal.notify();
    Ok((
        StatusCode::ACCEPTED,
        Json(QueuedChange {
            id: id.to_string(),
            status: QueuedStatus::Queued,
        }),
    )
        .into_response())
}

#[utoipa::path(
    get,
    path = "/messages/{id}",
    tag = "messages",
    params(("id" = String, Path, description = "The `id` a send was accepted with")),
    responses(
        (status = 200, description = "The send and where it is", body = SendView),
        (status = 404, description = "No send with this id", body = ErrorBody),
    ),
)]
pub async fn get(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<SendView>, ApiError> {
    check_id("id", &id)?;
    let send = state
        .store
        .send(&id)?
        .ok_or_else(|| ApiError::not_found(format!("no message {id:?}")))?;
    Ok(Json(send_view(&send)))
}

async fn read_raw(state: &AppState, id: &str) -> Result<Vec<u8>, ApiError> {
    check_id("id", id)?;
    let store = state.store.clone();
    let record_id = id.to_string();
    tokio::task::spawn_blocking(move || store.message_source(&record_id, SourceCopy::Filed))
        .await
        .map_err(|e| StoreError::Engine(format!("reading the message source stopped: {e}")))??
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "no stored source for message {id:?} (unknown, or removed by retention)"
            ))
        })
}

#[utoipa::path(
    get,
    path = "/messages/{id}/raw",
    tag = "messages",
    params(("id" = String, Path)),
    responses(
        (status = 200, description = "The RFC 5322 source", content_type = "message/rfc822", body = super::openapi::RawBytes),
        (status = 404, description = "No stored source (unknown, or removed by retention)", body = ErrorBody),
    ),
)]
pub async fn raw(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let raw = read_raw(&state, &id).await?;
    Ok(([(header::CONTENT_TYPE, "message/rfc822")], Body::from(raw)).into_response())
}

#[utoipa::path(
    get,
    path = "/messages/{id}/attachments/{index}",
    tag = "messages",
    params(("id" = String, Path), ("index" = usize, Path, description = "`attachments[].index` of the message event")),
    responses(
        (status = 200, description = "The attachment's bytes, with its own content type", content_type = "application/octet-stream", body = super::openapi::RawBytes,
            headers(("Content-Disposition" = String))),
        (status = 404, description = "No such message or attachment", body = ErrorBody),
    ),
)]
pub async fn attachment(
    State(state): State<AppState>,
    ApiPath((id, index)): ApiPath<(String, usize)>,
) -> Result<Response, ApiError> {
    let raw = read_raw(&state, &id).await?;
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

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    /// At most this many messages (1 to 500, default 50).
    limit: Option<usize>,
    /// Only messages older than this time, for the next page.
    before: Option<DateTime<Utc>>,
}

/// A contact's synced messages, newest first.
#[derive(Serialize, utoipa::ToSchema)]
pub struct History {
    messages: Vec<MessageEventData>,
}

#[utoipa::path(
    get,
    path = "/locations/{location_id}/contacts/{contact_id}/messages",
    tag = "messages",
    params(("location_id" = String, Path), ("contact_id" = String, Path), HistoryQuery),
    responses(
        (status = 200, description = "The messages synced for the contact, newest first", body = History),
    ),
)]
pub async fn history(
    State(state): State<AppState>,
    ApiPath((location_id, contact_id)): ApiPath<(String, String)>,
    ApiQuery(query): ApiQuery<HistoryQuery>,
) -> Result<Json<History>, ApiError> {
    check_id("location_id", &location_id)?;
    check_id("contact_id", &contact_id)?;
    let limit = query.limit.unwrap_or(50).clamp(1, 500);
    let messages = state.store.history(
        &location_id,
        &contact_id,
        query.before.map(|b| b.timestamp_millis()),
        limit,
    )?;
    Ok(Json(History { messages }))
}
