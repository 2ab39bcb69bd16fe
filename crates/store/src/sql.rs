//! [`SqlStore`]: the one implementation of [`Store`] over SQLite and
//! PostgreSQL. The schema and every statement are shared (both accept `$N`
//! placeholders and the same DDL); what differs is how a write transaction is
//! run — the embedded store's single writer with group commit
//! ([`crate::writer`]), or on PostgreSQL a lane's group commit
//! ([`crate::pg_writer`]: the batch's session rows locked `FOR UPDATE` in id
//! order, each write in a savepoint), with a write that meets a conflict run
//! alone in a pooled transaction and retried — and whose clock stamps it. Statements run on [`crate::db::Conn`], so each
//! transaction is written once for sqlx (PostgreSQL, the embedded readers)
//! and for the embedded writer's synchronous connection.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use baton_core::flow::{Accepted, Need, Post, Refusal, SessionState, Start, TakeRefusal};
use baton_core::permission::{judge, Judgement};
use baton_core::policy::QueueSummary;
use baton_core::{
    Disposition, Entry, EntryType, InputRange, NewEntry, PermissionInfo, PermissionPolicy,
    PermissionState, PermissionStatus, Policy, Role, Seq, Session, SessionId, SessionStatus,
    Timestamp, ToolInfo, Turn, TurnId, TurnStatus,
};
use futures_util::future::BoxFuture;
use sqlx::any::AnyPoolOptions;
use sqlx::AnyConnection;
use sqlx::{AnyPool, Connection};
use tokio::sync::{mpsc, oneshot};

use crate::db::{args, Conn, Fail, Row, Val, R};

mod posts;
use crate::pg_writer::{self, Lanes};
use crate::writer::{self, Clock, Job};
use crate::{
    AnswerPermission, Answered, Begin, CreateSession, Created, Due, DueStart, Ended, Lease, Listed,
    Page, PostMessage, Posted, Recovered, Renewal, Result, SessionPage, SessionQuery, SteerBatch,
    Store, StoreError, Take, TurnToRun,
};
pub(crate) use posts::{post_all, Waiting as WaitingPost};

/// Tunables that the store applies inside its transactions.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// How long a lease lasts without renewal.
    pub lease_ttl: Duration,
    /// How many user messages may wait for a turn (`429 queue_full` past it).
    pub queue_capacity: usize,
    /// How often a `starting` turn may be handed to a worker that vanishes
    /// before running it, before it is ended `failed` (bounded recovery).
    pub max_recoveries: i64,
    /// PostgreSQL pool size.
    pub max_connections: u32,
    /// How many group-commit lanes a PostgreSQL store runs (see
    /// [`crate::pg_writer`]): writes to different sessions commit in
    /// parallel across lanes, and each lane holds a connection only while a
    /// batch runs. Fewer lanes make bigger batches: on a database with 2
    /// cores, 2 lanes committed 15–30 % more posts to 1,000 sessions from 32
    /// writers than 4 did, and 8 fewer still (BENCHMARKS.md).
    pub pg_lanes: usize,
    /// Embedded store: WAL pages (4 KiB each) past which the writer finishes
    /// the checkpoint itself between two batches, so that the WAL starts
    /// over even under a load that never pauses.
    pub wal_catch_up_pages: u32,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            lease_ttl: Duration::from_secs(10),
            queue_capacity: 1000,
            max_recoveries: 3,
            max_connections: 16,
            pg_lanes: 2,
            wal_catch_up_pages: writer::WAL_CATCH_UP_PAGES,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// Row locking: SQLite has one writer, so a plain read is already exclusive.
    fn for_update(self) -> &'static str {
        match self {
            Self::Sqlite => "",
            Self::Postgres => " FOR UPDATE",
        }
    }
}

enum Exec {
    Sqlite(mpsc::Sender<Box<dyn Job>>),
    Postgres(AnyPool, Lanes),
}

/// The SQL store. Cheap to share behind an `Arc`.
pub struct SqlStore {
    dialect: Dialect,
    read: AnyPool,
    exec: Exec,
    cfg: Arc<StoreConfig>,
    clock: Arc<Clock>,
    /// How often each backstop fired, by constraint.
    breaches: Arc<std::sync::Mutex<std::collections::BTreeMap<String, u64>>>,
    stats: crate::CommitStats,
    // Held for the store's lifetime: the embedded store is owned by one process.
    _lock: Option<std::fs::File>,
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The unique indexes two concurrent first uses of one idempotency key
/// collide on: the loser's retry finds the winner's row. Every other unique
/// index is a backstop that the store's transactions (the session row
/// locked) never trip.
const IDEMPOTENCY_INDEXES: [&str; 2] = ["entries_idempotency", "sessions_owner_idempotency"];

/// The constraint a PostgreSQL unique violation (23505) names.
fn pg_unique_violation(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(db) if db.code().as_deref() == Some("23505") => {
            Some(db.constraint().unwrap_or("unknown").to_owned())
        }
        _ => None,
    }
}

fn breach(constraint: String, detail: String) -> StoreError {
    StoreError::InvariantBreach { constraint, detail }
}

fn classify(e: sqlx::Error) -> StoreError {
    if let Some(constraint) = pg_unique_violation(&e) {
        return breach(constraint, e.to_string());
    }
    match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_) => StoreError::Unavailable(e.to_string()),
        // The server shutting down, or one of the waits this store sets
        // (`statement_timeout`, `lock_timeout`, the idle transaction
        // timeout) running out: the database cannot answer in time, which a
        // client may retry (503), not a fault of the request (500).
        sqlx::Error::Database(db)
            if matches!(
                db.code().as_deref(),
                Some("57P01" | "57014" | "55P03" | "25P03")
            ) || db.code().is_some_and(|c| c.starts_with("08")) =>
        {
            StoreError::Unavailable(e.to_string())
        }
        _ => StoreError::Internal(e.to_string()),
    }
}

/// Whether PostgreSQL asks for the transaction to be tried again: a
/// serialization failure, a deadlock, or a unique violation of an
/// idempotency index from a concurrent insert of the same key (the retry
/// then finds the winner's row). Any other unique violation is a breach.
pub(crate) fn retryable(e: &sqlx::Error) -> bool {
    if let Some(constraint) = pg_unique_violation(e) {
        return IDEMPOTENCY_INDEXES.contains(&constraint.as_str());
    }
    matches!(e, sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("40001" | "40P01")))
}

/// The waits a PostgreSQL connection allows, from the lease's length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PgTimeouts {
    pub statement: Duration,
    pub acquire: Duration,
    pub idle_in_transaction: Duration,
}

/// A third of the lease for a statement, a lock or a connection from the
/// pool, half for a transaction left idle: all end before the lease does.
pub fn pg_timeouts(lease: Duration) -> PgTimeouts {
    let floor = Duration::from_millis(100);
    PgTimeouts {
        statement: (lease / 3).max(floor),
        acquire: (lease / 3).max(floor),
        idle_in_transaction: (lease / 2).max(floor),
    }
}

/// Connects to PostgreSQL once, within `patience`, and names what went
/// wrong if it cannot: an unknown host, a refused connection, no answer,
/// credentials refused, a missing database. Messages never hold the URL
/// (its password); they name host, port, user and database.
async fn pg_probe(url: &str, patience: Duration) -> Result<()> {
    use sqlx::postgres::{PgConnectOptions, PgConnection};
    let opts: PgConnectOptions = url.parse().map_err(|e: sqlx::Error| {
        StoreError::Unavailable(format!("reading the PostgreSQL URL: {e}"))
    })?;
    let host = opts.get_host().to_owned();
    let port = opts.get_port();
    let user = opts.get_username().to_owned();
    let database = opts.get_database().unwrap_or(&user).to_owned();
    let at = format!("{host}:{port}");
    let ms = patience.as_millis();
    // A host starting with `/` is a Unix socket directory: nothing to resolve.
    if !host.starts_with('/') {
        match tokio::time::timeout(patience, tokio::net::lookup_host((host.as_str(), port))).await {
            Err(_) => {
                return Err(StoreError::Unavailable(format!(
                    "resolving the PostgreSQL host {host:?} took more than {ms} ms"
                )))
            }
            Ok(Err(e)) => {
                return Err(StoreError::Unavailable(format!(
                    "unknown PostgreSQL host {host:?}: {e}"
                )))
            }
            Ok(Ok(_)) => {}
        }
    }
    match tokio::time::timeout(patience, PgConnection::connect_with(&opts)).await {
        Err(_) => Err(StoreError::Unavailable(format!(
            "PostgreSQL at {at} did not answer within {ms} ms"
        ))),
        Ok(Ok(conn)) => {
            if let Err(e) = conn.close().await {
                tracing::debug!(error = %e, "closing the probing connection");
            }
            Ok(())
        }
        Ok(Err(e)) => Err(StoreError::Unavailable(match &e {
            sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
                format!("connection refused by {at}: is PostgreSQL running there?")
            }
            sqlx::Error::Io(io) => format!("cannot reach PostgreSQL at {at}: {io}"),
            sqlx::Error::Database(db) => match db.code().as_deref() {
                Some("28P01") => format!(
                    "PostgreSQL at {at} refused the credentials of user {user:?} (password authentication failed)"
                ),
                Some("28000") => {
                    format!("PostgreSQL at {at} refused user {user:?}: {}", db.message())
                }
                Some("3D000") => {
                    format!("database {database:?} does not exist on PostgreSQL at {at}")
                }
                _ => format!("PostgreSQL at {at} refused the connection: {}", db.message()),
            },
            other => format!("connecting to PostgreSQL at {at}: {other}"),
        })),
    }
}

impl PgTimeouts {
    /// The statements that set these waits on a PostgreSQL connection: a
    /// statement and a lock wait end after `statement`, a transaction left
    /// idle is ended by the server after `idle_in_transaction`.
    pub fn settings(&self) -> String {
        self.statements().join("; ")
    }

    /// [`PgTimeouts::settings`], one statement at a time.
    pub fn statements(&self) -> [String; 3] {
        [
            format!("SET statement_timeout = {}", self.statement.as_millis()),
            format!("SET lock_timeout = {}", self.statement.as_millis()),
            format!(
                "SET idle_in_transaction_session_timeout = {}",
                self.idle_in_transaction.as_millis()
            ),
        ]
    }
}

/// How long a health check waits for the embedded writer.
const WRITER_PATIENCE: Duration = Duration::from_secs(5);

/// How many times a PostgreSQL write transaction is tried.
const PG_TRIES: u32 = 20;

/// What a PostgreSQL write transaction's failure on try `attempt` comes to:
/// a pause before the next try, or the caller's error. A conflict that
/// outlasts every try is contention, not a fault: `Unavailable`, which
/// callers may retry, never `Internal`.
fn after_failure(f: Fail, attempt: u32) -> std::result::Result<Duration, StoreError> {
    match f {
        Fail::Db(e) if retryable(&e) => {
            if attempt < PG_TRIES {
                Ok(Duration::from_millis(fastrand::u64(
                    1..=(5 * u64::from(attempt)),
                )))
            } else {
                Err(StoreError::Unavailable(format!(
                    "the write still conflicted after {attempt} tries: {e}"
                )))
            }
        }
        f => Err(unfail(f)),
    }
}

/// The constraint an SQLite unique violation names, spelled as PostgreSQL
/// names it (SQLite reports the columns, not the index).
fn lite_unique_violation(e: &rusqlite::Error) -> Option<String> {
    use rusqlite::ffi;
    let rusqlite::Error::SqliteFailure(f, message) = e else {
        return None;
    };
    if !matches!(
        f.extended_code,
        ffi::SQLITE_CONSTRAINT_UNIQUE | ffi::SQLITE_CONSTRAINT_PRIMARYKEY
    ) {
        return None;
    }
    let columns = message
        .as_deref()
        .and_then(|m| m.strip_prefix("UNIQUE constraint failed: "))
        .unwrap_or("unknown");
    let name = match columns {
        "entries.session_id, entries.seq" => "entries_pkey",
        "entries.session_id, entries.idempotency_key" => "entries_idempotency",
        "sessions.id" => "sessions_pkey",
        "sessions.owner, sessions.idempotency_key" => "sessions_owner_idempotency",
        "turns.id" => "turns_pkey",
        "turns.session_id" => "turns_one_active",
        "permission_requests.session_id, permission_requests.request_id" => {
            "permission_requests_pkey"
        }
        other => other,
    };
    Some(name.to_owned())
}

fn classify_lite(e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode as C;
    if let Some(constraint) = lite_unique_violation(&e) {
        return breach(constraint, e.to_string());
    }
    match e.sqlite_error_code() {
        Some(
            C::DatabaseBusy
            | C::DatabaseLocked
            | C::SystemIoFailure
            | C::DiskFull
            | C::CannotOpen
            | C::ReadOnly,
        ) => StoreError::Unavailable(e.to_string()),
        _ => StoreError::Internal(e.to_string()),
    }
}

