//! Opening the stores (SQLite's file, writer and checkpointer; PostgreSQL's
//! pools, probe and migrations), running a write transaction on either
//! (the embedded writer, a PostgreSQL lane, or alone with retries), the
//! clock, and what a failed statement means to a caller.

use super::*;

pub(super) static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The unique indexes two concurrent first uses of one idempotency key
/// collide on: the loser's retry finds the winner's row. Every other unique
/// index is a backstop that the store's transactions (the session row
/// locked) never trip.
pub(super) const IDEMPOTENCY_INDEXES: [&str; 2] =
    ["entries_idempotency", "sessions_owner_idempotency"];

/// The constraint a PostgreSQL unique violation (23505) names.
pub(super) fn pg_unique_violation(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(db) if db.code().as_deref() == Some("23505") => {
            Some(db.constraint().unwrap_or("unknown").to_owned())
        }
        _ => None,
    }
}

pub(super) fn breach(constraint: String, detail: String) -> StoreError {
    StoreError::InvariantBreach { constraint, detail }
}

pub(super) fn classify(e: sqlx::Error) -> StoreError {
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
pub(super) async fn pg_probe(url: &str, patience: Duration) -> Result<()> {
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
pub(super) const WRITER_PATIENCE: Duration = Duration::from_secs(5);

/// How many times a PostgreSQL write transaction is tried.
pub(super) const PG_TRIES: u32 = 20;

/// What a PostgreSQL write transaction's failure on try `attempt` comes to:
/// a pause before the next try, or the caller's error. A conflict that
/// outlasts every try is contention, not a fault: `Unavailable`, which
/// callers may retry, never `Internal`.
pub(super) fn after_failure(f: Fail, attempt: u32) -> std::result::Result<Duration, StoreError> {
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
pub(super) fn lite_unique_violation(e: &rusqlite::Error) -> Option<String> {
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

pub(super) fn classify_lite(e: rusqlite::Error) -> StoreError {
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
    pub(super) async fn session_ids(&self, sql: &str, args: &[Val]) -> Result<Vec<SessionId>> {
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

    pub(super) async fn reader(&self) -> Result<Conn> {
        Ok(Conn::Pool(self.read.acquire().await.map_err(classify)?))
    }

    /// Posts `req`: on PostgreSQL decided with the other posts of a lane's
    /// batch, else (and when the batch hands it back) in a write of its own.
    pub(super) async fn post(&self, req: PostMessage, run_here: bool) -> Result<Posted> {
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
    pub(super) fn watch<T>(&self, result: Result<T>) -> Result<T> {
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
    pub(super) async fn write<T, F>(&self, lock: Option<SessionId>, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: for<'c> Fn(&'c mut Conn, i64) -> BoxFuture<'c, R<T>> + Send + Sync + 'static,
    {
        let result = self.run_write(lock, f).await;
        self.watch(result)
    }

    pub(super) async fn run_write<T, F>(&self, lock: Option<SessionId>, f: F) -> Result<T>
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
pub(super) struct WriteJob<T, F> {
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
pub(super) fn open_writer(path: &Path) -> Result<rusqlite::Connection> {
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
pub(super) fn latest_stamp(c: &rusqlite::Connection) -> rusqlite::Result<i64> {
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
pub(super) fn open_checkpointer(path: &Path) -> Result<rusqlite::Connection> {
    open_lite(
        path,
        "the checkpointer",
        "PRAGMA synchronous = FULL; PRAGMA busy_timeout = 10000;",
    )
}

pub(super) fn open_lite(path: &Path, what: &str, pragmas: &str) -> Result<rusqlite::Connection> {
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
pub(super) const PG_CLOCK: &str = pg_clock!();
pub(super) const PG_NOW: &str = concat!("SELECT ", pg_clock!());

pub(super) async fn pg_now(c: &mut Conn) -> R<i64> {
    c.scalar(PG_NOW, &[]).await
}

/// Locks session `id`'s row, then reads the clock, in one round trip: the
/// subquery's row lock is taken (waiting for its holder to commit) before
/// the outer query projects its row. No session, no lock: the plain clock.
pub(super) async fn pg_now_locked(c: &mut Conn, id: SessionId) -> R<i64> {
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
