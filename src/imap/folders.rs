//! Finding a mailbox's folders by role: INBOX is fixed; Sent is found by its
//! SPECIAL-USE attribute (RFC 6154), else by the names clients commonly use;
//! Trash likewise; listed folders are named by the operator. A folder LIST
//! does not name is absent: a warning of its own, never the mailbox's error.

use super::{
    checked::{self, CheckedError},
    connection::ImapSession,
};
use crate::model::FolderRole;

/// Folder names clients use for sent mail, tried in order when no folder
/// carries `\Sent`.
const COMMON_SENT_NAMES: [&str; 7] = [
    "Sent",
    "Sent Items",
    "Sent Mail",
    "Sent Messages",
    "[Gmail]/Sent Mail",
    "INBOX.Sent",
    "INBOX/Sent",
];

/// The Sent folder's name, if the mailbox has one. A refused LIST is an
/// error, never "no Sent folder".
pub async fn find_sent(session: &mut ImapSession) -> Result<Option<String>, CheckedError> {
    Ok(sent_among(&checked::list_all(session).await?))
}

/// The Sent folder among those LIST named.
pub fn sent_among(folders: &[checked::Folder]) -> Option<String> {
    if let Some(sent) = folders.iter().find(|f| f.is_sent) {
        return Some(sent.name.clone());
    }
    COMMON_SENT_NAMES.iter().find_map(|wanted| {
        folders
            .iter()
            .find(|f| f.name.eq_ignore_ascii_case(wanted))
            .map(|f| f.name.clone())
    })
}

/// The IMAP name of the folder `role` stands for among those LIST named,
/// if the mailbox has it now; `listed` is the mailbox's operator-listed
/// folders. A listed folder counts only while LIST names it: one deleted or
/// renamed since the connect is absent, not an error of every session.
pub fn name_among(
    folders: &[checked::Folder],
    role: FolderRole,
    listed: &[String],
) -> Option<String> {
    match role {
        FolderRole::Inbox => Some("INBOX".to_string()),
        FolderRole::Sent => sent_among(folders),
        FolderRole::All => folders
            .iter()
            .find(|f| f.is_all && !f.no_select)
            .map(|f| f.name.clone()),
        FolderRole::Listed(_) => {
            let name = listed
                .iter()
                .find(|name| FolderRole::listed(name) == role)?;
            folders
                .iter()
                .any(|f| &f.name == name && !f.no_select)
                .then(|| name.clone())
        }
    }
}

/// The IMAP name of the folder `role` stands for, if the mailbox has it
/// now (one LIST, except for INBOX). A refused LIST is an error.
pub async fn name_of(
    session: &mut ImapSession,
    role: FolderRole,
    listed: &[String],
) -> Result<Option<String>, CheckedError> {
    if role == FolderRole::Inbox {
        return Ok(Some("INBOX".to_string()));
    }
    Ok(name_among(&checked::list_all(session).await?, role, listed))
}

/// The Trash folder's name, by its SPECIAL-USE attribute (`\\Trash`).
pub async fn find_trash(session: &mut ImapSession) -> Result<Option<String>, CheckedError> {
    let folders = checked::list_all(session).await?;
    Ok(folders.into_iter().find(|f| f.is_trash).map(|f| f.name))
}
