//! An IMAP server on 127.0.0.1 port 0 scripted after Gmail's, for what the
//! stack's Dovecot cannot show: labels (`X-GM-EXT-1`, `X-GM-LABELS`) and All
//! Mail (SPECIAL-USE `\All`), where every message of the account is, beside
//! its copy in INBOX or Sent. Its words are Gmail's as recorded in
//! `shared/notes/provider-wire-facts.md`: the post-login CAPABILITY (CONDSTORE,
//! no QRESYNC), the LIST of `[Gmail]/…` folders, SELECT's HIGHESTMODSEQ,
//! `+ idling`, and system labels quoted with the backslash escaped
//! (node-imap#852).
//!
//! It keeps its mail in memory and serves what the bridge asks: LOGIN,
//! CAPABILITY, LIST, SELECT/EXAMINE (with CONDSTORE), STATUS, UID FETCH (UID,
//! RFC822.SIZE, INTERNALDATE, FLAGS, X-GM-LABELS, BODY.PEEK[], the Message-ID
//! header, CHANGEDSINCE),
//! UID SEARCH (UID set, HEADER Message-ID alone or under OR), IDLE/DONE, NOOP, LOGOUT; the
//! test changes its mail (deliver, archive, relabel) and sessions in IDLE hear of it.
//! It can hide a folder as Gmail's "Show in IMAP" unticked does (not listed,
//! `NO [NONEXISTENT]` to SELECT and STATUS), and stall the sessions that
//! selected a folder (they answer nothing, and hear nothing in IDLE, until
//! resumed), as a half-dead connection does.
//! Anything else is answered `BAD`, never a panic. Plain TCP: the daemon
//! allows `"security": "plain"` towards loopback only, which this is.

use std::sync::{Arc, Mutex};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};

pub const INBOX: &str = "INBOX";
pub const ALL_MAIL: &str = "[Gmail]/All Mail";
pub const SENT: &str = "[Gmail]/Sent Mail";
pub const TRASH: &str = "[Gmail]/Trash";

const CAPABILITIES: &str = "IMAP4rev1 UNSELECT IDLE NAMESPACE QUOTA ID XLIST CHILDREN X-GM-EXT-1 UIDPLUS COMPRESS=DEFLATE ENABLE MOVE CONDSTORE ESEARCH UTF8=ACCEPT LIST-EXTENDED LIST-STATUS LITERAL- SPECIAL-USE APPENDLIMIT=35651584";

/// Gmail's folders, in the order and with the attributes its LIST gives.
const FOLDERS: [(&str, &str); 8] = [
    (INBOX, "\\HasNoChildren"),
    ("[Gmail]", "\\HasChildren \\Noselect"),
    (ALL_MAIL, "\\All \\HasNoChildren"),
    ("[Gmail]/Drafts", "\\Drafts \\HasNoChildren"),
    (SENT, "\\HasNoChildren \\Sent"),
    ("[Gmail]/Spam", "\\HasNoChildren \\Junk"),
    ("[Gmail]/Starred", "\\Flagged \\HasNoChildren"),
    (TRASH, "\\HasNoChildren \\Trash"),
];

struct Stored {
    uid: u32,
    raw: Vec<u8>,
    message_id: String,
    flags: Vec<String>,
    /// What `X-GM-LABELS` names (the selected folder's own label aside).
    labels: Vec<String>,
    modseq: u64,
    /// `X-GM-MSGID`: the same for every copy of a message.
    msgid: u64,
}

struct Folder {
    name: String,
    uid_validity: u32,
    next_uid: u32,
    messages: Vec<Stored>,
}

struct Account {
    /// AUTHENTICATE commands (XOAUTH2: an access token) begun.
    authentications: usize,
    /// A folder that cannot be opened now; sessions on it are ended.
    offline: Option<String>,
    folders: Vec<Folder>,
    highest_modseq: u64,
    /// Bodies served, per folder: (folder, Message-ID).
    bodies_served: Vec<(String, String)>,
    /// Labels served in listings of new mail, per folder: (folder, Message-ID, labels).
    labels_served: Vec<(String, String, Vec<String>)>,
    /// Folders not listed and not opened ("Show in IMAP" unticked).
    hidden: Vec<String>,
    /// Sessions that selected this folder answer nothing until resumed.
    stalled: Option<String>,
    next_msgid: u64,
}

