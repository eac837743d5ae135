//! The embedded engine: one sled database in the data folder, a sled tree
//! per [`Tree`], and the fsync sled's own flush leaves out
//! ([`super::super::sled_durability`]).

use std::{ops::Bound, path::Path};

use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};

use super::{Direction, Engine, Entries, Tree, Tx, TxError, TxResult};
use crate::store::{
    StoreError, StoreResult,
    sled_durability::{SledDurability, SyncError},
};

/// sled's page cache.
const CACHE_BYTES: u64 = 64 * 1024 * 1024;

pub struct SledEngine {
    db: sled::Db,
    /// In [`Tree::ALL`] order.
    trees: Vec<sled::Tree>,
    durability: SledDurability,
}

fn engine(err: sled::Error) -> StoreError {
    StoreError::Engine(err.to_string())
}

/// An `fsync` of the database failed. Linux may have dropped the pages it
/// could not write and marked them clean, so no later flush can say what is
/// on disk, while the process would go on delivering events of commits that
/// may be lost. The process ends instead (as PostgreSQL does); its restart
/// reads back what the disk holds, and sync resumes from the durable cursors.
fn durability_lost(words: &str) -> ! {
    tracing::error!(
        "syncing the database to disk failed ({words}): stopping, so that a restart reads back what the disk holds"
    );
    std::process::exit(74)
}

impl SledEngine {
    /// Opens (or creates) the database in `folder`.
    pub fn open(folder: &Path) -> anyhow::Result<Self> {
        let db = sled::Config::new()
            .path(folder)
            // sled's default page cache is 1 GiB: a daemon beside a CRM must
            // not grow toward that. Hot records fit in far less.
            .cache_capacity(CACHE_BYTES)
            // sled's flusher thread drains at most one segment of its log per
            // tick: at the default 500 ms sustained ingest outgrew what it
            // reclaimed and the file never stopped growing (issue 21 item 1,
            // BENCHMARKS.md "Retention"). An idle tick is an fsync of a clean
            // file, tens of µs.
            .flush_every_ms(Some(20))
            .open()
            .map_err(|e| anyhow::anyhow!("opening the database in {}: {e}", folder.display()))?;
        let durability = SledDurability::open(folder.to_path_buf()).map_err(|e| {
            anyhow::anyhow!("opening the database log in {}: {e}", folder.display())
        })?;
        let trees = Tree::ALL
            .iter()
            .map(|tree| db.open_tree(tree.name()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            db,
            trees,
            durability,
        })
    }

    fn tree(&self, tree: Tree) -> &sled::Tree {
        // `trees` holds one per `Tree::ALL` entry, in that order.
        &self.trees[tree.index()]
    }

    /// The fsync that follows sled's flush, for tests that make it fail.
    #[cfg(test)]
    #[allow(dead_code)] // until the store's own tests reach it through the engine
    pub(crate) fn durability(&self) -> &SledDurability {
        &self.durability
    }
}

/// One sled tree's live data: what a sweep leaves, beside what the files hold.
#[derive(Debug, Clone)]
pub struct TreeUsage {
    pub name: String,
    pub keys: usize,
    /// Keys and values, in bytes.
    pub bytes: u64,
}

impl SledEngine {
    /// Every tree's keys and bytes, and sled's own `size_on_disk`: whether
    /// the database folder's growth is data kept or space not reclaimed
    /// (issue 21 item 1's benchmark). Reads every tree: for diagnosis.
    pub fn live_data(&self) -> StoreResult<(Vec<TreeUsage>, u64)> {
        let mut usage = Vec::new();
        for name in self.db.tree_names() {
            let tree = self.db.open_tree(&name).map_err(engine)?;
            let (mut keys, mut bytes) = (0, 0);
            for item in tree.iter() {
                let (k, v) = item.map_err(engine)?;
                keys += 1;
                bytes += (k.len() + v.len()) as u64;
            }
            usage.push(TreeUsage {
                name: String::from_utf8_lossy(&name).into_owned(),
                keys,
                bytes,
            });
        }
        Ok((usage, self.db.size_on_disk().map_err(engine)?))
    }
}

/// A transaction's view: the named trees, in the order they were named.
struct SledTx<'a> {
    names: &'a [Tree],
    views: &'a [TransactionalTree],
}

impl SledTx<'_> {
    fn view(&self, tree: Tree) -> TxResult<&TransactionalTree> {
        self.names
            .iter()
            .position(|named| *named == tree)
            .and_then(|position| self.views.get(position))
            .ok_or_else(|| {
                TxError::Engine(format!(
                    "tree {} is not part of the transaction",
                    tree.name()
                ))
            })
    }
}

fn unabortable(err: sled::transaction::UnabortableTransactionError) -> TxError {
    match err {
        sled::transaction::UnabortableTransactionError::Conflict => TxError::Conflict,
        sled::transaction::UnabortableTransactionError::Storage(err) => {
            TxError::Engine(err.to_string())
        }
    }
}

