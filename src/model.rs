//! Plain data shared by every room: contacts, mailboxes, integrations, the normalized
//! message and the events the CRM receives. Depends on nothing else in the crate.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A contact of one location, as the CRM pushed it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Contact {
    pub location_id: String,
    pub id: String,
    /// Lower-cased, trimmed addresses; the first one is the contact's main address.
    pub emails: Vec<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub assigned_user_ids: Vec<String>,
    pub created_at: DateTime<Utc>,
}

impl Contact {
    pub fn has_email(&self, email: &str) -> bool {
        self.emails.iter().any(|e| e == email)
    }

    pub fn is_assigned_to(&self, user_id: &str) -> bool {
        self.assigned_user_ids.iter().any(|u| u == user_id)
    }
}

/// Normalizes an address for comparisons and index keys.
pub fn normalize_email(email: &str) -> String {
    email.trim().to_ascii_lowercase()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Gmail,
    Outlook,
    Imap,
}

impl Provider {
    pub const ALL: [Provider; 3] = [Provider::Gmail, Provider::Outlook, Provider::Imap];

    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Gmail => "gmail",
            Provider::Outlook => "outlook",
            Provider::Imap => "imap",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Security {
    /// Implicit TLS from the first byte (993, 465).
    Tls,
    /// Plain connection upgraded with STARTTLS before anything secret is sent.
    Starttls,
    /// No TLS at all; only ever allowed towards a loopback address.
    Plain,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub security: Security,
}

impl Endpoint {
    /// Same host (any case, without a trailing dot), port and security.
    pub fn same_server(&self, other: &Endpoint) -> bool {
        self.host
            .trim_end_matches('.')
            .eq_ignore_ascii_case(other.host.trim_end_matches('.'))
            && self.port == other.port
            && self.security == other.security
    }
}

/// How the bridge logs in to a mailbox. Kept encrypted at rest by the store.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Credentials {
    Password {
        username: String,
        password: String,
    },
    /// SASL XOAUTH2 with an access token from the provider's OAuth2 token
    /// endpoint, renewed with the refresh token.
    #[serde(rename = "oauth2")]
    OAuth2 {
        username: String,
        refresh_token: String,
        #[serde(default)]
        access_token: Option<String>,
        #[serde(default)]
        expires_at: Option<DateTime<Utc>>,
        /// When the bridge obtained `access_token` (unknown for tokens a CRM
        /// handed over): with `expires_at` it gives the token's lifetime.
        #[serde(default)]
        issued_at: Option<DateTime<Utc>>,
    },
}

impl Credentials {
    pub fn username(&self) -> &str {
        match self {
            Credentials::Password { username, .. } | Credentials::OAuth2 { username, .. } => {
                username
            }
        }
    }

    pub fn is_oauth(&self) -> bool {
        matches!(self, Credentials::OAuth2 { .. })
    }
}

impl std::fmt::Debug for Credentials {
    // Never let a secret reach a log line through `{:?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Password { username, .. } => f
                .debug_struct("Password")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
            Credentials::OAuth2 {
                username,
                expires_at,
                ..
            } => f
                .debug_struct("OAuth2")
                .field("username", username)
                .field("tokens", &"<redacted>")
                .field("expires_at", expires_at)
                .finish(),
        }
    }
}

/// What one login presents to an IMAP or SMTP server: a password, or an OAuth2
/// access token (SASL XOAUTH2). Resolved from [`Credentials`] just before use,
/// so a refreshed token reaches the next login.
#[derive(Clone, PartialEq, Eq)]
pub enum Login {
    Password {
        username: String,
        password: String,
    },
    Bearer {
        username: String,
        access_token: String,
    },
}

impl Login {
    pub fn username(&self) -> &str {
        match self {
            Login::Password { username, .. } | Login::Bearer { username, .. } => username,
        }
    }
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            Login::Password { .. } => "Password",
            Login::Bearer { .. } => "Bearer",
        };
        f.debug_struct(kind)
            .field("username", &self.username())
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Who puts a CRM send into the Sent folder (R5: exactly once).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SaveSent {
    /// Gmail and Outlook file SMTP submissions themselves: never; others: append.
    #[default]
    Auto,
    Append,
    Never,
}

