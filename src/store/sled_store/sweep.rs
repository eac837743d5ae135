//! The sled engine's retention sweep (`Store::sweep`): each rule of
//! `store::retention` over the trees and files it governs. No rule takes a
//! store-wide lock: removals are compare-and-swap or small transactions that
//! check, in the commit, that what made the item removable still holds, so a
//! commit racing with the sweep is never undone. Reads walk whole trees;
//! removals stop at `Retention::batch` per kind.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use sled::Transactional as _;
use sled::transaction::ConflictableTransactionError;

use super::{
    IdempotencyEntry, SledStore, StoredDeadLetter, StoredEntry, decode, encode, engine, key,
    read_dead_letter, tx_error, unsettled_key,
};
use crate::model::{FolderCursor, MessageLocation, SendRecord, SendStatus, Thread};
use crate::store::retention::{ORPHAN_GRACE, Retention, SweepReport, cutoff_ms, minted_at_ms};
use crate::store::{IDEMPOTENCY_WINDOW_MS, QUOTA_WINDOW_MS, SourceCopy, Store as _, StoreResult};

/// What the events not yet delivered, and the CRM changes not yet made,
/// refer to: kept whatever their age.
#[derive(Default)]
struct References {
    /// History keys whose record holds an event's data.
    history_keys: HashSet<Vec<u8>>,
    /// Message record ids.
    records: HashSet<String>,
    thread_ids: HashSet<String>,
    /// File names in the event body folder.
    body_files: HashSet<String>,
}

/// The one field the thread rule reads of a record, send or history entry.
#[derive(serde::Deserialize)]
struct NamesThread {
    thread_id: String,
}

/// Counts removals of one kind up to the batch.
struct Budget {
    left: usize,
    more: bool,
}

impl Budget {
    fn new(batch: usize) -> Self {
        Self {
            left: batch.max(1),
            more: false,
        }
    }

    /// Whether another item may go; marks `more` when the batch is spent.
    fn take(&mut self) -> bool {
        if self.left == 0 {
            self.more = true;
            return false;
        }
        self.left -= 1;
        true
    }
}

fn unix_ms(time: SystemTime) -> i64 {
    match time.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(since) => i64::try_from(since.as_millis()).unwrap_or(i64::MAX),
        Err(_) => 0,
    }
}

/// The record id and user at the end of a history key
/// (`location\0contact\0<time>\0record\0user`; neither id holds a NUL).
fn record_of_history_key(history_key: &[u8]) -> Option<String> {
    let mut parts = history_key.rsplitn(3, |b| *b == 0);
    let _user = parts.next()?;
    let record = parts.next()?;
    parts.next()?;
    Some(String::from_utf8_lossy(record).into_owned())
}

/// When a history entry was written: the time after `location\0contact\0`.
fn time_of_history_key(history_key: &[u8]) -> Option<i64> {
    let mut nuls = history_key
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == 0)
        .map(|(at, _)| at);
    nuls.next()?;
    let prefix_len = nuls.next()? + 1;
    super::time_of_timed_key(history_key, prefix_len)
}