impl Tx for SledTx<'_> {
    fn get(&self, tree: Tree, key: &[u8]) -> TxResult<Option<Vec<u8>>> {
        Ok(self
            .view(tree)?
            .get(key)
            .map_err(unabortable)?
            .map(|v| v.to_vec()))
    }

    fn insert(&self, tree: Tree, key: &[u8], value: &[u8]) -> TxResult<Option<Vec<u8>>> {
        Ok(self
            .view(tree)?
            .insert(key, value)
            .map_err(unabortable)?
            .map(|v| v.to_vec()))
    }

    fn remove(&self, tree: Tree, key: &[u8]) -> TxResult<Option<Vec<u8>>> {
        Ok(self
            .view(tree)?
            .remove(key)
            .map_err(unabortable)?
            .map(|v| v.to_vec()))
    }

    fn generate_id(&self) -> TxResult<u64> {
        let first = self
            .views
            .first()
            .ok_or_else(|| TxError::Engine("a transaction over no tree".into()))?;
        first
            .generate_id()
            .map_err(|e| TxError::Engine(e.to_string()))
    }
}

fn entries<'a>(
    iter: impl DoubleEndedIterator<Item = sled::Result<(sled::IVec, sled::IVec)>> + Send + 'a,
    direction: Direction,
) -> Entries<'a> {
    let owned = |item: sled::Result<(sled::IVec, sled::IVec)>| {
        item.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(engine)
    };
    match direction {
        Direction::Forward => Box::new(iter.map(owned)),
        Direction::Reverse => Box::new(iter.rev().map(owned)),
    }
}

impl Engine for SledEngine {
    fn transaction<R>(
        &self,
        trees: &[Tree],
        work: &dyn Fn(&dyn Tx) -> TxResult<R>,
    ) -> StoreResult<R> {
        let handles: Vec<&sled::Tree> = trees.iter().map(|tree| self.tree(*tree)).collect();
        let outcome = <[&sled::Tree] as sled::Transactional<StoreError>>::transaction(
            handles.as_slice(),
            |views| {
                let tx = SledTx {
                    names: trees,
                    views: views.as_slice(),
                };
                work(&tx).map_err(|err| match err {
                    TxError::Abort(err) => ConflictableTransactionError::Abort(err),
                    TxError::Conflict => ConflictableTransactionError::Conflict,
                    TxError::Engine(words) => {
                        ConflictableTransactionError::Abort(StoreError::Engine(words))
                    }
                })
            },
        );
        outcome.map_err(|err| match err {
            TransactionError::Abort(err) => err,
            TransactionError::Storage(err) => engine(err),
        })
    }

    fn get(&self, tree: Tree, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        Ok(self
            .tree(tree)
            .get(key)
            .map_err(engine)?
            .map(|v| v.to_vec()))
    }

    fn contains_key(&self, tree: Tree, key: &[u8]) -> StoreResult<bool> {
        self.tree(tree).contains_key(key).map_err(engine)
    }

    fn insert(&self, tree: Tree, key: &[u8], value: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        Ok(self
            .tree(tree)
            .insert(key, value)
            .map_err(engine)?
            .map(|v| v.to_vec()))
    }

    fn remove(&self, tree: Tree, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        Ok(self
            .tree(tree)
            .remove(key)
            .map_err(engine)?
            .map(|v| v.to_vec()))
    }

    fn compare_and_swap(
        &self,
        tree: Tree,
        key: &[u8],
        old: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> StoreResult<bool> {
        Ok(self
            .tree(tree)
            .compare_and_swap(key, old, new)
            .map_err(engine)?
            .is_ok())
    }

    fn apply_batch(&self, tree: Tree, batch: &[(Vec<u8>, Option<Vec<u8>>)]) -> StoreResult<()> {
        let mut writes = sled::Batch::default();
        for (key, value) in batch {
            match value {
                Some(value) => writes.insert(key.as_slice(), value.as_slice()),
                None => writes.remove(key.as_slice()),
            }
        }
        self.tree(tree).apply_batch(writes).map_err(engine)
    }

    fn range(
        &self,
        tree: Tree,
        from: Bound<Vec<u8>>,
        to: Bound<Vec<u8>>,
        direction: Direction,
    ) -> Entries<'_> {
        entries(self.tree(tree).range((from, to)), direction)
    }

    fn scan_prefix(&self, tree: Tree, prefix: &[u8]) -> Entries<'_> {
        entries(self.tree(tree).scan_prefix(prefix), Direction::Forward)
    }

    fn len(&self, tree: Tree) -> StoreResult<usize> {
        Ok(self.tree(tree).len())
    }

    fn is_empty(&self, tree: Tree) -> StoreResult<bool> {
        Ok(self.tree(tree).is_empty())
    }

    fn generate_id(&self) -> StoreResult<u64> {
        self.db.generate_id().map_err(engine)
    }

    fn flush(&self) -> StoreResult<()> {
        self.db.flush().map_err(engine)?;
        match self.durability.sync() {
            Ok(_) => Ok(()),
            Err(SyncError::Lost(words)) => durability_lost(&words),
            Err(SyncError::Io(err)) => Err(StoreError::Io(err)),
        }
    }
}