impl SaveSent {
    pub fn bridge_appends(self, provider: Provider) -> bool {
        match self {
            SaveSent::Append => true,
            SaveSent::Never => false,
            SaveSent::Auto => provider == Provider::Imap,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MailboxState {
    Connecting,
    Active,
    NeedsReauth,
    Error,
}

/// One real email account. Synced by one set of IMAP sessions however many
/// integrations point at it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Mailbox {
    /// Lower-cased address; the mailbox's key.
    pub address: String,
    pub provider: Provider,
    pub credentials: Credentials,
    pub imap: Endpoint,
    pub smtp: Endpoint,
    pub daily_send_limit: Option<u32>,
    /// Whether the bridge files CRM sends in Sent itself (R5).
    #[serde(default)]
    pub save_sent: SaveSent,
    pub state: MailboxState,
    pub last_error: Option<String>,
    pub connected_at: DateTime<Utc>,
    /// Counts connects (set by the store). Sync started under an older one
    /// is stale: the state it reports is not recorded.
    #[serde(default)]
    pub generation: u64,
    /// Folders watched beside INBOX and Sent, by their IMAP names: where
    /// server rules (filters, "skip the inbox") file new mail.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub folders: Vec<String>,
}

impl Mailbox {
    /// Every folder role the mailbox's sync watches.
    pub fn roles(&self) -> Vec<FolderRole> {
        let all_mail = (self.provider == Provider::Gmail).then_some(FolderRole::All);
        FolderRole::FIXED
            .into_iter()
            .chain(all_mail)
            .chain(self.folders.iter().map(|name| FolderRole::listed(name)))
            .collect()
    }

    /// Whether `other` logs in as the same user at the same IMAP and SMTP
    /// servers. A mailbox several integrations share keeps its account: one
    /// integration cannot point the others' mail at a server of its choosing,
    /// nor at its own account on the same server (issue 10).
    pub fn same_account(&self, other: &Mailbox) -> bool {
        self.imap.same_server(&other.imap)
            && self.smtp.same_server(&other.smtp)
            && self
                .credentials
                .username()
                .eq_ignore_ascii_case(other.credentials.username())
    }

    /// The name of a listed folder's role, while it is listed.
    pub fn listed_name(&self, role: FolderRole) -> Option<&str> {
        self.folders
            .iter()
            .find(|name| FolderRole::listed(name) == role)
            .map(String::as_str)
    }
}

/// Which of a mailbox's folders a message was found in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FolderRole {
    Inbox,
    Sent,
    /// Gmail's All Mail (SPECIAL-USE `\All`), for mail filters file past
    /// the inbox: what carries the `\Inbox` or `\Sent` label is left to
    /// those folders' watchers.
    All,
    /// A folder the operator listed (`"folders"`), where server rules file
    /// mail; known by a hash of its name, so the list's order does not
    /// matter and the role stays a small copyable key.
    Listed(u32),
}

impl FolderRole {
    pub const FIXED: [FolderRole; 2] = [FolderRole::Inbox, FolderRole::Sent];

    /// The role of a listed folder: FNV-1a of its name, stable across
    /// versions and restarts (cursors are stored under it).
    pub fn listed(name: &str) -> Self {
        let mut hash: u32 = 0x811c_9dc5;
        for byte in name.as_bytes() {
            hash ^= u32::from(*byte);
            hash = hash.wrapping_mul(0x0100_0193);
        }
        FolderRole::Listed(hash)
    }

    /// Stable short name, used in store keys and logs.
    pub fn key(self) -> String {
        match self {
            FolderRole::Inbox => "inbox".into(),
            FolderRole::Sent => "sent".into(),
            FolderRole::All => "all".into(),
            FolderRole::Listed(hash) => format!("listed-{hash:08x}"),
        }
    }
}

impl std::fmt::Display for FolderRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.key())
    }
}

/// Where a folder's sync stands: every UID below `next_uid` was handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FolderCursor {
    pub uid_validity: u32,
    pub next_uid: u32,
    /// When the cursor last moved: after a UIDVALIDITY change, mail since
    /// then is looked for again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moved_at: Option<DateTime<Utc>>,
    /// The folder's HIGHESTMODSEQ (RFC 7162) up to which flag changes were
    /// handled; None where the server has no CONDSTORE or none was read yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub highest_modseq: Option<u64>,
}

impl FolderCursor {
    pub fn new(uid_validity: u32, next_uid: u32) -> Self {
        Self {
            uid_validity,
            next_uid,
            moved_at: None,
            highest_modseq: None,
        }
    }
}

/// The state of a message the mailbox keeps as flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlagState {
    pub seen: bool,
    pub flagged: bool,
    pub answered: bool,
}

