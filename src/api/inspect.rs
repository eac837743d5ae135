//! `POST /v1/inspect?mailbox=…&folder=inbox|sent` with a message's source as
//! the body: what the rules would decide for it, integration by integration,
//! and why. Changes nothing. `mailbridge inspect --mailbox` prints it.

use axum::{Json, body::Bytes, extract::State};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{
    AppState,
    error::{ApiError, ApiQuery, check_email},
};
use crate::{
    ingest::Verdict,
    model::{Direction, EmailAddress, FolderRole, Message, Origin},
    routing::Routing,
};

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct InspectQuery {
    /// The connected mailbox the message would arrive in.
    mailbox: String,
    /// The folder it would arrive in (default `inbox`).
    #[serde(default)]
    #[param(inline)]
    folder: InspectFolder,
}

#[derive(Clone, Copy, Default, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum InspectFolder {
    #[default]
    Inbox,
    Sent,
    /// Gmail's All Mail.
    All,
}

impl From<InspectFolder> for FolderRole {
    fn from(folder: InspectFolder) -> Self {
        match folder {
            InspectFolder::Inbox => FolderRole::Inbox,
            InspectFolder::Sent => FolderRole::Sent,
            InspectFolder::All => FolderRole::All,
        }
    }
}

/// What the rules would decide for a message, and why.
#[derive(Serialize, utoipa::ToSchema)]
pub struct InspectReport {
    mailbox: String,
    /// `inbox`, `sent` or `all`.
    folder: String,
    message: ParsedMessage,
    /// One per integration using the mailbox.
    verdicts: Vec<VerdictView>,
}

/// The headers the rules read, as the bridge parsed them.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ParsedMessage {
    message_id: Option<String>,
    in_reply_to: Option<String>,
    references: Vec<String>,
    from: Option<EmailAddress>,
    to: Vec<EmailAddress>,
    cc: Vec<EmailAddress>,
    bcc: Vec<EmailAddress>,
    subject: Option<String>,
    date: Option<DateTime<Utc>>,
    /// What threads it: its own and the referenced Message-IDs, normalized.
    thread_keys: Vec<String>,
    /// What the parser had to repair or skip.
    parse_warnings: Vec<String>,
}

/// What happens to the message for one integration.
#[derive(Serialize, utoipa::ToSchema)]
pub struct VerdictView {
    /// Null when the message is not looked at for any integration.
    location_id: Option<String>,
    user_id: Option<String>,
    synced: bool,
    /// Why it is not synced.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    /// The thread it joins, or `new`.
    #[serde(skip_serializing_if = "Option::is_none")]
    thread: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    deliveries: Option<Vec<DeliveryView>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    contacts_created: Option<Vec<NewContactView>>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct DeliveryView {
    location_id: String,
    user_id: String,
    contact_id: String,
    contact_ids: Vec<String>,
    direction: Direction,
    origin: Origin,
    /// The rule that decided it.
    rule: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct NewContactView {
    id: String,
    email: String,
    name: Option<String>,
}

/// Explains, for a message's source, what the rules would decide in each
/// integration using the mailbox. Changes nothing.
#[utoipa::path(
    post,
    path = "/inspect",
    tag = "inspect",
    params(InspectQuery),
    request_body(content = super::openapi::RawBytes, content_type = "message/rfc822", description = "The message's source"),
    responses(
        (status = 200, description = "The verdicts", body = InspectReport),
    ),
)]
pub async fn inspect(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<InspectQuery>,
    raw: Bytes,
) -> Result<Json<InspectReport>, ApiError> {
    let mailbox = check_email("mailbox", &query.mailbox)?;
    if raw.is_empty() {
        return Err(ApiError::invalid(
            "the body must be the message's source (message/rfc822)",
        ));
    }
    let ingest = state.ingest.clone();
    let folder = FolderRole::from(query.folder);
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

/// The verdicts: the same for the API and `mailbridge inspect`.
pub fn describe(
    mailbox: &str,
    folder: FolderRole,
    message: &Message,
    verdicts: &[Verdict],
) -> InspectReport {
    let verdicts = verdicts
        .iter()
        .map(|verdict| {
            let mut view = VerdictView {
                location_id: verdict.location_id.clone(),
                user_id: verdict.user_id.clone(),
                synced: false,
                reason: None,
                thread: None,
                deliveries: None,
                contacts_created: None,
            };
            match &verdict.routing {
                Routing::Ignore(reason) => view.reason = Some(reason.to_string()),
                Routing::Deliver {
                    deliveries,
                    new_contacts,
                    ..
                } => {
                    view.synced = true;
                    view.thread = Some(verdict.thread_id.clone().unwrap_or_else(|| "new".into()));
                    view.deliveries = Some(
                        deliveries
                            .iter()
                            .map(|d| DeliveryView {
                                location_id: d.route.location_id.clone(),
                                user_id: d.route.user_id.clone(),
                                contact_id: d.route.contact_id.clone(),
                                contact_ids: d.contact_ids.clone(),
                                direction: d.direction,
                                origin: d.origin,
                                rule: d.rule.to_string(),
                            })
                            .collect(),
                    );
                    view.contacts_created = Some(
                        new_contacts
                            .iter()
                            .map(|c| NewContactView {
                                id: c.id.clone(),
                                email: c.email.clone(),
                                name: c.name.clone(),
                            })
                            .collect(),
                    );
                }
            }
            view
        })
        .collect();
    InspectReport {
        mailbox: mailbox.to_string(),
        folder: folder.to_string(),
        message: ParsedMessage {
            message_id: message.message_id.clone(),
            in_reply_to: message.in_reply_to.clone(),
            references: message.references.clone(),
            from: message.from.clone(),
            to: message.to.clone(),
            cc: message.cc.clone(),
            bcc: message.bcc.clone(),
            subject: message.subject.clone(),
            date: message.date,
            thread_keys: message.thread_keys(),
            parse_warnings: message.parse_warnings.clone(),
        },
        verdicts,
    }
}
