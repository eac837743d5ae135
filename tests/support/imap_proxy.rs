//! A plain-TCP proxy on 127.0.0.1 port 0 in front of the stack's Dovecot
//! (its plain port), passing everything through, that can be told to answer
//! in Dovecot's place with words a healthy Dovecot does not use on demand:
//! refuse the next logins (RFC 5530's `[UNAVAILABLE]`, what Dovecot says when
//! its passdb fails, or a one-off `[AUTHENTICATIONFAILED]`), or refuse the
//! next body FETCHes as Gmail does (`NO [UNAVAILABLE] Some messages could not
//! be FETCHed`), or act as a server without some extensions (MOVE, CONDSTORE,
//! QRESYNC: hidden from every CAPABILITY list and their commands refused
//! with `BAD`, as a server that lacks them answers), or act as a server
//! without some folders (not listed; `NO [NONEXISTENT]` to commands naming
//! them). It reads the client's
//! commands line by line (literals passed through whole) and copies the
//! server's answers as they come (line by line while hiding extensions).

use std::sync::{Arc, Mutex};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

use super::stack::Stack;

#[derive(Default)]
struct Script {
    /// Answers for the next logins, in order; empty: pass them on.
    refusals: Vec<String>,
    refused: usize,
    /// When each refusal was given.
    refused_at: Vec<std::time::Instant>,
    logins_passed: usize,
    /// Client connections open now.
    open: usize,
    /// How many of the next `UID FETCH … BODY.PEEK[]` get `FETCH_REFUSED`.
    fetch_refusals: usize,
    fetches_refused: usize,
    /// The next body FETCH waits for this before it reaches Dovecot.
    hold_fetch: Option<Arc<tokio::sync::Notify>>,
    /// The next body FETCH in this folder (on a session that selected it)
    /// waits for this before it reaches Dovecot.
    hold_fetch_in: Option<(String, Arc<tokio::sync::Notify>)>,
    /// The next `UID SEARCH UID …` waits for this before it reaches Dovecot.
    hold_search: Option<Arc<tokio::sync::Notify>>,
    /// The next listing (`UID FETCH n:* (UID RFC822.SIZE …)`) waits for this.
    hold_listing: Option<Arc<tokio::sync::Notify>>,
    holding: bool,
    /// What the next IDLEs are answered instead of `+ idling`, in order.
    idle_refusals: Vec<String>,
    /// How many of the next IDLEs the proxy answers itself: the continuation,
    /// then at once the tagged end of IDLE (never passed on to Dovecot).
    idle_endings: usize,
    /// How many of the next APPENDs are refused.
    append_refusals: usize,
    /// Capabilities the server is made to lack (upper case).
    hidden: Vec<String>,
    /// Folders the server is made to lack.
    hidden_folders: Vec<String>,
    /// Commands passed on, by verb (upper case; `UID FETCH` is `UID`).
    commands: std::collections::HashMap<String, usize>,
}

/// Gmail's words for a FETCH it cannot serve now.
pub const FETCH_REFUSED: &str = "NO [UNAVAILABLE] Some messages could not be FETCHed (Failure)";

pub struct ImapProxy {
    pub port: u16,
    script: Arc<Mutex<Script>>,
    accept: JoinHandle<()>,
}

impl Drop for ImapProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Dovecot's words when its passdb cannot answer (auth-common: "Temporary
/// authentication failure"), with the RFC 5530 code it sends them under.
pub const UNAVAILABLE: &str = "NO [UNAVAILABLE] Temporary authentication failure. [proxy]";
pub const AUTHENTICATION_FAILED: &str = "NO [AUTHENTICATIONFAILED] Authentication failed.";

