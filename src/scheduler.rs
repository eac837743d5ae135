//! Which mailboxes are being synced: starts, restarts and stops the per-mailbox
//! tasks, and waits for all of them at shutdown.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::task::JoinHandle;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::imap::{SyncContext, connection::ImapSession, sync_mailbox};

struct Running {
    cancel: CancellationToken,
    handle: JoinHandle<()>,
}

pub struct Scheduler {
    ctx: Arc<SyncContext>,
    running: Mutex<HashMap<String, Running>>,
    /// Tasks told to stop that may still be finishing their last step (a
    /// commit): a new start of the same mailbox waits for them.
    stopping: Mutex<HashMap<String, JoinHandle<()>>>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

impl Scheduler {
    pub fn new(ctx: Arc<SyncContext>, shutdown: CancellationToken) -> Self {
        Self {
            ctx,
            running: Mutex::new(HashMap::new()),
            stopping: Mutex::new(HashMap::new()),
            tracker: TaskTracker::new(),
            shutdown,
        }
    }

    /// Starts syncing every stored mailbox.
    pub fn start_all(&self) -> crate::store::StoreResult<usize> {
        let mailboxes = self.ctx.store.mailboxes()?;
        for mailbox in &mailboxes {
            self.start(&mailbox.address);
        }
        Ok(mailboxes.len())
    }

    /// Starts (or restarts, e.g. with new credentials) a mailbox's sync. A
    /// restart waits for the old task to end first, so two sessions never
    /// handle the same folder at once.
    pub fn start(&self, address: &str) {
        self.start_with(address, None);
    }

    /// As `start`, with a session already logged in to the mailbox (the
    /// connect check's), which the sync uses instead of logging in again.
    pub fn start_warm(&self, address: &str, session: ImapSession) {
        self.start_with(address, Some(session));
    }

    fn start_with(&self, address: &str, warm: Option<ImapSession>) {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let previous = running.remove(address).map(|previous| {
            previous.cancel.cancel();
            previous.handle
        });
        let stopped = self
            .stopping
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(address);
        let cancel = self.shutdown.child_token();
        let ctx = self.ctx.clone();
        let owned = address.to_string();
        let token = cancel.clone();
        let handle = tokio::spawn(self.tracker.track_future(async move {
            for earlier in previous.into_iter().chain(stopped) {
                let _ = earlier.await;
            }
            sync_mailbox(ctx, owned, token, warm).await;
        }));
        running.insert(address.to_string(), Running { cancel, handle });
        metrics::gauge!("mailbridge_mailboxes_syncing").set(running.len() as f64);
    }

    pub fn stop(&self, address: &str) {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(previous) = running.remove(address) {
            previous.cancel.cancel();
            let mut stopping = self.stopping.lock().unwrap_or_else(|p| p.into_inner());
            stopping.retain(|_, handle| !handle.is_finished());
            stopping.insert(address.to_string(), previous.handle);
        }
        metrics::gauge!("mailbridge_mailboxes_syncing").set(running.len() as f64);
    }

    /// Waits until every mailbox task has ended (call after cancelling `shutdown`).
    pub async fn wait(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }
}
