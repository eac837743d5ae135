//! Finding a mailbox's folders by role: INBOX is fixed; Sent is found by its
//! SPECIAL-USE attribute (RFC 6154), else by the names clients commonly use.

use super::{
    checked::{self, CheckedError},
    connection::ImapSession,
};

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
    let folders = checked::list_all(session).await?;
    if let Some(sent) = folders.iter().find(|f| f.is_sent) {
        return Ok(Some(sent.name.clone()));
    }
    for wanted in COMMON_SENT_NAMES {
        if let Some(found) = folders.iter().find(|f| f.name.eq_ignore_ascii_case(wanted)) {
            return Ok(Some(found.name.clone()));
        }
    }
    Ok(None)
}