impl ImapProxy {
    pub async fn start(stack: &Stack) -> ImapProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("IMAP proxy: bind 127.0.0.1:0");
        let port = listener.local_addr().expect("IMAP proxy: address").port();
        let upstream = format!("127.0.0.1:{}", stack.imap_port);
        let script = Arc::new(Mutex::new(Script::default()));
        let accept = {
            let script = script.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let (upstream, script) = (upstream.clone(), script.clone());
                    tokio::spawn(async move {
                        script.lock().expect("proxy script").open += 1;
                        if let Err(err) = serve(client, &upstream, script.clone()).await {
                            eprintln!("IMAP proxy: connection ended: {err}");
                        }
                        script.lock().expect("proxy script").open -= 1;
                    });
                }
            })
        };
        ImapProxy {
            port,
            script,
            accept,
        }
    }

    /// From now on the server lacks these extensions (`"MOVE"`,
    /// `"CONDSTORE"`, `"QRESYNC"`): not advertised, their commands refused.
    pub fn hide_capabilities(&self, hidden: &[&str]) {
        let mut script = self.script.lock().expect("proxy script");
        script.hidden = hidden.iter().map(|c| c.to_ascii_uppercase()).collect();
    }

    /// From now on the server lacks these folders: LIST leaves them out, and
    /// SELECT, EXAMINE, STATUS and APPEND naming them are refused as
    /// Dovecot refuses a folder that does not exist.
    pub fn hide_folders(&self, folders: &[&str]) {
        let mut script = self.script.lock().expect("proxy script");
        script.hidden_folders = folders.iter().map(|f| f.to_string()).collect();
    }

    /// `{"host", "port", "security": "plain"}` for a connect request.
    pub fn endpoint(&self) -> serde_json::Value {
        serde_json::json!({"host": "127.0.0.1", "port": self.port, "security": "plain"})
    }

    /// The next `count` logins get `answer` (without the tag) instead of Dovecot's.
    pub fn refuse_next(&self, count: usize, answer: &str) {
        let mut script = self.script.lock().expect("proxy script");
        script
            .refusals
            .extend(std::iter::repeat_n(answer.to_string(), count));
    }

    /// Logins pass again: the refusals not yet given are dropped.
    pub fn stop_refusing(&self) {
        self.script.lock().expect("proxy script").refusals.clear();
    }

    /// The next `count` body FETCHes are answered `FETCH_REFUSED`.
    pub fn refuse_next_fetches(&self, count: usize) {
        self.script.lock().expect("proxy script").fetch_refusals += count;
    }

    /// The next body FETCH is held back until the returned `Notify` is
    /// notified (see `holding`).
    pub fn hold_next_fetch(&self) -> Arc<tokio::sync::Notify> {
        let release = Arc::new(tokio::sync::Notify::new());
        self.script.lock().expect("proxy script").hold_fetch = Some(release.clone());
        release
    }

    /// The next body FETCH on a session that selected `folder` is held back
    /// until the returned `Notify` is notified; other folders' go on.
    pub fn hold_next_fetch_in(&self, folder: &str) -> Arc<tokio::sync::Notify> {
        let release = Arc::new(tokio::sync::Notify::new());
        self.script.lock().expect("proxy script").hold_fetch_in =
            Some((folder.to_string(), release.clone()));
        release
    }

    /// The next `UID SEARCH UID …` (the check that synced messages are still
    /// there) is held back until the returned `Notify` is notified.
    pub fn hold_next_search(&self) -> Arc<tokio::sync::Notify> {
        let release = Arc::new(tokio::sync::Notify::new());
        self.script.lock().expect("proxy script").hold_search = Some(release.clone());
        release
    }

    /// The next listing of new messages (`UID FETCH n:* (UID RFC822.SIZE
    /// …)`) is held back until the returned `Notify` is notified.
    pub fn hold_next_listing(&self) -> Arc<tokio::sync::Notify> {
        let release = Arc::new(tokio::sync::Notify::new());
        self.script.lock().expect("proxy script").hold_listing = Some(release.clone());
        release
    }

    /// Whether a body FETCH (or a search, or a listing) is being held back now.
    pub fn holding(&self) -> bool {
        self.script.lock().expect("proxy script").holding
    }

    /// The next IDLE commands are answered `<tag> <answer>`, one answer
    /// each, in order. Upstream async-imap 0.12 panics on a `BAD` without
    /// text in `Handle::init` and reads past a `NO`.
    pub fn refuse_next_idles(&self, answers: &[&str]) {
        self.script
            .lock()
            .expect("proxy script")
            .idle_refusals
            .extend(answers.iter().map(|answer| answer.to_string()));
    }

    /// IDLE refusals still to be given.
    pub fn idle_refusals_left(&self) -> usize {
        self.script
            .lock()
            .expect("proxy script")
            .idle_refusals
            .len()
    }

    /// The next `count` APPENDs get `NO [UNAVAILABLE]` (before their literal).
    /// The next `count` IDLEs are ended by the "server" right after they
    /// begin: `+ idling`, then `tag OK IDLE ended`.
    pub fn end_next_idles(&self, count: usize) {
        self.script.lock().expect("proxy script").idle_endings = count;
    }

    /// IDLEs still to be ended that way.
    pub fn idles_to_end(&self) -> usize {
        self.script.lock().expect("proxy script").idle_endings
    }

    pub fn refuse_next_appends(&self, count: usize) {
        self.script.lock().expect("proxy script").append_refusals += count;
    }

    /// Body FETCHes refused so far.
    pub fn fetches_refused(&self) -> usize {
        self.script.lock().expect("proxy script").fetches_refused
    }

    /// Client connections open now (the daemon's IMAP sessions through here).
    pub fn open_sessions(&self) -> usize {
        self.script.lock().expect("proxy script").open
    }

    /// When each login refused so far was refused.
    pub fn refusal_times(&self) -> Vec<std::time::Instant> {
        self.script.lock().expect("proxy script").refused_at.clone()
    }

    /// How many commands with this verb (`SELECT`, `IDLE`) were passed on.
    pub fn commands(&self, verb: &str) -> usize {
        let script = self.script.lock().expect("proxy script");
        script.commands.get(verb).copied().unwrap_or(0)
    }

    /// Logins refused so far, and logins passed on to Dovecot.
    pub fn counts(&self) -> (usize, usize) {
        let script = self.script.lock().expect("proxy script");
        (script.refused, script.logins_passed)
    }
}

