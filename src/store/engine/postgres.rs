//! The shared engine: PostgreSQL. Every tree lives in one table,
//! `<schema>.kv (tree smallint, key bytea, value bytea)`, keyed by both, so
//! bytea's bytewise order is sled's key order and a range is an index scan.
//!
//! Transactions run `SERIALIZABLE` and start over on a serialization failure
//! or deadlock (SQLSTATE 40001, 40P01), as sled's do on a conflict, after a
//! short random wait so that the writers that met do not meet again; nothing
//! relies on advisory locks or LISTEN/NOTIFY, so the same SQL holds on
//! CockroachDB and YugabyteDB. A commit is durable when it returns
//! (`synchronous_commit` as the server has it, `on` by default), so
//! [`Engine::flush`] has nothing to do.
//!
//! The client is the synchronous `postgres` crate, which runs a runtime of
//! its own and panics inside another one: the store's callers are async
//! tasks, so each connection lives on a thread of its own and a call hands it
//! a job and waits. A transaction holds one connection from its BEGIN to its
//! COMMIT; its closure runs on the caller's thread between the jobs.

use std::{
    collections::VecDeque,
    ops::Bound,
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::Duration,
};

use postgres::{Client, Statement, error::SqlState};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{Direction, Engine, Entries, Entry, Tree, Tx, TxError, TxResult};
use crate::store::{StoreError, StoreResult};

/// The schema layout this build writes; a database at a later one is refused.
const SCHEMA_VERSION: i32 = 1;

/// Rows a batch writes per statement.
const BATCH_ROWS: usize = 5_000;

/// Rows a range reads per query.
const PAGE_ROWS: i64 = 256;

/// How many times a transaction starts over on serialization failures
/// before the caller is told.
const MAX_TRANSACTION_TRIES: u32 = 100;

/// The longest wait before a transaction starts over (see `transaction`).
const MAX_RETRY_WAIT_MS: u64 = 32;

