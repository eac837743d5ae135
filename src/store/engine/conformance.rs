//! What the store's logic relies on from an engine, tried on each: sled
//! always, PostgreSQL when a test database runs (scripts/postgres/start.sh;
//! required when `TEST_REQUIRE_POSTGRES` is set). Issue 22 item 2.

use std::{ops::Bound, sync::Arc};

use super::{Direction, Engine, Tree, TxError, postgres, sled::SledEngine};
use crate::store::StoreError;

/// Runs `check` on every engine there is here.
fn on_each_engine(check: impl Fn(&str, &dyn EngineUnderTest)) {
    let dir = tempfile::tempdir().unwrap();
    let sled = SledEngine::open(&dir.path().join("db")).unwrap();
    check("sled", &sled);
    if let Some((engine, _schema)) = postgres::testing::engine() {
        check("postgres", &engine);
    }
}

/// The engine calls the checks use, object-safe (Engine's transaction is
/// generic): a transaction returning nothing, and the rest as they are.
trait EngineUnderTest: Sync {
    fn engine_transaction(
        &self,
        trees: &[Tree],
        work: &dyn Fn(&dyn super::Tx) -> super::TxResult<()>,
    ) -> crate::store::StoreResult<()>;
    fn as_engine(&self) -> &dyn EngineCalls;
}

impl<E: Engine> EngineUnderTest for E {
    fn engine_transaction(
        &self,
        trees: &[Tree],
        work: &dyn Fn(&dyn super::Tx) -> super::TxResult<()>,
    ) -> crate::store::StoreResult<()> {
        self.transaction(trees, work)
    }
    fn as_engine(&self) -> &dyn EngineCalls {
        self
    }
}

