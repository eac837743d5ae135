//! The IMAP side: one task per mailbox, however many integrations use it,
//! watching INBOX, Sent and the folders the operator listed: over one session
//! where the server has NOTIFY, else one session per folder. Fetched messages go to [`Ingest`].

pub mod checked;
pub mod connection;
pub mod folders;
pub mod inbox_handoff;
pub mod login_gate;
pub mod session_group;
pub mod watcher;

use std::sync::Arc;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::{
    auth::Auth,
    config::{ProvidersConfig, SyncConfig},
    ingest::Ingest,
    model::{FolderRole, MailboxState, Provider},
    store::Store,
    webhook::OutboxSignal,
};
pub use connection::{ConnectError, ImapConnector};
use session_group::SessionGroup;
pub use watcher::UNFETCHABLE_AFTER_SESSIONS;
use watcher::{FolderWatcher, WatchEnd};

pub struct SyncContext {
    pub store: Arc<dyn Store>,
    /// Shared with the send queue: bounds the message bytes held at once.
    pub memory: crate::memory_budget::MemoryBudget,
    pub connector: ImapConnector,
    pub auth: Arc<Auth>,
    pub ingest: Ingest,
    pub providers: ProvidersConfig,
    pub sync: SyncConfig,
    pub signal: OutboxSignal,
    /// Where each mailbox's sessions stand, for the API.
    pub status: crate::sync_status::SyncStatus,
}

/// Keeps one mailbox in sync until cancelled or its credentials are dead.
/// `warm`, a session already logged in to it, serves the first folders'
/// session instead of a login of its own.
pub async fn sync_mailbox(
    ctx: Arc<SyncContext>,
    address: String,
    cancel: CancellationToken,
    warm: Option<connection::ImapSession>,
) {
    let mut mailbox = match ctx.store.mailbox(&address) {
        Ok(Some(mailbox)) => mailbox,
        Ok(None) => return,
        Err(err) => {
            tracing::error!(mailbox = %address, "cannot load the mailbox, not syncing it: {err:#}");
            return;
        }
    };
    if mailbox.state == MailboxState::NeedsReauth {
        tracing::info!(mailbox = %address, "waiting for new credentials");
        return;
    }
    let idle_period = ctx.providers.settings(mailbox.provider).idle;
    let roles = mailbox.roles();
    let watched: Vec<_> = roles
        .iter()
        .map(|&role| {
            let name = match role {
                FolderRole::Inbox => Some("INBOX".to_string()),
                FolderRole::Listed(_) => mailbox.listed_name(role).map(str::to_string),
                // Found by the session (SPECIAL-USE or a known name).
                FolderRole::Sent | FolderRole::All => None,
            };
            (role, name)
        })
        .collect();
    let provider = mailbox.provider;
    let bridge_files_sent = mailbox.save_sent.bridge_appends(provider);
    let all_mail = roles.contains(&FolderRole::All);
    let listed: Arc<[String]> = std::mem::take(&mut mailbox.folders).into();
    // The record holds the decrypted credentials: not kept for the life of
    // the sync (each login reads them afresh), nor its other fields, which
    // cost memory in every one of thousands of mailbox tasks.
    drop(mailbox);
    let watchers = cancel.child_token();
    let mut set = JoinSet::new();
    let mut groups = std::collections::HashMap::new();
    let mut crashes: u32 = 0;
    let inbox = Arc::new(inbox_handoff::InboxHandoff::default());
    let warm = std::sync::Mutex::new(warm);
    let spawn = |set: &mut JoinSet<WatchEnd>, roles: &[FolderRole]| {
        let folders = roles
            .iter()
            .map(|&role| FolderWatcher {
                ctx: ctx.clone(),
                address: address.clone(),
                role,
                listed: listed.clone(),
                all_mail,
                inbox: inbox.clone(),
                idle_period,
                lookups: Default::default(),
            })
            .collect();
        let warm = warm
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        set.spawn(SessionGroup { folders, warm }.run(watchers.clone()))
            .id()
    };
    ctx.status.starting(&address, &watched, bridge_files_sent);
    drop(watched);
    // One session for every folder where the server may have NOTIFY (a
    // server without it says so at login, and each folder gets its own);
    // Gmail and Microsoft 365 have none.
    if ctx.sync.one_session_per_mailbox && provider == Provider::Imap && roles.len() > 1 {
        groups.insert(spawn(&mut set, &roles), roles);
    } else {
        for role in roles {
            groups.insert(spawn(&mut set, &[role]), vec![role]);
        }
    }
    while let Some(ended) = set.join_next_with_id().await {
        match ended {
            Ok((_, WatchEnd::NeedsReauth)) => {
                // No watcher logs in again until new credentials arrive.
                watchers.cancel();
            }
            Ok((id, WatchEnd::NoNotify(session))) => {
                tracing::info!(mailbox = %address, "the server has no NOTIFY with CONDSTORE: one session per folder");
                // The session it logged in with goes on as the first folder's.
                *warm.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = session;
                for role in groups.remove(&id).unwrap_or_default() {
                    groups.insert(spawn(&mut set, &[role]), vec![role]);
                }
            }
            Ok((_, WatchEnd::Cancelled)) => {}
            // A bug (or a library's: imap-proto 0.17 panics on a response
            // code followed by non-ASCII text, and on INTERNALDATE NIL) must
            // not silently stop a folder's sync: it starts again.
            Err(err) if !watchers.is_cancelled() => {
                let Some(roles) = groups.remove(&err.id()) else {
                    continue;
                };
                let wait = crate::backoff::delay(
                    crashes,
                    std::time::Duration::from_millis(ctx.sync.reconnect_min_ms),
                    std::time::Duration::from_millis(ctx.sync.reconnect_max_ms),
                );
                crashes = crashes.saturating_add(1);
                let names: Vec<String> = roles.iter().map(ToString::to_string).collect();
                tracing::error!(mailbox = %address, folders = %names.join(", "), "the folders' sync crashed, restarting it in {wait:?}: {err}");
                metrics::counter!("mailbridge_worker_restarts_total", "worker" => "folder_sync")
                    .increment(1);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = watchers.cancelled() => continue,
                }
                groups.insert(spawn(&mut set, &roles), roles);
            }
            Err(_) => {}
        }
    }
    ctx.status.stopped(&address);
}