/// Where and how to connect.
#[derive(Clone)]
pub struct PostgresOptions {
    /// A libpq-style URL or key=value string.
    pub url: String,
    /// Connections (each on its own thread).
    pub pool_size: usize,
    /// The schema the store's tables live in.
    pub schema: String,
    /// TLS for `sslmode=prefer|require`: the roots everything else trusts.
    pub tls: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for PostgresOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password.
        f.debug_struct("PostgresOptions")
            .field("pool_size", &self.pool_size)
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

/// Whether `schema` is a plain lower-case identifier (it is spliced into SQL).
pub fn valid_schema_name(schema: &str) -> bool {
    let mut chars = schema.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && schema.len() <= 63
}

/// The statements every connection prepares once.
struct Statements {
    get: Statement,
    exists: Statement,
    upsert: Statement,
    remove: Statement,
    insert_if_absent: Statement,
    update_if: Statement,
    remove_if: Statement,
    forward_to: Statement,
    forward_open: Statement,
    reverse_to: Statement,
    reverse_open: Statement,
    count: Statement,
    upsert_many: Statement,
    remove_many: Statement,
    next_id: Statement,
}

impl Statements {
    fn prepare(client: &mut Client, schema: &str) -> Result<Self, postgres::Error> {
        let kv = format!("{schema}.kv");
        let mut prepare = |sql: String| client.prepare(&sql);
        let range = |condition: &str, order: &str| {
            format!(
                "SELECT key, value FROM {kv} WHERE tree = $1 AND key >= $2 {condition} \
                 ORDER BY key {order} LIMIT $LIMIT"
            )
        };
        Ok(Self {
            get: prepare(format!(
                "SELECT value FROM {kv} WHERE tree = $1 AND key = $2"
            ))?,
            exists: prepare(format!("SELECT 1 FROM {kv} WHERE tree = $1 AND key = $2"))?,
            // The old value is read in the statement's own snapshot, before
            // the write.
            upsert: prepare(format!(
                "WITH old AS (SELECT value FROM {kv} WHERE tree = $1 AND key = $2), \
                 written AS (INSERT INTO {kv} (tree, key, value) VALUES ($1, $2, $3) \
                 ON CONFLICT (tree, key) DO UPDATE SET value = EXCLUDED.value) \
                 SELECT value FROM old"
            ))?,
            remove: prepare(format!(
                "DELETE FROM {kv} WHERE tree = $1 AND key = $2 RETURNING value"
            ))?,
            insert_if_absent: prepare(format!(
                "INSERT INTO {kv} (tree, key, value) VALUES ($1, $2, $3) \
                 ON CONFLICT (tree, key) DO NOTHING"
            ))?,
            update_if: prepare(format!(
                "UPDATE {kv} SET value = $4 WHERE tree = $1 AND key = $2 AND value = $3"
            ))?,
            remove_if: prepare(format!(
                "DELETE FROM {kv} WHERE tree = $1 AND key = $2 AND value = $3"
            ))?,
            forward_to: prepare(range("AND key < $3", "ASC").replace("$LIMIT", "$4"))?,
            forward_open: prepare(range("", "ASC").replace("$LIMIT", "$3"))?,
            reverse_to: prepare(range("AND key < $3", "DESC").replace("$LIMIT", "$4"))?,
            reverse_open: prepare(range("", "DESC").replace("$LIMIT", "$3"))?,
            count: prepare(format!("SELECT count(*) FROM {kv} WHERE tree = $1"))?,
            upsert_many: prepare(format!(
                "INSERT INTO {kv} (tree, key, value) \
                 SELECT $1, key, value FROM unnest($2::bytea[], $3::bytea[]) AS batch (key, value) \
                 ON CONFLICT (tree, key) DO UPDATE SET value = EXCLUDED.value"
            ))?,
            remove_many: prepare(format!(
                "DELETE FROM {kv} WHERE tree = $1 AND key = ANY($2::bytea[])"
            ))?,
            next_id: prepare(format!("SELECT nextval('{schema}.ids')"))?,
        })
    }
}

/// One connection's state, owned by its thread.
struct Session {
    options: PostgresOptions,
    client: Option<(Client, Statements)>,
}

impl Session {
    /// The connection, made (again) when there is none or it broke.
    fn connected(&mut self) -> Result<&mut (Client, Statements), postgres::Error> {
        let connected = match self.client.take() {
            Some(connected) if !connected.0.is_closed() => connected,
            _ => {
                let mut client = connect(&self.options)?;
                let statements = Statements::prepare(&mut client, &self.options.schema)?;
                (client, statements)
            }
        };
        Ok(self.client.insert(connected))
    }
}

fn connect(options: &PostgresOptions) -> Result<Client, postgres::Error> {
    let mut config: postgres::Config = options.url.parse()?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    config.application_name("mailbridge");
    config.connect(MakeRustlsConnect::new((*options.tls).clone()))
}

type Job = Box<dyn FnOnce(&mut Session) + Send>;

/// A connection's thread, reached through its job queue.
struct Connection {
    jobs: mpsc::Sender<Job>,
    /// Jobs handed to the thread so far: each is at least one round trip
    /// to the server (what the benchmark counts per commit).
    calls: AtomicU64,
}

impl Connection {
    fn start(options: PostgresOptions, number: usize) -> std::io::Result<Self> {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name(format!("postgres-{number}"))
            .spawn(move || {
                let mut session = Session {
                    options,
                    client: None,
                };
                // Ends when the engine, and with it the sender, is dropped.
                for job in queue {
                    job(&mut session);
                }
            })?;
        Ok(Self {
            jobs,
            calls: AtomicU64::new(0),
        })
    }

    /// Runs `work` on the connection's thread and waits for its answer.
    fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Client, &Statements) -> Result<T, postgres::Error> + Send + 'static,
    ) -> Result<T, Failure> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let (answer, answered) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |session| {
            let outcome = match session.connected() {
                Ok((client, statements)) => work(client, statements),
                Err(err) => Err(err),
            };
            if let Err(err) = &outcome
                && err.is_closed()
            {
                session.client = None;
            }
            let _ = answer.send(outcome.map_err(Failure::from));
        });
        self.jobs
            .send(job)
            .map_err(|_| Failure::Engine("the database connection's thread has stopped".into()))?;
        answered.recv().map_err(|_| {
            Failure::Engine("the database connection's thread stopped during a call".into())
        })?
    }
}