pub(crate) fn unfail(f: Fail) -> StoreError {
    match f {
        Fail::Store(e) => e,
        Fail::Db(e) => classify(e),
        Fail::Lite(e) => classify_lite(e),
    }
}

impl SqlStore {
    /// Opens (creating if needed) the embedded store at `path`, taking an
    /// exclusive lock on `PATH.lock` for the life of the store.
    pub async fn open_sqlite(path: &Path, cfg: StoreConfig) -> Result<Self> {
        let lock_path = {
            let mut p = path.as_os_str().to_owned();
            p.push(".lock");
            std::path::PathBuf::from(p)
        };
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| StoreError::Internal(format!("opening {}: {e}", lock_path.display())))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Internal(format!(
                    "{} is in use by another baton process (lock held on {})",
                    path.display(),
                    lock_path.display()
                )))
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(StoreError::Internal(format!(
                    "locking {}: {e}",
                    lock_path.display()
                )))
            }
        }
        sqlx::any::install_default_drivers();
        let url = format!("sqlite://{}?mode=rwc", path.display());
        let mut conn = AnyConnection::connect(&url)
            .await
            .map_err(|e| StoreError::Internal(format!("opening {}: {e}", path.display())))?;
        sqlx::raw_sql(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA busy_timeout = 10000;",
        )
        .execute(&mut conn)
        .await
        .map_err(|e| StoreError::Internal(format!("configuring {}: {e}", path.display())))?;
        MIGRATOR
            .run(&mut conn)
            .await
            .map_err(|e| StoreError::Internal(format!("migrating {}: {e}", path.display())))?;
        let read = AnyPoolOptions::new()
            .max_connections(4)
            .connect(&url)
            .await
            .map_err(|e| {
                StoreError::Internal(format!("opening readers on {}: {e}", path.display()))
            })?;
        // Migrations ran on sqlx's connection (they are shared with
        // PostgreSQL); the writer has its own synchronous one.
        if let Err(e) = conn.close().await {
            tracing::warn!(error = %e, "closing the migration connection");
        }
        let lite = open_writer(path)?;
        let ckpt = open_checkpointer(path)?;
        let clock = Arc::new(Clock::after(latest_stamp(&lite).map_err(|e| {
            StoreError::Internal(format!("reading the clock of {}: {e}", path.display()))
        })?));
        let (tx, rx) = mpsc::channel(4 * writer::MAX_BATCH);
        let (committed, commits) = std::sync::mpsc::sync_channel(1);
        let writer_clock = clock.clone();
        let stats = crate::CommitStats::default();
        let writer_stats = stats.clone();
        let catch_up = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let asks = catch_up.clone();
        let past = i64::from(cfg.wal_catch_up_pages);
        let thread = |name: &str| std::thread::Builder::new().name(name.into());
        thread("baton-checkpoint")
            .spawn(move || writer::checkpointer(ckpt, commits, asks, past))
            .map_err(|e| StoreError::Internal(format!("starting the checkpoint thread: {e}")))?;
        thread("baton-writer")
            .spawn(move || writer::run(lite, rx, writer_clock, committed, catch_up, writer_stats))
            .map_err(|e| {
                StoreError::Internal(format!("starting the store's writer thread: {e}"))
            })?;
        Ok(Self {
            dialect: Dialect::Sqlite,
            read,
            exec: Exec::Sqlite(tx),
            cfg: Arc::new(cfg),
            clock,
            breaches: Arc::default(),
            stats,
            _lock: Some(lock),
        })
    }

    /// Connects to PostgreSQL at `url` and migrates it (migrations take an
    /// advisory lock, so several nodes may start at once).
    pub async fn open_postgres(url: &str, cfg: StoreConfig) -> Result<Self> {
        sqlx::any::install_default_drivers();
        // Every wait on the database ends below the lease, so a database
        // that stops answering (not refusing) makes a worker give up while
        // its lease is still its own; a lock or a transaction a vanished
        // client left behind is released by the server.
        let t = pg_timeouts(cfg.lease_ttl);
        // One plain connection first: the pool retries a refused connection
        // until its timeout and then says only "pool timed out".
        pg_probe(url, t.acquire).await?;
        let set = t.settings();
        let pool = AnyPoolOptions::new()
            .max_connections(cfg.max_connections)
            .acquire_timeout(t.acquire)
            // No ping per acquire: a broken connection fails its statement
            // and the pool replaces it.
            .test_before_acquire(false)
            .after_connect(move |conn, _meta| {
                let set = set.clone();
                Box::pin(async move {
                    sqlx::Executor::execute(conn, sqlx::raw_sql(&set)).await?;
                    Ok(())
                })
            })
            .connect(url)
            .await
            .map_err(|e| StoreError::Unavailable(format!("connecting to PostgreSQL: {e}")))?;
        // Migrations run on a connection of their own, without the pool's
        // timeouts: they wait on an advisory lock other starting nodes may
        // hold, and a schema change may take longer than a third of a lease.
        let migrating = AnyPoolOptions::new()
            .max_connections(1)
            .connect(url)
            .await
            .map_err(|e| StoreError::Unavailable(format!("connecting to PostgreSQL: {e}")))?;
        let migrated = MIGRATOR
            .run(&migrating)
            .await
            .map_err(|e| StoreError::Internal(format!("migrating PostgreSQL: {e}")));
        migrating.close().await;
        migrated?;
        let stats = crate::CommitStats::default();
        let lanes = Lanes::start(&pool, cfg.pg_lanes, stats.clone(), cfg.clone());
        Ok(Self {
            dialect: Dialect::Postgres,
            read: pool.clone(),
            exec: Exec::Postgres(pool.clone(), lanes),
            cfg: Arc::new(cfg),
            clock: Arc::new(Clock::default()),
            breaches: Arc::default(),
            stats,
            _lock: None,
        })
    }

    /// Opens `target`: a `postgres://` URL, or a path to the embedded store.
    pub async fn open(target: &str, cfg: StoreConfig) -> Result<Self> {
        if target.starts_with("postgres://") || target.starts_with("postgresql://") {
            Self::open_postgres(target, cfg).await
        } else {
            Self::open_sqlite(Path::new(target), cfg).await
        }
    }

    /// Whether this store is the embedded (single-process) one.
    pub fn is_embedded(&self) -> bool {
        self.dialect == Dialect::Sqlite
    }

    /// The store's clock, in microseconds.
    pub async fn now(&self) -> Result<i64> {
        match self.dialect {
            Dialect::Sqlite => Ok(self.clock.now()),
            Dialect::Postgres => pg_now(&mut self.reader().await?).await.map_err(unfail),
        }
    }

    /// A pooled connection for reads.
    /// The session ids a sweep query selects, read on a reader connection
    /// that is given back before the sweep writes.
    async fn session_ids(&self, sql: &str, args: &[Val]) -> Result<Vec<SessionId>> {
        let mut c = self.reader().await?;
        let ids = async {
            c.fetch_all(sql, args)
                .await?
                .iter()
                .map(Row::first::<String>)
                .collect::<R<Vec<String>>>()
        };
        let ids = ids.await.map_err(unfail)?;
        ids.iter()
            .map(|id| {
                SessionId::parse(id)
                    .map_err(|_| StoreError::Internal(format!("corrupt session id {id:?}")))
            })
            .collect()
    }

    async fn reader(&self) -> Result<Conn> {
        Ok(Conn::Pool(self.read.acquire().await.map_err(classify)?))
    }

    /// Posts `req`: on PostgreSQL decided with the other posts of a lane's
    /// batch, else (and when the batch hands it back) in a write of its own.
    async fn post(&self, req: PostMessage, run_here: bool) -> Result<Posted> {
        let req = Arc::new(req);
        if let Exec::Postgres(_, lanes) = &self.exec {
            let waiting = WaitingPost {
                req: req.clone(),
                run_here,
            };
            if let pg_writer::Reply::Done(result) = lanes.post(waiting).await {
                return self.watch(result);
            }
        }
        let (d, cfg, id) = (self.dialect, self.cfg.clone(), req.session_id);
        self.write(Some(id), move |c: &mut Conn, now: i64| {
            let (cfg, req) = (cfg.clone(), req.clone());
            Box::pin(async move { op_post(c, d, now, &cfg, &req, run_here).await })
        })
        .await
    }

    /// Logs and counts a backstop that fired; every other result passes.
    fn watch<T>(&self, result: Result<T>) -> Result<T> {
        if let Err(StoreError::InvariantBreach { constraint, detail }) = &result {
            tracing::error!(
                constraint,
                detail,
                "invariant breach: a schema backstop fired"
            );
            let mut counts = self.breaches.lock().unwrap_or_else(|p| p.into_inner());
            *counts.entry(constraint.clone()).or_default() += 1;
        }
        result
    }

    /// Runs `f` as one write transaction and returns its result once committed.
    ///
    /// `f` gets the transaction's time. On PostgreSQL, when the transaction
    /// writes session `lock`, that time is read once the session's row lock
    /// is held: a transaction that waited for the lock must not stamp its
    /// entries or turn times earlier than the one it waited for (the embedded
    /// store's single writer has a monotonic clock).
    async fn write<T, F>(&self, lock: Option<SessionId>, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: for<'c> Fn(&'c mut Conn, i64) -> BoxFuture<'c, R<T>> + Send + Sync + 'static,
    {
        let result = self.run_write(lock, f).await;
        self.watch(result)
    }

    async fn run_write<T, F>(&self, lock: Option<SessionId>, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: for<'c> Fn(&'c mut Conn, i64) -> BoxFuture<'c, R<T>> + Send + Sync + 'static,
    {
        match &self.exec {
            Exec::Sqlite(jobs) => {
                let (tx, rx) = oneshot::channel::<Result<T>>();
                let job: Box<dyn Job> = Box::new(WriteJob {
                    body: f,
                    result: None,
                    reply: tx,
                });
                jobs.send(job)
                    .await
                    .map_err(|_| StoreError::Unavailable("the store is shut down".into()))?;
                rx.await.map_err(|_| {
                    StoreError::Unavailable(
                        "the write was not committed: its transaction failed".into(),
                    )
                })?
            }
            Exec::Postgres(pool, lanes) => {
                let f: pg_writer::Body<T> = Arc::new(f);
                if let Some(id) = lock {
                    match lanes.write(id, f.clone()).await {
                        pg_writer::Reply::Done(result) => return result,
                        pg_writer::Reply::Alone => {}
                    }
                }
                let mut attempt = 0u32;
                loop {
                    attempt += 1;
                    let result: R<T> = async {
                        let mut c = Conn::Tx(pool.begin().await?);
                        let now = match lock {
                            Some(id) => pg_now_locked(&mut c, id).await?,
                            None => pg_now(&mut c).await?,
                        };
                        let v = f(&mut c, now).await?;
                        if let Conn::Tx(tx) = c {
                            let committing = std::time::Instant::now();
                            tx.commit().await?;
                            self.stats.observe(committing.elapsed().as_secs_f64(), 1);
                        }
                        Ok(v)
                    }
                    .await;
                    match result {
                        Ok(v) => return Ok(v),
                        Err(e) => match after_failure(e, attempt) {
                            Ok(pause) => tokio::time::sleep(pause).await,
                            Err(e) => return Err(e),
                        },
                    }
                }
            }
        }
    }
}

/// A transaction body queued for the embedded store's writer, with the
/// result of its last run and the caller waiting for it.
struct WriteJob<T, F> {
    body: F,
    result: Option<Result<T>>,
    reply: oneshot::Sender<Result<T>>,
}

impl<T, F> Job for WriteJob<T, F>
where
    T: Send + 'static,
    F: for<'c> Fn(&'c mut Conn, i64) -> BoxFuture<'c, R<T>> + Send + Sync + 'static,
{
    fn run(&mut self, conn: &mut Conn, now: i64) -> Option<bool> {
        // A replayed job's earlier result is void, whatever this run does.
        self.result = None;
        let result = writer::complete((self.body)(conn, now))?.map_err(unfail);
        let ok = result.is_ok();
        self.result = Some(result);
        Some(ok)
    }

    fn finish(self: Box<Self>, commit_error: Option<String>) {
        let result = match (self.result, commit_error) {
            // A job that failed wrote nothing: its own error is the answer.
            (Some(Err(e)), _) => Err(e),
            (Some(Ok(v)), None) => Ok(v),
            (None, None) => Err(StoreError::Unavailable(
                "the write was refused by the store's writer".into(),
            )),
            (_, Some(e)) => Err(StoreError::Unavailable(format!("commit failed: {e}"))),
        };
        let _ = self.reply.send(result);
    }
}

