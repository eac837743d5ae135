//! An SMTP submission server on 127.0.0.1 port 0, scripted after Exchange
//! Online (smtp.office365.com): it replaces the Message-ID of every message
//! submitted to it with one of its own, relays the rewritten message to the
//! real stack's MX, files it in the sender's Sent folder itself (as Exchange
//! files SMTP submissions in Sent Items), and only then names the new id in
//! its reply to DATA:
//! `250 2.0.0 OK <…@….prod.outlook.com> [Hostname=…]`.
//!
//! Plain TCP, no TLS: the daemon allows `"security": "plain"` towards loopback
//! only, which this is. Whatever a client sends is answered with an SMTP reply,
//! never a panic; a relay or APPEND that fails is answered with a 451 and kept
//! in `failures()` so a test can say what went wrong.

use std::sync::{Arc, Mutex};

use base64::Engine as _;
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor, address::Envelope};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

use super::stack::{Stack, User};

/// The host Exchange names in its replies (a mailbox server of EUR).
pub const HOSTNAME: &str = "AM0PR01MB1234.eurprd01.prod.outlook.com";

/// Bigger messages are refused like Exchange's 150 MB limit refuses them.
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// A command line longer than this ends the conversation.
const MAX_LINE_BYTES: usize = 16 * 1024;

/// One message the server took, under the Message-ID it gave it.
#[derive(Clone, Debug)]
pub struct Assigned {
    /// The Message-ID the client's message carried (None if it had none).
    pub original: Option<String>,
    /// The Message-ID this server replaced it with, `<…@….prod.outlook.com>`.
    pub assigned: String,
    pub from: String,
    pub recipients: Vec<String>,
    /// The `250 …` line the server answered DATA with.
    pub reply: String,
}

#[derive(Default)]
struct Log {
    assigned: Vec<Assigned>,
    failures: Vec<String>,
    next_reply: NextReply,
    /// When set, every AUTH is answered with this instead of 235.
    refuse_logins: Option<String>,
}

/// What the server does once it took the next message (relayed and filed it).
#[derive(Default)]
enum NextReply {
    #[default]
    Answer,
    /// Waits for the test before answering 250.
    Hold(Arc<tokio::sync::Notify>),
    /// Closes the connection without a reply, as a dropped connection would.
    Drop,
    /// As `Drop`, and files the copy in Sent only once notified, as a
    /// server that files Sent late does.
    DropFilingLater(Arc<tokio::sync::Notify>),
}

pub struct ScriptedSmtp {
    pub port: u16,
    log: Arc<Mutex<Log>>,
    accept: JoinHandle<()>,
}

impl Drop for ScriptedSmtp {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl ScriptedSmtp {
    /// Listens on 127.0.0.1 port 0; relays to and files in `stack`.
    pub async fn start(stack: Stack) -> ScriptedSmtp {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("scripted SMTP: bind 127.0.0.1:0");
        let port = listener
            .local_addr()
            .expect("scripted SMTP: local address")
            .port();
        let log = Arc::new(Mutex::new(Log::default()));
        let stack = Arc::new(stack);
        let accept = {
            let log = log.clone();
            tokio::spawn(async move {
                loop {
                    let (stream, _) = match listener.accept().await {
                        Ok(accepted) => accepted,
                        Err(err) => {
                            eprintln!("scripted SMTP: accept failed: {err}");
                            continue;
                        }
                    };
                    let (stack, log) = (stack.clone(), log.clone());
                    tokio::spawn(async move {
                        let mut session = Session {
                            stack,
                            log: log.clone(),
                            user: None,
                            from: None,
                            recipients: Vec::new(),
                        };
                        if let Err(err) = session.serve(stream).await {
                            // A client that goes away mid-conversation is no failure of ours.
                            eprintln!("scripted SMTP: connection ended: {err}");
                        }
                    });
                }
            })
        };
        ScriptedSmtp { port, log, accept }
    }

    /// The endpoint to connect a mailbox with (`"smtp": …`).
    pub fn endpoint(&self) -> serde_json::Value {
        serde_json::json!({"host": "127.0.0.1", "port": self.port, "security": "plain"})
    }

    /// Every message taken so far, in the order the 250s were given.
    pub fn assigned(&self) -> Vec<Assigned> {
        self.log.lock().expect("scripted SMTP log").assigned.clone()
    }

