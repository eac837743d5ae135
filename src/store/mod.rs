//! Everything the bridge must remember, behind one narrow trait. The sled engine
//! lives in [`kv_store`]; the trait's test suite in [`suite`] runs against it.
//!
//! Durability contract: when a method that changes state returns `Ok`, the change
//! is on disk (flushed). Callers acknowledge to the outside world only after that.

use serde::{Deserialize, Serialize};

use crate::model::{
    Contact, Credentials, Event, FlagState, FolderCursor, FolderRole, Integration, LocatedMessage,
    Mailbox, MailboxChange, MessageEventData, MessageLocation, SendRecord, Thread,
    UnprocessableMessage,
};

pub mod engine;
pub mod group_flush;
pub mod kv_store;
pub mod message_files;
pub mod migrate;
mod outbox_index;
pub mod retention;
pub mod secret_box;
mod sled_durability;
mod source_segments;
#[cfg(test)]
pub(crate) mod suite;

pub use kv_store::SledStore;
pub use message_files::{SourceCopy, write_durably};
pub use retention::{Retention, SweepReport};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage engine: {0}")]
    Engine(String),
    #[error("stored record unreadable: {0}")]
    Corrupt(String),
    #[error("file storage: {0}")]
    Io(#[from] std::io::Error),
    #[error("credentials cannot be decrypted with the configured key")]
    Decrypt,
    /// `commit_ingest`: an integration received this message meanwhile
    /// (another folder's watcher committed it first). Nothing was stored.
    #[error("the message was already forwarded to an integration")]
    AlreadySynced,
    /// A thread the change was computed from was changed meanwhile (an
    /// ingest and a CRM send on one conversation): nothing was stored; read
    /// it again and redo the change.
    #[error("the thread changed meanwhile")]
    ThreadChanged,
    /// A contact the commit creates (Auto BCC) exists meanwhile: nothing
    /// was stored; route again with it known.
    #[error("a contact to create exists meanwhile")]
    DirectoryChanged,
    /// The folder's cursor is not where the writer left it: another sync of
    /// the folder moved it, or the mailbox was disconnected. Nothing was
    /// stored; the writer is stale and stops.
    #[error("the folder's cursor moved meanwhile (mailbox disconnected or synced elsewhere)")]
    CursorMoved,
    /// `connect`: other integrations use this mailbox with another login or
    /// at other servers; nothing was stored (one integration cannot move
    /// the others' mail).
    #[error("the mailbox is connected by other integrations with another login or servers")]
    MailboxInUse,
}

pub type StoreResult<T> = Result<T, StoreError>;

/// One message's effect, committed atomically: where the folder's cursor moves,
/// the thread it joins or starts, and the events it produces. Either all of it
/// is stored or none, so a crash re-handles the message, never loses or doubles it.
#[derive(Clone, Debug)]
pub struct IngestCommit {
    pub mailbox: String,
    /// Whose thread index the thread and message ids go to: the mailbox's
    /// own, or for the Auto BCC catch-all, the sender's.
    pub thread_mailbox: String,
    pub folder: FolderRole,
    /// Where the cursor stood when the message was read (compared by
    /// UIDVALIDITY and next UID): a stale watcher never moves it.
    pub cursor_before: FolderCursor,
    pub cursor: FolderCursor,
    /// The thread keys looked up, and the thread they led to then: the
    /// routing decision holds only if they still lead there.
    pub thread_keys_seen: Vec<String>,
    /// The ids looked up after `thread_keys_seen` among the messages
    /// answered by a synced thread (`Store::thread_answering`).
    pub answered_seen: Vec<String>,
    pub thread_seen: Option<Thread>,
    pub thread: Option<Thread>,
    /// Contacts Auto BCC creates (R15); none may exist yet.
    pub new_contacts: Vec<Contact>,
    /// Message ids to file under `thread` in the thread index.
    pub message_ids: Vec<String>,
    /// The ids of messages this one answers, to file under `thread` as
    /// answered by it, where no other thread answered them first.
    pub answers: Vec<String>,
    pub events: Vec<Event>,
    /// History entries (one per conversation the message lands in).
    pub history: Vec<MessageEventData>,
    /// The message's identity (see `Store::synced_to`) and the integrations
    /// (location, user) that now have it.
    pub synced: Option<(String, Vec<(String, String)>)>,
    /// Where the mailbox keeps the synced message (UIDVALIDITY, UID), for
    /// its later flag changes.
    pub located: Option<(u32, u32, LocatedMessage)>,
}

