//! The CRM's changes to synced messages (`PATCH`/`DELETE /v1/messages/{id}`),
//! made in the mailbox from a durable queue: read or unread, starred or not,
//! moved to Trash. The answer to the CRM comes at once; a lost connection or
//! a restart only delays the change. The store records the outcome as known
//! when the change is queued, so the watcher does not report it back.
//!
//! Each mailbox's changes are made in a pass of their own, over one session,
//! and up to `[sync] change_workers` mailboxes' passes run at once: a server
//! that never answers holds up its own mailbox's changes only (issue 21
//! item 5). A mailbox has at most one pass at a time, so the changes of one
//! message are made in the order they were asked for.

use std::{
    collections::{BTreeMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::Utc;
use tokio::{sync::Semaphore, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::{
    auth::Auth,
    backoff,
    imap::{ConnectError, ImapConnector, checked, connection::ImapSession, folders},
    model::{FolderRole, MailboxChange},
    store::Store,
    wakeup::Wakeup,
};

/// How long a change is tried before it is given up (logged).
const GIVE_UP_AFTER: chrono::TimeDelta = chrono::TimeDelta::hours(24);

#[derive(Clone)]
pub struct MailboxChanges {
    pub store: Arc<dyn Store>,
    pub auth: Arc<Auth>,
    pub connector: ImapConnector,
    pub signal: Wakeup,
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// Mailboxes whose changes are being made at once (at least one).
    pub workers: usize,
}

/// One queued change with its place in the queue.
type Queued = (u64, MailboxChange);

/// The mailboxes with a pass under way; a pass takes its mailbox out when it
/// ends, however it ends (a panic too).
#[derive(Clone, Default)]
struct Busy(Arc<Mutex<HashSet<String>>>);

impl Busy {
    fn contains(&self, mailbox: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .contains(mailbox)
    }

    fn take(&self, mailbox: &str) -> BusyMark {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(mailbox.to_string());
        BusyMark {
            busy: self.clone(),
            mailbox: mailbox.to_string(),
        }
    }
}

struct BusyMark {
    busy: Busy,
    mailbox: String,
}

impl Drop for BusyMark {
    fn drop(&mut self) {
        self.busy
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&self.mailbox);
    }
}

impl MailboxChanges {
    pub async fn run(self, shutdown: CancellationToken) {
        let busy = Busy::default();
        let permits = Arc::new(Semaphore::new(self.workers.max(1)));
        let mut passes: JoinSet<()> = JoinSet::new();
        loop {
            let next = self.dispatch(&busy, &permits, &mut passes, &shutdown);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.signal.notified() => {}
                // A pass ended: its mailbox may have more, or a worker is free.
                Some(ended) = passes.join_next() => {
                    if let Err(err) = ended
                        && err.is_panic()
                    {
                        tracing::error!("a pass of mailbox changes panicked: {err}");
                    }
                }
                _ = tokio::time::sleep(next.unwrap_or(Duration::from_secs(3600))) => {}
            }
        }
        // Passes stop between changes once cancelled; one stuck on a silent
        // server is not waited for (its change stays queued).
        let grace = tokio::time::sleep(Duration::from_secs(2));
        tokio::pin!(grace);
        loop {
            tokio::select! {
                ended = passes.join_next() => if ended.is_none() { return },
                _ = &mut grace => break,
            }
        }
        passes.shutdown().await;
    }

    /// Starts a pass for each mailbox with a due change and none under way,
    /// oldest change first, while workers are free; returns when the next
    /// waiting change (of a mailbox not in a pass) is due.
    fn dispatch(
        &self,
        busy: &Busy,
        permits: &Arc<Semaphore>,
        passes: &mut JoinSet<()>,
        shutdown: &CancellationToken,
    ) -> Option<Duration> {
        let changes = match self.store.mailbox_changes() {
            Ok(changes) => changes,
            Err(err) => {
                tracing::error!("reading the queued mailbox changes failed: {err:#}");
                return Some(Duration::from_secs(5));
            }
        };
        let now = Utc::now().timestamp_millis();
        let mut by_mailbox: BTreeMap<String, Vec<Queued>> = BTreeMap::new();
        for queued in changes {
            by_mailbox
                .entry(queued.1.location.mailbox.clone())
                .or_default()
                .push(queued);
        }
        let mut next: Option<i64> = None;
        // Each mailbox by its oldest due change: a mailbox that waited
        // longest gets the next free worker.
        let mut due: Vec<(u64, String)> = Vec::new();
        for (mailbox, queued) in &by_mailbox {
            if busy.contains(mailbox) {
                continue;
            }
            let (first_due, waiting_until) = first_due(queued, now);
            if let Some(at) = waiting_until {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
            if let Some(sequence) = first_due {
                due.push((sequence, mailbox.clone()));
            }
        }
        due.sort_unstable();
        for (_, mailbox) in due {
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                // Every worker is busy: the next one to end looks again.
                break;
            };
            let Some(queued) = by_mailbox.remove(&mailbox) else {
                continue;
            };
            let mark = busy.take(&mailbox);
            let worker = self.clone();
            let shutdown = shutdown.clone();
            passes.spawn(async move {
                let _held = (permit, mark);
                worker.pass(queued, &shutdown).await;
            });
        }
        next.map(|due| Duration::from_millis(u64::try_from(due - now).unwrap_or(0)))
    }

    /// Makes a mailbox's due changes, in order, over one session opened for
    /// the first of them.
    async fn pass(&self, queued: Vec<Queued>, shutdown: &CancellationToken) {
        let now = Utc::now().timestamp_millis();
        // Changes of one message are made in the order they were asked for:
        // once one waits, the later ones wait behind it.
        let mut waiting: HashSet<String> = HashSet::new();
        let mut due: Vec<Queued> = Vec::new();
        for (sequence, change) in queued {
            if waiting.contains(&change.record_id) || change.next_attempt_ms > now {
                waiting.insert(change.record_id.clone());
            } else {
                due.push((sequence, change));
            }
        }
        let Some((_, first)) = due.first() else {
            return;
        };
        let address = first.location.mailbox.clone();
        let mut session = match self.open(&address).await {
            Ok(opened) => Some(opened),
            // The server is the same for every change of the pass: all wait
            // (or end) together, for one login.
            Err(failure) => {
                for (sequence, change) in due {
                    self.record(sequence, change, Err(failure.clone()));
                }
                return;
            }
        };
        let mut rest = due.into_iter();
        while let Some((sequence, change)) = rest.next() {
            if shutdown.is_cancelled() {
                break;
            }
            if waiting.contains(&change.record_id) {
                continue;
            }
            // Should the IMAP parser panic on a malformed answer, a server
            // any tenant chooses must not stop this worker for every mailbox.
            let applied = match session.as_mut() {
                None => Err(Failure::Transient("the session ended".into())),
                Some((session, listed)) => {
                    use futures_util::FutureExt as _;
                    std::panic::AssertUnwindSafe(self.apply_in(session, &change, listed))
                        .catch_unwind()
                        .await
                        .unwrap_or_else(|_| {
                            Err(Failure::Permanent(
                                "the server sent an answer the IMAP parser could not read".into(),
                            ))
                        })
                }
            };
            if let Err(failure @ Failure::Transient(_)) = &applied {
                // A step that failed leaves the session in doubt (a timeout
                // on a silent server): what is left of the pass waits too,
                // rather than a login each.
                let failure = failure.clone();
                waiting.insert(change.record_id.clone());
                self.record(sequence, change, applied);
                for (sequence, change) in rest.by_ref() {
                    self.record(sequence, change, Err(failure.clone()));
                }
                session = None;
                break;
            }
            self.record(sequence, change, applied);
        }
        if let Some((mut session, _)) = session {
            let _ = tokio::time::timeout(Duration::from_secs(2), session.logout()).await;
        }
    }

    /// A session on the mailbox, with its listed folders.
    async fn open(&self, address: &str) -> Result<(ImapSession, Vec<String>), Failure> {
        let session = match self.auth.open_imap(&self.connector, address).await {
            Ok(session) => session,
            Err(ConnectError::Disconnected) => {
                return Err(Failure::Permanent("the mailbox was disconnected".into()));
            }
            Err(err) => return Err(Failure::Transient(err.to_string())),
        };
        let listed = match self.store.mailbox(address) {
            Ok(Some(mailbox)) => mailbox.folders,
            Ok(None) => return Err(Failure::Permanent("the mailbox was disconnected".into())),
            Err(err) => return Err(Failure::Transient(err.to_string())),
        };
        Ok((session, listed))
    }

    /// Stores a change's outcome: made or given up (removed from the queue),
    /// or waiting for its next try.
    fn record(&self, sequence: u64, mut change: MailboxChange, applied: Result<(), Failure>) {
        let outcome = match applied {
            Ok(()) => None,
            Err(Failure::Permanent(why)) => {
                tracing::warn!(record = %change.record_id, mailbox = %change.location.mailbox, "the CRM's change cannot be made in the mailbox: {why}");
                self.not_made(&change);
                None
            }
            Err(Failure::Transient(why)) if Utc::now() - change.created_at > GIVE_UP_AFTER => {
                tracing::error!(record = %change.record_id, mailbox = %change.location.mailbox, "giving up the CRM's change after a day of tries: {why}");
                self.not_made(&change);
                None
            }
            Err(Failure::Transient(why)) => {
                let wait = backoff::delay(change.attempts, self.retry_min, self.retry_max);
                change.attempts += 1;
                change.next_attempt_ms = Utc::now().timestamp_millis()
                    + i64::try_from(wait.as_millis()).unwrap_or(i64::MAX);
                tracing::info!(record = %change.record_id, "the CRM's change waits {wait:?}: {why}");
                Some(change)
            }
        };
        if let Err(err) = self.store.update_mailbox_change(sequence, outcome.as_ref()) {
            tracing::error!("recording a mailbox change failed: {err:#}");
        }
    }

    /// A move to Trash that will not happen: the message stays followed.
    fn not_made(&self, change: &MailboxChange) {
        if change.to_trash
            && let Err(err) = self.store.restore_location(change)
        {
            tracing::error!(record = %change.record_id, "following the message again failed: {err:#}");
        }
    }

    async fn apply_in(
        &self,
        session: &mut ImapSession,
        change: &MailboxChange,
        listed: &[String],
    ) -> Result<(), Failure> {
        let folder = self
            .within(
                "listing folders",
                folders::name_of(session, change.location.folder, listed),
            )
            .await?
            .ok_or_else(|| {
                Failure::Permanent(match change.location.folder {
                    FolderRole::Sent => "the mailbox has no Sent folder".into(),
                    _ => "the folder is no longer watched".into(),
                })
            })?;
        let selected = self
            .within("selecting the folder", session.select(&folder))
            .await?;
        if selected.uid_validity != Some(change.location.uid_validity) {
            return Err(Failure::Permanent(format!(
                "{folder} was renumbered (UIDVALIDITY changed); the message is no longer where it was"
            )));
        }
        let uid = change.location.uid;
        if change.to_trash {
            let trash = self
                .within("listing folders", folders::find_trash(session))
                .await?
                .ok_or_else(|| Failure::Permanent("the mailbox has no Trash folder".into()))?;
            let capabilities = self
                .within("asking the server's capabilities", session.capabilities())
                .await?;
            let trash =
                checked::quoted(&trash).map_err(|err| Failure::Permanent(err.to_string()))?;
            if capabilities.has_str("MOVE") {
                return self
                    .within(
                        "moving the message to Trash",
                        checked::command(session, &format!("UID MOVE {uid} {trash}")),
                    )
                    .await;
            }
            // Without MOVE (RFC 6851): copy, then mark and expunge the
            // original. Only UID EXPUNGE (UIDPLUS) removes this one message
            // alone; a plain EXPUNGE would take every message another client
            // marked deleted, so without it the original stays marked.
            self.within(
                "copying the message to Trash",
                checked::command(session, &format!("UID COPY {uid} {trash}")),
            )
            .await?;
            self.within(
                "marking the original deleted",
                checked::command(
                    session,
                    &format!("UID STORE {uid} +FLAGS.SILENT (\\Deleted)"),
                ),
            )
            .await?;
            if capabilities.has_str("UIDPLUS") {
                self.within(
                    "expunging the original",
                    checked::command(session, &format!("UID EXPUNGE {uid}")),
                )
                .await?;
            }
            return Ok(());
        }
        for (flag, wanted) in [("\\Seen", change.seen), ("\\Flagged", change.flagged)] {
            let Some(set) = wanted else {
                continue;
            };
            let sign = if set { '+' } else { '-' };
            self.within(
                "changing the message's flags",
                checked::command(
                    session,
                    &format!("UID STORE {uid} {sign}FLAGS.SILENT ({flag})"),
                ),
            )
            .await?;
        }
        Ok(())
    }

    async fn within<T, E: std::fmt::Display>(
        &self,
        what: &str,
        step: impl Future<Output = Result<T, E>>,
    ) -> Result<T, Failure> {
        match tokio::time::timeout(self.connector.step_timeout(), step).await {
            Ok(result) => result.map_err(|e| Failure::Transient(format!("{what}: {e}"))),
            Err(_) => Err(Failure::Transient(format!("timed out {what}"))),
        }
    }
}

/// The first change of a mailbox's queue that is due now, and when the
/// earliest waiting one is due: a change waits behind an earlier one of the
/// same message that waits.
fn first_due(queued: &[Queued], now: i64) -> (Option<u64>, Option<i64>) {
    let mut waiting: HashSet<&str> = HashSet::new();
    let mut first = None;
    let mut next: Option<i64> = None;
    for (sequence, change) in queued {
        if waiting.contains(change.record_id.as_str()) {
            continue;
        }
        if change.next_attempt_ms > now {
            waiting.insert(&change.record_id);
            next = Some(next.map_or(change.next_attempt_ms, |n| n.min(change.next_attempt_ms)));
        } else if first.is_none() {
            first = Some(*sequence);
        }
    }
    (first, next)
}

#[derive(Clone)]
enum Failure {
    /// Trying again cannot help.
    Permanent(String),
    Transient(String),
}