async fn serve(
    client: TcpStream,
    upstream: &str,
    script: Arc<Mutex<Script>>,
) -> std::io::Result<()> {
    let server = TcpStream::connect(upstream).await?;
    let (client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let mut client_read = BufReader::new(client_read);
    // Server → client is copied as it comes; refusals are written by this
    // side, which only happens while the server has nothing to say (between
    // a command and its answer), so the two writers share the socket in turn.
    let (to_client, mut from_proxy) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let hiding = script.clone();
    let downstream = tokio::spawn(async move {
        let mut buffer = vec![0u8; 16 * 1024];
        let mut partial: Vec<u8> = Vec::new();
        loop {
            tokio::select! {
                read = tokio::io::AsyncReadExt::read(&mut server_read, &mut buffer) => {
                    let n = read?;
                    if n == 0 {
                        return Ok::<_, std::io::Error>(());
                    }
                    let (hidden, hidden_folders) = {
                        let script = hiding.lock().expect("proxy script");
                        (script.hidden.clone(), script.hidden_folders.clone())
                    };
                    if hidden.is_empty() && hidden_folders.is_empty() && partial.is_empty() {
                        client_write.write_all(&buffer[..n]).await?;
                        continue;
                    }
                    partial.extend_from_slice(&buffer[..n]);
                    while let Some(end) = partial.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = partial.drain(..=end).collect();
                        if lists_one_of(&line, &hidden_folders) {
                            continue;
                        }
                        client_write.write_all(&without_capabilities(&line, &hidden)).await?;
                    }
                }
                Some(bytes) = from_proxy.recv() => client_write.write_all(&bytes).await?,
            }
        }
    });
    let mut line = Vec::new();
    // The folder this session selected last.
    let mut selected = String::new();
    loop {
        line.clear();
        if client_read.read_until(b'\n', &mut line).await? == 0 {
            break;
        }
        let text = String::from_utf8_lossy(&line).to_string();
        let upper = text.to_ascii_uppercase();
        let mut words = text.split_whitespace();
        let tag = words.next().unwrap_or("").to_string();
        let verb = upper.split_whitespace().nth(1).unwrap_or("").to_string();
        if matches!(verb.as_str(), "SELECT" | "EXAMINE") {
            selected = text
                .split_whitespace()
                .nth(2)
                .unwrap_or("")
                .trim_matches('"')
                .to_string();
        }
        let refusal = {
            let mut script = script.lock().expect("proxy script");
            if matches!(verb.as_str(), "LOGIN" | "AUTHENTICATE") {
                if script.refusals.is_empty() {
                    script.logins_passed += 1;
                    None
                } else {
                    script.refused += 1;
                    script.refused_at.push(std::time::Instant::now());
                    Some(script.refusals.remove(0))
                }
            } else if verb == "UID"
                && upper.contains(" FETCH ")
                && upper.contains("BODY.PEEK[]")
                && script.fetch_refusals > 0
            {
                script.fetch_refusals -= 1;
                script.fetches_refused += 1;
                Some(FETCH_REFUSED.to_string())
            } else if verb == "APPEND" && script.append_refusals > 0 {
                script.append_refusals -= 1;
                Some("NO [UNAVAILABLE] Temporary failure, try again later".to_string())
            } else if matches!(verb.as_str(), "SELECT" | "EXAMINE" | "STATUS" | "APPEND")
                && text.split_whitespace().nth(2).is_some_and(|folder| {
                    script
                        .hidden_folders
                        .iter()
                        .any(|hidden| hidden == folder.trim_matches('"'))
                })
            {
                Some("NO [NONEXISTENT] Mailbox doesn't exist. [proxy]".to_string())
            } else if refused_as_hidden(&upper, &script.hidden) {
                Some("BAD Unknown command".to_string())
            } else if verb == "IDLE" && !script.idle_refusals.is_empty() {
                Some(script.idle_refusals.remove(0))
            } else if verb == "IDLE" && script.idle_endings > 0 {
                script.idle_endings -= 1;
                Some("OK IDLE ended by the server".to_string())
            } else {
                None
            }
        };
        if let Some(answer) = refusal {
            let continuation = if answer.starts_with("OK IDLE") {
                "+ idling\r\n"
            } else {
                ""
            };
            let _ = to_client
                .send(format!("{continuation}{tag} {answer}\r\n").into_bytes())
                .await;
            continue;
        }
        let hold = if verb == "UID" && upper.contains(" FETCH ") && upper.contains("BODY.PEEK[]") {
            let mut script = script.lock().expect("proxy script");
            let hold = match &script.hold_fetch_in {
                Some((folder, _)) if *folder == selected => {
                    script.hold_fetch_in.take().map(|(_, release)| release)
                }
                _ => script.hold_fetch.take(),
            };
            script.holding = hold.is_some();
            hold
        } else if verb == "UID" && upper.contains(" FETCH ") && upper.contains("RFC822.SIZE") {
            let mut script = script.lock().expect("proxy script");
            let hold = script.hold_listing.take();
            script.holding = hold.is_some();
            hold
        } else if verb == "UID" && upper.contains(" SEARCH UID ") {
            let mut script = script.lock().expect("proxy script");
            let hold = script.hold_search.take();
            script.holding = hold.is_some();
            hold
        } else {
            None
        };
        if let Some(release) = hold {
            release.notified().await;
            script.lock().expect("proxy script").holding = false;
        }
        *script
            .lock()
            .expect("proxy script")
            .commands
            .entry(verb)
            .or_default() += 1;
        server_write.write_all(&line).await?;
        // A literal (`{n}` or `{n+}` at the line's end) follows as n raw bytes.
        if let Some(length) = literal_length(&text) {
            let mut literal = vec![0u8; length];
            tokio::io::AsyncReadExt::read_exact(&mut client_read, &mut literal).await?;
            server_write.write_all(&literal).await?;
        }
    }
    let _ = server_write.shutdown().await;
    let _ = downstream.await;
    Ok(())
}