/// A failed call, sorted by what the caller does next.
#[derive(Debug)]
enum Failure {
    /// A serialization failure or deadlock: the transaction starts over.
    Conflict,
    /// The connection was gone (the server restarted, a network cut): the
    /// next call connects again. Nothing of an open transaction committed.
    Closed(String),
    Engine(String),
}

impl From<postgres::Error> for Failure {
    fn from(err: postgres::Error) -> Self {
        match err.code() {
            Some(code)
                if *code == SqlState::T_R_SERIALIZATION_FAILURE
                    || *code == SqlState::T_R_DEADLOCK_DETECTED =>
            {
                Failure::Conflict
            }
            _ if err.is_closed() => Failure::Closed(words(&err)),
            _ => Failure::Engine(words(&err)),
        }
    }
}

/// Runs `attempt` again once when the connection it used turned out closed:
/// for calls that are safe to repeat (reads, upserts, batches of them). A
/// pooled connection learns that the server went away only on its next use.
fn again_if_closed<T>(attempt: impl Fn() -> Result<T, Failure>) -> Result<T, Failure> {
    match attempt() {
        Err(Failure::Closed(_)) => attempt(),
        other => other,
    }
}

/// The error's own words and the server's detail, when there is one.
fn words(err: &postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => match db.detail() {
            Some(detail) => format!("PostgreSQL: {} ({detail})", db.message()),
            None => format!("PostgreSQL: {}", db.message()),
        },
        None => {
            // The driver's own words are short ("error connecting to
            // server"); the cause is in its sources.
            let mut words = format!("PostgreSQL: {err}");
            let mut source = std::error::Error::source(err);
            while let Some(cause) = source {
                words.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            words
        }
    }
}

impl From<Failure> for StoreError {
    fn from(failure: Failure) -> Self {
        match failure {
            Failure::Conflict => {
                StoreError::Engine("PostgreSQL: a serialization failure on a single write".into())
            }
            Failure::Closed(words) | Failure::Engine(words) => StoreError::Engine(words),
        }
    }
}

impl From<Failure> for TxError {
    fn from(failure: Failure) -> Self {
        match failure {
            // The server ended the transaction with the connection: run it
            // again on a new one.
            Failure::Conflict | Failure::Closed(_) => TxError::Conflict,
            Failure::Engine(words) => TxError::Engine(words),
        }
    }
}

/// The pool: every connection, and which of them wait to be lent.
struct Pool {
    connections: Vec<Connection>,
    idle: Mutex<Vec<usize>>,
    returned: Condvar,
}

/// A connection lent to one caller; back in the pool when dropped, after a
/// ROLLBACK if a transaction was left open (its closure panicked).
struct Lent<'a> {
    pool: &'a Pool,
    /// Into `pool.connections`.
    number: usize,
    in_transaction: bool,
}

impl Lent<'_> {
    fn connection(&self) -> &Connection {
        &self.pool.connections[self.number]
    }
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        if self.in_transaction {
            let _ = self
                .connection()
                .run(|client, _| client.batch_execute("ROLLBACK"));
        }
        self.pool
            .idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(self.number);
        self.pool.returned.notify_one();
    }
}

impl Pool {
    fn lend(&self) -> Lent<'_> {
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        loop {
            if let Some(number) = idle.pop() {
                return Lent {
                    pool: self,
                    number,
                    in_transaction: false,
                };
            }
            idle = self
                .returned
                .wait(idle)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }
}

pub struct PostgresEngine {
    pool: Pool,
    schema: String,
}

impl std::fmt::Debug for PostgresEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresEngine")
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