/// The embedded store's writer connection: WAL, `synchronous=FULL`, a page
/// cache that holds the hot part of a large log (64 MiB; the default 2 MiB
/// makes every append re-read index pages), no automatic checkpoints (the
/// checkpoint thread does them), and room in the statement cache for every
/// statement the store runs.
fn open_writer(path: &Path) -> Result<rusqlite::Connection> {
    let c = open_lite(
        path,
        "the writer",
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA busy_timeout = 10000; \
         PRAGMA cache_size = -65536; PRAGMA wal_autocheckpoint = 0;",
    )?;
    c.set_prepared_statement_cache_capacity(64);
    Ok(c)
}

/// The latest time the file holds: the newest rows' stamps (rows are
/// stamped in insertion order, so the last rowid holds the latest; a turn's
/// end is stamped on its `turn_ended` entry). Two index lookups.
fn latest_stamp(c: &rusqlite::Connection) -> rusqlite::Result<i64> {
    use rusqlite::OptionalExtension;
    let mut latest = 0;
    for sql in [
        "SELECT created_at FROM entries ORDER BY rowid DESC LIMIT 1",
        "SELECT created_at FROM sessions ORDER BY rowid DESC LIMIT 1",
    ] {
        let stamp: Option<i64> = c.query_row(sql, [], |r| r.get(0)).optional()?;
        latest = latest.max(stamp.unwrap_or(0));
    }
    Ok(latest)
}

/// The checkpoint thread's connection (`synchronous=FULL`: a checkpoint
/// syncs the database file before the WAL may be reused).
fn open_checkpointer(path: &Path) -> Result<rusqlite::Connection> {
    open_lite(
        path,
        "the checkpointer",
        "PRAGMA synchronous = FULL; PRAGMA busy_timeout = 10000;",
    )
}

fn open_lite(path: &Path, what: &str, pragmas: &str) -> Result<rusqlite::Connection> {
    let fail = |e: rusqlite::Error| {
        StoreError::Internal(format!("opening {what} on {}: {e}", path.display()))
    };
    let c = rusqlite::Connection::open(path).map_err(fail)?;
    c.execute_batch(pragmas).map_err(fail)?;
    Ok(c)
}

/// The store's clock on PostgreSQL, in µs.
macro_rules! pg_clock {
    () => {
        "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000 AS BIGINT)"
    };
}
const PG_CLOCK: &str = pg_clock!();
const PG_NOW: &str = concat!("SELECT ", pg_clock!());

async fn pg_now(c: &mut Conn) -> R<i64> {
    c.scalar(PG_NOW, &[]).await
}

/// Locks session `id`'s row, then reads the clock, in one round trip: the
/// subquery's row lock is taken (waiting for its holder to commit) before
/// the outer query projects its row. No session, no lock: the plain clock.
async fn pg_now_locked(c: &mut Conn, id: SessionId) -> R<i64> {
    let locked = c
        .fetch_optional(
            "SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000 AS BIGINT) \
             FROM (SELECT id FROM sessions WHERE id = $1 FOR UPDATE) AS locked",
            &args![id.to_string()],
        )
        .await?;
    match locked {
        Some(row) => row.first::<i64>(),
        None => pg_now(c).await,
    }
}

// ---------------------------------------------------------------------------
// Rows

const SESSION_COLS: &str = "id, owner, agent, policy, metadata, created_at, last_seq, consumed_seq, \
     active_turn, lease_owner, lease_epoch, lease_expires_at, idempotency_key, request_fingerprint, agent_session, \
     waiting_count, last_gather_seq, after_gather_count, permission, open_permissions, \
     last_steer_seq, debounce_ms, pending_first, pending_until";

const ENTRY_COLS: &str =
    "session_id, seq, kind, role, turn_id, content, status, reason, input_from, input_to, tool, permission, created_at";

const TURN_COLS: &str =
    "id, session_id, status, input_from, input_to, started_at, ended_at, reason";

#[derive(Clone, Debug)]
pub(crate) struct SessionRow {
    pub(crate) id: SessionId,
    owner: String,
    agent: String,
    metadata: String,
    created_at: i64,
    /// What the session's decisions read and change ([`baton_core::flow`]).
    flow: SessionState,
    lease_owner: Option<String>,
    lease_epoch: i64,
    lease_expires_at: Option<i64>,
    fingerprint: Option<String>,
    agent_session: Option<String>,
    /// Set at creation only.
    permission: Option<PermissionPolicy>,
    /// Pending permission requests; written by [`track_permission`] alone.
    open_permissions: i64,
}

fn corrupt(what: &str, value: &str) -> Fail {
    Fail::Store(StoreError::Internal(format!(
        "corrupt {what} in the store: {value:?}"
    )))
}

fn parse_turn_id(s: Option<String>) -> R<Option<TurnId>> {
    s.map(|s| TurnId::parse(&s).map_err(|_| corrupt("turn id", &s)))
        .transpose()
}

fn session_row(r: &Row) -> R<SessionRow> {
    let id: String = r.get("id")?;
    let policy: String = r.get("policy")?;
    let permission: Option<String> = r.get("permission")?;
    Ok(SessionRow {
        id: SessionId::parse(&id).map_err(|_| corrupt("session id", &id))?,
        owner: r.get("owner")?,
        agent: r.get("agent")?,
        metadata: r.get("metadata")?,
        created_at: r.get("created_at")?,
        flow: SessionState {
            last_seq: r.get::<i64>("last_seq")?.max(0) as Seq,
            cursor: r.get::<i64>("consumed_seq")?.max(0) as Seq,
            active: parse_turn_id(r.get("active_turn")?)?,
            // Read when a decision needs it: a cancel is asked for on the
            // turn's row.
            cancelling: None,
            queue: QueueSummary {
                waiting: r.get::<i64>("waiting_count")?.max(0) as u64,
                last_gather: r.get::<Option<i64>>("last_gather_seq")?.map(|s| s as Seq),
                after_gather: r.get::<i64>("after_gather_count")?.max(0) as u64,
                last_steer: r.get::<Option<i64>>("last_steer_seq")?.map(|s| s as Seq),
            },
            policy: policy.parse().map_err(|_| corrupt("policy", &policy))?,
            debounce_ms: r.get("debounce_ms")?,
            pending_first: r.get("pending_first")?,
            pending_until: r.get("pending_until")?,
        },
        lease_owner: r.get("lease_owner")?,
        lease_epoch: r.get("lease_epoch")?,
        lease_expires_at: r.get("lease_expires_at")?,
        fingerprint: r.get("request_fingerprint")?,
        agent_session: r.get("agent_session")?,
        permission: permission
            .map(|p| p.parse().map_err(|_| corrupt("permission policy", &p)))
            .transpose()?,
        open_permissions: r.get("open_permissions")?,
    })
}

fn entry_row(r: &Row) -> R<Entry> {
    let sid: String = r.get("session_id")?;
    let kind: String = r.get("kind")?;
    let role: Option<String> = r.get("role")?;
    let status: Option<String> = r.get("status")?;
    let from: Option<i64> = r.get("input_from")?;
    let to: Option<i64> = r.get("input_to")?;
    let tool: Option<String> = r.get("tool")?;
    let permission: Option<String> = r.get("permission")?;
    Ok(Entry {
        seq: r.get::<i64>("seq")? as Seq,
        session_id: SessionId::parse(&sid).map_err(|_| corrupt("session id", &sid))?,
        kind: EntryType::parse(&kind).ok_or_else(|| corrupt("entry kind", &kind))?,
        role: role
            .map(|s| Role::parse(&s).ok_or_else(|| corrupt("role", &s)))
            .transpose()?,
        turn_id: parse_turn_id(r.get("turn_id")?)?,
        content: r.get("content")?,
        status: status
            .map(|s| TurnStatus::parse(&s).ok_or_else(|| corrupt("turn status", &s)))
            .transpose()?,
        reason: r.get("reason")?,
        input: from.zip(to).map(|(f, t)| InputRange {
            from: f as Seq,
            to: t as Seq,
        }),
        tool: tool
            .map(|s| serde_json::from_str::<ToolInfo>(&s).map_err(|_| corrupt("tool", &s)))
            .transpose()?,
        permission: permission
            .map(|s| {
                serde_json::from_str::<PermissionInfo>(&s).map_err(|_| corrupt("permission", &s))
            })
            .transpose()?,
        created_at: Timestamp(r.get("created_at")?),
    })
}

fn turn_row(r: &Row) -> R<Turn> {
    let id: String = r.get("id")?;
    let sid: String = r.get("session_id")?;
    let status: String = r.get("status")?;
    Ok(Turn {
        id: TurnId::parse(&id).map_err(|_| corrupt("turn id", &id))?,
        session_id: SessionId::parse(&sid).map_err(|_| corrupt("session id", &sid))?,
        status: TurnStatus::parse(&status).ok_or_else(|| corrupt("turn status", &status))?,
        input: InputRange {
            from: r.get::<i64>("input_from")? as Seq,
            to: r.get::<i64>("input_to")? as Seq,
        },
        started_at: Timestamp(r.get("started_at")?),
        ended_at: r.get::<Option<i64>>("ended_at")?.map(Timestamp),
        reason: r.get("reason")?,
    })
}

fn session_view(s: &SessionRow) -> R<Session> {
    Ok(Session {
        id: s.id,
        owner: s.owner.clone(),
        agent: s.agent.clone(),
        policy: s.flow.policy,
        status: if s.flow.active.is_some() {
            SessionStatus::Running
        } else {
            SessionStatus::Idle
        },
        turn_id: s.flow.active,
        last_seq: s.flow.last_seq as Seq,
        queued: s.flow.queue.waiting,
        debounce_ms: s.flow.debounce_ms.max(0) as u64,
        pending_until: s.flow.pending_until.map(Timestamp),
        created_at: Timestamp(s.created_at),
        metadata: serde_json::from_str(&s.metadata)
            .map_err(|_| corrupt("metadata", &s.metadata))?,
        permission: s.permission,
        pending_permissions: Vec::new(),
    })
}

// ---------------------------------------------------------------------------
// Statements shared by the operations

async fn lock_session(c: &mut Conn, d: Dialect, id: SessionId) -> R<Option<SessionRow>> {
    fetch_session(c, id, d.for_update()).await
}

/// Reads a session row; `suffix` is empty for a plain read.
async fn fetch_session(c: &mut Conn, id: SessionId, suffix: &str) -> R<Option<SessionRow>> {
    if let Some(s) = c.remembered(id) {
        let mut s = s.clone();
        // Not kept between writes: a cancel changes the turn's row only.
        s.flow.cancelling = None;
        return Ok(Some(s));
    }
    let sql = format!("SELECT {SESSION_COLS} FROM sessions WHERE id = $1{suffix}");
    let row = c.fetch_optional(&sql, &args![id.to_string()]).await?;
    let s = row.as_ref().map(session_row).transpose()?;
    if let Some(s) = &s {
        c.remember(s);
    }
    Ok(s)
}

async fn lock_owned(c: &mut Conn, d: Dialect, owner: &str, id: SessionId) -> R<SessionRow> {
    match lock_session(c, d, id).await? {
        Some(s) if s.owner == owner => Ok(s),
        _ => Err(StoreError::NotFound.into()),
    }
}

/// Locks the session for a write of `lease`'s holder; anyone else is stale.
async fn lock_fenced(c: &mut Conn, d: Dialect, lease: &Lease) -> R<SessionRow> {
    match lock_session(c, d, lease.session_id).await? {
        Some(s)
            if s.lease_owner.as_deref() == Some(lease.owner.as_str())
                && s.lease_epoch == lease.epoch =>
        {
            Ok(s)
        }
        _ => Err(StoreError::StaleEpoch { epoch: lease.epoch }.into()),
    }
}

/// Reads the session held under `lease` (outside a write: no lock); a
/// stale epoch if the lease is no longer this one.
async fn fetch_leased(c: &mut Conn, lease: &Lease) -> R<SessionRow> {
    match fetch_session(c, lease.session_id, "").await? {
        Some(s)
            if s.lease_owner.as_deref() == Some(lease.owner.as_str())
                && s.lease_epoch == lease.epoch =>
        {
            Ok(s)
        }
        _ => Err(StoreError::StaleEpoch { epoch: lease.epoch }.into()),
    }
}

/// How many values [`saved_columns`] gives.
const SAVED_COLUMNS: usize = 14;

