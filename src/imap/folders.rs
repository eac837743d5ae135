//! Finding a mailbox's folders by role: INBOX is fixed; Sent is found by its
//! SPECIAL-USE attribute (RFC 6154), else by the names clients commonly use.

use async_imap::types::NameAttribute;
use futures_util::TryStreamExt as _;

use super::connection::ImapSession;

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

/// The Sent folder's name, if the mailbox has one.
pub async fn find_sent(
    session: &mut ImapSession,
) -> Result<Option<String>, async_imap::error::Error> {
    let names: Vec<_> = session
        .list(Some(""), Some("*"))
        .await?
        .try_collect()
        .await?;
    if let Some(sent) = names.iter().find(|n| {
        n.attributes()
            .iter()
            .any(|a| matches!(a, NameAttribute::Sent))
    }) {
        return Ok(Some(sent.name().to_string()));
    }
    for wanted in COMMON_SENT_NAMES {
        if let Some(found) = names.iter().find(|n| n.name().eq_ignore_ascii_case(wanted)) {
            return Ok(Some(found.name().to_string()));
        }
    }
    Ok(None)
}
