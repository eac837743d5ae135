//! The [`Store`] over any [`Engine`]: every rule of the store (what is
//! checked, what is written together, what a sweep may remove) is written
//! here once, and an engine only keeps bytes in named trees. Keys join their
//! parts with a NUL byte (the API refuses ids that contain control
//! characters). Large event bodies live in files beside the database, because
//! sled leaks space when big values churn.

use std::ops::Bound;
use std::path::{Path, PathBuf};

use serde::{Serialize, de::DeserializeOwned};

use super::{
    ContactUpsert, DeadLetter, Disconnected, IDEMPOTENCY_WINDOW_MS, IngestCommit, KeptSource,
    LocatedChange, MailboxSummary, NewSend, OutboxDue, OutboxEntry, QUOTA_WINDOW_MS, Replay,
    SendAcceptance, SourceCopy, Store, StoreError, StoreResult,
    engine::{Direction, Engine, SledEngine, Tree, Tx, TxError, TxResult, prefix_end},
    message_files::MessageFiles,
    outbox_index::OutboxIndex,
    secret_box::SecretBox,
    source_segments::{SourcePlace, SourceSegments},
};
use crate::model::{
    Contact, Credentials, Event, FolderCursor, FolderRole, Integration, LocatedMessage, Mailbox,
    MailboxChange, MailboxState, MessageEventData, MessageLocation, SendRecord, SendStatus, Thread,
    UnprocessableMessage,
};

mod sweep;

/// A dead letter in either stored form; never fails (an unreadable one says so).
fn read_dead_letter<E: Engine>(id: u64, value: &[u8], store: &KvStore<E>) -> DeadLetter {
    if let Ok(stored) = decode::<StoredDeadLetter>(value) {
        return DeadLetter {
            id,
            entry: stored.entry,
            reason: stored.reason,
            buried_at: Some(stored.buried_at),
        };
    }
    match store.load_entry(value) {
        Ok(entry) => DeadLetter {
            id,
            reason: entry
                .last_error
                .clone()
                .unwrap_or_else(|| "set aside".into()),
            entry: Some(entry),
            buried_at: None,
        },
        Err(err) => DeadLetter {
            id,
            entry: None,
            reason: format!("unreadable: {err}"),
            buried_at: None,
        },
    }
}

/// Event data above this size is kept in a file instead of in the engine.
const INLINE_EVENT_LIMIT: usize = 32 * 1024;

/// The store over the engine `E`. The trees it uses, by [`Tree`]:
/// `UnsettledSends` holds the sends not yet sent or failed, in acceptance
/// order (key → send id); `Synced`, location \0 user \0 identity → message
/// record id; `Located`, mailbox \0 folder \0 UIDVALIDITY UID (big-endian) →
/// LocatedMessage; `RecordLocations`, record id → MessageLocation of a
/// located message; `RecordInfo`, record id → LocatedMessage, kept when it
/// leaves its folder; `MailboxChanges`, the CRM's changes to make in
/// mailboxes, in order (sequence → MailboxChange); `Unprocessable`, keyed as
/// `Located` → UnprocessableMessage: failed tries at a message, and those set
/// aside; `SourcePlaces`, record id → SourcePlace of its filed copy in
/// `segments`.
pub struct KvStore<E: Engine> {
    engine: E,
    secrets: SecretBox,
    /// Sources kept as files of their own: CRM sends (both copies), and
    /// synced messages' filed copies from before `segments`.
    sources: MessageFiles,
    /// Synced messages' filed copies, appended to segment files.
    segments: std::sync::Arc<SourceSegments>,
    bodies: PathBuf,
    /// Connect and disconnect read the mailbox's other integrations before they
    /// write; one at a time keeps that read true.
    lifecycle: std::sync::Arc<std::sync::Mutex<()>>,
    /// Contact upserts, one at a time (see `put_contacts`).
    directory: std::sync::Arc<std::sync::Mutex<()>>,
    /// What is deliverable when (see `outbox_index`).
    outbox_index: std::sync::Arc<std::sync::Mutex<OutboxIndex>>,
    group_flush: std::sync::Arc<super::group_flush::GroupFlush>,
    /// Outbox entries of deferred commits, handed to the index by the first
    /// flush that covers them (see `flush`).
    undelivered_until_flushed: std::sync::Arc<std::sync::Mutex<Vec<PreparedEntry>>>,
}

/// A located change ready to commit: its key, the change, its events' outbox
/// values, and where it moved to (its key and location), if to a watched folder.
type PreparedChange<'c> = (
    Vec<u8>,
    &'c LocatedChange,
    Vec<PreparedEntry>,
    Option<(Vec<u8>, Vec<u8>)>,
);

/// An outbox entry ready to insert: its sequence (taken before the
/// transaction, so the index learns it after the commit), its value, and
/// what the index keeps of it.
/// A send to record: answered without writing anything (a repeat, the
/// daily limit), or committed, with what its flush said.
enum RecordedSend {
    Refused(SendAcceptance),
    Committed(StoreResult<()>),
}

#[derive(Clone)]
struct PreparedEntry {
    sequence: u64,
    value: Vec<u8>,
    ordering_key: String,
    due_ms: i64,
}

/// A contact ready to insert: its key, its value, its address index keys.
type ContactRecord = (Vec<u8>, Vec<u8>, Vec<Vec<u8>>);

/// The layout this build writes. 2: synced messages' sources in segment
/// files, outbox events that refer to their history record, history keys
/// that name the user (unmarked data is 1, and is read as it is).
const STORE_FORMAT: u64 = 2;
const STORE_FORMAT_KEY: &str = "\u{0}store-format";

/// The store on sled, as the daemon runs it.
pub type SledStore = KvStore<SledEngine>;

fn encode<T: Serialize>(value: &T) -> StoreResult<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> StoreResult<T> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn key(parts: &[&str]) -> Vec<u8> {
    parts.join("\0").into_bytes()
}

/// Where the thread index files a message answered by a synced thread
/// (beside the index's own `mailbox\0message id` keys; no mailbox address
/// starts with \x01).
fn answered_key(mailbox: &str, message_id: &str) -> Vec<u8> {
    key(&["\u{1}answered", mailbox, message_id])
}

fn prefix(parts: &[&str]) -> Vec<u8> {
    let mut k = key(parts);
    k.push(0);
    k
}

/// The bounds of the keys that start with `prefix`, for a range read.
fn prefix_bounds(prefix: &[u8]) -> (Bound<Vec<u8>>, Bound<Vec<u8>>) {
    (
        Bound::Included(prefix.to_vec()),
        prefix_end(prefix).map_or(Bound::Unbounded, Bound::Excluded),
    )
}

/// The keys of `entries`, errors kept.
fn keys(entries: super::engine::Entries<'_>) -> impl Iterator<Item = StoreResult<Vec<u8>>> + '_ {
    entries.map(|entry| entry.map(|(k, _)| k))
}

/// The values of `entries`, errors kept.
fn values(entries: super::engine::Entries<'_>) -> impl Iterator<Item = StoreResult<Vec<u8>>> + '_ {
    entries.map(|entry| entry.map(|(_, v)| v))
}

/// `parts…\0<time, big-endian>\0suffix`: keys that sort by time within a prefix.
fn timed_key(parts: &[&str], time_ms: i64, suffix: &str) -> Vec<u8> {
    let mut k = prefix(parts);
    k.extend_from_slice(&(time_ms.max(0) as u64).to_be_bytes());
    k.push(0);
    k.extend_from_slice(suffix.as_bytes());
    k
}

fn time_of_timed_key(key: &[u8], prefix_len: usize) -> Option<i64> {
    let bytes: [u8; 8] = key.get(prefix_len..prefix_len + 8)?.try_into().ok()?;
    i64::try_from(u64::from_be_bytes(bytes)).ok()
}

/// One per delivery: two users of one location who both get a message from
/// the same contact have a record each (the user is in the key).
fn history_key(data: &MessageEventData, time_ms: i64) -> Vec<u8> {
    let record = format!("{}\0{}", data.id, data.user_id);
    timed_key(&[&data.location_id, &data.contact_id], time_ms, &record)
}

/// Acceptance order first (send ids are time-ordered too; this makes it explicit).
fn unsettled_key(send: &SendRecord) -> Vec<u8> {
    timed_key(&[], send.created_at.timestamp_millis(), &send.id)
}

#[derive(serde::Serialize, serde::Deserialize)]
struct IdempotencyEntry {
    send_id: String,
    created_ms: i64,
}

fn cursor_key(mailbox: &str, folder: FolderRole) -> Vec<u8> {
    key(&[mailbox, &folder.key()])
}

fn located_key(mailbox: &str, folder: FolderRole, uid_validity: u32, uid: u32) -> Vec<u8> {
    let mut k = prefix(&[mailbox, &folder.key()]);
    k.extend_from_slice(&uid_validity.to_be_bytes());
    k.extend_from_slice(&uid.to_be_bytes());
    k
}

/// How a mailbox is kept: everything readable but the credentials, which are sealed.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredMailbox {
    #[serde(flatten)]
    public: serde_json::Map<String, serde_json::Value>,
    sealed_credentials: String,
}

/// A dead letter as stored; `v` tells it from the older form (a bare
/// `StoredEntry`, its reason in `last_error`).
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredDeadLetter {
    v: u8,
    entry: Option<OutboxEntry>,
    /// The unreadable stored value, as text, for an operator to look at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    raw: Option<String>,
    reason: String,
    buried_at: chrono::DateTime<chrono::Utc>,
}

/// The part of a stored outbox entry the due index reads at open.
#[derive(serde::Deserialize)]
struct IndexedEntry {
    event: IndexedEvent,
    next_attempt_ms: i64,
}

#[derive(serde::Deserialize)]
struct IndexedEvent {
    ordering_key: String,
}

/// An outbox entry on disk: the event's data inline or in a file.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredEntry {
    #[serde(flatten)]
    entry: OutboxEntry,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    data_file: Option<String>,
    /// The data is that of the history entry under this key (hex): a
    /// synced message's event carries its history record, which the engine then
    /// holds once, not twice (and not in the outbox, where values churn).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    data_in_history: Option<String>,
}

impl SledStore {
    /// Opens (or creates) the store in `path`: the sled database under
    /// `path/db`, the files beside it.
    pub fn open(path: &Path, secrets: SecretBox) -> anyhow::Result<Self> {
        std::fs::create_dir_all(path)
            .map_err(|e| anyhow::anyhow!("creating data folder {}: {e}", path.display()))?;
        let engine = SledEngine::open(&path.join("db"))?;
        Self::with_engine(engine, path, secrets)
    }
}