/// The id and every column a write may change of session row `s`, in the
/// order both session writes bind them: `id, last_seq, consumed_seq,
/// active_turn, lease_owner, lease_epoch, lease_expires_at, agent_session,
/// waiting_count, last_gather_seq, after_gather_count, last_steer_seq,
/// pending_first, pending_until`.
fn saved_columns(s: &SessionRow) -> [Val; SAVED_COLUMNS] {
    args![
        s.id.to_string(),
        s.flow.last_seq as i64,
        s.flow.cursor as i64,
        s.flow.active.map(|t| t.to_string()),
        s.lease_owner.clone(),
        s.lease_epoch,
        s.lease_expires_at,
        s.agent_session.clone(),
        s.flow.queue.waiting as i64,
        s.flow.queue.last_gather.map(|g| g as i64),
        s.flow.queue.after_gather as i64,
        s.flow.queue.last_steer.map(|g| g as i64),
        s.flow.pending_first,
        s.flow.pending_until
    ]
}

async fn save_session(c: &mut Conn, s: &SessionRow) -> R<()> {
    if c.defer_save(s) {
        return Ok(());
    }
    // Most posts only move the log's counters (a message queued behind a
    // running turn). When the writer remembers the row, it knows that, and
    // writes just those columns: none is indexed, so no index entry moves.
    let counters_only = c.remembered(s.id).is_some_and(|old| {
        old.flow.active == s.flow.active
            && old.lease_owner == s.lease_owner
            && old.lease_epoch == s.lease_epoch
            && old.lease_expires_at == s.lease_expires_at
            && old.agent_session == s.agent_session
            && old.flow.pending_until == s.flow.pending_until
    });
    let n = if counters_only {
        c.execute(
            "UPDATE sessions SET last_seq = $2, consumed_seq = $3, waiting_count = $4, \
             last_gather_seq = $5, after_gather_count = $6, last_steer_seq = $7, pending_first = $8 \
             WHERE id = $1",
            &args![
                s.id.to_string(),
                s.flow.last_seq as i64,
                s.flow.cursor as i64,
                s.flow.queue.waiting as i64,
                s.flow.queue.last_gather.map(|g| g as i64),
                s.flow.queue.after_gather as i64,
                s.flow.queue.last_steer.map(|g| g as i64),
                s.flow.pending_first
            ],
        )
        .await?
    } else {
        c.execute(
            "UPDATE sessions SET last_seq = $2, consumed_seq = $3, active_turn = $4, lease_owner = $5, \
             lease_epoch = $6, lease_expires_at = $7, agent_session = $8, waiting_count = $9, \
             last_gather_seq = $10, after_gather_count = $11, last_steer_seq = $12, pending_first = $13, \
             pending_until = $14 WHERE id = $1",
            &saved_columns(s),
        )
        .await?
    };
    if n == 1 {
        c.remember(s);
    } else {
        c.forget(s.id);
    }
    Ok(())
}

/// Locks the rows of sessions `ids` (sorted: every batch takes its locks in
/// id order, so two nodes batching the same sessions wait for each other
/// instead of deadlocking) for a lane's batch, which remembers them; the
/// time read once they are all locked, so no write is stamped earlier than
/// the commit it waited for.
///
/// The clock is read by the same statement: the locking query is a
/// subquery (PostgreSQL never flattens one that locks), so the outer
/// projection reads the clock for each row after that row's lock is held,
/// and the last row's reading follows every lock.
pub(crate) async fn lock_batch(c: &mut Conn, ids: &[String]) -> R<i64> {
    let placeholders: Vec<String> = (1..=ids.len()).map(|i| format!("${i}")).collect();
    let sql = format!(
        "SELECT s.*, {PG_CLOCK} AS locked_at FROM (SELECT {SESSION_COLS} FROM sessions \
         WHERE id IN ({}) ORDER BY id FOR UPDATE) AS s",
        placeholders.join(", ")
    );
    let args: Vec<Val> = ids.iter().map(Val::from).collect();
    let rows = c.fetch_all(&sql, &args).await?;
    let Conn::Batch(b) = c else {
        return Err(StoreError::Internal("locking a batch outside one".into()).into());
    };
    let mut now = None;
    for row in &rows {
        b.locked(session_row(row)?);
        now = now.max(Some(row.get::<i64>("locked_at")?));
    }
    match now {
        Some(now) => Ok(now),
        None => pg_now(c).await,
    }
}

/// Writes the session rows a lane's batch saved in memory, with one
/// statement.
pub(crate) async fn write_deferred_sessions(c: &mut Conn) -> R<()> {
    let Conn::Batch(b) = c else {
        return Ok(());
    };
    let mut args: Vec<Val> = Vec::new();
    let mut rows = Vec::new();
    for (i, s) in b.deferred().enumerate() {
        let at = i * SAVED_COLUMNS;
        let cells: Vec<String> = (1..=SAVED_COLUMNS)
            .map(|k| format!("${}", at + k))
            .collect();
        rows.push(format!("({})", cells.join(", ")));
        args.extend(saved_columns(s));
    }
    if rows.is_empty() {
        return Ok(());
    }
    let n = rows.len() as u64;
    b.written();
    let sql = format!(
        "UPDATE sessions AS s SET last_seq = v.last_seq, consumed_seq = v.consumed_seq, \
         active_turn = v.active_turn, lease_owner = v.lease_owner, lease_epoch = v.lease_epoch, \
         lease_expires_at = v.lease_expires_at, agent_session = v.agent_session, \
         waiting_count = v.waiting_count, last_gather_seq = v.last_gather_seq, \
         after_gather_count = v.after_gather_count, last_steer_seq = v.last_steer_seq, \
         pending_first = v.pending_first, pending_until = v.pending_until \
         FROM (VALUES {}) AS v(id, last_seq, consumed_seq, active_turn, lease_owner, lease_epoch, \
         lease_expires_at, agent_session, waiting_count, last_gather_seq, after_gather_count, \
         last_steer_seq, pending_first, pending_until) WHERE s.id = v.id",
        rows.join(", ")
    );
    let written = c.execute(&sql, &args).await?;
    if written != n {
        return Err(StoreError::Internal(format!(
            "writing {n} locked session rows changed {written}"
        ))
        .into());
    }
    Ok(())
}

/// Moves session `id`'s counter by `by` the way a write does (read the
/// row, change it, save it), for tests of the lanes; the new value.
#[cfg(test)]
pub(crate) async fn bump_last_seq(c: &mut Conn, id: SessionId, by: i64) -> R<i64> {
    let mut s = lock_session(c, Dialect::Postgres, id)
        .await?
        .ok_or(StoreError::NotFound)?;
    s.flow.last_seq = s.flow.last_seq.saturating_add_signed(by);
    save_session(c, &s).await?;
    Ok(s.flow.last_seq as i64)
}

/// Extra columns a user message carries.
struct UserMeta<'a> {
    policy: Policy,
    requested: Option<Policy>,
    disposition: &'a Disposition,
    key: Option<&'a str>,
}

/// Appends `e` at the next seq (I1: the counter lives in `s` and is saved by
/// the caller in the same transaction).
async fn append(
    c: &mut Conn,
    s: &mut SessionRow,
    now: i64,
    e: NewEntry,
    user: Option<UserMeta<'_>>,
) -> R<Entry> {
    let seq = s.flow.next_seq();
    put(c, s, now, seq, e, user).await
}

/// The `INSERT` of entries, without its `VALUES`: [`ENTRY_VALUES`] columns.
const ENTRY_INSERT: &str =
    "INSERT INTO entries (session_id, seq, kind, role, turn_id, content, status, \
     reason, input_from, input_to, tool, permission, policy, requested_policy, disposition, \
     idempotency_key, created_at)";

/// How many values [`entry_values`] gives.
const ENTRY_VALUES: usize = 17;

/// The values of entry `e` at `seq` of session `id`, in [`ENTRY_INSERT`]'s
/// order.
fn entry_values(
    id: SessionId,
    seq: Seq,
    e: &NewEntry,
    user: Option<&UserMeta<'_>>,
    now: i64,
) -> R<[Val; ENTRY_VALUES]> {
    let json = |what: &str, v: Result<String, serde_json::Error>| {
        v.map_err(|err| Fail::from(StoreError::Internal(format!("encoding {what}: {err}"))))
    };
    let tool = e
        .tool
        .as_ref()
        .map(|t| json("a tool call", serde_json::to_string(t)))
        .transpose()?;
    let permission = e
        .permission
        .as_ref()
        .map(|p| json("a permission", serde_json::to_string(p)))
        .transpose()?;
    let disposition = user
        .map(|u| json("a disposition", serde_json::to_string(u.disposition)))
        .transpose()?;
    Ok(args![
        id.to_string(),
        seq as i64,
        e.kind.as_str(),
        e.role.map(Role::as_str),
        e.turn_id.map(|t| t.to_string()),
        e.content.clone(),
        e.status.map(TurnStatus::as_str),
        e.reason.clone(),
        e.input.map(|i| i.from as i64),
        e.input.map(|i| i.to as i64),
        tool,
        permission,
        user.map(|u| u.policy.as_str()),
        user.and_then(|u| u.requested.map(Policy::as_str)),
        disposition,
        user.and_then(|u| u.key.map(str::to_owned)),
        now
    ])
}

/// Writes `e` at `seq`, which the session's procedure gave.
async fn put(
    c: &mut Conn,
    s: &mut SessionRow,
    now: i64,
    seq: Seq,
    e: NewEntry,
    user: Option<UserMeta<'_>>,
) -> R<Entry> {
    let values = entry_values(s.id, seq, &e, user.as_ref(), now)?;
    let sql = format!(
        "{ENTRY_INSERT} VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)"
    );
    c.execute(&sql, &values).await?;
    let entry = e.committed(s.id, seq, Timestamp(now));
    track_permission(c, s, &entry).await?;
    Ok(entry)
}

/// Keeps `permission_requests` in step with the log: a request entry opens
/// a pending row; a decision entry closes its request's row, which must be
/// pending (exactly once: a second decision for one request is refused).
async fn track_permission(c: &mut Conn, s: &mut SessionRow, e: &Entry) -> R<()> {
    let (Some(p), Some(turn)) = (&e.permission, e.turn_id) else {
        return Ok(());
    };
    let opened = match e.kind {
        EntryType::PermissionRequest => {
            let request = serde_json::to_string(p)
                .map_err(|err| StoreError::Internal(format!("encoding a permission: {err}")))?;
            c.execute(
                "INSERT INTO permission_requests (session_id, request_id, turn_id, request_seq, request, state) \
                 VALUES ($1, $2, $3, $4, $5, 'pending')",
                &args![
                    e.session_id.to_string(),
                    p.request_id.clone(),
                    turn.to_string(),
                    e.seq as i64,
                    request
                ],
            )
            .await?;
            1
        }
        EntryType::PermissionDecision => {
            let n = c
                .execute(
                    "UPDATE permission_requests SET state = $3, decision_seq = $4 \
                     WHERE session_id = $1 AND request_id = $2 AND state = 'pending'",
                    &args![
                        e.session_id.to_string(),
                        p.request_id.clone(),
                        PermissionState::of_decision(p).as_str(),
                        e.seq as i64
                    ],
                )
                .await?;
            if n != 1 {
                return Err(StoreError::Internal(format!(
                    "a decision for permission request {:?}, which is not pending",
                    p.request_id
                ))
                .into());
            }
            -1
        }
        _ => return Ok(()),
    };
    s.open_permissions += opened;
    c.execute(
        "UPDATE sessions SET open_permissions = $2 WHERE id = $1",
        &args![s.id.to_string(), s.open_permissions],
    )
    .await?;
    Ok(())
}

/// Closes `turn`'s pending permission requests (with `only`, that one) as
/// `cancelled` by `decided_by`: one decision entry each, in request order.
async fn close_pending(
    c: &mut Conn,
    s: &mut SessionRow,
    now: i64,
    turn: TurnId,
    only: Option<&str>,
    decided_by: &str,
    reason: &str,
) -> R<Vec<Entry>> {
    if s.open_permissions <= 0 {
        return Ok(Vec::new());
    }
    let rows = c
        .fetch_all(
            "SELECT request_id, request FROM permission_requests \
             WHERE session_id = $1 AND turn_id = $2 AND state = 'pending' ORDER BY request_seq",
            &args![s.id.to_string(), turn.to_string()],
        )
        .await?;
    let mut closed = Vec::new();
    for row in &rows {
        let id: String = row.get("request_id")?;
        if only.is_some_and(|o| o != id) {
            continue;
        }
        let raw: String = row.get("request")?;
        let request: PermissionInfo =
            serde_json::from_str(&raw).map_err(|_| corrupt("permission request", &raw))?;
        let mut e = NewEntry::permission_decision(turn, request.decision(None, decided_by));
        e.reason = Some(reason.to_owned());
        closed.push(append(c, s, now, e, None).await?);
    }
    Ok(closed)
}

