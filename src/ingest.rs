//! One fetched message, start to finish: parse, load what the rules need, route,
//! and commit the outcome together with the folder's cursor. Called by the IMAP
//! watchers; knows nothing of IMAP itself.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
};

use chrono::Utc;

use crate::{
    event_data::{self, ContactCreated, MessageUnprocessable},
    mime,
    model::Origin,
    model::{
        AttachmentEventInfo, Contact, Direction, Event, FlagState, FolderCursor, FolderRole,
        Integration, LocatedMessage, Message, MessageEventData, SendRecord, Thread, ThreadRoute,
        UnprocessableMessage, UnprocessableReason, new_id, normalize_email,
    },
    routing::{self, Directory, IgnoreReason, Incoming, Routing, ThreadDecision, ThreadLink},
    smart_address::SmartAddresses,
    store::{IngestCommit, KeptSource, Store, StoreError, StoreResult},
    webhook::OutboxSignal,
};

/// The setting that finds (location, user) by their smart address's token;
/// written when the address is handed out.
pub fn smart_token_setting(token: &str) -> String {
    format!("auto_bcc_token:{token}")
}

/// The setting that holds the addresses a user sends from (besides a
/// connected mailbox), for the catch-all to know their mail.
pub fn smart_senders_setting(location_id: &str, user_id: &str) -> String {
    format!("auto_bcc_senders:{location_id}\0{user_id}")
}

/// The addresses registered as a user's own (see `smart_senders_setting`).
pub fn smart_senders(
    store: &dyn Store,
    location_id: &str,
    user_id: &str,
) -> StoreResult<Vec<String>> {
    Ok(store
        .setting(&smart_senders_setting(location_id, user_id))?
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default())
}

/// How often a message is routed again when a CRM send keeps changing its
/// thread at the same moment; past that the watcher retries the message later.
const MAX_THREAD_RETRIES: u32 = 5;

/// Failed tries at one message before it is set aside (issue 21 item 6):
/// sessions in which the server said it is there but did not return it, or
/// panics while handling it. Then it is passed over, listed, and reported as
/// `message.unprocessable`, so one broken message cannot stop a folder.
pub const SET_ASIDE_AFTER_TRIES: u32 = 10;

/// What became of a message tried with its failures contained.
#[derive(Debug, PartialEq, Eq)]
pub enum Tried {
    Handled(Outcome),
    /// It failed too often: passed over (its cursor moved) and reported.
    SetAside,
    /// It failed, and is tried again in a later session.
    Retry {
        attempts: u32,
        error: String,
    },
}

#[derive(Clone)]
pub struct Ingest {
    store: Arc<dyn Store>,
    signal: OutboxSignal,
    public_url: String,
    smart: SmartAddresses,
}

/// Where a message was found.
#[derive(Clone, Copy, Debug)]
pub struct Found<'a> {
    pub mailbox: &'a str,
    pub folder: FolderRole,
    pub uid_validity: u32,
    pub uid: u32,
    /// The folder's cursor as the finder holds it: the message's commit
    /// moves it only from there.
    pub cursor: FolderCursor,
    /// Its flags when it was fetched, if the server said.
    pub flags: Option<FlagState>,
    /// Its Gmail labels when it was fetched, where the server has them.
    pub labels: Option<&'a [String]>,
    /// The folder's name on the server (`INBOX`, the Sent folder's).
    pub folder_name: &'a str,
    /// When the server received it (INTERNALDATE), if it said.
    pub received_at: Option<chrono::DateTime<Utc>>,
}