impl PostgresEngine {
    /// Connects, creates the schema where it is missing, and refuses a
    /// database whose layout is newer than this build's. Blocks; callable
    /// from inside a runtime (the first connection is made on a thread of
    /// its own, like every later one).
    pub fn open(options: PostgresOptions) -> anyhow::Result<Self> {
        anyhow::ensure!(
            valid_schema_name(&options.schema),
            "storage.postgres.schema {:?} is not a plain lower-case name (letters, digits, _)",
            options.schema
        );
        let schema = options.schema.clone();
        let first = options.clone();
        std::thread::scope(|scope| {
            scope
                .spawn(move || -> anyhow::Result<()> {
                    let mut client = connect(&first).map_err(|err| {
                        anyhow::anyhow!(
                            "connecting to PostgreSQL (storage.postgres.url): {}",
                            words(&err)
                        )
                    })?;
                    bootstrap(&mut client, &first.schema)
                })
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("connecting to PostgreSQL panicked")))
        })?;
        let connections = (0..options.pool_size.max(1))
            .map(|number| Connection::start(options.clone(), number))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self {
            pool: Pool {
                idle: Mutex::new((0..connections.len()).collect()),
                connections,
                returned: Condvar::new(),
            },
            schema,
        })
    }

    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// Calls made on the connections so far, each at least one round trip
    /// to the server (BEGIN and COMMIT count as one each): what a commit
    /// costs in waits on the network, for benchmarks to divide.
    pub fn round_trips(&self) -> u64 {
        self.pool
            .connections
            .iter()
            .map(|connection| connection.calls.load(Ordering::Relaxed))
            .sum()
    }

    /// Moves the id sequence so that every id it gives from now on is
    /// above `issued` (after a migration: ids order the outbox).
    pub fn advance_ids_past(&self, issued: u64) -> StoreResult<()> {
        let issued = i64::try_from(issued).map_err(|_| {
            StoreError::Engine(format!("id {issued} is beyond PostgreSQL's bigint"))
        })?;
        let schema = self.schema.clone();
        self.run(move |client, _| {
            client.execute(
                &format!(
                    "SELECT setval('{schema}.ids', GREATEST($1, (SELECT last_value FROM {schema}.ids)))"
                ),
                &[&issued],
            )?;
            Ok(())
        })
    }

    fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Client, &Statements) -> Result<T, postgres::Error> + Send + 'static,
    ) -> StoreResult<T> {
        // A single statement runs in a transaction of its own (READ
        // COMMITTED), which no serialization failure can end.
        let lent = self.pool.lend();
        lent.connection().run(work).map_err(StoreError::from)
    }
}

/// Creates what is missing and checks the layout's version. Several nodes
/// may start at once: a creation that lost the race is tried again.
fn bootstrap(client: &mut Client, schema: &str) -> anyhow::Result<()> {
    let create = format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
         CREATE TABLE IF NOT EXISTS {schema}.schema_version (version integer NOT NULL);
         CREATE TABLE IF NOT EXISTS {schema}.kv (
             tree smallint NOT NULL,
             key bytea NOT NULL,
             value bytea NOT NULL,
             PRIMARY KEY (tree, key)
         );
         CREATE SEQUENCE IF NOT EXISTS {schema}.ids;"
    );
    let mut tries = 0;
    loop {
        tries += 1;
        match client.batch_execute(&create) {
            Ok(()) => break,
            Err(err)
                if tries < 5
                    && err.code().is_some_and(|code| {
                        *code == SqlState::UNIQUE_VIOLATION
                            || *code == SqlState::DUPLICATE_OBJECT
                            || *code == SqlState::DUPLICATE_TABLE
                            || *code == SqlState::DUPLICATE_SCHEMA
                    }) =>
            {
                continue;
            }
            Err(err) => anyhow::bail!(
                "creating the store's tables in schema {schema}: {}",
                words(&err)
            ),
        }
    }
    let version: Option<i32> = client
        .query_one(
            &format!("SELECT max(version) FROM {schema}.schema_version"),
            &[],
        )
        .map_err(|err| anyhow::anyhow!("reading the schema version: {}", words(&err)))?
        .get(0);
    match version {
        Some(version) if version > SCHEMA_VERSION => anyhow::bail!(
            "the database schema {schema} was written by a newer mailbridge (schema version \
             {version}; this build reads up to {SCHEMA_VERSION}): run that version or a newer one"
        ),
        Some(_) => Ok(()),
        None => {
            client
                .execute(
                    &format!("INSERT INTO {schema}.schema_version (version) VALUES ($1)"),
                    &[&SCHEMA_VERSION],
                )
                .map_err(|err| anyhow::anyhow!("writing the schema version: {}", words(&err)))?;
            Ok(())
        }
    }
}