/// Engine's non-generic calls, as a trait object.
trait EngineCalls: Sync {
    fn get(&self, tree: Tree, key: &[u8]) -> crate::store::StoreResult<Option<Vec<u8>>>;
    fn insert(
        &self,
        tree: Tree,
        key: &[u8],
        value: &[u8],
    ) -> crate::store::StoreResult<Option<Vec<u8>>>;
    fn remove(&self, tree: Tree, key: &[u8]) -> crate::store::StoreResult<Option<Vec<u8>>>;
    fn contains_key(&self, tree: Tree, key: &[u8]) -> crate::store::StoreResult<bool>;
    fn compare_and_swap(
        &self,
        tree: Tree,
        key: &[u8],
        old: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> crate::store::StoreResult<bool>;
    fn apply_batch(
        &self,
        tree: Tree,
        batch: &[(Vec<u8>, Option<Vec<u8>>)],
    ) -> crate::store::StoreResult<()>;
    fn keys(
        &self,
        tree: Tree,
        from: Bound<Vec<u8>>,
        to: Bound<Vec<u8>>,
        direction: Direction,
    ) -> Vec<Vec<u8>>;
    fn prefix_keys(&self, tree: Tree, prefix: &[u8]) -> Vec<Vec<u8>>;
    fn len(&self, tree: Tree) -> crate::store::StoreResult<usize>;
    fn is_empty(&self, tree: Tree) -> crate::store::StoreResult<bool>;
    fn generate_id(&self) -> crate::store::StoreResult<u64>;
}

impl<E: Engine> EngineCalls for E {
    fn get(&self, tree: Tree, key: &[u8]) -> crate::store::StoreResult<Option<Vec<u8>>> {
        Engine::get(self, tree, key)
    }
    fn insert(
        &self,
        tree: Tree,
        key: &[u8],
        value: &[u8],
    ) -> crate::store::StoreResult<Option<Vec<u8>>> {
        Engine::insert(self, tree, key, value)
    }
    fn remove(&self, tree: Tree, key: &[u8]) -> crate::store::StoreResult<Option<Vec<u8>>> {
        Engine::remove(self, tree, key)
    }
    fn contains_key(&self, tree: Tree, key: &[u8]) -> crate::store::StoreResult<bool> {
        Engine::contains_key(self, tree, key)
    }
    fn compare_and_swap(
        &self,
        tree: Tree,
        key: &[u8],
        old: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> crate::store::StoreResult<bool> {
        Engine::compare_and_swap(self, tree, key, old, new)
    }
    fn apply_batch(
        &self,
        tree: Tree,
        batch: &[(Vec<u8>, Option<Vec<u8>>)],
    ) -> crate::store::StoreResult<()> {
        Engine::apply_batch(self, tree, batch)
    }
    fn keys(
        &self,
        tree: Tree,
        from: Bound<Vec<u8>>,
        to: Bound<Vec<u8>>,
        direction: Direction,
    ) -> Vec<Vec<u8>> {
        Engine::range(self, tree, from, to, direction)
            .map(|entry| entry.unwrap().0)
            .collect()
    }
    fn prefix_keys(&self, tree: Tree, prefix: &[u8]) -> Vec<Vec<u8>> {
        Engine::scan_prefix(self, tree, prefix)
            .map(|entry| entry.unwrap().0)
            .collect()
    }
    fn len(&self, tree: Tree) -> crate::store::StoreResult<usize> {
        Engine::len(self, tree)
    }
    fn is_empty(&self, tree: Tree) -> crate::store::StoreResult<bool> {
        Engine::is_empty(self, tree)
    }
    fn generate_id(&self) -> crate::store::StoreResult<u64> {
        Engine::generate_id(self)
    }
}

#[test]
fn single_writes_return_what_they_replace() {
    on_each_engine(|name, engine| {
        let e = engine.as_engine();
        assert!(e.is_empty(Tree::Settings).unwrap(), "{name}");
        assert_eq!(
            e.insert(Tree::Settings, b"a", b"1").unwrap(),
            None,
            "{name}"
        );
        assert_eq!(
            e.insert(Tree::Settings, b"a", b"2").unwrap().as_deref(),
            Some(&b"1"[..]),
            "{name}"
        );
        // Trees are apart: the same key elsewhere is another entry.
        assert_eq!(e.get(Tree::Contacts, b"a").unwrap(), None, "{name}");
        assert!(e.contains_key(Tree::Settings, b"a").unwrap(), "{name}");
        assert_eq!(e.len(Tree::Settings).unwrap(), 1, "{name}");
        assert_eq!(
            e.remove(Tree::Settings, b"a").unwrap().as_deref(),
            Some(&b"2"[..]),
            "{name}"
        );
        assert_eq!(e.remove(Tree::Settings, b"a").unwrap(), None, "{name}");
        assert!(!e.contains_key(Tree::Settings, b"a").unwrap(), "{name}");
        // An empty value is a value.
        e.insert(Tree::Settings, b"empty", b"").unwrap();
        assert_eq!(
            e.get(Tree::Settings, b"empty").unwrap(),
            Some(Vec::new()),
            "{name}"
        );
    });
}

#[test]
fn ranges_follow_bytewise_key_order_in_both_directions() {
    on_each_engine(|name, engine| {
        let e = engine.as_engine();
        // More keys than one page of a paged engine, with bytes a text
        // collation would order differently (NUL, 0xff, upper case).
        let mut keys: Vec<Vec<u8>> = (0..600u32).map(|n| n.to_be_bytes().to_vec()).collect();
        keys.extend([
            b"a".to_vec(),
            b"a\0".to_vec(),
            b"a\0b".to_vec(),
            b"a\xff".to_vec(),
            b"B".to_vec(),
            b"b".to_vec(),
            b"\xff\xff".to_vec(),
        ]);
        let batch: Vec<_> = keys
            .iter()
            .map(|k| (k.clone(), Some(b"v".to_vec())))
            .collect();
        e.apply_batch(Tree::Located, &batch).unwrap();
        let mut sorted = keys.clone();
        sorted.sort();
        let all = e.keys(
            Tree::Located,
            Bound::Unbounded,
            Bound::Unbounded,
            Direction::Forward,
        );
        assert_eq!(all, sorted, "{name}: forward");
        let mut reversed = sorted.clone();
        reversed.reverse();
        let back = e.keys(
            Tree::Located,
            Bound::Unbounded,
            Bound::Unbounded,
            Direction::Reverse,
        );
        assert_eq!(back, reversed, "{name}: reverse");
        assert_eq!(
            e.prefix_keys(Tree::Located, b"a"),
            vec![
                b"a".to_vec(),
                b"a\0".to_vec(),
                b"a\0b".to_vec(),
                b"a\xff".to_vec()
            ],
            "{name}: prefix"
        );
        assert_eq!(
            e.prefix_keys(Tree::Located, b"a\0"),
            vec![b"a\0".to_vec(), b"a\0b".to_vec()],
            "{name}: prefix ending in NUL"
        );
        assert_eq!(e.prefix_keys(Tree::Located, b"\xff\xff").len(), 1, "{name}");
        assert_eq!(
            e.keys(
                Tree::Located,
                Bound::Excluded(b"a".to_vec()),
                Bound::Included(b"a\xff".to_vec()),
                Direction::Forward
            ),
            vec![b"a\0".to_vec(), b"a\0b".to_vec(), b"a\xff".to_vec()],
            "{name}: excluded start, included end"
        );
        assert_eq!(
            e.keys(
                Tree::Located,
                Bound::Included(b"a".to_vec()),
                Bound::Excluded(b"a\xff".to_vec()),
                Direction::Reverse
            ),
            vec![b"a\0b".to_vec(), b"a\0".to_vec(), b"a".to_vec()],
            "{name}: reverse, excluded end"
        );
        let numbers = e.keys(
            Tree::Located,
            Bound::Included(10u32.to_be_bytes().to_vec()),
            Bound::Excluded(510u32.to_be_bytes().to_vec()),
            Direction::Reverse,
        );
        assert_eq!(numbers.len(), 500, "{name}: across pages");
        assert_eq!(
            numbers.first(),
            Some(&509u32.to_be_bytes().to_vec()),
            "{name}"
        );
        assert_eq!(
            e.keys(
                Tree::Located,
                Bound::Included(b"b".to_vec()),
                Bound::Excluded(b"a".to_vec()),
                Direction::Forward
            ),
            Vec::<Vec<u8>>::new(),
            "{name}: an empty range"
        );
        assert_eq!(e.len(Tree::Located).unwrap(), keys.len(), "{name}");
        // A batch removes as well.
        let removals: Vec<_> = keys.iter().map(|k| (k.clone(), None)).collect();
        e.apply_batch(Tree::Located, &removals).unwrap();
        assert!(e.is_empty(Tree::Located).unwrap(), "{name}");
    });
}

#[test]
fn a_transaction_sees_its_own_writes_and_an_aborted_one_writes_nothing() {
    on_each_engine(|name, engine| {
        engine
            .engine_transaction(&[Tree::Threads, Tree::ThreadKeys], &|tx| {
                assert_eq!(tx.insert(Tree::Threads, b"t", b"1")?, None);
                assert_eq!(tx.get(Tree::Threads, b"t")?.as_deref(), Some(&b"1"[..]));
                tx.insert(Tree::ThreadKeys, b"k", b"t")?;
                assert_eq!(
                    tx.remove(Tree::ThreadKeys, b"k")?.as_deref(),
                    Some(&b"t"[..])
                );
                assert_eq!(tx.get(Tree::ThreadKeys, b"k")?, None);
                Ok(())
            })
            .unwrap();
        let e = engine.as_engine();
        assert_eq!(
            e.get(Tree::Threads, b"t").unwrap().as_deref(),
            Some(&b"1"[..]),
            "{name}"
        );
        let aborted = engine.engine_transaction(&[Tree::Threads, Tree::Cursors], &|tx| {
            tx.insert(Tree::Threads, b"t", b"2")?;
            tx.insert(Tree::Cursors, b"c", b"1")?;
            Err(TxError::Abort(StoreError::CursorMoved))
        });
        assert!(
            matches!(aborted, Err(StoreError::CursorMoved)),
            "{name}: {aborted:?}"
        );
        assert_eq!(
            e.get(Tree::Threads, b"t").unwrap().as_deref(),
            Some(&b"1"[..]),
            "{name}"
        );
        assert_eq!(e.get(Tree::Cursors, b"c").unwrap(), None, "{name}");
        // A tree the transaction did not name is refused on every engine.
        let unnamed = engine.engine_transaction(&[Tree::Threads], &|tx| {
            tx.get(Tree::Cursors, b"c")?;
            Ok(())
        });
        assert!(
            matches!(unnamed, Err(StoreError::Engine(_))),
            "{name}: {unnamed:?}"
        );
    });
}

/// Concurrent read-modify-write transactions on one key lose no update:
/// the engine reruns the ones that conflicted.
#[test]
fn concurrent_transactions_on_one_key_lose_no_update() {
    on_each_engine(|name, engine| {
        let engine = Arc::new(engine);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                let engine = engine.clone();
                scope.spawn(move || {
                    for _ in 0..25 {
                        engine
                            .engine_transaction(&[Tree::Quota], &|tx| {
                                let n = tx
                                    .get(Tree::Quota, b"n")?
                                    .map_or(0, |v| u64::from_be_bytes(v.try_into().unwrap()));
                                tx.insert(Tree::Quota, b"n", &(n + 1).to_be_bytes())?;
                                Ok(())
                            })
                            .unwrap();
                    }
                });
            }
        });
        let n = engine.as_engine().get(Tree::Quota, b"n").unwrap().unwrap();
        assert_eq!(u64::from_be_bytes(n.try_into().unwrap()), 100, "{name}");
    });
}