impl Found<'_> {
    /// The folder's cursor once this message is handled: past it, moved now.
    fn cursor_after(&self, now: chrono::DateTime<Utc>) -> FolderCursor {
        FolderCursor {
            moved_at: Some(now),
            highest_modseq: self.cursor.highest_modseq,
            ..FolderCursor::new(self.uid_validity, self.uid.saturating_add(1))
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Ignored(routing::IgnoreReason),
    Queued { thread_id: String, events: usize },
}

/// What the rules need to decide one message, loaded from the store.
struct Loaded {
    integrations: Vec<Integration>,
    /// The mailbox as routing sees it (for the catch-all: the sender's).
    routing_mailbox: String,
    folder: FolderRole,
    logged_by_envelope: Vec<(String, String)>,
    contacts: Vec<Contact>,
    thread_keys: Vec<String>,
    /// Where the thread keys found none: the ids looked up among messages
    /// answered by a synced thread (what it answers, then its own id).
    answered_seen: Vec<String>,
    thread_seen: Option<Thread>,
    thread_link: ThreadLink,
    identity: String,
    already_synced: Vec<(String, String)>,
    sent_by_crm: bool,
    /// The CRM send this message is (its copy in Sent), when it is one.
    crm_send: Option<SendRecord>,
    smart_addresses: Vec<String>,
}

impl Loaded {
    /// The rules' decision for a message found in a folder, for every
    /// integration of its mailbox.
    fn route_found(&self, message: &Message, found: Found<'_>) -> Routing {
        self.route(
            message,
            found.uid_validity,
            found.uid,
            found.received_at,
            &self.integrations,
        )
    }

    fn route(
        &self,
        message: &Message,
        uid_validity: u32,
        uid: u32,
        received_at: Option<chrono::DateTime<Utc>>,
        integrations: &[Integration],
    ) -> Routing {
        routing::route_linked(
            Incoming {
                message,
                folder: self.folder,
                uid_validity,
                uid,
                received_at,
                sent_by_crm: self.sent_by_crm,
            },
            Directory {
                mailbox: &self.routing_mailbox,
                integrations,
                contacts: &self.contacts,
                already_synced: &self.already_synced,
                logged_by_envelope: &self.logged_by_envelope,
                smart_addresses: &self.smart_addresses,
            },
            self.thread_seen
                .as_ref()
                .map(|thread| (thread, self.thread_link)),
        )
    }
}

/// What the rules decide for one integration (`explain`).
#[derive(Debug)]
pub struct Verdict {
    /// None when the message is not looked at for any integration.
    pub location_id: Option<String>,
    pub user_id: Option<String>,
    pub routing: Routing,
    /// The synced thread it continues, if it does.
    pub thread_id: Option<String>,
}

/// What makes two copies of a message the same message: its Message-ID with
/// a fingerprint of From, Date and Subject (some senders reuse one
/// Message-ID for different mail), or, without a Message-ID, a hash of the
/// whole header (its Date and Received lines tell messages apart).
pub fn message_identity(message: &Message, raw: &[u8]) -> String {
    use sha2::Digest as _;
    let hex = |digest: &[u8]| -> String { digest.iter().map(|b| format!("{b:02x}")).collect() };
    if let Some(id) = &message.message_id {
        let mut fingerprint = sha2::Sha256::new();
        for part in [
            message.from.as_ref().map(|a| a.email.as_str()),
            message.date.map(|d| d.to_rfc3339()).as_deref(),
            message.subject.as_deref(),
        ] {
            fingerprint.update(part.unwrap_or("").as_bytes());
            fingerprint.update(b"\0");
        }
        let digest = fingerprint.finalize();
        return format!("{id}|{}", hex(digest.get(..8).unwrap_or(&digest)));
    }
    let header_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .or_else(|| raw.windows(2).position(|w| w == b"\n\n"))
        .unwrap_or(raw.len());
    let header = raw.get(..header_end).unwrap_or(raw);
    format!("sha256:{}", hex(&sha2::Sha256::digest(header)))
}

impl Ingest {
    pub fn new(
        store: Arc<dyn Store>,
        signal: OutboxSignal,
        public_url: &str,
        smart: SmartAddresses,
    ) -> Self {
        Self {
            store,
            signal,
            public_url: public_url.trim_end_matches('/').to_string(),
            smart,
        }
    }

    /// Whether the message carries the bridge's header naming a send from this
    /// mailbox. The server may have replaced the Message-ID (Exchange Online),
    /// and its copy in Sent can arrive before the bridge reads the new one.
    /// The CRM send `message` is, by its Message-ID or (where the server
    /// replaced that) by the send id header the bridge wrote.
    fn crm_send_in(&self, mailbox: &str, message: &Message) -> StoreResult<Option<SendRecord>> {
        let by_message_id = match &message.message_id {
            Some(id) => self.store.crm_send_of(mailbox, id)?,
            None => None,
        };
        let Some(send_id) = by_message_id.or_else(|| message.crm_send_id.clone()) else {
            return Ok(None);
        };
        Ok(self
            .store
            .send(&send_id)?
            .filter(|send| send.mailbox == mailbox))
    }

    /// Handles the message at `found` and moves the folder's cursor past it,
    /// durably before it returns.
    pub fn handle(&self, found: Found<'_>, raw: &[u8]) -> StoreResult<Outcome> {
        let message = parse_logged(found, raw);
        self.handle_parsed(found, &message, raw, Durability::Now)
    }

    /// Counts a failed try at the message at `found`; once the tries reach
    /// [`SET_ASIDE_AFTER_TRIES`], sets it aside: the folder's cursor moves
    /// past it, it is listed for the operator, and each integration of the
    /// mailbox gets `message.unprocessable`, durably, in one step.
    pub fn failed_try(
        &self,
        found: Found<'_>,
        message_id: Option<String>,
        reason: UnprocessableReason,
        error: String,
    ) -> StoreResult<Tried> {
        let now = Utc::now();
        let counted = self.store.count_failed_try(&UnprocessableMessage {
            mailbox: found.mailbox.to_string(),
            folder: found.folder,
            folder_name: found.folder_name.to_string(),
            uid_validity: found.uid_validity,
            uid: found.uid,
            message_id,
            reason,
            error: error.clone(),
            attempts: 1,
            first_failed_at: now,
            last_failed_at: now,
            set_aside_at: None,
        })?;
        if counted.attempts < SET_ASIDE_AFTER_TRIES {
            return Ok(Tried::Retry {
                attempts: counted.attempts,
                error,
            });
        }
        let record = UnprocessableMessage {
            set_aside_at: Some(now),
            ..counted
        };
        let integrations: Vec<(String, String)> = self
            .store
            .integrations_of_mailbox(found.mailbox)?
            .into_iter()
            .map(|i| (i.location_id, i.user_id))
            .collect();
        let events = MessageUnprocessable::events(&record, &integrations);
        self.store
            .set_aside(&record, &cursor_step(found, None, events))?;
        self.signal.notify();
        metrics::counter!("mailbridge_messages_unprocessable_total").increment(1);
        tracing::error!(
            mailbox = found.mailbox,
            folder = found.folder_name,
            uid = found.uid,
            "message set aside after {} failed tries, reported as message.unprocessable: {error}",
            record.attempts
        );
        Ok(Tried::SetAside)
    }

    /// Starts a batch of the messages of one FETCH, made durable together
    /// (see [`IngestBatch`]): the sources of those the rules would sync as
    /// the store stands are written ahead, synced at once. A message the
    /// guess misses (a reply to a thread an earlier message of the batch
    /// opens) has its source written on its own when it is committed.
    pub fn batch(&self, fetched: &[(Found<'_>, &[u8])]) -> StoreResult<IngestBatch<'_>> {
        let mut ahead: Vec<(u32, String, &[u8])> = Vec::new();
        for &(found, raw) in fetched {
            // The rules read headers only: the body is decoded once, when
            // the message's turn comes (the batch holds the raw messages the
            // memory budget counts, not their decoded text as well).
            // A message whose rules panic is not written ahead; its own
            // handling meets the panic again, contained (`handle_contained`).
            let would_sync = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let message = mime::parse_headers_only(raw);
                self.would_sync(found, &message, raw)
            }))
            .unwrap_or(Ok(false));
            if would_sync? {
                ahead.push((found.uid, new_id("msg"), raw));
            }
        }
        let sources: Vec<(&str, &[u8])> = ahead
            .iter()
            .map(|(_, record_id, raw)| (record_id.as_str(), *raw))
            .collect();
        self.store.write_sources_ahead(&sources)?;
        Ok(IngestBatch {
            ingest: self,
            written_ahead: ahead
                .into_iter()
                .map(|(uid, record_id, _)| (uid, record_id))
                .collect(),
            needs_flush: false,
        })
    }

    fn handle_parsed(
        &self,
        found: Found<'_>,
        message: &Message,
        raw: &[u8],
        durability: Durability<'_>,
    ) -> StoreResult<Outcome> {
        // A CRM send may pin the thread between the look-up and the commit:
        // the message is routed again over the thread as it now is.
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.route_and_commit(found, message, raw, durability) {
                Err(
                    StoreError::ThreadChanged
                    | StoreError::DirectoryChanged
                    | StoreError::AlreadySynced,
                ) if attempts < MAX_THREAD_RETRIES => {
                    tracing::debug!(
                        mailbox = found.mailbox,
                        uid = found.uid,
                        "the thread changed while the message was routed; routing it again"
                    );
                }
                outcome => return outcome,
            }
        }
    }

    /// Whether the rules would sync the message as the store stands now.
    /// Reads only; a batch's guess of which sources to write ahead.
    fn would_sync(&self, found: Found<'_>, message: &Message, raw: &[u8]) -> StoreResult<bool> {
        let Ok(loaded) = self.load(found.mailbox, found.folder, message, raw)? else {
            return Ok(false);
        };
        Ok(matches!(
            loaded.route_found(message, found),
            Routing::Deliver { .. }
        ))
    }

    /// What the rules need to decide a message found in `folder` of
    /// `mailbox`; or why it is not looked at (the Auto BCC catch-all with no
    /// smart address on it).
    fn load(
        &self,
        mailbox: &str,
        found_in: FolderRole,
        message: &Message,
        raw: &[u8],
    ) -> StoreResult<Result<Loaded, IgnoreReason>> {
        let mut integrations = self.store.integrations_of_mailbox(mailbox)?;
        // The smart address is derived (R15), whatever an older record holds.
        for integration in &mut integrations {
            integration.smart_bcc_address = self
                .smart
                .address(&integration.location_id, &integration.user_id);
        }
        // Auto BCC's catch-all (R15, door 2): what arrives there was sent by
        // a user who put their smart address on it; it is routed as that
        // user's sent mail, for each integration an address names.
        let mut routing_mailbox = mailbox.to_string();
        let mut folder = found_in;
        let mut logged_by_envelope = Vec::new();
        if let Some(catch_all) = integrations.iter().find(|i| i.is_catch_all()).cloned() {
            let sender = message.from.as_ref().map(|a| normalize_email(&a.email));
            integrations = match (found_in, sender) {
                (FolderRole::Inbox, Some(sender)) => {
                    let logged = self.logged_through_catch_all(message, &catch_all, &sender)?;
                    routing_mailbox = sender;
                    logged
                }
                _ => Vec::new(),
            };
            if integrations.is_empty() {
                return Ok(Err(IgnoreReason::NoSmartAddress));
            }
            folder = FolderRole::Sent;
            logged_by_envelope = integrations
                .iter()
                .map(|i| (i.location_id.clone(), i.user_id.clone()))
                .collect();
        }
        // Door 2 files threads and CRM sends under the sender's mailbox, so
        // both doors see one conversation.
        let crm_send = self.crm_send_in(&routing_mailbox, message)?;
        let sent_by_crm = crm_send.is_some();
        let contacts =
            self.contacts_for(message, integrations.iter().map(|i| i.location_id.as_str()))?;
        let thread_keys = message.thread_keys();
        let mut thread_seen = self.store.thread_of(&routing_mailbox, &thread_keys)?;
        let mut thread_link = ThreadLink::Answers;
        let mut answered_seen = Vec::new();
        if thread_seen.is_none() {
            // A second reply to a message not read yet: the thread of the
            // first reply, which answered the same message.
            answered_seen = message.parent_ids();
            thread_seen = self
                .store
                .thread_answering(&routing_mailbox, &answered_seen)?;
            // The message itself, read after its reply: the reply's thread.
            if thread_seen.is_none()
                && let Some(own_id) = &message.message_id
            {
                answered_seen.push(own_id.clone());
                thread_seen = self
                    .store
                    .thread_answering(&routing_mailbox, std::slice::from_ref(own_id))?;
                thread_link = ThreadLink::AnsweredBy;
            }
        }
        let identity = message_identity(message, raw);
        let pairs: Vec<(String, String)> = integrations
            .iter()
            .map(|i| (i.location_id.clone(), i.user_id.clone()))
            .collect();
        let already_synced = self.store.synced_to(&identity, &pairs)?;
        let smart_addresses = message
            .to
            .iter()
            .chain(&message.cc)
            .chain(&message.bcc)
            .map(|a| normalize_email(&a.email))
            .filter(|a| self.smart.token_in(a).is_some())
            .collect();
        Ok(Ok(Loaded {
            smart_addresses,
            integrations,
            routing_mailbox,
            folder,
            logged_by_envelope,
            contacts,
            thread_keys,
            answered_seen,
            thread_seen,
            thread_link,
            identity,
            already_synced,
            sent_by_crm,
            crm_send,
        }))
    }

    /// Why a message would or would not sync, integration by integration,
    /// as if it arrived now in `folder` of `mailbox` (`mailbridge inspect`).
    /// Reads only.
    pub fn explain(
        &self,
        mailbox: &str,
        folder: FolderRole,
        raw: &[u8],
    ) -> StoreResult<Vec<Verdict>> {
        let message = mime::parse(raw);
        let loaded = match self.load(mailbox, folder, &message, raw)? {
            Ok(loaded) => loaded,
            Err(reason) => {
                return Ok(vec![Verdict {
                    location_id: None,
                    user_id: None,
                    routing: Routing::Ignore(reason),
                    thread_id: None,
                }]);
            }
        };
        if loaded.integrations.is_empty() {
            return Ok(vec![Verdict {
                location_id: None,
                user_id: None,
                routing: Routing::Ignore(IgnoreReason::NoIntegration),
                thread_id: None,
            }]);
        }
        Ok(loaded
            .integrations
            .iter()
            .map(|integration| {
                // Newly arrived: past every baseline (R2 is about the past).
                let routing = loaded.route(
                    &message,
                    u32::MAX,
                    u32::MAX,
                    Some(Utc::now()),
                    std::slice::from_ref(integration),
                );
                let thread_id = match &routing {
                    Routing::Deliver {
                        thread: ThreadDecision::Continue { thread_id },
                        ..
                    } => Some(thread_id.clone()),
                    _ => None,
                };
                Verdict {
                    location_id: Some(integration.location_id.clone()),
                    user_id: Some(integration.user_id.clone()),
                    routing,
                    thread_id,
                }
            })
            .collect())
    }

    fn route_and_commit(
        &self,
        found: Found<'_>,
        message: &Message,
        raw: &[u8],
        durability: Durability<'_>,
    ) -> StoreResult<Outcome> {
        let cursor = found.cursor_after(Utc::now());
        let loaded = match self.load(found.mailbox, found.folder, message, raw)? {
            Ok(loaded) => loaded,
            Err(reason) => {
                tracing::info!(
                    mailbox = found.mailbox,
                    uid = found.uid,
                    "not logged: {reason}"
                );
                self.skip(found)?;
                return Ok(Outcome::Ignored(reason));
            }
        };
        let routing = loaded.route_found(message, found);
        let pairs: Vec<(String, String)> = loaded
            .integrations
            .iter()
            .map(|i| (i.location_id.clone(), i.user_id.clone()))
            .collect();
        let Loaded {
            thread_keys,
            answered_seen,
            thread_seen,
            thread_link,
            identity,
            routing_mailbox,
            crm_send,
            ..
        } = loaded;
        let thread = thread_seen.clone();
        let (decision, deliveries, new_contacts) = match routing {
            Routing::Ignore(IgnoreReason::AlreadySynced)
                if routing_mailbox == found.mailbox
                    && self.relocate(found, &identity, &pairs)? =>
            {
                return Ok(Outcome::Ignored(IgnoreReason::AlreadySynced));
            }
            // A CRM send's copy in Sent is not forwarded again (R5, and the
            // synced set), but followed from here: its later changes, and the
            // CRM's PATCH/DELETE on it, find it.
            Routing::Ignore(reason)
                if routing_mailbox == found.mailbox && found.folder == FolderRole::Sent =>
            {
                match crm_send {
                    Some(send) => self.follow_crm_send(found, &send, message)?,
                    None => self.skip(found)?,
                }
                return Ok(Outcome::Ignored(reason));
            }
            Routing::Ignore(reason) => {
                tracing::debug!(
                    mailbox = found.mailbox,
                    folder = %found.folder,
                    uid = found.uid,
                    "not synced: {reason}"
                );
                self.skip(found)?;
                return Ok(Outcome::Ignored(reason));
            }
            Routing::Deliver {
                thread,
                deliveries,
                new_contacts,
            } => (thread, deliveries, new_contacts),
        };
        let answers = routing::answered_ids(message);
        let now = Utc::now();
        let mut thread = match (decision, thread) {
            (ThreadDecision::Continue { .. }, Some(thread)) => thread,
            _ => Thread {
                id: new_id("thr"),
                mailbox: routing_mailbox.clone(),
                routes: deliveries.iter().map(|d| d.route.clone()).collect(),
                created_at: now,
                message_ids: Vec::new(),
                subject: None,
            },
        };
        match thread_link {
            ThreadLink::Answers => {
                thread.remember(message.message_id.as_deref(), message.subject.as_deref());
            }
            ThreadLink::AnsweredBy => {
                thread.remember_earlier(message.message_id.as_deref(), message.subject.as_deref());
            }
        }
        let message_record_id = match durability {
            Durability::WithBatch {
                written_ahead: Some(record_id),
            } => record_id.to_string(),
            _ => new_id("msg"),
        };
        let history: Vec<MessageEventData> = deliveries
            .iter()
            .map(|delivery| MessageEventData {
                id: message_record_id.clone(),
                location_id: delivery.route.location_id.clone(),
                user_id: delivery.route.user_id.clone(),
                contact_id: delivery.route.contact_id.clone(),
                contact_ids: delivery.contact_ids.clone(),
                thread_id: thread.id.clone(),
                mailbox: routing_mailbox.clone(),
                direction: delivery.direction,
                origin: delivery.origin,
                message_id: message.message_id.clone(),
                in_reply_to: message.in_reply_to.clone(),
                references: message.references.clone(),
                from: message.from.clone(),
                to: message.to.clone(),
                cc: message.cc.clone(),
                bcc: message.bcc.clone(),
                subject: message.subject.clone(),
                date: message.date,
                text: message.text.clone(),
                html: message.html.clone(),
                attachments: self.attachment_links(&message_record_id, message),
            })
            .collect();
        let events: Vec<Event> = history
            .iter()
            .map(|data| {
                let kind = match data.direction {
                    Direction::Inbound => "message.inbound",
                    Direction::Outbound => "message.outbound",
                };
                event_data::event(kind, &thread.id, now, data)
            })
            .collect();
        // R15: the contacts come first, so the CRM knows them when the
        // message that names them arrives (same ordering key).
        let new_contacts: Vec<Contact> = new_contacts
            .into_iter()
            .map(|new| Contact {
                location_id: new.location_id,
                id: new.id,
                emails: vec![new.email],
                name: new.name,
                assigned_user_ids: vec![new.user_id],
                created_at: now,
            })
            .collect();
        let events: Vec<Event> = new_contacts
            .iter()
            .map(|contact| {
                let data = ContactCreated {
                    contact: contact.clone(),
                    origin: Origin::AutoBcc,
                };
                event_data::event("contact.created", &thread.id, now, &data)
            })
            .chain(events)
            .collect();
        let count = events.len();
        let commit = IngestCommit {
            mailbox: found.mailbox.to_string(),
            thread_mailbox: routing_mailbox.clone(),
            folder: found.folder,
            cursor_before: found.cursor,
            cursor,
            thread_keys_seen: thread_keys,
            answered_seen,
            thread_seen,
            message_ids: message.message_id.iter().cloned().collect(),
            answers,
            thread: Some(thread.clone()),
            new_contacts,
            located: Some((
                found.uid_validity,
                found.uid,
                LocatedMessage {
                    record_id: message_record_id.clone(),
                    message_id: message.message_id.clone(),
                    thread_id: thread.id.clone(),
                    routes: deliveries.iter().map(|d| d.route.clone()).collect(),
                    flags: found.flags.unwrap_or_default(),
                    labels: found.labels.map(<[String]>::to_vec),
                },
            )),
            events,
            synced: Some((
                identity,
                deliveries
                    .iter()
                    .map(|d| (d.route.location_id.clone(), d.route.user_id.clone()))
                    .collect(),
            )),
            history,
        };
        // The source is kept for /raw and attachment downloads.
        let committed = match durability {
            Durability::Now => self.store.commit_ingest(&commit, Some(raw)),
            Durability::WithBatch { written_ahead } => self.store.commit_ingest_deferred(
                &commit,
                match written_ahead {
                    Some(_) => KeptSource::WrittenAhead,
                    None => KeptSource::Write(raw),
                },
            ),
        };
        // An integration received it meanwhile (the other Auto BCC door,
        // another folder): the caller routes it again without that one.
        committed?;
        metrics::counter!("mailbridge_messages_synced_total").increment(1);
        if let Durability::Now = durability {
            self.signal.notify();
        }
        tracing::info!(mailbox = found.mailbox, folder = %found.folder, uid = found.uid, thread = %thread.id, events = count, "synced");
        Ok(Outcome::Queued {
            thread_id: thread.id,
            events: count,
        })
    }

    /// A synced message back in a watched folder (moved out and back,
    /// restored from Trash): not forwarded again (R21), but followed again
    /// from its new place and reported as `message.updated` with the folder.
    /// False when it is not such a message (or is followed elsewhere).
    fn relocate(
        &self,
        found: Found<'_>,
        identity: &str,
        integrations: &[(String, String)],
    ) -> StoreResult<bool> {
        let Some(record_id) = self.store.synced_record(identity, integrations)? else {
            return Ok(false);
        };
        // Followed elsewhere already (a copy in the other folder). A place
        // from before this folder was renumbered does not count.
        if let Some((at, _)) = self.store.locate_record(&record_id)?
            && !(at.mailbox == found.mailbox
                && at.folder == found.folder
                && at.uid_validity != found.uid_validity)
        {
            return Ok(false);
        }
        let Some(info) = self.store.record_info(&record_id)? else {
            return Ok(false);
        };
        let info = LocatedMessage {
            flags: found.flags.unwrap_or(info.flags),
            labels: found.labels.map(<[String]>::to_vec).or(info.labels),
            ..info
        };
        let events = crate::event_data::message_changed(
            &still_synced(self.store.as_ref(), &info)?,
            "message.updated",
            found.mailbox,
            crate::event_data::MessagePlace {
                folder: Some(found.folder_name),
                previous_folder: None,
                flags: info.flags,
                labels: None,
            },
        );
        let commit = cursor_step(found, Some(info), events);
        self.store.commit_ingest(&commit, None)?;
        self.signal.notify();
        tracing::info!(mailbox = found.mailbox, folder = found.folder_name, uid = found.uid, record = %record_id, "a synced message came back; following it again");
        Ok(true)
    }

    /// The integrations whose smart address a message in the catch-all names
    /// (in To/Cc, or in the envelope the server left), as if they used the
    /// sender's mailbox from the moment the catch-all was connected (R2).
    fn logged_through_catch_all(
        &self,
        message: &Message,
        catch_all: &Integration,
        sender: &str,
    ) -> StoreResult<Vec<Integration>> {
        let mut logged: Vec<Integration> = Vec::new();
        let candidates = message
            .to
            .iter()
            .chain(&message.cc)
            .chain(&message.bcc)
            .map(|a| a.email.as_str())
            .chain(message.envelope_to.iter().map(String::as_str));
        for address in candidates {
            let Some(token) = self.smart.token_in(address) else {
                continue;
            };
            let Some(owner) = self.store.setting(&smart_token_setting(&token))? else {
                continue;
            };
            let owner = String::from_utf8_lossy(&owner).into_owned();
            let Some((location_id, user_id)) = owner.split_once('\0') else {
                continue;
            };
            if !self.smart.is_address_of(address, location_id, user_id)
                || logged
                    .iter()
                    .any(|i| i.location_id == location_id && i.user_id == user_id)
            {
                continue;
            }
            // Only the user's own mail is theirs to log: a contact's
            // reply-all that kept the smart address in Cc is not.
            if !self.sends_as(location_id, user_id, sender)? {
                tracing::info!(
                    location = location_id,
                    user = user_id,
                    "not logged: the sender is none of the user's addresses (R15)"
                );
                continue;
            }
            logged.push(Integration {
                location_id: location_id.to_string(),
                user_id: user_id.to_string(),
                mailbox: sender.to_string(),
                connected_at: catch_all.connected_at,
                // The catch-all's INBOX start stands for the user's Sent.
                baseline: catch_all
                    .baseline
                    .iter()
                    .filter(|(role, _)| *role == FolderRole::Inbox)
                    .map(|(_, start)| (FolderRole::Sent, *start))
                    .collect(),
                smart_bcc_address: self.smart.address(location_id, user_id),
            });
        }
        Ok(logged)
    }

    /// Whether `sender` is one of the user's own addresses: their connected
    /// mailbox, or one the CRM registered for their smart address.
    fn sends_as(&self, location_id: &str, user_id: &str, sender: &str) -> StoreResult<bool> {
        if self
            .store
            .integration(location_id, user_id)?
            .is_some_and(|i| i.mailbox == sender)
        {
            return Ok(true);
        }
        Ok(smart_senders(self.store.as_ref(), location_id, user_id)?
            .iter()
            .any(|s| normalize_email(s) == sender))
    }

    /// Moves the cursor past a message that cannot be handled (logged by the caller).
    /// Moves the cursor past a CRM send's copy in Sent and follows it there
    /// under the send's record id (the `data.id` of its `message.sent`).
    fn follow_crm_send(
        &self,
        found: Found<'_>,
        send: &SendRecord,
        message: &Message,
    ) -> StoreResult<()> {
        // Followed already (a second copy): the first place stays.
        if self.store.locate_record(&send.data.id)?.is_some() {
            return self.skip(found);
        }
        let located = LocatedMessage {
            record_id: send.data.id.clone(),
            // The copy's own: a server that replaced the one the
            // bridge wrote (Exchange) files it under its own.
            message_id: message
                .message_id
                .clone()
                .or_else(|| Some(send.message_id.clone())),
            thread_id: send.thread_id.clone(),
            routes: vec![ThreadRoute {
                location_id: send.location_id.clone(),
                user_id: send.user_id.clone(),
                contact_id: send.contact_id.clone(),
            }],
            flags: found.flags.unwrap_or_default(),
            labels: found.labels.map(<[String]>::to_vec),
        };
        self.store
            .commit_ingest(&cursor_step(found, Some(located), Vec::new()), None)
    }

    pub fn skip(&self, found: Found<'_>) -> StoreResult<()> {
        self.store
            .commit_ingest(&cursor_step(found, None, Vec::new()), None)
    }

    /// Every contact, in the given locations, that has one of the message's addresses.
    fn contacts_for<'l>(
        &self,
        message: &Message,
        locations: impl Iterator<Item = &'l str>,
    ) -> StoreResult<Vec<Contact>> {
        let addresses: BTreeSet<String> = message
            .from
            .iter()
            .chain(&message.to)
            .chain(&message.cc)
            .chain(&message.bcc)
            .map(|a| normalize_email(&a.email))
            .collect();
        let locations: BTreeSet<&str> = locations.collect();
        let mut contacts = Vec::new();
        for location in locations {
            for address in &addresses {
                for contact in self.store.contacts_by_email(location, address)? {
                    if !contacts.iter().any(|c: &Contact| {
                        c.location_id == contact.location_id && c.id == contact.id
                    }) {
                        contacts.push(contact);
                    }
                }
            }
        }
        Ok(contacts)
    }

    fn attachment_links(&self, record_id: &str, message: &Message) -> Vec<AttachmentEventInfo> {
        message
            .attachments
            .iter()
            .map(|a| AttachmentEventInfo {
                index: a.index,
                filename: a.filename.clone(),
                content_type: a.content_type.clone(),
                size: a.size,
                url: format!(
                    "{}/v1/messages/{record_id}/attachments/{}",
                    self.public_url, a.index
                ),
            })
            .collect()
    }
}