/// The source a deferred ingest commit keeps, as the filed copy under the
/// record id of its history entries.
#[derive(Clone, Copy, Debug)]
pub enum KeptSource<'a> {
    /// None: the message is not synced, or its source is not kept.
    Nothing,
    /// Already on disk: written ahead by `Store::write_sources_ahead`.
    WrittenAhead,
    /// Written, and synced to disk, before the commit that refers to it.
    Write(&'a [u8]),
}

/// A synced message's change seen in the mailbox, with the events it causes.
#[derive(Clone, Debug)]
pub struct LocatedChange {
    pub uid_validity: u32,
    pub uid: u32,
    /// The flags the change was judged against. A flag update whose message
    /// no longer has them stored (a CRM change was queued meanwhile) is
    /// dropped with its events; the next look judges it again.
    pub flags_before: FlagState,
    /// The new flags, or None: gone from the folder.
    pub flags_after: Option<FlagState>,
    /// The new Gmail labels, where the server has them.
    pub labels_after: Option<Vec<String>>,
    /// Gone to another watched folder of the same mailbox (role,
    /// UIDVALIDITY, UID): followed there from now on.
    pub moved_to: Option<(FolderRole, u32, u32)>,
    pub events: Vec<Event>,
}

/// A CRM send to accept: its record, its two copies, and the thread it
/// starts or pins (R12, R13) with the `thread.detached` events that pin causes.
pub struct NewSend<'a> {
    pub record: &'a SendRecord,
    /// As handed to the SMTP server.
    pub submitted: &'a [u8],
    /// As filed in Sent and served by `/raw` (with Bcc).
    pub filed: &'a [u8],
    pub thread: &'a Thread,
    /// The thread as it was read (None for a new one): accepted only if unchanged.
    pub thread_before: Option<&'a Thread>,
    pub events: &'a [Event],
}

/// A contact as the CRM gives it.
#[derive(Clone, Debug)]
pub struct ContactUpsert {
    pub contact: Contact,
    /// The CRM named the creation time. When it did not, a stored contact
    /// keeps its own (R10: which duplicate wins must not flip on an
    /// update), and a new one takes `contact.created_at`.
    pub created_at_given: bool,
}

impl From<Contact> for ContactUpsert {
    fn from(contact: Contact) -> Self {
        Self {
            contact,
            created_at_given: true,
        }
    }
}

/// What became of a send the CRM asked for.
#[derive(Clone, Debug, PartialEq)]
pub enum SendAcceptance {
    Accepted,
    /// The same idempotency key was used within 48 hours: the first send's record.
    Repeat(Box<SendRecord>),
    /// The mailbox's rolling 24-hour limit is reached until this time (unix ms).
    LimitReached {
        retry_at_ms: i64,
        limit: u32,
    },
}

/// How long an idempotency key is remembered.
pub const IDEMPOTENCY_WINDOW_MS: i64 = 48 * 3600 * 1000;
/// The sending limit's rolling window.
pub const QUOTA_WINDOW_MS: i64 = 24 * 3600 * 1000;

/// An event in the outbox, with its delivery progress.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutboxEntry {
    pub event: Event,
    pub attempts: u32,
    /// Unix milliseconds before which no new attempt is made.
    pub next_attempt_ms: i64,
    /// When the first attempt failed (unix ms): the give-up clock starts
    /// there, not at the event's creation.
    #[serde(default)]
    pub first_failed_ms: Option<i64>,
    /// Webhook URLs that already acknowledged the event.
    pub delivered_to: Vec<String>,
    pub last_error: Option<String>,
}

impl OutboxEntry {
    pub fn new(event: Event) -> Self {
        Self {
            event,
            attempts: 0,
            next_attempt_ms: 0,
            first_failed_ms: None,
            delivered_to: Vec::new(),
            last_error: None,
        }
    }
}

