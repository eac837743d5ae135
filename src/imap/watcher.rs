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
            // Changes first: a message moved out and straight back is then
            // known to be back before the catch-up meets it at its new UID.
            let changed_meanwhile = self
                .sync_flags(
                    session,
                    folder,
                    features.tracking,
                    features.gmail,
                    cursor,
                    modseq_at_select.take(),
                )
                .await?;
            let more = self
                .catch_up(session, folder, features.gmail, cursor)
                .await?;
            // A change announced in the answer to one of our commands is not
            // repeated in IDLE: look again first. Bounded, so a server that
            // always says something cannot keep the session from IDLE.
            if (more || changed_meanwhile) && looks_in_a_row < MAX_LOOKS_IN_A_ROW {
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

    /// Reports what happened to synced messages since the last look: flag
    /// changes (\\Seen, \\Flagged, \\Answered) as `message.updated`, and
    /// messages gone from the folder as `message.updated` (moved) or
    /// `message.deleted`. Read as the server allows (see [`ChangeTracking`]);
    /// the folder's HIGHESTMODSEQ moves with them in one commit. Returns
    /// whether the server announced another change meanwhile.
    async fn sync_flags(
        &self,
        session: &mut ImapSession,
        folder: &str,
        tracking: ChangeTracking,
        gmail: bool,
        cursor: &mut FolderCursor,
        modseq_at_select: Option<u64>,
    ) -> Result<bool, SessionError> {
        let last_uid = cursor.next_uid.saturating_sub(1);
        let mut announced = false;
        let mut highest = cursor.highest_modseq;
        // UID, flags, and Gmail labels where the server has them.
        let mut changed: Vec<(u32, FlagState, Option<Vec<String>>)> = Vec::new();
        let mut vanished: Vec<(u32, LocatedMessage)> = Vec::new();
        match tracking {
            ChangeTracking::Qresync | ChangeTracking::Condstore => {
                let Some(since) = cursor.highest_modseq else {
                    return Ok(false);
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
                announced |= answer.announced;
                for fetched in answer.messages {
                    highest = highest.max(fetched.modseq);
                    // Newer ones are read, flags and all, by the next catch-up.
                    if let (Some(flags), true) = (&fetched.flags, fetched.uid <= last_uid) {
                        changed.push((fetched.uid, FlagState::from_flags(flags), fetched.labels));
                    }
                }
                // Every change up to SELECT's HIGHESTMODSEQ was just read,
                // expunges included (VANISHED). Expunges carry no modseq of
                // their own: without this, the cursor would stay below the
                // server's figure after one, and the folder would be
                // visited again at every start to find nothing.
                if tracking == ChangeTracking::Qresync {
                    highest = highest.max(modseq_at_select);
                }
                for range in gone {
                    // A server may name a range high end first (`9:3`).
                    let first = (*range.start()).min(*range.end());
                    let last = (*range.start()).max(*range.end()).min(last_uid);
                    if first <= last {
                        vanished.extend(self.ctx.store.located_in(
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
                            announced |= changed_meanwhile;
                            present.extend(found);
                        }
                        vanished
                            .extend(latest.into_iter().filter(|(uid, _)| !present.contains(uid)));
                    }
                }
            }
            ChangeTracking::Resync => {
                if last_uid == 0 {
                    return Ok(false);
                }
                let latest = self.ctx.store.located_in(
                    &self.address,
                    self.role,
                    cursor.uid_validity,
                    1..=last_uid,
                    RECHECKED_MESSAGES,
                )?;
                if latest.is_empty() {
                    return Ok(false);
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
                    announced |= answer.announced;
                    returned.extend(
                        answer.messages.iter().filter_map(|f| {
                            Some((f.uid, FlagState::from_flags(f.flags.as_ref()?)))
                        }),
                    );
                }
                for (uid, located) in latest {
                    match returned.get(&uid) {
                        Some(flags) => changed.push((uid, *flags, None)),
                        None => vanished.push((uid, located)),
                    }
                }
            }
        }

        let mut changes: Vec<LocatedChange> = Vec::new();
        let mut lookup: Option<Lookup> = None;
        let found = self.whereabouts_of(folder, vanished, &mut lookup).await;
        if let Some(Lookup { mut session, .. }) = lookup {
            let _ = tokio::time::timeout(Duration::from_secs(2), session.logout()).await;
        }
        // A lookup that fails is no verdict: the session ends and the change
        // is read again (HIGHESTMODSEQ has not moved).
        for (uid, located, whereabouts) in found? {
            let (kind, now_in, moved_to) = match whereabouts {
                Whereabouts::Unchanged => continue,
                // Moved out and straight back: the catch-up follows it from
                // its new UID.
                Whereabouts::Back => {
                    changes.push(LocatedChange {
                        uid_validity: cursor.uid_validity,
                        uid,
                        flags_before: located.flags,
                        flags_after: None,
                        labels_after: None,
                        moved_to: None,
                        events: Vec::new(),
                    });
                    continue;
                }
                // Followed in its new folder from here on; that folder's
                // watcher knows it and does not report it again.
                Whereabouts::Watched { name, at } => ("message.updated", Some(name), Some(at)),
                Whereabouts::Elsewhere(name) => ("message.updated", Some(name), None),
                Whereabouts::Binned(name) => ("message.deleted", Some(name), None),
                Whereabouts::Nowhere => ("message.deleted", None, None),
            };
            let events = event_data::message_changed(
                &crate::ingest::still_synced(self.ctx.store.as_ref(), &located)?,
                kind,
                &self.address,
                MessagePlace {
                    folder: now_in.as_deref(),
                    previous_folder: Some(folder),
                    flags: located.flags,
                    labels: None,
                },
            );
            changes.push(LocatedChange {
                uid_validity: cursor.uid_validity,
                uid,
                flags_before: located.flags,
                flags_after: None,
                labels_after: None,
                moved_to,
                events,
            });
        }
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
        if highest == cursor.highest_modseq && changes.is_empty() {
            return Ok(announced);
        }
        let count: usize = changes.iter().map(|c| c.events.len()).sum();
        crate::offload::blocking(|| {
            self.ctx
                .store
                .commit_flag_changes(&self.address, self.role, *cursor, highest, &changes)
        })?;
        cursor.highest_modseq = highest;
        if count > 0 {
            self.ctx.signal.notify();
            tracing::info!(mailbox = %self.address, folder, events = count, "synced messages changed");
        }
        Ok(announced)
    }

    /// Where a message that left `folder` is now, by its Message-ID, looked
    /// up over a second session (this one stays on its folder), Trash and
    /// Junk first, All Mail and the folder itself last. The session and its
    /// folder list are opened at the first look of a pass and shared by the
    /// rest (a mass delete is one login, not one per message). An error is
    /// no verdict: the caller tries again later.
    async fn now_in(
        &self,
        folder: &str,
        located_uid: u32,
        located: &LocatedMessage,
        lookup: &mut Option<Lookup>,
    ) -> Result<Whereabouts, SessionError> {
        // Without a Message-ID it cannot be looked for: taken as gone. So is
        // one that cannot go in a command (CR, LF): sending it would let a
        // message's header write IMAP commands.
        let Some(quoted) = located
            .message_id
            .as_deref()
            .and_then(|id| checked::quoted(id).ok())
        else {
            return Ok(Whereabouts::Nowhere);
        };
        if lookup.is_none() {
            let mut session = self
                .ctx
                .auth
                .open_imap(&self.ctx.connector, &self.address)
                .await?;
            let mut folders = self
                .timed("listing folders", checked::list_all(&mut session))
                .await?;
            // Its own folder first (still there, or moved straight back),
            // then Trash and Junk, the watched folders, Gmail's All Mail
            // (which holds every message, and is where an archived one is),
            // and the rest (Gmail's Important and Starred hold copies too).
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
            *lookup = Some(Lookup { session, folders });
        }
        let Some(Lookup { session, folders }) = lookup.as_mut() else {
            return Ok(Whereabouts::Nowhere);
        };
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
            // A folder the server will not open is no answer about the
            // message, and must not stop the watch: it is passed over.
            let opened = match tokio::time::timeout(
                self.ctx.connector.step_timeout(),
                session.examine(&candidate.name),
            )
            .await
            {
                Ok(Ok(opened)) => opened,
                Ok(Err(async_imap::error::Error::No(_) | async_imap::error::Error::Bad(_))) => {
                    continue;
                }
                Ok(Err(err)) => return Err(err.into()),
                Err(_) => return Err(SessionError::Timeout("opening a folder")),
            };
            let hits = self
                .timed(
                    "looking for a moved message",
                    checked::uid_search(session, &format!("HEADER Message-ID {quoted}")),
                )
                .await?;
            let Some(new_uid) = hits.iter().max().copied() else {
                continue;
            };
            if candidate.name == folder {
                // Still at its UID: the server's earlier answer missed it.
                if hits.contains(&located_uid) {
                    return Ok(Whereabouts::Unchanged);
                }
                return Ok(Whereabouts::Back);
            }
            if candidate.is_bin {
                return Ok(Whereabouts::Binned(candidate.name.clone()));
            }
            return Ok(match (watched_role(candidate), opened.uid_validity) {
                (Some(role), Some(uid_validity)) if role != self.role => Whereabouts::Watched {
                    name: candidate.name.clone(),
                    at: (role, uid_validity, new_uid),
                },
                _ => Whereabouts::Elsewhere(candidate.name.clone()),
            });
        }
        Ok(Whereabouts::Nowhere)
    }

    /// Where each of the `vanished` messages went, over one `lookup` session.
    async fn whereabouts_of(
        &self,
        folder: &str,
        vanished: Vec<(u32, LocatedMessage)>,
        lookup: &mut Option<Lookup>,
    ) -> Result<Vec<(u32, LocatedMessage, Whereabouts)>, SessionError> {
        let mut found = Vec::with_capacity(vanished.len());
        for (uid, located) in vanished {
            let whereabouts = self.now_in(folder, uid, &located, lookup).await?;
            found.push((uid, located, whereabouts));
        }
        Ok(found)
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

/// Where a message that left its folder went.
enum Whereabouts {
    /// It had not left: found at its own UID.
    Unchanged,
    /// Back in the same folder, under a new UID.
    Back,
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