/// How a message's commit is made durable.
#[derive(Clone, Copy)]
enum Durability<'a> {
    /// Flushed before the commit returns.
    Now,
    /// With the rest of its batch; its source already written under this
    /// record id, if the batch wrote it ahead.
    WithBatch { written_ahead: Option<&'a str> },
}

/// Parses a fetched message, logging what could not be read of it.
fn parse_logged(found: Found<'_>, raw: &[u8]) -> Message {
    let message = mime::parse(raw);
    for warning in &message.parse_warnings {
        tracing::info!(
            mailbox = found.mailbox,
            uid = found.uid,
            "message partly unreadable: {warning}"
        );
    }
    message
}

/// The messages of one FETCH, handled in UID order and made durable
/// together: one flush for the batch instead of one per message, and the
/// sources of the messages expected to sync written ahead and synced at once.
/// Each message is routed over the commits before it (a reply finds the
/// thread its original opened a moment before). Until `finish` returns, a
/// crash may lose the batch's commits (the messages are fetched again: the
/// cursor is lost with them) and none of its events goes out.
pub struct IngestBatch<'a> {
    ingest: &'a Ingest,
    /// Record ids whose sources were written ahead and that no commit
    /// refers to yet, by UID.
    written_ahead: HashMap<u32, String>,
    /// Whether something may have been committed that is not durable yet.
    needs_flush: bool,
}