impl FlagState {
    /// From IMAP flags (`\Seen`, `\Flagged`, `\Answered`, any case).
    pub fn from_flags<S: AsRef<str>>(flags: &[S]) -> Self {
        let has = |name: &str| flags.iter().any(|f| f.as_ref().eq_ignore_ascii_case(name));
        Self {
            seen: has("\\Seen"),
            flagged: has("\\Flagged"),
            answered: has("\\Answered"),
        }
    }
}

/// Where the mailbox keeps a synced message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageLocation {
    pub mailbox: String,
    pub folder: FolderRole,
    pub uid_validity: u32,
    pub uid: u32,
}

/// A change the CRM asked for (`PATCH`/`DELETE /v1/messages/{id}`), to make
/// in the mailbox; queued durably until it is made.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MailboxChange {
    pub record_id: String,
    pub location: MessageLocation,
    pub seen: Option<bool>,
    pub flagged: Option<bool>,
    /// Move it to the mailbox's Trash.
    pub to_trash: bool,
    pub attempts: u32,
    /// Unix milliseconds before which it is not tried again.
    pub next_attempt_ms: i64,
    pub created_at: DateTime<Utc>,
}

/// A synced message where the mailbox keeps it, for its later changes
/// (`message.updated`): which record and conversations it is, and its flags
/// as last reported.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LocatedMessage {
    pub record_id: String,
    pub message_id: Option<String>,
    pub thread_id: String,
    /// Each conversation it was forwarded to.
    pub routes: Vec<ThreadRoute>,
    pub flags: FlagState,
    /// Its Gmail labels (`X-GM-LABELS`) as last reported, where the server
    /// has them; the folder's own label is not among them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<String>>,
}

/// The integration that stands for the Auto BCC catch-all mailbox (R15,
/// door 2). Its location id holds a control character, which the API
/// refuses in ids, so no CRM location can be it.
pub const CATCH_ALL_LOCATION: &str = "\u{1}auto-bcc";
pub const CATCH_ALL_USER: &str = "catch-all";

/// (location, user) → mailbox.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Integration {
    pub location_id: String,
    pub user_id: String,
    pub mailbox: String,
    pub connected_at: DateTime<Utc>,
    /// The folders' UIDNEXT when this integration was connected: mail below it
    /// arrived earlier and never syncs for this integration (R2).
    pub baseline: Vec<(FolderRole, FolderCursor)>,
    /// The integration's Auto BCC address (R15).
    pub smart_bcc_address: String,
}

impl Integration {
    /// Whether this stands for the Auto BCC catch-all mailbox (R15, door 2).
    pub fn is_catch_all(&self) -> bool {
        self.location_id == CATCH_ALL_LOCATION
    }

