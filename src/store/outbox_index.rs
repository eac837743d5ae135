//! Which outbox entries are deliverable, and when the next one falls due,
//! without reading the outbox: per ordering key (a thread, a mailbox's
//! lifecycle) its entries in sequence order, and the head of each queue
//! keyed by its due time. Only a head is ever deliverable, which keeps
//! events of one thread in order; a retry moves its head in time and the
//! queue behind it waits.
//!
//! Kept in memory beside the store, rebuilt from the outbox when the store
//! opens, and updated after each change the store commits, so a crash in
//! between costs nothing: the next open rebuilds it from what was committed.
//! Memory: one sequence number per pending entry and one queue per key.

use std::collections::{BTreeSet, HashMap, VecDeque};

#[derive(Default)]
pub struct OutboxIndex {
    /// Pending entries per ordering key, oldest first.
    queues: HashMap<String, VecDeque<u64>>,
    /// (due time in unix ms, sequence) of each queue's head.
    due: BTreeSet<(i64, u64)>,
    /// A head's due time, by sequence.
    heads: HashMap<u64, i64>,
    pending: usize,
}

impl OutboxIndex {
    /// Entries pending delivery.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// A committed entry. Sequences of one key normally arrive in order; one
    /// that overtook an older one (two commits at once) takes its place.
    pub fn add(&mut self, sequence: u64, key: &str, due_ms: i64) {
        let queue = self.queues.entry(key.to_string()).or_default();
        let position = queue.partition_point(|&s| s < sequence);
        if queue.get(position) == Some(&sequence) {
            return;
        }
        queue.insert(position, sequence);
        self.pending += 1;
        if position == 0 {
            if let Some(&displaced) = queue.get(1)
                && let Some(displaced_due) = self.heads.remove(&displaced)
            {
                self.due.remove(&(displaced_due, displaced));
            }
            self.heads.insert(sequence, due_ms);
            self.due.insert((due_ms, sequence));
        }
    }

    /// A head's next attempt moved to `due_ms` (a failed delivery).
    pub fn reschedule(&mut self, sequence: u64, due_ms: i64) {
        if let Some(old) = self.heads.get_mut(&sequence) {
            self.due.remove(&(*old, sequence));
            *old = due_ms;
            self.due.insert((due_ms, sequence));
        }
    }

    /// An entry left the outbox (delivered, or set aside); the next of its
    /// key, due at `next_due_ms(sequence)`, becomes the head.
    pub fn remove(&mut self, sequence: u64, key: &str, next_due_ms: impl FnOnce(u64) -> i64) {
        let Some(queue) = self.queues.get_mut(key) else {
            return;
        };
        let Some(position) = queue.iter().position(|&s| s == sequence) else {
            return;
        };
        queue.remove(position);
        self.pending = self.pending.saturating_sub(1);
        if let Some(due) = self.heads.remove(&sequence) {
            self.due.remove(&(due, sequence));
        }
        match queue.front() {
            None => {
                self.queues.remove(key);
            }
            Some(&next) if position == 0 => {
                let due = next_due_ms(next);
                self.heads.insert(next, due);
                self.due.insert((due, next));
            }
            Some(_) => {}
        }
    }

    /// An entry the outbox does not hold (any more): out of the index,
    /// wherever it stands. Rare, so it looks through the queues.
    pub fn forget(&mut self, sequence: u64) {
        let key = self
            .queues
            .iter()
            .find(|(_, queue)| queue.contains(&sequence))
            .map(|(key, _)| key.clone());
        if let Some(key) = key {
            // A queue's entries behind its head were never tried: due now.
            self.remove(sequence, &key, |_| 0);
        }
    }

    /// Heads due by `now_ms`, soonest first, skipping those `skip` names
    /// (in flight), at most `limit`; and when the first later head falls
    /// due. When `limit` is reached with more due, there is no time to
    /// wait for: the caller comes back when one of its attempts ends.
    pub fn due(
        &self,
        now_ms: i64,
        limit: usize,
        skip: impl Fn(u64) -> bool,
    ) -> (Vec<u64>, Option<i64>) {
        let mut ready = Vec::new();
        for &(due, sequence) in &self.due {
            if due > now_ms {
                return (ready, Some(due));
            }
            if skip(sequence) {
                continue;
            }
            if ready.len() >= limit {
                return (ready, None);
            }
            ready.push(sequence);
        }
        (ready, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_head_of_each_key_is_due_and_the_next_follows_it() {
        let mut index = OutboxIndex::default();
        index.add(1, "t1", 0);
        index.add(2, "t1", 0);
        index.add(3, "t2", 0);
        assert_eq!(index.pending(), 3);
        assert_eq!(index.due(10, 100, |_| false), (vec![1, 3], None));
        index.remove(1, "t1", |_| 0);
        assert_eq!(index.due(10, 100, |_| false), (vec![2, 3], None));
        index.remove(3, "t2", |_| 0);
        index.remove(2, "t1", |_| 0);
        assert_eq!(index.pending(), 0);
        assert_eq!(index.due(10, 100, |_| false), (vec![], None));
    }

    #[test]
    fn a_retry_holds_its_queue_and_says_when_it_is_due() {
        let mut index = OutboxIndex::default();
        index.add(1, "t1", 0);
        index.add(2, "t1", 0);
        index.add(3, "t2", 0);
        index.reschedule(1, 500);
        assert_eq!(index.due(10, 100, |_| false), (vec![3], Some(500)));
        // Not a head: nothing to move.
        index.reschedule(2, 5);
        assert_eq!(index.due(10, 100, |_| false), (vec![3], Some(500)));
        assert_eq!(index.due(500, 100, |_| false), (vec![3, 1], None));
    }

    #[test]
    fn in_flight_heads_are_skipped_and_the_limit_asks_for_another_pass() {
        let mut index = OutboxIndex::default();
        for sequence in 1..=5 {
            index.add(sequence, &format!("t{sequence}"), 0);
        }
        assert_eq!(index.due(10, 100, |s| s == 2), (vec![1, 3, 4, 5], None));
        assert_eq!(index.due(10, 2, |_| false), (vec![1, 2], None));
        // All slots busy: nothing to start, and no reason to come back
        // before an attempt ends (it used to answer "now", a busy loop).
        assert_eq!(index.due(10, 0, |s| s <= 2), (vec![], None));
    }

    #[test]
    fn an_entry_that_overtook_an_older_one_of_its_key_goes_behind_it() {
        let mut index = OutboxIndex::default();
        index.add(6, "t1", 0);
        index.add(5, "t1", 0);
        index.add(5, "t1", 0);
        assert_eq!(index.pending(), 2);
        assert_eq!(index.due(10, 100, |_| false), (vec![5], None));
        index.remove(5, "t1", |_| 0);
        assert_eq!(index.due(10, 100, |_| false), (vec![6], None));
    }

    #[test]
    fn removing_an_entry_behind_the_head_keeps_the_head() {
        let mut index = OutboxIndex::default();
        index.add(1, "t1", 7);
        index.add(2, "t1", 0);
        index.remove(2, "t1", |_| 0);
        assert_eq!(index.due(10, 100, |_| false), (vec![1], None));
        assert_eq!(index.pending(), 1);
    }

    #[test]
    fn an_entry_the_outbox_lost_is_forgotten_and_its_queue_moves_on() {
        let mut index = OutboxIndex::default();
        index.add(1, "t1", 0);
        index.add(2, "t1", 0);
        index.forget(1);
        assert_eq!(index.due(10, 100, |_| false), (vec![2], None));
        index.forget(99);
        assert_eq!(index.pending(), 1);
    }
}