impl IngestBatch<'_> {
    /// Handles the message at `found` and moves the folder's cursor past it
    /// (durable once the batch is finished).
    pub fn handle(&mut self, found: Found<'_>, raw: &[u8]) -> StoreResult<Outcome> {
        let message = parse_logged(found, raw);
        // Out of the map while the commit may refer to it: a panic from
        // here on must not make the batch's drop remove a kept source.
        let written_ahead = self.written_ahead.remove(&found.uid);
        let outcome = self.ingest.handle_parsed(
            found,
            &message,
            raw,
            Durability::WithBatch {
                written_ahead: written_ahead.as_deref(),
            },
        );
        // A message passed over moved its cursor only (or was committed
        // durably on its own): it rides on the next flush, as it always did.
        self.needs_flush |= !matches!(outcome, Ok(Outcome::Ignored(_)));
        if !matches!(outcome, Ok(Outcome::Queued { .. }))
            && let Some(record_id) = written_ahead
        {
            self.written_ahead.insert(found.uid, record_id);
        }
        outcome
    }

    /// As `handle`, with a panic contained: it counts as a failed try at
    /// the message (see [`Ingest::failed_try`]), and the batch goes on.
    pub fn handle_contained(&mut self, found: Found<'_>, raw: &[u8]) -> StoreResult<Tried> {
        self.contained(found, raw, |batch| batch.handle(found, raw))
    }

    fn contained(
        &mut self,
        found: Found<'_>,
        raw: &[u8],
        handle: impl FnOnce(&mut Self) -> StoreResult<Outcome>,
    ) -> StoreResult<Tried> {
        let panic = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handle(self))) {
            Ok(outcome) => return outcome.map(Tried::Handled),
            Err(panic) => panic,
        };
        // Something may have been committed before it: flushed with the rest.
        self.needs_flush = true;
        let why =
            crate::panics::payload_text(panic.as_ref()).unwrap_or_else(|| "no message".to_string());
        tracing::error!(
            mailbox = found.mailbox,
            folder = found.folder_name,
            uid = found.uid,
            "handling the message panicked: {why}"
        );
        let message_id = mime::parse_headers_only(raw).message_id;
        self.ingest.failed_try(
            found,
            message_id,
            UnprocessableReason::HandlingFailed,
            format!("handling it panicked: {why}"),
        )
    }

    /// A failed try at the message at `found` (see [`Ingest::failed_try`]).
    pub fn failed_try(
        &mut self,
        found: Found<'_>,
        message_id: Option<String>,
        reason: UnprocessableReason,
        error: String,
    ) -> StoreResult<Tried> {
        self.ingest.failed_try(found, message_id, reason, error)
    }

    /// Passes over the message at `found`: its cursor moves, nothing else
    /// (no flush of its own; see `Ingest::skip`).
    pub fn skip(&mut self, found: Found<'_>) -> StoreResult<()> {
        self.ingest.skip(found)
    }

    /// Makes the batch durable and hands its events to the deliverer. On
    /// an error, dropping the batch asks for another flush.
    pub fn finish(mut self) -> StoreResult<()> {
        self.drop_unused_sources();
        if self.needs_flush {
            self.ingest.store.make_durable()?;
            self.needs_flush = false;
            self.ingest.signal.notify();
        }
        Ok(())
    }

    fn drop_unused_sources(&mut self) {
        for (_, record_id) in self.written_ahead.drain() {
            self.ingest.store.drop_source_written_ahead(&record_id);
        }
    }
}

