//! The IMAP side: one task per mailbox, however many integrations use it, with a
//! watcher per folder (INBOX and Sent). Fetched messages go to [`Ingest`].

pub mod connection;
pub mod folders;
pub mod watcher;

use std::sync::Arc;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::{
    config::{ProvidersConfig, SyncConfig},
    ingest::Ingest,
    model::{Event, FolderRole, MailboxState},
    store::Store,
    webhook::OutboxSignal,
};
pub use connection::{ConnectError, ImapConnector};
use watcher::{FolderWatcher, WatchEnd};

pub struct SyncContext {
    pub store: Arc<dyn Store>,
    pub connector: ImapConnector,
    pub ingest: Ingest,
    pub providers: ProvidersConfig,
    pub sync: SyncConfig,
    pub signal: OutboxSignal,
}

/// Keeps one mailbox in sync until cancelled or its credentials are refused.
pub async fn sync_mailbox(ctx: Arc<SyncContext>, address: String, cancel: CancellationToken) {
    let mailbox = match ctx.store.mailbox(&address) {
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
    let watchers = cancel.child_token();
    let mut set = JoinSet::new();
    for role in FolderRole::ALL {
        let watcher = FolderWatcher {
            ctx: ctx.clone(),
            mailbox: mailbox.clone(),
            role,
            idle_period,
        };
        set.spawn(watcher.run(watchers.clone()));
    }
    while let Some(ended) = set.join_next().await {
        if let Ok(WatchEnd::Rejected(reason)) = ended {
            watchers.cancel();
            mark_needs_reauth(&ctx, &address, &reason);
        }
    }
}

/// R20: the mailbox stops syncing and the CRM hears of it once.
pub fn mark_needs_reauth(ctx: &SyncContext, address: &str, reason: &str) {
    tracing::warn!(
        mailbox = address,
        "credentials refused, sync stopped until new ones arrive: {reason}"
    );
    let result = (|| {
        let Some(mailbox) = ctx.store.mailbox(address)? else {
            return Ok(());
        };
        if mailbox.state == MailboxState::NeedsReauth {
            return Ok(());
        }
        ctx.store.set_mailbox_state(
            address,
            MailboxState::NeedsReauth,
            Some(reason.to_string()),
        )?;
        let events: Vec<Event> = ctx
            .store
            .integrations_of_mailbox(address)?
            .into_iter()
            .map(|i| {
                Event::lifecycle(
                    "mailbox.needs_reauth",
                    &i.location_id,
                    &i.user_id,
                    address,
                    serde_json::json!({ "error": reason }),
                )
            })
            .collect();
        ctx.store.enqueue(&events)?;
        ctx.signal.notify();
        Ok::<_, crate::store::StoreError>(())
    })();
    if let Err(err) = result {
        tracing::error!(mailbox = address, "recording needs_reauth failed: {err:#}");
    }
}
