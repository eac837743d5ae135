//! The CRM's changes to synced messages (`PATCH`/`DELETE /v1/messages/{id}`),
//! made in the mailbox from a durable queue: read or unread, starred or not,
//! moved to Trash. The answer to the CRM comes at once; a lost connection or
//! a restart only delays the change. The store records the outcome as known
//! when the change is queued, so the watcher does not report it back.

use std::{sync::Arc, time::Duration};

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::{
    auth::Auth,
    backoff,
    imap::{ConnectError, ImapConnector, checked, folders},
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
}

impl MailboxChanges {
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            let next = self.apply_due(&shutdown).await;
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.signal.notified() => {}
                _ = tokio::time::sleep(next.unwrap_or(Duration::from_secs(3600))) => {}
            }
        }
    }

    /// Makes every due change; returns when the next one is due.
    async fn apply_due(&self, shutdown: &CancellationToken) -> Option<Duration> {
        let changes = match self.store.mailbox_changes() {
            Ok(changes) => changes,
            Err(err) => {
                tracing::error!("reading the queued mailbox changes failed: {err:#}");
                return Some(Duration::from_secs(5));
            }
        };
        let now = Utc::now().timestamp_millis();
        let mut next: Option<i64> = None;
        // Changes of one message are made in the order they were asked for:
        // once one waits, the later ones wait behind it.
        let mut waiting: std::collections::HashSet<String> = Default::default();
        for (sequence, mut change) in changes {
            if shutdown.is_cancelled() {
                return None;
            }
            if waiting.contains(&change.record_id) {
                continue;
            }
            if change.next_attempt_ms > now {
                waiting.insert(change.record_id.clone());
                next = Some(next.map_or(change.next_attempt_ms, |n| n.min(change.next_attempt_ms)));
                continue;
            }
            // Should the IMAP parser panic on a malformed answer, a server
            // any tenant chooses must not stop this worker for every mailbox.
            let applied = {
                use futures_util::FutureExt as _;
                std::panic::AssertUnwindSafe(self.apply(&change))
                    .catch_unwind()
                    .await
                    .unwrap_or_else(|_| {
                        Err(Failure::Permanent(
                            "the server sent an answer the IMAP parser could not read".into(),
                        ))
                    })
            };
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
                    waiting.insert(change.record_id.clone());
                    next = Some(
                        next.map_or(change.next_attempt_ms, |n| n.min(change.next_attempt_ms)),
                    );
                    Some(change)
                }
            };
            if let Err(err) = self.store.update_mailbox_change(sequence, outcome.as_ref()) {
                tracing::error!("recording a mailbox change failed: {err:#}");
            }
        }
        next.map(|due| Duration::from_millis(u64::try_from(due - now).unwrap_or(0)))
    }

    /// A move to Trash that will not happen: the message stays followed.
    fn not_made(&self, change: &MailboxChange) {
        if change.to_trash
            && let Err(err) = self.store.restore_location(change)
        {
            tracing::error!(record = %change.record_id, "following the message again failed: {err:#}");
        }
    }

    async fn apply(&self, change: &MailboxChange) -> Result<(), Failure> {
        let address = &change.location.mailbox;
        let mut session = match self.auth.open_imap(&self.connector, address).await {
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
        let result = self.apply_in(&mut session, change, &listed).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), session.logout()).await;
        result
    }

    async fn apply_in(
        &self,
        session: &mut crate::imap::connection::ImapSession,
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

enum Failure {
    /// Trying again cannot help.
    Permanent(String),
    Transient(String),
}