impl Drop for IngestBatch<'_> {
    /// A batch that ended early (an error, a cancelled watcher): its commits
    /// stand, and a flush makes them durable and delivers their events;
    /// asked for here without waiting for it where there is a runtime.
    fn drop(&mut self) {
        self.drop_unused_sources();
        if !std::mem::take(&mut self.needs_flush) {
            return;
        }
        let store = self.ingest.store.clone();
        let signal = self.ingest.signal.clone();
        let flush = move || match store.make_durable() {
            Ok(()) => signal.notify(),
            Err(err) => tracing::warn!(
                "making an interrupted batch durable failed; the next flush retries: {err:#}"
            ),
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn_blocking(flush);
            }
            Err(_) => flush(),
        }
    }
}

/// A commit that moves `found`'s folder cursor past it, and follows it at
/// its place (`located`) with `events`, touching no thread.
fn cursor_step(
    found: Found<'_>,
    located: Option<LocatedMessage>,
    events: Vec<Event>,
) -> IngestCommit {
    IngestCommit {
        mailbox: found.mailbox.to_string(),
        thread_mailbox: found.mailbox.to_string(),
        folder: found.folder,
        cursor_before: found.cursor,
        cursor: found.cursor_after(Utc::now()),
        thread_keys_seen: vec![],
        answered_seen: vec![],
        thread_seen: None,
        thread: None,
        new_contacts: vec![],
        located: located.map(|entry| (found.uid_validity, found.uid, entry)),
        message_ids: vec![],
        answers: vec![],
        events,
        history: vec![],
        synced: None,
    }
}

