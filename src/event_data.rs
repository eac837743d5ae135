//! What each webhook event carries in `data`: one type per kind of event.
//! Every place that raises an event builds one of these, and the OpenAPI
//! document's `webhooks` are generated from the same types, so what the CRM
//! is told and what it receives cannot drift apart.

use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use crate::model::{
    Contact, Event, FlagState, LocatedMessage, MessageEventData, Origin, UnprocessableMessage,
    UnprocessableReason, new_id,
};

/// Every kind of event, with its `data` type, for the OpenAPI document.
pub const KINDS: &[(&str, &str, &str)] = &[
    (
        "message.inbound",
        "MessageEventData",
        "A contact's message arrived in the mailbox (R3, R8, R11)",
    ),
    (
        "message.outbound",
        "MessageEventData",
        "The user sent or forwarded mail to a contact from the mailbox (R4, R16)",
    ),
    (
        "message.sent",
        "MessageSent",
        "A CRM send was accepted by the SMTP server (R5)",
    ),
    (
        "message.failed",
        "MessageFailed",
        "A CRM send failed for good; `error` says why",
    ),
    (
        "message.updated",
        "MessageChanged",
        "A synced message was read, flagged, answered, relabelled or moved to another folder in the mailbox",
    ),
    (
        "message.deleted",
        "MessageChanged",
        "A synced message was moved to Trash or Junk, or expunged, in the mailbox",
    ),
    (
        "message.unprocessable",
        "MessageUnprocessable",
        "A message of a watched folder could not be processed after repeated tries and was set aside: it will not sync; `reason` and `error` say why",
    ),
    (
        "mailbox.connected",
        "MailboxLifecycle",
        "An integration was connected (R1)",
    ),
    (
        "mailbox.updated",
        "MailboxLifecycle",
        "An integration now points at another address (R18)",
    ),
    (
        "mailbox.disconnected",
        "MailboxLifecycle",
        "An integration was disconnected (R19)",
    ),
    (
        "mailbox.needs_reauth",
        "MailboxLifecycle",
        "The provider refused the credentials for good (R20)",
    ),
    (
        "contact.created",
        "ContactCreated",
        "Auto BCC created a contact (R15)",
    ),
    (
        "thread.detached",
        "ThreadDetached",
        "A location stops receiving a thread (R13, R18)",
    ),
];

/// `message.sent`: the message as history shows it, once the server took it.
#[derive(Serialize, ToSchema)]
pub struct MessageSent {
    #[serde(flatten)]
    pub message: MessageEventData,
    pub status: SentStatus,
    /// The SMTP server's reply to the end of DATA.
    pub smtp_response: Option<String>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SentStatus {
    Sent,
}

/// `message.failed`: a CRM send that will not leave.
#[derive(Serialize, ToSchema)]
pub struct MessageFailed {
    /// The send's id, as `POST …/messages` answered.
    pub id: String,
    pub location_id: String,
    pub user_id: String,
    pub contact_id: String,
    pub thread_id: String,
    pub mailbox: String,
    pub message_id: String,
    pub error: String,
}

/// `message.updated` and `message.deleted`: where a synced message is now
/// and its flags.
#[derive(Serialize, ToSchema)]
pub struct MessageChanged {
    /// The `id` of the message's earlier event.
    pub id: String,
    pub message_id: Option<String>,
    pub thread_id: String,
    pub location_id: String,
    pub user_id: String,
    pub contact_id: String,
    pub mailbox: String,
    /// The folder it is in now; null once it is gone from the mailbox.
    pub folder: Option<String>,
    /// The folder it left, when it moved.
    pub previous_folder: Option<String>,
    pub seen: bool,
    pub flagged: bool,
    pub answered: bool,
    /// Its Gmail labels, where the server has them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<String>>,
}

/// `message.unprocessable`: a message of a watched folder the bridge gave
/// up on (listed at `GET …/mailbox/skipped`). It will not sync; the user can
/// see it in their mailbox, and forward it to the contact again.
#[derive(Serialize, ToSchema)]
pub struct MessageUnprocessable {
    pub location_id: String,
    pub user_id: String,
    pub mailbox: String,
    /// The folder's name on the server.
    pub folder: String,
    pub uid_validity: u32,
    pub uid: u32,
    /// Its Message-ID, when it could be read.
    pub message_id: Option<String>,
    pub reason: UnprocessableReason,
    /// What the last failed try said.
    pub error: String,
    /// Failed tries before it was set aside.
    pub attempts: u32,
}

impl MessageUnprocessable {
    /// A `message.unprocessable` event for each integration of the mailbox,
    /// in order with the mailbox's lifecycle events.
    pub fn events(record: &UnprocessableMessage, integrations: &[(String, String)]) -> Vec<Event> {
        let now = Utc::now();
        integrations
            .iter()
            .map(|(location_id, user_id)| {
                let data = MessageUnprocessable {
                    location_id: location_id.clone(),
                    user_id: user_id.clone(),
                    mailbox: record.mailbox.clone(),
                    folder: record.folder_name.clone(),
                    uid_validity: record.uid_validity,
                    uid: record.uid,
                    message_id: record.message_id.clone(),
                    reason: record.reason,
                    error: record.error.clone(),
                    attempts: record.attempts,
                };
                event("message.unprocessable", &record.mailbox, now, &data)
            })
            .collect()
    }
}

/// `mailbox.*`: an integration's lifecycle.
#[derive(Serialize, ToSchema)]
pub struct MailboxLifecycle {
    pub location_id: String,
    pub user_id: String,
    /// The mailbox's address.
    pub mailbox: String,
    /// `mailbox.updated`: the address the integration used before.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_mailbox: Option<String>,
    /// `mailbox.needs_reauth`: the provider's words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `contact.created`: a contact Auto BCC created.
#[derive(Serialize, ToSchema)]
pub struct ContactCreated {
    #[serde(flatten)]
    pub contact: Contact,
    pub origin: Origin,
}

/// `thread.detached`: one conversation of a thread stops syncing.
#[derive(Serialize, ToSchema)]
pub struct ThreadDetached {
    pub thread_id: String,
    pub location_id: String,
    pub user_id: String,
    pub contact_id: String,
    pub mailbox: String,
    pub reason: DetachReason,
    /// `mailbox_updated`: the address the integration uses now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_mailbox: Option<String>,
    /// `pinned`: the location a CRM send pinned the thread to (R13).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pinned_to_location_id: Option<String>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DetachReason {
    /// The integration was pointed at another address (R18).
    MailboxUpdated,
    /// A CRM send pinned the thread to another location (R13).
    Pinned,
}

impl MailboxLifecycle {
    pub fn new(location_id: &str, user_id: &str, mailbox: &str) -> Self {
        Self {
            location_id: location_id.to_string(),
            user_id: user_id.to_string(),
            mailbox: mailbox.to_string(),
            previous_mailbox: None,
            error: None,
        }
    }