/// An event set aside: it failed for too long, or its stored form could not
/// be read. Kept for an operator to inspect and replay.
#[derive(Clone, Debug, PartialEq)]
pub struct DeadLetter {
    pub id: u64,
    /// None when the stored entry was unreadable (`reason` says why).
    pub entry: Option<OutboxEntry>,
    pub reason: String,
    pub buried_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// What an operator's listing shows of a mailbox.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct MailboxSummary {
    pub address: String,
    pub provider: crate::model::Provider,
    pub state: crate::model::MailboxState,
    #[serde(default)]
    pub last_error: Option<String>,
}

/// What the deliverer can start now.
#[derive(Debug, Default)]
pub struct OutboxDue {
    /// (sequence, entry), soonest due first.
    pub entries: Vec<(u64, OutboxEntry)>,
    /// When the next entry not returned falls due, if any is waiting.
    pub next_due_ms: Option<i64>,
    /// Entries pending in all.
    pub pending: usize,
}

/// What became of a request to replay a dead letter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replay {
    /// Back in the outbox, at its end, with a fresh retry budget.
    Requeued,
    /// Its entry was unreadable: nothing to send.
    Unreadable,
    NotFound,
}

/// Outcome of removing an integration.
#[derive(Clone, Debug, PartialEq)]
pub struct Disconnected {
    pub integration: Integration,
    /// No integration uses the mailbox any more: its credentials and cursors are gone.
    pub mailbox_released: bool,
}