/// A synced message's record narrowed to the conversations a change of it
/// still goes to: its thread may have been pinned elsewhere since (R13), or
/// a user's integration moved to another mailbox or was disconnected (R18,
/// R19). What is stored keeps every conversation it was forwarded to.
pub fn still_synced(store: &dyn Store, located: &LocatedMessage) -> StoreResult<LocatedMessage> {
    let thread = store.thread(&located.thread_id)?;
    let integrations = match &thread {
        Some(thread) => store.integrations_of_mailbox(&thread.mailbox)?,
        None => Vec::new(),
    };
    Ok(LocatedMessage {
        routes: crate::routing::r13_r18_still_synced(
            &located.routes,
            thread.as_ref(),
            &integrations,
        ),
        ..located.clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{kv_store::SledStore, secret_box::SecretBox};

    const ME: &str = "me@x.test";

    fn connected_store(dir: &std::path::Path) -> Arc<dyn Store> {
        let store: Arc<dyn Store> =
            Arc::new(SledStore::open(dir, SecretBox::from_key(&[1; 32])).unwrap());
        let mailbox = crate::store::suite::mailbox(ME);
        let integration = Integration {
            location_id: "L1".into(),
            user_id: "u1".into(),
            mailbox: ME.into(),
            connected_at: Utc::now(),
            baseline: vec![],
            smart_bcc_address: "x@bcc".into(),
        };
        store
            .connect(
                &mailbox,
                &integration,
                &[(FolderRole::Inbox, FolderCursor::new(1, 1))],
                &[],
                &[],
            )
            .unwrap();
        store
    }

    fn found(uid: u32) -> Found<'static> {
        Found {
            mailbox: ME,
            folder: FolderRole::Inbox,
            uid_validity: 1,
            uid,
            cursor: FolderCursor::new(1, uid),
            flags: None,
            labels: None,
            folder_name: "INBOX",
            received_at: None,
        }
    }

    /// Issue 21 item 6: a message whose handling panics is retried (a new
    /// session each time) until the tries reach `SET_ASIDE_AFTER_TRIES`;
    /// then it is set aside: listed, reported once as
    /// `message.unprocessable` with its folder, UID, Message-ID and why, and
    /// the folder goes on with the next message.
    #[test]
    fn a_message_whose_handling_panics_is_set_aside_after_repeated_tries() {
        let dir = tempfile::tempdir().unwrap();
        let store = connected_store(dir.path());
        let smart = SmartAddresses::new("bcc-{token}@x.test", [3; 32]).unwrap();
        let ingest = Ingest::new(store.clone(), OutboxSignal::default(), "http://x", smart);
        let raw = b"Message-ID: <broken@x.test>\r\nFrom: ann@x.test\r\nTo: me@x.test\r\nSubject: boom\r\n\r\nbody\r\n";
        for attempt in 1..=SET_ASIDE_AFTER_TRIES {
            let mut batch = ingest.batch(&[]).unwrap();
            let tried = batch
                .contained(found(1), raw, |_| {
                    panic!("a handler that panics on purpose")
                })
                .unwrap();
            batch.finish().unwrap();
            if attempt < SET_ASIDE_AFTER_TRIES {
                assert!(
                    matches!(tried, Tried::Retry { attempts, .. } if attempts == attempt),
                    "{tried:?}"
                );
                assert!(store.set_aside_messages(ME).unwrap().is_empty());
            } else {
                assert_eq!(tried, Tried::SetAside);
            }
        }

        let listed = store.set_aside_messages(ME).unwrap();
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0].uid, 1);
        assert_eq!(listed[0].folder_name, "INBOX");
        assert_eq!(listed[0].reason, UnprocessableReason::HandlingFailed);
        assert_eq!(listed[0].attempts, SET_ASIDE_AFTER_TRIES);
        assert!(
            listed[0].error.contains("on purpose"),
            "{}",
            listed[0].error
        );
        let events: Vec<Event> = store
            .outbox_page(None, 100)
            .unwrap()
            .into_iter()
            .map(|(_, entry)| entry.event)
            .filter(|event| event.kind == "message.unprocessable")
            .collect();
        assert_eq!(events.len(), 1, "{events:?}");
        let data = &events[0].data;
        assert_eq!(data["folder"], "INBOX");
        assert_eq!(data["uid"], 1);
        assert_eq!(data["message_id"], listed[0].message_id.as_deref().unwrap());
        assert!(
            data["message_id"]
                .as_str()
                .unwrap()
                .contains("broken@x.test")
        );
        assert_eq!(data["reason"], "handling_failed");
        assert_eq!(
            (&data["location_id"], &data["user_id"]),
            (&"L1".into(), &"u1".into())
        );

        // The folder goes on: the next message is handled from the moved cursor.
        let mut batch = ingest.batch(&[]).unwrap();
        let next = b"Message-ID: <next@x.test>\r\nFrom: ann@x.test\r\nTo: me@x.test\r\nSubject: fine\r\n\r\nbody\r\n";
        let tried = batch.handle_contained(found(2), next).unwrap();
        assert!(matches!(tried, Tried::Handled(_)), "{tried:?}");
        batch.finish().unwrap();
    }
}
