//! The narrow interface the store's logic is written against: named trees of
//! ordered byte keys, transactions over a few of them, and durability. Every
//! rule of the store (what is checked, what is written together, what a
//! sweep may remove) is written once, over this interface, in
//! [`super::kv_store`]; an engine only keeps bytes. sled is the embedded
//! engine ([`sled`]); PostgreSQL the shared one ([`postgres`]).
//!
//! Transactions are serializable and may run their closure more than once
//! (sled retries on a conflict, PostgreSQL on a serialization failure), so a
//! closure only reads and writes through its [`Tx`] and has no other effect.
//! Scans run outside transactions: sled cannot scan inside one. A writer
//! that decides from a scan checks what it relies on again inside its
//! transaction.

use std::ops::Bound;

use super::{StoreError, StoreResult};

#[cfg(test)]
mod conformance;
pub mod postgres;
pub mod sled;

pub use self::sled::SledEngine;

/// A keyspace of the store. The discriminant is stable: PostgreSQL keeps it
/// in every row, so a value is never reused or renumbered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Tree {
    Contacts = 1,
    ContactEmails = 2,
    Mailboxes = 3,
    Integrations = 4,
    MailboxIntegrations = 5,
    Cursors = 6,
    Threads = 7,
    ThreadKeys = 8,
    Outbox = 9,
    DeadLetters = 10,
    Settings = 11,
    Sends = 12,
    UnsettledSends = 13,
    Idempotency = 14,
    Quota = 15,
    CrmMessageIds = 16,
    History = 17,
    Synced = 18,
    Located = 19,
    RecordLocations = 20,
    RecordInfo = 21,
    MailboxChanges = 22,
    Unprocessable = 23,
    SourcePlaces = 24,
}

impl Tree {
    pub const ALL: [Tree; 24] = [
        Tree::Contacts,
        Tree::ContactEmails,
        Tree::Mailboxes,
        Tree::Integrations,
        Tree::MailboxIntegrations,
        Tree::Cursors,
        Tree::Threads,
        Tree::ThreadKeys,
        Tree::Outbox,
        Tree::DeadLetters,
        Tree::Settings,
        Tree::Sends,
        Tree::UnsettledSends,
        Tree::Idempotency,
        Tree::Quota,
        Tree::CrmMessageIds,
        Tree::History,
        Tree::Synced,
        Tree::Located,
        Tree::RecordLocations,
        Tree::RecordInfo,
        Tree::MailboxChanges,
        Tree::Unprocessable,
        Tree::SourcePlaces,
    ];

    /// The name sled files the tree under (unchanged from before the engine
    /// interface, so existing data folders open as they are).
    pub fn name(self) -> &'static str {
        match self {
            Tree::Contacts => "contacts",
            Tree::ContactEmails => "contact_emails",
            Tree::Mailboxes => "mailboxes",
            Tree::Integrations => "integrations",
            Tree::MailboxIntegrations => "mailbox_integrations",
            Tree::Cursors => "cursors",
            Tree::Threads => "threads",
            Tree::ThreadKeys => "thread_keys",
            Tree::Outbox => "outbox",
            Tree::DeadLetters => "dead_letters",
            Tree::Settings => "settings",
            Tree::Sends => "sends",
            Tree::UnsettledSends => "unsettled_sends",
            Tree::Idempotency => "idempotency",
            Tree::Quota => "quota",
            Tree::CrmMessageIds => "crm_message_ids",
            Tree::History => "history",
            Tree::Synced => "synced",
            Tree::Located => "located",
            Tree::RecordLocations => "record_locations",
            Tree::RecordInfo => "record_info",
            Tree::MailboxChanges => "mailbox_changes",
            Tree::Unprocessable => "unprocessable",
            Tree::SourcePlaces => "source_places",
        }
    }

    /// Position in [`Tree::ALL`].
    pub fn index(self) -> usize {
        self as usize - 1
    }
}

/// A stored key and its value.
pub type Entry = (Vec<u8>, Vec<u8>);

/// Entries in key order (or reverse), read lazily.
pub type Entries<'a> = Box<dyn Iterator<Item = StoreResult<Entry>> + Send + 'a>;

/// Why a transaction's closure stopped.
#[derive(Debug)]
pub enum TxError {
    /// The store's own reason (a compare-and-set that failed, say): nothing
    /// is written and the caller gets the error.
    Abort(StoreError),
    /// Another transaction got in the way: the engine runs the closure again.
    Conflict,
    /// The engine failed; nothing is written.
    Engine(String),
}