/// A permission request of the session: its turn, what it asked, and its
/// decision if it has one.
async fn permission_request(
    c: &mut Conn,
    s: &SessionRow,
    request_id: &str,
) -> R<(TurnId, PermissionInfo, PermissionState, Option<Entry>)> {
    // No request id holds a NUL byte, and PostgreSQL refuses one in text.
    if request_id.contains('\0') {
        return Err(StoreError::PermissionNotFound {
            request_id: request_id.to_owned(),
        }
        .into());
    }
    let row = c
        .fetch_optional(
            "SELECT turn_id, request, state, decision_seq FROM permission_requests \
             WHERE session_id = $1 AND request_id = $2",
            &args![s.id.to_string(), request_id],
        )
        .await?
        .ok_or_else(|| StoreError::PermissionNotFound {
            request_id: request_id.to_owned(),
        })?;
    let turn = parse_turn_id(row.get("turn_id")?)?
        .ok_or_else(|| corrupt("permission request", request_id))?;
    let raw: String = row.get("request")?;
    let request: PermissionInfo =
        serde_json::from_str(&raw).map_err(|_| corrupt("permission request", &raw))?;
    let state: String = row.get("state")?;
    let state =
        PermissionState::parse(&state).ok_or_else(|| corrupt("permission state", &state))?;
    let decision = match row.get::<Option<i64>>("decision_seq")? {
        Some(seq) => {
            let sql =
                format!("SELECT {ENTRY_COLS} FROM entries WHERE session_id = $1 AND seq = $2");
            let row = c.fetch_one(&sql, &args![s.id.to_string(), seq]).await?;
            Some(entry_row(&row)?)
        }
        None => None,
    };
    Ok((turn, request, state, decision))
}

async fn op_answer(c: &mut Conn, d: Dialect, now: i64, req: &AnswerPermission) -> R<Answered> {
    let mut s = lock_owned(c, d, &req.owner, req.session_id).await?;
    let (turn, request, state, decision) = permission_request(c, &s, &req.request_id).await?;
    let decided_by = format!("user:{}", req.owner);
    let recorded = decision.as_ref().and_then(|e| e.permission.as_ref());
    let closed = |state: PermissionState| {
        StoreError::PermissionClosed(Box::new(PermissionStatus {
            request_id: req.request_id.clone(),
            state,
            option_id: recorded.and_then(|p| p.option_id.clone()),
            decided_by: recorded.and_then(|p| p.decided_by.clone()),
            decision_seq: decision.as_ref().map(|e| e.seq),
        }))
    };
    match judge(&request, recorded, &req.option_id, &decided_by) {
        Judgement::UnknownOption => Err(StoreError::UnknownOption {
            request_id: req.request_id.clone(),
            option_id: req.option_id.clone(),
        }
        .into()),
        Judgement::Closed => Err(closed(state).into()),
        Judgement::Replay => match decision {
            Some(decision) => Ok(Answered {
                decision,
                replayed: true,
            }),
            None => Err(corrupt("permission decision", &req.request_id)),
        },
        // Pending rows belong to the active turn (a turn's end closes its
        // requests in the same transaction); checked all the same, so an
        // answer never lands outside its turn (I8).
        Judgement::Record if state != PermissionState::Pending || s.flow.active != Some(turn) => {
            Err(closed(state).into())
        }
        Judgement::Record => {
            let e = NewEntry::permission_decision(
                turn,
                request.decision(Some(req.option_id.clone()), decided_by),
            );
            let decision = append(c, &mut s, now, e, None).await?;
            save_session(c, &s).await?;
            Ok(Answered {
                decision,
                replayed: false,
            })
        }
    }
}

/// Refuses, before anything is written, entries a running turn may not
/// store as output: anything but the agent's messages, thoughts, tool calls
/// and results and permission requests and decisions, or an entry of another
/// turn. A `turn_ended` in the output would
/// be a second terminal entry (I7).
fn check_output(turn: TurnId, entries: &[NewEntry]) -> Result<()> {
    for e in entries {
        let output = match e.kind {
            EntryType::Message => e.role.is_some_and(|r| r != Role::User),
            EntryType::Thought
            | EntryType::ToolCall
            | EntryType::ToolResult
            | EntryType::PermissionRequest
            | EntryType::PermissionDecision => true,
            EntryType::TurnStarted | EntryType::TurnEnded => false,
        };
        if !output || e.turn_id != Some(turn) {
            return Err(StoreError::Internal(format!(
                "not output of turn {turn}: a {:?} entry (role {:?}) of turn {:?}",
                e.kind, e.role, e.turn_id
            )));
        }
    }
    Ok(())
}

/// Refuses a turn end that is not: a terminal `status`, output, then the
/// turn's one `turn_ended` with that status, last.
fn check_end(turn: TurnId, status: TurnStatus, entries: &[NewEntry]) -> Result<()> {
    if !status.is_terminal() {
        return Err(StoreError::Internal(format!(
            "turn {turn} cannot end {}: not a terminal status",
            status.as_str()
        )));
    }
    match entries.split_last() {
        Some((last, output))
            if last.kind == EntryType::TurnEnded
                && last.turn_id == Some(turn)
                && last.status == Some(status) =>
        {
            check_output(turn, output)
        }
        _ => Err(StoreError::Internal(format!(
            "the end of turn {turn} must close with its turn_ended ({})",
            status.as_str()
        ))),
    }
}

/// Creates a turn consuming `input`: the turn row, the cursor, the
/// `turn_started` entry — one transaction with whatever made it start.
async fn start_turn(c: &mut Conn, s: &mut SessionRow, now: i64, start: Start) -> R<Entry> {
    c.execute(
        "INSERT INTO turns (id, session_id, status, input_from, input_to, started_at) \
         VALUES ($1, $2, 'starting', $3, $4, $5)",
        &args![
            start.turn.to_string(),
            s.id.to_string(),
            start.input.from as i64,
            start.input.to as i64,
            now
        ],
    )
    .await?;
    put(
        c,
        s,
        now,
        start.seq,
        NewEntry::turn_started(start.turn, start.input),
        None,
    )
    .await
}

/// The first waiting message: the first user message after the cursor,
/// found by scanning the primary key from there (past the previous turn's
/// output), never the whole queue.
async fn first_waiting(c: &mut Conn, s: &SessionRow) -> R<Seq> {
    let first: Option<i64> = c
        .scalar(
            "SELECT MIN(seq) FROM entries WHERE session_id = $1 AND role = 'user' AND seq > $2",
            &args![s.id.to_string(), s.flow.cursor as i64],
        )
        .await?;
    match first {
        Some(seq) => Ok(seq as Seq),
        None => Err(StoreError::Internal(format!(
            "session {} counts {} waiting messages but has none after seq {}",
            s.id, s.flow.queue.waiting, s.flow.cursor
        ))
        .into()),
    }
}

/// Starts the turn that is due, if one is: messages wait, none is active
/// and no debounce window holds them past `now`.
async fn start_next(c: &mut Conn, s: &mut SessionRow, now: i64) -> R<Option<Entry>> {
    if s.flow.due(now).is_none() {
        return Ok(None);
    }
    let first = first_waiting(c, s).await?;
    match s.flow.heal(now, Some(first), TurnId::new()) {
        Ok(Some(start)) => Ok(Some(start_turn(c, s, now, start).await?)),
        Ok(None) => Ok(None),
        Err(need) => Err(StoreError::Internal(format!("starting a turn lacks {need:?}")).into()),
    }
}

/// Takes the lease for `node` if nobody holds it or the holder's expired.
fn try_claim(s: &mut SessionRow, node: &str, now: i64, ttl: Duration) -> Option<Lease> {
    let free = s.lease_owner.is_none() || s.lease_expires_at.is_none_or(|t| t < now);
    free.then(|| claim(s, node, now, ttl))
}

fn claim(s: &mut SessionRow, node: &str, now: i64, ttl: Duration) -> Lease {
    s.lease_owner = Some(node.to_owned());
    s.lease_epoch += 1;
    s.lease_expires_at = Some(now + ttl.as_micros() as i64);
    Lease {
        session_id: s.id,
        owner: node.to_owned(),
        epoch: s.lease_epoch,
    }
}

/// Ends the active turn with `status` if it is still starting or running
/// (compare-and-set: ended is absorbing), appends `entries`, and starts the
/// next turn if messages wait.
async fn finish_turn(
    c: &mut Conn,
    s: &mut SessionRow,
    now: i64,
    turn: TurnId,
    status: TurnStatus,
    reason: Option<String>,
    entries: Vec<NewEntry>,
) -> R<Ended> {
    let done = c
        .execute(
            "UPDATE turns SET status = $2, ended_at = $3, reason = $4 \
         WHERE id = $1 AND status IN ('starting', 'running')",
            &args![turn.to_string(), status.as_str(), now, reason.clone()],
        )
        .await?;
    if done != 1 || s.flow.active != Some(turn) {
        return Err(StoreError::TurnNotActive { turn_id: turn }.into());
    }
    let mut committed = Vec::with_capacity(entries.len() + 1);
    // A request still waiting is answered `cancelled` before the terminal
    // entry (never left open; nothing of the turn follows its end, I8), and
    // before the trailing tool results (the calls the end closes), so a
    // call's request and decision come before its result.
    let mut entries = entries;
    let last = entries.pop();
    let results_from = entries
        .iter()
        .rposition(|e| e.kind != EntryType::ToolResult)
        .map_or(0, |i| i + 1);
    let results = entries.split_off(results_from);
    for e in entries {
        committed.push(append(c, s, now, e, None).await?);
    }
    let by = if reason.as_deref() == Some("shutdown") {
        "shutdown"
    } else {
        "turn_end"
    };
    let why = format!("the turn ended {}", status.as_str());
    committed.extend(close_pending(c, s, now, turn, None, by, &why).await?);
    for e in results {
        committed.push(append(c, s, now, e, None).await?);
    }
    committed.extend(match last {
        Some(e) => Some(append(c, s, now, e, None).await?),
        None => None,
    });
    s.flow
        .end(turn)
        .map_err(|_| StoreError::TurnNotActive { turn_id: turn })?;
    let next = start_next(c, s, now).await?;
    let next_id = next.as_ref().and_then(|e| e.turn_id);
    committed.extend(next);
    Ok(Ended {
        committed,
        next: next_id,
    })
}

/// The session's active turn if it is still `starting`, with its input
/// messages and any cancel requested before it ran.
async fn starting_turn(c: &mut Conn, s: &SessionRow) -> R<Option<(TurnToRun, Option<String>)>> {
    let Some(turn_id) = s.flow.active else {
        return Ok(None);
    };
    let sql = format!("SELECT {TURN_COLS}, cancel_reason FROM turns WHERE id = $1");
    let row = c.fetch_one(&sql, &args![turn_id.to_string()]).await?;
    let turn = turn_row(&row)?;
    if turn.status != TurnStatus::Starting {
        return Ok(None);
    }
    let cancel = row.get("cancel_reason")?;
    let sql = format!(
        "SELECT {ENTRY_COLS} FROM entries WHERE session_id = $1 AND role = 'user' AND seq >= $2 AND seq <= $3 ORDER BY seq"
    );
    let rows = c
        .fetch_all(
            &sql,
            &args![
                s.id.to_string(),
                turn.input.from as i64,
                turn.input.to as i64
            ],
        )
        .await?;
    let inputs = rows.iter().map(entry_row).collect::<R<Vec<_>>>()?;
    let todo = TurnToRun {
        turn,
        agent: s.agent.clone(),
        inputs,
        agent_session: s.agent_session.clone(),
        permission: s.permission,
    };
    Ok(Some((todo, cancel)))
}

/// Moves a `starting` turn to `running` under the lease of `epoch`.
async fn mark_running(c: &mut Conn, turn: TurnId, epoch: baton_core::Epoch) -> R<()> {
    c.execute(
        "UPDATE turns SET status = 'running', epoch = $2 WHERE id = $1 AND status = 'starting'",
        &args![turn.to_string(), epoch],
    )
    .await?;
    Ok(())
}

/// Moves the locked session's starting `turn` to `running` under `lease`,
/// unless a cancel came first (then it stays `starting`, to be ended).
async fn begin(
    c: &mut Conn,
    s: &mut SessionRow,
    now: i64,
    cfg: &StoreConfig,
    lease: &Lease,
    turn: TurnId,
    cancel: Option<String>,
) -> R<Begin> {
    if let Some(reason) = cancel {
        return Ok(Begin::Cancelled(reason));
    }
    mark_running(c, turn, lease.epoch).await?;
    // Starting a turn proves the holder alive: extend the lease, so
    // back-to-back turns shorter than a heartbeat never let it lapse.
    s.lease_expires_at = Some(now + cfg.lease_ttl.as_micros() as i64);
    save_session(c, s).await?;
    Ok(Begin::Run)
}