pub trait Store: Send + Sync + 'static {
    // --- the CRM's directory
    /// Upserts contacts (the bulk path; one contact is a slice of one), one
    /// upsert at a time, so concurrent ones never lose an address from the
    /// index. Returns them as stored.
    fn put_contacts(&self, upserts: &[ContactUpsert]) -> StoreResult<Vec<Contact>>;
    fn contact(&self, location_id: &str, contact_id: &str) -> StoreResult<Option<Contact>>;
    /// Returns whether the contact existed.
    fn delete_contact(&self, location_id: &str, contact_id: &str) -> StoreResult<bool>;
    /// Contacts of a location with this (normalized) address.
    fn contacts_by_email(&self, location_id: &str, email: &str) -> StoreResult<Vec<Contact>>;

    // --- mailboxes and integrations
    /// Stores the mailbox (numbering this connect in its `generation`) and
    /// the integration, seeds each folder cursor that does
    /// not exist yet, records `failed_sends` (each with its `message.failed`,
    /// for those still queued) and queues `events`, all at once.
    /// When the integration pointed at another mailbox ("update email", R18)
    /// and nothing else uses that one, it is released too; its address is returned.
    fn connect(
        &self,
        mailbox: &Mailbox,
        integration: &Integration,
        cursors: &[(FolderRole, FolderCursor)],
        failed_sends: &[(SendRecord, Event)],
        events: &[Event],
    ) -> StoreResult<Option<String>>;
    /// Every synced thread of a mailbox.
    fn threads_of_mailbox(&self, mailbox: &str) -> StoreResult<Vec<Thread>>;
    /// Removes an integration (queueing `events`); when it was the mailbox's
    /// last, forgets the mailbox's credentials and cursors too.
    fn disconnect(
        &self,
        location_id: &str,
        user_id: &str,
        events: &[Event],
    ) -> StoreResult<Option<Disconnected>>;
    fn mailbox(&self, address: &str) -> StoreResult<Option<Mailbox>>;
    fn mailboxes(&self) -> StoreResult<Vec<Mailbox>>;
    /// Up to `limit` mailboxes that `keep` accepts, in address order, after
    /// the address `after`: a page of an operator's listing. No credentials
    /// are opened for it.
    fn mailbox_summaries_after(
        &self,
        after: Option<&str>,
        limit: usize,
        keep: &mut dyn FnMut(&MailboxSummary) -> bool,
    ) -> StoreResult<Vec<MailboxSummary>>;
    /// R20: turns the mailbox `needs_reauth` with `reason` and queues `events`,
    /// at once, if its credentials are still the `refused` ones. Returns false,
    /// queueing nothing, when it already was or has newer credentials.
    fn mark_needs_reauth(
        &self,
        address: &str,
        refused: &Credentials,
        reason: &str,
        events: &[Event],
    ) -> StoreResult<bool>;
    /// Replaces a mailbox's credentials (a refreshed token) only if they are
    /// still `expected`, so a refresh never undoes newer ones from a connect.
    fn replace_credentials(
        &self,
        address: &str,
        expected: &Credentials,
        new: &Credentials,
    ) -> StoreResult<bool>;
    fn integration(&self, location_id: &str, user_id: &str) -> StoreResult<Option<Integration>>;
    fn integrations_of_mailbox(&self, address: &str) -> StoreResult<Vec<Integration>>;

    // --- sync state
    fn cursor(&self, mailbox: &str, folder: FolderRole) -> StoreResult<Option<FolderCursor>>;
    /// Moves a folder's cursor if it still stands at `expected` (UIDVALIDITY
    /// and next UID), or, with `None`, places the first one while the
    /// mailbox is connected. Otherwise `StoreError::CursorMoved`.
    fn set_cursor(
        &self,
        mailbox: &str,
        folder: FolderRole,
        expected: Option<FolderCursor>,
        cursor: FolderCursor,
    ) -> StoreResult<()>;
    /// The synced thread that one of these message ids belongs to, trying them in order.
    fn thread_of(&self, mailbox: &str, message_ids: &[String]) -> StoreResult<Option<Thread>>;
    /// The synced thread of a message that answers one of these (filed by
    /// `IngestCommit::answers`), trying them in order: for an original read
    /// after its reply, or a second reply to it.
    fn thread_answering(
        &self,
        mailbox: &str,
        message_ids: &[String],
    ) -> StoreResult<Option<Thread>>;
    /// Commits a message's effect, its `source` (kept as the filed copy of
    /// the history record) written first. Checks the cursor and thread the
    /// commit was computed from (`StoreError::CursorMoved`, `ThreadChanged`)
    /// and the synced set (`AlreadySynced`); on any of them nothing is kept.
    fn commit_ingest(&self, commit: &IngestCommit, source: Option<&[u8]>) -> StoreResult<()>;
    /// `commit_ingest` without its flush: the commit is visible to reads at
    /// once, but may be lost to a crash, and its events are not handed to
    /// the deliverer, until the next flush (`make_durable`, or any other
    /// commit's) has run. A catch-up batch commits its messages this way, each routed over the ones before it, and makes
    /// them durable together: one flush for the batch, not one per message.
    fn commit_ingest_deferred(
        &self,
        commit: &IngestCommit,
        source: KeptSource<'_>,
    ) -> StoreResult<()>;
    /// Makes every commit so far durable, then hands the deferred commits'
    /// events to the deliverer.
    fn make_durable(&self) -> StoreResult<()>;
    /// Writes, as filed copies under these record ids, the sources of
    /// messages a batch expects to sync, and makes them durable together
    /// (one sync for the batch, not two per message). A source written ahead
    /// that no commit comes to refer to is removed with
    /// `drop_source_written_ahead` (or, should the process stop first, by age).
    fn write_sources_ahead(&self, sources: &[(&str, &[u8])]) -> StoreResult<()>;
    /// Removes a source written ahead that no commit refers to.
    fn drop_source_written_ahead(&self, record_id: &str);
    /// Of `integrations` (location, user), those that already received the
    /// message with this identity (see `ingest::message_identity`), wherever
    /// and under whatever UID it was found: a message moved out and back, or
    /// filed twice, is not forwarded again (R21). Forgotten on disconnect.
    fn synced_to(
        &self,
        identity: &str,
        integrations: &[(String, String)],
    ) -> StoreResult<Vec<(String, String)>>;
    /// A synced message by where the mailbox keeps it.
    fn located(
        &self,
        mailbox: &str,
        folder: FolderRole,
        uid_validity: u32,
        uid: u32,
    ) -> StoreResult<Option<LocatedMessage>>;
    /// Where the mailbox keeps the synced message with this record id (the
    /// `data.id` of its message events), and what is known of it.
    fn locate_record(
        &self,
        record_id: &str,
    ) -> StoreResult<Option<(MessageLocation, LocatedMessage)>>;
    /// Queues a change the CRM asked for and records its outcome as already
    /// known (the new flags, or for a move to Trash, the message as gone), so
    /// the watcher does not report it back. False, queueing nothing, if the
    /// message is no longer where `change.location` says.
    fn queue_mailbox_change(&self, change: &MailboxChange) -> StoreResult<bool>;
    /// A move to Trash that could not be made: the message is followed
    /// again where it still is.
    fn restore_location(&self, change: &MailboxChange) -> StoreResult<()>;
    /// Every queued change, oldest first.
    fn mailbox_changes(&self) -> StoreResult<Vec<(u64, MailboxChange)>>;
    /// Stores a queued change's progress, or with None removes it (made, or given up).
    fn update_mailbox_change(
        &self,
        sequence: u64,
        change: Option<&MailboxChange>,
    ) -> StoreResult<()>;
    /// Counts one more failed try at a message of a watched folder (keyed by
    /// mailbox, folder, UIDVALIDITY and UID; `failed.attempts` is ignored),
    /// durably; returns the record with every try counted so far.
    fn count_failed_try(&self, failed: &UnprocessableMessage) -> StoreResult<UnprocessableMessage>;
    /// Sets a message aside: `record` (with `set_aside_at`) is kept for the
    /// operator's list, and `commit` moves the folder's cursor past the
    /// message with its events, durably. Nothing is kept if the commit fails.
    fn set_aside(&self, record: &UnprocessableMessage, commit: &IngestCommit) -> StoreResult<()>;
    /// The messages of a mailbox set aside, by folder and UID.
    fn set_aside_messages(&self, mailbox: &str) -> StoreResult<Vec<UnprocessableMessage>>;
    /// What is known of a synced message by its record id, wherever it is
    /// now (kept when it leaves its folder, so it can be found again).
    fn record_info(&self, record_id: &str) -> StoreResult<Option<LocatedMessage>>;
    /// The record id under which one of `integrations` received the message
    /// with this identity (see `synced_to`).
    fn synced_record(
        &self,
        identity: &str,
        integrations: &[(String, String)],
    ) -> StoreResult<Option<String>>;
    /// The synced messages of a folder whose UIDs lie in `uids`, in UID
    /// order; at most the `latest` highest of them.
    fn located_in(
        &self,
        mailbox: &str,
        folder: FolderRole,
        uid_validity: u32,
        uids: std::ops::RangeInclusive<u32>,
        latest: usize,
    ) -> StoreResult<Vec<(u32, LocatedMessage)>>;
    /// Records the changes of synced messages (UIDVALIDITY, UID, new flags,
    /// or None: gone from the folder) with their `message.updated` /
    /// `message.deleted` events, and moves the folder's HIGHESTMODSEQ to
    /// `highest_modseq`, at once: only if the cursor still stands at
    /// `cursor_before`, else `StoreError::CursorMoved`. The rest of the
    /// cursor stays as stored.
    fn commit_flag_changes(
        &self,
        mailbox: &str,
        folder: FolderRole,
        cursor_before: FolderCursor,
        highest_modseq: Option<u64>,
        changes: &[LocatedChange],
    ) -> StoreResult<()>;

    // --- the webhook outbox, in enqueue order
    fn enqueue(&self, events: &[Event]) -> StoreResult<()>;
    /// Up to `limit` entries after sequence number `after`, oldest first. An
    /// entry that cannot be read is moved to the dead letters with the reason,
    /// so it never holds up the rest. The deliverer reads `outbox_due`; this
    /// is for the suite to look at the outbox as stored.
    #[cfg(test)]
    fn outbox_page(&self, after: Option<u64>, limit: usize)
    -> StoreResult<Vec<(u64, OutboxEntry)>>;
    fn update_outbox(&self, sequence: u64, entry: &OutboxEntry) -> StoreResult<()>;
    /// Removes a delivered entry.
    fn complete_outbox(&self, sequence: u64) -> StoreResult<()>;
    /// Moves an entry that will not be retried any more aside, for an operator to inspect.
    fn bury_outbox(&self, sequence: u64, entry: &OutboxEntry) -> StoreResult<()>;
    /// Entries pending delivery (O(1)).
    fn outbox_len(&self) -> StoreResult<usize>;
    /// Up to `limit` entries deliverable by `now_ms`: the oldest pending
    /// entry of each ordering key, if its next attempt is due and
    /// `in_flight` does not name it; and when the next one falls due. Costs
    /// what it returns, however long the outbox.
    fn outbox_due(
        &self,
        now_ms: i64,
        limit: usize,
        in_flight: &dyn Fn(u64) -> bool,
    ) -> StoreResult<OutboxDue>;
    /// Dead letters after id `after`, oldest first.
    fn dead_letters(&self, after: Option<u64>, limit: usize) -> StoreResult<Vec<DeadLetter>>;
    /// Puts a dead letter back at the end of the outbox.
    fn replay_dead_letter(&self, id: u64) -> StoreResult<Replay>;
    /// Removes a dead letter for good; false when there is none by that id.
    fn delete_dead_letter(&self, id: u64) -> StoreResult<bool>;

    // --- CRM sends (R5, R14, R21)
    /// Checks the idempotency key and the mailbox's daily limit and, when both
    /// allow, records the send (queued) with its copies, its quota use, its
    /// idempotency key, its thread (so a reply threads before the message
    /// even leaves) and its events, at once. `StoreError::ThreadChanged`
    /// when the thread is no longer `thread_before`.
    fn accept_send(
        &self,
        send: &NewSend<'_>,
        daily_limit: Option<u32>,
        now_ms: i64,
    ) -> StoreResult<SendAcceptance>;
    fn send(&self, id: &str) -> StoreResult<Option<SendRecord>>;
    /// Stores a send's new state and queues `events` with it. A send that
    /// failed for good gives its quota back; one that can no longer be
    /// submitted (sent or failed) loses its submission copy.
    fn update_send(&self, send: &SendRecord, events: &[Event]) -> StoreResult<()>;
    /// Records a queued send as `submitting`, if it is still queued and its
    /// integration still sends from its mailbox; otherwise changes nothing
    /// and returns false. Serialized with `connect`, which fails the sends an
    /// "update email" leaves behind.
    fn claim_send(&self, send: &SendRecord) -> StoreResult<bool>;
    /// Sends not yet settled (queued, submitting, or sent with their copy
    /// still to be filed in Sent), oldest first.
    fn unsettled_sends(&self) -> StoreResult<Vec<SendRecord>>;
    /// Whether the CRM sent this Message-ID from this mailbox.
    fn is_crm_message(&self, mailbox: &str, message_id: &str) -> StoreResult<bool> {
        Ok(self.crm_send_of(mailbox, message_id)?.is_some())
    }
    /// The id of the CRM send that has this Message-ID in this mailbox.
    fn crm_send_of(&self, mailbox: &str, message_id: &str) -> StoreResult<Option<String>>;
    /// Sends through the mailbox in the 24 hours before `now_ms`, and when the oldest of them ages out.
    fn quota_use(&self, mailbox: &str, now_ms: i64) -> StoreResult<(u32, Option<i64>)>;
    fn thread(&self, thread_id: &str) -> StoreResult<Option<Thread>>;

    // --- synced history
    /// A contact's synced messages, newest first, before `before_ms` (unix ms).
    fn history(
        &self,
        location_id: &str,
        contact_id: &str,
        before_ms: Option<i64>,
        limit: usize,
    ) -> StoreResult<Vec<MessageEventData>>;
    /// A copy of a synced or sent message's source, if it is (still) kept.
    fn message_source(&self, record_id: &str, copy: SourceCopy) -> StoreResult<Option<Vec<u8>>>;
    /// Removes filed sources older than `older_than` (not the copies of
    /// sends still to be submitted); returns how many.
    fn prune_message_sources(&self, older_than: std::time::Duration) -> StoreResult<usize>;
    /// One retention pass as of `now_ms` (see `retention`): removes what
    /// its rules let go, at most `retention.batch` items of each kind, and
    /// never a record something still refers to.
    fn sweep(&self, now_ms: i64, retention: &Retention) -> StoreResult<SweepReport>;

    // --- small settings (the generated API key's hash, …)
    fn setting(&self, name: &str) -> StoreResult<Option<Vec<u8>>>;
    fn put_setting(&self, name: &str, value: &[u8]) -> StoreResult<()>;
    /// Every setting whose name starts with `prefix`.
    fn settings_with_prefix(&self, prefix: &str) -> StoreResult<Vec<(String, Vec<u8>)>>;
    /// Removes a setting and returns what it held: of two takers, one gets it.
    fn take_setting(&self, name: &str) -> StoreResult<Option<Vec<u8>>>;
    /// A random 32-byte key kept encrypted under `name`, made on first use.
    fn secret_key(&self, name: &str) -> StoreResult<[u8; 32]>;
}