impl From<StoreError> for TxError {
    fn from(err: StoreError) -> Self {
        TxError::Abort(err)
    }
}

pub type TxResult<T> = Result<T, TxError>;

/// Reads and writes inside one transaction. Reads see the transaction's
/// own writes.
pub trait Tx {
    fn get(&self, tree: Tree, key: &[u8]) -> TxResult<Option<Vec<u8>>>;
    /// Returns the value it replaced.
    fn insert(&self, tree: Tree, key: &[u8], value: &[u8]) -> TxResult<Option<Vec<u8>>>;
    /// Returns the value it removed.
    fn remove(&self, tree: Tree, key: &[u8]) -> TxResult<Option<Vec<u8>>>;
    /// A number no other call returns, increasing; taken inside the
    /// transaction, so sequences follow commit order where that matters.
    fn generate_id(&self) -> TxResult<u64>;
}

/// Which way a range is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Forward,
    Reverse,
}

/// An engine: where the bytes live. Single writes outside a transaction are
/// atomic each; [`Engine::flush`] makes everything written so far durable.
pub trait Engine: Send + Sync + 'static {
    /// Runs `work` as one serializable transaction over `trees` (a tree
    /// not named is an error), again on a conflict; writes nothing when it
    /// returns an error.
    fn transaction<R>(
        &self,
        trees: &[Tree],
        work: &dyn Fn(&dyn Tx) -> TxResult<R>,
    ) -> StoreResult<R>;

    fn get(&self, tree: Tree, key: &[u8]) -> StoreResult<Option<Vec<u8>>>;
    fn contains_key(&self, tree: Tree, key: &[u8]) -> StoreResult<bool> {
        Ok(self.get(tree, key)?.is_some())
    }
    /// Returns the value it replaced.
    fn insert(&self, tree: Tree, key: &[u8], value: &[u8]) -> StoreResult<Option<Vec<u8>>>;
    /// Returns the value it removed.
    fn remove(&self, tree: Tree, key: &[u8]) -> StoreResult<Option<Vec<u8>>>;
    /// Sets the key to `new` (None: removes it) only if it holds `old`
    /// (None: absent). Whether it did.
    fn compare_and_swap(
        &self,
        tree: Tree,
        key: &[u8],
        old: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> StoreResult<bool>;
    /// Writes (Some) and removals (None) to one tree, all or none.
    fn apply_batch(&self, tree: Tree, batch: &[(Vec<u8>, Option<Vec<u8>>)]) -> StoreResult<()>;

    /// Entries whose keys lie between `from` and `to`.
    fn range(
        &self,
        tree: Tree,
        from: Bound<Vec<u8>>,
        to: Bound<Vec<u8>>,
        direction: Direction,
    ) -> Entries<'_>;
    /// Entries whose keys start with `prefix`, in key order.
    fn scan_prefix(&self, tree: Tree, prefix: &[u8]) -> Entries<'_> {
        let to = prefix_end(prefix).map_or(Bound::Unbounded, Bound::Excluded);
        self.range(
            tree,
            Bound::Included(prefix.to_vec()),
            to,
            Direction::Forward,
        )
    }
    /// Every entry, in key order.
    fn iter(&self, tree: Tree) -> Entries<'_> {
        self.range(tree, Bound::Unbounded, Bound::Unbounded, Direction::Forward)
    }
    fn first(&self, tree: Tree) -> StoreResult<Option<Entry>> {
        self.iter(tree).next().transpose()
    }
    /// How many entries the tree holds (counted: not for hot paths).
    fn len(&self, tree: Tree) -> StoreResult<usize>;
    fn is_empty(&self, tree: Tree) -> StoreResult<bool> {
        Ok(self.first(tree)?.is_none())
    }

    /// A number no other call returns, increasing.
    fn generate_id(&self) -> StoreResult<u64>;
    /// Makes every write made so far durable. A failure that may have lost
    /// acknowledged writes (a failed fsync) ends the process; any other
    /// failure is returned and the next flush tries again.
    fn flush(&self) -> StoreResult<()>;
}

/// The smallest key greater than every key starting with `prefix`, or None
/// when there is none (the prefix is all 0xff).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_indexes_cover_all_trees_once() {
        for (position, tree) in Tree::ALL.iter().enumerate() {
            assert_eq!(tree.index(), position, "{tree:?}");
        }
    }

    #[test]
    fn prefix_end_is_the_next_key_past_the_prefix() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
        assert_eq!(prefix_end(b""), None);
    }
}
