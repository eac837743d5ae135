//! One IMAP session serving one or several folders of a mailbox, and its
//! reconnects. Alone, a folder's session selects it and IDLEs on it. Where
//! the server has NOTIFY (RFC 5465; Dovecot does), one session serves all of
//! a mailbox's folders: the first (INBOX) stays selected and IDLEs, the
//! server announces the others' new mail, expunges and flag changes as
//! `* STATUS`, and the session visits each changed folder in turn. One login
//! and one connection per mailbox instead of one per folder: half the
//! sessions to warm up after a restart, half the memory on both sides.
//!
//! NOTIFY only wakes the session. Whether another folder changed is decided by
//! asking its `STATUS` before each IDLE, so an announcement that came inside
//! the answer to another command cannot be missed. A session that starts
//! again compares that `STATUS` with the folder's stored cursor first, and
//! visits only the folders that changed while it was away.

use std::{collections::HashMap, time::Duration};

use async_imap::{
    imap_proto::{MailboxDatum, Response, Status},
    types::UnsolicitedResponse,
};
use futures_util::StreamExt as _;
use tokio_util::sync::CancellationToken;

use super::{
    checked,
    connection::{ConnectError, ImapSession},
    folders,
    inbox_handoff::DownOnDrop,
    watcher::{FolderWatcher, MAX_LOOKS_IN_A_ROW, SessionError, WatchEnd},
};
use crate::{backoff, model::FolderRole};

/// Folders that share one session; the first is the one kept selected.
pub struct SessionGroup {
    pub folders: Vec<FolderWatcher>,
    /// A session already logged in (the connect check's): the first
    /// session is this one instead of a new login.
    pub warm: Option<ImapSession>,
}

/// How long an IDLE lasts when changes were left for later (the bound on
/// looks in a row was reached).
const PENDING_IDLE: Duration = Duration::from_secs(1);

/// Why an IDLE ended.
enum Woke {
    /// The server said something (or had said it before IDLE began).
    Server,
    /// The provider's IDLE period is over: IDLE again.
    Renew,
    TokenExpiring,
    Cancel,
}

impl SessionGroup {
    fn lead(&self) -> Option<&FolderWatcher> {
        self.folders.first()
    }

    fn roles(&self) -> String {
        let roles: Vec<String> = self.folders.iter().map(|f| f.role.to_string()).collect();
        roles.join(", ")
    }

    pub async fn run(mut self, cancel: CancellationToken) -> WatchEnd {
        let mut warm = self.warm.take();
        let Some(lead) = self.lead() else {
            return WatchEnd::Cancelled;
        };
        let (ctx, address) = (&lead.ctx, lead.address.as_str());
        let mut failures: u32 = 0;
        let mut handed_back = None;
        let inbox = self.folders.iter().find(|f| f.role == FolderRole::Inbox);
        // INBOX's watcher is down whenever this task is not in a session,
        // however it ends (a panic too): All Mail then takes what is
        // labelled `\Inbox` rather than wait for it.
        let _inbox_down = DownOnDrop(inbox.map(|f| &*f.inbox));
        loop {
            let result = tokio::select! {
                result = self.session(&cancel, &mut failures, warm.take(), &mut handed_back) => result,
                _ = cancel.cancelled() => return WatchEnd::Cancelled,
            };
            if let Some(inbox) = inbox {
                inbox.inbox.set_live(false);
            }
            let err = match result {
                Ok(()) => return WatchEnd::Cancelled,
                // A folder came back or went away: a new session with the
                // folders there are now, no failure.
                Err(SessionError::LookAgain) => continue,
                Err(SessionError::NoNotify) => return WatchEnd::NoNotify(handed_back.take()),
                Err(SessionError::TokenExpiring) => {
                    tracing::debug!(mailbox = address, folders = %self.roles(), "logging in again before the access token expires");
                    continue;
                }
                Err(SessionError::Connect(ConnectError::NeedsReauth(_))) => {
                    return WatchEnd::NeedsReauth;
                }
                Err(SessionError::Connect(ConnectError::Disconnected)) => {
                    return WatchEnd::Cancelled;
                }
                Err(SessionError::Store(crate::store::StoreError::CursorMoved)) => {
                    // This session's view is stale: the mailbox was disconnected
                    // (and perhaps connected again with a new baseline).
                    if !matches!(ctx.store.mailbox(address), Ok(Some(_))) {
                        return WatchEnd::Cancelled;
                    }
                    tracing::info!(mailbox = address, folders = %self.roles(), "a folder's cursor was moved by a reconnect; starting again from it");
                    continue;
                }
                Err(err) => err,
            };
            let mut wait = backoff::delay(
                failures,
                Duration::from_millis(ctx.sync.reconnect_min_ms),
                Duration::from_millis(ctx.sync.reconnect_max_ms),
            );
            // Reset once a session reaches IDLE: a failure that repeats
            // every session backs off to the cap.
            failures = failures.saturating_add(1);
            // A refused password is tried again once the refusal can be confirmed.
            if let SessionError::Connect(ConnectError::Rejected(_)) = &err {
                wait = wait.max(ctx.auth.confirm_after());
            }
            tracing::warn!(mailbox = address, folders = %self.roles(), "sync interrupted, reconnecting in {wait:?}: {err:#}");
            metrics::counter!("mailbridge_imap_reconnects_total").increment(1);
            for folder in &self.folders {
                ctx.status.failed(address, folder.role, err.to_string());
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = cancel.cancelled() => return WatchEnd::Cancelled,
            }
        }
    }