    /// The next message taken is answered only once the returned `Notify`
    /// is notified: its copy is in Sent and with the contact meanwhile.
    pub fn hold_next_reply(&self) -> Arc<tokio::sync::Notify> {
        let release = Arc::new(tokio::sync::Notify::new());
        self.log.lock().expect("scripted SMTP log").next_reply = NextReply::Hold(release.clone());
        release
    }

    /// The next message taken gets no reply: the connection closes after the
    /// server relayed and filed it.
    pub fn drop_next_reply(&self) {
        self.log.lock().expect("scripted SMTP log").next_reply = NextReply::Drop;
    }

    /// The next message taken gets no reply (the connection closes after the
    /// server relayed it), and its copy reaches Sent only once the returned
    /// `Notify` is notified.
    pub fn drop_next_reply_filing_later(&self) -> Arc<tokio::sync::Notify> {
        let release = Arc::new(tokio::sync::Notify::new());
        self.log.lock().expect("scripted SMTP log").next_reply =
            NextReply::DropFilingLater(release.clone());
        release
    }

    /// Every later AUTH gets `answer`, as when SMTP AUTH is turned off for
    /// the tenant: `535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. …`.
    pub fn refuse_logins(&self, answer: &str) {
        self.log.lock().expect("scripted SMTP log").refuse_logins = Some(answer.to_string());
    }

    /// Relays or APPENDs that failed (answered 451).
    pub fn failures(&self) -> Vec<String> {
        self.log.lock().expect("scripted SMTP log").failures.clone()
    }
}

/// How a message came to be logged in.
enum Login {
    /// AUTH PLAIN or LOGIN: the server can open the user's mailbox to file Sent.
    Password(User),
    /// AUTH XOAUTH2: accepted, but this fixture has no password to file Sent with.
    Token(String),
}

struct Session {
    stack: Arc<Stack>,
    log: Arc<Mutex<Log>>,
    user: Option<Login>,
    from: Option<String>,
    recipients: Vec<String>,
}

type Conn = BufReader<TcpStream>;

async fn reply(conn: &mut Conn, text: &str) -> std::io::Result<()> {
    conn.get_mut()
        .write_all(format!("{text}\r\n").as_bytes())
        .await?;
    conn.get_mut().flush().await
}

/// One line without its CRLF; None at the end of the stream.
async fn read_line(conn: &mut Conn) -> std::io::Result<Option<String>> {
    let mut line = Vec::new();
    let n = (&mut *conn)
        .take(MAX_LINE_BYTES as u64)
        .read_until(b'\n', &mut line)
        .await?;
    if n == 0 {
        return Ok(None);
    }
    if !line.ends_with(b"\n") {
        return Err(std::io::Error::other("command line too long or cut off"));
    }
    while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        line.pop();
    }
    Ok(Some(String::from_utf8_lossy(&line).into_owned()))
}

/// The message after DATA up to the lone `.`, dot-stuffing undone, lines
/// ending in CRLF. None if the stream ended first.
async fn read_data(conn: &mut Conn) -> std::io::Result<Option<(Vec<u8>, bool)>> {
    let mut message = Vec::new();
    let mut too_big = false;
    loop {
        let mut line = Vec::new();
        if conn.read_until(b'\n', &mut line).await? == 0 {
            return Ok(None);
        }
        if line == b".\r\n" || line == b".\n" {
            return Ok(Some((message, too_big)));
        }
        let line = line.strip_prefix(b".").unwrap_or(&line);
        if message.len() + line.len() > MAX_MESSAGE_BYTES {
            too_big = true;
            message.clear();
        }
        if !too_big {
            message.extend_from_slice(line);
        }
    }
}

/// The client's response to AUTH: its initial response, or its answer to a
/// `334` challenge; None if it cancelled with `*`.
async fn respond(
    conn: &mut Conn,
    initial: Option<String>,
    challenge: &str,
) -> std::io::Result<Option<String>> {
    if let Some(initial) = initial {
        return Ok(Some(initial));
    }
    reply(conn, &format!("334 {challenge}")).await?;
    let line = read_line(conn)
        .await?
        .ok_or_else(|| std::io::Error::other("connection closed during AUTH"))?;
    Ok((line.trim() != "*").then_some(line))
}

/// The address inside `FROM:<…>` / `TO:<…>`, parameters ignored.
fn path_argument(argument: &str, keyword: &str) -> Option<String> {
    let rest = argument.get(..keyword.len())?;
    if !rest.eq_ignore_ascii_case(keyword) {
        return None;
    }
    let rest = argument[keyword.len()..].trim_start();
    let inner = rest.strip_prefix('<')?;
    let (address, _) = inner.split_once('>')?;
    Some(address.to_string())
}