impl Account {
    fn folder(&self, name: &str) -> Option<&Folder> {
        self.folders.iter().find(|f| f.name == name)
    }

    fn folder_mut(&mut self, name: &str) -> Option<&mut Folder> {
        self.folders.iter_mut().find(|f| f.name == name)
    }
}

pub struct ScriptedGmail {
    pub port: u16,
    account: Arc<Mutex<Account>>,
    /// Bumped at every change, so idling sessions announce it.
    changed: watch::Sender<u64>,
    accept: JoinHandle<()>,
}

impl Drop for ScriptedGmail {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl ScriptedGmail {
    pub async fn start() -> ScriptedGmail {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("scripted Gmail: bind 127.0.0.1:0");
        let port = listener
            .local_addr()
            .expect("scripted Gmail: address")
            .port();
        let folders = FOLDERS
            .iter()
            .enumerate()
            .filter(|(_, (_, attributes))| !attributes.contains("\\Noselect"))
            .map(|(index, (name, _))| Folder {
                name: name.to_string(),
                uid_validity: 636_588_758 + index as u32,
                next_uid: 24_821,
                messages: Vec::new(),
            })
            .collect();
        let account = Arc::new(Mutex::new(Account {
            authentications: 0,
            offline: None,
            folders,
            highest_modseq: 917_752,
            bodies_served: Vec::new(),
            labels_served: Vec::new(),
            hidden: Vec::new(),
            stalled: None,
            next_msgid: 1_709_167_321_102_384_438,
        }));
        let (changed, _) = watch::channel(0u64);
        let accept = {
            let account = account.clone();
            let changed = changed.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let (account, changes) = (account.clone(), changed.subscribe());
                    tokio::spawn(async move {
                        if let Err(err) = serve(client, account, changes).await {
                            eprintln!("scripted Gmail: connection ended: {err}");
                        }
                    });
                }
            })
        };
        ScriptedGmail {
            port,
            account,
            changed,
            accept,
        }
    }

    /// `{"host", "port", "security": "plain"}` for a connect request.
    pub fn endpoint(&self) -> serde_json::Value {
        serde_json::json!({"host": "127.0.0.1", "port": self.port, "security": "plain"})
    }

    /// Mail arrives: a copy in each of `folders` (All Mail always), each
    /// labelled with `labels` (the folder's own label left out, as Gmail does).
    pub fn deliver(&self, raw: &[u8], folders: &[&str], labels: &[&str]) {
        let message_id = mailbridge::mime::parse(raw)
            .message_id
            .expect("a Message-ID");
        {
            let mut account = self.account.lock().expect("account");
            account.next_msgid += 1;
            let msgid = account.next_msgid;
            for name in folders.iter().chain(std::iter::once(&ALL_MAIL)) {
                if name != &ALL_MAIL && !folders.contains(name) {
                    continue;
                }
                account.highest_modseq += 1;
                let modseq = account.highest_modseq;
                let own = match *name {
                    INBOX => "\\Inbox",
                    SENT => "\\Sent",
                    _ => "",
                };
                let folder = account.folder_mut(name).expect("a Gmail folder");
                if folder.messages.iter().any(|m| m.message_id == message_id) {
                    continue;
                }
                let uid = folder.next_uid;
                folder.next_uid += 1;
                folder.messages.push(Stored {
                    uid,
                    raw: raw.to_vec(),
                    message_id: message_id.clone(),
                    flags: Vec::new(),
                    labels: labels
                        .iter()
                        .filter(|l| **l != own)
                        .map(|l| l.to_string())
                        .collect(),
                    modseq,
                    msgid,
                });
            }
        }
        self.changed.send_modify(|n| *n += 1);
    }

    /// Archives a message, as Gmail's "Archive" does: gone from INBOX, its
    /// `\Inbox` label removed from the copy in All Mail.
    pub fn archive(&self, message_id: &str) {
        {
            let mut account = self.account.lock().expect("account");
            account.highest_modseq += 1;
            let modseq = account.highest_modseq;
            if let Some(inbox) = account.folder_mut(INBOX) {
                inbox.messages.retain(|m| m.message_id != message_id);
            }
            if let Some(all) = account.folder_mut(ALL_MAIL) {
                for message in all
                    .messages
                    .iter_mut()
                    .filter(|m| m.message_id == message_id)
                {
                    message.labels.retain(|l| l != "\\Inbox");
                    message.modseq = modseq;
                }
            }
        }
        self.changed.send_modify(|n| *n += 1);
    }

    /// Gives every copy of a message these labels, as a label change in
    /// Gmail's web client does (each copy's own folder label kept out).
    pub fn relabel(&self, message_id: &str, labels: &[&str]) {
        {
            let mut account = self.account.lock().expect("account");
            account.highest_modseq += 1;
            let modseq = account.highest_modseq;
            for folder in &mut account.folders {
                for message in folder
                    .messages
                    .iter_mut()
                    .filter(|m| m.message_id == message_id)
                {
                    message.labels = labels.iter().map(|l| l.to_string()).collect();
                    message.modseq = modseq;
                }
            }
        }
        self.changed.send_modify(|n| *n += 1);
    }

    /// Takes a folder offline: sessions on it end with `* BYE`, and it
    /// cannot be opened until `bring_online`.
    pub fn take_offline(&self, folder: &str) {
        self.account.lock().expect("account").offline = Some(folder.to_string());
        self.changed.send_modify(|n| *n += 1);
    }

    /// Hides a folder as Gmail does when its "Show in IMAP" is unticked.
    pub fn hide_folder(&self, folder: &str) {
        self.account
            .lock()
            .expect("account")
            .hidden
            .push(folder.to_string());
        self.changed.send_modify(|n| *n += 1);
    }

    /// Shows a hidden folder again.
    pub fn show_folder(&self, folder: &str) {
        self.account
            .lock()
            .expect("account")
            .hidden
            .retain(|f| f != folder);
        self.changed.send_modify(|n| *n += 1);
    }

    /// Sessions that selected `folder` stop answering (commands wait, IDLE
    /// hears nothing) until `resume`; other sessions go on.
    pub fn stall(&self, folder: &str) {
        self.account.lock().expect("account").stalled = Some(folder.to_string());
    }

    /// Stalled sessions answer again (and hear what changed meanwhile).
    pub fn resume(&self) {
        self.account.lock().expect("account").stalled = None;
        self.changed.send_modify(|n| *n += 1);
    }

    /// Whether a listing of new mail in `folder` (`UID FETCH n:* (… RFC822.SIZE
    /// … X-GM-LABELS)`, not a read of changes) gave this message with this label.
    pub fn labels_served(&self, folder: &str, message_id: &str, label: &str) -> bool {
        let account = self.account.lock().expect("account");
        account.labels_served.iter().any(|(f, id, labels)| {
            f == folder && id == message_id && labels.iter().any(|l| l == label)
        })
    }

    /// How many AUTHENTICATE commands (which carry an access token) began.
    pub fn authentications(&self) -> usize {
        self.account.lock().expect("account").authentications
    }

    /// The Message-IDs whose bodies were served from `folder`.
    pub fn bodies_served_from(&self, folder: &str) -> Vec<String> {
        let account = self.account.lock().expect("account");
        account
            .bodies_served
            .iter()
            .filter(|(f, _)| f == folder)
            .map(|(_, id)| id.clone())
            .collect()
    }
}