fn tree_number(tree: Tree) -> i16 {
    tree as i16
}

/// One transaction's calls, on its lent connection.
struct PostgresTx<'a> {
    connection: &'a Connection,
    /// The trees the transaction named: another is refused, as sled does,
    /// so code that runs on one engine runs on the other.
    trees: &'a [Tree],
}

impl PostgresTx<'_> {
    fn named(&self, tree: Tree) -> TxResult<()> {
        if self.trees.contains(&tree) {
            Ok(())
        } else {
            Err(TxError::Engine(format!(
                "tree {} is not part of the transaction",
                tree.name()
            )))
        }
    }
}

fn get_on(connection: &Connection, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, Failure> {
    let key = key.to_vec();
    connection.run(move |client, statements| {
        Ok(client
            .query_opt(&statements.get, &[&tree_number(tree), &key])?
            .map(|row| row.get::<_, Vec<u8>>(0)))
    })
}

fn insert_on(
    connection: &Connection,
    tree: Tree,
    key: &[u8],
    value: &[u8],
) -> Result<Option<Vec<u8>>, Failure> {
    let (key, value) = (key.to_vec(), value.to_vec());
    connection.run(move |client, statements| {
        Ok(client
            .query_opt(&statements.upsert, &[&tree_number(tree), &key, &value])?
            .map(|row| row.get::<_, Vec<u8>>(0)))
    })
}

fn remove_on(connection: &Connection, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, Failure> {
    let key = key.to_vec();
    connection.run(move |client, statements| {
        Ok(client
            .query_opt(&statements.remove, &[&tree_number(tree), &key])?
            .map(|row| row.get::<_, Vec<u8>>(0)))
    })
}

fn next_id_on(connection: &Connection) -> Result<u64, Failure> {
    let id: i64 = connection
        .run(|client, statements| Ok(client.query_one(&statements.next_id, &[])?.get(0)))?;
    u64::try_from(id).map_err(|_| Failure::Engine(format!("the id sequence gave {id}")))
}

impl Tx for PostgresTx<'_> {
    fn get(&self, tree: Tree, key: &[u8]) -> TxResult<Option<Vec<u8>>> {
        self.named(tree)?;
        Ok(get_on(self.connection, tree, key)?)
    }

    fn insert(&self, tree: Tree, key: &[u8], value: &[u8]) -> TxResult<Option<Vec<u8>>> {
        self.named(tree)?;
        Ok(insert_on(self.connection, tree, key, value)?)
    }

    fn remove(&self, tree: Tree, key: &[u8]) -> TxResult<Option<Vec<u8>>> {
        self.named(tree)?;
        Ok(remove_on(self.connection, tree, key)?)
    }

    fn generate_id(&self) -> TxResult<u64> {
        Ok(next_id_on(self.connection)?)
    }
}

/// A range read a page at a time. Each page is its own query: a long scan
/// holds no transaction open (which would keep vacuum from its work).
struct PagedRange<'a> {
    engine: &'a PostgresEngine,
    tree: Tree,
    /// Keys from here on (inclusive).
    lower: Vec<u8>,
    /// Keys before this one (exclusive); None: to the end.
    upper: Option<Vec<u8>>,
    direction: Direction,
    page: VecDeque<Entry>,
    finished: bool,
}