#[test]
fn compare_and_swap_writes_only_over_what_it_expects() {
    on_each_engine(|name, engine| {
        let e = engine.as_engine();
        let t = Tree::DeadLetters;
        assert!(
            e.compare_and_swap(t, b"k", None, None).unwrap(),
            "{name}: absent is absent"
        );
        assert!(
            e.compare_and_swap(t, b"k", None, Some(b"1")).unwrap(),
            "{name}"
        );
        assert!(
            !e.compare_and_swap(t, b"k", None, Some(b"x")).unwrap(),
            "{name}: not absent"
        );
        assert!(!e.compare_and_swap(t, b"k", None, None).unwrap(), "{name}");
        assert!(
            !e.compare_and_swap(t, b"k", Some(b"0"), Some(b"x")).unwrap(),
            "{name}"
        );
        assert!(
            e.compare_and_swap(t, b"k", Some(b"1"), Some(b"2")).unwrap(),
            "{name}"
        );
        assert!(
            !e.compare_and_swap(t, b"k", Some(b"1"), None).unwrap(),
            "{name}"
        );
        assert_eq!(
            e.get(t, b"k").unwrap().as_deref(),
            Some(&b"2"[..]),
            "{name}"
        );
        assert!(
            e.compare_and_swap(t, b"k", Some(b"2"), None).unwrap(),
            "{name}"
        );
        assert_eq!(e.get(t, b"k").unwrap(), None, "{name}");
    });
}

