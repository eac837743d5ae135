//! What the store keeps and for how long: the rules one sweep applies
//! (`Store::sweep`), and what a sweep removed. Every stored tree and file
//! set and its rule are listed in docs/architecture.md.
//!
//! A sweep never breaks a reference: an event not yet delivered keeps the
//! history record, message record and thread it names; a queued CRM change
//! keeps its message record; a message still in a watched folder keeps its
//! record; a thread stays while a record, send, history entry or located
//! message names it, and its thread keys go with it, never before.

use std::time::Duration;

/// How long each kind of record is kept; `None` keeps it for good.
#[derive(Clone, Debug, PartialEq)]
pub struct Retention {
    /// Synced and sent messages' sources (for `/raw` and attachments).
    pub messages: Option<Duration>,
    /// History records (one per delivery, with text and HTML), and what is
    /// known of a synced message no longer in a watched folder: its record,
    /// its "already synced" marks (R21) and, once nothing names it, its thread.
    pub history: Option<Duration>,
    /// Settled CRM sends (sent and filed, or failed).
    pub sends: Option<Duration>,
    /// Dead letters, from when they were set aside.
    pub dead_letters: Option<Duration>,
    /// At most this many items of each kind go in one pass, so a backlog
    /// is worked off in steps that never hold the store for long.
    pub batch: usize,
}

impl Default for Retention {
    fn default() -> Self {
        const DAY: u64 = 24 * 3600;
        Self {
            messages: Some(Duration::from_secs(30 * DAY)),
            history: Some(Duration::from_secs(400 * DAY)),
            sends: Some(Duration::from_secs(30 * DAY)),
            dead_letters: Some(Duration::from_secs(30 * DAY)),
            batch: 10_000,
        }
    }
}

/// A file the store writes before the commit that refers to it (a send's
/// copies, a large event body) is taken for an orphan only this long after
/// it was written, so a sweep never removes one whose commit is under way.
pub const ORPHAN_GRACE: Duration = Duration::from_secs(10 * 60);

/// What one sweep removed, by kind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Message sources (files and segments' places).
    pub message_sources: usize,
    pub history: usize,
    /// Records of synced messages no longer in a watched folder.
    pub records: usize,
    /// "Already synced" marks of those records.
    pub synced: usize,
    /// Places of synced messages under a folder's old UIDVALIDITY, or of a
    /// folder no longer watched.
    pub located: usize,
    pub threads: usize,
    pub thread_keys: usize,
    pub sends: usize,
    pub idempotency_keys: usize,
    pub quota: usize,
    pub dead_letters: usize,
    /// `.submit.eml` copies no unsettled send refers to.
    pub submission_copies: usize,
    /// Event body files no outbox entry or dead letter refers to.
    pub event_bodies: usize,
    /// Expired OAuth sign-in nonces (filled by the daemon's sweep, which
    /// knows where the API keeps them).
    pub oauth_nonces: usize,
    /// Some kind reached `Retention::batch`: more is left for the next pass.
    pub more: bool,
}

impl SweepReport {
    /// (kind, removed) for each kind, as `/metrics` labels them.
    pub fn kinds(&self) -> [(&'static str, usize); 14] {
        [
            ("message_sources", self.message_sources),
            ("history", self.history),
            ("records", self.records),
            ("synced", self.synced),
            ("located", self.located),
            ("threads", self.threads),
            ("thread_keys", self.thread_keys),
            ("sends", self.sends),
            ("idempotency_keys", self.idempotency_keys),
            ("quota", self.quota),
            ("dead_letters", self.dead_letters),
            ("submission_copies", self.submission_copies),
            ("event_bodies", self.event_bodies),
            ("oauth_nonces", self.oauth_nonces),
        ]
    }

    pub fn removed(&self) -> usize {
        self.kinds().iter().map(|(_, n)| n).sum()
    }
}

/// When an id minted by `model::new_id` (`prefix_` + a UUID v7) was made,
/// in unix ms; None for any other id.
pub fn minted_at_ms(id: &str) -> Option<i64> {
    let (_, hex) = id.rsplit_once('_')?;
    let uuid = uuid::Uuid::try_parse(hex).ok()?;
    if uuid.get_version_num() != 7 {
        return None;
    }
    let bytes = uuid.as_bytes();
    let mut ms = [0u8; 8];
    ms[2..].copy_from_slice(bytes.get(..6)?);
    i64::try_from(u64::from_be_bytes(ms)).ok()
}

/// The time before which a record kept for `keep` may go, as of `now_ms`.
pub fn cutoff_ms(now_ms: i64, keep: Duration) -> i64 {
    now_ms.saturating_sub(i64::try_from(keep.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minted_id_tells_its_time_and_others_do_not() {
        let before = chrono::Utc::now().timestamp_millis();
        let id = crate::model::new_id("msg");
        let after = chrono::Utc::now().timestamp_millis();
        let at = minted_at_ms(&id).unwrap();
        assert!(before <= at && at <= after, "{before} <= {at} <= {after}");
        assert_eq!(minted_at_ms("msg_kept_once"), None);
        assert_eq!(minted_at_ms("no-underscore"), None);
        assert_eq!(
            minted_at_ms("msg_0190a1b2c3d47e5f8a0b0c0d0e0f1011"),
            Some(0x0190_a1b2_c3d4)
        );
    }
}