impl PagedRange<'_> {
    fn next_page(&mut self) -> StoreResult<()> {
        let (tree, lower, upper, direction) = (
            tree_number(self.tree),
            self.lower.clone(),
            self.upper.clone(),
            self.direction,
        );
        let lent = self.engine.pool.lend();
        let rows: Vec<Entry> = again_if_closed(|| {
            let (lower, upper) = (lower.clone(), upper.clone());
            lent.connection().run(move |client, statements| {
                let rows =
                    match (direction, &upper) {
                        (Direction::Forward, Some(upper)) => client
                            .query(&statements.forward_to, &[&tree, &lower, upper, &PAGE_ROWS])?,
                        (Direction::Forward, None) => {
                            client.query(&statements.forward_open, &[&tree, &lower, &PAGE_ROWS])?
                        }
                        (Direction::Reverse, Some(upper)) => client
                            .query(&statements.reverse_to, &[&tree, &lower, upper, &PAGE_ROWS])?,
                        (Direction::Reverse, None) => {
                            client.query(&statements.reverse_open, &[&tree, &lower, &PAGE_ROWS])?
                        }
                    };
                Ok(rows
                    .into_iter()
                    .map(|row| (row.get::<_, Vec<u8>>(0), row.get::<_, Vec<u8>>(1)))
                    .collect())
            })
        })?;
        if (rows.len() as i64) < PAGE_ROWS {
            self.finished = true;
        }
        if let Some((last, _)) = rows.last() {
            match self.direction {
                // The next key after `last` in bytewise order.
                Direction::Forward => {
                    let mut after = last.clone();
                    after.push(0);
                    self.lower = after;
                }
                Direction::Reverse => self.upper = Some(last.clone()),
            }
        }
        self.page.extend(rows);
        Ok(())
    }
}

impl Iterator for PagedRange<'_> {
    type Item = StoreResult<Entry>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.page.is_empty()
            && !self.finished
            && let Err(err) = self.next_page()
        {
            self.finished = true;
            return Some(Err(err));
        }
        self.page.pop_front().map(Ok)
    }
}

impl Engine for PostgresEngine {
    fn transaction<R>(
        &self,
        trees: &[Tree],
        work: &dyn Fn(&dyn Tx) -> TxResult<R>,
    ) -> StoreResult<R> {
        let mut lent = self.pool.lend();
        for tries in 0..MAX_TRANSACTION_TRIES {
            if tries > 0 {
                // Writers that met in a serialization failure and start
                // again at once meet again: with 4 writers ingesting, 100
                // immediate retries in a row failed (bench_engines). A
                // random wait, growing to MAX_RETRY_WAIT_MS, spreads them.
                let ceiling = (1u64 << tries.min(6)).min(MAX_RETRY_WAIT_MS);
                std::thread::sleep(Duration::from_millis(fastrand::u64(0..=ceiling)));
            }
            match lent
                .connection()
                .run(|client, _| client.batch_execute("BEGIN ISOLATION LEVEL SERIALIZABLE"))
            {
                Ok(()) => {}
                // Nothing began: begin on a new connection.
                Err(Failure::Closed(_)) => continue,
                Err(failure) => return Err(failure.into()),
            }
            lent.in_transaction = true;
            let outcome = work(&PostgresTx {
                connection: lent.connection(),
                trees,
            });
            let ended = match outcome {
                Ok(value) => match lent
                    .connection()
                    .run(|client, _| client.batch_execute("COMMIT"))
                {
                    Ok(()) => Ok(value),
                    // The COMMIT may or may not have taken effect.
                    Err(Failure::Closed(words)) => Err(TxError::Engine(format!(
                        "{words} (the connection closed during COMMIT: whether it committed is unknown)"
                    ))),
                    Err(failure) => Err(TxError::from(failure)),
                },
                Err(err) => {
                    // On a closed connection there is nothing to roll back.
                    match lent
                        .connection()
                        .run(|client, _| client.batch_execute("ROLLBACK"))
                    {
                        Ok(()) | Err(Failure::Closed(_)) => {}
                        Err(failure) => return Err(failure.into()),
                    }
                    Err(err)
                }
            };
            // A failed COMMIT has ended the transaction too.
            lent.in_transaction = false;
            match ended {
                Ok(value) => return Ok(value),
                Err(TxError::Conflict) => continue,
                Err(TxError::Abort(err)) => return Err(err),
                Err(TxError::Engine(words)) => return Err(StoreError::Engine(words)),
            }
        }
        Err(StoreError::Engine(format!(
            "PostgreSQL: a transaction met a serialization failure {MAX_TRANSACTION_TRIES} times in a row"
        )))
    }