    /// One session: returns `Ok` only when cancelled.
    async fn session(
        &self,
        cancel: &CancellationToken,
        failures: &mut u32,
        warm: Option<ImapSession>,
        handed_back: &mut Option<ImapSession>,
    ) -> Result<(), SessionError> {
        let Some(lead) = self.lead() else {
            return Ok(());
        };
        let (ctx, address) = (&lead.ctx, lead.address.as_str());
        // The steps below are boxed: a task's future is as large as its
        // largest state, while a session spends nearly all its life in IDLE.
        // Boxed, a step holds its memory only while it runs: 4.4 KB per idle
        // session instead of 6.1 KB (release build), times 10,000 mailboxes.
        let mut session = match warm {
            Some(session) => session,
            None => Box::pin(ctx.auth.open_imap(&ctx.connector, address)).await?,
        };
        let relogin_at = ctx
            .auth
            .relogin_in(address)
            .map(|left| tokio::time::Instant::now() + left);
        let features = Box::pin(lead.features(&mut session)).await?;
        // CONDSTORE too: a flag change in another folder must show in its
        // STATUS figures, since the server's own word of it can come inside
        // another command's answer, where it is not seen.
        if self.folders.len() > 1 && !(features.notify && features.condstore) {
            *handed_back = Some(session);
            return Err(SessionError::NoNotify);
        }
        // One LIST for every folder but INBOX, which is always there. A
        // folder the server does not have now is absent: reported so, and
        // looked for again now and then, while the others sync.
        let listing = match self.folders.iter().any(|f| f.role != FolderRole::Inbox) {
            true => {
                Box::pin(lead.timed("listing folders", checked::list_all(&mut session))).await?
            }
            false => Vec::new(),
        };
        let mut present: Vec<(&FolderWatcher, String)> = Vec::new();
        let mut absent: Vec<&FolderWatcher> = Vec::new();
        for folder in &self.folders {
            match folder.resolve(&listing) {
                Some(name) => present.push((folder, name)),
                None => absent.push(folder),
            }
        }
        drop(listing);
        let Some(((kept, kept_name), others)) = present.split_first() else {
            let _ = tokio::time::timeout(Duration::from_secs(2), session.logout()).await;
            return tokio::select! {
                _ = tokio::time::sleep(lead.absent_check()) => Err(SessionError::LookAgain),
                _ = cancel.cancelled() => Ok(()),
            };
        };
        // Absent folders are looked for again now and then; so are the
        // present ones but INBOX: a folder renamed while a session has it
        // selected may not end that session (Dovecot goes on serving it).
        let mut folder_check_at = (!absent.is_empty()
            || present.iter().any(|(f, _)| f.role != FolderRole::Inbox))
        .then(|| tokio::time::Instant::now() + lead.absent_check());
        if !others.is_empty() {
            let names: Vec<String> = present.iter().map(|(_, name)| name.clone()).collect();
            kept.timed(
                "asking for notifications",
                checked::notify_set(&mut session, &names),
            )
            .await?;
        }
        // What each other folder's STATUS said when it was last visited.
        let mut seen: HashMap<&str, checked::FolderFigures> = HashMap::new();
        // Other folders the server named in a STATUS of its own.
        let mut named: Vec<String> = Vec::new();
        let mut selected =
            match Box::pin(kept.select(&mut session, kept_name.clone(), features)).await {
                Ok(selected) => selected,
                Err(err) => return Err(unless_gone(lead, &mut session, kept, err).await),
            };
        let mut rounds_in_a_row = 0;
        loop {
            Box::pin(kept.sync(&mut session, &mut selected, features, &mut named)).await?;
            // Asked last, right before IDLE: a change announced inside the
            // answer to an earlier command shows in the figures here.
            let mut round = Vec::new();
            let mut kept_announced = false;
            for (folder, name) in others {
                let status = match Box::pin(kept.timed(
                    "asking a folder's status",
                    checked::status(&mut session, name, features.condstore),
                ))
                .await
                {
                    Ok(status) => status,
                    Err(err) => return Err(unless_gone(lead, &mut session, folder, err).await),
                };
                kept_announced |= status.announced;
                named.extend(status.named);
                round.push((folder, name, status.figures));
            }
            // A folder this session has not visited yet needs no visit
            // where its stored cursor already covers what its STATUS shows:
            // after a restart, most folders did not change meanwhile.
            for (folder, name, figures) in &round {
                if !seen.contains_key(name.as_str())
                    && !named.contains(name)
                    && folder.caught_up_by_cursor(features, figures)
                {
                    seen.insert(name, figures.clone());
                    folder.report_caught_up(name);
                }
            }
            // Decided after the whole round: the server may name a folder
            // in its answer to a later folder's STATUS.
            let changed: Vec<_> = round
                .into_iter()
                .filter(|(folder, name, figures)| {
                    seen.get(name.as_str()) != Some(figures)
                        || named.contains(name)
                        || folder.lookups_due_in() == Some(Duration::ZERO)
                })
                .collect();
            let pending = !changed.is_empty() || kept_announced;
            // Bounded, as a folder's own looks are: a server that always
            // says something cannot keep the session from IDLE.
            if pending && rounds_in_a_row < MAX_LOOKS_IN_A_ROW {
                rounds_in_a_row += 1;
                let visited = !changed.is_empty();
                for (folder, name, figures) in changed {
                    named.retain(|n| n != name);
                    let mut visit =
                        match Box::pin(folder.select(&mut session, name.clone(), features)).await {
                            Ok(visit) => visit,
                            Err(err) => {
                                return Err(unless_gone(lead, &mut session, folder, err).await);
                            }
                        };
                    Box::pin(folder.sync(&mut session, &mut visit, features, &mut named)).await?;
                    seen.insert(name, figures);
                }
                if visited {
                    selected =
                        Box::pin(kept.select(&mut session, kept_name.clone(), features)).await?;
                }
                continue;
            }
            rounds_in_a_row = 0;
            named.clear();
            // What is still pending after the bound is looked at again soon,
            // not at the end of the IDLE period.
            // So is a message All Mail holds for INBOX's watcher to read.
            let holding = kept.role == FolderRole::All && kept.inbox.holding();
            let mut period = if pending || holding {
                PENDING_IDLE
            } else {
                kept.idle_period
            };
            if let Some(at) = folder_check_at {
                period = period.min(at.saturating_duration_since(tokio::time::Instant::now()));
            }
            // A look-up pass that failed is tried again when its backoff ends.
            let period = present
                .iter()
                .filter_map(|(folder, _)| folder.lookups_due_in())
                .fold(period, |period, due| period.min(due.max(PENDING_IDLE)));
            let (back, woke) =
                Box::pin(idle(kept, session, period, cancel, relogin_at, &mut named)).await?;
            session = back;
            if let Some(at) = folder_check_at
                && tokio::time::Instant::now() >= at
            {
                let listing =
                    Box::pin(kept.timed("listing folders", checked::list_all(&mut session)))
                        .await?;
                let back = absent
                    .iter()
                    .any(|f| folders::name_among(&listing, f.role, &f.listed).is_some());
                let moved = present.iter().any(|(f, name)| {
                    folders::name_among(&listing, f.role, &f.listed).as_ref() != Some(name)
                });
                if back || moved {
                    tracing::info!(mailbox = address, folders = %self.roles(), "a watched folder came back or went away: starting the session again");
                    let _ = tokio::time::timeout(Duration::from_secs(2), session.logout()).await;
                    return Err(SessionError::LookAgain);
                }
                folder_check_at = Some(tokio::time::Instant::now() + lead.absent_check());
            }
            // Only a session that caught up and went through IDLE counts as
            // working: a failure that repeats every session backs off to the cap.
            *failures = 0;
            if matches!(woke, Woke::Cancel | Woke::TokenExpiring) {
                let _ = tokio::time::timeout(Duration::from_secs(2), session.logout()).await;
                return match woke {
                    Woke::TokenExpiring => Err(SessionError::TokenExpiring),
                    _ => Ok(()),
                };
            }
        }
    }
}

