//! IMAP commands whose failure is an error, not an empty answer.
//!
//! async-imap 0.12 reads FETCH, SEARCH and LIST up to their tagged response
//! without looking at its status: a `NO` (Gmail's "Some messages could not be
//! FETCHed", `[UNAVAILABLE]`) reads as "nothing found", and the caller would
//! take a message that is still there for one that was removed. These run the
//! command themselves, collect what the server sends, and fail on NO or BAD.

use async_imap::imap_proto::{
    AttributeValue, MailboxDatum, MessageSection, NameAttribute, Response, SectionPath, Status,
    StatusAttribute,
};

use super::connection::ImapSession;

#[derive(Debug, thiserror::Error)]
pub enum CheckedError {
    /// The server answered NO or BAD; its words.
    #[error("{command} refused: {words}")]
    Refused { command: String, words: String },
    #[error("{0}")]
    Io(String),
    #[error("the server closed the connection")]
    Closed,
    /// A folder name that cannot go in a quoted string (CR, LF or NUL would
    /// end or break the command line).
    #[error("folder name {0:?} cannot be sent in a command")]
    Unsendable(String),
}

/// One message of a FETCH answer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fetched {
    pub uid: u32,
    pub size: Option<u32>,
    /// `BODY[]`, when it was asked for.
    pub body: Option<Vec<u8>>,
    /// `BODY[HEADER]`, when it was asked for.
    pub header: Option<Vec<u8>>,
    /// `INTERNALDATE`, when it was asked for: when the server received it.
    pub received_at: Option<chrono::DateTime<chrono::Utc>>,
    /// `FLAGS`, when it was asked for.
    pub flags: Option<Vec<String>>,
    /// `MODSEQ` (RFC 7162), when the server sent it.
    pub modseq: Option<u64>,
    /// Gmail's `X-GM-LABELS`, when asked for.
    pub labels: Option<Vec<String>>,
    /// Gmail's `X-GM-MSGID`, when asked for: the same in every folder.
    pub gmail_msgid: Option<u64>,
}

