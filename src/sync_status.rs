//! Where each mailbox's sync stands right now: per watched folder, whether
//! its session is connecting, caught up and waiting in IDLE, or failing, and
//! when it last caught up. Kept in memory only: it describes this process's
//! sessions, so after a restart every mailbox is `connecting` until its
//! sessions are back, and changing it costs no disk write.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::model::{FolderRole, MailboxState};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FolderState {
    /// Logging in, or catching up with what arrived meanwhile.
    Connecting,
    /// Caught up and waiting in IDLE: new mail is seen within about a second.
    Active,
    /// The session failed; it is tried again with backoff (`last_error`).
    Error,
}

/// One watched folder as `GET …/mailbox` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct FolderStatus {
    /// `inbox`, `sent`, `all` (Gmail's All Mail) or `listed`.
    pub role: &'static str,
    /// The folder's name on the server, once a session found it.
    pub name: Option<String>,
    pub state: FolderState,
    /// When the folder was last caught up (since this process started).
    pub last_synced_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
}

/// A mailbox's folders, sorted by `FolderRole::key`. A vector, not a map:
/// there are two or three, and a map's node costs about 1 KiB per mailbox,
/// which at 10,000 mailboxes is 10 MiB for nothing.
#[derive(Default)]
struct MailboxSync {
    folders: Vec<(String, FolderStatus)>,
}

impl MailboxSync {
    fn folder_mut(&mut self, key: &str) -> Option<&mut FolderStatus> {
        self.folders
            .iter_mut()
            .find(|(k, _)| k == key)
            .map(|(_, status)| status)
    }

    fn statuses(&self) -> impl Iterator<Item = &FolderStatus> {
        self.folders.iter().map(|(_, status)| status)
    }
}

/// Shared by the folder watchers (which report) and the API (which reads).
#[derive(Clone, Default)]
pub struct SyncStatus {
    mailboxes: Arc<RwLock<HashMap<String, MailboxSync>>>,
}

fn role_kind(role: FolderRole) -> &'static str {
    match role {
        FolderRole::Inbox => "inbox",
        FolderRole::Sent => "sent",
        FolderRole::All => "all",
        FolderRole::Listed(_) => "listed",
    }
}

impl SyncStatus {
    /// A mailbox's sync (re)starts with these folders, all connecting.
    pub fn starting(&self, address: &str, roles: &[(FolderRole, Option<String>)]) {
        let mut folders: Vec<(String, FolderStatus)> = roles
            .iter()
            .map(|(role, name)| {
                let status = FolderStatus {
                    role: role_kind(*role),
                    name: name.clone(),
                    state: FolderState::Connecting,
                    last_synced_at: None,
                    last_error: None,
                };
                (role.key(), status)
            })
            .collect();
        folders.sort_by(|a, b| a.0.cmp(&b.0));
        // One entry per role, as the map had: two listed names whose 32-bit
        // hashes collide are one role (`FolderRole::listed`).
        folders.dedup_by(|a, b| a.0 == b.0);
        self.write()
            .insert(address.to_string(), MailboxSync { folders });
    }

    /// The mailbox's sync stopped (disconnected, or waiting for credentials).
    pub fn stopped(&self, address: &str) {
        self.write().remove(address);
    }

    /// The folder is caught up and its session is about to wait in IDLE.
    pub fn caught_up(&self, address: &str, role: FolderRole, name: &str) {
        let now = Utc::now();
        self.update(address, role, |folder| {
            folder.state = FolderState::Active;
            folder.last_synced_at = Some(now);
            folder.last_error = None;
            if folder.name.as_deref() != Some(name) {
                folder.name = Some(name.to_string());
            }
        });
    }

    /// The folder's session failed with `error`; it stays an error while
    /// the session is tried again, until it catches up.
    pub fn failed(&self, address: &str, role: FolderRole, error: String) {
        self.update(address, role, |folder| {
            folder.state = FolderState::Error;
            folder.last_error = Some(error);
        });
    }

    /// The mailbox as a whole: active only once every folder is; an error
    /// if any folder fails (with the first one's words); connecting
    /// otherwise, and for a mailbox whose sync has not started.
    pub fn mailbox_state(&self, address: &str) -> (MailboxState, Option<String>) {
        let mailboxes = self.read();
        let Some(sync) = mailboxes.get(address) else {
            return (MailboxState::Connecting, None);
        };
        if let Some(failing) = sync.statuses().find(|f| f.state == FolderState::Error) {
            return (MailboxState::Error, failing.last_error.clone());
        }
        let all_active =
            !sync.folders.is_empty() && sync.statuses().all(|f| f.state == FolderState::Active);
        match all_active {
            true => (MailboxState::Active, None),
            false => (MailboxState::Connecting, None),
        }
    }

    /// Each watched folder, in a stable order.
    pub fn folders(&self, address: &str) -> Vec<FolderStatus> {
        self.read()
            .get(address)
            .map(|sync| sync.statuses().cloned().collect())
            .unwrap_or_default()
    }

    fn update(&self, address: &str, role: FolderRole, change: impl FnOnce(&mut FolderStatus)) {
        if let Some(folder) = self
            .write()
            .get_mut(address)
            .and_then(|sync| sync.folder_mut(&role.key()))
        {
            change(folder);
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, MailboxSync>> {
        self.mailboxes.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, MailboxSync>> {
        self.mailboxes.write().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: &str = "me@x.test";

    fn started() -> SyncStatus {
        let status = SyncStatus::default();
        status.starting(
            ME,
            &[
                (FolderRole::Inbox, None),
                (FolderRole::Sent, Some("Sent".into())),
            ],
        );
        status
    }

    #[test]
    fn a_mailbox_whose_sync_has_not_started_is_connecting() {
        let status = SyncStatus::default();
        assert_eq!(status.mailbox_state(ME), (MailboxState::Connecting, None));
        assert!(status.folders(ME).is_empty());
    }

    #[test]
    fn a_mailbox_is_active_only_once_every_folder_caught_up() {
        let status = started();
        status.caught_up(ME, FolderRole::Inbox, "INBOX");
        assert_eq!(status.mailbox_state(ME).0, MailboxState::Connecting);
        status.caught_up(ME, FolderRole::Sent, "Sent");
        assert_eq!(status.mailbox_state(ME).0, MailboxState::Active);
        let folders = status.folders(ME);
        assert_eq!(folders.len(), 2);
        assert!(folders.iter().all(|f| f.last_synced_at.is_some()));
        assert_eq!(folders[0].name.as_deref(), Some("INBOX"));
    }

    #[test]
    fn one_failing_folder_makes_the_mailbox_an_error_until_it_recovers() {
        let status = started();
        status.caught_up(ME, FolderRole::Inbox, "INBOX");
        status.caught_up(ME, FolderRole::Sent, "Sent");
        status.failed(ME, FolderRole::Sent, "connection reset".into());
        assert_eq!(
            status.mailbox_state(ME),
            (MailboxState::Error, Some("connection reset".into()))
        );
        status.caught_up(ME, FolderRole::Sent, "Sent");
        assert_eq!(status.mailbox_state(ME), (MailboxState::Active, None));
        status.stopped(ME);
        assert_eq!(status.mailbox_state(ME).0, MailboxState::Connecting);
    }
}