/// What a refused command on `folder` (its SELECT or STATUS) means: where
/// the folder is gone from the server (deleted or renamed since this session
/// listed it), the session ends to start again without it
/// ([`SessionError::LookAgain`]; the next one reports it absent), and the
/// rest of the mailbox goes on syncing; otherwise the refusal stands.
async fn unless_gone(
    lead: &FolderWatcher,
    session: &mut ImapSession,
    folder: &FolderWatcher,
    err: SessionError,
) -> SessionError {
    let refused = matches!(
        err,
        SessionError::Checked(checked::CheckedError::Refused { .. })
            | SessionError::Imap(
                async_imap::error::Error::No(_) | async_imap::error::Error::Bad(_)
            )
    );
    if !refused {
        return err;
    }
    match lead
        .timed("listing folders", checked::list_all(session))
        .await
    {
        Ok(listing) if folders::name_among(&listing, folder.role, &folder.listed).is_none() => {
            tracing::info!(mailbox = %folder.address, folder = %folder.role, "the folder is gone from the server ({err}): starting the session again without it");
            let _ = tokio::time::timeout(Duration::from_secs(2), session.logout()).await;
            SessionError::LookAgain
        }
        _ => err,
    }
}

/// IDLE on the selected folder until the server says something, the IDLE
/// period ends, the token needs renewing or the sync is cancelled. Folders
/// the server names in a `STATUS` meanwhile are added to `named`.
async fn idle(
    kept: &FolderWatcher,
    session: ImapSession,
    period: Duration,
    cancel: &CancellationToken,
    relogin_at: Option<tokio::time::Instant>,
    named: &mut Vec<String>,
) -> Result<(ImapSession, Woke), SessionError> {
    // Cloned before IDLE takes the session: the server may announce new
    // mail between our last command and its IDLE continuation, which
    // async-imap queues here and which would otherwise wait for the next renewal.
    let unsolicited = session.unsolicited_responses.clone();
    let mut idle = session.idle();
    kept.timed("starting IDLE", idle.init()).await?;
    // New mail, or a flag change (an untagged FETCH), or an expunge; or
    // another folder's STATUS under NOTIFY.
    let mut arrived_meanwhile = false;
    while let Ok(queued) = unsolicited.try_recv() {
        arrived_meanwhile = true;
        if let UnsolicitedResponse::Status { mailbox, .. } = queued {
            named.push(mailbox);
        }
    }
    let woke = if arrived_meanwhile {
        Woke::Server
    } else {
        // Read straight from the session, not through async-imap's
        // `wait_with_timeout`, which builds a stop source, a channel and a
        // second timer at every IDLE: memory held by each of thousands of
        // idle sessions. The select's sleep is the re-IDLE deadline.
        let heard = async {
            loop {
                let Some(response) = idle.next().await else {
                    return Err(SessionError::Closed);
                };
                let response = response.map_err(async_imap::error::Error::from)?;
                match response.parsed() {
                    // Keepalives (`* OK Still here`) and continuations.
                    Response::Data {
                        status: Status::Ok, ..
                    }
                    | Response::Continue { .. } => {}
                    // Only IDLE's own tag can answer now: the server ended
                    // IDLE, and waiting on would hear nothing until the
                    // period is over. (async-imap queued it and waited.)
                    Response::Done { .. } => return Err(SessionError::Closed),
                    Response::Data {
                        status: Status::Bye,
                        ..
                    } => return Err(SessionError::Closed),
                    Response::MailboxData(MailboxDatum::Status { mailbox, .. }) => {
                        return Ok(Some(mailbox.to_string()));
                    }
                    _ => return Ok(None),
                }
            }
        };
        tokio::select! {
            heard = heard => {
                named.extend(heard?);
                Woke::Server
            }
            _ = tokio::time::sleep(period) => Woke::Renew,
            _ = until(relogin_at) => Woke::TokenExpiring,
            _ = cancel.cancelled() => Woke::Cancel,
        }
    };
    let session = kept.timed("ending IDLE", idle.done()).await?;
    Ok((session, woke))
}

/// Sleeps until `deadline`, or forever without one.
async fn until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