impl Fetched {
    /// What one untagged FETCH response says of a message.
    pub fn from_attributes(attributes: &[AttributeValue<'_>]) -> Fetched {
        let mut message = Fetched::default();
        for attribute in attributes {
            match attribute {
                AttributeValue::Uid(uid) => message.uid = *uid,
                AttributeValue::Rfc822Size(size) => message.size = Some(*size),
                AttributeValue::InternalDate(date) => message.received_at = internal_date(date),
                AttributeValue::Flags(flags) => {
                    message.flags = Some(flags.iter().map(|f| f.to_string()).collect());
                }
                AttributeValue::ModSeq(modseq) => message.modseq = Some(*modseq),
                AttributeValue::GmailMsgId(msgid) => message.gmail_msgid = Some(*msgid),
                AttributeValue::GmailLabels(labels) => {
                    // A set: Gmail's order is no change.
                    let mut labels: Vec<String> =
                        labels.iter().map(|l| unescape_quoted(l)).collect();
                    labels.sort();
                    labels.dedup();
                    message.labels = Some(labels);
                }
                AttributeValue::BodySection {
                    section: None,
                    data: Some(data),
                    ..
                }
                | AttributeValue::Rfc822(Some(data)) => message.body = Some(data.to_vec()),
                AttributeValue::BodySection {
                    section: Some(SectionPath::Full(MessageSection::Header)),
                    data: Some(data),
                    ..
                }
                | AttributeValue::Rfc822Header(Some(data)) => message.header = Some(data.to_vec()),
                _ => {}
            }
        }
        message
    }
}

/// Runs `command`; calls `each` for every untagged response until the tagged
/// one, which must be OK. Returns whether the server announced a change
/// meanwhile (new mail: EXISTS, RECENT; an expunge: EXPUNGE, VANISHED; a
/// flag change: a FETCH the command did not ask for): it says so once, and
/// IDLE would not repeat it, so the caller must look again.
async fn run(
    session: &mut ImapSession,
    command: &str,
    each: impl FnMut(&Response<'_>),
) -> Result<bool, CheckedError> {
    let (announced, refused) = run_allowing_no(session, command, each).await?;
    match refused {
        Some(refusal) => Err(refusal),
        None => Ok(announced),
    }
}

/// As `run`, but a NO is returned beside what came before it (Gmail answers
/// the messages it can and says NO for the rest); a BAD is still an error.
async fn run_allowing_no(
    session: &mut ImapSession,
    command: &str,
    mut each: impl FnMut(&Response<'_>),
) -> Result<(bool, Option<CheckedError>), CheckedError> {
    let tag = session
        .run_command(command)
        .await
        .map_err(|e| CheckedError::Io(e.to_string()))?;
    // Only the verb: the command's arguments may be long or private.
    let verb: String = command
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    let fetching = verb.eq_ignore_ascii_case("UID FETCH") || verb.eq_ignore_ascii_case("FETCH");
    let mut announced = false;
    loop {
        let response = session
            .read_response()
            .await
            .map_err(|e| CheckedError::Io(e.to_string()))?
            .ok_or(CheckedError::Closed)?;
        match response.parsed() {
            Response::Done {
                tag: done,
                status,
                outcome,
            } if *done == tag => {
                let refusal = CheckedError::Refused {
                    command: verb,
                    words: format!(
                        "{status:?} {}{}",
                        outcome
                            .code
                            .as_ref()
                            .map(|c| format!("[{c:?}] "))
                            .unwrap_or_default(),
                        outcome.information.as_deref().unwrap_or("")
                    ),
                };
                return match status {
                    Status::Ok => Ok((announced, None)),
                    Status::No => Ok((announced, Some(refusal))),
                    _ => Err(refusal),
                };
            }
            Response::Data {
                status: Status::Bye,
                ..
            } => return Err(CheckedError::Closed),
            Response::MailboxData(MailboxDatum::Exists(_) | MailboxDatum::Recent(_))
            | Response::Expunge(_)
            | Response::Vanished { earlier: false, .. } => {
                announced = true;
            }
            Response::Fetch(..) if !fetching => announced = true,
            other => each(other),
        }
    }
}

/// A FETCH's answer.
#[derive(Clone, Debug, Default)]
pub struct FetchAnswer {
    pub messages: Vec<Fetched>,
    /// The server announced a change while answering (see `run`).
    pub announced: bool,
}

/// `UID FETCH set query`, every message that came back; a NO is an error.
pub async fn uid_fetch(
    session: &mut ImapSession,
    set: &str,
    query: &str,
) -> Result<FetchAnswer, CheckedError> {
    let (answer, refused) = uid_fetch_partial(session, set, query).await?;
    match refused {
        Some(refusal) => Err(refusal),
        None => Ok(answer),
    }
}

/// `UID FETCH set query`, every message that came back, and the server's
/// NO if it refused some: the caller must then look at what is missing.
pub async fn uid_fetch_partial(
    session: &mut ImapSession,
    set: &str,
    query: &str,
) -> Result<(FetchAnswer, Option<CheckedError>), CheckedError> {
    let mut fetched = Vec::new();
    let (announced, refused) =
        run_allowing_no(session, &format!("UID FETCH {set} {query}"), |response| {
            if let Response::Fetch(_, attributes) = response {
                let message = Fetched::from_attributes(attributes);
                // A FETCH without UID is an unsolicited flag change of another message.
                if message.uid != 0 {
                    fetched.push(message);
                }
            }
        })
        .await?;
    Ok((
        FetchAnswer {
            messages: fetched,
            announced,
        },
        refused,
    ))
}

/// `UID SEARCH query`, the UIDs found.
pub async fn uid_search(session: &mut ImapSession, query: &str) -> Result<Vec<u32>, CheckedError> {
    Ok(uid_search_announcing(session, query).await?.0)
}

/// As `uid_search`, and whether the server announced a change meanwhile (see `run`).
pub async fn uid_search_announcing(
    session: &mut ImapSession,
    query: &str,
) -> Result<(Vec<u32>, bool), CheckedError> {
    let mut found = Vec::new();
    let announced = run(session, &format!("UID SEARCH {query}"), |response| {
        if let Response::MailboxData(MailboxDatum::Search(uids)) = response {
            found.extend_from_slice(uids);
        }
    })
    .await?;
    Ok((found, announced))
}

/// A command whose answer is only OK or not (`UID STORE … +FLAGS.SILENT …`,
/// `UID MOVE …`): a NO or BAD is an error.
pub async fn command(session: &mut ImapSession, command: &str) -> Result<(), CheckedError> {
    run(session, command, |_| {}).await?;
    Ok(())
}

/// What `STATUS` says of a folder that is not selected: the figures that move
/// when mail arrives or leaves, and with CONDSTORE when flags change.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FolderFigures {
    pub messages: Option<u32>,
    pub uid_next: Option<u32>,
    pub uid_validity: Option<u32>,
    pub highest_modseq: Option<u64>,
}

/// The answer to `STATUS` of a folder that is not selected.
pub struct StatusAnswer {
    pub figures: FolderFigures,
    /// The server announced a change of the selected folder meanwhile.
    pub announced: bool,
    /// Other folders the server named in `STATUS` responses of its own
    /// (NOTIFY, RFC 5465).
    pub named: Vec<String>,
}

/// `STATUS name (MESSAGES UIDNEXT UIDVALIDITY [HIGHESTMODSEQ])` for a folder
/// other than the selected one.
pub async fn status(
    session: &mut ImapSession,
    name: &str,
    condstore: bool,
) -> Result<StatusAnswer, CheckedError> {
    let mut figures = FolderFigures::default();
    let mut named = Vec::new();
    let command = format!(
        "STATUS {} (MESSAGES UIDNEXT UIDVALIDITY{})",
        quoted(name)?,
        if condstore { " HIGHESTMODSEQ" } else { "" }
    );
    let announced = run(session, &command, |response| {
        if let Response::MailboxData(MailboxDatum::Status { mailbox, status }) = response {
            if mailbox != name {
                named.push(mailbox.to_string());
                return;
            }
            for attribute in status {
                match attribute {
                    StatusAttribute::Messages(n) => figures.messages = Some(*n),
                    StatusAttribute::UidNext(n) => figures.uid_next = Some(*n),
                    StatusAttribute::UidValidity(n) => figures.uid_validity = Some(*n),
                    StatusAttribute::HighestModSeq(n) => figures.highest_modseq = Some(*n),
                    _ => {}
                }
            }
        }
    })
    .await?;
    Ok(StatusAnswer {
        figures,
        announced,
        named,
    })
}

/// `NOTIFY SET` (RFC 5465): new mail, expunges and flag changes in the
/// selected folder as usual, and in `folders` (when not selected) as
/// `STATUS` responses, inside IDLE or between commands.
pub async fn notify_set(session: &mut ImapSession, folders: &[String]) -> Result<(), CheckedError> {
    let names = folders
        .iter()
        .map(|name| quoted(name))
        .collect::<Result<Vec<_>, _>>()?;
    let command = format!(
        "NOTIFY SET (selected (MessageNew MessageExpunge FlagChange)) (mailboxes ({}) (MessageNew MessageExpunge FlagChange))",
        names.join(" ")
    );
    run(session, &command, |_| {}).await?;
    Ok(())
}

/// A folder name as an IMAP quoted string; refused where it holds a
/// character a quoted string cannot carry.
pub fn quoted(name: &str) -> Result<String, CheckedError> {
    if name.contains(['\r', '\n', '\0']) {
        return Err(CheckedError::Unsendable(name.to_string()));
    }
    Ok(format!(
        "\"{}\"",
        name.replace('\\', "\\\\").replace('"', "\\\"")
    ))
}

/// `ENABLE capability` (RFC 5161), e.g. QRESYNC before SELECT.
pub async fn enable(session: &mut ImapSession, capability: &str) -> Result<(), CheckedError> {
    run(session, &format!("ENABLE {capability}"), |_| {}).await?;
    Ok(())
}

/// Changes since `modseq` (RFC 7162): the messages whose flags changed, and
/// with QRESYNC enabled the UIDs expunged since (`VANISHED (EARLIER)`), as
/// inclusive ranges.
pub async fn changes_since(
    session: &mut ImapSession,
    modseq: u64,
    vanished: bool,
    labels: bool,
) -> Result<(FetchAnswer, Vec<std::ops::RangeInclusive<u32>>), CheckedError> {
    let mut gone = Vec::new();
    let mut fetched = Vec::new();
    let command = format!(
        "UID FETCH 1:* (UID FLAGS{}) (CHANGEDSINCE {modseq}{})",
        if labels { " X-GM-LABELS" } else { "" },
        if vanished { " VANISHED" } else { "" }
    );
    let announced = run(session, &command, |response| match response {
        Response::Vanished { uids, .. } => gone.extend(uids.iter().cloned()),
        Response::Fetch(_, attributes) => {
            let message = Fetched::from_attributes(attributes);
            if message.uid != 0 {
                fetched.push(message);
            }
        }
        _ => {}
    })
    .await?;
    Ok((
        FetchAnswer {
            messages: fetched,
            announced,
        },
        gone,
    ))
}

/// A folder as LIST names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Folder {
    pub name: String,
    /// Carries the RFC 6154 `\Sent` attribute.
    pub is_sent: bool,
    /// Carries `\Trash` or `\Junk`: a message moved here was deleted.
    pub is_bin: bool,
    /// Carries `\Trash`.
    pub is_trash: bool,
    /// Carries `\Noselect`: it holds no messages.
    pub no_select: bool,
    /// Carries `\All` (Gmail's All Mail).
    pub is_all: bool,
}

impl Folder {
    /// The folder an untagged LIST response names, with its SPECIAL-USE
    /// attributes (RFC 6154); None for any other response.
    pub fn from_list(datum: &MailboxDatum<'_>) -> Option<Folder> {
        let MailboxDatum::List(data) = datum else {
            return None;
        };
        let has = |wanted: fn(&NameAttribute<'_>) -> bool| data.name_attributes.iter().any(wanted);
        Some(Folder {
            name: data.name.to_string(),
            is_sent: has(|a| matches!(a, NameAttribute::Sent)),
            is_bin: has(|a| matches!(a, NameAttribute::Trash | NameAttribute::Junk)),
            is_trash: has(|a| matches!(a, NameAttribute::Trash)),
            no_select: has(|a| matches!(a, NameAttribute::NoSelect)),
            is_all: has(|a| matches!(a, NameAttribute::All)),
        })
    }
}

/// `LIST "" *`: every folder.
pub async fn list_all(session: &mut ImapSession) -> Result<Vec<Folder>, CheckedError> {
    let mut folders = Vec::new();
    run(session, "LIST \"\" \"*\"", |response| {
        if let Response::MailboxData(datum) = response
            && let Some(folder) = Folder::from_list(datum)
        {
            folders.push(folder);
        }
    })
    .await?;
    Ok(folders)
}

/// A quoted string's content as imap-proto leaves it (escapes kept: Gmail
/// sends system labels as `"\\Inbox"`), unescaped. Only `\\` and `\"` are
/// escapes in IMAP, so an atom's flag (`\Inbox`, unquoted) stays as it is.
pub fn unescape_quoted(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, chars.peek()) {
            ('\\', Some(&next)) if next == '\\' || next == '"' => {
                out.push(next);
                chars.next();
            }
            (other, _) => out.push(other),
        }
    }
    out
}