fn decode_base64(text: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .ok()
}

/// `authzid NUL authcid NUL password` (RFC 4616).
fn plain_login(response: &[u8]) -> Option<User> {
    let mut parts = response.split(|b| *b == 0);
    let _authzid = parts.next()?;
    let authcid = String::from_utf8(parts.next()?.to_vec()).ok()?;
    let password = String::from_utf8(parts.next()?.to_vec()).ok()?;
    (parts.next().is_none() && !authcid.is_empty()).then_some(User {
        address: authcid,
        password,
    })
}

/// The two base64 lines of AUTH LOGIN.
fn login_login(username: &str, password: &str) -> Option<User> {
    Some(User {
        address: String::from_utf8(decode_base64(username)?).ok()?,
        password: String::from_utf8(decode_base64(password)?).ok()?,
    })
}

/// `user=… ^A auth=Bearer … ^A ^A`: the user's address.
fn xoauth2_user(response: &[u8]) -> Option<String> {
    let text = String::from_utf8(response.to_vec()).ok()?;
    text.split('\x01')
        .find_map(|part| part.strip_prefix("user="))
        .map(str::to_string)
}

/// A Message-ID as Exchange Online makes them: the mailbox server's name in
/// upper case and hex, at the server's full name.
pub fn exchange_message_id() -> String {
    format!(
        "<AM0PR01MB1234{}@{HOSTNAME}>",
        uuid::Uuid::new_v4().simple().to_string().to_uppercase()
    )
}

/// `raw` with its Message-ID header (folded lines included) replaced by
/// `Message-ID: {id}`, or one added if it had none; returns the old id too.
pub fn replace_message_id(raw: &[u8], id: &str) -> (Vec<u8>, Option<String>) {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| at + 2)
        .unwrap_or(raw.len());
    let (head, body) = raw.split_at(split);
    let mut out = Vec::with_capacity(raw.len() + id.len() + 16);
    let mut original: Option<String> = None;
    let mut in_message_id = false;
    for line in head.split_inclusive(|b| *b == b'\n') {
        let continuation = line.first().is_some_and(|b| *b == b' ' || *b == b'\t');
        if continuation {
            if in_message_id {
                if let Some(old) = original.as_mut() {
                    old.push_str(String::from_utf8_lossy(line).trim());
                }
                continue;
            }
        } else {
            in_message_id = line.len() >= 11 && line[..11].eq_ignore_ascii_case(b"message-id:");
            if in_message_id {
                original = Some(String::from_utf8_lossy(&line[11..]).trim().to_string());
                continue;
            }
        }
        out.extend_from_slice(line);
    }
    // The new header goes first, as Exchange writes its own headers on top.
    let mut rewritten = format!("Message-ID: {id}\r\n").into_bytes();
    rewritten.extend_from_slice(&out);
    rewritten.extend_from_slice(body);
    (rewritten, original.filter(|o| !o.is_empty()))
}