/// Waits while the session's folder is stalled (a half-dead connection:
/// nothing is answered, nothing announced).
async fn stalled_until_resumed(
    account: &Mutex<Account>,
    selected: &Option<String>,
    changes: &mut watch::Receiver<u64>,
) -> std::io::Result<()> {
    loop {
        let stalled = account.lock().expect("account").stalled.clone();
        if selected.is_none() || stalled != *selected {
            return Ok(());
        }
        if changes.changed().await.is_err() {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
    }
}

/// A command's words: atoms, quoted strings (unquoted), and parenthesised
/// lists kept whole with their parentheses.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = line.trim_end().chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            ' ' => {
                chars.next();
            }
            '"' => {
                chars.next();
                let mut word = String::new();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => word.extend(chars.next()),
                        '"' => break,
                        other => word.push(other),
                    }
                }
                out.push(word);
            }
            '(' => {
                let mut depth = 0;
                let mut word = String::new();
                for c in chars.by_ref() {
                    word.push(c);
                    match c {
                        '(' => depth += 1,
                        ')' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                out.push(word);
            }
            _ => {
                let mut word = String::new();
                while let Some(&c) = chars.peek() {
                    if c == ' ' {
                        break;
                    }
                    word.push(c);
                    chars.next();
                }
                out.push(word);
            }
        }
    }
    out
}