// ---------------------------------------------------------------------------
// Operations

async fn op_create(
    c: &mut Conn,
    d: Dialect,
    now: i64,
    cfg: &StoreConfig,
    req: &CreateSession,
) -> R<Created> {
    if let Some(key) = &req.idempotency_key {
        let sql = format!(
            "SELECT {SESSION_COLS} FROM sessions WHERE owner = $1 AND idempotency_key = $2{}",
            d.for_update()
        );
        let row = c.fetch_optional(&sql, &args![&req.owner, key]).await?;
        if let Some(row) = row {
            let s = session_row(&row)?;
            if s.fingerprint.as_deref() != Some(req.fingerprint.as_str()) {
                return Err(StoreError::IdempotencyConflict.into());
            }
            return Ok(Created {
                session: session_view(&s)?,
                created: false,
                committed: Vec::new(),
                lease: None,
            });
        }
    }
    let metadata = serde_json::to_string(&req.metadata)
        .map_err(|e| StoreError::Internal(format!("encoding metadata: {e}")))?;
    let mut s = SessionRow {
        id: SessionId::new(),
        owner: req.owner.clone(),
        agent: req.agent.clone(),
        metadata,
        created_at: now,
        flow: SessionState::new(
            req.policy,
            i64::try_from(req.debounce_ms).unwrap_or(i64::MAX),
        ),
        lease_owner: None,
        lease_epoch: 0,
        lease_expires_at: None,
        fingerprint: req
            .idempotency_key
            .as_ref()
            .map(|_| req.fingerprint.clone()),
        agent_session: None,
        permission: req.permission,
        open_permissions: 0,
    };
    c.execute("INSERT INTO sessions (id, owner, agent, policy, metadata, created_at, idempotency_key, request_fingerprint, permission, debounce_ms) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)", &args![s.id.to_string(), &s.owner, &s.agent, s.flow.policy.as_str(), &s.metadata, now, req.idempotency_key.clone(), s.fingerprint.clone(), s.permission.map(PermissionPolicy::as_str), s.flow.debounce_ms])
    .await?;
    let mut committed = Vec::new();
    let mut lease = None;
    if let Some(content) = &req.message {
        // The first message is decided like any other on an idle session: a
        // turn starts with it, or a debounce window opens.
        let post = Post {
            policy: None,
            agent_takes_input: false,
            capacity: cfg.queue_capacity as u64,
            now,
            heal_turn: TurnId::new(),
            turn: TurnId::new(),
        };
        let Ok(Ok(a)) = s.flow.post(&post, None) else {
            return Err(
                StoreError::Internal("an idle session refused its first message".into()).into(),
            );
        };
        let meta = UserMeta {
            policy: a.waits_as,
            requested: None,
            disposition: &a.disposition,
            key: None,
        };
        let msg = put(
            c,
            &mut s,
            now,
            a.seq,
            NewEntry::user_message(content.clone()),
            Some(meta),
        )
        .await?;
        committed.push(msg);
        if let Some(start) = a.started {
            committed.push(start_turn(c, &mut s, now, start).await?);
            lease = Some(claim(&mut s, &req.node, now, cfg.lease_ttl));
        }
        save_session(c, &s).await?;
    }
    Ok(Created {
        session: session_view(&s)?,
        created: true,
        committed,
        lease,
    })
}

async fn op_post(
    c: &mut Conn,
    d: Dialect,
    now: i64,
    cfg: &StoreConfig,
    req: &PostMessage,
    run_here: bool,
) -> R<Posted> {
    let mut s = lock_owned(c, d, &req.owner, req.session_id).await?;
    if let Some(key) = &req.idempotency_key {
        let sql = format!(
            "SELECT {ENTRY_COLS}, requested_policy, disposition FROM entries WHERE session_id = $1 AND idempotency_key = $2"
        );
        let row = c
            .fetch_optional(&sql, &args![s.id.to_string(), key])
            .await?;
        if let Some(row) = row {
            let entry = entry_row(&row)?;
            let requested: Option<String> = row.get("requested_policy")?;
            let same = entry.content.as_deref() == Some(req.content.as_str())
                && requested.as_deref() == req.policy.map(Policy::as_str);
            if !same {
                return Err(StoreError::IdempotencyConflict.into());
            }
            let raw: Option<String> = row.get("disposition")?;
            let raw = raw.unwrap_or_default();
            let disposition =
                serde_json::from_str(&raw).map_err(|_| corrupt("disposition", &raw))?;
            return Ok(Posted {
                entry,
                disposition,
                replayed: true,
                committed: Vec::new(),
                lease: None,
                cancel: None,
                begun: None,
                steer: None,
                pending_until: None,
            });
        }
    }
    let post = Post {
        policy: req.policy,
        agent_takes_input: req.mid_turn_agents.contains(&s.agent),
        capacity: cfg.queue_capacity as u64,
        now,
        heal_turn: TurnId::new(),
        turn: TurnId::new(),
    };
    // The procedure asks for what it needs beyond the row: each question is
    // asked at most once.
    let mut first = None;
    let decided = loop {
        match s.flow.post(&post, first) {
            Ok(decided) => break decided,
            Err(Need::FirstWaiting) if first.is_none() => {
                first = Some(first_waiting(c, &s).await?);
            }
            Err(Need::Cancelling(turn)) if s.flow.cancelling.is_none() => {
                s.flow.cancelling = Some(cancel_requested(c, turn).await?);
            }
            Err(need) => {
                return Err(
                    StoreError::Internal(format!("deciding a message lacks {need:?}")).into(),
                )
            }
        }
    };
    let a = match decided {
        Ok(a) => a,
        Err(Refusal::Busy { turn }) => return Err(StoreError::SessionBusy { turn_id: turn }.into()),
        Err(Refusal::QueueFull { capacity }) => {
            return Err(StoreError::QueueFull {
                capacity: capacity as usize,
            }
            .into())
        }
    };
    write_post(c, now, cfg, req, run_here, &mut s, &a).await
}

/// Writes what the procedure decided for message `req` on session `s`:
/// the turn it healed, the message, the turn it started, the cancel it
/// asked for, and the session row.
async fn write_post(
    c: &mut Conn,
    now: i64,
    cfg: &StoreConfig,
    req: &PostMessage,
    run_here: bool,
    s: &mut SessionRow,
    a: &Accepted,
) -> R<Posted> {
    let mut committed = Vec::new();
    let mut lease = None;
    if let Some(healed) = a.healed {
        committed.push(start_turn(c, s, now, healed).await?);
        lease = try_claim(s, &req.node, now, cfg.lease_ttl);
    }
    let meta = UserMeta {
        policy: a.waits_as,
        requested: req.policy,
        disposition: &a.disposition,
        key: req.idempotency_key.as_deref(),
    };
    let entry = put(
        c,
        s,
        now,
        a.seq,
        NewEntry::user_message(req.content.clone()),
        Some(meta),
    )
    .await?;
    committed.push(entry.clone());
    let mut begun = None;
    if let Some(start) = a.started {
        committed.push(start_turn(c, s, now, start).await?);
        if lease.is_none() {
            lease = try_claim(s, &req.node, now, cfg.lease_ttl);
            // The turn is this message's alone and this node takes the lease
            // now: begin it here (as `begin` would, with no cancel possible
            // yet), so the worker need not commit a `take_turn` first.
            if let (true, Some(l)) = (run_here, &lease) {
                mark_running(c, start.turn, l.epoch).await?;
                begun = Some(TurnToRun {
                    turn: Turn {
                        id: start.turn,
                        session_id: s.id,
                        status: TurnStatus::Running,
                        input: start.input,
                        started_at: Timestamp(now),
                        ended_at: None,
                        reason: None,
                    },
                    agent: s.agent.clone(),
                    inputs: vec![entry.clone()],
                    agent_session: s.agent_session.clone(),
                    permission: s.permission,
                });
            }
        }
    }
    if let Some(turn) = a.cancel {
        request_cancel_turn(c, turn, &format!("interrupted by message {}", entry.seq)).await?;
    }
    save_session(c, s).await?;
    Ok(Posted {
        entry,
        disposition: a.disposition,
        replayed: false,
        committed,
        lease,
        cancel: a.cancel,
        begun,
        steer: a.steer,
        pending_until: a.pending_until,
    })
}

/// Whether a cancel was asked for `turn` (it will not take more input).
async fn cancel_requested(c: &mut Conn, turn: TurnId) -> R<bool> {
    let reason: Option<String> = c
        .scalar(
            "SELECT cancel_reason FROM turns WHERE id = $1",
            &args![turn.to_string()],
        )
        .await?;
    Ok(reason.is_some())
}

async fn request_cancel_turn(c: &mut Conn, turn: TurnId, reason: &str) -> R<()> {
    // The first reason sticks: a later cancel is idempotent.
    c.execute(
        "UPDATE turns SET cancel_reason = COALESCE(cancel_reason, $2) WHERE id = $1",
        &args![turn.to_string(), reason],
    )
    .await?;
    Ok(())
}

async fn op_recover_one(
    c: &mut Conn,
    d: Dialect,
    now: i64,
    cfg: &StoreConfig,
    node: &str,
    id: SessionId,
    all_foreign: bool,
) -> R<Option<Recovered>> {
    let Some(mut s) = lock_session(c, d, id).await? else {
        return Ok(None);
    };
    let Some(turn) = s.flow.active else {
        return Ok(None);
    };
    // A lease given up on purpose (a node shutting down between turns)
    // hands the queue over: that is not a worker vanishing, so it does not
    // count against the turn's bounded recovery.
    let released = s.lease_owner.is_none();
    let expired = released || s.lease_expires_at.is_none_or(|t| t < now);
    let foreign = s.lease_owner.as_deref() != Some(node);
    if !(expired || (all_foreign && foreign)) {
        return Ok(None);
    }
    let lease = claim(&mut s, node, now, cfg.lease_ttl);
    let row = c
        .fetch_one(
            "SELECT status, recoveries, input_from FROM turns WHERE id = $1",
            &args![turn.to_string()],
        )
        .await?;
    let status: String = row.get("status")?;
    let recoveries: i64 = row.get("recoveries")?;
    let input_from: i64 = row.get("input_from")?;
    let mut committed = Vec::new();
    let end = match status.as_str() {
        "running" => Some((
            TurnStatus::Lost,
            "lost: the worker running this turn vanished and its lease expired".to_owned(),
        )),
        _ if released => None,
        _ if recoveries >= cfg.max_recoveries => Some((
            TurnStatus::Failed,
            format!("failed: handed to {recoveries} workers that vanished before running it"),
        )),
        _ => {
            c.execute(
                "UPDATE turns SET recoveries = recoveries + 1 WHERE id = $1",
                &args![turn.to_string()],
            )
            .await?;
            None
        }
    };
    if let Some((status, reason)) = end {
        // The vanished worker's open tool calls are closed here, in the
        // transaction that ends its turn.
        let mut entries: Vec<NewEntry> = open_tool_calls(c, s.id, turn, input_from)
            .await?
            .into_iter()
            .map(|id| NewEntry::tool_closed(turn, id, status, Some(&reason)))
            .collect();
        entries.push(NewEntry::turn_ended(turn, status, Some(reason.clone())));
        committed = finish_turn(c, &mut s, now, turn, status, Some(reason), entries)
            .await?
            .committed;
    }
    save_session(c, &s).await?;
    Ok(Some(Recovered { lease, committed }))
}

/// The tool calls `turn` stored and never answered, in call order. The
/// turn's output lies after its first input (`input_from`): the scan starts
/// there on the primary key. Not after its last input: a turn that took
/// steered input has output before it.
async fn open_tool_calls(
    c: &mut Conn,
    session: SessionId,
    turn: TurnId,
    input_from: i64,
) -> R<Vec<String>> {
    let rows = c
        .fetch_all(
            "SELECT kind, tool FROM entries WHERE session_id = $1 AND seq > $2 AND turn_id = $3 \
             AND kind IN ('tool_call', 'tool_result') ORDER BY seq",
            &args![session.to_string(), input_from, turn.to_string()],
        )
        .await?;
    let mut open: Vec<String> = Vec::new();
    for row in rows {
        let kind: String = row.get("kind")?;
        let tool: Option<String> = row.get("tool")?;
        let Some(tool) = tool else { continue };
        let id = serde_json::from_str::<ToolInfo>(&tool)
            .map_err(|_| corrupt("tool", &tool))?
            .id;
        if kind == "tool_call" {
            if !open.contains(&id) {
                open.push(id);
            }
        } else {
            open.retain(|o| *o != id);
        }
    }
    Ok(open)
}