    /// Whether a message at `uid` of `folder`, which the server says it
    /// received at `received_at`, arrived after this integration was connected (R2).
    pub fn accepts(
        &self,
        folder: FolderRole,
        uid_validity: u32,
        uid: u32,
        received_at: Option<DateTime<Utc>>,
    ) -> bool {
        match self.baseline.iter().find(|(role, _)| *role == folder) {
            Some((_, start)) if start.uid_validity == uid_validity => uid >= start.next_uid,
            // The folder's UIDs were renumbered since (new UIDVALIDITY): the
            // time it arrived tells instead. INTERNALDATE has whole seconds,
            // so a message from the second of the connect counts as after it
            // (losing it would be worse than forwarding it).
            Some(_) => received_at.is_none_or(|at| at.timestamp() >= self.connected_at.timestamp()),
            // Folder unknown at connect time (e.g. no Sent folder then): accept.
            None => true,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EmailAddress {
    pub email: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub name: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentInfo {
    pub index: usize,
    pub filename: String,
    pub content_type: String,
    pub size: usize,
}

/// A parsed email, reduced to what sync needs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub from: Option<EmailAddress>,
    pub to: Vec<EmailAddress>,
    pub cc: Vec<EmailAddress>,
    pub bcc: Vec<EmailAddress>,
    /// With angle brackets, as in the header: `<id@host>`.
    pub message_id: Option<String>,
    pub in_reply_to: Option<String>,
    pub references: Vec<String>,
    pub subject: Option<String>,
    pub date: Option<DateTime<Utc>>,
    pub text: Option<String>,
    pub html: Option<String>,
    pub attachments: Vec<AttachmentInfo>,
    /// Why parts of the message were skipped; empty for a clean message.
    pub parse_warnings: Vec<String>,
    /// The CRM send this message is, by the bridge's own header (present on
    /// what the bridge submitted, whatever the server did to its Message-ID).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crm_send_id: Option<String>,
    /// Where the receiving server delivered it (`Delivered-To`,
    /// `X-Original-To`): the only trace of a Bcc recipient in a delivered copy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub envelope_to: Vec<String>,
}

/// How many of the messages a message answers are filed under its thread
/// (see `Message::parent_ids`): In-Reply-To, the newest References and the
/// first (the thread's root). A hostile message may list thousands.
pub const ANSWERED_IDS_FILED: usize = 20;

impl Message {
    /// The messages this one answers, most specific first: In-Reply-To, then
    /// References newest first, at most `ANSWERED_IDS_FILED` (the root kept);
    /// never its own id.
    pub fn parent_ids(&self) -> Vec<String> {
        let newest = self
            .references
            .iter()
            .rev()
            .take(ANSWERED_IDS_FILED.saturating_sub(2));
        let root = self.references.first();
        let mut ids: Vec<String> = Vec::new();
        for id in self.in_reply_to.iter().chain(newest).chain(root) {
            if self.message_id.as_ref() != Some(id) && !ids.contains(id) {
                ids.push(id.clone());
            }
        }
        ids
    }

    /// The ids that tie this message to a thread, most specific first.
    pub fn thread_keys(&self) -> Vec<String> {
        let mut keys = Vec::new();
        if let Some(id) = &self.in_reply_to {
            keys.push(id.clone());
        }
        for id in self.references.iter().rev() {
            if !keys.contains(id) {
                keys.push(id.clone());
            }
        }
        if let Some(id) = &self.message_id
            && !keys.contains(id)
        {
            keys.push(id.clone());
        }
        keys
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Inbound,
    Outbound,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    Mailbox,
    Crm,
    AutoBcc,
}

/// One conversation of a thread: which contact of which location it lands in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadRoute {
    pub location_id: String,
    pub user_id: String,
    pub contact_id: String,
}

/// A synced email conversation in one mailbox.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Thread {
    pub id: String,
    pub mailbox: String,
    pub routes: Vec<ThreadRoute>,
    pub created_at: DateTime<Utc>,
    /// The thread's latest Message-IDs, oldest first (for a reply's References).
    #[serde(default)]
    pub message_ids: Vec<String>,
    #[serde(default)]
    pub subject: Option<String>,
}

/// How many Message-IDs a thread remembers for References.
pub const THREAD_REFERENCES_KEPT: usize = 20;

impl Thread {
    /// Remembers a message of the thread (its id for References, its subject for replies).
    pub fn remember(&mut self, message_id: Option<&str>, subject: Option<&str>) {
        self.remember_at(message_id, subject, false);
    }

    /// As `remember`, for a message older than the thread's others (read
    /// after its reply): its id goes first, so the newest stays last.
    pub fn remember_earlier(&mut self, message_id: Option<&str>, subject: Option<&str>) {
        self.remember_at(message_id, subject, true);
    }

    fn remember_at(&mut self, message_id: Option<&str>, subject: Option<&str>, earliest: bool) {
        if let Some(id) = message_id
            && !self.message_ids.iter().any(|m| m == id)
        {
            if earliest {
                self.message_ids.insert(0, id.to_string());
            } else {
                self.message_ids.push(id.to_string());
            }
            // Past the bound, the oldest ids go.
            let excess = self
                .message_ids
                .len()
                .saturating_sub(THREAD_REFERENCES_KEPT);
            self.message_ids.drain(..excess);
        }
        if self.subject.is_none() {
            self.subject = subject.map(str::to_string);
        }
    }
}

/// What the CRM receives for one synced message (the webhook `data`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MessageEventData {
    pub id: String,
    pub location_id: String,
    pub user_id: String,
    pub contact_id: String,
    /// Every existing contact of the location, assigned to the user, among
    /// From/To/Cc/Bcc (the mailbox's own address aside), `contact_id`
    /// first: the CRM shows the message under each of their records (R7, R8).
    #[serde(default)]
    pub contact_ids: Vec<String>,
    pub thread_id: String,
    pub mailbox: String,
    pub direction: Direction,
    pub origin: Origin,
    pub message_id: Option<String>,
    pub in_reply_to: Option<String>,
    pub references: Vec<String>,
    pub from: Option<EmailAddress>,
    pub to: Vec<EmailAddress>,
    pub cc: Vec<EmailAddress>,
    pub bcc: Vec<EmailAddress>,
    pub subject: Option<String>,
    pub date: Option<DateTime<Utc>>,
    pub text: Option<String>,
    pub html: Option<String>,
    pub attachments: Vec<AttachmentEventInfo>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AttachmentEventInfo {
    pub index: usize,
    pub filename: String,
    pub content_type: String,
    pub size: usize,
    pub url: String,
}

/// An event waiting in the outbox for the CRM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// `webhook-id`: stable across retries so the CRM can drop repeats.
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub timestamp: DateTime<Utc>,
    /// Events with the same key are delivered one after another, in order
    /// (a thread id, or the mailbox for lifecycle events).
    pub ordering_key: String,
    pub data: serde_json::Value,
}

/// A new id: `prefix_` + a time-ordered UUID (v7), so ids sort by creation.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}

impl Event {
    /// The webhook body: `{"type", "timestamp", "data"}`.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "type": self.kind,
            "timestamp": self.timestamp,
            "data": self.data,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SendStatus {
    Queued,
    /// Handed to the SMTP server; if the bridge stops now, the outcome is
    /// settled on restart by looking for the Message-ID in Sent.
    Submitting,
    Sent,
    Failed,
}

/// A message the CRM sends as the user, from accept to its final state.
///
/// A send is settled once it failed, or was sent and its copy is in Sent
/// (or filing it was given up): until then the send queue keeps it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SendRecord {
    pub id: String,
    pub location_id: String,
    pub user_id: String,
    pub contact_id: String,
    pub mailbox: String,
    pub thread_id: String,
    pub message_id: String,
    pub status: SendStatus,
    pub error: Option<String>,
    /// The server's reply to the end of DATA, once accepted.
    pub smtp_response: Option<String>,
    pub attempts: u32,
    pub next_attempt_ms: i64,
    pub created_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
    pub idempotency_key: Option<String>,
    /// Envelope recipients (To, Cc and Bcc).
    pub recipients: Vec<String>,
    /// The webhook/history `data` of this message.
    pub data: MessageEventData,
    /// Whether the copy in Sent is there (filed by the bridge or the server).
    #[serde(default)]
    pub filed_in_sent: bool,
    /// Tries to file the copy in Sent (where the bridge does it) that failed.
    #[serde(default)]
    pub filing_attempts: u32,
    /// Filing kept failing for a day: the send is settled without its copy.
    #[serde(default)]
    pub filing_abandoned: bool,
    /// The Message-ID the bridge wrote, when the server replaced it with the
    /// one now in `message_id` (Exchange Online).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submitted_message_id: Option<String>,
    /// Look-ups in Sent made for a send handed over without a verdict: it
    /// stays `submitting`, and is looked for again at `next_attempt_ms`.
    #[serde(default)]
    pub outcome_checks: u32,
}

impl SendRecord {
    /// Nothing is left to do for it.
    pub fn is_settled(&self) -> bool {
        match self.status {
            SendStatus::Failed => true,
            SendStatus::Sent => self.filed_in_sent || self.filing_abandoned,
            SendStatus::Queued | SendStatus::Submitting => false,
        }
    }