    fn get(&self, tree: Tree, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        let lent = self.pool.lend();
        Ok(again_if_closed(|| get_on(lent.connection(), tree, key))?)
    }

    fn contains_key(&self, tree: Tree, key: &[u8]) -> StoreResult<bool> {
        let lent = self.pool.lend();
        Ok(again_if_closed(|| {
            let key = key.to_vec();
            lent.connection().run(move |client, statements| {
                Ok(client
                    .query_opt(&statements.exists, &[&tree_number(tree), &key])?
                    .is_some())
            })
        })?)
    }

    fn insert(&self, tree: Tree, key: &[u8], value: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        let lent = self.pool.lend();
        Ok(again_if_closed(|| {
            insert_on(lent.connection(), tree, key, value)
        })?)
    }

    fn remove(&self, tree: Tree, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        let lent = self.pool.lend();
        Ok(remove_on(lent.connection(), tree, key)?)
    }

    fn compare_and_swap(
        &self,
        tree: Tree,
        key: &[u8],
        old: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> StoreResult<bool> {
        let (key, old, new) = (
            key.to_vec(),
            old.map(<[u8]>::to_vec),
            new.map(<[u8]>::to_vec),
        );
        self.run(move |client, statements| {
            let tree = tree_number(tree);
            Ok(match (old, new) {
                (None, Some(new)) => {
                    client.execute(&statements.insert_if_absent, &[&tree, &key, &new])? == 1
                }
                (Some(old), Some(new)) => {
                    client.execute(&statements.update_if, &[&tree, &key, &old, &new])? == 1
                }
                (Some(old), None) => {
                    client.execute(&statements.remove_if, &[&tree, &key, &old])? == 1
                }
                (None, None) => client
                    .query_opt(&statements.exists, &[&tree, &key])?
                    .is_none(),
            })
        })
    }

    fn apply_batch(&self, tree: Tree, batch: &[(Vec<u8>, Option<Vec<u8>>)]) -> StoreResult<()> {
        // What the batch leaves, key by key: the last write of a key wins,
        // as when a batch is applied in order (and one statement may not
        // touch a row twice).
        let mut last: std::collections::HashMap<&[u8], Option<&[u8]>> =
            std::collections::HashMap::with_capacity(batch.len());
        for (key, value) in batch {
            last.insert(key.as_slice(), value.as_deref());
        }
        let mut removed: Vec<Vec<u8>> = Vec::new();
        let (mut keys, mut values): (Vec<Vec<u8>>, Vec<Vec<u8>>) = (Vec::new(), Vec::new());
        for (key, value) in last {
            match value {
                Some(value) => {
                    keys.push(key.to_vec());
                    values.push(value.to_vec());
                }
                None => removed.push(key.to_vec()),
            }
        }
        let lent = self.pool.lend();
        Ok(again_if_closed(|| {
            let (removed, keys, values) = (removed.clone(), keys.clone(), values.clone());
            lent.connection().run(move |client, statements| {
                let tree = tree_number(tree);
                let mut transaction = client.transaction()?;
                for chunk in removed.chunks(BATCH_ROWS) {
                    transaction.execute(&statements.remove_many, &[&tree, &chunk])?;
                }
                for (keys, values) in keys.chunks(BATCH_ROWS).zip(values.chunks(BATCH_ROWS)) {
                    transaction.execute(&statements.upsert_many, &[&tree, &keys, &values])?;
                }
                transaction.commit()
            })
        })?)
    }

    fn range(
        &self,
        tree: Tree,
        from: Bound<Vec<u8>>,
        to: Bound<Vec<u8>>,
        direction: Direction,
    ) -> Entries<'_> {
        // As a half-open interval [lower, upper): the key right after k in
        // bytewise order is k followed by a zero byte.
        let lower = match from {
            Bound::Included(key) => key,
            Bound::Excluded(mut key) => {
                key.push(0);
                key
            }
            Bound::Unbounded => Vec::new(),
        };
        let upper = match to {
            Bound::Included(mut key) => {
                key.push(0);
                Some(key)
            }
            Bound::Excluded(key) => Some(key),
            Bound::Unbounded => None,
        };
        let empty = upper.as_ref().is_some_and(|upper| *upper <= lower);
        Box::new(PagedRange {
            engine: self,
            tree,
            lower,
            upper,
            direction,
            page: VecDeque::new(),
            finished: empty,
        })
    }