/// A server line with the hidden capabilities taken out of any CAPABILITY
/// list it carries (untagged, or a `[CAPABILITY …]` response code).
fn without_capabilities(line: &[u8], hidden: &[String]) -> Vec<u8> {
    let text = String::from_utf8_lossy(line);
    let upper = text.to_ascii_uppercase();
    if hidden.is_empty() || !(upper.starts_with("* CAPABILITY ") || upper.contains("[CAPABILITY "))
    {
        return line.to_vec();
    }
    let mut kept: Vec<String> = Vec::new();
    for word in text.trim_end().split(' ') {
        let bare = word.trim_end_matches(']');
        if !hidden.contains(&bare.to_ascii_uppercase()) {
            kept.push(word.to_string());
        } else if bare.len() < word.len()
            && let Some(previous) = kept.last_mut()
        {
            // The response code's last capability: its bracket stays.
            previous.push(']');
        }
    }
    let mut out = kept.join(" ").into_bytes();
    out.extend_from_slice(b"\r\n");
    out
}

/// Whether a server line is a LIST response naming one of `folders`.
fn lists_one_of(line: &[u8], folders: &[String]) -> bool {
    let text = String::from_utf8_lossy(line);
    let text = text.trim_end();
    text.to_ascii_uppercase().starts_with("* LIST ")
        && text
            .rsplit(' ')
            .next()
            .is_some_and(|name| folders.iter().any(|f| f == name.trim_matches('"')))
}

/// Whether a client command uses a hidden extension.
fn refused_as_hidden(upper: &str, hidden: &[String]) -> bool {
    let words: Vec<&str> = upper.split_whitespace().collect();
    let verb = match words.get(1) {
        Some(&"UID") => words.get(2).copied().unwrap_or(""),
        other => other.copied().unwrap_or(""),
    };
    let hidden_has = |name: &str| hidden.iter().any(|h| h == name);
    (verb == "MOVE" && hidden_has("MOVE"))
        || (verb == "ENABLE" && hidden.iter().any(|h| upper.contains(h.as_str())))
        || (upper.contains("CHANGEDSINCE") && hidden_has("CONDSTORE"))
        || (upper.contains("(CONDSTORE)") && hidden_has("CONDSTORE"))
        || (upper.contains("QRESYNC") && hidden_has("QRESYNC"))
}

fn literal_length(line: &str) -> Option<usize> {
    let inner = line.trim_end().strip_suffix('}')?;
    let (_, digits) = inner.rsplit_once('{')?;
    digits.trim_end_matches('+').parse().ok()
}
