//! The hand-off between a Gmail mailbox's INBOX and All Mail watchers
//! (issue 21 item 4). Every message in INBOX is in All Mail too, under the
//! same `X-GM-MSGID`. All Mail leaves what is labelled `\Inbox` to INBOX's
//! watcher, but passes over such a message only once INBOX's watcher has
//! read past it (its cursor moved past the message and was committed):
//! whether INBOX's watcher is busy, stalled in an IDLE that hears nothing,
//! panicked or reconnecting, a message archived before INBOX read it is
//! still taken from All Mail. Until INBOX reads it, All Mail holds its
//! cursor at the message and looks again soon: archived meanwhile (no
//! `\Inbox` label any more), it is taken from All Mail; still labelled
//! after [`crate::config::SyncConfig::inbox_handoff_secs`], or while INBOX's
//! watcher is known to be down, it is taken from All Mail too. Taking a
//! message INBOX reads later is safe: a message is forwarded once by its
//! identity, whichever folder reads it first.
//!
//! Kept in memory: after a restart All Mail's held cursor is where it was,
//! and what INBOX read before is no longer known here, so a message held
//! then waits for INBOX to read it again or for the hand-off time.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

/// `X-GM-MSGID`s read by INBOX and not yet met by All Mail, kept at most:
/// one forgotten costs a wait for the hand-off time, never a message.
const READ_KEPT: usize = 1_000;

#[derive(Default)]
pub struct InboxHandoff {
    /// INBOX's watcher is caught up and its session is up; false from the
    /// moment it fails or its task ends (a panic too).
    live: AtomicBool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Messages INBOX's watcher read past (handled or passed over, and
    /// committed), by `X-GM-MSGID`, oldest first.
    read: VecDeque<u64>,
    /// All Mail's UIDs (of one UIDVALIDITY) labelled `\Inbox` that INBOX
    /// has not read yet, with when All Mail first saw each so.
    waiting: HashMap<u32, Instant>,
    /// All Mail holds its cursor at a message INBOX has not read.
    holding: bool,
}

/// What All Mail does with a message labelled `\Inbox`.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// INBOX read past it: not All Mail's.
    PassOver,
    /// INBOX has not read it and cannot be waited for: All Mail takes it.
    Take,
    /// Wait for INBOX: All Mail's cursor stays at it.
    Hold,
}

impl InboxHandoff {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_live(&self, live: bool) {
        self.live.store(live, Ordering::Release);
    }

    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }

    /// INBOX's watcher committed its cursor past these messages.
    pub fn read_by_inbox(&self, msgids: impl IntoIterator<Item = u64>) {
        let mut state = self.state();
        for msgid in msgids {
            if state.read.len() >= READ_KEPT {
                state.read.pop_front();
            }
            state.read.push_back(msgid);
        }
    }

    /// All Mail's verdict on its message `uid` (`msgid` its `X-GM-MSGID`),
    /// labelled `\Inbox`. A message passed over is forgotten here.
    pub fn verdict(&self, uid: u32, msgid: Option<u64>, wait: Duration) -> Verdict {
        let mut state = self.state();
        if let Some(msgid) = msgid
            && let Some(at) = state.read.iter().position(|read| *read == msgid)
        {
            state.read.remove(at);
            state.waiting.remove(&uid);
            return Verdict::PassOver;
        }
        if !self.is_live() {
            state.waiting.remove(&uid);
            return Verdict::Take;
        }
        let since = *state.waiting.entry(uid).or_insert_with(Instant::now);
        if since.elapsed() >= wait {
            state.waiting.remove(&uid);
            return Verdict::Take;
        }
        Verdict::Hold
    }

    /// All Mail's catch-up ended, its cursor at `next_uid`; `holding`: it
    /// stopped at a message INBOX has not read. Waits of UIDs behind the
    /// cursor are dropped.
    pub fn all_mail_at(&self, next_uid: u32, holding: bool) {
        let mut state = self.state();
        state.waiting.retain(|uid, _| *uid >= next_uid);
        state.holding = holding;
    }

    /// All Mail holds its cursor for INBOX: it looks again soon, not at the
    /// end of its IDLE period.
    pub fn holding(&self) -> bool {
        self.state().holding
    }
}

/// Marks INBOX's watcher down when dropped: when its task ends, a panic
/// included (a flag left true would have All Mail wait for a watcher
/// that is gone).
pub struct DownOnDrop<'a>(pub Option<&'a InboxHandoff>);

impl Drop for DownOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(handoff) = self.0 {
            handoff.set_live(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_secs(60);

    /// Issue 21 item 4: a message INBOX has not read is held, whatever
    /// INBOX's watcher says of itself, until INBOX reads it; then passed over.
    #[test]
    fn all_mail_passes_over_only_what_inbox_read() {
        let handoff = InboxHandoff::default();
        handoff.set_live(true);
        assert_eq!(handoff.verdict(7, Some(70), WAIT), Verdict::Hold);
        assert_eq!(handoff.verdict(7, None, WAIT), Verdict::Hold);
        handoff.read_by_inbox([70]);
        assert_eq!(handoff.verdict(7, Some(70), WAIT), Verdict::PassOver);
        // Forgotten once met.
        assert_eq!(handoff.verdict(7, Some(70), WAIT), Verdict::Hold);
    }

    #[test]
    fn all_mail_takes_what_inbox_did_not_read_in_time_or_while_it_is_down() {
        let handoff = InboxHandoff::default();
        assert_eq!(handoff.verdict(1, Some(10), WAIT), Verdict::Take);
        handoff.set_live(true);
        assert_eq!(handoff.verdict(2, Some(20), Duration::ZERO), Verdict::Take);
        assert_eq!(handoff.verdict(3, Some(30), WAIT), Verdict::Hold);
        handoff.all_mail_at(3, true);
        assert!(handoff.holding());
        {
            let _task = DownOnDrop(Some(&handoff));
        }
        assert!(!handoff.is_live());
        assert_eq!(handoff.verdict(3, Some(30), WAIT), Verdict::Take);
    }

    #[test]
    fn what_inbox_read_is_bounded() {
        let handoff = InboxHandoff::default();
        handoff.set_live(true);
        handoff.read_by_inbox(0..(READ_KEPT as u64 + 5));
        assert_eq!(handoff.state().read.len(), READ_KEPT);
        assert_eq!(handoff.verdict(1, Some(0), WAIT), Verdict::Hold);
        assert_eq!(handoff.verdict(1, Some(5), WAIT), Verdict::PassOver);
    }
}