    /// Sent, and its copy still to be filed in Sent by the bridge.
    pub fn awaits_filing(&self) -> bool {
        self.status == SendStatus::Sent && !self.is_settled()
    }
}

/// Why a message of a watched folder could not be processed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum UnprocessableReason {
    /// The server says it is there (SEARCH finds it) but does not return it.
    NotReturned,
    /// Its handling failed in a way retrying did not mend (a panic).
    HandlingFailed,
}

/// A message of a watched folder the bridge failed to process, with its
/// failed tries; set aside (passed over, reported as
/// `message.unprocessable`) once they reach the limit (issue 21 item 6).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UnprocessableMessage {
    pub mailbox: String,
    pub folder: FolderRole,
    /// The folder's name on the server.
    pub folder_name: String,
    pub uid_validity: u32,
    pub uid: u32,
    /// Its Message-ID, when it could be read.
    pub message_id: Option<String>,
    pub reason: UnprocessableReason,
    /// What the last failed try said.
    pub error: String,
    /// Failed tries (sessions in which it was not returned, or panics).
    pub attempts: u32,
    pub first_failed_at: DateTime<Utc>,
    pub last_failed_at: DateTime<Utc>,
    /// When it was passed over; None while it is still retried.
    pub set_aside_at: Option<DateTime<Utc>>,
}