#[test]
fn generated_ids_only_increase() {
    on_each_engine(|name, engine| {
        let e = engine.as_engine();
        let mut last = e.generate_id().unwrap();
        for _ in 0..50 {
            let next = e.generate_id().unwrap();
            assert!(next > last, "{name}: {next} after {last}");
            last = next;
        }
        let mut in_transaction = Vec::new();
        for _ in 0..3 {
            let id = std::sync::Mutex::new(0);
            engine
                .engine_transaction(&[Tree::Outbox], &|tx| {
                    *id.lock().unwrap() = tx.generate_id()?;
                    Ok(())
                })
                .unwrap();
            in_transaction.push(id.into_inner().unwrap());
        }
        assert!(in_transaction[0] > last, "{name}");
        assert!(in_transaction.windows(2).all(|w| w[1] > w[0]), "{name}");
    });
}

/// A batch is applied in order: of two writes to one key, the later wins
/// (the store's contact upserts remove and write one key in one batch).
#[test]
fn a_batch_that_writes_a_key_twice_leaves_the_last_write() {
    on_each_engine(|name, engine| {
        let e = engine.as_engine();
        let t = Tree::ContactEmails;
        e.insert(t, b"removed then written", b"old").unwrap();
        e.insert(t, b"written then removed", b"old").unwrap();
        e.apply_batch(
            t,
            &[
                (b"removed then written".to_vec(), None),
                (b"written then removed".to_vec(), Some(b"new".to_vec())),
                (b"removed then written".to_vec(), Some(b"new".to_vec())),
                (b"written then removed".to_vec(), None),
                (b"written twice".to_vec(), Some(b"first".to_vec())),
                (b"written twice".to_vec(), Some(b"second".to_vec())),
            ],
        )
        .unwrap();
        assert_eq!(
            e.get(t, b"removed then written").unwrap().as_deref(),
            Some(&b"new"[..]),
            "{name}"
        );
        assert_eq!(e.get(t, b"written then removed").unwrap(), None, "{name}");
        assert_eq!(
            e.get(t, b"written twice").unwrap().as_deref(),
            Some(&b"second"[..]),
            "{name}"
        );
    });
}