impl SledStore {
    pub(super) fn sweep_pass(
        &self,
        now_ms: i64,
        retention: &Retention,
    ) -> StoreResult<SweepReport> {
        let mut report = SweepReport::default();
        let mut more = false;
        if let Some(keep) = retention.messages {
            report.message_sources = self.prune_message_sources(keep)?;
        }
        if let Some(keep) = retention.dead_letters {
            let mut budget = Budget::new(retention.batch);
            report.dead_letters = self.sweep_dead_letters(now_ms, keep, &mut budget)?;
            more |= budget.more;
        }
        // After the dead letters: an older one's references are inlined there.
        let references = self.references()?;
        let history_cutoff = retention.history.map(|keep| cutoff_ms(now_ms, keep));
        if let Some(cutoff) = history_cutoff {
            let mut budget = Budget::new(retention.batch);
            report.history = self.sweep_history(cutoff, &references, &mut budget)?;
            more |= budget.more;
        }
        let mut budget = Budget::new(retention.batch);
        report.located = self.sweep_located(&mut budget)?;
        more |= budget.more;
        if let Some(cutoff) = history_cutoff {
            let mut budget = Budget::new(retention.batch);
            (report.records, report.synced) =
                self.sweep_records(cutoff, &references, &mut budget)?;
            more |= budget.more;
        }
        if let Some(keep) = retention.sends {
            let mut budget = Budget::new(retention.batch);
            report.sends = self.sweep_sends(now_ms, cutoff_ms(now_ms, keep), &mut budget)?;
            more |= budget.more;
        }
        if let Some(cutoff) = history_cutoff {
            let mut budget = Budget::new(retention.batch);
            (report.threads, report.thread_keys) =
                self.sweep_threads(cutoff, &references, &mut budget)?;
            more |= budget.more;
        }
        let mut budget = Budget::new(retention.batch);
        report.idempotency_keys = self.sweep_idempotency(now_ms, &mut budget)?;
        more |= budget.more;
        let mut budget = Budget::new(retention.batch);
        report.quota = self.sweep_quota(now_ms, &mut budget)?;
        more |= budget.more;
        let mut budget = Budget::new(retention.batch);
        report.submission_copies = self.sweep_submission_copies(now_ms, &mut budget)?;
        more |= budget.more;
        let mut budget = Budget::new(retention.batch);
        report.event_bodies = self.sweep_event_bodies(now_ms, &references, &mut budget)?;
        more |= budget.more;
        report.more = more;
        if report.removed() > 0 {
            self.flush()?;
        }
        Ok(report)
    }

    pub(super) fn remove_dead_letter(&self, id: u64) -> StoreResult<bool> {
        let Some(previous) = self.dead_letters.remove(id.to_be_bytes()).map_err(engine)? else {
            return Ok(false);
        };
        self.flush()?;
        // An older dead letter may keep its data in a body file.
        self.remove_body_file(&previous);
        Ok(true)
    }

    /// Dead letters set aside longer than `keep` go. One of the older form
    /// (no time of its own) is rewritten with its data inline and the time
    /// of this sweep, from which it ages.
    fn sweep_dead_letters(
        &self,
        now_ms: i64,
        keep: Duration,
        budget: &mut Budget,
    ) -> StoreResult<usize> {
        let cutoff = cutoff_ms(now_ms, keep);
        let now = chrono::DateTime::from_timestamp_millis(now_ms).unwrap_or_else(chrono::Utc::now);
        let mut removed = 0;
        for item in self.dead_letters.iter() {
            let (k, v) = item.map_err(engine)?;
            match decode::<StoredDeadLetter>(&v) {
                Ok(stored) => {
                    if stored.buried_at.timestamp_millis() >= cutoff {
                        continue;
                    }
                    if !budget.take() {
                        break;
                    }
                    // Not over a replay or a rewrite meanwhile.
                    if self
                        .dead_letters
                        .compare_and_swap(&k, Some(&v), None as Option<&[u8]>)
                        .map_err(engine)?
                        .is_ok()
                    {
                        removed += 1;
                    }
                }
                Err(_) => {
                    let Ok(bytes) = <[u8; 8]>::try_from(k.as_ref()) else {
                        continue;
                    };
                    let letter = read_dead_letter(u64::from_be_bytes(bytes), &v, self);
                    let rewritten = encode(&StoredDeadLetter {
                        v: 2,
                        raw: letter
                            .entry
                            .is_none()
                            .then(|| String::from_utf8_lossy(&v).into_owned()),
                        entry: letter.entry,
                        reason: letter.reason,
                        buried_at: now,
                    })?;
                    if self
                        .dead_letters
                        .compare_and_swap(&k, Some(&v), Some(rewritten))
                        .map_err(engine)?
                        .is_ok()
                    {
                        // Made durable before its body file goes.
                        self.flush()?;
                        self.remove_body_file(&v);
                    }
                }
            }
        }
        Ok(removed)
    }