    fn len(&self, tree: Tree) -> StoreResult<usize> {
        let lent = self.pool.lend();
        let count: i64 = again_if_closed(|| {
            lent.connection().run(move |client, statements| {
                Ok(client
                    .query_one(&statements.count, &[&tree_number(tree)])?
                    .get(0))
            })
        })?;
        Ok(usize::try_from(count).unwrap_or(usize::MAX))
    }

    fn generate_id(&self) -> StoreResult<u64> {
        let lent = self.pool.lend();
        Ok(again_if_closed(|| next_id_on(lent.connection()))?)
    }

    fn flush(&self) -> StoreResult<()> {
        Ok(())
    }
}

/// A PostgreSQL for tests: the one `scripts/postgres/start.sh` runs.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// The test database's URL: `TEST_POSTGRES_URL`, else what
    /// start.sh wrote. None when there is none, unless
    /// `TEST_REQUIRE_POSTGRES` is set (scripts/test.sh sets it): then
    /// a missing database fails the test instead of skipping the engine.
    pub(crate) fn database_url() -> Option<String> {
        let url = std::env::var("TEST_POSTGRES_URL").ok().or_else(|| {
            let runtime = std::env::var("TEST_POSTGRES_RUNTIME").unwrap_or_else(|_| {
                format!(
                    "{}/mailbridge-postgres",
                    std::env::var("TMPDIR").unwrap_or_else(|_| "/tmp".into())
                )
            });
            let env = std::fs::read_to_string(format!("{runtime}/postgres.env")).ok()?;
            env.lines()
                .find_map(|line| line.strip_prefix("TEST_POSTGRES_URL="))
                .map(str::to_string)
        });
        if url.is_none() && std::env::var_os("TEST_REQUIRE_POSTGRES").is_some() {
            panic!(
                "TEST_REQUIRE_POSTGRES is set, but no test database: run scripts/postgres/start.sh"
            );
        }
        url
    }

    /// A schema of its own, dropped with everything in it when dropped.
    pub(crate) struct TestSchema {
        url: String,
        pub(crate) name: String,
    }

    impl Drop for TestSchema {
        fn drop(&mut self) {
            let drop_it = |url: &str, name: &str| -> Result<(), postgres::Error> {
                let mut client = postgres::Client::connect(url, postgres::NoTls)?;
                client.batch_execute(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
            };
            // From a thread of its own: the client must not run inside a
            // test's runtime.
            let (url, name) = (self.url.clone(), self.name.clone());
            let _ = std::thread::spawn(move || drop_it(&url, &name)).join();
        }
    }

    pub(crate) fn options(url: &str, schema: &str) -> PostgresOptions {
        crate::tls::install_crypto_provider();
        PostgresOptions {
            url: url.to_string(),
            pool_size: 4,
            schema: schema.to_string(),
            tls: crate::tls::client_config(&[]).expect("TLS roots"),
        }
    }

    /// A new engine on a new schema, or None without a test database.
    pub(crate) fn engine() -> Option<(PostgresEngine, TestSchema)> {
        let url = database_url()?;
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        let engine = PostgresEngine::open(options(&url, &name)).expect("the test database opens");
        Some((engine, TestSchema { url, name }))
    }
}