/// A UID set naming `uids` (ascending), runs written as ranges: `1:3,7,9:10`.
pub fn uid_set(uids: &[u32]) -> String {
    let mut set = String::new();
    let mut index = 0;
    while let Some(&first) = uids.get(index) {
        let mut last = first;
        index += 1;
        while let Some(&next) = uids.get(index) {
            if next != last.saturating_add(1) {
                break;
            }
            last = next;
            index += 1;
        }
        if !set.is_empty() {
            set.push(',');
        }
        if first == last {
            set.push_str(&first.to_string());
        } else {
            set.push_str(&format!("{first}:{last}"));
        }
    }
    set
}

/// An IMAP date-time (`" 7-Jul-2026 02:44:25 -0700"`, RFC 3501 `date-time`).
pub fn internal_date(text: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::parse_from_str(text.trim(), "%d-%b-%Y %H:%M:%S %z")
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc))
}

#[cfg(test)]
mod tests {
    use super::{internal_date, uid_set, unescape_quoted};

    /// The two lines imap-proto 0.17 panicked on read as the server meant
    /// them (the vendored copy): text right after a response code, and a
    /// FETCH with `INTERNALDATE NIL` (no date).
    #[test]
    fn text_right_after_a_response_code_and_a_nil_internal_date_are_read() {
        use async_imap::imap_proto::{Response, Status};
        let (_, alert) = Response::parse("A1 NO [ALERT]Ошибка входа\r\n".as_bytes()).unwrap();
        match alert {
            Response::Done {
                status: Status::No,
                outcome,
                ..
            } => assert_eq!(outcome.information.as_deref(), Some("Ошибка входа")),
            other => panic!("{other:?}"),
        }
        let (_, fetch) = Response::parse(b"* 1 FETCH (UID 5 INTERNALDATE NIL)\r\n").unwrap();
        let Response::Fetch(_, attributes) = fetch else {
            panic!("{fetch:?}");
        };
        let fetched = super::Fetched::from_attributes(&attributes);
        assert_eq!(fetched.uid, 5);
        assert_eq!(fetched.received_at, None);
    }