    /// Reads the outbox and the queued CRM changes for what they refer to.
    fn references(&self) -> StoreResult<References> {
        let mut found = References::default();
        for value in self.outbox.iter().values() {
            let value = value.map_err(engine)?;
            // An unreadable entry is set aside by the deliverer; it names nothing.
            let Ok(stored) = decode::<StoredEntry>(&value) else {
                continue;
            };
            if let Some(file) = stored.data_file {
                found.body_files.insert(file);
            }
            if let Some(hex) = stored.data_in_history
                && let Ok(history_key) = data_encoding::HEXLOWER.decode(hex.as_bytes())
            {
                if let Some(record) = record_of_history_key(&history_key) {
                    found.records.insert(record);
                }
                found.history_keys.insert(history_key);
            }
            let data = &stored.entry.event.data;
            let named = |field: &str| data.get(field).and_then(|id| id.as_str());
            for record in [named("id"), named("record_id")].into_iter().flatten() {
                found.records.insert(record.to_string());
            }
            if let Some(thread) = named("thread_id") {
                found.thread_ids.insert(thread.to_string());
            }
        }
        for (_, change) in self.mailbox_changes()? {
            found.records.insert(change.record_id);
        }
        Ok(found)
    }

    /// History entries written before `cutoff` go, but for those an event
    /// not yet delivered holds its data in.
    fn sweep_history(
        &self,
        cutoff: i64,
        references: &References,
        budget: &mut Budget,
    ) -> StoreResult<usize> {
        let mut removed = 0;
        for k in self.history.iter().keys() {
            let k = k.map_err(engine)?;
            let old = time_of_history_key(&k).is_some_and(|time| time < cutoff);
            if !old || references.history_keys.contains(k.as_ref()) {
                continue;
            }
            if !budget.take() {
                break;
            }
            self.history.remove(&k).map_err(engine)?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Places of synced messages that no cursor stands over any more: under
    /// a folder's UIDVALIDITY before its current one, or of a folder that
    /// has no cursor (no longer watched). The record's pointer to such a
    /// place goes with it.
    fn sweep_located(&self, budget: &mut Budget) -> StoreResult<usize> {
        let mut cursors: HashMap<Vec<u8>, Option<u32>> = HashMap::new();
        let mut removed = 0;
        for item in self.located.iter() {
            let (k, v) = item.map_err(engine)?;
            // mailbox \0 folder \0 UIDVALIDITY UID: the cursor's key, then the place.
            let Some(place_at) = k.len().checked_sub(8) else {
                continue;
            };
            let (Some(cursor_key), Some(place)) =
                (k.get(..place_at.saturating_sub(1)), k.get(place_at..))
            else {
                continue;
            };
            let uid_validity = u32::from_be_bytes([place[0], place[1], place[2], place[3]]);
            let uid = u32::from_be_bytes([place[4], place[5], place[6], place[7]]);
            let current = match cursors.get(cursor_key) {
                Some(current) => *current,
                None => {
                    let current = self
                        .cursors
                        .get(cursor_key)
                        .map_err(engine)?
                        .and_then(|value| decode::<FolderCursor>(&value).ok())
                        .map(|cursor| cursor.uid_validity);
                    cursors.insert(cursor_key.to_vec(), current);
                    current
                }
            };
            if current == Some(uid_validity) {
                continue;
            }
            if !budget.take() {
                break;
            }
            let Ok(entry) = decode::<crate::model::LocatedMessage>(&v) else {
                // Unreadable: nothing can use it.
                self.located.remove(&k).map_err(engine)?;
                removed += 1;
                continue;
            };
            let mailbox =
                String::from_utf8_lossy(cursor_key.split(|b| *b == 0).next().unwrap_or_default())
                    .into_owned();
            let gone = (&self.located, &self.record_locations)
                .transaction(|(located, record_locations)| {
                    if located.get(&k)?.as_deref() != Some(v.as_ref()) {
                        return Ok(false);
                    }
                    located.remove(&k)?;
                    if let Some(at) = record_locations.get(entry.record_id.as_bytes())?
                        && let Ok(at) = decode::<MessageLocation>(&at)
                        && at.mailbox == mailbox
                        && at.uid_validity == uid_validity
                        && at.uid == uid
                        && cursor_key.ends_with(at.folder.key().as_bytes())
                    {
                        record_locations.remove(entry.record_id.as_bytes())?;
                    }
                    Ok::<_, ConflictableTransactionError<crate::store::StoreError>>(true)
                })
                .map_err(tx_error)?;
            if gone {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Records of synced messages made before `cutoff` that are in no
    /// watched folder, with their "already synced" marks (R21), unless an
    /// undelivered event or a queued change names them. Each goes in a
    /// commit that checks the record is still not located, so a message
    /// found again meanwhile keeps it.
    fn sweep_records(
        &self,
        cutoff: i64,
        references: &References,
        budget: &mut Budget,
    ) -> StoreResult<(usize, usize)> {
        let removable = |record: &str| {
            minted_at_ms(record).is_some_and(|at| at < cutoff)
                && !references.records.contains(record)
        };
        let mut records = 0;
        for k in self.record_info.iter().keys() {
            let k = k.map_err(engine)?;
            if !removable(&String::from_utf8_lossy(&k)) {
                continue;
            }
            if !budget.take() {
                break;
            }
            if self.remove_unless_located(&self.record_info, &k, &k)? {
                records += 1;
            }
        }
        let mut synced = 0;
        for item in self.synced.iter() {
            let (k, record) = item.map_err(engine)?;
            if !removable(&String::from_utf8_lossy(&record)) {
                continue;
            }
            if !budget.take() {
                break;
            }
            if self.remove_unless_located(&self.synced, &k, &record)? {
                synced += 1;
            }
        }
        Ok((records, synced))
    }

    /// Removes `k` from `tree` in a commit that finds `record` not located.
    fn remove_unless_located(
        &self,
        tree: &sled::Tree,
        k: &[u8],
        record: &[u8],
    ) -> StoreResult<bool> {
        (tree, &self.record_locations)
            .transaction(|(tree, record_locations)| {
                if record_locations.get(record)?.is_some() {
                    return Ok(false);
                }
                Ok(tree.remove(k)?.is_some())
            })
            .map_err(tx_error)
    }

    /// Settled sends made before `cutoff`, with their index entries and,
    /// once past its 48 hours, their idempotency key. A send still queued,
    /// being submitted or waiting to be filed stays whatever its age.
    fn sweep_sends(&self, now_ms: i64, cutoff: i64, budget: &mut Budget) -> StoreResult<usize> {
        let mut removed = 0;
        for item in self.sends.iter() {
            let (k, v) = item.map_err(engine)?;
            let Ok(send) = decode::<SendRecord>(&v) else {
                continue;
            };
            if !send.is_settled() || send.created_at.timestamp_millis() >= cutoff {
                continue;
            }
            if !budget.take() {
                break;
            }
            let message_keys: Vec<Vec<u8>> = std::iter::once(&send.message_id)
                .chain(send.submitted_message_id.as_ref())
                .map(|message_id| key(&[&send.mailbox, message_id]))
                .collect();
            let idempotency_key = send
                .idempotency_key
                .as_ref()
                .map(|idempotency| key(&[&send.location_id, &send.user_id, idempotency]));
            let unsettled_at = unsettled_key(&send);
            let gone = (
                &self.sends,
                &self.crm_message_ids,
                &self.unsettled,
                &self.idempotency,
            )
                .transaction(|(sends, crm_ids, unsettled, idempotency)| {
                    if sends.get(&k)?.as_deref() != Some(v.as_ref()) {
                        return Ok(false);
                    }
                    sends.remove(&k)?;
                    for message_key in &message_keys {
                        if crm_ids.get(message_key.as_slice())?.as_deref()
                            == Some(send.id.as_bytes())
                        {
                            crm_ids.remove(message_key.as_slice())?;
                        }
                    }
                    unsettled.remove(unsettled_at.as_slice())?;
                    if let Some(at) = &idempotency_key
                        && let Some(value) = idempotency.get(at.as_slice())?
                        && let Ok(entry) = decode::<IdempotencyEntry>(&value)
                        && entry.send_id == send.id
                        && now_ms - entry.created_ms >= IDEMPOTENCY_WINDOW_MS
                    {
                        idempotency.remove(at.as_slice())?;
                    }
                    Ok::<_, ConflictableTransactionError<crate::store::StoreError>>(true)
                })
                .map_err(tx_error)?;
            if gone {
                self.sources.remove(&send.id, SourceCopy::Submission);
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Threads made before `cutoff` that nothing names any more (no history
    /// entry, message record, located message, send, undelivered event),
    /// with their thread keys, in one commit per thread that checks the
    /// thread is unchanged (a message joining it meanwhile keeps it).
    /// Thread keys whose thread is gone go too.
    fn sweep_threads(
        &self,
        cutoff: i64,
        references: &References,
        budget: &mut Budget,
    ) -> StoreResult<(usize, usize)> {
        let mut candidates: HashMap<Vec<u8>, sled::IVec> = HashMap::new();
        for item in self.threads.iter() {
            let (k, v) = item.map_err(engine)?;
            let Ok(thread) = decode::<Thread>(&v) else {
                continue;
            };
            if thread.created_at.timestamp_millis() < cutoff
                && !references.thread_ids.contains(&thread.id)
            {
                if candidates.len() >= budget.left.max(1) {
                    budget.more = true;
                    break;
                }
                candidates.insert(k.to_vec(), v);
            }
        }
        let mut thread_keys = 0;
        if !candidates.is_empty() {
            for tree in [&self.history, &self.record_info, &self.located, &self.sends] {
                for value in tree.iter().values() {
                    let value = value.map_err(engine)?;
                    if let Ok(names) = decode::<NamesThread>(&value) {
                        candidates.remove(names.thread_id.as_bytes());
                    }
                }
            }
        }
        // Which keys lead to each thread that goes; keys of missing threads go now.
        let mut keys_of: HashMap<Vec<u8>, Vec<sled::IVec>> = HashMap::new();
        for item in self.thread_keys.iter() {
            let (k, thread_id) = item.map_err(engine)?;
            if candidates.contains_key(thread_id.as_ref()) {
                keys_of.entry(thread_id.to_vec()).or_default().push(k);
            } else if !self.threads.contains_key(&thread_id).map_err(engine)?
                && budget.take()
                && self
                    .thread_keys
                    .compare_and_swap(&k, Some(&thread_id), None as Option<&[u8]>)
                    .map_err(engine)?
                    .is_ok()
            {
                thread_keys += 1;
            }
        }
        let mut threads = 0;
        for (thread_id, value) in candidates {
            if !budget.take() {
                break;
            }
            let keys = keys_of.remove(&thread_id).unwrap_or_default();
            let gone = (&self.threads, &self.thread_keys)
                .transaction(|(threads, thread_keys)| {
                    if threads.get(&thread_id)?.as_deref() != Some(value.as_ref()) {
                        return Ok(0);
                    }
                    threads.remove(thread_id.as_slice())?;
                    let mut removed = 0;
                    for k in &keys {
                        if thread_keys.get(k)?.as_deref() == Some(thread_id.as_slice()) {
                            thread_keys.remove(k)?;
                            removed += 1;
                        }
                    }
                    Ok::<_, ConflictableTransactionError<crate::store::StoreError>>(removed + 1)
                })
                .map_err(tx_error)?;
            if gone > 0 {
                threads += 1;
                thread_keys += gone - 1;
            }
        }
        Ok((threads, thread_keys))
    }

    /// Idempotency keys past their 48 hours: no longer honoured, so no
    /// longer kept.
    fn sweep_idempotency(&self, now_ms: i64, budget: &mut Budget) -> StoreResult<usize> {
        let mut removed = 0;
        for item in self.idempotency.iter() {
            let (k, v) = item.map_err(engine)?;
            let expired = decode::<IdempotencyEntry>(&v)
                .is_ok_and(|entry| now_ms - entry.created_ms >= IDEMPOTENCY_WINDOW_MS);
            if !expired {
                continue;
            }
            if !budget.take() {
                break;
            }
            if self
                .idempotency
                .compare_and_swap(&k, Some(&v), None as Option<&[u8]>)
                .map_err(engine)?
                .is_ok()
            {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Quota entries older than the rolling window (a mailbox that sends no
    /// more never reads, and so never drops, its own).
    fn sweep_quota(&self, now_ms: i64, budget: &mut Budget) -> StoreResult<usize> {
        let since = now_ms - QUOTA_WINDOW_MS;
        let mut removed = 0;
        for k in self.quota.iter().keys() {
            let k = k.map_err(engine)?;
            let Some(prefix_len) = k.iter().position(|b| *b == 0).map(|at| at + 1) else {
                continue;
            };
            if super::time_of_timed_key(&k, prefix_len).is_none_or(|time| time > since) {
                continue;
            }
            if !budget.take() {
                break;
            }
            self.quota.remove(&k).map_err(engine)?;
            removed += 1;
        }
        Ok(removed)
    }

    /// `.submit.eml` copies whose send is gone or can no longer be
    /// submitted (sent or failed): left by a crash between the copy's
    /// write and the send's commit, or between its settling and the
    /// copy's removal.
    fn sweep_submission_copies(&self, now_ms: i64, budget: &mut Budget) -> StoreResult<usize> {
        let written_before = super::super::retention::cutoff_ms(now_ms, ORPHAN_GRACE);
        let mut removed = 0;
        for (send_id, written) in self.sources.submission_copies() {
            if unix_ms(written) >= written_before {
                continue;
            }
            let orphan = match self.send(&send_id)? {
                None => true,
                Some(send) => matches!(send.status, SendStatus::Sent | SendStatus::Failed),
            };
            if !orphan {
                continue;
            }
            if !budget.take() {
                break;
            }
            self.sources.remove(&send_id, SourceCopy::Submission);
            removed += 1;
        }
        Ok(removed)
    }

    /// Event body files no outbox entry refers to (its commit failed, or
    /// the process stopped before the file's removal).
    fn sweep_event_bodies(
        &self,
        now_ms: i64,
        references: &References,
        budget: &mut Budget,
    ) -> StoreResult<usize> {
        let written_before = super::super::retention::cutoff_ms(now_ms, ORPHAN_GRACE);
        let Ok(entries) = std::fs::read_dir(&self.bodies) else {
            return Ok(0);
        };
        let mut removed = 0;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if references.body_files.contains(&name) {
                continue;
            }
            let written = entry.metadata().and_then(|m| m.modified()).ok();
            if written.is_none_or(|written| unix_ms(written) >= written_before) {
                continue;
            }
            // Read again: an entry committed since the outbox was read.
            if self.body_file_in_use(&name)? {
                continue;
            }
            if !budget.take() {
                break;
            }
            if std::fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Whether an outbox entry or an older dead letter keeps its data in this file.
    fn body_file_in_use(&self, name: &str) -> StoreResult<bool> {
        for tree in [&self.outbox, &self.dead_letters] {
            for value in tree.iter().values() {
                let value = value.map_err(engine)?;
                if let Ok(stored) = decode::<StoredEntry>(&value)
                    && stored.data_file.as_deref() == Some(name)
                {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }
}

#[cfg(test)]
impl SledStore {
    /// How many items a tree holds, for the retention tests.
    pub(in crate::store) fn stored_count(&self, tree: &str) -> usize {
        self.db.open_tree(tree).map_or(0, |tree| tree.len())
    }
}

/// One sled tree's live data: what a sweep leaves, beside what the files hold.
#[derive(Debug, Clone)]
pub struct TreeUsage {
    pub name: String,
    pub keys: usize,
    /// Keys and values, in bytes.
    pub bytes: u64,
}

impl SledStore {
    /// Every tree's keys and bytes, and sled's own `size_on_disk`: whether
    /// the database folder's growth is data kept or space not reclaimed
    /// (issue 21 item 1's benchmark). Reads every tree: for diagnosis.
    pub fn live_data(&self) -> StoreResult<(Vec<TreeUsage>, u64)> {
        let mut usage = Vec::new();
        for name in self.db.tree_names() {
            let tree = self.db.open_tree(&name).map_err(engine)?;
            let (mut keys, mut bytes) = (0, 0);
            for item in tree.iter() {
                let (k, v) = item.map_err(engine)?;
                keys += 1;
                bytes += (k.len() + v.len()) as u64;
            }
            usage.push(TreeUsage {
                name: String::from_utf8_lossy(&name).into_owned(),
                keys,
                bytes,
            });
        }
        Ok((usage, self.db.size_on_disk().map_err(engine)?))
    }
}