/// Whether `uid` is in an IMAP UID set (`1:3,7,9:*`), `*` being `last`.
fn in_set(set: &str, uid: u32, last: u32) -> bool {
    let number = |text: &str| match text {
        "*" => Some(last),
        digits => digits.parse::<u32>().ok(),
    };
    set.split(',').any(|part| match part.split_once(':') {
        Some((from, to)) => match (number(from), number(to)) {
            (Some(a), Some(b)) => (a.min(b)..=a.max(b)).contains(&uid),
            _ => false,
        },
        None => number(part) == Some(uid),
    })
}

fn quoted(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

async fn serve(
    client: TcpStream,
    account: Arc<Mutex<Account>>,
    mut changes: watch::Receiver<u64>,
) -> std::io::Result<()> {
    let (read, mut write) = client.into_split();
    let mut read = BufReader::new(read);
    write
        .write_all(b"* OK Gimap ready for requests from 127.0.0.1 scripted\r\n")
        .await?;
    let mut selected: Option<String> = None;
    let mut line = String::new();
    loop {
        line.clear();
        if read.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let words = words(&line);
        let Some(tag) = words.first().cloned() else {
            continue;
        };
        let verb = words
            .get(1)
            .map(|v| v.to_ascii_uppercase())
            .unwrap_or_default();
        stalled_until_resumed(&account, &selected, &mut changes).await?;
        // A session on a folder taken offline ends at its next command.
        let offline = account.lock().expect("account").offline.clone();
        if offline.is_some() && offline == selected {
            write.write_all(b"* BYE System Error\r\n").await?;
            return Ok(());
        }
        let mut out = String::new();
        // A change since the last command is announced with this one's
        // answer, as a real server does (untagged, before the tagged reply).
        if changes.has_changed().unwrap_or(false) {
            changes.borrow_and_update();
            if let Some(name) = &selected {
                let count = account
                    .lock()
                    .expect("account")
                    .folder(name)
                    .map_or(0, |f| f.messages.len());
                out.push_str(&format!("* {count} EXISTS\r\n"));
            }
        }
        let mut body_literals: Vec<u8> = Vec::new();
        match verb.as_str() {
            "CAPABILITY" => {
                out.push_str(&format!(
                    "* CAPABILITY {CAPABILITIES}\r\n{tag} OK Thats all she wrote!\r\n"
                ));
            }
            "AUTHENTICATE" => {
                account.lock().expect("account").authentications += 1;
                out.push_str(&format!(
                    "{tag} NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)\r\n"
                ));
            }
            "LOGIN" => {
                out.push_str(&format!(
                    "* CAPABILITY {CAPABILITIES}\r\n{tag} OK user authenticated (Success)\r\n"
                ));
            }
            "NOOP" => out.push_str(&format!("{tag} OK Success\r\n")),
            "LOGOUT" => {
                write
                    .write_all(
                        format!("* BYE LOGOUT Requested\r\n{tag} OK 73 good day (Success)\r\n")
                            .as_bytes(),
                    )
                    .await?;
                return Ok(());
            }
            "LIST" => {
                let hidden = account.lock().expect("account").hidden.clone();
                for (name, attributes) in FOLDERS {
                    if hidden.iter().any(|h| h == name) {
                        continue;
                    }
                    out.push_str(&format!("* LIST ({attributes}) \"/\" {}\r\n", quoted(name)));
                }
                out.push_str(&format!("{tag} OK Success\r\n"));
            }
            "SELECT" | "EXAMINE" => {
                let name = words.get(2).cloned().unwrap_or_default();
                let account = account.lock().expect("account");
                let shown = |name: &str| !account.hidden.iter().any(|h| h == name);
                match account.folder(&name).filter(|f| shown(&f.name)) {
                    Some(_) if account.offline.as_deref() == Some(name.as_str()) => {
                        out.push_str(&format!(
                            "{tag} NO [UNAVAILABLE] Temporary System Error (Failure)\r\n"
                        ));
                    }
                    Some(folder) => {
                        out.push_str(&format!(
                            "* FLAGS (\\Answered \\Flagged \\Draft \\Deleted \\Seen)\r\n* {} EXISTS\r\n* 0 RECENT\r\n* OK [UIDVALIDITY {}] UIDs valid.\r\n* OK [UIDNEXT {}] Predicted next UID.\r\n* OK [HIGHESTMODSEQ {}]\r\n{tag} OK [READ-{}] {} selected. (Success)\r\n",
                            folder.messages.len(),
                            folder.uid_validity,
                            folder.next_uid,
                            account.highest_modseq,
                            if verb == "SELECT" { "WRITE" } else { "ONLY" },
                            name,
                        ));
                        selected = Some(name);
                    }
                    None => out.push_str(&format!(
                        "{tag} NO [NONEXISTENT] Unknown Mailbox: {name} (Failure)\r\n"
                    )),
                }
            }
            "STATUS" => {
                let name = words.get(2).cloned().unwrap_or_default();
                let account = account.lock().expect("account");
                let shown = !account.hidden.contains(&name);
                match account.folder(&name).filter(|_| shown) {
                    Some(folder) => out.push_str(&format!(
                        "* STATUS {} (UIDNEXT {} UIDVALIDITY {})\r\n{tag} OK Success\r\n",
                        quoted(&name),
                        folder.next_uid,
                        folder.uid_validity
                    )),
                    None => out.push_str(&format!(
                        "{tag} NO [NONEXISTENT] Unknown Mailbox: {name} (Failure)\r\n"
                    )),
                }
            }
            "UID" => {
                let command = words
                    .get(2)
                    .map(|c| c.to_ascii_uppercase())
                    .unwrap_or_default();
                let folder_name = selected.clone().unwrap_or_default();
                let mut account = account.lock().expect("account");
                let rest = words.get(3..).unwrap_or_default().to_vec();
                match command.as_str() {
                    "FETCH" => {
                        let set = rest.first().cloned().unwrap_or_default();
                        let items = rest
                            .get(1)
                            .cloned()
                            .unwrap_or_default()
                            .to_ascii_uppercase();
                        let since = rest.get(2).and_then(|m| {
                            m.trim_matches(|c| c == '(' || c == ')')
                                .strip_prefix("CHANGEDSINCE ")
                                .and_then(|n| n.trim().parse::<u64>().ok())
                        });
                        let mut served = Vec::new();
                        let mut labels_served = Vec::new();
                        if let Some(folder) = account.folder(&folder_name) {
                            let last = folder.messages.last().map_or(0, |m| m.uid);
                            for (index, message) in folder.messages.iter().enumerate() {
                                if !in_set(&set, message.uid, last)
                                    || since.is_some_and(|s| message.modseq <= s)
                                {
                                    continue;
                                }
                                let mut parts = vec![format!("UID {}", message.uid)];
                                if items.contains("RFC822.SIZE") {
                                    parts.push(format!("RFC822.SIZE {}", message.raw.len()));
                                }
                                if items.contains("INTERNALDATE") {
                                    parts.push(format!(
                                        "INTERNALDATE \"{}\"",
                                        chrono::Utc::now().format("%d-%b-%Y %H:%M:%S +0000")
                                    ));
                                }
                                if items.contains("FLAGS") {
                                    parts.push(format!("FLAGS ({})", message.flags.join(" ")));
                                }
                                if items.contains("X-GM-LABELS") {
                                    let labels: Vec<String> =
                                        message.labels.iter().map(|l| quoted(l)).collect();
                                    parts.push(format!("X-GM-LABELS ({})", labels.join(" ")));
                                }
                                // A listing of new mail (sizes), not a read of changes.
                                if items.contains("X-GM-LABELS") && items.contains("RFC822.SIZE") {
                                    labels_served.push((
                                        folder_name.clone(),
                                        message.message_id.clone(),
                                        message.labels.clone(),
                                    ));
                                }
                                if items.contains("X-GM-MSGID") {
                                    parts.push(format!("X-GM-MSGID {}", message.msgid));
                                }
                                if since.is_some() {
                                    parts.push(format!("MODSEQ ({})", message.modseq));
                                }
                                let head = format!("* {} FETCH ({}", index + 1, parts.join(" "));
                                if items.contains("BODY.PEEK[]") {
                                    body_literals.extend_from_slice(
                                        format!("{head} BODY[] {{{}}}\r\n", message.raw.len())
                                            .as_bytes(),
                                    );
                                    body_literals.extend_from_slice(&message.raw);
                                    body_literals.extend_from_slice(b")\r\n");
                                    served.push((folder_name.clone(), message.message_id.clone()));
                                } else if items.contains("HEADER.FIELDS (MESSAGE-ID)") {
                                    let header =
                                        format!("Message-ID: {}\r\n\r\n", message.message_id);
                                    body_literals.extend_from_slice(
                                        format!(
                                            "{head} BODY[HEADER.FIELDS (MESSAGE-ID)] {{{}}}\r\n{header})\r\n",
                                            header.len()
                                        )
                                        .as_bytes(),
                                    );
                                } else {
                                    body_literals
                                        .extend_from_slice(format!("{head})\r\n").as_bytes());
                                }
                            }
                        }
                        account.bodies_served.extend(served);
                        account.labels_served.extend(labels_served);
                        out.push_str(&format!("{tag} OK Success\r\n"));
                    }
                    "SEARCH" => {
                        let criteria: Vec<String> =
                            rest.iter().map(|w| w.to_ascii_uppercase()).collect();
                        // `HEADER Message-ID x`, alone or several under OR:
                        // a message with any of them.
                        let ids: Vec<&String> = criteria
                            .iter()
                            .enumerate()
                            .filter(|(at, word)| {
                                *word == "HEADER"
                                    && criteria.get(at + 1).map(String::as_str)
                                        == Some("MESSAGE-ID")
                            })
                            .filter_map(|(at, _)| rest.get(at + 2))
                            .collect();
                        let folder = account.folder(&folder_name);
                        let last = folder.and_then(|f| f.messages.last()).map_or(0, |m| m.uid);
                        let hits: Vec<String> = folder
                            .map(|f| f.messages.as_slice())
                            .unwrap_or_default()
                            .iter()
                            .filter(|m| match criteria.first().map(String::as_str) {
                                Some("UID") => {
                                    rest.get(1).is_some_and(|set| in_set(set, m.uid, last))
                                }
                                Some("HEADER" | "OR") if !ids.is_empty() => {
                                    ids.iter().any(|id| **id == m.message_id)
                                }
                                Some("ALL") | None => true,
                                _ => false,
                            })
                            .map(|m| m.uid.to_string())
                            .collect();
                        out.push_str(
                            &format!(
                                "* SEARCH {}\r\n{tag} OK SEARCH completed (Success)\r\n",
                                hits.join(" ")
                            )
                            .replace("SEARCH \r\n", "SEARCH\r\n"),
                        );
                    }
                    _ => out.push_str(&format!("{tag} BAD Could not parse command\r\n")),
                }
            }
            "IDLE" => {
                write.write_all(b"+ idling\r\n").await?;
                // A change announced at the command goes out now, not after it.
                write.write_all(out.as_bytes()).await?;
                out.clear();
                loop {
                    line.clear();
                    tokio::select! {
                        read_line = read.read_line(&mut line) => {
                            if read_line? == 0 {
                                return Ok(());
                            }
                            if line.trim().eq_ignore_ascii_case("DONE") {
                                stalled_until_resumed(&account, &selected, &mut changes).await?;
                                break;
                            }
                        }
                        changed = changes.changed() => {
                            if changed.is_err() {
                                return Ok(());
                            }
                            changes.borrow_and_update();
                            let stalled = account.lock().expect("account").stalled.clone();
                            if stalled.is_some() && stalled == selected {
                                continue;
                            }
                            let offline = account.lock().expect("account").offline.clone();
                            if offline.is_some() && offline == selected {
                                write.write_all(b"* BYE System Error\r\n").await?;
                                return Ok(());
                            }
                            let count = selected
                                .as_deref()
                                .and_then(|name| account.lock().expect("account").folder(name).map(|f| f.messages.len()))
                                .unwrap_or(0);
                            write.write_all(format!("* {count} EXISTS\r\n").as_bytes()).await?;
                        }
                    }
                }
                out.push_str(&format!("{tag} OK IDLE terminated (Success)\r\n"));
            }
            _ => out.push_str(&format!("{tag} BAD Could not parse command\r\n")),
        }
        write.write_all(&body_literals).await?;
        write.write_all(out.as_bytes()).await?;
    }
}