/// Runs `$body` as one write transaction on the session `$lock` names (if
/// any). The closure may run more than once (PostgreSQL retries), so the
/// listed captures are cloned for each run.
macro_rules! op {
    ($store:expr, $lock:expr, [$($cap:ident),*], |$c:ident, $now:ident| $body:expr) => {{
        $store
            .write($lock, move |$c: &mut Conn, $now: i64| {
                $(let $cap = $cap.clone();)*
                Box::pin(async move { $body })
            })
            .await
    }};
}

#[async_trait]
impl Store for SqlStore {
    fn invariant_breaches(&self) -> Vec<(String, u64)> {
        let counts = self.breaches.lock().unwrap_or_else(|p| p.into_inner());
        counts.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    fn commit_stats(&self) -> Option<crate::CommitStats> {
        Some(self.stats.clone())
    }

    async fn ping(&self) -> Result<()> {
        let mut c = self.reader().await?;
        c.execute("SELECT 1", &[])
            .await
            .map(|_| ())
            .map_err(unfail)?;
        drop(c);
        if self.dialect == Dialect::Sqlite {
            // The embedded store writes on one thread: healthy only if it
            // commits (a dead or stuck writer is `503`, not `200`).
            tokio::time::timeout(WRITER_PATIENCE, self.flush())
                .await
                .map_err(|_| {
                    StoreError::Unavailable("the store's writer does not answer".into())
                })??;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        match self.exec {
            Exec::Sqlite(_) => {
                self.write(None, |_c, _now| Box::pin(async { Ok(()) }))
                    .await
            }
            Exec::Postgres(..) => Ok(()),
        }
    }

    async fn create_session(&self, req: CreateSession) -> Result<Created> {
        let (d, cfg, req) = (self.dialect, self.cfg.clone(), Arc::new(req));
        op!(self, None, [cfg, req], |c, now| op_create(
            c, d, now, &cfg, &req
        )
        .await)
    }

    async fn session(&self, owner: &str, id: SessionId) -> Result<Session> {
        let mut c = self.reader().await?;
        let get = async {
            let s = fetch_session(&mut c, id, "").await?;
            match s {
                Some(s) if s.owner == owner => session_view(&s),
                _ => Err(StoreError::NotFound.into()),
            }
        };
        get.await.map_err(unfail)
    }

    async fn session_by_key(&self, owner: &str, key: &str) -> Result<Option<Session>> {
        let mut c = self.reader().await?;
        let get = async {
            let sql = format!(
                "SELECT {SESSION_COLS} FROM sessions WHERE owner = $1 AND idempotency_key = $2"
            );
            let row = c.fetch_optional(&sql, &args![owner, key]).await?;
            match row {
                Some(row) => Ok(Some(session_view(&session_row(&row)?)?)),
                None => Ok(None),
            }
        };
        get.await.map_err(unfail)
    }

    async fn list_sessions(&self, owner: &str, query: &SessionQuery) -> Result<SessionPage> {
        // No agent name holds a NUL byte, and PostgreSQL refuses one in text.
        if query.agent.as_ref().is_some_and(|a| a.contains('\0')) {
            return Ok(SessionPage {
                sessions: Vec::new(),
                more: false,
            });
        }
        let mut c = self.reader().await?;
        let list = async {
            // Keyset paging on (created_at, id), newest first: a page never
            // skips or repeats a session, however many are created meanwhile.
            let mut sql = format!(
                "SELECT {SESSION_COLS}, COALESCE((SELECT e.created_at FROM entries e \
                 WHERE e.session_id = sessions.id AND e.seq = sessions.last_seq), created_at) \
                 AS last_activity_at FROM sessions WHERE owner = $1"
            );
            let mut args = vec![Val::from(owner)];
            if let Some(after) = query.after {
                args.push(Val::from(after.created_at.micros()));
                args.push(Val::from(after.id.to_string()));
                let (t, i) = (args.len() - 1, args.len());
                sql.push_str(&format!(
                    " AND (created_at < ${t} OR (created_at = ${t} AND id < ${i}))"
                ));
            }
            match query.status {
                Some(SessionStatus::Running) => sql.push_str(" AND active_turn IS NOT NULL"),
                Some(SessionStatus::Idle) => sql.push_str(" AND active_turn IS NULL"),
                None => {}
            }
            if let Some(agent) = &query.agent {
                args.push(Val::from(agent));
                sql.push_str(&format!(" AND agent = ${}", args.len()));
            }
            // One more than asked: whether another page follows.
            let limit = i64::from(query.limit.max(1));
            args.push(Val::from(limit + 1));
            sql.push_str(&format!(
                " ORDER BY created_at DESC, id DESC LIMIT ${}",
                args.len()
            ));
            let rows = c.fetch_all(&sql, &args).await?;
            let more = rows.len() as i64 > limit;
            let mut sessions = Vec::with_capacity(rows.len());
            for r in rows.iter().take(limit as usize) {
                let s = session_row(r)?;
                sessions.push(Listed {
                    session: session_view(&s)?,
                    last_activity_at: Timestamp(r.get("last_activity_at")?),
                });
            }
            Ok(SessionPage { sessions, more })
        };
        list.await.map_err(unfail)
    }

    async fn delete_session(&self, owner: &str, id: SessionId) -> Result<()> {
        let (d, owner) = (self.dialect, owner.to_owned());
        op!(self, Some(id), [owner], |c, _now| {
            lock_owned(c, d, &owner, id).await?;
            for table in ["entries", "turns", "permission_requests"] {
                c.execute(
                    &format!("DELETE FROM {table} WHERE session_id = $1"),
                    &args![id.to_string()],
                )
                .await?;
            }
            c.execute("DELETE FROM sessions WHERE id = $1", &args![id.to_string()])
                .await?;
            c.forget(id);
            Ok(())
        })
    }

    async fn post_message(&self, req: PostMessage) -> Result<Posted> {
        self.post(req, false).await
    }

    async fn post_message_to_run(&self, req: PostMessage) -> Result<Posted> {
        self.post(req, true).await
    }

    async fn entries(&self, id: SessionId, after: Seq, limit: u32) -> Result<Page> {
        let mut c = self.reader().await?;
        let page = async {
            // Read the counter first: every seq up to it is committed, so
            // `last_seq` never promises an entry the page could not show.
            let last: i64 = c
                .fetch_optional(
                    "SELECT last_seq FROM sessions WHERE id = $1",
                    &args![id.to_string()],
                )
                .await?
                .ok_or(StoreError::NotFound)?
                .first()?;
            let sql = format!(
                "SELECT {ENTRY_COLS} FROM entries WHERE session_id = $1 AND seq > $2 AND seq <= $3 ORDER BY seq LIMIT $4"
            );
            let rows = c
                .fetch_all(
                    &sql,
                    &args![
                        id.to_string(),
                        after.min(i64::MAX as u64) as i64,
                        last,
                        i64::from(limit)
                    ],
                )
                .await?;
            let entries = rows.iter().map(entry_row).collect::<R<Vec<_>>>()?;
            Ok(Page {
                entries,
                last_seq: last as Seq,
            })
        };
        page.await.map_err(unfail)
    }

    async fn turns(&self, id: SessionId) -> Result<Vec<Turn>> {
        let sql =
            format!("SELECT {TURN_COLS} FROM turns WHERE session_id = $1 ORDER BY input_from");
        let mut c = self.reader().await?;
        let list = async {
            let rows = c.fetch_all(&sql, &args![id.to_string()]).await?;
            rows.iter().map(turn_row).collect::<R<Vec<_>>>()
        };
        list.await.map_err(unfail)
    }

    async fn request_cancel(
        &self,
        owner: &str,
        id: SessionId,
        reason: &str,
        only: Option<TurnId>,
    ) -> Result<Option<TurnId>> {
        let (d, owner, reason) = (self.dialect, owner.to_owned(), reason.to_owned());
        op!(self, Some(id), [owner, reason], |c, _now| {
            let s = lock_owned(c, d, &owner, id).await?;
            let target = s.flow.active.filter(|t| only.is_none_or(|o| o == *t));
            if let Some(turn) = target {
                request_cancel_turn(c, turn, &reason).await?;
            }
            Ok(target)
        })
    }

    async fn next_turn(&self, lease: &Lease) -> Result<Option<TurnToRun>> {
        let mut c = self.reader().await?;
        let next = async {
            let s = fetch_leased(&mut c, lease).await?;
            Ok(starting_turn(&mut c, &s).await?.map(|(todo, _)| todo))
        };
        next.await.map_err(unfail)
    }

    async fn begin_turn(&self, lease: &Lease, turn: TurnId) -> Result<Begin> {
        let (d, cfg, lease) = (self.dialect, self.cfg.clone(), lease.clone());
        op!(self, Some(lease.session_id), [cfg, lease], |c, now| {
            let mut s = lock_fenced(c, d, &lease).await?;
            if s.flow.active != Some(turn) {
                return Err(StoreError::TurnNotActive { turn_id: turn }.into());
            }
            let row = c
                .fetch_one(
                    "SELECT status, cancel_reason FROM turns WHERE id = $1",
                    &args![turn.to_string()],
                )
                .await?;
            let status: String = row.get("status")?;
            if status != "starting" {
                return Err(StoreError::TurnNotActive { turn_id: turn }.into());
            }
            let cancel = row.get("cancel_reason")?;
            begin(c, &mut s, now, &cfg, &lease, turn, cancel).await
        })
    }

    async fn take_turn(&self, lease: &Lease) -> Result<Take> {
        let (d, cfg, lease) = (self.dialect, self.cfg.clone(), lease.clone());
        op!(self, Some(lease.session_id), [cfg, lease], |c, now| {
            let mut s = lock_fenced(c, d, &lease).await?;
            if s.flow.active.is_none() {
                // Idle: give the lease up in the same transaction that saw
                // nothing to do, so a message that arrives later finds the
                // lease free and its node starts the turn.
                s.lease_owner = None;
                s.lease_expires_at = None;
                save_session(c, &s).await?;
                return Ok(Take::Released);
            }
            let Some((todo, cancel)) = starting_turn(c, &s).await? else {
                return Ok(Take::Busy);
            };
            let begun = begin(c, &mut s, now, &cfg, &lease, todo.turn.id, cancel).await?;
            Ok(Take::Run(Box::new(todo), begun))
        })
    }

    async fn append_output(
        &self,
        lease: &Lease,
        turn: TurnId,
        entries: Vec<NewEntry>,
    ) -> Result<Vec<Entry>> {
        check_output(turn, &entries)?;
        let (d, lease, entries) = (self.dialect, lease.clone(), Arc::new(entries));
        op!(self, Some(lease.session_id), [lease, entries], |c, now| {
            let mut s = lock_fenced(c, d, &lease).await?;
            if s.flow.active != Some(turn) {
                return Err(StoreError::TurnNotActive { turn_id: turn }.into());
            }
            let mut out = Vec::with_capacity(entries.len());
            for e in entries.iter() {
                out.push(append(c, &mut s, now, e.clone(), None).await?);
            }
            save_session(c, &s).await?;
            Ok(out)
        })
    }

    async fn end_turn(
        &self,
        lease: &Lease,
        turn: TurnId,
        status: TurnStatus,
        reason: Option<String>,
        entries: Vec<NewEntry>,
    ) -> Result<Ended> {
        check_end(turn, status, &entries)?;
        let (d, cfg, lease, entries) = (
            self.dialect,
            self.cfg.clone(),
            lease.clone(),
            Arc::new(entries),
        );
        op!(
            self,
            Some(lease.session_id),
            [cfg, lease, entries, reason],
            |c, now| {
                let mut s = lock_fenced(c, d, &lease).await?;
                let ended =
                    finish_turn(c, &mut s, now, turn, status, reason, entries.to_vec()).await?;
                // The holder is alive and may start the next turn at once: the
                // lease runs a full term from here.
                s.lease_expires_at = Some(now + cfg.lease_ttl.as_micros() as i64);
                save_session(c, &s).await?;
                Ok(ended)
            }
        )
    }

    async fn renew_lease(&self, lease: &Lease) -> Result<Renewal> {
        let (d, cfg, lease) = (self.dialect, self.cfg.clone(), lease.clone());
        op!(self, Some(lease.session_id), [cfg, lease], |c, now| {
            let mut s = lock_fenced(c, d, &lease).await?;
            s.lease_expires_at = Some(now + cfg.lease_ttl.as_micros() as i64);
            save_session(c, &s).await?;
            let mut renewal = Renewal::default();
            if let Some(turn) = s.flow.active {
                let reason: Option<String> = c
                    .scalar(
                        "SELECT cancel_reason FROM turns WHERE id = $1",
                        &args![turn.to_string()],
                    )
                    .await?;
                renewal.cancel = reason.map(|r| (turn, r));
                renewal.steer = s.flow.queue.last_steer.map(|upto| (turn, upto));
            }
            Ok(renewal)
        })
    }

    async fn release_lease(&self, lease: &Lease, force: bool) -> Result<bool> {
        let (d, lease) = (self.dialect, lease.clone());
        op!(self, Some(lease.session_id), [lease], |c, _now| {
            let mut s = lock_fenced(c, d, &lease).await?;
            if s.flow.active.is_some() && !force {
                return Ok(false);
            }
            s.lease_owner = None;
            s.lease_expires_at = None;
            save_session(c, &s).await?;
            Ok(true)
        })
    }

    async fn answer_permission(&self, req: AnswerPermission) -> Result<Answered> {
        let (d, req) = (self.dialect, Arc::new(req));
        op!(self, Some(req.session_id), [req], |c, now| op_answer(
            c, d, now, &req
        )
        .await)
    }

    async fn close_permissions(
        &self,
        lease: &Lease,
        turn: TurnId,
        only: Option<String>,
        decided_by: &str,
        reason: &str,
    ) -> Result<Vec<Entry>> {
        let (d, lease) = (self.dialect, lease.clone());
        let (by, reason) = (decided_by.to_owned(), reason.to_owned());
        op!(
            self,
            Some(lease.session_id),
            [lease, only, by, reason],
            |c, now| {
                let mut s = lock_fenced(c, d, &lease).await?;
                if s.flow.active != Some(turn) {
                    return Err(StoreError::TurnNotActive { turn_id: turn }.into());
                }
                let closed =
                    close_pending(c, &mut s, now, turn, only.as_deref(), &by, &reason).await?;
                if !closed.is_empty() {
                    save_session(c, &s).await?;
                }
                Ok(closed)
            }
        )
    }

    async fn pending_permissions(&self, id: SessionId) -> Result<Vec<Entry>> {
        let sql = format!(
            "SELECT {ENTRY_COLS} FROM entries WHERE session_id = $1 AND seq IN \
             (SELECT request_seq FROM permission_requests WHERE session_id = $1 AND state = 'pending') \
             ORDER BY seq"
        );
        let mut c = self.reader().await?;
        let list = async {
            let rows = c.fetch_all(&sql, &args![id.to_string()]).await?;
            rows.iter().map(entry_row).collect::<R<Vec<_>>>()
        };
        list.await.map_err(unfail)
    }

    async fn permission_decisions(&self, id: SessionId, turn: TurnId) -> Result<Vec<Entry>> {
        let sql = format!(
            "SELECT {ENTRY_COLS} FROM entries WHERE session_id = $1 AND seq IN \
             (SELECT decision_seq FROM permission_requests WHERE session_id = $1 AND turn_id = $2 \
              AND decision_seq IS NOT NULL) ORDER BY seq"
        );
        let mut c = self.reader().await?;
        let list = async {
            let rows = c
                .fetch_all(&sql, &args![id.to_string(), turn.to_string()])
                .await?;
            rows.iter().map(entry_row).collect::<R<Vec<_>>>()
        };
        list.await.map_err(unfail)
    }

    async fn set_agent_session(&self, lease: &Lease, agent_session: &str) -> Result<()> {
        let (d, lease, value) = (self.dialect, lease.clone(), agent_session.to_owned());
        op!(self, Some(lease.session_id), [lease, value], |c, _now| {
            let mut s = lock_fenced(c, d, &lease).await?;
            s.agent_session = Some(value.clone());
            save_session(c, &s).await?;
            Ok(())
        })
    }

    async fn steered_input(
        &self,
        lease: &Lease,
        turn: TurnId,
        after: Seq,
    ) -> Result<Option<SteerBatch>> {
        let mut c = self.reader().await?;
        let read = async {
            let s = fetch_leased(&mut c, lease).await?;
            if s.flow.active != Some(turn) {
                return Err(StoreError::TurnNotActive { turn_id: turn }.into());
            }
            let from = after.max(s.flow.cursor);
            let Some(upto) = s.flow.queue.last_steer.filter(|l| *l > from) else {
                return Ok(None);
            };
            let sql = format!(
                "SELECT {ENTRY_COLS} FROM entries WHERE session_id = $1 AND role = 'user' AND seq > $2 AND seq <= $3 ORDER BY seq"
            );
            let rows = c
                .fetch_all(&sql, &args![s.id.to_string(), from as i64, upto as i64])
                .await?;
            let messages = rows.iter().map(entry_row).collect::<R<Vec<_>>>()?;
            Ok(Some(SteerBatch { upto, messages }))
        };
        read.await.map_err(unfail)
    }

    async fn take_input(&self, lease: &Lease, turn: TurnId, upto: Seq) -> Result<()> {
        let (d, lease) = (self.dialect, lease.clone());
        op!(self, Some(lease.session_id), [lease], |c, _now| {
            let mut s = lock_fenced(c, d, &lease).await?;
            match s.flow.may_take(turn, upto) {
                Ok(true) => {}
                Ok(false) => return Ok(()),
                // The turn ended first: its end gave the input to the next turn.
                Err(TakeRefusal::NotActive) => {
                    return Err(StoreError::TurnNotActive { turn_id: turn }.into())
                }
                Err(TakeRefusal::NoSteer) => {
                    return Err(StoreError::Internal(format!(
                    "turn {turn} cannot take messages up to {upto}: no steered message waits there"
                ))
                    .into())
                }
            }
            let row = c
                .fetch_one(
                    "SELECT COUNT(*) AS n, MAX(seq) AS last FROM entries WHERE session_id = $1 AND role = 'user' \
                     AND seq > $2 AND seq <= $3",
                    &args![s.id.to_string(), s.flow.cursor as i64, upto as i64],
                )
                .await?;
            let count: i64 = row.get("n")?;
            let last: Option<i64> = row.get("last")?;
            if last != Some(upto as i64) {
                return Err(StoreError::Internal(format!(
                    "turn {turn} cannot take messages up to {upto}: it is not a waiting message"
                ))
                .into());
            }
            let moved = c
                .execute(
                    "UPDATE turns SET input_to = $2 WHERE id = $1 AND status IN ('starting', 'running')",
                    &args![turn.to_string(), upto as i64],
                )
                .await?;
            if moved != 1 {
                return Err(StoreError::TurnNotActive { turn_id: turn }.into());
            }
            s.flow.take(upto, count.max(0) as u64);
            save_session(c, &s).await?;
            Ok(())
        })
    }

    async fn start_due(&self, node: &str) -> Result<Due> {
        let now = self.now().await?;
        let ids = self
            .session_ids(
                "SELECT id FROM sessions WHERE pending_until IS NOT NULL AND pending_until <= $1 LIMIT 500",
                &args![now],
            )
            .await?;
        let mut due = Due {
            now,
            ..Due::default()
        };
        for id in ids {
            let (d, cfg, node) = (self.dialect, self.cfg.clone(), node.to_owned());
            let started = op!(self, Some(id), [cfg, node], |c, now| {
                let Some(mut s) = lock_session(c, d, id).await? else {
                    return Ok(None);
                };
                // Another node (or a post) may have started it meanwhile, or
                // a later message moved the window.
                let Some(started) = start_next(c, &mut s, now).await? else {
                    return Ok(None);
                };
                let lease = try_claim(&mut s, &node, now, cfg.lease_ttl);
                save_session(c, &s).await?;
                Ok(Some(DueStart {
                    lease,
                    committed: vec![started],
                }))
            })?;
            due.started.extend(started);
        }
        let mut c = self.reader().await?;
        let next = async {
            c.scalar::<Option<i64>>(
                "SELECT MIN(pending_until) FROM sessions WHERE pending_until IS NOT NULL",
                &[],
            )
            .await
        };
        due.next = next.await.map_err(unfail)?;
        Ok(due)
    }

    async fn recover(&self, node: &str, all_foreign: bool) -> Result<Vec<Recovered>> {
        let now = self.now().await?;
        let ids = self
            .session_ids(
                "SELECT id FROM sessions WHERE active_turn IS NOT NULL \
                 AND (lease_owner IS NULL OR lease_expires_at < $1 OR ($2 = 1 AND lease_owner <> $3)) LIMIT 500",
                &args![now, i64::from(all_foreign), node],
            )
            .await?;
        let mut out = Vec::new();
        for id in ids {
            let (d, cfg, node) = (self.dialect, self.cfg.clone(), node.to_owned());
            let got = op!(self, Some(id), [cfg, node], |c, now| op_recover_one(
                c,
                d,
                now,
                &cfg,
                &node,
                id,
                all_foreign
            )
            .await)?;
            out.extend(got);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    //! The PostgreSQL retry policy, on errors carrying real SQLSTATE codes.

    use std::borrow::Cow;

    use super::*;

    /// A database error with a given SQLSTATE (and, for a unique
    /// violation, the constraint), as PostgreSQL reports it.
    #[derive(Debug)]
    struct Sqlstate(&'static str, Option<&'static str>);

    impl std::fmt::Display for Sqlstate {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "SQLSTATE {}", self.0)
        }
    }

    impl std::error::Error for Sqlstate {}

    impl sqlx::error::DatabaseError for Sqlstate {
        fn message(&self) -> &str {
            "injected"
        }
        fn code(&self) -> Option<Cow<'_, str>> {
            Some(Cow::Borrowed(self.0))
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
        fn constraint(&self) -> Option<&str> {
            self.1
        }
    }

    fn db(code: &'static str) -> Fail {
        Fail::Db(sqlx::Error::Database(Box::new(Sqlstate(code, None))))
    }

    fn unique(constraint: &'static str) -> Fail {
        Fail::Db(sqlx::Error::Database(Box::new(Sqlstate(
            "23505",
            Some(constraint),
        ))))
    }

    #[test]
    fn conflicts_are_tried_again_then_reported_as_unavailable() {
        // Serialization failure, deadlock, a concurrent insert of one key.
        let conflicts = || {
            [
                db("40001"),
                db("40P01"),
                unique("entries_idempotency"),
                unique("sessions_owner_idempotency"),
            ]
        };
        for (i, code) in conflicts().iter().enumerate() {
            let code = format!("{i}: {}", fail_text(code));
            for attempt in 1..PG_TRIES {
                let pause =
                    after_failure(conflicts().into_iter().nth(i).expect("a conflict"), attempt)
                        .unwrap_or_else(|e| {
                            panic!("{code} on try {attempt} is tried again: {e:?}")
                        });
                assert!(pause <= Duration::from_millis(5 * u64::from(attempt)));
            }
            match after_failure(
                conflicts().into_iter().nth(i).expect("a conflict"),
                PG_TRIES,
            ) {
                Err(StoreError::Unavailable(why)) => {
                    assert!(why.contains("after 20 tries"), "{why}")
                }
                other => panic!("{code} after every try: {other:?}"),
            }
        }
    }

    fn fail_text(f: &Fail) -> String {
        match f {
            Fail::Db(e) => e.to_string(),
            Fail::Store(e) => e.to_string(),
            Fail::Lite(e) => e.to_string(),
        }
    }

    #[test]
    fn backstops_are_breaches_at_once_never_tried_again() {
        for constraint in ["entries_pkey", "turns_one_active", "sessions_pkey"] {
            match after_failure(unique(constraint), 1) {
                Err(StoreError::InvariantBreach { constraint: c, .. }) => {
                    assert_eq!(c, constraint)
                }
                other => panic!("{constraint} on the first try: {other:?}"),
            }
        }
    }

    #[test]
    fn a_database_that_cannot_answer_in_time_is_unavailable() {
        // Statement timeout, lock timeout, idle transaction timeout, a
        // connection failure: each is a wait this store set running out, or
        // the link going, under load or a partition. They were `Internal`
        // (HTTP 500); the chaos run on a PostgreSQL cluster found them.
        for code in ["57014", "55P03", "25P03", "08006", "57P01"] {
            match after_failure(db(code), 1) {
                Err(StoreError::Unavailable(_)) => {}
                other => panic!("{code}: {other:?}"),
            }
        }
    }

    #[test]
    fn other_failures_are_not_tried_again() {
        assert!(matches!(
            after_failure(db("23502"), 1),
            Err(StoreError::Internal(_))
        ));
        assert!(matches!(
            after_failure(db("57P01"), 1),
            Err(StoreError::Unavailable(_))
        ));
        assert!(matches!(
            after_failure(Fail::Store(StoreError::NotFound), 1),
            Err(StoreError::NotFound)
        ));
    }
}