    /// A response nested deep enough to overflow imap-proto's recursive
    /// parser (which would abort the process, every mailbox with it) is an
    /// error of that session; parentheses inside a literal or a quoted
    /// string do not count.
    #[tokio::test]
    async fn a_response_nested_too_deep_is_an_error_not_a_crash() {
        use tokio::io::AsyncWriteExt as _;
        let (client_end, mut server_end) = tokio::io::duplex(1 << 20);
        let mut client = async_imap::Client::new(client_end);
        let mut lines = b"* 1 FETCH (UID 9 BODY[] {70}\r\n".to_vec();
        lines.extend([b'('; 70]);
        lines.extend(b" FLAGS (\\Seen))\r\n* LIST () \"/\" \"");
        lines.extend([b'('; 70]);
        lines.extend(b"\"\r\n");
        lines.extend(b"* 2 FETCH (BODYSTRUCTURE ");
        lines.extend(std::iter::repeat_n(b'(', 100_000));
        lines.extend(b"\r\n");
        server_end.write_all(&lines).await.unwrap();

        for expected in ["literal", "quoted"] {
            let response = client.read_response().await;
            assert!(
                matches!(response, Ok(Some(_))),
                "the {expected} is read: {response:?}"
            );
        }
        let refused = client.read_response().await.unwrap_err();
        assert!(refused.to_string().contains("nested deeper"), "{refused}");
    }

