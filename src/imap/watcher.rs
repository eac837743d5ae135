//! One folder of one mailbox, kept in sync on a session it is given: select,
//! settle the cursor, read changes and new mail from the stored cursor. The
//! session itself, IDLE and reconnecting are [`super::session_group`]'s.

use std::{collections::HashMap, sync::Arc, time::Duration};

use async_imap::types::UnsolicitedResponse;

use super::{
    SyncContext, checked, connection::ConnectError, connection::ImapSession, folders,
    inbox_handoff::Verdict,
};
use crate::{
    event_data::{self, MessagePlace},
    ingest::{Found, Tried},
    model::{FlagState, FolderCursor, FolderRole, LocatedMessage},
    store::LocatedChange,
};

/// Bodies fetched per round trip while catching up.
const FETCH_BATCH: usize = 20;
const FETCH_BATCH_BYTES: u64 = 32 * 1024 * 1024;
/// A FETCH gets the step timeout plus time for its size at this rate.
const MIN_DOWNLOAD_BYTES_PER_SEC: u64 = 64 * 1024;

pub enum WatchEnd {
    Cancelled,
    /// The credentials are dead (R20): retrying would only hammer the server.
    NeedsReauth,
    /// The folders were to share one session, but the server has no NOTIFY
    /// (or no CONDSTORE): they go on with one session each, the first with
    /// this one.
    NoNotify(Option<ImapSession>),
}

/// What a session learnt of its server at login.
#[derive(Clone, Copy)]
pub(super) struct ServerFeatures {
    pub condstore: bool,
    pub gmail: bool,
    pub tracking: ChangeTracking,
    /// RFC 5465: one session can hear of changes in several folders.
    pub notify: bool,
}