impl Session {
    async fn serve(&mut self, stream: TcpStream) -> std::io::Result<()> {
        let mut conn = BufReader::new(stream);
        reply(
            &mut conn,
            &format!(
                "220 {HOSTNAME} Microsoft ESMTP MAIL Service ready at {}",
                chrono::Utc::now().to_rfc2822()
            ),
        )
        .await?;
        while let Some(line) = read_line(&mut conn).await? {
            let (verb, argument) = match line.split_once(' ') {
                Some((verb, argument)) => (verb.to_ascii_uppercase(), argument.trim()),
                None => (line.trim().to_ascii_uppercase(), ""),
            };
            match verb.as_str() {
                "EHLO" => {
                    self.reset();
                    // Exchange Online also offers BINARYMIME and CHUNKING (BDAT);
                    // left out, as this server only speaks DATA.
                    for text in [
                        format!("250-{HOSTNAME} Hello [127.0.0.1]"),
                        "250-SIZE 157286400".into(),
                        "250-PIPELINING".into(),
                        "250-DSN".into(),
                        "250-ENHANCEDSTATUSCODES".into(),
                        "250-AUTH LOGIN PLAIN XOAUTH2".into(),
                        "250-8BITMIME".into(),
                        "250 SMTPUTF8".into(),
                    ] {
                        conn.get_mut()
                            .write_all(format!("{text}\r\n").as_bytes())
                            .await?;
                    }
                    conn.get_mut().flush().await?;
                }
                "HELO" => {
                    self.reset();
                    reply(&mut conn, &format!("250 {HOSTNAME} Hello [127.0.0.1]")).await?;
                }
                "AUTH" => self.auth(&mut conn, argument).await?,
                "MAIL" => {
                    if self.user.is_none() {
                        reply(
                            &mut conn,
                            "530 5.7.57 Client not authenticated to send mail. [MAIL FROM]",
                        )
                        .await?;
                    } else if let Some(from) = path_argument(argument, "FROM:") {
                        self.from = Some(from);
                        self.recipients.clear();
                        reply(&mut conn, "250 2.1.0 Sender OK").await?;
                    } else {
                        reply(&mut conn, "501 5.5.4 Invalid arguments").await?;
                    }
                }
                "RCPT" => match (&self.from, path_argument(argument, "TO:")) {
                    (None, _) => reply(&mut conn, "503 5.5.1 Need mail command").await?,
                    (Some(_), Some(to)) if !to.is_empty() => {
                        self.recipients.push(to);
                        reply(&mut conn, "250 2.1.5 Recipient OK").await?;
                    }
                    _ => reply(&mut conn, "501 5.5.4 Invalid arguments").await?,
                },
                "DATA" => {
                    if self.from.is_none() || self.recipients.is_empty() {
                        reply(&mut conn, "503 5.5.1 Need rcpt command").await?;
                        continue;
                    }
                    reply(&mut conn, "354 Start mail input; end with <CRLF>.<CRLF>").await?;
                    let Some((raw, too_big)) = read_data(&mut conn).await? else {
                        return Ok(());
                    };
                    let answer = if too_big {
                        "552 5.3.4 Message size exceeds fixed maximum message size".to_string()
                    } else {
                        match self.take(raw).await {
                            Some(answer) => answer,
                            None => return Ok(()),
                        }
                    };
                    self.reset();
                    reply(&mut conn, &answer).await?;
                }
                "RSET" => {
                    self.reset();
                    reply(&mut conn, "250 2.0.0 Resetting").await?;
                }
                "NOOP" => reply(&mut conn, "250 2.0.0 OK").await?,
                "QUIT" => {
                    reply(&mut conn, "221 2.0.0 Service closing transmission channel").await?;
                    return Ok(());
                }
                _ => reply(&mut conn, "500 5.3.3 Unrecognized command").await?,
            }
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.from = None;
        self.recipients.clear();
    }

    /// AUTH PLAIN / LOGIN / XOAUTH2, with an initial response or after `334`.
    async fn auth(&mut self, conn: &mut Conn, argument: &str) -> std::io::Result<()> {
        if self.user.is_some() {
            return reply(conn, "503 5.5.1 Already authenticated").await;
        }
        let (mechanism, initial) = match argument.split_once(' ') {
            Some((m, initial)) => (m.to_ascii_uppercase(), Some(initial.trim().to_string())),
            None => (argument.to_ascii_uppercase(), None),
        };
        let login = match mechanism.as_str() {
            "PLAIN" => respond(conn, initial, "").await?.map(|r| {
                decode_base64(&r)
                    .and_then(|r| plain_login(&r))
                    .map(Login::Password)
            }),
            // The challenges are "Username:" and "Password:" in base64.
            "LOGIN" => match respond(conn, initial, "VXNlcm5hbWU6").await? {
                None => None,
                Some(username) => respond(conn, None, "UGFzc3dvcmQ6")
                    .await?
                    .map(|password| login_login(&username, &password).map(Login::Password)),
            },
            "XOAUTH2" => respond(conn, initial, "").await?.map(|r| {
                decode_base64(&r)
                    .and_then(|r| xoauth2_user(&r))
                    .map(Login::Token)
            }),
            _ => return reply(conn, "504 5.7.4 Unrecognized authentication type").await,
        };
        match login {
            None => reply(conn, "501 5.7.0 Authentication cancelled").await,
            Some(None) => reply(conn, "501 5.5.2 Cannot decode response").await,
            Some(Some(login)) => {
                let refusal = self
                    .log
                    .lock()
                    .expect("scripted SMTP log")
                    .refuse_logins
                    .clone();
                if let Some(answer) = refusal {
                    return reply(conn, &answer).await;
                }
                self.user = Some(login);
                reply(conn, "235 2.7.0 Authentication successful").await
            }
        }
    }

    /// Rewrites the Message-ID, relays, files in Sent, records; the reply to
    /// DATA, or None to close the connection without one.
    async fn take(&mut self, raw: Vec<u8>) -> Option<String> {
        let late = {
            let mut log = self.log.lock().expect("scripted SMTP log");
            match std::mem::take(&mut log.next_reply) {
                NextReply::DropFilingLater(release) => Some(release),
                other => {
                    log.next_reply = other;
                    None
                }
            }
        };
        if let Some(release) = late {
            let answer = self.take_and_file(raw, Some(release)).await;
            return (!answer.starts_with("250")).then_some(answer);
        }
        let answer = self.take_and_file(raw, None).await;
        if !answer.starts_with("250") {
            return Some(answer);
        }
        let next = std::mem::take(&mut self.log.lock().expect("scripted SMTP log").next_reply);
        match next {
            NextReply::Answer => Some(answer),
            NextReply::Hold(release) => {
                release.notified().await;
                Some(answer)
            }
            NextReply::Drop | NextReply::DropFilingLater(_) => None,
        }
    }

    /// With `file_when`, the copy is filed in Sent only once it is notified.
    async fn take_and_file(
        &mut self,
        raw: Vec<u8>,
        file_when: Option<Arc<tokio::sync::Notify>>,
    ) -> String {
        let user = match &self.user {
            Some(Login::Password(user)) => user.clone(),
            Some(Login::Token(address)) => {
                return self.failed(format!(
                    "451 4.3.0 scripted SMTP: {address} logged in with XOAUTH2; this fixture files Sent with a password login only"
                ));
            }
            None => return "530 5.7.57 Client not authenticated to send mail. [DATA]".into(),
        };
        let from = self.from.clone().unwrap_or_default();
        let recipients = self.recipients.clone();
        let assigned = exchange_message_id();
        let (rewritten, original) = replace_message_id(&raw, &assigned);
        if let Err(err) = relay(&self.stack, &from, &recipients, &rewritten).await {
            return self.failed(format!(
                "451 4.4.0 scripted SMTP: relaying to the stack's MX failed: {err}"
            ));
        }
        if let Some(release) = file_when {
            let stack = self.stack.clone();
            tokio::spawn(async move {
                release.notified().await;
                if let Err(err) = file_in_sent(&stack, &user, &rewritten).await {
                    eprintln!("scripted SMTP: filing in Sent late failed: {err}");
                }
            });
        } else if let Err(err) = file_in_sent(&self.stack, &user, &rewritten).await {
            return self.failed(format!(
                "451 4.4.0 scripted SMTP: filing in Sent of {} failed: {err}",
                user.address
            ));
        }
        let reply = format!("250 2.0.0 OK {assigned} [Hostname={HOSTNAME}]");
        self.log
            .lock()
            .expect("scripted SMTP log")
            .assigned
            .push(Assigned {
                original,
                assigned,
                from,
                recipients,
                reply: reply.clone(),
            });
        reply
    }

    fn failed(&self, reply: String) -> String {
        eprintln!("{reply}");
        self.log
            .lock()
            .expect("scripted SMTP log")
            .failures
            .push(reply.clone());
        reply
    }
}

/// Hands the message to the real stack's MX, as Exchange hands it on.
async fn relay(stack: &Stack, from: &str, to: &[String], raw: &[u8]) -> Result<(), String> {
    let transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(stack.mx_port)
        .timeout(Some(std::time::Duration::from_secs(20)))
        .build();
    let envelope = Envelope::new(
        Some(from.parse().map_err(|e| format!("from {from:?}: {e}"))?),
        to.iter()
            .map(|t| t.parse().map_err(|e| format!("recipient {t:?}: {e}")))
            .collect::<Result<_, _>>()?,
    )
    .map_err(|e| format!("envelope: {e}"))?;
    transport
        .send_raw(&envelope, raw)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// APPENDs the message to the user's Sent folder, \Seen, as Exchange files it.
async fn file_in_sent(stack: &Stack, user: &User, raw: &[u8]) -> Result<(), String> {
    let mut session = stack
        .try_session(user)
        .await
        .map_err(|e| format!("IMAP login: {e}"))?;
    session
        .append("Sent", Some("(\\Seen)"), None, raw)
        .await
        .map_err(|e| format!("APPEND: {e}"))?;
    let _ = session.logout().await;
    Ok(())
}