    /// Server lines as Gmail and Dovecot send them (shared/notes/provider-wire-facts.md).
    const RECORDED: [&[u8]; 18] = [
        b"* CAPABILITY IMAP4rev1 UNSELECT IDLE NAMESPACE QUOTA ID XLIST CHILDREN X-GM-EXT-1 UIDPLUS COMPRESS=DEFLATE ENABLE MOVE CONDSTORE ESEARCH UTF8=ACCEPT LIST-EXTENDED LIST-STATUS LITERAL- SPECIAL-USE APPENDLIMIT=35651584\r\n",
        b"* LIST (\\HasNoChildren \\Sent) \"/\" \"[Gmail]/Sent Mail\"\r\n",
        b"* LIST (\\All \\HasNoChildren) \"/\" \"[Gmail]/All Mail\"\r\n",
        b"* LIST (\\HasChildren \\Noselect) \"/\" \"[Gmail]\"\r\n",
        b"* LIST (\\HasNoChildren \\UnMarked \\Trash) \".\" Trash\r\n",
        b"* 9 FETCH (X-GM-THRID 1709166704339021881 X-GM-MSGID 1709167321102384438 X-GM-LABELS (\"\\\\Important\" Clients) UID 196 MODSEQ (27086) FLAGS (\\Seen))\r\n",
        b"* 1 FETCH (UID 5 RFC822.SIZE 1234 INTERNALDATE \" 7-Jul-2026 02:44:25 -0700\")\r\n",
        b"* 1 FETCH (UID 5 FLAGS (\\Seen \\Flagged) BODY[] {12}\r\nHello world!)\r\n",
        b"* 2 FETCH (UID 7 BODY[HEADER] {20}\r\nSubject: hi\r\n\r\n12345)\r\n",
        b"* VANISHED (EARLIER) 41,43:116,118,120:211,214:540\r\n",
        b"* OK [HIGHESTMODSEQ 917752]\r\n",
        b"* OK [UIDVALIDITY 636588758] UIDs valid.\r\n",
        b"+ eyJzdGF0dXMiOiI0MDAiLCJzY2hlbWVzIjoiQmVhcmVyIiwic2NvcGUiOiJodHRwczovL21haWwuZ29vZ2xlLmNvbS8ifQ==\r\n",
        b"a NO [ALERT] Application-specific password required: https://support.google.com/accounts/answer/185833 (Failure)\r\n",
        b"* BYE [OVERQUOTA] Account exceeded command or bandwidth limits.\r\n",
        b"* SEARCH 1 2 3 24821\r\n",
        b"* 3 EXPUNGE\r\n",
        b"A0005 OK [READ-WRITE] INBOX selected. (Success)\r\n",
    ];