impl<E: Engine> KvStore<E> {
    /// A tree keyed by sequence numbers (8 bytes, big-endian), from the
    /// one after `after` (from the start when None).
    fn after_sequence(&self, tree: Tree, after: Option<u64>) -> super::engine::Entries<'_> {
        let start = after.map_or(0, |sequence| sequence.saturating_add(1));
        self.engine.range(
            tree,
            Bound::Included(start.to_be_bytes().to_vec()),
            Bound::Unbounded,
            Direction::Forward,
        )
    }

    /// The store over `engine`, with its files in `data_folder`: checks the
    /// data's format and rebuilds the outbox's due index from what is
    /// committed.
    pub fn with_engine(engine: E, data_folder: &Path, secrets: SecretBox) -> anyhow::Result<Self> {
        let path = data_folder;
        std::fs::create_dir_all(path)
            .map_err(|e| anyhow::anyhow!("creating data folder {}: {e}", path.display()))?;
        let bodies = path.join("event-bodies");
        std::fs::create_dir_all(&bodies)?;
        let sources = MessageFiles::open(path.join("messages"))?;
        let segments = std::sync::Arc::new(SourceSegments::open(path.join("source-segments"))?);
        let store = Self {
            engine,
            sources,
            segments,
            secrets,
            bodies,
            lifecycle: Default::default(),
            directory: Default::default(),
            outbox_index: Default::default(),
            group_flush: Default::default(),
            undelivered_until_flushed: Default::default(),
        };
        store.check_format(path)?;
        store.rebuild_outbox_index()?;
        Ok(store)
    }

    /// The engine the store keeps its bytes in.
    pub fn engine(&self) -> &E {
        &self.engine
    }

    /// Whether integrations other than `integration` use the mailbox.
    fn used_by_others(&self, address: &str, integration: &Integration) -> StoreResult<bool> {
        let own = key(&[address, &integration.location_id, &integration.user_id]);
        for k in keys(
            self.engine
                .scan_prefix(Tree::MailboxIntegrations, &prefix(&[address])),
        ) {
            if k? != own {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Refuses data written by a newer build, which this one would misread
    /// (an older build reads an outbox event that refers to its history
    /// record as an event without data), and marks the data as this
    /// build's format otherwise.
    fn check_format(&self, path: &Path) -> anyhow::Result<()> {
        let stored = match self
            .engine
            .get(Tree::Settings, STORE_FORMAT_KEY.as_bytes())?
        {
            None => None,
            Some(value) => match <[u8; 8]>::try_from(value.as_slice()) {
                Ok(bytes) => Some(u64::from_be_bytes(bytes)),
                Err(_) => anyhow::bail!(
                    "the data in {} carries a store format mark this build cannot read",
                    path.display()
                ),
            },
        };
        match stored {
            Some(format) if format > STORE_FORMAT => anyhow::bail!(
                "the data in {} was written by a newer mailbridge (store format {format}; this \
                 build reads up to {STORE_FORMAT}): run that version or a newer one",
                path.display()
            ),
            Some(format) if format == STORE_FORMAT => Ok(()),
            // Older data, marked or not: read as it is, marked as this build's.
            _ => {
                self.engine.insert(
                    Tree::Settings,
                    STORE_FORMAT_KEY.as_bytes(),
                    &STORE_FORMAT.to_be_bytes(),
                )?;
                self.engine.flush()?;
                Ok(())
            }
        }
    }

    /// Keeps filed copies of synced messages: appended to a segment and
    /// durable before their places are written, since an engine may flush on
    /// its own (sled does) and a commit must never refer to a source a crash
    /// can lose.
    fn keep_sources(&self, sources: &[(&str, &[u8])]) -> StoreResult<()> {
        let bytes: Vec<&[u8]> = sources.iter().map(|(_, source)| *source).collect();
        let places = self.segments.append_durably(&bytes)?;
        // One by one: each place stands alone, and a sled batch (like a
        // transaction) writes its log buffer out on its own.
        for ((record_id, _), place) in sources.iter().zip(places) {
            self.engine.insert(
                Tree::SourcePlaces,
                record_id.as_bytes(),
                &place.encode()[..],
            )?;
        }
        Ok(())
    }

    /// Forgets a kept source no commit refers to; its bytes go with their
    /// segment.
    fn forget_source(&self, record_id: &str) {
        if let Err(err) = self.engine.remove(Tree::SourcePlaces, record_id.as_bytes()) {
            tracing::warn!(
                record = record_id,
                "forgetting a message source failed: {err}"
            );
        }
    }

    /// Serializes the writes that read before they write (mailbox records,
    /// sends, integrations), so none undoes another.
    fn one_at_a_time(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lifecycle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Every write ends here: the fsync must not stall an async worker.
    /// Contact writes, one at a time (see `put_contacts`).
    fn directory_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.directory
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Makes everything written so far durable. Callers that ask while a
    /// flush is under way wait for the next one, which covers them all: one
    /// fsync for every commit made meanwhile (group commit), and none
    /// returns before its own writes are on disk.
    ///
    /// The entries of deferred commits made before the flush started are
    /// indexed after it: their events go out no sooner. After a failed flush
    /// (a failed fsync ends the process, see `Engine::flush`; any other
    /// error is retried by the next flush) they wait for the next one that
    /// works, as every commit's entries do (`flush_then_index`): an event
    /// must never reach the CRM before the commit behind it is on disk.
    fn flush(&self) -> StoreResult<()> {
        crate::offload::blocking(|| {
            self.group_flush.flush(|| {
                let covered = std::mem::take(&mut *self.undelivered());
                // A failed fsync ends the process in the engine.
                let flushed = self.engine.flush();
                // Not durable, not deliverable: they wait for the next flush
                // that works, and nothing of theirs overtakes them meanwhile
                // (entries are indexed in sequence order).
                if let Err(err) = flushed.and_then(|()| self.index_committed(&covered)) {
                    // Indexing again is harmless: the next flush tries.
                    self.undelivered().extend(covered);
                    return Err(err);
                }
                Ok(())
            })
        })
    }

    fn undelivered(&self) -> std::sync::MutexGuard<'_, Vec<PreparedEntry>> {
        self.undelivered_until_flushed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn seal_mailbox(&self, mailbox: &Mailbox) -> StoreResult<Vec<u8>> {
        let mut public = match serde_json::to_value(mailbox) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => return Err(StoreError::Corrupt("mailbox is not an object".into())),
        };
        public.remove("credentials");
        let credentials = encode(&mailbox.credentials)?;
        encode(&StoredMailbox {
            public,
            sealed_credentials: self.secrets.seal(&credentials)?,
        })
    }

    fn open_mailbox(&self, bytes: &[u8]) -> StoreResult<Mailbox> {
        let stored: StoredMailbox = decode(bytes)?;
        let credentials: Credentials = decode(&self.secrets.open(&stored.sealed_credentials)?)?;
        let mut public = stored.public;
        public.insert(
            "credentials".into(),
            serde_json::to_value(credentials).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        );
        serde_json::from_value(serde_json::Value::Object(public))
            .map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    fn body_path(&self, event_id: &str) -> PathBuf {
        // Event ids are minted by the bridge (uuid based); keep the file name safe anyway.
        let safe: String = event_id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.bodies.join(format!("{safe}.json"))
    }

    /// Prepares outbox values, writing large event data to files first (fsynced),
    /// so the transaction that references them stays small and side-effect free.
    fn stored_entries(&self, events: &[Event]) -> StoreResult<Vec<PreparedEntry>> {
        self.stored_entries_beside(events, &[])
    }

    /// `stored_entries`, for events committed with `history` (key, data):
    /// an event whose data equals a history entry's refers to it.
    fn stored_entries_beside(
        &self,
        events: &[Event],
        history: &[(Vec<u8>, serde_json::Value)],
    ) -> StoreResult<Vec<PreparedEntry>> {
        events
            .iter()
            .map(|event| {
                // Without its data, which is kept elsewhere (not cloned to be dropped).
                let light = Event {
                    id: event.id.clone(),
                    kind: event.kind.clone(),
                    timestamp: event.timestamp,
                    ordering_key: event.ordering_key.clone(),
                    data: serde_json::Value::Null,
                };
                let in_history = history.iter().find(|(_, data)| *data == event.data);
                let stored = match in_history {
                    Some((history_key, _)) => StoredEntry {
                        entry: OutboxEntry::new(light),
                        data_file: None,
                        data_in_history: Some(data_encoding::HEXLOWER.encode(history_key)),
                    },
                    None => {
                        let data = encode(&event.data)?;
                        if data.len() <= INLINE_EVENT_LIMIT {
                            StoredEntry {
                                entry: OutboxEntry::new(event.clone()),
                                data_file: None,
                                data_in_history: None,
                            }
                        } else {
                            let path = self.body_path(&event.id);
                            super::write_durably(&path, &data)?;
                            StoredEntry {
                                entry: OutboxEntry::new(light),
                                data_file: path
                                    .file_name()
                                    .map(|n| n.to_string_lossy().into_owned()),
                                data_in_history: None,
                            }
                        }
                    }
                };
                let value = encode(&stored)?;
                Ok(PreparedEntry {
                    sequence: self.engine.generate_id()?,
                    value,
                    ordering_key: event.ordering_key.clone(),
                    due_ms: 0,
                })
            })
            .collect()
    }

    /// An ingest commit's transaction, its source written first (see
    /// `Store::commit_ingest`); returns the outbox entries it inserted, for
    /// the index once they are durable.
    fn apply_ingest(
        &self,
        commit: &IngestCommit,
        source: KeptSource<'_>,
    ) -> StoreResult<Vec<PreparedEntry>> {
        // Contacts Auto BCC creates: checked and written under the directory
        // lock that every contact write takes, so the checks hold until the
        // commit. An address some contact has meanwhile: routed again. An id
        // taken meanwhile (the CRM changed that contact's address, or two
        // deliveries create one contact): that contact is kept, not created
        // twice, and no `contact.created` goes out for it.
        let _directory = (!commit.new_contacts.is_empty()).then(|| self.directory_lock());
        let mut creating: Vec<&Contact> = Vec::new();
        for contact in &commit.new_contacts {
            for email in &contact.emails {
                if !self
                    .contacts_by_email(&contact.location_id, email)?
                    .is_empty()
                {
                    return Err(StoreError::DirectoryChanged);
                }
            }
            let taken = creating
                .iter()
                .any(|c| c.location_id == contact.location_id && c.id == contact.id)
                || self.contact(&contact.location_id, &contact.id)?.is_some();
            if !taken {
                creating.push(contact);
            }
        }
        let events: Vec<Event> = commit
            .events
            .iter()
            .filter(|event| {
                event.kind != "contact.created"
                    || creating.iter().any(|c| {
                        event.data.get("id").and_then(|id| id.as_str()) == Some(c.id.as_str())
                    })
            })
            .cloned()
            .collect();
        let cursor_value = encode(&commit.cursor)?;
        let thread_value = commit.thread.as_ref().map(encode).transpose()?;
        let now_ms = chrono::Utc::now().timestamp_millis();
        let history_entries: Vec<(Vec<u8>, serde_json::Value)> = commit
            .history
            .iter()
            .map(|data| {
                let value =
                    serde_json::to_value(data).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                Ok((history_key(data, now_ms), value))
            })
            .collect::<StoreResult<_>>()?;
        let history_values: Vec<(&[u8], Vec<u8>)> = history_entries
            .iter()
            .map(|(k, data)| Ok((k.as_slice(), encode(data)?)))
            .collect::<StoreResult<_>>()?;
        let outbox_values = self.stored_entries_beside(&events, &history_entries)?;
        let located_value = commit
            .located
            .as_ref()
            .map(|(uid_validity, uid, entry)| {
                Ok::<_, StoreError>((
                    located_key(&commit.mailbox, commit.folder, *uid_validity, *uid),
                    encode(entry)?,
                    entry.record_id.clone(),
                    encode(&MessageLocation {
                        mailbox: commit.mailbox.clone(),
                        folder: commit.folder,
                        uid_validity: *uid_validity,
                        uid: *uid,
                    })?,
                ))
            })
            .transpose()?;
        let cursor_at = cursor_key(&commit.mailbox, commit.folder);
        let record_id = commit
            .history
            .first()
            .map(|data| data.id.clone())
            .unwrap_or_default();
        let synced_keys: Vec<Vec<u8>> = match &commit.synced {
            Some((identity, integrations)) => integrations
                .iter()
                .map(|(location, user)| key(&[location, user, identity]))
                .collect(),
            None => Vec::new(),
        };
        let contact_values: Vec<ContactRecord> = creating
            .iter()
            .map(|contact| {
                Ok((
                    key(&[&contact.location_id, &contact.id]),
                    encode(contact)?,
                    contact
                        .emails
                        .iter()
                        .map(|email| key(&[&contact.location_id, email, &contact.id]))
                        .collect(),
                ))
            })
            .collect::<StoreResult<_>>()?;
        // Written (and synced to disk) before the commit that makes it reachable,
        // once nothing else stands before the commit.
        // A source written ahead stays if the commit fails: the batch that
        // wrote it may commit it on a retry, and removes it otherwise.
        let source_kept = match source {
            KeptSource::Write(bytes) if !record_id.is_empty() => {
                self.keep_sources(&[(&record_id, bytes)])?;
                true
            }
            _ => false,
        };
        let committed = self.engine.transaction(
            &[
                Tree::Cursors,
                Tree::Threads,
                Tree::ThreadKeys,
                Tree::Outbox,
                Tree::History,
                Tree::Synced,
                Tree::Contacts,
                Tree::ContactEmails,
                Tree::Located,
                Tree::RecordLocations,
                Tree::RecordInfo,
            ],
            &|tx| {
                for (record_key, value, index_keys) in &contact_values {
                    if tx.get(Tree::Contacts, record_key)?.is_some() {
                        return Err(TxError::Abort(StoreError::DirectoryChanged));
                    }
                    tx.insert(Tree::Contacts, record_key, value)?;
                    for index_key in index_keys {
                        tx.insert(Tree::ContactEmails, index_key, &[])?;
                    }
                }
                if !cursor_stands_at(tx, &cursor_at, &commit.cursor_before)? {
                    return Err(TxError::Abort(StoreError::CursorMoved));
                }
                if commit.thread.is_some() && thread_seen_tx(tx, commit)? != commit.thread_seen {
                    return Err(TxError::Abort(StoreError::ThreadChanged));
                }
                // Checked inside the commit: two folders' watchers may race
                // with the same message.
                for k in &synced_keys {
                    if tx.insert(Tree::Synced, k, record_id.as_bytes())?.is_some() {
                        return Err(TxError::Abort(StoreError::AlreadySynced));
                    }
                }
                tx.insert(Tree::Cursors, &cursor_at, &cursor_value)?;
                for (k, v) in &history_values {
                    tx.insert(Tree::History, k, v)?;
                }
                if let (Some(thread), Some(value)) = (&commit.thread, &thread_value) {
                    tx.insert(Tree::Threads, thread.id.as_bytes(), value)?;
                    for message_id in &commit.message_ids {
                        tx.insert(
                            Tree::ThreadKeys,
                            &key(&[&commit.thread_mailbox, message_id]),
                            thread.id.as_bytes(),
                        )?;
                    }
                    // The first thread to answer a message keeps it.
                    for message_id in &commit.answers {
                        let answered = answered_key(&commit.thread_mailbox, message_id);
                        if tx.get(Tree::ThreadKeys, &answered)?.is_none() {
                            tx.insert(Tree::ThreadKeys, &answered, thread.id.as_bytes())?;
                        }
                    }
                }
                if let Some((key, value, record_id, location)) = &located_value {
                    tx.insert(Tree::Located, key, value)?;
                    tx.insert(Tree::RecordLocations, record_id.as_bytes(), location)?;
                    tx.insert(Tree::RecordInfo, record_id.as_bytes(), value)?;
                }
                put_outbox_tx(tx, &outbox_values)?;
                Ok(())
            },
        );
        if committed.is_err() && source_kept {
            self.forget_source(&record_id);
        }
        committed?;
        Ok(outbox_values)
    }

    fn remove_send_copies(&self, send_id: &str) {
        self.sources.remove(send_id, SourceCopy::Filed);
        self.sources.remove(send_id, SourceCopy::Submission);
    }

    /// Makes a commit durable, then lets its events go out. After a failed
    /// flush they wait for the next flush that works.
    fn flush_then_index(&self, prepared: &[PreparedEntry]) -> StoreResult<()> {
        match self.flush() {
            Ok(()) => self.index_committed(prepared),
            Err(err) => {
                self.undelivered().extend(prepared.iter().cloned());
                Err(err)
            }
        }
    }

    /// Tells the index about entries a transaction may have inserted: those
    /// the outbox now holds (a transaction can decide not to insert them).
    fn index_committed(&self, prepared: &[PreparedEntry]) -> StoreResult<()> {
        let mut index = self.index();
        for entry in prepared {
            if self
                .engine
                .contains_key(Tree::Outbox, &entry.sequence.to_be_bytes())?
            {
                index.add(entry.sequence, &entry.ordering_key, entry.due_ms);
            }
        }
        Ok(())
    }

    fn index(&self) -> std::sync::MutexGuard<'_, OutboxIndex> {
        self.outbox_index
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Builds the index from the outbox as committed; entries that cannot be
    /// read are set aside as dead letters.
    fn rebuild_outbox_index(&self) -> StoreResult<()> {
        let mut unreadable = Vec::new();
        let mut index = OutboxIndex::default();
        for item in self.engine.iter(Tree::Outbox) {
            let (k, v) = item?;
            let Ok(bytes) = <[u8; 8]>::try_from(k.as_slice()) else {
                unreadable.push((k, v, "outbox key is not 8 bytes".to_string()));
                continue;
            };
            // What the index needs only: the event's data stays unparsed.
            match decode::<IndexedEntry>(&v) {
                Ok(entry) => index.add(
                    u64::from_be_bytes(bytes),
                    &entry.event.ordering_key,
                    entry.next_attempt_ms,
                ),
                Err(err) => unreadable.push((k, v, err.to_string())),
            }
        }
        *self.index() = index;
        for (k, v, reason) in unreadable {
            self.set_aside_unreadable(&k, &v, &reason)?;
        }
        Ok(())
    }

    /// Moves an outbox entry that cannot be read to the dead letters, with the reason.
    fn set_aside_unreadable(&self, k: &[u8], v: &[u8], reason: &str) -> StoreResult<()> {
        tracing::error!("an outbox entry cannot be read; set aside as a dead letter: {reason}");
        let value = encode(&StoredDeadLetter {
            v: 2,
            entry: None,
            raw: Some(String::from_utf8_lossy(v).into_owned()),
            reason: format!("unreadable: {reason}"),
            buried_at: chrono::Utc::now(),
        })?;
        self.engine
            .transaction(&[Tree::Outbox, Tree::DeadLetters], &|tx| {
                // Only the value that was read, and never over a dead
                // letter buried meanwhile (whose body file this read missed).
                if tx.get(Tree::Outbox, k)?.as_deref() != Some(v)
                    || tx.get(Tree::DeadLetters, k)?.is_some()
                {
                    return Ok(());
                }
                tx.remove(Tree::Outbox, k)?;
                tx.insert(Tree::DeadLetters, k, &value)?;
                Ok(())
            })?;
        self.flush()
    }

    /// An entry left the outbox: the next of its key becomes deliverable.
    fn unindex(&self, sequence: u64, previous: &[u8]) {
        let Ok(stored) = decode::<StoredEntry>(previous) else {
            return;
        };
        self.index()
            .remove(sequence, &stored.entry.event.ordering_key, |next| {
                self.engine
                    .get(Tree::Outbox, &next.to_be_bytes())
                    .ok()
                    .flatten()
                    .and_then(|v| decode::<StoredEntry>(&v).ok())
                    .map_or(0, |s| s.entry.next_attempt_ms)
            });
    }

    /// The outbox's values as stored, in order.
    #[cfg(test)]
    pub(super) fn outbox_values_as_stored(&self) -> Vec<Vec<u8>> {
        values(self.engine.iter(Tree::Outbox)).flatten().collect()
    }

    fn load_entry(&self, bytes: &[u8]) -> StoreResult<OutboxEntry> {
        let stored: StoredEntry = decode(bytes)?;
        let mut entry = stored.entry;
        if let Some(file) = stored.data_file {
            let data = std::fs::read(self.bodies.join(file))?;
            entry.event.data = decode(&data)?;
        }
        if let Some(history_key) = stored.data_in_history {
            let missing = || {
                StoreError::Corrupt(format!(
                    "event {}: the history entry holding its data is missing",
                    entry.event.id
                ))
            };
            let history_key = data_encoding::HEXLOWER
                .decode(history_key.as_bytes())
                .map_err(|_| missing())?;
            // A failed read is tried again later, like a body file's; only
            // a missing record sets the event aside.
            let data = self
                .engine
                .get(Tree::History, &history_key)
                .map_err(|err| StoreError::Io(std::io::Error::other(err.to_string())))?;
            entry.event.data = decode(&data.ok_or_else(missing)?)?;
        }
        Ok(entry)
    }

    fn save_entry(&self, entry: &OutboxEntry, previous: &[u8]) -> StoreResult<Vec<u8>> {
        let stored: StoredEntry = decode(previous)?;
        let mut light = entry.clone();
        if stored.data_file.is_some() || stored.data_in_history.is_some() {
            light.event.data = serde_json::Value::Null;
        }
        encode(&StoredEntry {
            entry: light,
            data_file: stored.data_file,
            data_in_history: stored.data_in_history,
        })
    }

    fn remove_body_file(&self, previous: &[u8]) {
        if let Ok(StoredEntry {
            data_file: Some(file),
            ..
        }) = decode::<StoredEntry>(previous)
        {
            // A file left behind costs disk space only; the entry is already gone.
            let _ = std::fs::remove_file(self.bodies.join(file));
        }
    }

    /// `accept_send`'s checks and its one commit.
    fn record_send(
        &self,
        new: &NewSend<'_>,
        daily_limit: Option<u32>,
        now_ms: i64,
    ) -> StoreResult<RecordedSend> {
        let send = new.record;
        let thread = new.thread;
        // Checks and writes happen under one lock so two concurrent requests
        // cannot both take the last unit of quota or both claim one key. The
        // events' sequence numbers are taken under it too, so they follow
        // the order in which the commits happen.
        let _one_at_a_time = self.one_at_a_time();
        let outbox_values = self.stored_entries(new.events)?;
        let idempotency_key = send
            .idempotency_key
            .as_ref()
            .map(|k| key(&[&send.location_id, &send.user_id, k]));
        if let Some(k) = &idempotency_key
            && let Some(existing) = self.engine.get(Tree::Idempotency, k)?
        {
            let entry: IdempotencyEntry = decode(&existing)?;
            if now_ms - entry.created_ms < IDEMPOTENCY_WINDOW_MS
                && let Some(first) = self.send(&entry.send_id)?
            {
                return Ok(RecordedSend::Refused(SendAcceptance::Repeat(Box::new(
                    first,
                ))));
            }
        }
        if let Some(limit) = daily_limit {
            let (used, oldest) = self.quota_use(&send.mailbox, now_ms)?;
            if used >= limit {
                return Ok(RecordedSend::Refused(SendAcceptance::LimitReached {
                    retry_at_ms: oldest.map_or(now_ms, |t| t + QUOTA_WINDOW_MS),
                    limit,
                }));
            }
        }
        let send_value = encode(send)?;
        let thread_value = encode(thread)?;
        let idempotency_value = encode(&IdempotencyEntry {
            send_id: send.id.clone(),
            created_ms: now_ms,
        })?;
        let quota_key = timed_key(&[&send.mailbox], now_ms, &send.id);
        let message_key = key(&[&send.mailbox, &send.message_id]);
        let unsettled_key = unsettled_key(send);
        self.engine.transaction(
            &[
                Tree::Sends,
                Tree::Idempotency,
                Tree::Quota,
                Tree::Threads,
                Tree::ThreadKeys,
                Tree::CrmMessageIds,
                Tree::UnsettledSends,
                Tree::Outbox,
            ],
            &|tx| {
                // R12/R13: the pin holds only over the thread as it was read.
                if thread_tx(tx, thread.id.as_bytes())?.as_ref() != new.thread_before {
                    return Err(TxError::Abort(StoreError::ThreadChanged));
                }
                tx.insert(Tree::Sends, send.id.as_bytes(), &send_value)?;
                tx.insert(Tree::UnsettledSends, &unsettled_key, send.id.as_bytes())?;
                if let Some(k) = &idempotency_key {
                    tx.insert(Tree::Idempotency, k, &idempotency_value)?;
                }
                tx.insert(Tree::Quota, &quota_key, send.id.as_bytes())?;
                tx.insert(Tree::Threads, thread.id.as_bytes(), &thread_value)?;
                tx.insert(Tree::ThreadKeys, &message_key, thread.id.as_bytes())?;
                tx.insert(Tree::CrmMessageIds, &message_key, send.id.as_bytes())?;
                put_outbox_tx(tx, &outbox_values)?;
                Ok(())
            },
        )?;
        Ok(RecordedSend::Committed(
            self.flush_then_index(&outbox_values),
        ))
    }
}

/// Inserts prepared outbox entries inside a transaction.
fn put_outbox_tx(tx: &dyn Tx, entries: &[PreparedEntry]) -> TxResult<()> {
    for entry in entries {
        tx.insert(Tree::Outbox, &entry.sequence.to_be_bytes(), &entry.value)?;
    }
    Ok(())
}

/// The thread an ingest commit's lookup leads to now, read inside its
/// transaction: by its thread keys, else as answered by a synced thread.
fn thread_seen_tx(tx: &dyn Tx, commit: &IngestCommit) -> TxResult<Option<Thread>> {
    let by_keys = thread_of_tx(tx, &commit.thread_mailbox, &commit.thread_keys_seen)?;
    if by_keys.is_some() {
        return Ok(by_keys);
    }
    for message_id in &commit.answered_seen {
        if let Some(thread_id) = tx.get(
            Tree::ThreadKeys,
            &answered_key(&commit.thread_mailbox, message_id),
        )? {
            return thread_tx(tx, &thread_id);
        }
    }
    Ok(None)
}

/// The thread the keys lead to now, read inside a transaction.
fn thread_of_tx(tx: &dyn Tx, mailbox: &str, message_ids: &[String]) -> TxResult<Option<Thread>> {
    for message_id in message_ids {
        if let Some(thread_id) = tx.get(Tree::ThreadKeys, &key(&[mailbox, message_id]))? {
            return thread_tx(tx, &thread_id);
        }
    }
    Ok(None)
}

fn thread_tx(tx: &dyn Tx, thread_id: &[u8]) -> TxResult<Option<Thread>> {
    match tx.get(Tree::Threads, thread_id)? {
        Some(value) => Ok(Some(decode(&value)?)),
        None => Ok(None),
    }
}

/// Whether a stored cursor stands where a writer expects: same UIDVALIDITY
/// and next UID (when it last moved does not matter).
fn cursor_stands_at(tx: &dyn Tx, at: &[u8], expected: &FolderCursor) -> TxResult<bool> {
    Ok(match tx.get(Tree::Cursors, at)? {
        Some(value) => {
            let stored: FolderCursor = decode(&value)?;
            stored.uid_validity == expected.uid_validity && stored.next_uid == expected.next_uid
        }
        None => false,
    })
}

impl<E: Engine> Store for KvStore<E> {
    fn put_contacts(&self, upserts: &[ContactUpsert]) -> StoreResult<Vec<Contact>> {
        // Each upsert reads the old record to drop its stale index entries;
        // two at once could drop an entry the other just wrote.
        let _one_at_a_time = self.directory_lock();
        // Index entries first, records second: a lookup checks the record, so a
        // crash in between leaves at worst a harmless stale index entry, and
        // repeating the upsert repairs everything.
        let mut index: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
        let mut records: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::with_capacity(upserts.len());
        let mut stored = Vec::with_capacity(upserts.len());
        // A contact given twice in one call: the later one wins, over the earlier.
        let mut pending: std::collections::HashMap<Vec<u8>, Contact> = Default::default();
        for upsert in upserts {
            let mut contact = upsert.contact.clone();
            let record_key = key(&[&contact.location_id, &contact.id]);
            let old = match pending.get(&record_key) {
                Some(earlier) => Some(earlier.clone()),
                None => self
                    .engine
                    .get(Tree::Contacts, &record_key)?
                    .map(|value| decode::<Contact>(&value))
                    .transpose()?,
            };
            if let Some(old) = &old {
                if !upsert.created_at_given {
                    contact.created_at = old.created_at;
                }
                for email in old.emails.iter().filter(|e| !contact.has_email(e)) {
                    index.push((key(&[&old.location_id, email, &old.id]), None));
                }
            }
            for email in &contact.emails {
                index.push((
                    key(&[&contact.location_id, email, &contact.id]),
                    Some(Vec::new()),
                ));
            }
            records.push((record_key.clone(), Some(encode(&contact)?)));
            pending.insert(record_key, contact.clone());
            stored.push(contact);
        }
        self.engine.apply_batch(Tree::ContactEmails, &index)?;
        self.engine.apply_batch(Tree::Contacts, &records)?;
        self.flush()?;
        Ok(stored)
    }

    fn contact(&self, location_id: &str, contact_id: &str) -> StoreResult<Option<Contact>> {
        self.engine
            .get(Tree::Contacts, &key(&[location_id, contact_id]))?
            .map(|v| decode(&v))
            .transpose()
    }

    fn delete_contact(&self, location_id: &str, contact_id: &str) -> StoreResult<bool> {
        let _one_at_a_time = self.directory_lock();
        let Some(old) = self
            .engine
            .remove(Tree::Contacts, &key(&[location_id, contact_id]))?
        else {
            return Ok(false);
        };
        let old: Contact = decode(&old)?;
        for email in &old.emails {
            self.engine
                .remove(Tree::ContactEmails, &key(&[location_id, email, contact_id]))?;
        }
        self.flush()?;
        Ok(true)
    }

    fn contacts_by_email(&self, location_id: &str, email: &str) -> StoreResult<Vec<Contact>> {
        let mut found = Vec::new();
        let scan = prefix(&[location_id, email]);
        for index_key in keys(self.engine.scan_prefix(Tree::ContactEmails, &scan)) {
            let index_key = index_key?;
            let contact_id = String::from_utf8_lossy(&index_key[scan.len()..]).into_owned();
            if let Some(contact) = self.contact(location_id, &contact_id)?
                && contact.has_email(email)
            {
                found.push(contact);
            }
        }
        Ok(found)
    }

    fn connect(
        &self,
        mailbox: &Mailbox,
        integration: &Integration,
        cursors: &[(FolderRole, FolderCursor)],
        failed_sends: &[(SendRecord, Event)],
        events: &[Event],
    ) -> StoreResult<Option<String>> {
        let integration_value = encode(integration)?;
        let cursor_values: Vec<(Vec<u8>, Vec<u8>)> = cursors
            .iter()
            .map(|(role, cursor)| Ok((cursor_key(&mailbox.address, *role), encode(cursor)?)))
            .collect::<StoreResult<_>>()?;
        let integration_key = key(&[&integration.location_id, &integration.user_id]);
        let _one_at_a_time = self.one_at_a_time();
        let stored = self.mailbox(&mailbox.address)?;
        if let Some(stored) = &stored
            && !stored.same_account(mailbox)
            && self.used_by_others(&mailbox.address, integration)?
        {
            return Err(StoreError::MailboxInUse);
        }
        let mut numbered = mailbox.clone();
        numbered.generation = stored.map_or(1, |stored| stored.generation + 1);
        let mailbox_value = self.seal_mailbox(&numbered)?;
        // Only sends still queued fail: one claimed for submission is on its
        // way (claim_send takes the same lock).
        let mut failed_values: Vec<(String, Vec<u8>, Vec<u8>)> = Vec::new();
        let mut refunds: Vec<Vec<u8>> = Vec::new();
        let mut all_events = events.to_vec();
        for (send, failed_event) in failed_sends {
            if !self
                .send(&send.id)?
                .is_some_and(|stored| stored.status == SendStatus::Queued)
            {
                continue;
            }
            failed_values.push((send.id.clone(), encode(send)?, unsettled_key(send)));
            all_events.push(failed_event.clone());
            // A send that never left gives its unit of quota back.
            refunds.extend(
                self.engine
                    .scan_prefix(Tree::Quota, &prefix(&[&send.mailbox]))
                    .filter_map(Result::ok)
                    .filter(|(_, v)| v.as_slice() == send.id.as_bytes())
                    .map(|(k, _)| k),
            );
        }
        let outbox_values = self.stored_entries(&all_events)?;
        // "Update email" (R18): the integration may point at another mailbox,
        // which is released when no other integration uses it.
        let moved_from = self
            .integration(&integration.location_id, &integration.user_id)?
            .map(|old| old.mailbox)
            .filter(|old| old != &mailbox.address);
        let released = match &moved_from {
            Some(old) => {
                let own = key(&[old, &integration.location_id, &integration.user_id]);
                let mut others = false;
                for k in keys(
                    self.engine
                        .scan_prefix(Tree::MailboxIntegrations, &prefix(&[old])),
                ) {
                    if k? != own {
                        others = true;
                        break;
                    }
                }
                (!others).then(|| old.clone())
            }
            None => None,
        };
        // Cursors to forget: every folder of a released mailbox, and the
        // folders this mailbox no longer lists (listed again later, one
        // starts from the present instead of catching up on the gap).
        let mut forgotten_cursors: Vec<Vec<u8>> = Vec::new();
        if let Some(old) = &released
            && let Some(stored) = self.mailbox(old)?
        {
            for role in stored.roles() {
                forgotten_cursors.push(cursor_key(old, role));
            }
        }
        if let Some(stored) = self.mailbox(&mailbox.address)? {
            let watched = mailbox.roles();
            for role in stored.roles() {
                if !watched.contains(&role) {
                    forgotten_cursors.push(cursor_key(&mailbox.address, role));
                }
            }
        }
        self.engine.transaction(
            &[
                Tree::Mailboxes,
                Tree::Integrations,
                Tree::MailboxIntegrations,
                Tree::Cursors,
                Tree::Outbox,
                Tree::Sends,
                Tree::UnsettledSends,
                Tree::Quota,
            ],
            &|tx| {
                if let Some(old) = &moved_from {
                    tx.remove(
                        Tree::MailboxIntegrations,
                        &key(&[old, &integration.location_id, &integration.user_id]),
                    )?;
                }
                if let Some(old) = &released {
                    tx.remove(Tree::Mailboxes, old.as_bytes())?;
                }
                for forgotten in &forgotten_cursors {
                    tx.remove(Tree::Cursors, forgotten)?;
                }
                tx.insert(Tree::Mailboxes, mailbox.address.as_bytes(), &mailbox_value)?;
                tx.insert(Tree::Integrations, &integration_key, &integration_value)?;
                tx.insert(
                    Tree::MailboxIntegrations,
                    &key(&[
                        &mailbox.address,
                        &integration.location_id,
                        &integration.user_id,
                    ]),
                    &[],
                )?;
                for (cursor_key, value) in &cursor_values {
                    if tx.get(Tree::Cursors, cursor_key)?.is_none() {
                        tx.insert(Tree::Cursors, cursor_key, value)?;
                    }
                }
                for (id, value, unsettled_key) in &failed_values {
                    tx.insert(Tree::Sends, id.as_bytes(), value)?;
                    tx.remove(Tree::UnsettledSends, unsettled_key)?;
                }
                for k in &refunds {
                    tx.remove(Tree::Quota, k)?;
                }
                put_outbox_tx(tx, &outbox_values)?;
                Ok(())
            },
        )?;
        self.flush_then_index(&outbox_values)?;
        for (id, _, _) in &failed_values {
            self.sources.remove(id, SourceCopy::Submission);
        }
        Ok(released)
    }

    fn threads_of_mailbox(&self, mailbox: &str) -> StoreResult<Vec<Thread>> {
        // Only "update email" asks, rarely: a scan beats keeping another index.
        let mut found = Vec::new();
        for value in values(self.engine.iter(Tree::Threads)) {
            let thread: Thread = decode(&value?)?;
            if thread.mailbox == mailbox {
                found.push(thread);
            }
        }
        Ok(found)
    }

    fn disconnect(
        &self,
        location_id: &str,
        user_id: &str,
        events: &[Event],
    ) -> StoreResult<Option<Disconnected>> {
        let integration_key = key(&[location_id, user_id]);
        let _one_at_a_time = self.one_at_a_time();
        // Numbered under the lock: a connect and a disconnect of one mailbox
        // reach the CRM in the order they happened.
        let outbox_values = self.stored_entries(events)?;
        let Some(integration) = self.integration(location_id, user_id)? else {
            return Ok(None);
        };
        let address = integration.mailbox.clone();
        let own_key = key(&[&address, location_id, user_id]);
        let mut others = false;
        for k in keys(
            self.engine
                .scan_prefix(Tree::MailboxIntegrations, &prefix(&[&address])),
        ) {
            if k? != own_key {
                others = true;
                break;
            }
        }
        let roles = match self.mailbox(&address)? {
            Some(stored) => stored.roles(),
            None => FolderRole::FIXED.to_vec(),
        };
        self.engine.transaction(
            &[
                Tree::Mailboxes,
                Tree::Integrations,
                Tree::MailboxIntegrations,
                Tree::Cursors,
                Tree::Outbox,
            ],
            &|tx| {
                tx.remove(Tree::Integrations, &integration_key)?;
                tx.remove(Tree::MailboxIntegrations, &own_key)?;
                if !others {
                    tx.remove(Tree::Mailboxes, address.as_bytes())?;
                    for role in &roles {
                        tx.remove(Tree::Cursors, &cursor_key(&address, *role))?;
                    }
                }
                put_outbox_tx(tx, &outbox_values)?;
                Ok(())
            },
        )?;
        // A released mailbox's synced messages are no longer watched, and
        // what it set aside no longer matters.
        if !others {
            for tree in [Tree::Located, Tree::Unprocessable] {
                for k in keys(self.engine.scan_prefix(tree, &prefix(&[&address]))) {
                    self.engine.remove(tree, &k?)?;
                }
            }
        }
        // What this integration received no longer matters: a reconnect
        // starts from its new baseline (R19).
        for k in keys(
            self.engine
                .scan_prefix(Tree::Synced, &prefix(&[location_id, user_id])),
        ) {
            self.engine.remove(Tree::Synced, &k?)?;
        }
        let result = Some(Disconnected {
            integration,
            mailbox_released: !others,
        });
        self.flush_then_index(&outbox_values)?;
        Ok(result)
    }

    fn mailbox(&self, address: &str) -> StoreResult<Option<Mailbox>> {
        self.engine
            .get(Tree::Mailboxes, address.as_bytes())?
            .map(|v| self.open_mailbox(&v))
            .transpose()
    }

    fn mailboxes(&self) -> StoreResult<Vec<Mailbox>> {
        values(self.engine.iter(Tree::Mailboxes))
            .map(|v| self.open_mailbox(&v?))
            .collect()
    }

    fn mailbox_summaries_after(
        &self,
        after: Option<&str>,
        limit: usize,
        keep: &mut dyn FnMut(&MailboxSummary) -> bool,
    ) -> StoreResult<Vec<MailboxSummary>> {
        let from = match after {
            Some(after) => Bound::Excluded(after.as_bytes().to_vec()),
            None => Bound::Unbounded,
        };
        let mut page = Vec::new();
        for value in
            values(
                self.engine
                    .range(Tree::Mailboxes, from, Bound::Unbounded, Direction::Forward),
            )
        {
            if page.len() >= limit {
                break;
            }
            // The public fields only: the sealed credentials stay shut.
            let mailbox: MailboxSummary = decode(&value?)?;
            if keep(&mailbox) {
                page.push(mailbox);
            }
        }
        Ok(page)
    }

    fn mark_needs_reauth(
        &self,
        address: &str,
        refused: &Credentials,
        reason: &str,
        events: &[Event],
    ) -> StoreResult<bool> {
        let _one_at_a_time = self.one_at_a_time();
        let outbox_values = self.stored_entries(events)?;
        let Some(mut mailbox) = self.mailbox(address)? else {
            return Ok(false);
        };
        if mailbox.state == MailboxState::NeedsReauth || &mailbox.credentials != refused {
            return Ok(false);
        }
        mailbox.state = MailboxState::NeedsReauth;
        mailbox.last_error = Some(reason.to_string());
        let mailbox_value = self.seal_mailbox(&mailbox)?;
        self.engine
            .transaction(&[Tree::Mailboxes, Tree::Outbox], &|tx| {
                tx.insert(Tree::Mailboxes, address.as_bytes(), &mailbox_value)?;
                put_outbox_tx(tx, &outbox_values)?;
                Ok(())
            })?;
        self.flush_then_index(&outbox_values)?;
        Ok(true)
    }

    fn replace_credentials(
        &self,
        address: &str,
        expected: &Credentials,
        new: &Credentials,
    ) -> StoreResult<bool> {
        let _one_at_a_time = self.one_at_a_time();
        let Some(mut mailbox) = self.mailbox(address)? else {
            return Ok(false);
        };
        if &mailbox.credentials != expected {
            return Ok(false);
        }
        mailbox.credentials = new.clone();
        self.engine.insert(
            Tree::Mailboxes,
            address.as_bytes(),
            &self.seal_mailbox(&mailbox)?,
        )?;
        self.flush()?;
        Ok(true)
    }

    fn integration(&self, location_id: &str, user_id: &str) -> StoreResult<Option<Integration>> {
        self.engine
            .get(Tree::Integrations, &key(&[location_id, user_id]))?
            .map(|v| decode(&v))
            .transpose()
    }

    fn integrations_of_mailbox(&self, address: &str) -> StoreResult<Vec<Integration>> {
        let scan = prefix(&[address]);
        let mut found = Vec::new();
        for k in keys(self.engine.scan_prefix(Tree::MailboxIntegrations, &scan)) {
            let k = k?;
            let rest = String::from_utf8_lossy(&k[scan.len()..]).into_owned();
            let Some((location_id, user_id)) = rest.split_once('\0') else {
                continue;
            };
            if let Some(integration) = self.integration(location_id, user_id)?
                && integration.mailbox == address
            {
                found.push(integration);
            }
        }
        Ok(found)
    }

    fn cursor(&self, mailbox: &str, folder: FolderRole) -> StoreResult<Option<FolderCursor>> {
        self.engine
            .get(Tree::Cursors, &cursor_key(mailbox, folder))?
            .map(|v| decode(&v))
            .transpose()
    }

    fn set_cursor(
        &self,
        mailbox: &str,
        folder: FolderRole,
        expected: Option<FolderCursor>,
        cursor: FolderCursor,
    ) -> StoreResult<()> {
        let at = cursor_key(mailbox, folder);
        let value = encode(&cursor)?;
        self.engine
            .transaction(&[Tree::Cursors, Tree::Mailboxes], &|tx| {
                let stands = match &expected {
                    Some(expected) => cursor_stands_at(tx, &at, expected)?,
                    None => {
                        tx.get(Tree::Cursors, &at)?.is_none()
                            && tx.get(Tree::Mailboxes, mailbox.as_bytes())?.is_some()
                    }
                };
                if !stands {
                    return Err(TxError::Abort(StoreError::CursorMoved));
                }
                tx.insert(Tree::Cursors, &at, &value)?;
                Ok(())
            })?;
        self.flush()
    }

    fn thread_of(&self, mailbox: &str, message_ids: &[String]) -> StoreResult<Option<Thread>> {
        for message_id in message_ids {
            if let Some(thread_id) = self
                .engine
                .get(Tree::ThreadKeys, &key(&[mailbox, message_id]))?
                && let Some(thread) = self.engine.get(Tree::Threads, &thread_id)?
            {
                return Ok(Some(decode(&thread)?));
            }
        }
        Ok(None)
    }

    fn thread_answering(
        &self,
        mailbox: &str,
        message_ids: &[String],
    ) -> StoreResult<Option<Thread>> {
        // As the commit's check reads it: the first id filed decides.
        for message_id in message_ids {
            if let Some(thread_id) = self
                .engine
                .get(Tree::ThreadKeys, &answered_key(mailbox, message_id))?
            {
                return match self.engine.get(Tree::Threads, &thread_id)? {
                    Some(thread) => Ok(Some(decode(&thread)?)),
                    None => Ok(None),
                };
            }
        }
        Ok(None)
    }

    fn commit_ingest(&self, commit: &IngestCommit, source: Option<&[u8]>) -> StoreResult<()> {
        let outbox_values = self.apply_ingest(
            commit,
            source.map_or(KeptSource::Nothing, KeptSource::Write),
        )?;
        // A message passed over moves the cursor only: should that be lost
        // to a crash, the message is looked at again and passed over again.
        // It rides on the next flush instead of paying for its own.
        let cursor_only = commit.events.is_empty()
            && commit.thread.is_none()
            && commit.history.is_empty()
            && commit.synced.is_none()
            && commit.located.is_none()
            && commit.new_contacts.is_empty()
            && source.is_none();
        if cursor_only {
            self.index_committed(&outbox_values)
        } else {
            self.flush_then_index(&outbox_values)
        }
    }

    fn commit_ingest_deferred(
        &self,
        commit: &IngestCommit,
        source: KeptSource<'_>,
    ) -> StoreResult<()> {
        let outbox_values = self.apply_ingest(commit, source)?;
        self.undelivered().extend(outbox_values);
        Ok(())
    }

    fn make_durable(&self) -> StoreResult<()> {
        self.flush()
    }

    fn write_sources_ahead(&self, sources: &[(&str, &[u8])]) -> StoreResult<()> {
        self.keep_sources(sources)
    }

    fn drop_source_written_ahead(&self, record_id: &str) {
        self.forget_source(record_id);
    }

    fn located(
        &self,
        mailbox: &str,
        folder: FolderRole,
        uid_validity: u32,
        uid: u32,
    ) -> StoreResult<Option<LocatedMessage>> {
        self.engine
            .get(
                Tree::Located,
                &located_key(mailbox, folder, uid_validity, uid),
            )?
            .map(|v| decode(&v))
            .transpose()
    }

    fn record_info(&self, record_id: &str) -> StoreResult<Option<LocatedMessage>> {
        self.engine
            .get(Tree::RecordInfo, record_id.as_bytes())?
            .map(|v| decode(&v))
            .transpose()
    }

    fn synced_record(
        &self,
        identity: &str,
        integrations: &[(String, String)],
    ) -> StoreResult<Option<String>> {
        for (location, user) in integrations {
            if let Some(record) = self
                .engine
                .get(Tree::Synced, &key(&[location, user, identity]))?
            {
                return Ok(Some(String::from_utf8_lossy(&record).into_owned()));
            }
        }
        Ok(None)
    }

    fn locate_record(
        &self,
        record_id: &str,
    ) -> StoreResult<Option<(MessageLocation, LocatedMessage)>> {
        let Some(value) = self
            .engine
            .get(Tree::RecordLocations, record_id.as_bytes())?
        else {
            return Ok(None);
        };
        let location: MessageLocation = decode(&value)?;
        Ok(self
            .located(
                &location.mailbox,
                location.folder,
                location.uid_validity,
                location.uid,
            )?
            .map(|entry| (location, entry)))
    }

    fn queue_mailbox_change(&self, change: &MailboxChange) -> StoreResult<bool> {
        let at = &change.location;
        let key = located_key(&at.mailbox, at.folder, at.uid_validity, at.uid);
        let value = encode(change)?;
        let queued = self.engine.transaction(
            &[Tree::Located, Tree::RecordLocations, Tree::MailboxChanges],
            &|tx| {
                let Some(stored) = tx.get(Tree::Located, &key)? else {
                    return Ok(false);
                };
                let mut entry: LocatedMessage = decode(&stored)?;
                if change.to_trash {
                    tx.remove(Tree::Located, &key)?;
                    tx.remove(Tree::RecordLocations, entry.record_id.as_bytes())?;
                } else {
                    if let Some(seen) = change.seen {
                        entry.flags.seen = seen;
                    }
                    if let Some(flagged) = change.flagged {
                        entry.flags.flagged = flagged;
                    }
                    tx.insert(Tree::Located, &key, &encode(&entry)?)?;
                }
                let sequence = tx.generate_id()?;
                tx.insert(Tree::MailboxChanges, &sequence.to_be_bytes(), &value)?;
                Ok(true)
            },
        )?;
        self.flush()?;
        Ok(queued)
    }

    fn restore_location(&self, change: &MailboxChange) -> StoreResult<()> {
        let Some(info) = self.record_info(&change.record_id)? else {
            return Ok(());
        };
        let at = &change.location;
        let key = located_key(&at.mailbox, at.folder, at.uid_validity, at.uid);
        let value = encode(&info)?;
        let location = encode(at)?;
        self.engine
            .transaction(&[Tree::Located, Tree::RecordLocations], &|tx| {
                if tx.get(Tree::Located, &key)?.is_none() {
                    tx.insert(Tree::Located, &key, &value)?;
                    tx.insert(
                        Tree::RecordLocations,
                        change.record_id.as_bytes(),
                        &location,
                    )?;
                }
                Ok(())
            })?;
        self.flush()
    }

    fn count_failed_try(&self, failed: &UnprocessableMessage) -> StoreResult<UnprocessableMessage> {
        let key = located_key(
            &failed.mailbox,
            failed.folder,
            failed.uid_validity,
            failed.uid,
        );
        let earlier: Option<UnprocessableMessage> =
            match self.engine.get(Tree::Unprocessable, &key)? {
                Some(stored) => decode(&stored).ok(),
                None => None,
            };
        let counted = UnprocessableMessage {
            attempts: earlier.as_ref().map_or(0, |e| e.attempts).saturating_add(1),
            first_failed_at: earlier
                .as_ref()
                .map_or(failed.last_failed_at, |e| e.first_failed_at),
            message_id: failed
                .message_id
                .clone()
                .or_else(|| earlier.as_ref().and_then(|e| e.message_id.clone())),
            set_aside_at: None,
            ..failed.clone()
        };
        self.engine
            .insert(Tree::Unprocessable, &key, &encode(&counted)?)?;
        self.flush()?;
        Ok(counted)
    }

    fn set_aside(&self, record: &UnprocessableMessage, commit: &IngestCommit) -> StoreResult<()> {
        let key = located_key(
            &record.mailbox,
            record.folder,
            record.uid_validity,
            record.uid,
        );
        // The record first: should the commit be lost in a crash, the
        // message is met again and set aside again, its event going out
        // with that commit only.
        let earlier = self
            .engine
            .insert(Tree::Unprocessable, &key, &encode(record)?)?;
        if let Err(err) = self.commit_ingest(commit, None) {
            // A stale watcher's commit: the message was not set aside.
            let restored = match earlier {
                Some(earlier) => self
                    .engine
                    .insert(Tree::Unprocessable, &key, &earlier)
                    .map(|_| ()),
                None => self.engine.remove(Tree::Unprocessable, &key).map(|_| ()),
            };
            if let Err(restore) = restored {
                tracing::error!("restoring a message's failed tries failed: {restore:#}");
            }
            return Err(err);
        }
        Ok(())
    }

    fn set_aside_messages(&self, mailbox: &str) -> StoreResult<Vec<UnprocessableMessage>> {
        let mut found = Vec::new();
        for value in values(
            self.engine
                .scan_prefix(Tree::Unprocessable, &prefix(&[mailbox])),
        ) {
            let value = value?;
            match decode::<UnprocessableMessage>(&value) {
                Ok(record) if record.set_aside_at.is_some() => found.push(record),
                Ok(_) => {}
                Err(err) => tracing::error!("an unreadable set-aside record is skipped: {err:#}"),
            }
        }
        Ok(found)
    }

    fn mailbox_changes(&self) -> StoreResult<Vec<(u64, MailboxChange)>> {
        let mut found = Vec::new();
        for item in self.engine.iter(Tree::MailboxChanges) {
            let (k, v) = item?;
            let Ok(bytes) = <[u8; 8]>::try_from(k.as_slice()) else {
                continue;
            };
            match decode(&v) {
                Ok(change) => found.push((u64::from_be_bytes(bytes), change)),
                Err(err) => {
                    tracing::error!("an unreadable queued mailbox change is skipped: {err:#}")
                }
            }
        }
        Ok(found)
    }

    fn update_mailbox_change(
        &self,
        sequence: u64,
        change: Option<&MailboxChange>,
    ) -> StoreResult<()> {
        match change {
            Some(change) => {
                self.engine.insert(
                    Tree::MailboxChanges,
                    &sequence.to_be_bytes(),
                    &encode(change)?,
                )?;
            }
            None => {
                self.engine
                    .remove(Tree::MailboxChanges, &sequence.to_be_bytes())?;
            }
        }
        self.flush()
    }

    fn located_in(
        &self,
        mailbox: &str,
        folder: FolderRole,
        uid_validity: u32,
        uids: std::ops::RangeInclusive<u32>,
        latest: usize,
    ) -> StoreResult<Vec<(u32, LocatedMessage)>> {
        let first = located_key(mailbox, folder, uid_validity, *uids.start());
        let last = located_key(mailbox, folder, uid_validity, *uids.end());
        let mut found = Vec::new();
        for item in self
            .engine
            .range(
                Tree::Located,
                Bound::Included(first),
                Bound::Included(last),
                Direction::Reverse,
            )
            .take(latest)
        {
            let (k, v) = item?;
            let uid = k
                .len()
                .checked_sub(4)
                .and_then(|at| k.get(at..))
                .and_then(|bytes| <[u8; 4]>::try_from(bytes).ok())
                .map(u32::from_be_bytes);
            if let Some(uid) = uid {
                found.push((uid, decode(&v)?));
            }
        }
        found.reverse();
        Ok(found)
    }

    fn commit_flag_changes(
        &self,
        mailbox: &str,
        folder: FolderRole,
        cursor_before: FolderCursor,
        highest_modseq: Option<u64>,
        changes: &[LocatedChange],
    ) -> StoreResult<()> {
        let cursor_at = cursor_key(mailbox, folder);
        let change_keys: Vec<PreparedChange<'_>> = changes
            .iter()
            .map(|change| {
                Ok((
                    located_key(mailbox, folder, change.uid_validity, change.uid),
                    change,
                    self.stored_entries(&change.events)?,
                    change
                        .moved_to
                        .map(|(role, uid_validity, uid)| {
                            Ok::<_, StoreError>((
                                located_key(mailbox, role, uid_validity, uid),
                                encode(&MessageLocation {
                                    mailbox: mailbox.to_string(),
                                    folder: role,
                                    uid_validity,
                                    uid,
                                })?,
                            ))
                        })
                        .transpose()?,
                ))
            })
            .collect::<StoreResult<_>>()?;
        self.engine.transaction(
            &[
                Tree::Cursors,
                Tree::Located,
                Tree::Outbox,
                Tree::RecordLocations,
            ],
            &|tx| {
                if !cursor_stands_at(tx, &cursor_at, &cursor_before)? {
                    return Err(TxError::Abort(StoreError::CursorMoved));
                }
                let Some(stored) = tx.get(Tree::Cursors, &cursor_at)? else {
                    return Err(TxError::Abort(StoreError::CursorMoved));
                };
                let mut cursor: FolderCursor = decode(&stored)?;
                if highest_modseq.is_some() {
                    cursor.highest_modseq = highest_modseq;
                }
                let cursor_value = encode(&cursor)?;
                for (key, change, outbox_values, moved_to) in &change_keys {
                    let Some(flags) = change.flags_after else {
                        // Gone meanwhile (the CRM's DELETE took it): its own
                        // change, not reported back.
                        let Some(gone) = tx.remove(Tree::Located, key)? else {
                            continue;
                        };
                        let entry: LocatedMessage = decode(&gone)?;
                        match moved_to {
                            Some((new_key, location)) => {
                                tx.insert(Tree::Located, new_key, &gone)?;
                                tx.insert(
                                    Tree::RecordLocations,
                                    entry.record_id.as_bytes(),
                                    location,
                                )?;
                            }
                            None => {
                                tx.remove(Tree::RecordLocations, entry.record_id.as_bytes())?;
                            }
                        }
                        put_outbox_tx(tx, outbox_values)?;
                        continue;
                    };
                    let Some(value) = tx.get(Tree::Located, key)? else {
                        continue;
                    };
                    let mut entry: LocatedMessage = decode(&value)?;
                    if entry.flags != change.flags_before {
                        continue;
                    }
                    entry.flags = flags;
                    if let Some(labels) = &change.labels_after {
                        entry.labels = Some(labels.clone());
                    }
                    tx.insert(Tree::Located, key, &encode(&entry)?)?;
                    put_outbox_tx(tx, outbox_values)?;
                }
                tx.insert(Tree::Cursors, &cursor_at, &cursor_value)?;
                Ok(())
            },
        )?;
        let outbox_values: Vec<PreparedEntry> = change_keys
            .iter()
            .flat_map(|(_, _, outbox_values, _)| outbox_values.iter().cloned())
            .collect();
        self.flush_then_index(&outbox_values)
    }

    fn synced_to(
        &self,
        identity: &str,
        integrations: &[(String, String)],
    ) -> StoreResult<Vec<(String, String)>> {
        let mut found = Vec::new();
        for (location, user) in integrations {
            if self
                .engine
                .contains_key(Tree::Synced, &key(&[location, user, identity]))?
            {
                found.push((location.clone(), user.clone()));
            }
        }
        Ok(found)
    }

    fn enqueue(&self, events: &[Event]) -> StoreResult<()> {
        let values = self.stored_entries(events)?;
        self.engine
            .transaction(&[Tree::Outbox], &|tx| put_outbox_tx(tx, &values))?;
        self.flush_then_index(&values)
    }

    #[cfg(test)]
    fn outbox_page(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> StoreResult<Vec<(u64, OutboxEntry)>> {
        let mut page = Vec::new();
        let mut unreadable = Vec::new();
        for item in self.after_sequence(Tree::Outbox, after).take(limit) {
            let (k, v) = item?;
            let Ok(bytes) = <[u8; 8]>::try_from(k.as_slice()) else {
                unreadable.push((k, v, "outbox key is not 8 bytes".to_string()));
                continue;
            };
            match self.load_entry(&v) {
                Ok(entry) => page.push((u64::from_be_bytes(bytes), entry)),
                // An I/O error may pass (too many open files): not a verdict
                // on the entry. Skipped this time, read again on the next pass.
                Err(StoreError::Io(err)) if err.kind() != std::io::ErrorKind::NotFound => {
                    tracing::warn!(
                        "an outbox entry cannot be read now, skipping it this pass: {err}"
                    );
                }
                Err(err) => unreadable.push((k, v, err.to_string())),
            }
        }
        for (k, v, reason) in unreadable {
            self.set_aside_unreadable(&k, &v, &reason)?;
        }
        Ok(page)
    }

    fn update_outbox(&self, sequence: u64, entry: &OutboxEntry) -> StoreResult<()> {
        let k = sequence.to_be_bytes();
        let Some(previous) = self.engine.get(Tree::Outbox, &k)? else {
            return Ok(());
        };
        self.engine
            .insert(Tree::Outbox, &k, &self.save_entry(entry, &previous)?)?;
        let flushed = self.flush();
        self.index().reschedule(sequence, entry.next_attempt_ms);
        flushed
    }

    fn complete_outbox(&self, sequence: u64) -> StoreResult<()> {
        if let Some(previous) = self.engine.remove(Tree::Outbox, &sequence.to_be_bytes())? {
            // Out of the index whatever the flush says: the row is gone.
            let flushed = self.flush();
            self.unindex(sequence, &previous);
            flushed?;
            self.remove_body_file(&previous);
        }
        Ok(())
    }

    fn bury_outbox(&self, sequence: u64, entry: &OutboxEntry) -> StoreResult<()> {
        let k = sequence.to_be_bytes();
        let previous = self.engine.get(Tree::Outbox, &k)?;
        let value = encode(&StoredDeadLetter {
            v: 2,
            entry: Some(entry.clone()),
            raw: None,
            reason: entry
                .last_error
                .clone()
                .unwrap_or_else(|| "set aside".into()),
            buried_at: chrono::Utc::now(),
        })?;
        self.engine
            .transaction(&[Tree::Outbox, Tree::DeadLetters], &|tx| {
                tx.remove(Tree::Outbox, &k)?;
                tx.insert(Tree::DeadLetters, &k, &value)?;
                Ok(())
            })?;
        let flushed = self.flush();
        if let Some(previous) = &previous {
            self.unindex(sequence, previous);
        }
        flushed?;
        // The dead letter carries the data inline now.
        if let Some(previous) = previous {
            self.remove_body_file(&previous);
        }
        Ok(())
    }

    fn dead_letters(&self, after: Option<u64>, limit: usize) -> StoreResult<Vec<DeadLetter>> {
        let mut found = Vec::new();
        for item in self.after_sequence(Tree::DeadLetters, after).take(limit) {
            let (k, v) = item?;
            let Ok(bytes) = <[u8; 8]>::try_from(k.as_slice()) else {
                continue;
            };
            found.push(read_dead_letter(u64::from_be_bytes(bytes), &v, self));
        }
        Ok(found)
    }

    fn replay_dead_letter(&self, id: u64) -> StoreResult<Replay> {
        let k = id.to_be_bytes();
        let Some(value) = self.engine.get(Tree::DeadLetters, &k)? else {
            return Ok(Replay::NotFound);
        };
        let Some(entry) = read_dead_letter(id, &value, self).entry else {
            return Ok(Replay::Unreadable);
        };
        // A fresh retry budget; the event keeps its id (the CRM's dedup key).
        let mut entry = OutboxEntry::new(entry.event);
        entry.last_error = None;
        let outbox_values = self.stored_entries(std::slice::from_ref(&entry.event))?;
        let requeued = self
            .engine
            .transaction(&[Tree::Outbox, Tree::DeadLetters], &|tx| {
                // Of two replays at once, one requeues it.
                if tx.remove(Tree::DeadLetters, &k)?.is_none() {
                    return Ok(false);
                }
                put_outbox_tx(tx, &outbox_values)?;
                Ok(true)
            })?;
        self.flush_then_index(&outbox_values)?;
        Ok(if requeued {
            Replay::Requeued
        } else {
            Replay::NotFound
        })
    }

    fn delete_dead_letter(&self, id: u64) -> StoreResult<bool> {
        self.remove_dead_letter(id)
    }

    fn sweep(&self, now_ms: i64, retention: &super::Retention) -> StoreResult<super::SweepReport> {
        self.sweep_pass(now_ms, retention)
    }

    fn outbox_len(&self) -> StoreResult<usize> {
        Ok(self.index().pending())
    }

    fn outbox_due(
        &self,
        now_ms: i64,
        limit: usize,
        in_flight: &dyn Fn(u64) -> bool,
    ) -> StoreResult<OutboxDue> {
        let (ready, next_due_ms, pending) = {
            let index = self.index();
            let (ready, next_due_ms) = index.due(now_ms, limit, in_flight);
            (ready, next_due_ms, index.pending())
        };
        let mut next_due_ms = next_due_ms;
        let mut entries = Vec::with_capacity(ready.len());
        for sequence in ready {
            let k = sequence.to_be_bytes();
            let Some(value) = self.engine.get(Tree::Outbox, &k)? else {
                // Not in the outbox (it never was, or left it): forgotten.
                self.index().forget(sequence);
                continue;
            };
            match self.load_entry(&value) {
                Ok(entry) => entries.push((sequence, entry)),
                // An I/O error may pass (too many open files): not a verdict
                // on the entry. Skipped this time, read again in a second.
                Err(StoreError::Io(err)) if err.kind() != std::io::ErrorKind::NotFound => {
                    tracing::warn!(
                        "an outbox entry cannot be read now, skipping it this pass: {err}"
                    );
                    let soon = now_ms.saturating_add(1_000);
                    next_due_ms = Some(next_due_ms.map_or(soon, |due| due.min(soon)));
                }
                Err(err) => {
                    self.set_aside_unreadable(&k, &value, &err.to_string())?;
                    self.unindex(sequence, &value);
                }
            }
        }
        Ok(OutboxDue {
            entries,
            next_due_ms,
            pending,
        })
    }

    fn accept_send(
        &self,
        new: &NewSend<'_>,
        daily_limit: Option<u32>,
        now_ms: i64,
    ) -> StoreResult<SendAcceptance> {
        let send = new.record;
        // Both copies reach the disk before the send is recorded as accepted.
        let written = self
            .sources
            .write(&send.id, SourceCopy::Filed, new.filed)
            .and_then(|()| {
                self.sources
                    .write(&send.id, SourceCopy::Submission, new.submitted)
            });
        let recorded = written
            .map_err(StoreError::from)
            .and_then(|()| self.record_send(new, daily_limit, now_ms));
        match recorded {
            // Committed, whatever the flush said: the send is in the queue
            // (a later flush makes it durable) and needs its copies.
            Ok(RecordedSend::Committed(durable)) => durable.map(|()| SendAcceptance::Accepted),
            // Not recorded: the copies are not needed.
            Ok(RecordedSend::Refused(answer)) => {
                self.remove_send_copies(&send.id);
                Ok(answer)
            }
            Err(err) => {
                self.remove_send_copies(&send.id);
                Err(err)
            }
        }
    }

    fn send(&self, id: &str) -> StoreResult<Option<SendRecord>> {
        self.engine
            .get(Tree::Sends, id.as_bytes())?
            .map(|v| decode(&v))
            .transpose()
    }

    fn update_send(&self, send: &SendRecord, events: &[Event]) -> StoreResult<()> {
        let send_value = encode(send)?;
        let outbox_values = self.stored_entries(events)?;
        let history_value = match send.status {
            SendStatus::Sent => Some((
                history_key(&send.data, send.created_at.timestamp_millis()),
                encode(&send.data)?,
            )),
            _ => None,
        };
        // A send that never left gives its unit of quota back.
        let refund: Vec<Vec<u8>> = if send.status == SendStatus::Failed {
            self.engine
                .scan_prefix(Tree::Quota, &prefix(&[&send.mailbox]))
                .filter_map(Result::ok)
                .filter(|(_, v)| v.as_slice() == send.id.as_bytes())
                .map(|(k, _)| k)
                .collect()
        } else {
            Vec::new()
        };
        let settled = send.is_settled();
        let unsettled_key = unsettled_key(send);
        // A Message-ID the server gave the message instead of ours (Exchange
        // Online) joins the thread index and the CRM's own ids, so the reply
        // threads and the copy in Sent is not taken for the user's own mail.
        let message_key = key(&[&send.mailbox, &send.message_id]);
        let adopts_message_id =
            send.submitted_message_id.is_some() && send.status == SendStatus::Sent;
        self.engine.transaction(
            &[
                Tree::Sends,
                Tree::Outbox,
                Tree::History,
                Tree::Quota,
                Tree::UnsettledSends,
                Tree::Threads,
                Tree::ThreadKeys,
                Tree::CrmMessageIds,
            ],
            &|tx| {
                // Read and changed in the one commit, so an ingest or a
                // pin on the thread meanwhile is not undone.
                if adopts_message_id
                    && let Some(mut thread) = thread_tx(tx, send.thread_id.as_bytes())?
                {
                    thread.remember(Some(&send.message_id), None);
                    tx.insert(Tree::Threads, send.thread_id.as_bytes(), &encode(&thread)?)?;
                    tx.insert(Tree::ThreadKeys, &message_key, send.thread_id.as_bytes())?;
                    tx.insert(Tree::CrmMessageIds, &message_key, send.id.as_bytes())?;
                }
                tx.insert(Tree::Sends, send.id.as_bytes(), &send_value)?;
                if settled {
                    tx.remove(Tree::UnsettledSends, &unsettled_key)?;
                }
                if let Some((k, v)) = &history_value {
                    tx.insert(Tree::History, k, v)?;
                }
                for k in &refund {
                    tx.remove(Tree::Quota, k)?;
                }
                put_outbox_tx(tx, &outbox_values)?;
                Ok(())
            },
        )?;
        self.flush_then_index(&outbox_values)?;
        if matches!(send.status, SendStatus::Sent | SendStatus::Failed) {
            self.sources.remove(&send.id, SourceCopy::Submission);
        }
        Ok(())
    }

    fn claim_send(&self, send: &SendRecord) -> StoreResult<bool> {
        let _one_at_a_time = self.one_at_a_time();
        let still_queued = self
            .send(&send.id)?
            .is_some_and(|stored| stored.status == SendStatus::Queued);
        let still_from_here = self
            .integration(&send.location_id, &send.user_id)?
            .is_some_and(|integration| integration.mailbox == send.mailbox);
        if !(still_queued && still_from_here) {
            return Ok(false);
        }
        self.engine
            .insert(Tree::Sends, send.id.as_bytes(), &encode(send)?)?;
        self.flush()?;
        Ok(true)
    }

    fn unsettled_sends(&self) -> StoreResult<Vec<SendRecord>> {
        // The index holds only unsettled sends, in acceptance order: the queue
        // never walks the history of everything ever sent.
        let mut found: Vec<SendRecord> = Vec::new();
        for id in values(self.engine.iter(Tree::UnsettledSends)) {
            if let Some(value) = self.engine.get(Tree::Sends, &id?)? {
                let send: SendRecord = decode(&value)?;
                if !send.is_settled() {
                    found.push(send);
                }
            }
        }
        Ok(found)
    }

    fn crm_send_of(&self, mailbox: &str, message_id: &str) -> StoreResult<Option<String>> {
        self.engine
            .get(Tree::CrmMessageIds, &key(&[mailbox, message_id]))?
            .map(|id| String::from_utf8(id).map_err(|e| StoreError::Corrupt(e.to_string())))
            .transpose()
    }

    fn quota_use(&self, mailbox: &str, now_ms: i64) -> StoreResult<(u32, Option<i64>)> {
        let scan = prefix(&[mailbox]);
        let since = now_ms - QUOTA_WINDOW_MS;
        let mut used = 0u32;
        let mut oldest = None;
        let mut expired = Vec::new();
        for k in keys(self.engine.scan_prefix(Tree::Quota, &scan)) {
            let k = k?;
            let Some(time) = time_of_timed_key(&k, scan.len()) else {
                continue;
            };
            if time <= since {
                expired.push(k);
                continue;
            }
            used += 1;
            oldest = Some(oldest.map_or(time, |o: i64| o.min(time)));
        }
        // Entries older than the window never count again.
        for k in expired {
            self.engine.remove(Tree::Quota, &k)?;
        }
        Ok((used, oldest))
    }

    fn thread(&self, thread_id: &str) -> StoreResult<Option<Thread>> {
        self.engine
            .get(Tree::Threads, thread_id.as_bytes())?
            .map(|v| decode(&v))
            .transpose()
    }

    fn history(
        &self,
        location_id: &str,
        contact_id: &str,
        before_ms: Option<i64>,
        limit: usize,
    ) -> StoreResult<Vec<MessageEventData>> {
        let scan = prefix(&[location_id, contact_id]);
        let mut found = Vec::new();
        let (from, to) = prefix_bounds(&scan);
        for item in self
            .engine
            .range(Tree::History, from, to, Direction::Reverse)
        {
            let (k, v) = item?;
            if let (Some(before), Some(time)) = (before_ms, time_of_timed_key(&k, scan.len()))
                && time >= before
            {
                continue;
            }
            found.push(decode(&v)?);
            if found.len() >= limit {
                break;
            }
        }
        Ok(found)
    }

    fn message_source(&self, record_id: &str, copy: SourceCopy) -> StoreResult<Option<Vec<u8>>> {
        if copy == SourceCopy::Filed
            && let Some(value) = self.engine.get(Tree::SourcePlaces, record_id.as_bytes())?
        {
            let place = SourcePlace::decode(&value)
                .ok_or_else(|| StoreError::Corrupt(format!("the place of {record_id}'s source")))?;
            return Ok(self.segments.read(place)?);
        }
        Ok(self.sources.read(record_id, copy)?)
    }

    fn prune_message_sources(&self, older_than: std::time::Duration) -> StoreResult<usize> {
        let mut removed = self.sources.prune(older_than);
        let Some(first_kept) = self.segments.prune(older_than)? else {
            return Ok(removed);
        };
        // Keyed by record id, so the whole index is read: hourly at most,
        // and only when a segment went.
        for entry in self.engine.iter(Tree::SourcePlaces) {
            let (record_id, value) = entry?;
            if SourcePlace::decode(&value).is_none_or(|place| place.segment() < first_kept) {
                self.engine.remove(Tree::SourcePlaces, &record_id)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    fn setting(&self, name: &str) -> StoreResult<Option<Vec<u8>>> {
        self.engine.get(Tree::Settings, name.as_bytes())
    }

    fn put_setting(&self, name: &str, value: &[u8]) -> StoreResult<()> {
        self.engine.insert(Tree::Settings, name.as_bytes(), value)?;
        self.flush()
    }

    fn settings_with_prefix(&self, prefix: &str) -> StoreResult<Vec<(String, Vec<u8>)>> {
        self.engine
            .scan_prefix(Tree::Settings, prefix.as_bytes())
            .map(|item| {
                let (name, value) = item?;
                Ok((String::from_utf8_lossy(&name).into_owned(), value))
            })
            .collect()
    }

    fn take_setting(&self, name: &str) -> StoreResult<Option<Vec<u8>>> {
        let taken = self.engine.remove(Tree::Settings, name.as_bytes())?;
        if taken.is_some() {
            self.flush()?;
        }
        Ok(taken)
    }

    fn secret_key(&self, name: &str) -> StoreResult<[u8; 32]> {
        let _one_at_a_time = self.one_at_a_time();
        if let Some(sealed) = self.engine.get(Tree::Settings, name.as_bytes())? {
            let sealed = String::from_utf8_lossy(&sealed).into_owned();
            return <[u8; 32]>::try_from(self.secrets.open(&sealed)?.as_slice())
                .map_err(|_| StoreError::Corrupt(format!("setting {name} is not a 32-byte key")));
        }
        let mut key = [0u8; 32];
        getrandom::fill(&mut key)
            .map_err(|e| StoreError::Engine(format!("no randomness for a key: {e}")))?;
        self.engine.insert(
            Tree::Settings,
            name.as_bytes(),
            self.secrets.seal(&key)?.as_bytes(),
        )?;
        self.flush()?;
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 21: an event whose commit a flush could not make durable (an
    /// error that is no failed fsync, so the process goes on) is not handed
    /// to the deliverer; the next flush that works lets it go.
    #[test]
    fn an_event_waits_for_a_flush_that_works() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(
            dir.path(),
            super::super::secret_box::SecretBox::from_key(&[1; 32]),
        )
        .unwrap();
        let deliverable = |store: &SledStore| {
            store
                .outbox_due(i64::MAX, 10, &|_| false)
                .unwrap()
                .entries
                .len()
        };
        let event = Event {
            id: "evt_1".into(),
            kind: "message.inbound".into(),
            timestamp: chrono::Utc::now(),
            ordering_key: "thr_1".into(),
            data: serde_json::json!({"subject": "waits"}),
        };
        // Every commit's flush ends with an fdatasync of sled's log.
        let syncs = store.engine().durability().log_syncs();
        store.put_setting("a", b"1").unwrap();
        assert!(
            store.engine().durability().log_syncs() > syncs,
            "the log is synced"
        );
        store.engine().durability().fail_next_without_loss();
        assert!(store.enqueue(std::slice::from_ref(&event)).is_err());
        assert_eq!(deliverable(&store), 0, "not durable, not deliverable");
        store.make_durable().unwrap();
        assert_eq!(deliverable(&store), 1, "delivered once a flush works");
    }

    /// Issue 21: a failed fsync of the database ends the process with exit
    /// code 74. Run in a child process of this test binary (the exit would
    /// end the test run), which this test starts and watches.
    #[test]
    fn a_failed_fsync_ends_the_process_with_exit_code_74() {
        const CHILD: &str = "MAILBRIDGE_TEST_FAILED_FSYNC_CHILD";
        if std::env::var_os(CHILD).is_some() {
            let dir = tempfile::tempdir().unwrap();
            let store = SledStore::open(
                dir.path(),
                super::super::secret_box::SecretBox::from_key(&[1; 32]),
            )
            .unwrap();
            store.engine().durability().fail_next_with_loss();
            let _ = store.put_setting("a", b"1");
            // Reached only when the failed fsync did not end the process.
            std::process::exit(0);
        }
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "store::kv_store::tests::a_failed_fsync_ends_the_process_with_exit_code_74",
                "--nocapture",
            ])
            .env(CHILD, "1")
            .status()
            .unwrap();
        assert_eq!(status.code(), Some(74), "{status}");
    }

    /// Issue 21: a send whose commit went through keeps its copies though
    /// the flush after it failed: the queue will submit it.
    #[test]
    fn a_committed_send_keeps_its_copies_when_its_flush_fails() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(
            dir.path(),
            super::super::secret_box::SecretBox::from_key(&[1; 32]),
        )
        .unwrap();
        let send = super::super::suite::send_record("msg_kept", None);
        let thread = super::super::suite::send_thread();
        store.engine().durability().fail_next_without_loss();
        let accepted = super::super::suite::accept(&store, &send, &thread, None, 0);
        assert!(accepted.is_err(), "the failed flush is reported");
        store.make_durable().unwrap();
        assert!(store.send("msg_kept").unwrap().is_some(), "committed");
        assert_eq!(
            store
                .message_source("msg_kept", SourceCopy::Submission)
                .unwrap()
                .as_deref(),
            Some(&b"submitted copy"[..])
        );
    }
}
