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
    /// The server has no such folder now (Gmail's All Mail hidden from IMAP,
    /// no Sent folder, a listed folder deleted or renamed): the rest of the
    /// mailbox syncs, `reason` says what is not synced and `action` what the
    /// user can do; the folder is looked for again now and then and synced
    /// from the present once it is back.
    Absent,
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
    /// While `absent`: why, and what mail is not synced because of it.
    pub reason: Option<String>,
    /// While `absent`: what the user can do about it.
    pub action: Option<String>,
}

/// A mailbox's folders, sorted by `FolderRole::key`. A vector, not a map:
/// there are two or three, and a map's node costs about 1 KiB per mailbox,
/// which at 10,000 mailboxes is 10 MiB for nothing.
#[derive(Default)]
struct MailboxSync {
    folders: Vec<(String, FolderStatus)>,
    /// Whether the bridge files CRM sends in Sent itself (said when Sent is absent).
    bridge_files_sent: bool,
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
    /// A mailbox's sync (re)starts with these folders, all connecting;
    /// `bridge_files_sent`: the bridge files copies of CRM sends in Sent.
    pub fn starting(
        &self,
        address: &str,
        roles: &[(FolderRole, Option<String>)],
        bridge_files_sent: bool,
    ) {
        let mut folders: Vec<(String, FolderStatus)> = roles
            .iter()
            .map(|(role, name)| {
                let status = FolderStatus {
                    role: role_kind(*role),
                    name: name.clone(),
                    state: FolderState::Connecting,
                    last_synced_at: None,
                    last_error: None,
                    reason: None,
                    action: None,
                };
                (role.key(), status)
            })
            .collect();
        folders.sort_by(|a, b| a.0.cmp(&b.0));
        // One entry per role, as the map had: two listed names whose 32-bit
        // hashes collide are one role (`FolderRole::listed`).
        folders.dedup_by(|a, b| a.0 == b.0);
        self.write().insert(
            address.to_string(),
            MailboxSync {
                folders,
                bridge_files_sent,
            },
        );
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
            folder.reason = None;
            folder.action = None;
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

    /// The server has no folder for `role` now; `name` is the name it was
    /// looked for under, where it has one (a listed folder's). The mail that
    /// is not synced meanwhile and what the user can do are said in
    /// `reason` and `action`. `recheck` is how often it is looked for again.
    pub fn absent(
        &self,
        address: &str,
        role: FolderRole,
        name: Option<&str>,
        recheck: std::time::Duration,
    ) {
        let mut mailboxes = self.write();
        let Some(sync) = mailboxes.get_mut(address) else {
            return;
        };
        let bridge_files_sent = sync.bridge_files_sent;
        let Some(folder) = sync.folder_mut(&role.key()) else {
            return;
        };
        let (reason, action) = absent_words(role, name, bridge_files_sent, recheck);
        folder.state = FolderState::Absent;
        folder.last_error = None;
        folder.reason = Some(reason);
        folder.action = Some(action);
        if let Some(name) = name {
            folder.name = Some(name.to_string());
        }
    }

    /// The mailbox as a whole: active once every folder is active or
    /// absent (an absent folder is a warning in `watched`, not an error of
    /// the mailbox); an error if any folder fails (with the first one's
    /// words); connecting otherwise, and for a mailbox whose sync has not started.
    pub fn mailbox_state(&self, address: &str) -> (MailboxState, Option<String>) {
        let mailboxes = self.read();
        let Some(sync) = mailboxes.get(address) else {
            return (MailboxState::Connecting, None);
        };
        if let Some(failing) = sync.statuses().find(|f| f.state == FolderState::Error) {
            return (MailboxState::Error, failing.last_error.clone());
        }
        let all_active = sync.statuses().any(|f| f.state == FolderState::Active)
            && sync
                .statuses()
                .all(|f| matches!(f.state, FolderState::Active | FolderState::Absent));
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

    /// Whether the folder is absent now (a session that finds it again
    /// reports it caught up).
    pub fn is_absent(&self, address: &str, role: FolderRole) -> bool {
        self.read()
            .get(address)
            .and_then(|sync| sync.folders.iter().find(|(key, _)| *key == role.key()))
            .is_some_and(|(_, status)| status.state == FolderState::Absent)
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

/// What an absent folder keeps from syncing, and what the user can do.
fn absent_words(
    role: FolderRole,
    name: Option<&str>,
    bridge_files_sent: bool,
    recheck: std::time::Duration,
) -> (String, String) {
    let minutes = recheck.as_secs().div_ceil(60).max(1);
    let back = format!(
        "it is looked for again every {} and synced from then on once it is there",
        if minutes == 1 {
            "minute".to_string()
        } else {
            format!("{minutes} minutes")
        }
    );
    match role {
        FolderRole::All => (
            "the server lists no All Mail folder (Gmail's All Mail is hidden from IMAP): mail that skips the inbox (a filter's \"Skip the Inbox\", a label alone) is not synced".to_string(),
            format!("in Gmail, Settings → Labels → All Mail: tick \"Show in IMAP\"; {back}"),
        ),
        FolderRole::Sent => (
            format!(
                "the server has no Sent folder (none marked \\Sent, none named Sent): mail sent from other mail clients is not synced{}",
                if bridge_files_sent {
                    ", and copies of messages sent through the bridge are not filed (they are still sent)"
                } else {
                    ""
                }
            ),
            format!("create a folder named \"Sent\" (or mark one as the Sent folder in the mail client or the server's settings); {back}"),
        ),
        FolderRole::Listed(_) => {
            let name = name.unwrap_or("the listed folder");
            (
                format!("the folder \"{name}\" is not on the server any more (deleted or renamed): mail filed in it is not synced"),
                format!("create the folder \"{name}\" again or give it back its name, or connect the mailbox again with the folder's new name in \"folders\"; {back}"),
            )
        }
        FolderRole::Inbox => (
            "the server has no INBOX".to_string(),
            format!("ask the mail provider; {back}"),
        ),
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
            true,
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

    /// Issue 21 item 3: an absent folder is a warning in `watched`, not an
    /// error of the mailbox; found again, it is active and its words go.
    #[test]
    fn an_absent_folder_leaves_the_mailbox_active_and_says_why_and_what_to_do() {
        let status = started();
        status.caught_up(ME, FolderRole::Inbox, "INBOX");
        status.absent(
            ME,
            FolderRole::Sent,
            None,
            std::time::Duration::from_secs(300),
        );
        assert_eq!(status.mailbox_state(ME), (MailboxState::Active, None));
        assert!(status.is_absent(ME, FolderRole::Sent));
        let sent = &status.folders(ME)[1];
        assert_eq!(sent.state, FolderState::Absent);
        let reason = sent.reason.as_deref().unwrap_or_default();
        assert!(reason.contains("not filed"), "{reason}");
        assert!(
            sent.action
                .as_deref()
                .is_some_and(|a| a.contains("every 5 minutes")),
            "{:?}",
            sent.action
        );
        status.caught_up(ME, FolderRole::Sent, "Sent");
        assert!(!status.is_absent(ME, FolderRole::Sent));
        assert_eq!(status.folders(ME)[1].reason, None);
        // Absent alone (nothing caught up yet) is not active.
        let fresh = started();
        fresh.absent(
            ME,
            FolderRole::Sent,
            None,
            std::time::Duration::from_secs(60),
        );
        assert_eq!(fresh.mailbox_state(ME).0, MailboxState::Connecting);
    }
}