    /// What IMAP parsers trip on: literals, quotes, escapes, nesting.
    const IMAP_TOKENS: [&[u8]; 12] = [
        b"{5}\r\n",
        b"{4294967295}\r\n",
        b"~{3}\r\n",
        b"\"",
        b"\\",
        b"(",
        b")",
        b"X-GM-LABELS (",
        b"\r\n",
        b"NIL",
        b"MODSEQ (18446744073709551615)",
        b"\\Sent",
    ];

    /// A server line, whatever it holds, is parsed or refused, never a
    /// panic; what the bridge reads of it is bounded by its size.
    fn read_within_bounds(line: &[u8]) -> Result<(), proptest::test_runner::TestCaseError> {
        use async_imap::imap_proto::{MailboxDatum, Response};
        // The vendored imap-proto no longer panics on the two inputs 0.17
        // did (vendor/README.md): any panic fails the test.
        match Response::parse(line) {
            Ok((_, Response::Fetch(_, attributes))) => {
                let fetched = super::Fetched::from_attributes(&attributes);
                let held = fetched.body.map_or(0, |b| b.len())
                    + fetched.header.map_or(0, |h| h.len())
                    + fetched
                        .labels
                        .iter()
                        .flatten()
                        .chain(fetched.flags.iter().flatten())
                        .map(String::len)
                        .sum::<usize>();
                proptest::prop_assert!(held <= 3 * line.len());
            }
            Ok((_, Response::MailboxData(datum @ MailboxDatum::List(_)))) => {
                let folder = super::Folder::from_list(&datum);
                // Invalid UTF-8 becomes U+FFFD (3 bytes) per byte.
                proptest::prop_assert!(folder.is_some_and(|f| f.name.len() <= 3 * line.len()));
            }
            _ => {}
        }
        let text = String::from_utf8_lossy(line);
        let _ = internal_date(&text);
        proptest::prop_assert!(unescape_quoted(&text).len() <= text.len());
        Ok(())
    }

    proptest::proptest! {
        #![proptest_config(crate::mutation::bounded(1024))]
        /// Issue 10: recorded server lines, broken the way a cut or hostile server breaks them.
        #[test]
        fn edited_server_lines_are_read_within_bounds(
            (seed, edits) in crate::mutation::edited(RECORDED.len(), IMAP_TOKENS.len(), 8)
        ) {
            read_within_bounds(&crate::mutation::apply(RECORDED[seed], &edits, &IMAP_TOKENS))?;
        }
    }

    /// The long run: `cargo test --release -- --ignored fuzz`.
    #[test]
    #[ignore]
    fn fuzz_imap_long() {
        crate::mutation::run_long(&RECORDED, &IMAP_TOKENS, 16, read_within_bounds);
    }

    #[test]
    fn gmail_labels_as_imap_proto_leaves_them_are_unescaped() {
        assert_eq!(unescape_quoted("\\\\Inbox"), "\\Inbox");
        assert_eq!(unescape_quoted("\\Inbox"), "\\Inbox");
        assert_eq!(
            unescape_quoted(r#"Muy \"Importante\""#),
            r#"Muy "Importante""#
        );
    }

    #[test]
    fn uid_sets_write_runs_as_ranges() {
        assert_eq!(uid_set(&[]), "");
        assert_eq!(uid_set(&[4]), "4");
        assert_eq!(uid_set(&[1, 2, 3, 7, 9, 10]), "1:3,7,9:10");
        assert_eq!(uid_set(&[u32::MAX - 1, u32::MAX]), "4294967294:4294967295");
    }

    #[test]
    fn internal_dates_parse_with_a_padded_day() {
        let expected = chrono::DateTime::parse_from_rfc3339("2026-07-07T09:44:25Z").unwrap();
        assert_eq!(
            internal_date(" 7-Jul-2026 02:44:25 -0700"),
            Some(expected.into())
        );
        assert_eq!(
            internal_date("07-Jul-2026 02:44:25 -0700"),
            Some(expected.into())
        );
        assert_eq!(internal_date("garbage"), None);
    }
}