/// A folder selected on a session, and how far its sync has read.
pub(super) struct Selected {
    pub folder: String,
    pub cursor: FolderCursor,
    /// HIGHESTMODSEQ as SELECT reported it, until the first flag sync after
    /// it has read every change since the cursor.
    pub modseq_at_select: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub(super) enum SessionError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("IMAP: {0}")]
    Imap(#[from] async_imap::error::Error),
    #[error("timed out while {0}")]
    Timeout(&'static str),
    #[error("the server closed the session")]
    Closed,
    #[error("IMAP: {0}")]
    Checked(#[from] checked::CheckedError),
    #[error("the server did not return message {2} of {0}, which is still there; retrying")]
    NotReturned(FolderRole, u32, u32),
    #[error("handling message {1} of {0} failed; retrying: {2}")]
    HandlingFailed(FolderRole, u32, String),
    /// Several folders were to share a session, but the server has no
    /// NOTIFY (or no CONDSTORE).
    #[error("the server has no NOTIFY: one session per folder")]
    NoNotify,
    /// The access token is about to expire: log in again with a renewed one.
    #[error("renewing the login before the access token expires")]
    TokenExpiring,
    /// A watched folder came back or went away: a new session with the
    /// folders the server has now (no failure, no backoff).
    #[error("a watched folder came back or went away")]
    LookAgain,
    #[error("storage: {0}")]
    Store(#[from] crate::store::StoreError),
}

/// A message the server says is there but does not return (Gmail: "Some
/// messages could not be FETCHed") is asked for again in each new session;
/// after this many sessions it is set aside (see `Ingest::failed_try`): listed,
/// reported as `message.unprocessable`, and passed over, so one broken
/// message cannot stop a folder's sync for good.
pub const UNFETCHABLE_AFTER_SESSIONS: u32 = crate::ingest::SET_ASIDE_AFTER_TRIES;

pub struct FolderWatcher {
    pub ctx: Arc<SyncContext>,
    pub address: String,
    pub role: FolderRole,
    /// The mailbox's operator-listed folders (a `Listed` role's name is here).
    pub listed: Arc<[String]>,
    /// Whether the mailbox's All Mail is watched too (Gmail).
    pub all_mail: bool,
    /// What INBOX's watcher read, for All Mail (Gmail): All Mail passes over
    /// a message labelled `\Inbox` only once INBOX read past it.
    pub inbox: Arc<super::inbox_handoff::InboxHandoff>,
    pub idle_period: Duration,
    /// When a failed look-up pass may be tried again.
    pub lookups: std::sync::Mutex<LookupRetry>,
}

impl FolderWatcher {
    pub(super) async fn timed<T, E>(
        &self,
        what: &'static str,
        future: impl Future<Output = Result<T, E>>,
    ) -> Result<T, SessionError>
    where
        SessionError: From<E>,
    {
        match tokio::time::timeout(self.ctx.connector.step_timeout(), future).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(SessionError::Timeout(what)),
        }
    }

    /// What the server offers, asked once per session; QRESYNC is enabled
    /// where it is there.
    pub(super) async fn features(
        &self,
        session: &mut ImapSession,
    ) -> Result<ServerFeatures, SessionError> {
        // CONDSTORE (RFC 7162): flag changes are read by HIGHESTMODSEQ, so
        // a change made while the bridge was away arrives too, once.
        let capabilities = self
            .timed("asking the server's capabilities", session.capabilities())
            .await?;
        let condstore = capabilities.has_str("CONDSTORE");
        // Gmail's extensions (X-GM-LABELS).
        let gmail = capabilities.has_str("X-GM-EXT-1");
        // QRESYNC (RFC 7162) also names what was expunged since (VANISHED).
        let qresync = condstore && capabilities.has_str("QRESYNC");
        let tracking = match (condstore, qresync) {
            (true, true) => ChangeTracking::Qresync,
            (true, false) => ChangeTracking::Condstore,
            (false, _) => ChangeTracking::Resync,
        };
        if qresync {
            self.timed("enabling QRESYNC", checked::enable(session, "QRESYNC"))
                .await?;
        }
        Ok(ServerFeatures {
            condstore,
            gmail,
            tracking,
            notify: capabilities.has_str("NOTIFY"),
        })
    }

    /// The folder's name among those LIST named (`folders`); `None`,
    /// reported as the folder being absent (a warning, not an error), where
    /// the server has no such folder now.
    pub(super) fn resolve(&self, folders: &[checked::Folder]) -> Option<String> {
        let found = folders::name_among(folders, self.role, &self.listed);
        if found.is_none() {
            self.report_absent();
        }
        found
    }

    /// Reports the folder absent from the server, with what that keeps from
    /// syncing; it is looked for again every `absent_folder_check_secs`.
    pub(super) fn report_absent(&self) {
        let name = match self.role {
            FolderRole::Listed(_) => self
                .listed
                .iter()
                .find(|name| FolderRole::listed(name) == self.role)
                .map(String::as_str),
            _ => None,
        };
        if !self.ctx.status.is_absent(&self.address, self.role) {
            tracing::warn!(
                mailbox = %self.address,
                folder = %self.role,
                name,
                "the server has no such folder now: mail in it cannot sync until it is back; the rest of the mailbox syncs"
            );
        }
        self.ctx
            .status
            .absent(&self.address, self.role, name, self.absent_check());
    }

    /// How often an absent folder is looked for again.
    pub(super) fn absent_check(&self) -> Duration {
        Duration::from_secs(self.ctx.sync.absent_folder_check_secs.max(1))
    }

    /// Selects the folder and settles its cursor: where the last session
    /// left it, or the present for a first session (R2), or found again
    /// after the server renumbered the folder (UIDVALIDITY).
    pub(super) async fn select(
        &self,
        session: &mut ImapSession,
        folder: String,
        features: ServerFeatures,
    ) -> Result<Selected, SessionError> {
        let address = self.address.as_str();
        let selected = match features.condstore {
            true => {
                self.timed("selecting the folder", session.select_condstore(&folder))
                    .await?
            }
            false => {
                self.timed("selecting the folder", session.select(&folder))
                    .await?
            }
        };
        let uid_validity = selected.uid_validity.unwrap_or(0);
        let mut cursor = match self.ctx.store.cursor(address, self.role)? {
            Some(cursor) if cursor.uid_validity == uid_validity => cursor,
            Some(old) if old.moved_at.is_none() => {
                // A cursor from before the bridge kept the time it moved: with
                // no window to look in, re-reading from the connect would
                // forward again what was forwarded then. Resume at the end.
                let next_uid = self.next_uid(session, selected.uid_next).await?;
                tracing::warn!(mailbox = address, folder = %folder, "UIDVALIDITY changed from {} to {uid_validity}: resuming at the folder's end (no record of when the cursor last moved)", old.uid_validity);
                let fresh = FolderCursor::new(uid_validity, next_uid);
                self.ctx
                    .store
                    .set_cursor(address, self.role, Some(old), fresh)?;
                fresh
            }
            Some(old) => {
                // The folder's UIDs were renumbered (Dovecot rebuilt its
                // index, the folder was recreated): what arrived since the
                // last handled message is found again by date. Messages
                // forwarded before are not forwarded again (they are known by
                // Message-ID), and mail from before an integration's connect
                // stays out (R2, by the date the server received it).
                let since = self.refind_since(old.moved_at)?;
                let found = self
                    .timed(
                        "finding the mail since the last handled message",
                        checked::uid_search(
                            session,
                            &format!("SINCE {}", since.format("%d-%b-%Y")),
                        ),
                    )
                    .await?;
                let start = match found.iter().min() {
                    Some(first) => *first,
                    None => self.next_uid(session, selected.uid_next).await?,
                };
                tracing::warn!(mailbox = address, folder = %folder, "UIDVALIDITY changed from {} to {uid_validity}: reading again the {} messages received since {since}", old.uid_validity, found.len());
                let fresh = FolderCursor::new(uid_validity, start);
                self.ctx
                    .store
                    .set_cursor(address, self.role, Some(old), fresh)?;
                fresh
            }
            None => {
                // The first session: start at the present, never backfill (R2).
                let next_uid = self.next_uid(session, selected.uid_next).await?;
                let fresh = FolderCursor::new(uid_validity, next_uid);
                self.ctx.store.set_cursor(address, self.role, None, fresh)?;
                fresh
            }
        };
        // The first session with CONDSTORE starts reading changes from now;
        // so does one whose server went back (an index rebuilt under the same
        // UIDVALIDITY), which would otherwise report nothing until it caught up.
        if let (true, Some(now)) = (features.condstore, selected.highest_modseq)
            && cursor.highest_modseq.is_none_or(|kept| kept > now)
        {
            let from_now = FolderCursor {
                highest_modseq: Some(now),
                ..cursor
            };
            self.ctx
                .store
                .set_cursor(address, self.role, Some(cursor), from_now)?;
            cursor = from_now;
        }
        tracing::debug!(mailbox = address, folder = %folder, next_uid = cursor.next_uid, "selected");
        Ok(Selected {
            folder,
            cursor,
            modseq_at_select: selected.highest_modseq,
        })
    }

    /// Whether a folder that is not selected is already caught up, by its
    /// `STATUS` against its stored cursor: UIDNEXT where the cursor is, and
    /// HIGHESTMODSEQ where changes were last read up to. With QRESYNC enabled,
    /// new mail, a flag change and an expunge each raise HIGHESTMODSEQ (RFC
    /// 7162: VANISHED (EARLIER) names expunges by modseq); with CONDSTORE
    /// alone an expunge may not, so there the folder is always visited. A
    /// session that starts again (a restart, a reconnect) then visits only
    /// the folders that changed while it was away. Where in doubt (no
    /// cursor, no figure, a modseq of 0, which means none is kept), the
    /// folder is visited.
    pub(super) fn caught_up_by_cursor(
        &self,
        features: ServerFeatures,
        figures: &checked::FolderFigures,
    ) -> bool {
        if features.tracking != ChangeTracking::Qresync {
            return false;
        }
        let Ok(Some(cursor)) = self.ctx.store.cursor(&self.address, self.role) else {
            return false;
        };
        figures.uid_validity == Some(cursor.uid_validity)
            && figures.uid_next == Some(cursor.next_uid)
            && figures.highest_modseq.is_some_and(|modseq| modseq > 0)
            && figures.highest_modseq == cursor.highest_modseq
    }

    /// Reports the folder caught up: after a sync, or by its STATUS alone.
    pub(super) fn report_caught_up(&self, folder: &str) {
        self.ctx.status.caught_up(&self.address, self.role, folder);
    }

    /// Reads the selected folder's changes and new mail until nothing more
    /// was announced (bounded), then reports it caught up. Other folders the
    /// server named meanwhile (NOTIFY's `STATUS`) are added to `named`.
    pub(super) async fn sync(
        &self,
        session: &mut ImapSession,
        selected: &mut Selected,
        features: ServerFeatures,
        named: &mut Vec<String>,
    ) -> Result<(), SessionError> {
        let Selected {
            folder,
            cursor,
            modseq_at_select,
        } = selected;
        let mut looks_in_a_row = 0;
        loop {
            // What async-imap queued so far is covered by the catch-up below.
            while let Ok(queued) = session.unsolicited_responses.try_recv() {
                if let UnsolicitedResponse::Status { mailbox, .. } = queued {
                    named.push(mailbox);
                }
            }
            // New mail first, and again between the look-ups of messages
            // that left (see `follow_vanished`): a mass move never keeps it
            // waiting. Flag changes are cheap, and committed at once.
            let read = self
                .read_changes(
                    session,
                    features.tracking,
                    features.gmail,
                    cursor,
                    modseq_at_select.take(),
                )
                .await?;
            let changes = self.flag_changes(folder, cursor, read.changed)?;
            // The HIGHESTMODSEQ moves once the messages that left are placed.
            let settled = read.vanished.is_empty();
            self.commit_changes(folder, cursor, read.highest.filter(|_| settled), &changes)?;
            if settled {
                self.lookups_done();
            }
            let mut more = read.announced;
            more |= self
                .catch_up(session, folder, features.gmail, cursor)
                .await?;
            if !settled {
                more |= Box::pin(self.follow_vanished(
                    session,
                    folder,
                    features.gmail,
                    cursor,
                    read.vanished,
                    read.highest,
                ))
                .await?;
            }
            // A change announced in the answer to one of our commands is not
            // repeated in IDLE: look again first. Bounded, so a server that
            // always says something cannot keep the session from IDLE.
            if more && looks_in_a_row < MAX_LOOKS_IN_A_ROW {
                looks_in_a_row += 1;
                continue;
            }
            self.report_caught_up(folder);
            if self.role == FolderRole::Inbox {
                self.inbox.set_live(true);
            }
            return Ok(());
        }
    }

    /// The folder's UIDNEXT; a server that does not say is asked for its
    /// highest UID instead (a missing UIDNEXT must never mean "from 1").
    async fn next_uid(
        &self,
        session: &mut ImapSession,
        said: Option<u32>,
    ) -> Result<u32, SessionError> {
        if let Some(next) = said {
            return Ok(next);
        }
        let last = self
            .timed(
                "finding the last UID",
                checked::uid_fetch(session, "*", "(UID)"),
            )
            .await?;
        Ok(last
            .messages
            .iter()
            .map(|m| m.uid)
            .max()
            .map_or(1, |uid| uid.saturating_add(1)))
    }

    /// From when to look for mail again after a UIDVALIDITY change: a day
    /// before the cursor last moved (IMAP SEARCH SINCE has a day's grain and
    /// the server's time zone), and never before the integrations began.
    fn refind_since(
        &self,
        moved_at: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Result<chrono::NaiveDate, SessionError> {
        let integrations = self.ctx.store.integrations_of_mailbox(&self.address)?;
        let connected = integrations.iter().map(|i| i.connected_at).min();
        let from = match (moved_at, connected) {
            (Some(moved), Some(connected)) => moved.max(connected),
            (Some(moved), None) => moved,
            (None, Some(connected)) => connected,
            (None, None) => chrono::Utc::now(),
        };
        Ok((from - chrono::TimeDelta::days(1)).date_naive())
    }

    /// Reads what happened to synced messages since the last look: flag
    /// changes (\\Seen, \\Flagged, \\Answered), and which messages left the
    /// folder. Read as the server allows (see [`ChangeTracking`]); nothing is
    /// committed here.
    async fn read_changes(
        &self,
        session: &mut ImapSession,
        tracking: ChangeTracking,
        gmail: bool,
        cursor: &FolderCursor,
        modseq_at_select: Option<u64>,
    ) -> Result<ReadChanges, SessionError> {
        let last_uid = cursor.next_uid.saturating_sub(1);
        let mut read = ReadChanges {
            announced: false,
            highest: cursor.highest_modseq,
            changed: Vec::new(),
            vanished: Vec::new(),
        };
        match tracking {
            ChangeTracking::Qresync | ChangeTracking::Condstore => {
                let Some(since) = cursor.highest_modseq else {
                    return Ok(read);
                };
                let (answer, gone) = self
                    .timed(
                        "reading flag changes",
                        checked::changes_since(
                            session,
                            since,
                            tracking == ChangeTracking::Qresync,
                            gmail,
                        ),
                    )
                    .await?;
                read.announced |= answer.announced;
                for fetched in answer.messages {
                    read.highest = read.highest.max(fetched.modseq);
                    // Newer ones are read, flags and all, by the next catch-up.
                    if let (Some(flags), true) = (&fetched.flags, fetched.uid <= last_uid) {
                        read.changed.push((
                            fetched.uid,
                            FlagState::from_flags(flags),
                            fetched.labels,
                        ));
                    }
                }
                // Every change up to SELECT's HIGHESTMODSEQ was just read,
                // expunges included (VANISHED). Expunges carry no modseq of
                // their own: without this, the cursor would stay below the
                // server's figure after one, and the folder would be
                // visited again at every start to find nothing.
                if tracking == ChangeTracking::Qresync {
                    read.highest = read.highest.max(modseq_at_select);
                }
                for range in gone {
                    // A server may name a range high end first (`9:3`).
                    let first = (*range.start()).min(*range.end());
                    let last = (*range.start()).max(*range.end()).min(last_uid);
                    if first <= last {
                        read.vanished.extend(self.ctx.store.located_in(
                            &self.address,
                            self.role,
                            cursor.uid_validity,
                            first..=last,
                            usize::MAX,
                        )?);
                    }
                }
                if tracking == ChangeTracking::Condstore && last_uid > 0 {
                    // No VANISHED without QRESYNC (Gmail): whether the latest
                    // synced messages are still here is asked instead.
                    let latest = self.ctx.store.located_in(
                        &self.address,
                        self.role,
                        cursor.uid_validity,
                        1..=last_uid,
                        RECHECKED_MESSAGES,
                    )?;
                    if !latest.is_empty() {
                        let uids: Vec<u32> = latest.iter().map(|(uid, _)| *uid).collect();
                        let mut present = Vec::new();
                        // Short command lines: servers refuse long ones (RFC 7162 §4).
                        for chunk in uids.chunks(UIDS_PER_COMMAND) {
                            let (found, changed_meanwhile) = self
                                .timed(
                                    "checking synced messages are still there",
                                    checked::uid_search_announcing(
                                        session,
                                        &format!("UID {}", checked::uid_set(chunk)),
                                    ),
                                )
                                .await?;
                            read.announced |= changed_meanwhile;
                            present.extend(found);
                        }
                        read.vanished
                            .extend(latest.into_iter().filter(|(uid, _)| !present.contains(uid)));
                    }
                }
            }
            ChangeTracking::Resync => {
                if last_uid == 0 {
                    return Ok(read);
                }
                let latest = self.ctx.store.located_in(
                    &self.address,
                    self.role,
                    cursor.uid_validity,
                    1..=last_uid,
                    RECHECKED_MESSAGES,
                )?;
                if latest.is_empty() {
                    return Ok(read);
                }
                let uids: Vec<u32> = latest.iter().map(|(uid, _)| *uid).collect();
                // A refused FETCH is an error, never "all gone".
                let mut returned: HashMap<u32, FlagState> = HashMap::new();
                for chunk in uids.chunks(UIDS_PER_COMMAND) {
                    let answer = self
                        .timed(
                            "reading the flags of synced messages",
                            checked::uid_fetch(session, &checked::uid_set(chunk), "(UID FLAGS)"),
                        )
                        .await?;
                    read.announced |= answer.announced;
                    returned.extend(
                        answer.messages.iter().filter_map(|f| {
                            Some((f.uid, FlagState::from_flags(f.flags.as_ref()?)))
                        }),
                    );
                }
                for (uid, located) in latest {
                    match returned.get(&uid) {
                        Some(flags) => read.changed.push((uid, *flags, None)),
                        None => read.vanished.push((uid, located)),
                    }
                }
            }
        }
        Ok(read)
    }

    /// The `message.updated` of each flag (or label) change read.
    fn flag_changes(
        &self,
        folder: &str,
        cursor: &FolderCursor,
        changed: Vec<(u32, FlagState, Option<Vec<String>>)>,
    ) -> Result<Vec<LocatedChange>, SessionError> {
        let mut changes = Vec::new();
        for (uid, now, labels) in changed {
            let Some(located) =
                self.ctx
                    .store
                    .located(&self.address, self.role, cursor.uid_validity, uid)?
            else {
                continue;
            };
            let labels_changed = labels.is_some() && labels != located.labels;
            if located.flags == now && !labels_changed {
                continue;
            }
            let events = event_data::message_changed(
                &crate::ingest::still_synced(self.ctx.store.as_ref(), &located)?,
                "message.updated",
                &self.address,
                MessagePlace {
                    folder: Some(folder),
                    previous_folder: None,
                    flags: now,
                    labels: labels.as_deref(),
                },
            );
            changes.push(LocatedChange {
                uid_validity: cursor.uid_validity,
                uid,
                flags_before: located.flags,
                flags_after: Some(now),
                labels_after: labels,
                moved_to: None,
                events,
            });
        }
        Ok(changes)
    }

    /// Commits `changes` with their events, and the folder's HIGHESTMODSEQ
    /// where `highest` moves it, at once.
    fn commit_changes(
        &self,
        folder: &str,
        cursor: &mut FolderCursor,
        highest: Option<u64>,
        changes: &[LocatedChange],
    ) -> Result<(), SessionError> {
        let moves_modseq = highest.is_some() && highest != cursor.highest_modseq;
        if !moves_modseq && changes.is_empty() {
            return Ok(());
        }
        let count: usize = changes.iter().map(|c| c.events.len()).sum();
        let highest = if moves_modseq { highest } else { None };
        crate::offload::blocking(|| {
            self.ctx
                .store
                .commit_flag_changes(&self.address, self.role, *cursor, highest, changes)
        })?;
        if highest.is_some() {
            cursor.highest_modseq = highest;
        }
        if count > 0 {
            self.ctx.signal.notify();
            tracing::info!(mailbox = %self.address, folder, events = count, "synced messages changed");
        }
        Ok(())
    }

    /// What the change of a message that left `folder` is, by where it is
    /// now; None where nothing changed.
    fn departure(
        &self,
        folder: &str,
        cursor: &FolderCursor,
        uid: u32,
        located: &LocatedMessage,
        whereabouts: Whereabouts,
    ) -> Result<Option<LocatedChange>, SessionError> {
        let (kind, now_in, moved_to) = match whereabouts {
            Whereabouts::Unchanged => return Ok(None),
            // Moved out and straight back, to a UID the catch-up has not
            // reached: it follows the message from there (R21).
            Whereabouts::Back(new_uid) if new_uid >= cursor.next_uid => {
                return Ok(Some(LocatedChange {
                    uid_validity: cursor.uid_validity,
                    uid,
                    flags_before: located.flags,
                    flags_after: None,
                    labels_after: None,
                    moved_to: None,
                    events: Vec::new(),
                }));
            }
            // The catch-up passed its new UID while the message was still
            // followed at its old one (and so did not follow it again):
            // followed at the new one from here, as the catch-up would have.
            Whereabouts::Back(new_uid) => (
                "message.updated",
                Some(folder.to_string()),
                Some((self.role, cursor.uid_validity, new_uid)),
            ),
            // Followed in its new folder from here on; that folder's
            // watcher knows it and does not report it again.
            Whereabouts::Watched { name, at } => ("message.updated", Some(name), Some(at)),
            Whereabouts::Elsewhere(name) => ("message.updated", Some(name), None),
            Whereabouts::Binned(name) => ("message.deleted", Some(name), None),
            Whereabouts::Nowhere => ("message.deleted", None, None),
        };
        let back = now_in.as_deref() == Some(folder);
        let events = event_data::message_changed(
            &crate::ingest::still_synced(self.ctx.store.as_ref(), located)?,
            kind,
            &self.address,
            MessagePlace {
                folder: now_in.as_deref(),
                previous_folder: (!back).then_some(folder),
                flags: located.flags,
                labels: None,
            },
        );
        Ok(Some(LocatedChange {
            uid_validity: cursor.uid_validity,
            uid,
            flags_before: located.flags,
            flags_after: None,
            labels_after: None,
            moved_to,
            events,
        }))
    }

    /// Finds where the `vanished` messages went and reports it, committed
    /// chunk by chunk, with a catch-up of the folder's new mail after each
    /// chunk: a mass move or delete never keeps new mail waiting. Each
    /// folder of the mailbox is opened once per pass, over a second
    /// session (this one stays on its folder), and searched for all the
    /// Message-IDs still not found, many per SEARCH; Trash and Junk first,
    /// All Mail and the rest last. The folder's HIGHESTMODSEQ moves to
    /// `highest` only once every message is placed: a pass cut short is
    /// taken up by the next look, which reads the same changes again and
    /// finds the messages placed meanwhile no longer followed here.
    ///
    /// A failure of the second session ends the pass, not this session: it
    /// is logged and the pass is tried again after a backoff (see
    /// [`FolderWatcher::lookups_due_in`]). Returns whether the server
    /// announced a change meanwhile.
    async fn follow_vanished(
        &self,
        session: &mut ImapSession,
        folder: &str,
        gmail: bool,
        cursor: &mut FolderCursor,
        vanished: Vec<(u32, LocatedMessage)>,
        highest: Option<u64>,
    ) -> Result<bool, SessionError> {
        if self
            .lookups_due_in()
            .is_some_and(|wait| wait > Duration::ZERO)
        {
            return Ok(false);
        }
        // Without a Message-ID a message cannot be looked for: taken as
        // gone. So is one that cannot go in a command (CR, LF): sending it
        // would let a message's header write IMAP commands.
        let mut unfound: std::collections::BTreeMap<String, Vec<(u32, LocatedMessage)>> =
            Default::default();
        let mut gone = Vec::new();
        for (uid, located) in vanished {
            match located
                .message_id
                .as_deref()
                .filter(|id| checked::quoted(id).is_ok())
            {
                Some(id) => unfound
                    .entry(id.to_string())
                    .or_default()
                    .push((uid, located)),
                None => gone.push((uid, located, Whereabouts::Nowhere)),
            }
        }
        let settled = unfound.is_empty();
        let mut announced = Box::pin(self.report_departures(
            session,
            folder,
            gmail,
            cursor,
            gone,
            highest.filter(|_| settled),
        ))
        .await?;
        if settled {
            self.lookups_done();
            return Ok(announced);
        }
        let mut lookup = None;
        let searched = self
            .search_folders(
                session,
                folder,
                gmail,
                cursor,
                &mut unfound,
                &mut lookup,
                &mut announced,
            )
            .await;
        if let Some(Lookup { mut session, .. }) = lookup {
            let _ = tokio::time::timeout(Duration::from_secs(2), session.logout()).await;
        }
        match searched {
            Ok(()) => {}
            Err(Failed::Here(err)) => return Err(err),
            // Dead credentials (R20) or a disconnected mailbox end every
            // session of the mailbox, this one too.
            Err(Failed::Lookup(
                err @ SessionError::Connect(
                    ConnectError::NeedsReauth(_) | ConnectError::Disconnected,
                ),
            )) => return Err(err),
            Err(Failed::Lookup(err)) => {
                self.lookups_failed(&err, unfound.values().map(Vec::len).sum());
                return Ok(announced);
            }
        }
        // No folder holds what is left: expunged.
        let gone = unfound
            .into_values()
            .flatten()
            .map(|(uid, located)| (uid, located, Whereabouts::Nowhere))
            .collect();
        announced |=
            Box::pin(self.report_departures(session, folder, gmail, cursor, gone, highest)).await?;
        self.lookups_done();
        Ok(announced)
    }

    /// Reports where messages that left `folder` went, committed a slice
    /// at a time; `highest` (the HIGHESTMODSEQ) moves with the last slice.
    /// Before each slice, while the webhook is behind, the pass waits and
    /// catches up new mail meanwhile: a mass change's reports never queue
    /// far ahead of new mail's events (the outbox is delivered oldest first).
    /// It waits at most [`REPORTS_WAIT`] a slice, so a webhook that is down
    /// slows the pass but does not stop it. Returns whether the server
    /// announced a change meanwhile.
    async fn report_departures(
        &self,
        session: &mut ImapSession,
        folder: &str,
        gmail: bool,
        cursor: &mut FolderCursor,
        departures: Vec<(u32, LocatedMessage, Whereabouts)>,
        highest: Option<u64>,
    ) -> Result<bool, SessionError> {
        let mut announced = false;
        let mut left = departures.into_iter().peekable();
        loop {
            let waiting_from = tokio::time::Instant::now();
            while left.peek().is_some()
                && self.ctx.store.outbox_len()? > REPORTS_AHEAD
                && waiting_from.elapsed() < REPORTS_WAIT
            {
                tokio::time::sleep(REPORTS_POLL).await;
                announced |= self.catch_up_now(session, folder, gmail, cursor).await?;
            }
            // Judged now, against the cursor as the catch-ups left it.
            let mut slice: Vec<LocatedChange> = Vec::new();
            for (uid, located, whereabouts) in left.by_ref().take(REPORTED_AT_ONCE) {
                if let Some(change) = self.departure(folder, cursor, uid, &located, whereabouts)? {
                    slice.push(change);
                }
            }
            let last = left.peek().is_none();
            self.commit_changes(folder, cursor, highest.filter(|_| last), &slice)?;
            if last {
                return Ok(announced);
            }
        }
    }

    /// The look-up pass of [`FolderWatcher::follow_vanished`]: what each
    /// folder holds of `unfound` is committed and taken out of it, with a
    /// catch-up after each SEARCH.
    #[allow(clippy::too_many_arguments)]
    async fn search_folders(
        &self,
        session: &mut ImapSession,
        folder: &str,
        gmail: bool,
        cursor: &mut FolderCursor,
        unfound: &mut std::collections::BTreeMap<String, Vec<(u32, LocatedMessage)>>,
        lookup: &mut Option<Lookup>,
        announced: &mut bool,
    ) -> Result<(), Failed> {
        let opened = self
            .catching_up(
                session,
                folder,
                gmail,
                cursor,
                announced,
                Box::pin(self.open_lookup(folder)),
            )
            .await?;
        let Lookup {
            session: looking,
            folders,
        } = lookup.insert(opened);
        let sent = folders::sent_among(folders);
        let watched_role = |candidate: &checked::Folder| -> Option<FolderRole> {
            let name = candidate.name.as_str();
            if candidate.is_all {
                self.all_mail.then_some(FolderRole::All)
            } else if name.eq_ignore_ascii_case("INBOX") {
                Some(FolderRole::Inbox)
            } else if sent.as_deref() == Some(name) {
                Some(FolderRole::Sent)
            } else {
                self.listed
                    .iter()
                    .any(|listed| listed == name)
                    .then(|| FolderRole::listed(name))
            }
        };
        for candidate in folders.iter().filter(|f| !f.no_select) {
            if unfound.is_empty() {
                break;
            }
            // A folder the server will not open is no answer about the
            // messages, and must not stop the watch: it is passed over.
            let examine = async {
                match tokio::time::timeout(
                    self.ctx.connector.step_timeout(),
                    looking.examine(&candidate.name),
                )
                .await
                {
                    Ok(Ok(opened)) => Ok(Some(opened)),
                    Ok(Err(async_imap::error::Error::No(_) | async_imap::error::Error::Bad(_))) => {
                        Ok(None)
                    }
                    Ok(Err(err)) => Err(SessionError::from(err)),
                    Err(_) => Err(SessionError::Timeout("opening a folder")),
                }
            };
            let Some(opened) = self
                .catching_up(session, folder, gmail, cursor, announced, examine)
                .await?
            else {
                continue;
            };
            if opened.exists == 0 {
                continue;
            }
            let ids: Vec<String> = unfound.keys().cloned().collect();
            for chunk in search_chunks(&ids) {
                let held = self
                    .catching_up(
                        session,
                        folder,
                        gmail,
                        cursor,
                        announced,
                        self.held_in(looking, chunk),
                    )
                    .await?;
                let mut departures = Vec::new();
                for (id, uids) in held {
                    let Some(messages) = unfound.remove(&id) else {
                        continue;
                    };
                    let Some(new_uid) = uids.iter().max().copied() else {
                        continue;
                    };
                    for (uid, located) in messages {
                        let whereabouts = if candidate.name == folder {
                            // Still at its UID: the server's earlier answer missed it.
                            if uids.contains(&uid) {
                                Whereabouts::Unchanged
                            } else {
                                Whereabouts::Back(new_uid)
                            }
                        } else if candidate.is_bin {
                            Whereabouts::Binned(candidate.name.clone())
                        } else {
                            match (watched_role(candidate), opened.uid_validity) {
                                (Some(role), Some(uid_validity)) if role != self.role => {
                                    Whereabouts::Watched {
                                        name: candidate.name.clone(),
                                        at: (role, uid_validity, new_uid),
                                    }
                                }
                                _ => Whereabouts::Elsewhere(candidate.name.clone()),
                            }
                        };
                        departures.push((uid, located, whereabouts));
                    }
                }
                *announced |= Box::pin(
                    self.report_departures(session, folder, gmail, cursor, departures, None),
                )
                .await
                .map_err(Failed::Here)?;
                // New mail first again, before the next SEARCH.
                *announced |= self
                    .catch_up_now(session, folder, gmail, cursor)
                    .await
                    .map_err(Failed::Here)?;
            }
        }
        Ok(())
    }

    /// Runs `step`, a command of the look-up session, while new mail is
    /// caught up on this one every [`REPORTS_POLL`]: a slow SEARCH (a large
    /// folder, a cold server cache) never keeps new mail waiting. The
    /// step's own timeout runs meanwhile.
    async fn catching_up<T>(
        &self,
        session: &mut ImapSession,
        folder: &str,
        gmail: bool,
        cursor: &mut FolderCursor,
        announced: &mut bool,
        step: impl Future<Output = Result<T, SessionError>>,
    ) -> Result<T, Failed> {
        let mut step = std::pin::pin!(step);
        loop {
            tokio::select! {
                biased;
                done = &mut step => return done.map_err(Failed::Lookup),
                _ = tokio::time::sleep(REPORTS_POLL) => {
                    *announced |= self
                        .catch_up_now(session, folder, gmail, cursor)
                        .await
                        .map_err(Failed::Here)?;
                }
            }
        }
    }

    /// A catch-up, and at once another where the server announced new mail
    /// in its answer (Dovecot names a message that arrived meanwhile after
    /// the listing, which did not include it). Returns whether the server
    /// announced a change.
    async fn catch_up_now(
        &self,
        session: &mut ImapSession,
        folder: &str,
        gmail: bool,
        cursor: &mut FolderCursor,
    ) -> Result<bool, SessionError> {
        let announced = Box::pin(self.catch_up(session, folder, gmail, cursor)).await?;
        if announced {
            Box::pin(self.catch_up(session, folder, gmail, cursor)).await?;
        }
        Ok(announced)
    }

    /// The second session of a look-up pass, with the mailbox's folders in
    /// the order they are searched: its own folder first (still there, or
    /// moved straight back), then Trash and Junk, the watched folders,
    /// Gmail's All Mail (which holds every message, and is where an
    /// archived one is), and the rest (Gmail's Important and Starred hold
    /// copies too).
    async fn open_lookup(&self, folder: &str) -> Result<Lookup, SessionError> {
        let mut session = self
            .ctx
            .auth
            .open_imap(&self.ctx.connector, &self.address)
            .await?;
        let mut folders = self
            .timed("listing folders", checked::list_all(&mut session))
            .await?;
        let listed = &self.listed;
        folders.sort_by_key(|f| {
            let watched = f.name.eq_ignore_ascii_case("INBOX")
                || f.is_sent
                || listed.iter().any(|name| name == &f.name);
            let rank = match (f.is_bin, watched, f.is_all) {
                (true, _, _) => 0,
                (_, true, _) => 1,
                (_, _, true) => 2,
                _ => 3,
            };
            (f.name != folder, rank)
        });
        Ok(Lookup { session, folders })
    }

    /// Which of the Message-IDs `ids` the folder open on `looking` holds,
    /// and at which UIDs: one SEARCH for them all, then their Message-ID
    /// headers to tell which is which.
    async fn held_in(
        &self,
        looking: &mut ImapSession,
        ids: &[String],
    ) -> Result<HashMap<String, Vec<u32>>, SessionError> {
        let terms: Vec<String> = ids
            .iter()
            .filter_map(|id| Some(format!("HEADER Message-ID {}", checked::quoted(id).ok()?)))
            .collect();
        let hits = self
            .timed(
                "looking for messages that left their folder",
                checked::uid_search(looking, &any_of(&terms)),
            )
            .await?;
        let mut held: HashMap<String, Vec<u32>> = HashMap::new();
        if hits.is_empty() {
            return Ok(held);
        }
        let lowered: Vec<(String, &String)> =
            ids.iter().map(|id| (id.to_ascii_lowercase(), id)).collect();
        let mut hits = hits;
        hits.sort_unstable();
        hits.dedup();
        for chunk in hits.chunks(UIDS_PER_COMMAND) {
            let answer = self
                .timed(
                    "reading the Message-IDs of messages found",
                    checked::uid_fetch(
                        looking,
                        &checked::uid_set(chunk),
                        "(UID BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])",
                    ),
                )
                .await?;
            for fetched in answer.messages {
                let Some(header) = &fetched.header else {
                    continue;
                };
                // As the server's SEARCH matched it: a substring of the
                // header, whatever the case.
                let header = String::from_utf8_lossy(header).to_ascii_lowercase();
                for (lower, id) in &lowered {
                    if header.contains(lower.as_str()) {
                        held.entry((*id).clone()).or_default().push(fetched.uid);
                    }
                }
            }
        }
        Ok(held)
    }

    /// After a look-up pass failed: how long until the next may start
    /// (zero: now). None where no pass is waiting.
    pub(super) fn lookups_due_in(&self) -> Option<Duration> {
        let retry = self
            .lookups
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        retry
            .not_before
            .map(|at| at.saturating_duration_since(tokio::time::Instant::now()))
    }

    fn lookups_failed(&self, err: &SessionError, left: usize) {
        let mut retry = self
            .lookups
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let wait = crate::backoff::delay(
            retry.failures,
            Duration::from_millis(self.ctx.sync.reconnect_min_ms),
            Duration::from_millis(self.ctx.sync.reconnect_max_ms),
        );
        retry.failures = retry.failures.saturating_add(1);
        retry.not_before = Some(tokio::time::Instant::now() + wait);
        metrics::counter!("mailbridge_lookup_failures_total").increment(1);
        tracing::warn!(mailbox = %self.address, folder = %self.role, "looking for {left} messages that left the folder failed, trying again in {wait:?}: {err:#}");
    }

    /// No look-up pass is waiting (any more).
    fn lookups_done(&self) {
        let mut retry = self
            .lookups
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *retry = LookupRetry::default();
    }

    /// The Message-ID of a message whose body the server does not return,
    /// from its header alone, if the server gives that.
    async fn message_id_of(&self, session: &mut ImapSession, uid: u32) -> Option<String> {
        let fetched = self
            .timed(
                "reading the header of a message the server did not return",
                checked::uid_fetch(session, &uid.to_string(), "(UID BODY.PEEK[HEADER])"),
            )
            .await
            .ok()?;
        let header = fetched
            .messages
            .into_iter()
            .find(|f| f.uid == uid)?
            .header?;
        crate::mime::parse_headers_only(&header).message_id
    }

    /// Fetches and handles every message at or after the cursor, in UID order.
    /// Returns whether the server announced a change meanwhile.
    async fn catch_up(
        &self,
        session: &mut ImapSession,
        folder: &str,
        gmail: bool,
        cursor: &mut FolderCursor,
    ) -> Result<bool, SessionError> {
        let address = self.address.as_str();
        // Sizes first: cheap, and `n:*` always names at least the last message,
        // which must not be fetched again.
        // In Gmail's All Mail, what is labelled \Inbox or \Sent is read by
        // those folders' watchers, and a draft never syncs: their labels are
        // asked for with the sizes, so their bodies are never downloaded here.
        let by_labels = self.role == FolderRole::All && gmail;
        // INBOX names each message's X-GM-MSGID where All Mail is watched
        // too, so All Mail learns what INBOX read past (the hand-off).
        let hands_off = self.role == FolderRole::Inbox && gmail && self.all_mail;
        let listing = self
            .timed(
                "listing new messages",
                checked::uid_fetch(
                    session,
                    &format!("{}:*", cursor.next_uid),
                    if by_labels {
                        "(UID RFC822.SIZE INTERNALDATE X-GM-LABELS X-GM-MSGID)"
                    } else if hands_off {
                        "(UID RFC822.SIZE INTERNALDATE X-GM-MSGID)"
                    } else {
                        "(UID RFC822.SIZE INTERNALDATE)"
                    },
                ),
            )
            .await?;
        let (elsewhere, held_at) = self.left_to_others(&listing.messages, cursor.next_uid);
        let msgids: HashMap<u32, u64> = match hands_off {
            true => listing
                .messages
                .iter()
                .filter_map(|f| Some((f.uid, f.gmail_msgid?)))
                .collect(),
            false => HashMap::new(),
        };
        // A flag change of another message comes as a FETCH with FLAGS or
        // MODSEQ, which the listing does not ask for: announced, so the
        // changes are read before IDLE (which would not repeat it).
        let mut announced = listing.announced
            || listing
                .messages
                .iter()
                .any(|f| f.flags.is_some() || f.modseq.is_some());
        let received: HashMap<u32, chrono::DateTime<chrono::Utc>> = listing
            .messages
            .iter()
            .filter_map(|f| Some((f.uid, f.received_at?)))
            .collect();
        let mut pending: Vec<(u32, u32)> = listing
            .messages
            .iter()
            .map(|f| (f.uid, f.size.unwrap_or(0)))
            .filter(|(uid, _)| *uid >= cursor.next_uid)
            // Held for INBOX: not read past here this time.
            .filter(|(uid, _)| held_at.is_none_or(|held| *uid < held))
            .collect();
        pending.sort_unstable();
        pending.dedup_by_key(|(uid, _)| *uid);

        let mut start = 0;
        while start < pending.len() {
            let mut end = start;
            let mut bytes = 0u64;
            while end < pending.len()
                && end - start < FETCH_BATCH
                && (end == start || bytes + u64::from(pending[end].1) <= FETCH_BATCH_BYTES)
            {
                bytes += u64::from(pending[end].1);
                end += 1;
            }
            let batch = &pending[start..end];
            start = end;
            let fetched_here = |uid: &u32, size: &u32| {
                *size <= self.ctx.sync.max_message_bytes && !elsewhere.contains(uid)
            };
            let wanted: Vec<u32> = batch
                .iter()
                .filter(|(uid, size)| fetched_here(uid, size))
                .map(|(uid, _)| *uid)
                .collect();
            let wanted_bytes: u64 = batch
                .iter()
                .filter(|(uid, size)| fetched_here(uid, size))
                .map(|(_, size)| u64::from(*size))
                .sum();
            // Held until the batch is handled: many mailboxes catching up
            // at once stay within the memory budget.
            let _held = match wanted.is_empty() {
                true => None,
                false => Some(self.ctx.memory.reserve(wanted_bytes).await),
            };
            let mut bodies: HashMap<u32, Vec<u8>> = HashMap::new();
            let mut flags: HashMap<u32, FlagState> = HashMap::new();
            let mut labels: HashMap<u32, Vec<String>> = HashMap::new();
            if !wanted.is_empty() {
                let set = wanted
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(",");
                // A slow link still finishes a big batch; a stalled one is noticed.
                let deadline = self.ctx.connector.step_timeout()
                    + Duration::from_secs(wanted_bytes / MIN_DOWNLOAD_BYTES_PER_SEC);
                let (fetched, refused) = match tokio::time::timeout(
                    deadline,
                    checked::uid_fetch_partial(
                        session,
                        &set,
                        if gmail {
                            "(UID FLAGS X-GM-LABELS BODY.PEEK[])"
                        } else {
                            "(UID FLAGS BODY.PEEK[])"
                        },
                    ),
                )
                .await
                {
                    Ok(fetched) => fetched?,
                    Err(_) => return Err(SessionError::Timeout("fetching messages")),
                };
                // What came back is handled; what did not is looked at below.
                if let Some(refusal) = refused {
                    tracing::warn!(
                        mailbox = address,
                        folder = %self.role,
                        "the server did not return every message asked for: {refusal}"
                    );
                }
                announced |=
                    fetched.announced || fetched.messages.iter().any(|f| !wanted.contains(&f.uid));
                for fetch in fetched.messages {
                    if let Some(found) = &fetch.flags {
                        flags.insert(fetch.uid, FlagState::from_flags(found));
                    }
                    if let Some(found) = fetch.labels {
                        labels.insert(fetch.uid, found);
                    }
                    if let Some(body) = fetch.body {
                        bodies.insert(fetch.uid, body);
                    }
                }
            }
            let found_at = |uid: u32, cursor: FolderCursor| Found {
                mailbox: address,
                folder: self.role,
                uid_validity: cursor.uid_validity,
                uid,
                folder_name: folder,
                cursor,
                flags: flags.get(&uid).copied(),
                labels: labels.get(&uid).map(Vec::as_slice),
                received_at: received.get(&uid).copied(),
            };
            // Committed message by message, made durable once for the batch.
            let fetched: Vec<(Found<'_>, &[u8])> = batch
                .iter()
                .filter(|(uid, _)| !elsewhere.contains(uid))
                .filter_map(|(uid, _)| Some((found_at(*uid, *cursor), bodies.get(uid)?.as_slice())))
                .collect();
            let mut ingest = crate::offload::blocking(|| self.ctx.ingest.batch(&fetched))?;
            drop(fetched);
            for (uid, size) in batch {
                let found = found_at(*uid, *cursor);
                if elsewhere.contains(uid) {
                    ingest.skip(found)?;
                    cursor.next_uid = uid.saturating_add(1);
                    continue;
                }
                match bodies.remove(uid) {
                    Some(raw) => {
                        // Parsing and the commit (with the fsync of a source
                        // not written ahead) hold a thread, but within this
                        // task: a cancelled watcher never commits after it
                        // stopped (a detached task could).
                        let tried =
                            crate::offload::blocking(|| ingest.handle_contained(found, &raw))?;
                        if let Tried::Retry { error, .. } = tried {
                            return Err(SessionError::HandlingFailed(self.role, *uid, error));
                        }
                    }
                    None if *size > self.ctx.sync.max_message_bytes => {
                        tracing::warn!(
                            mailbox = address,
                            folder = %self.role,
                            uid,
                            "message skipped: {size} bytes is over sync.max_message_bytes"
                        );
                        ingest.skip(found)?;
                    }
                    None => {
                        // Only a message that is gone is passed over at once:
                        // one the server merely did not return is retried in
                        // the next sessions, and then set aside and reported.
                        let still_there = self
                            .timed(
                                "checking a message the server did not return",
                                checked::uid_search(session, &format!("UID {uid}")),
                            )
                            .await?;
                        if !still_there.contains(uid) {
                            tracing::warn!(
                                mailbox = address,
                                folder = %self.role,
                                uid,
                                "message skipped: it was removed before it could be fetched"
                            );
                            ingest.skip(found)?;
                        } else {
                            let message_id = self.message_id_of(session, *uid).await;
                            let error = format!(
                                "the server did not return it, though a SEARCH finds it in {folder}"
                            );
                            let tried = crate::offload::blocking(|| {
                                ingest.failed_try(
                                    found,
                                    message_id,
                                    crate::model::UnprocessableReason::NotReturned,
                                    error,
                                )
                            })?;
                            if tried == Tried::SetAside {
                                // Kept from before set-aside messages were
                                // reported: dashboards may count on it.
                                metrics::counter!("mailbridge_messages_unfetchable_total")
                                    .increment(1);
                            }
                            if let Tried::Retry { .. } = tried {
                                return Err(SessionError::NotReturned(
                                    self.role,
                                    cursor.uid_validity,
                                    *uid,
                                ));
                            }
                        }
                    }
                }
                cursor.next_uid = uid.saturating_add(1);
            }
            crate::offload::blocking(|| ingest.finish())?;
            if hands_off {
                // Committed (durable with the batch, or with the next flush,
                // which comes before any later commit of All Mail's).
                self.inbox.read_by_inbox(
                    batch
                        .iter()
                        .filter(|(uid, _)| *uid < cursor.next_uid)
                        .filter_map(|(uid, _)| msgids.get(uid).copied()),
                );
            }
        }
        if by_labels {
            self.inbox.all_mail_at(cursor.next_uid, held_at.is_some());
        }
        Ok(announced)
    }

    /// Of the listed messages from `next_uid` on, those All Mail leaves to
    /// other folders' watchers (Gmail): labelled `\Sent` or `\Draft`, or
    /// `\Inbox` where INBOX's watcher read past them; and the first UID
    /// labelled `\Inbox` that INBOX has not read yet and is waited for
    /// (see [`super::inbox_handoff`]): the catch-up stops before it.
    /// Elsewhere than Gmail's All Mail, nothing carries labels: none.
    fn left_to_others(
        &self,
        listed: &[checked::Fetched],
        next_uid: u32,
    ) -> (std::collections::HashSet<u32>, Option<u32>) {
        let mut elsewhere = std::collections::HashSet::new();
        let mut labelled: Vec<(u32, Option<u64>, &[String])> = listed
            .iter()
            .filter(|f| f.uid >= next_uid)
            .filter_map(|f| Some((f.uid, f.gmail_msgid, f.labels.as_deref()?)))
            .collect();
        labelled.sort_unstable_by_key(|(uid, _, _)| *uid);
        labelled.dedup_by_key(|(uid, _, _)| *uid);
        let wait = Duration::from_secs(self.ctx.sync.inbox_handoff_secs);
        for (uid, msgid, labels) in labelled {
            if labels.iter().any(|l| read_elsewhere(l)) {
                elsewhere.insert(uid);
            } else if labels.iter().any(|l| l.eq_ignore_ascii_case("\\Inbox")) {
                match self.inbox.verdict(uid, msgid, wait) {
                    Verdict::PassOver => {
                        elsewhere.insert(uid);
                    }
                    Verdict::Take => {}
                    Verdict::Hold => return (elsewhere, Some(uid)),
                }
            }
        }
        (elsewhere, None)
    }
}

/// How a folder's changes are read, by what the server offers.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum ChangeTracking {
    /// QRESYNC (RFC 7162): flag changes and expunges since HIGHESTMODSEQ,
    /// whatever their number; changes made while the bridge was away too.
    Qresync,
    /// CONDSTORE alone (Gmail): flag changes since HIGHESTMODSEQ; whether the
    /// latest synced messages are still there is asked with UID SEARCH.
    Condstore,
    /// Neither: the flags of the latest synced messages are read again at
    /// each look and compared with what was last reported.
    Resync,
}

/// How many of a folder's latest synced messages are looked at again where
/// the server cannot name its changes: bounds the cost of each look (older
/// ones are followed only where the server has QRESYNC).
const RECHECKED_MESSAGES: usize = 1000;

/// Looks at a folder in a row, each because the last one heard of a change,
/// before the session goes to IDLE anyway.
pub(super) const MAX_LOOKS_IN_A_ROW: u32 = 20;

/// UIDs named in one command: a set of scattered 7-digit UIDs stays near
/// 2 KB, well within the 8,000-byte lines servers must take (RFC 7162 §4).
const UIDS_PER_COMMAND: usize = 250;

/// The second session of a pass that looks for messages gone from the
/// folder, with the mailbox's folders in the order they are looked in.
struct Lookup {
    session: ImapSession,
    folders: Vec<checked::Folder>,
}

/// What one read of a folder's changes found.
struct ReadChanges {
    /// The server announced another change meanwhile.
    announced: bool,
    /// The HIGHESTMODSEQ the changes read reach.
    highest: Option<u64>,
    /// UID, flags, and Gmail labels where the server has them.
    changed: Vec<(u32, FlagState, Option<Vec<String>>)>,
    /// Synced messages no longer at their UID.
    vanished: Vec<(u32, LocatedMessage)>,
}

/// Which session a look-up pass failed on.
enum Failed {
    /// The folder's own: the session ends, as at any failure.
    Here(SessionError),
    /// The second one: only the pass ends.
    Lookup(SessionError),
}

/// Look-up passes that failed in a row, and when the next may start.
#[derive(Default)]
pub struct LookupRetry {
    failures: u32,
    not_before: Option<tokio::time::Instant>,
}

/// Reports of messages that left a folder committed at once, and the
/// events the outbox may hold before a look-up pass commits more (see
/// `report_departures`): new mail's event waits behind a few dozen at most.
const REPORTED_AT_ONCE: usize = 20;
const REPORTS_AHEAD: usize = 20;
/// How long a look-up pass waits at most for the webhook before each slice.
const REPORTS_WAIT: Duration = Duration::from_secs(5);
/// How often new mail is caught up while a look-up pass waits.
const REPORTS_POLL: Duration = Duration::from_millis(200);

/// Message-IDs asked for in one SEARCH, and the most bytes of their terms:
/// the command line stays well within the 8,000 bytes servers must take
/// (RFC 7162 §4), and a SEARCH short enough that a catch-up follows soon.
const IDS_PER_SEARCH: usize = 100;
const SEARCH_TERMS_BYTES: usize = 6000;

/// `ids` cut into the groups searched for together.
fn search_chunks(ids: &[String]) -> Vec<&[String]> {
    let mut chunks = Vec::new();
    let mut start = 0;
    while start < ids.len() {
        let mut end = start;
        let mut bytes = 0;
        while let Some(id) = ids.get(end) {
            let term = id.len() + 30;
            if end > start && (end - start >= IDS_PER_SEARCH || bytes + term > SEARCH_TERMS_BYTES) {
                break;
            }
            bytes += term;
            end += 1;
        }
        chunks.extend(ids.get(start..end));
        start = end;
    }
    chunks
}

/// One SEARCH key matching any of `terms` (`OR a OR b c`).
fn any_of(terms: &[String]) -> String {
    let mut query = String::new();
    for (n, term) in terms.iter().enumerate() {
        if n + 1 < terms.len() {
            query.push_str("OR ");
        }
        query.push_str(term);
        query.push(' ');
    }
    query.truncate(query.trim_end().len());
    query
}

/// Where a message that left its folder went.
enum Whereabouts {
    /// It had not left: found at its own UID.
    Unchanged,
    /// Back in the same folder, under a new UID.
    Back(u32),
    /// In another folder the mailbox's sync watches (role, UIDVALIDITY, UID).
    Watched {
        name: String,
        at: (FolderRole, u32, u32),
    },
    /// In a folder no watcher reads (an archive).
    Elsewhere(String),
    /// In Trash or Junk.
    Binned(String),
    /// Expunged.
    Nowhere,
}

/// Whether a Gmail label puts a message in a folder watched on its own
/// (`\Sent`) or out of sync altogether (`\Draft`). `\Inbox` is INBOX's only
/// once INBOX's watcher read past the message (`left_to_others`).
fn read_elsewhere(label: &str) -> bool {
    let is = |system: &str| label.eq_ignore_ascii_case(system);
    is("\\Sent") || is("\\Draft")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_search_key_matches_any_of_its_terms() {
        let terms = |n: usize| -> Vec<String> { (0..n).map(|i| format!("T{i}")).collect() };
        assert_eq!(any_of(&terms(1)), "T0");
        assert_eq!(any_of(&terms(2)), "OR T0 T1");
        assert_eq!(any_of(&terms(3)), "OR T0 OR T1 T2");
    }

    /// Issue 21 item 2: many Message-IDs per SEARCH, every one asked for
    /// once, and the command line stays short whatever their length.
    #[test]
    fn message_ids_are_searched_in_bounded_groups() {
        let ids: Vec<String> = (0..250).map(|i| format!("<{i}@example.test>")).collect();
        let chunks = search_chunks(&ids);
        assert_eq!(
            chunks.iter().map(|c| c.len()).collect::<Vec<_>>(),
            [100, 100, 50]
        );
        assert_eq!(chunks.concat(), ids);
        let long: Vec<String> = (0..20)
            .map(|i| format!("<{i}{}>", "x".repeat(990)))
            .collect();
        let chunks = search_chunks(&long);
        assert!(chunks.iter().all(|c| {
            !c.is_empty()
                && (c.len() == 1
                    || c.iter().map(|id| id.len() + 30).sum::<usize>() <= SEARCH_TERMS_BYTES)
        }));
        assert_eq!(chunks.concat(), long);
        assert!(search_chunks(&[]).is_empty());
    }
}