    /// The `mailbox.*` event of `kind`, in order with the mailbox's other
    /// lifecycle events.
    pub fn event(&self, kind: &str) -> Event {
        event(kind, &self.mailbox, Utc::now(), self)
    }
}

/// Where a synced message is now: what a `message.updated` or
/// `message.deleted` reports.
pub struct MessagePlace<'a> {
    pub folder: Option<&'a str>,
    pub previous_folder: Option<&'a str>,
    pub flags: FlagState,
    /// Newer labels than the last known ones, if the change brought any.
    pub labels: Option<&'a [String]>,
}

/// A `kind` event (`message.updated`, `message.deleted`) for each
/// conversation that received the message.
pub fn message_changed(
    located: &LocatedMessage,
    kind: &str,
    mailbox: &str,
    place: MessagePlace<'_>,
) -> Vec<Event> {
    let now = Utc::now();
    // Where the server has labels, the last known ones unless the change
    // names newer.
    let labels = place
        .labels
        .map(<[String]>::to_vec)
        .or_else(|| located.labels.clone());
    located
        .routes
        .iter()
        .map(|route| {
            let data = MessageChanged {
                id: located.record_id.clone(),
                message_id: located.message_id.clone(),
                thread_id: located.thread_id.clone(),
                location_id: route.location_id.clone(),
                user_id: route.user_id.clone(),
                contact_id: route.contact_id.clone(),
                mailbox: mailbox.to_string(),
                folder: place.folder.map(str::to_string),
                previous_folder: place.previous_folder.map(str::to_string),
                seen: place.flags.seen,
                flagged: place.flags.flagged,
                answered: place.flags.answered,
                labels: labels.clone(),
            };
            event(kind, &located.thread_id, now, &data)
        })
        .collect()
}

/// An event of `kind` ordered under `ordering_key`, carrying `data`.
pub fn event(
    kind: &str,
    ordering_key: &str,
    timestamp: DateTime<Utc>,
    data: &impl Serialize,
) -> Event {
    Event {
        id: new_id("evt"),
        kind: kind.to_string(),
        timestamp,
        ordering_key: ordering_key.to_string(),
        // These types are plain structs of strings, numbers and times:
        // serializing them to a Value cannot fail.
        data: serde_json::to_value(data).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_names_a_data_type_the_document_describes() {
        let document = crate::api::openapi::document();
        let schemas = document
            .components
            .as_ref()
            .map(|c| c.schemas.clone())
            .unwrap_or_default();
        for (kind, data, _) in KINDS {
            assert!(
                schemas.contains_key(*data),
                "{kind}: {data} is not in the document"
            );
        }
    }
}
