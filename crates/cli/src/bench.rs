//! `baton bench`: measures the store's durable append path, the HTTP message
//! path and the cross-node delta path, each next to a baseline measured in
//! the same run.
//!
//! - `baton bench append` — appends/s and latency of `Store::post_message` on
//!   the SQLite store (WAL, `synchronous=FULL`, group commit) at several
//!   writer counts, beside a raw baseline: one `INSERT` per transaction with
//!   sqlx's SQLite driver directly, same pragmas, same directory, same writer
//!   counts (writers contend on SQLite's lock with `busy_timeout`).
//! - `baton bench post` — latency of `POST /v1/sessions/{id}/messages` until
//!   its `201`, over real HTTP on 127.0.0.1 against an embedded server, for a
//!   session with a turn in flight (mid-turn) and for an idle session.
//! - `baton bench pg-append` — the same as `append` on the PostgreSQL store,
//!   with the appends spread over many sessions and all on one hot session,
//!   beside two baselines through sqlx's Postgres pool, same database, same
//!   writer counts: pgbench-style single-row `INSERT` transactions, and the
//!   naive counter-row append (`UPDATE … RETURNING` of a per-session counter
//!   row, then the `INSERT`, one transaction per append) on the same layout
//!   of sessions. `--json` prints one object per measurement.
//! - `baton bench pg-delta` — cross-node delta latency: two nodes on one
//!   database, a turn running on node B, its deltas timed from B's local bus
//!   to a client's SSE stream on node A (through `LISTEN/NOTIFY`), beside the
//!   same deltas on an SSE stream from B itself.
//!
//! Everything runs in a scratch directory, or a scratch PostgreSQL database
//! `baton_bench_<pid>`, that is removed at the end (also after an error or
//! Ctrl-C), talks only to 127.0.0.1, and is bounded in count and time.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use baton_core::{EntryType, Policy, SessionId, SessionStatus, TurnStatus};
use baton_engine::BusEvent;
use baton_store::{CreateSession, PostMessage, SqlStore, Store, StoreConfig};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::{App, ServeConfig};

/// `baton bench` flags.
#[derive(Clone, Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: BenchCommand,
}

/// The benchmarks.
#[derive(Clone, Debug, Subcommand)]
pub enum BenchCommand {
    /// Durable append throughput and latency of the SQLite store, beside a
    /// raw one-INSERT-per-transaction baseline.
    Append(AppendArgs),
    /// Latency of `POST /v1/sessions/{id}/messages` over HTTP, mid-turn vs idle.
    Post(PostArgs),
    /// Posts per second over HTTP on the embedded store (many connections,
    /// load generator in the same process), beside the raw batched SQLite
    /// ceiling on the same disk.
    Http(crate::bench_http::HttpBenchArgs),
    /// Durable append throughput and latency of the PostgreSQL store (spread
    /// over many sessions and on one hot session), beside a pgbench-style
    /// single-row INSERT baseline.
    PgAppend(PgAppendArgs),
    /// Cross-node delta latency (turn on node B, SSE subscriber on node A)
    /// beside the same-node latency (SSE subscriber on B).
    PgDelta(PgDeltaArgs),
    /// Per-turn overhead Baton adds in front of an ACP agent, against the
    /// same agent driven directly by a minimal client, in the same run.
    Acp(crate::bench_acp::AcpBenchArgs),
}

/// `baton bench append` flags.
#[derive(Clone, Debug, Args)]
pub struct AppendArgs {
    /// Concurrent writer counts to measure (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,16,256")]
    pub writers: Vec<usize>,
    /// Seconds per measurement (each writer count runs the store and the
    /// baseline for this long).
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Sessions the store's appends are spread over (0: one per writer).
    #[arg(long, default_value_t = 64)]
    pub sessions: usize,
    /// Directory for the scratch databases (a fresh subdirectory is made and
    /// removed); default: the system temp dir.
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// `baton bench post` flags.
#[derive(Clone, Debug, Args)]
pub struct PostArgs {
    /// Posts per case.
    #[arg(long, default_value_t = 1000)]
    pub posts: usize,
    /// Concurrent clients for the second pair of cases (0: skip them).
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// The demo agent's pause between streamed words.
    #[arg(long, default_value_t = 1)]
    pub word_delay_ms: u64,
    /// Directory for the scratch database (a fresh subdirectory is made and
    /// removed); default: the system temp dir.
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// `baton bench pg-append` flags.
#[derive(Clone, Debug, Args)]
pub struct PgAppendArgs {
    /// A PostgreSQL server on this machine (`postgres://user@127.0.0.1:5432/db`);
    /// a scratch database `baton_bench_<pid>` is created there and dropped.
    #[arg(long)]
    pub database_url: String,
    /// Concurrent writer counts to measure (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,32,256")]
    pub writers: Vec<usize>,
    /// Seconds per measurement (each writer count runs the baseline and the
    /// store's two layouts for this long each).
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Sessions the "spread" layout's appends go to.
    #[arg(long, default_value_t = 1000)]
    pub sessions: usize,
    /// Connections of the store's pool; the baseline's pool gets
    /// min(writers, this).
    #[arg(long, default_value_t = 64)]
    pub max_connections: u32,
    /// Print one JSON object per measurement (writer count and layout) on
    /// stdout instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// `baton bench pg-delta` flags.
#[derive(Clone, Debug, Args)]
pub struct PgDeltaArgs {
    /// A PostgreSQL server on this machine (`postgres://user@127.0.0.1:5432/db`);
    /// a scratch database `baton_bench_<pid>` is created there and dropped.
    #[arg(long)]
    pub database_url: String,
    /// Deltas to measure.
    #[arg(long, default_value_t = 1000)]
    pub deltas: usize,
    /// Deltas per turn (the deltas run as consecutive turns of this many).
    #[arg(long, default_value_t = 200)]
    pub per_turn: usize,
    /// The demo agent's pause between two deltas, in milliseconds.
    #[arg(long, default_value_t = 5)]
    pub delta_ms: u64,
}

/// Runs the benchmarks.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.command {
        // These handle Ctrl-C themselves, so the scratch database is dropped.
        BenchCommand::PgAppend(a) => {
            check_pg_append(&a)?;
            let url = a.database_url.clone();
            with_scratch_db(&url, move |db, server| pg_append(a, db, server)).await
        }
        BenchCommand::PgDelta(d) => {
            check_pg_delta(&d)?;
            let url = d.database_url.clone();
            with_scratch_db(&url, move |db, server| pg_delta(d, db, server)).await
        }
        BenchCommand::Acp(a) => crate::bench_acp::run(a).await,
        BenchCommand::Append(a) => interruptible(append(a)).await,
        BenchCommand::Post(p) => interruptible(post(p)).await,
        BenchCommand::Http(h) => interruptible(crate::bench_http::run(h)).await,
    }
}

/// Runs `bench` until it ends or Ctrl-C / SIGTERM arrives.
async fn interruptible(bench: impl Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::select! {
        r = bench => r,
        _ = crate::shutdown_signal() => bail!("interrupted"),
    }
}

// ---------------------------------------------------------------------------
// Shared helpers

/// A scratch directory, removed when dropped.
pub(crate) struct Scratch(PathBuf);

impl Scratch {
    pub(crate) fn new(parent: Option<&Path>) -> anyhow::Result<Self> {
        let base = parent
            .map(Path::to_path_buf)
            .unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!("baton-bench-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("warning: could not remove {}: {e}", self.0.display());
        }
    }
}

/// Latency percentiles over a sorted sample (nearest rank).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Stats {
    pub(crate) n: usize,
    pub(crate) p50: Duration,
    pub(crate) p99: Duration,
    pub(crate) max: Duration,
    pub(crate) mean: Duration,
}

pub(crate) fn stats(mut v: Vec<Duration>) -> Stats {
    if v.is_empty() {
        return Stats::default();
    }
    v.sort_unstable();
    let rank = |p: f64| -> Duration {
        let i = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
        v[i]
    };
    let total: Duration = v.iter().sum();
    Stats {
        n: v.len(),
        p50: rank(0.50),
        p99: rank(0.99),
        max: v[v.len() - 1],
        mean: total / v.len() as u32,
    }
}

pub(crate) fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.3} ms")
    } else if ms < 1000.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}x", a / b)
    } else {
        "n/a".into()
    }
}

/// One measured run of appends.
#[derive(Clone, Debug, Default)]
struct Run {
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    elapsed: Duration,
    lat: Stats,
    /// Appends/s in the run's second half over its first half.
    drift: f64,
    /// CPU time of the store's writer thread during the run, where the
    /// platform tells (Linux).
    writer_cpu: Option<Duration>,
    /// CPU time of the whole process (every thread) during the run.
    process_cpu: Option<Duration>,
}

/// CPU time (user + system) so far of this process's thread named `name`,
/// from `/proc`.
fn thread_cpu(name: &str) -> Option<Duration> {
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end() == name {
            return stat_cpu(&task.path().join("stat"));
        }
    }
    None
}

/// CPU time (user + system) so far of the whole process, from `/proc`.
pub(crate) fn process_cpu() -> Option<Duration> {
    stat_cpu(Path::new("/proc/self/stat"))
}

/// utime + stime of a `/proc` stat file, in ticks of 1/100 s (the kernel's
/// fixed `USER_HZ`).
fn stat_cpu(path: &Path) -> Option<Duration> {
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the parenthesized name: state is field 3; utime and
    // stime are fields 14 and 15.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

impl Run {
    fn rate(&self) -> f64 {
        if self.elapsed.is_zero() {
            0.0
        } else {
            self.ok as f64 / self.elapsed.as_secs_f64()
        }
    }
    /// CPU per append: of the writer thread, what bounds throughput once
    /// commits are shared and far steadier than appends/s on a shared
    /// machine; of the whole process, whose callers' side competes with the
    /// writer for the second of two cores.
    fn per_append(&self, cpu: Option<Duration>) -> Option<Duration> {
        let cpu = cpu?;
        (self.ok > 0).then(|| cpu / self.ok as u32)
    }
}

/// What one writer saw: per successful append its completion time (since
/// the run's start) and its latency.
#[derive(Default)]
struct WriterLog {
    done_at: Vec<Duration>,
    lat: Vec<Duration>,
    errors: u64,
    first_error: Option<String>,
}

fn summarize(logs: Vec<WriterLog>, elapsed: Duration, window: Duration) -> Run {
    let half = window / 2;
    let (mut early, mut late) = (0u64, 0u64);
    let mut lat = Vec::new();
    let mut run = Run {
        elapsed,
        ..Run::default()
    };
    for log in logs {
        for t in &log.done_at {
            if *t < half {
                early += 1;
            } else if *t < window {
                late += 1;
            }
        }
        run.ok += log.lat.len() as u64;
        run.errors += log.errors;
        if run.first_error.is_none() {
            run.first_error = log.first_error;
        }
        lat.extend(log.lat);
    }
    run.lat = stats(lat);
    run.drift = if early > 0 {
        late as f64 / early as f64
    } else {
        0.0
    };
    run
}

// ---------------------------------------------------------------------------
// baton bench append

const OWNER: &str = "bench";
const NODE: &str = "bench-node";

async fn append(args: AppendArgs) -> anyhow::Result<()> {
    if args.writers.is_empty() || args.writers.iter().any(|&w| w == 0 || w > 4096) {
        bail!("--writers: each count must be between 1 and 4096");
    }
    if !(0.1..=600.0).contains(&args.seconds) {
        bail!("--seconds must be between 0.1 and 600");
    }
    if args.sessions > 100_000 {
        bail!("--sessions must be at most 100000");
    }
    let window = Duration::from_secs_f64(args.seconds);
    let scratch = Scratch::new(args.dir.as_deref())?;
    println!("baton bench append");
    println!(
        "  scratch dir {} ({}s per measurement; store and baseline alternate per writer count)",
        scratch.path().display(),
        args.seconds
    );
    match args.sessions {
        0 => println!("  store: Store::post_message, one session per writer, policy queue"),
        n => println!(
            "  store: Store::post_message over {n} sessions (writer w's k-th post goes to session (w + k*writers) mod {n}), policy queue"
        ),
    }
    println!("         sessions created beforehand; each one's first post starts a turn nobody runs, so later posts queue (capacity 10,000,000)");
    println!("  baseline: sqlx SqliteConnection per writer, one INSERT per transaction (autocommit), WAL, synchronous=FULL, busy_timeout 60 s");
    println!();

    let mut rows = Vec::new();
    for (i, &w) in args.writers.iter().enumerate() {
        let base_db = scratch.path().join(format!("baseline-{i}-{w}.db"));
        eprintln!("  [{w} writers] baseline…");
        let base = run_baseline(&base_db, w, window).await?;
        remove_db(&base_db);
        eprintln!("  [{w} writers] store…");
        let store_db = scratch.path().join(format!("store-{i}-{w}.db"));
        let sessions = if args.sessions == 0 { w } else { args.sessions };
        let (store, depth) = run_store(&store_db, w, sessions, window).await?;
        remove_db(&store_db);
        rows.push((w, sessions, store, base, depth));
    }

    let base1 = rows
        .iter()
        .find(|r| r.0 == 1)
        .map(|r| r.3.rate())
        .unwrap_or(0.0);
    println!(
        "{:>7} | {:>11} {:>10} {:>10} | {:>11} {:>10} {:>10} | {:>12} {:>14}",
        "writers",
        "store ap/s",
        "p50",
        "p99",
        "base ap/s",
        "p50",
        "p99",
        "store/base@1",
        "store/base@same"
    );
    println!("{}", "-".repeat(116));
    for (w, _, s, b, _) in &rows {
        println!(
            "{:>7} | {:>11.0} {:>10} {:>10} | {:>11.0} {:>10} {:>10} | {:>12} {:>14}",
            w,
            s.rate(),
            ms(s.lat.p50),
            ms(s.lat.p99),
            b.rate(),
            ms(b.lat.p50),
            ms(b.lat.p99),
            ratio(s.rate(), base1),
            ratio(s.rate(), b.rate()),
        );
    }
    println!();
    println!("details (drift = appends/s in the 2nd half of the window over the 1st half):");
    for (w, sessions, s, b, depth) in &rows {
        println!(
            "  {w:>4} writers: store {} appends in {:.2}s over {sessions} sessions, deepest queue {depth}, drift {:.2}, errors {}; \
             baseline {} in {:.2}s, drift {:.2}, errors {}",
            s.ok,
            s.elapsed.as_secs_f64(),
            s.drift,
            s.errors,
            b.ok,
            b.elapsed.as_secs_f64(),
            b.drift,
            b.errors,
        );
        if let Some(cpu) = s.per_append(s.writer_cpu) {
            println!(
                "        store writer thread: {:.1} µs of CPU per append ({:.0}% busy)",
                cpu.as_secs_f64() * 1e6,
                100.0 * s.writer_cpu.unwrap_or_default().as_secs_f64() / s.elapsed.as_secs_f64()
            );
        }
        if let Some(cpu) = s.per_append(s.process_cpu) {
            println!(
                "        store process (all threads): {:.1} µs of CPU per append ({:.2} cores)",
                cpu.as_secs_f64() * 1e6,
                s.process_cpu.unwrap_or_default().as_secs_f64() / s.elapsed.as_secs_f64()
            );
        }
        for (what, r) in [("store", s), ("baseline", b)] {
            if let Some(e) = &r.first_error {
                println!("        first {what} error: {e}");
            }
        }
    }
    if base1 == 0.0 {
        println!("  (no 1-writer run: the store/base@1 column needs --writers to include 1)");
    }
    if let (Some(top), true) = (rows.iter().max_by_key(|r| r.0), base1 > 0.0) {
        let x = top.2.rate() / base1;
        println!();
        println!(
            "target: {} writers at well over 10x the 1-writer baseline: {:.1}x ({})",
            top.0,
            x,
            if x > 10.0 { "met" } else { "MISSED" }
        );
    }
    Ok(())
}

fn remove_db(db: &Path) {
    for suffix in ["", "-wal", "-shm", ".lock"] {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
}

/// The store's real write path: `post_message` to sessions created first.
async fn run_store(
    db: &Path,
    writers: usize,
    sessions: usize,
    window: Duration,
) -> anyhow::Result<(Run, u64)> {
    let cfg = StoreConfig {
        queue_capacity: 10_000_000,
        ..StoreConfig::default()
    };
    let store = Arc::new(
        SqlStore::open_sqlite(db, cfg)
            .await
            .with_context(|| format!("opening the store at {}", db.display()))?,
    );
    let ids = create_sessions(&store, sessions, 64).await?;
    let cpu = || (thread_cpu("baton-writer"), process_cpu());
    let before = cpu();
    let (mut run, depth) = post_load(&store, &ids, writers, window).await?;
    let after = cpu();
    let spent = |a: Option<Duration>, b: Option<Duration>| Some(b?.saturating_sub(a?));
    run.writer_cpu = spent(before.0, after.0);
    run.process_cpu = spent(before.1, after.1);
    let result = (run, depth);
    drop(store);
    // Let the writer task close its connection (checkpoint) before the next run.
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(result)
}

/// Creates `n` idle sessions (policy `queue`), `concurrency` at a time.
async fn create_sessions(
    store: &Arc<SqlStore>,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<Vec<SessionId>> {
    use futures_util::{StreamExt, TryStreamExt};

    futures_util::stream::iter(0..n)
        .map(|_| {
            let store = store.clone();
            async move {
                store
                    .create_session(CreateSession {
                        owner: OWNER.into(),
                        agent: "demo".into(),
                        policy: Policy::Queue,
                        metadata: json!({}),
                        idempotency_key: None,
                        fingerprint: String::new(),
                        message: None,
                        permission: None,
                        node: NODE.into(),
                        debounce_ms: 0,
                    })
                    .await
                    .map(|c| c.session.id)
            }
        })
        .buffer_unordered(concurrency.max(1))
        .try_collect()
        .await
        .context("creating the sessions")
}

/// `writers` tasks call `post_message` for `window`, writer w's k-th post
/// going to session `(w + k*writers) mod ids.len()`. Returns the run and the
/// deepest queue left behind.
async fn post_load(
    store: &Arc<SqlStore>,
    ids: &[SessionId],
    writers: usize,
    window: Duration,
) -> anyhow::Result<(Run, u64)> {
    if ids.is_empty() {
        bail!("no sessions to post to");
    }
    let ids = Arc::new(ids.to_vec());
    let start = Instant::now();
    let deadline = start + window;
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let store = store.clone();
            let ids = ids.clone();
            tokio::spawn(async move {
                let mut log = WriterLog::default();
                let mut k = 0usize;
                while Instant::now() < deadline {
                    let session_id = ids[(w + k * writers) % ids.len()];
                    let t0 = Instant::now();
                    let r = store
                        .post_message(PostMessage {
                            owner: OWNER.into(),
                            session_id,
                            content: format!("bench message {w}/{k}"),
                            policy: None,
                            idempotency_key: None,
                            node: NODE.into(),
                            mid_turn_agents: Vec::new(),
                        })
                        .await;
                    let t1 = Instant::now();
                    match r {
                        Ok(_) => {
                            log.lat.push(t1 - t0);
                            log.done_at.push(t1 - start);
                        }
                        Err(e) => {
                            log.errors += 1;
                            log.first_error.get_or_insert_with(|| e.to_string());
                        }
                    }
                    k += 1;
                }
                log
            })
        })
        .collect();
    let mut logs = Vec::with_capacity(writers);
    for t in tasks {
        logs.push(t.await.context("a store writer panicked")?);
    }
    let elapsed = start.elapsed();
    let mut depth = 0u64;
    for id in ids.iter() {
        let s = store.session(OWNER, *id).await?;
        depth = depth.max(s.queued);
    }
    Ok((summarize(logs, elapsed, window), depth))
}

/// The raw baseline: one INSERT per transaction on its own connection per
/// writer; concurrent writers contend on SQLite's write lock.
async fn run_baseline(db: &Path, writers: usize, window: Duration) -> anyhow::Result<Run> {
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
    use sqlx::{ConnectOptions, Connection};

    let opts = SqliteConnectOptions::new()
        .filename(db)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(60))
        // Waits on the lock are the point here, not worth a warning each.
        .disable_statement_logging();
    let mut setup = opts.connect().await.context("opening the baseline")?;
    sqlx::query(
        "CREATE TABLE log (id INTEGER PRIMARY KEY, session TEXT NOT NULL, seq INTEGER NOT NULL, \
         content TEXT NOT NULL, created_at INTEGER NOT NULL)",
    )
    .execute(&mut setup)
    .await
    .context("creating the baseline table")?;
    let mut conns = Vec::with_capacity(writers);
    for _ in 0..writers {
        conns.push(
            opts.connect()
                .await
                .context("connecting a baseline writer")?,
        );
    }
    let start = Instant::now();
    let deadline = start + window;
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(w, mut conn)| {
            tokio::spawn(async move {
                let mut log = WriterLog::default();
                let session = format!("session-{w}");
                let mut k = 0i64;
                while Instant::now() < deadline {
                    let t0 = Instant::now();
                    let r = sqlx::query(
                        "INSERT INTO log (session, seq, content, created_at) VALUES (?1, ?2, ?3, ?4)",
                    )
                    .bind(&session)
                    .bind(k)
                    .bind(format!("bench message {w}/{k}"))
                    .bind(t0.duration_since(start).as_micros() as i64)
                    .execute(&mut conn)
                    .await;
                    let t1 = Instant::now();
                    match r {
                        Ok(_) => {
                            log.lat.push(t1 - t0);
                            log.done_at.push(t1 - start);
                        }
                        Err(e) => {
                            log.errors += 1;
                            log.first_error.get_or_insert_with(|| e.to_string());
                        }
                    }
                    k += 1;
                }
                let _ = conn.close().await;
                log
            })
        })
        .collect();
    let mut logs = Vec::with_capacity(writers);
    for t in tasks {
        logs.push(t.await.context("a baseline writer panicked")?);
    }
    let elapsed = start.elapsed();
    let _ = setup.close().await;
    Ok(summarize(logs, elapsed, window))
}

// ---------------------------------------------------------------------------
// baton bench post

/// How long any wait in the post benchmark may take before it gives up.
const PATIENCE: Duration = Duration::from_secs(60);

/// Waits, polling every `poll`, until no session actor of `engine` runs (so
/// a measurement starts with nothing left over from the one before).
pub(crate) async fn wait_quiet(
    engine: &baton_engine::Engine,
    poll: Duration,
    patience: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + patience;
    while engine.active_actors() > 0 {
        if Instant::now() > deadline {
            bail!("session actors still running after {patience:?}");
        }
        tokio::time::sleep(poll).await;
    }
    Ok(())
}

const LOCAL: &str = "local";

pub(crate) struct Http {
    base: String,
    client: reqwest::Client,
}

impl Http {
    async fn json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(reqwest::StatusCode, Value)> {
        let mut rb = self.client.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let resp = rb
            .send()
            .await
            .with_context(|| format!("requesting {path}"))?;
        let status = resp.status();
        let bytes = resp.bytes().await.context("reading a response")?;
        let v = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        };
        Ok((status, v))
    }

    pub(crate) async fn create(&self, message: Option<&str>) -> anyhow::Result<SessionId> {
        let body = match message {
            Some(m) => json!({ "policy": "queue", "message": m }),
            None => json!({ "policy": "queue" }),
        };
        let (status, v) = self
            .json(reqwest::Method::POST, "/v1/sessions", Some(body))
            .await?;
        if status != reqwest::StatusCode::CREATED {
            bail!("creating a session: {status} {v}");
        }
        let id = v["id"].as_str().unwrap_or_default();
        SessionId::parse(id).map_err(|_| anyhow::anyhow!("bad session id in {v}"))
    }

    /// One timed post: from sending the request to having read the whole
    /// `201` response (its body is small and arrives with the headers).
    async fn timed_post(
        &self,
        id: SessionId,
        content: &str,
    ) -> anyhow::Result<(Duration, reqwest::StatusCode, Vec<u8>)> {
        let body = json!({ "content": content, "policy": "queue" });
        let rb = self
            .client
            .post(format!("{}/v1/sessions/{id}/messages", self.base))
            .json(&body);
        let t0 = Instant::now();
        let resp = rb.send().await.context("posting a message")?;
        let status = resp.status();
        let bytes = resp.bytes().await.context("reading a post's response")?;
        let took = t0.elapsed();
        Ok((took, status, bytes.to_vec()))
    }
}

/// Checks a post's answer: `201` with the expected disposition type.
fn check_post(status: reqwest::StatusCode, body: &[u8], want: &str) -> anyhow::Result<()> {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    if status != reqwest::StatusCode::CREATED || v["disposition"]["type"] != want {
        bail!("expected 201 with disposition {want:?}, got {status} {v}");
    }
    Ok(())
}

pub(crate) struct Server {
    http: Arc<Http>,
    engine: baton_engine::Engine,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Server {
    async fn start(db: &Path, args: &PostArgs) -> anyhow::Result<Self> {
        let mut cfg = ServeConfig::embedded(db.to_string_lossy());
        cfg.demo_word_delay_ms = args.word_delay_ms;
        cfg.queue_capacity = args.posts + 10;
        Self::start_with(&cfg).await
    }

    /// The server's base URL.
    pub(crate) fn base(&self) -> &str {
        &self.http.base
    }

    /// A client of the server.
    pub(crate) fn http(&self) -> &Http {
        &self.http
    }

    /// A server built by `App::build` from `cfg`, on loopback.
    pub(crate) async fn start_with(cfg: &ServeConfig) -> anyhow::Result<Self> {
        if !cfg.listen.ip().is_loopback() {
            bail!("the benchmark server must listen on loopback");
        }
        let app = App::build(cfg)
            .await
            .with_context(|| format!("starting a server on {}", cfg.store_display()))?;
        let engine = app.engine().clone();
        let base = format!("http://{}", app.addr());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until(async move {
            let _ = rx.await;
        }));
        let client = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(64)
            .timeout(PATIENCE)
            .build()
            .context("building the HTTP client")?;
        Ok(Self {
            http: Arc::new(Http { base, client }),
            engine,
            stop: Some(tx),
            task,
        })
    }

    pub(crate) async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.task.await.context("the server task panicked")?
    }

    /// Opens `n` keep-alive connections so no measured post pays a connect.
    async fn warm(&self, n: usize) -> anyhow::Result<()> {
        for _ in 0..3 {
            let gets = (0..n).map(|_| self.http.json(reqwest::Method::GET, "/healthz", None));
            futures_util::future::try_join_all(gets).await?;
        }
        Ok(())
    }

    /// Waits until the session is idle with nothing queued and, with
    /// `max_actors`, until at most that many session actors run on the
    /// server (so the previous turn's actor has exited too).
    async fn wait_idle(&self, id: SessionId, max_actors: Option<usize>) -> anyhow::Result<()> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let s = self.engine.session(LOCAL, id).await?;
            let idle = s.status == SessionStatus::Idle && s.queued == 0;
            if idle && max_actors.is_none_or(|m| self.engine.active_actors() <= m) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("session {id} did not become idle in {PATIENCE:?}");
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    }

    /// Waits until no session actor runs on the server.
    async fn wait_quiet(&self) -> anyhow::Result<()> {
        wait_quiet(&self.engine, Duration::from_millis(2), PATIENCE).await
    }

    /// A session whose first message `/hang` is a turn in flight (running).
    async fn hanging_session(&self) -> anyhow::Result<SessionId> {
        let id = self.http.create(Some("/hang")).await?;
        let deadline = Instant::now() + PATIENCE;
        loop {
            let turns = self.engine.store().turns(id).await?;
            if turns.iter().any(|t| t.status == TurnStatus::Running) {
                return Ok(id);
            }
            if Instant::now() > deadline {
                bail!("the /hang turn never started running");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Deletes a session (cancels its turn; its queue is dropped, not run).
    async fn delete(&self, id: SessionId) -> anyhow::Result<()> {
        let (status, v) = self
            .http
            .json(reqwest::Method::DELETE, &format!("/v1/sessions/{id}"), None)
            .await?;
        if status != reqwest::StatusCode::NO_CONTENT {
            bail!("deleting session {id}: {status} {v}");
        }
        Ok(())
    }
}

/// Mid-turn: `posts` posts from `clients` concurrent clients to one session
/// whose turn hangs. Returns the latencies in completion order.
async fn mid_turn(server: &Server, posts: usize, clients: usize) -> anyhow::Result<Vec<Duration>> {
    server.wait_quiet().await?;
    let id = server.hanging_session().await?;
    let per = split(posts, clients);
    let tasks: Vec<_> = per
        .into_iter()
        .enumerate()
        .map(|(c, n)| {
            let http = server.http.clone();
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(n);
                for k in 0..n {
                    let (took, status, body) = http
                        .timed_post(id, &format!("mid-turn message {c}/{k}"))
                        .await?;
                    check_post(status, &body, "queued")?;
                    lat.push((Instant::now(), took));
                }
                anyhow::Ok(lat)
            })
        })
        .collect();
    let mut all = Vec::with_capacity(posts);
    for t in tasks {
        all.extend(t.await.context("a client panicked")??);
    }
    server.delete(id).await?;
    server.wait_quiet().await?;
    Ok(in_order(all))
}

/// Idle: `posts` posts from `clients` concurrent clients, each to its own
/// session, each post made only once that session is idle again (its turn
/// ended), so a post never waits behind its own previous turn; the other
/// clients' turns do run beside it.
async fn idle(server: &Server, posts: usize, clients: usize) -> anyhow::Result<Vec<Duration>> {
    server.wait_quiet().await?;
    let per = split(posts, clients);
    let mut ids = Vec::with_capacity(clients);
    for _ in 0..clients {
        ids.push(server.http.create(None).await?);
    }
    let server_ref = server;
    let runs =
        per.into_iter()
            .zip(ids.iter().copied())
            .enumerate()
            .map(|(c, (n, id))| async move {
                let mut lat = Vec::with_capacity(n);
                for k in 0..n {
                    server_ref.wait_idle(id, None).await?;
                    let (took, status, body) = server_ref
                        .http
                        .timed_post(id, &format!("idle message {c}/{k}"))
                        .await?;
                    check_post(status, &body, "started")?;
                    lat.push((Instant::now(), took));
                }
                server_ref.wait_idle(id, None).await?;
                anyhow::Ok(lat)
            });
    let per_client = futures_util::future::try_join_all(runs).await?;
    for id in ids {
        server.delete(id).await?;
    }
    server.wait_quiet().await?;
    Ok(in_order(per_client.into_iter().flatten().collect()))
}

/// The sequential case: one client alternates an idle post and a mid-turn
/// post, `posts` of each, so both see the same machine load (the machine is
/// shared and noisy). The idle post goes to a session idle again (its
/// previous turn ended and its actor exited: only the `/hang` session's actor
/// runs); the mid-turn post queues behind a `/hang` turn, its queue growing
/// to `posts`. Returns (idle, mid-turn) latencies in order.
async fn paired(server: &Server, posts: usize) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    server.wait_quiet().await?;
    let hang = server.hanging_session().await?;
    let id = server.http.create(None).await?;
    let (mut idle, mut mid) = (Vec::with_capacity(posts), Vec::with_capacity(posts));
    for k in 0..posts {
        server.wait_idle(id, Some(1)).await?;
        let (took, status, body) = server
            .http
            .timed_post(id, &format!("idle message {k}"))
            .await?;
        check_post(status, &body, "started")?;
        idle.push(took);
        server.wait_idle(id, Some(1)).await?;
        let (took, status, body) = server
            .http
            .timed_post(hang, &format!("mid-turn message {k}"))
            .await?;
        check_post(status, &body, "queued")?;
        mid.push(took);
    }
    server.delete(hang).await?;
    server.delete(id).await?;
    server.wait_quiet().await?;
    Ok((idle, mid))
}

/// Latencies in the order their posts completed.
fn in_order(mut v: Vec<(Instant, Duration)>) -> Vec<Duration> {
    v.sort_by_key(|(at, _)| *at);
    v.into_iter().map(|(_, d)| d).collect()
}

fn split(total: usize, parts: usize) -> Vec<usize> {
    (0..parts)
        .map(|i| total / parts + usize::from(i < total % parts))
        .collect()
}

/// p50 of the first and last tenth of a sequence of latencies.
pub(crate) fn ends(lat: &[Duration]) -> (Duration, Duration) {
    let tenth = (lat.len() / 10).max(1).min(lat.len());
    let head = stats(lat[..tenth].to_vec()).p50;
    let tail = stats(lat[lat.len() - tenth..].to_vec()).p50;
    (head, tail)
}

async fn post(args: PostArgs) -> anyhow::Result<()> {
    if !(10..=100_000).contains(&args.posts) {
        bail!("--posts must be between 10 and 100000");
    }
    if args.clients > 256 {
        bail!("--clients must be at most 256");
    }
    if args.word_delay_ms > 1000 {
        bail!("--word-delay-ms must be at most 1000");
    }
    let scratch = Scratch::new(args.dir.as_deref())?;
    let db = scratch.path().join("baton.db");
    let server = Server::start(&db, &args).await?;
    println!("baton bench post");
    println!(
        "  embedded server on {} (SQLite WAL, synchronous=FULL, group commit), scratch dir {}",
        server.http.base,
        scratch.path().display()
    );
    println!(
        "  POST /v1/sessions/{{id}}/messages {{content, policy: queue}}: time from send to the whole 201 read, HTTP/1.1 keep-alive, connections warmed"
    );
    println!(
        "  mid-turn: one session whose turn runs `/hang`; {} posts queue behind it (capacity {})",
        args.posts,
        args.posts + 10
    );
    println!(
        "  idle: each post waits (untimed) until its session is idle again, so it starts a turn ({}ms demo word delay) and is timed alone",
        args.word_delay_ms
    );
    println!("  1 client: idle and mid-turn posts alternate, so both see the same load on this shared machine");
    if args.clients > 1 {
        println!(
            "  {} clients: {} idle posts (each client its own session), then {} mid-turn posts (all to one /hang session)",
            args.clients, args.posts, args.posts
        );
    }
    println!();
    let mut levels = vec![1usize];
    if args.clients > 1 {
        levels.push(args.clients);
    }
    let result = async {
        let mut rows = Vec::new();
        for &c in &levels {
            server.warm(c).await?;
            if c == 1 {
                eprintln!("  [1 client] idle and mid-turn, alternating…");
                let (i, m) = paired(&server, args.posts).await?;
                rows.push((c, i, m));
                continue;
            }
            eprintln!("  [{c} clients] idle…");
            let i = idle(&server, args.posts, c).await?;
            eprintln!("  [{c} clients] mid-turn…");
            let m = mid_turn(&server, args.posts, c).await?;
            rows.push((c, i, m));
        }
        anyhow::Ok(rows)
    }
    .await;
    let stopped = server.stop().await;
    let rows = result?;
    stopped?;

    println!(
        "{:>7} | {:>8} | {:>6} | {:>10} {:>10} {:>10} {:>10} | {:>21}",
        "clients", "case", "posts", "p50", "p99", "mean", "max", "p50 first/last 10%"
    );
    println!("{}", "-".repeat(99));
    let mut verdicts = Vec::new();
    for (c, i, m) in &rows {
        let (si, sm) = (stats(i.clone()), stats(m.clone()));
        for (case, lat, s) in [("idle", i, si), ("mid-turn", m, sm)] {
            let (head, tail) = ends(lat);
            println!(
                "{:>7} | {:>8} | {:>6} | {:>10} {:>10} {:>10} {:>10} | {:>10} {:>10}",
                c,
                case,
                s.n,
                ms(s.p50),
                ms(s.p99),
                ms(s.mean),
                ms(s.max),
                ms(head),
                ms(tail)
            );
        }
        let r50 = sm.p50.as_secs_f64() / si.p50.as_secs_f64().max(1e-9);
        let r99 = sm.p99.as_secs_f64() / si.p99.as_secs_f64().max(1e-9);
        println!(
            "{:>7} | mid-turn/idle: p50 {:.2}x, p99 {:.2}x",
            "", r50, r99
        );
        verdicts.push((*c, r50, sm.p50));
    }
    println!();
    println!("(with >1 client, each client posts to its own idle session, and all share one mid-turn session)");
    for (c, r50, p50) in verdicts {
        let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
        let lead = if c == 1 {
            "target (sequential, 1 client):".to_owned()
        } else {
            format!("for reference ({c} clients, not the target):")
        };
        println!(
            "{lead} mid-turn p50 within 1.5x of idle: {r50:.2}x ({}); under 2 ms: {} ({})",
            verdict(r50 <= 1.5),
            ms(p50),
            verdict(p50 < Duration::from_millis(2)),
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// PostgreSQL: the scratch database

/// The name of this run's scratch database.
fn scratch_db_name() -> String {
    format!("baton_bench_{}", std::process::id())
}

/// Connection options for the server named by `url`, which must be on this
/// machine (loopback), pointed at its `postgres` maintenance database.
fn pg_admin_options(url: &str) -> anyhow::Result<sqlx::postgres::PgConnectOptions> {
    use sqlx::ConnectOptions;

    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        bail!("--database-url must be a postgres:// URL");
    }
    let opts: sqlx::postgres::PgConnectOptions = url.parse().context("parsing --database-url")?;
    let host = opts.get_host();
    let loopback = host == "localhost"
        || host
            .trim_matches(|c| c == '[' || c == ']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        bail!("--database-url must name a server on this machine (127.0.0.1, ::1 or localhost), not {host:?}");
    }
    Ok(opts.database("postgres").disable_statement_logging())
}

/// `url` with its database replaced by `db` (query parameters kept).
fn url_with_database(url: &str, db: &str) -> anyhow::Result<String> {
    let (scheme, rest) = url
        .split_once("://")
        .context("--database-url must look like postgres://USER@HOST:PORT/DB")?;
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let authority = before_query
        .split_once('/')
        .map_or(before_query, |(a, _)| a);
    let mut out = format!("{scheme}://{authority}/{db}");
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    Ok(out)
}

/// What the benchmarks print about the server.
struct PgServer {
    version: String,
    settings: String,
}

/// Creates the scratch database on the server of `url` (dropping a leftover
/// of the same name first); returns its URL and what the server is.
async fn create_scratch_db(url: &str) -> anyhow::Result<(String, PgServer)> {
    use sqlx::Connection;

    let admin = pg_admin_options(url)?;
    let name = scratch_db_name();
    let scratch_url = url_with_database(url, &name)?;
    let work = async {
        let mut c = sqlx::postgres::PgConnection::connect_with(&admin)
            .await
            .context("connecting to the server's `postgres` database")?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut c)
            .await
            .with_context(|| format!("dropping a leftover {name}"))?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut c)
            .await
            .with_context(|| format!("creating the scratch database {name}"))?;
        let version: String = sqlx::query_scalar("SELECT version()")
            .fetch_one(&mut c)
            .await?;
        let settings: String = sqlx::query_scalar(
            "SELECT string_agg(name || '=' || setting || COALESCE(unit, ''), ', ' ORDER BY name) \
             FROM pg_settings WHERE name IN ('synchronous_commit', 'fsync', 'wal_sync_method', \
             'commit_delay', 'shared_buffers', 'max_connections')",
        )
        .fetch_one(&mut c)
        .await?;
        let _ = c.close().await;
        anyhow::Ok(PgServer { version, settings })
    };
    let server = tokio::time::timeout(PATIENCE, work)
        .await
        .map_err(|_| anyhow!("creating the scratch database took over {PATIENCE:?}"))??;
    Ok((scratch_url, server))
}

/// Drops the scratch database, closing whatever still uses it.
async fn drop_scratch_db(url: &str) -> anyhow::Result<()> {
    use sqlx::Connection;

    let admin = pg_admin_options(url)?;
    let name = scratch_db_name();
    let work = async {
        let mut c = sqlx::postgres::PgConnection::connect_with(&admin)
            .await
            .context("connecting to the server's `postgres` database")?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut c)
            .await
            .with_context(|| format!("dropping the scratch database {name}"))?;
        let _ = c.close().await;
        anyhow::Ok(())
    };
    tokio::time::timeout(PATIENCE, work)
        .await
        .map_err(|_| anyhow!("dropping the scratch database took over {PATIENCE:?}"))?
}

/// Runs `bench` against a fresh scratch database on the server of `url`,
/// then drops the database — also after an error, a panic or Ctrl-C. The
/// bench runs on a runtime of its own that is shut down before the drop, so
/// every task and connection it left behind (pools, the cross-node bus's
/// listener and notifier) is gone by then.
async fn with_scratch_db<F, Fut>(url: &str, bench: F) -> anyhow::Result<()>
where
    F: FnOnce(String, PgServer) -> Fut + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let (scratch_url, server) = create_scratch_db(url).await?;
    eprintln!("  scratch database {} created", scratch_db_name());
    let ran = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the benchmark's runtime")?;
        let result = rt.block_on(interruptible(bench(scratch_url, server)));
        rt.shutdown_timeout(Duration::from_secs(5));
        result
    })
    .await;
    let dropped = drop_scratch_db(url).await;
    if dropped.is_ok() {
        eprintln!("  scratch database {} dropped", scratch_db_name());
    }
    let result = match ran {
        Ok(r) => r,
        Err(e) => Err(anyhow!("the benchmark panicked: {e}")),
    };
    match (result, dropped) {
        (Ok(()), d) => d,
        (Err(e), Ok(())) => Err(e),
        (Err(e), Err(d)) => Err(e.context(format!(
            "and the scratch database {} could not be dropped: {d:#}",
            scratch_db_name()
        ))),
    }
}

// ---------------------------------------------------------------------------
// baton bench pg-append

fn check_pg_append(args: &PgAppendArgs) -> anyhow::Result<()> {
    pg_admin_options(&args.database_url)?;
    if args.writers.is_empty() || args.writers.iter().any(|&w| w == 0 || w > 4096) {
        bail!("--writers: each count must be between 1 and 4096");
    }
    if !(0.1..=600.0).contains(&args.seconds) {
        bail!("--seconds must be between 0.1 and 600");
    }
    if !(1..=100_000).contains(&args.sessions) {
        bail!("--sessions must be between 1 and 100000");
    }
    if !(1..=1000).contains(&args.max_connections) {
        bail!("--max-connections must be between 1 and 1000");
    }
    Ok(())
}

/// One writer count: the baseline and the store's layouts.
struct PgRow {
    writers: usize,
    base: Run,
    /// (layout, sessions, store run, deepest queue, counter-row baseline)
    layouts: Vec<(&'static str, usize, Run, u64, Run)>,
}

/// A run as `--json` prints it.
fn run_json(r: &Run) -> Value {
    json!({
        "rate": r.rate(),
        "p50_ms": r.lat.p50.as_secs_f64() * 1000.0,
        "p99_ms": r.lat.p99.as_secs_f64() * 1000.0,
        "ok": r.ok,
        "errors": r.errors,
    })
}

fn over(a: f64, b: f64) -> Value {
    if b > 0.0 {
        json!(a / b)
    } else {
        Value::Null
    }
}

async fn pg_append(args: PgAppendArgs, url: String, server: PgServer) -> anyhow::Result<()> {
    let window = Duration::from_secs_f64(args.seconds);
    let cfg = StoreConfig {
        queue_capacity: 100_000_000,
        max_connections: args.max_connections,
        ..StoreConfig::default()
    };
    // With --json, stdout carries only the objects; the description goes
    // to stderr.
    let say = |line: String| {
        if args.json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    };
    say("baton bench pg-append".into());
    say(format!("  server: {}", server.version));
    say(format!("  settings: {}", server.settings));
    say(format!(
        "  scratch database {} ({}s per measurement; per writer count: insert baseline, then per layout the store and the counter-row baseline)",
        scratch_db_name(),
        args.seconds
    ));
    say(format!(
        "  store: SqlStore::open_postgres (pool of {}), Store::post_message, policy queue, capacity 100,000,000",
        args.max_connections
    ));
    say(format!(
        "         spread: {} fresh sessions per run (writer w's k-th post goes to session (w + k*writers) mod {}); hot: 1 fresh session",
        args.sessions, args.sessions
    ));
    say(
        "         each session's first post starts a turn nobody runs, so later posts queue".into(),
    );
    say(format!(
        "  insert baseline: sqlx PgPool of min(writers, {}) connections, one single-row INSERT per transaction (autocommit) \
         into a fresh table (session_id TEXT, seq BIGINT, kind TEXT, content TEXT, created_at BIGINT, PRIMARY KEY (session_id, seq))",
        args.max_connections
    ));
    say("  counter baseline: the same pool and table plus a counter row per session; per append one transaction: \
         UPDATE counter SET last_seq = last_seq + 1 WHERE session_id = $1 RETURNING last_seq, then the INSERT at that seq, \
         the sessions laid out as the store's".into());
    say(String::new());

    let mut rows = Vec::new();
    for &w in &args.writers {
        let conns = u32::try_from(w)
            .unwrap_or(u32::MAX)
            .min(args.max_connections);
        eprintln!("  [{w} writers] baseline…");
        let base = run_pg_baseline(&url, w, conns, window).await?;
        // A fresh store (and pool) per writer count, closed before the next
        // baseline: both pools at once could exceed the server's
        // max_connections.
        let store = Arc::new(
            SqlStore::open_postgres(&url, cfg.clone())
                .await
                .context("opening the PostgreSQL store")?,
        );
        let mut runs = Vec::new();
        for (layout, n) in [("spread", args.sessions), ("hot", 1)] {
            eprintln!("  [{w} writers] store, {layout} ({n} session(s))…");
            let ids = create_sessions(&store, n, args.max_connections as usize).await?;
            let (run, depth) = post_load(&store, &ids, w, window).await?;
            runs.push((layout, n, run, depth));
        }
        drop(store);
        wait_for_disconnects(&url).await?;
        let mut layouts = Vec::new();
        for (layout, n, run, depth) in runs {
            eprintln!("  [{w} writers] counter baseline, {layout} ({n} session(s))…");
            let counter = run_pg_counter_baseline(&url, w, conns, n, window).await?;
            layouts.push((layout, n, run, depth, counter));
        }
        rows.push(PgRow {
            writers: w,
            base,
            layouts,
        });
    }

    let base1 = rows
        .iter()
        .find(|r| r.writers == 1)
        .map(|r| r.base.rate())
        .unwrap_or(0.0);
    if args.json {
        for r in &rows {
            for (layout, n, s, depth, counter) in &r.layouts {
                let line = json!({
                    "writers": r.writers,
                    "layout": layout,
                    "sessions": n,
                    "store": run_json(s),
                    "deepest_queue": depth,
                    "insert_baseline": run_json(&r.base),
                    "counter_baseline": run_json(counter),
                    "store_over_insert": over(s.rate(), r.base.rate()),
                    "store_over_counter": over(s.rate(), counter.rate()),
                    "seconds": args.seconds,
                });
                println!("{line}");
            }
        }
        return Ok(());
    }
    println!(
        "{:>7} | {:>13} | {:>11} {:>10} {:>10} | {:>11} {:>10} {:>10} | {:>11} {:>10} {:>10} | {:>10} {:>12} {:>13}",
        "writers",
        "layout",
        "store ap/s",
        "p50",
        "p99",
        "insert ap/s",
        "p50",
        "p99",
        "counter ap/s",
        "p50",
        "p99",
        "store/ins",
        "store/ins@1",
        "store/counter"
    );
    println!("{}", "-".repeat(170));
    for r in &rows {
        for (layout, n, s, _, counter) in &r.layouts {
            let label = if *n == 1 {
                "1 hot session".to_owned()
            } else {
                format!("{layout} {n}")
            };
            println!(
                "{:>7} | {:>13} | {:>11.0} {:>10} {:>10} | {:>11.0} {:>10} {:>10} | {:>11.0} {:>10} {:>10} | {:>10} {:>12} {:>13}",
                r.writers,
                label,
                s.rate(),
                ms(s.lat.p50),
                ms(s.lat.p99),
                r.base.rate(),
                ms(r.base.lat.p50),
                ms(r.base.lat.p99),
                counter.rate(),
                ms(counter.lat.p50),
                ms(counter.lat.p99),
                ratio(s.rate(), r.base.rate()),
                ratio(s.rate(), base1),
                ratio(s.rate(), counter.rate()),
            );
        }
    }
    println!();
    println!("details (drift = appends/s in the 2nd half of the window over the 1st half):");
    for r in &rows {
        let b = &r.base;
        println!(
            "  {:>4} writers: baseline {} inserts in {:.2}s, drift {:.2}, errors {}",
            r.writers,
            b.ok,
            b.elapsed.as_secs_f64(),
            b.drift,
            b.errors
        );
        if let Some(e) = &b.first_error {
            println!("        first baseline error: {e}");
        }
        for (layout, n, s, depth, counter) in &r.layouts {
            println!(
                "        store {layout}: {} appends in {:.2}s over {n} sessions, deepest queue {depth}, drift {:.2}, errors {}",
                s.ok,
                s.elapsed.as_secs_f64(),
                s.drift,
                s.errors
            );
            if let Some(e) = &s.first_error {
                println!("        first store error ({layout}): {e}");
            }
            println!(
                "        counter baseline {layout}: {} appends in {:.2}s, drift {:.2}, errors {}",
                counter.ok,
                counter.elapsed.as_secs_f64(),
                counter.drift,
                counter.errors
            );
            if let Some(e) = &counter.first_error {
                println!("        first counter baseline error ({layout}): {e}");
            }
        }
    }
    if base1 == 0.0 {
        println!("  (no 1-writer run: the store/base@1 column needs --writers to include 1)");
    }
    Ok(())
}

/// Waits until nothing but this check is connected to the database at
/// `url` (a dropped pool closes its connections without waiting).
async fn wait_for_disconnects(url: &str) -> anyhow::Result<()> {
    use sqlx::Connection;

    let mut c = sqlx::postgres::PgConnection::connect(url)
        .await
        .context("connecting to check for open connections")?;
    let deadline = Instant::now() + PATIENCE;
    loop {
        let open: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .fetch_one(&mut c)
        .await?;
        if open == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("{open} connections to the scratch database still open after {PATIENCE:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = c.close().await;
    Ok(())
}

/// The raw baseline: `writers` tasks share a `PgPool` of `conns` connections
/// (all opened before the clock starts) and each loops over single-row
/// INSERTs, one transaction each (pgbench-style), into a fresh table that is
/// dropped afterwards.
async fn run_pg_baseline(
    url: &str,
    writers: usize,
    conns: u32,
    window: Duration,
) -> anyhow::Result<Run> {
    use sqlx::postgres::PgPoolOptions;

    let pool = PgPoolOptions::new()
        .max_connections(conns)
        .acquire_timeout(PATIENCE)
        .connect(url)
        .await
        .context("connecting the baseline's pool")?;
    sqlx::query("DROP TABLE IF EXISTS bench_baseline")
        .execute(&pool)
        .await
        .context("dropping a leftover baseline table")?;
    sqlx::query(
        "CREATE TABLE bench_baseline (session_id TEXT NOT NULL, seq BIGINT NOT NULL, kind TEXT NOT NULL, \
         content TEXT NOT NULL, created_at BIGINT NOT NULL, PRIMARY KEY (session_id, seq))",
    )
    .execute(&pool)
    .await
    .context("creating the baseline table")?;
    let result = pg_baseline_load(&pool, writers, conns, window).await;
    let dropped = sqlx::query("DROP TABLE bench_baseline")
        .execute(&pool)
        .await
        .context("dropping the baseline table");
    pool.close().await;
    let run = result?;
    dropped?;
    Ok(run)
}

async fn pg_baseline_load(
    pool: &sqlx::PgPool,
    writers: usize,
    conns: u32,
    window: Duration,
) -> anyhow::Result<Run> {
    // Open every connection first, so no measured insert pays a connect.
    let held = futures_util::future::try_join_all((0..conns).map(|_| pool.acquire()))
        .await
        .context("opening the baseline's connections")?;
    drop(held);
    let start = Instant::now();
    let deadline = start + window;
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut log = WriterLog::default();
                let session = uuid::Uuid::new_v4().to_string();
                let mut k = 0i64;
                while Instant::now() < deadline {
                    let t0 = Instant::now();
                    let r = sqlx::query(
                        "INSERT INTO bench_baseline (session_id, seq, kind, content, created_at) \
                         VALUES ($1, $2, 'message', $3, $4)",
                    )
                    .bind(&session)
                    .bind(k)
                    .bind(format!("bench message {w}/{k}"))
                    .bind(t0.duration_since(start).as_micros() as i64)
                    .execute(&pool)
                    .await;
                    let t1 = Instant::now();
                    match r {
                        Ok(_) => {
                            log.lat.push(t1 - t0);
                            log.done_at.push(t1 - start);
                        }
                        Err(e) => {
                            log.errors += 1;
                            log.first_error.get_or_insert_with(|| e.to_string());
                        }
                    }
                    k += 1;
                }
                log
            })
        })
        .collect();
    let mut logs = Vec::with_capacity(writers);
    for t in tasks {
        logs.push(t.await.context("a baseline writer panicked")?);
    }
    Ok(summarize(logs, start.elapsed(), window))
}

/// The naive counter-row baseline: `writers` tasks share a `PgPool` of
/// `conns` connections and each loops over appends to `sessions` sessions
/// laid out as the store's load lays them out (writer w's k-th append goes
/// to session `(w + k·writers) mod sessions`), each append one transaction:
/// bump the session's counter row (`UPDATE … RETURNING`), insert the entry
/// at that seq, commit. Fresh tables, dropped afterwards.
async fn run_pg_counter_baseline(
    url: &str,
    writers: usize,
    conns: u32,
    sessions: usize,
    window: Duration,
) -> anyhow::Result<Run> {
    use sqlx::postgres::PgPoolOptions;

    let pool = PgPoolOptions::new()
        .max_connections(conns)
        .acquire_timeout(PATIENCE)
        .connect(url)
        .await
        .context("connecting the counter baseline's pool")?;
    sqlx::raw_sql(
        "DROP TABLE IF EXISTS bench_counter_entries; DROP TABLE IF EXISTS bench_counter; \
         CREATE TABLE bench_counter (session_id TEXT PRIMARY KEY, last_seq BIGINT NOT NULL); \
         CREATE TABLE bench_counter_entries (session_id TEXT NOT NULL, seq BIGINT NOT NULL, kind TEXT NOT NULL, \
         content TEXT NOT NULL, created_at BIGINT NOT NULL, PRIMARY KEY (session_id, seq))",
    )
    .execute(&pool)
    .await
    .context("creating the counter baseline's tables")?;
    let ids: Vec<String> = (0..sessions)
        .map(|_| uuid::Uuid::new_v4().to_string())
        .collect();
    sqlx::query("INSERT INTO bench_counter (session_id, last_seq) SELECT unnest($1::text[]), 0")
        .bind(&ids)
        .execute(&pool)
        .await
        .context("creating the counter rows")?;
    let result = pg_counter_load(&pool, writers, conns, Arc::new(ids), window).await;
    let dropped = sqlx::raw_sql("DROP TABLE bench_counter_entries; DROP TABLE bench_counter")
        .execute(&pool)
        .await
        .context("dropping the counter baseline's tables");
    pool.close().await;
    let run = result?;
    dropped?;
    Ok(run)
}

async fn pg_counter_load(
    pool: &sqlx::PgPool,
    writers: usize,
    conns: u32,
    ids: Arc<Vec<String>>,
    window: Duration,
) -> anyhow::Result<Run> {
    let held = futures_util::future::try_join_all((0..conns).map(|_| pool.acquire()))
        .await
        .context("opening the counter baseline's connections")?;
    drop(held);
    let start = Instant::now();
    let deadline = start + window;
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let (pool, ids) = (pool.clone(), ids.clone());
            tokio::spawn(async move {
                let mut log = WriterLog::default();
                let mut k = 0usize;
                while Instant::now() < deadline {
                    let session = &ids[(w + k * writers) % ids.len()];
                    let t0 = Instant::now();
                    let r: Result<(), sqlx::Error> = async {
                        let mut tx = pool.begin().await?;
                        let seq: i64 = sqlx::query_scalar(
                            "UPDATE bench_counter SET last_seq = last_seq + 1 WHERE session_id = $1 RETURNING last_seq",
                        )
                        .bind(session)
                        .fetch_one(&mut *tx)
                        .await?;
                        sqlx::query(
                            "INSERT INTO bench_counter_entries (session_id, seq, kind, content, created_at) \
                             VALUES ($1, $2, 'message', $3, $4)",
                        )
                        .bind(session)
                        .bind(seq)
                        .bind(format!("bench message {w}/{k}"))
                        .bind(t0.duration_since(start).as_micros() as i64)
                        .execute(&mut *tx)
                        .await?;
                        tx.commit().await
                    }
                    .await;
                    let t1 = Instant::now();
                    match r {
                        Ok(()) => {
                            log.lat.push(t1 - t0);
                            log.done_at.push(t1 - start);
                        }
                        Err(e) => {
                            log.errors += 1;
                            log.first_error.get_or_insert_with(|| e.to_string());
                        }
                    }
                    k += 1;
                }
                log
            })
        })
        .collect();
    let mut logs = Vec::with_capacity(writers);
    for t in tasks {
        logs.push(t.await.context("a counter baseline writer panicked")?);
    }
    Ok(summarize(logs, start.elapsed(), window))
}

// ---------------------------------------------------------------------------
// baton bench pg-delta

fn check_pg_delta(args: &PgDeltaArgs) -> anyhow::Result<()> {
    pg_admin_options(&args.database_url)?;
    if !(10..=100_000).contains(&args.deltas) {
        bail!("--deltas must be between 10 and 100000");
    }
    if !(2..=500).contains(&args.per_turn) {
        bail!("--per-turn must be between 2 and 500");
    }
    if args.delta_ms > 1000 {
        bail!("--delta-ms must be at most 1000");
    }
    Ok(())
}

/// A delta's identity on every path: its turn and its text (every word of a
/// benchmark message is distinct, so the text is unique within its turn).
type DeltaKey = (String, String);

/// When each delta arrived somewhere, and what else was seen there.
#[derive(Default)]
struct Arrivals {
    at: HashMap<DeltaKey, Instant>,
    duplicates: usize,
    /// Bus receivers only: events lost to lag.
    lagged: u64,
}

impl Arrivals {
    fn record(&mut self, key: DeltaKey, now: Instant) {
        if self.at.insert(key, now).is_some() {
            self.duplicates += 1;
        }
    }
}

/// What one round of turns left on the four observation points.
struct DeltaRound {
    /// Node B's local bus: where B publishes (the reference time).
    b_bus: Arrivals,
    /// Node A's local bus: after the `LISTEN/NOTIFY` hop.
    a_bus: Arrivals,
    /// SSE from node A (cross-node).
    a_sse: Arrivals,
    /// SSE from node B (same node).
    b_sse: Arrivals,
    /// The most session actors seen on node A meanwhile (must be 0: the
    /// turns run on B).
    a_actors: usize,
    /// How the round's turns ended (all `completed` when nothing went wrong).
    statuses: Vec<TurnStatus>,
    elapsed: Duration,
}

async fn pg_delta(args: PgDeltaArgs, url: String, server: PgServer) -> anyhow::Result<()> {
    let turns = args.deltas.div_ceil(args.per_turn);
    let node_cfg = || {
        // The file is never opened: the database URL wins.
        let mut cfg = ServeConfig::embedded("unused.db");
        cfg.database_url = Some(url.clone());
        cfg.db = None;
        cfg.demo_word_delay_ms = args.delta_ms;
        cfg.queue_capacity = turns + 10;
        cfg
    };
    println!("baton bench pg-delta");
    println!("  server: {}", server.version);
    println!("  settings: {}", server.settings);
    println!(
        "  two nodes (App::build, in this process, 127.0.0.1:0) on scratch database {}; cross-node bus LISTEN/NOTIFY",
        scratch_db_name()
    );
    println!(
        "  one session created on node B; {turns} turns posted to B (the first starts, the rest queue) run there, \
         demo agent, {} deltas of one word each per turn, {} ms apart",
        args.per_turn, args.delta_ms
    );
    println!(
        "  each delta timed from its arrival on B's local bus (where B publishes it) to its arrival on: \
         an SSE stream from B (same node), A's local bus (after NOTIFY), an SSE stream from A (cross node)"
    );
    println!("  all four observers run before the turns start; one unmeasured warm-up turn first");
    println!();

    let a = Server::start_with(&node_cfg()).await?;
    let b = Server::start_with(&node_cfg()).await?;
    let result = async {
        let id = b.http.create(None).await?;
        eprintln!("  warm-up turn…");
        delta_round(&a, &b, id, &delta_messages(1, 20, 0)).await?;
        eprintln!("  {turns} measured turns ({} deltas)…", args.deltas);
        let messages = delta_messages(turns, args.per_turn, args.deltas);
        delta_round(&a, &b, id, &messages).await
    }
    .await;
    let stopped_a = a.stop().await;
    let stopped_b = b.stop().await;
    let round = result?;
    stopped_a?;
    stopped_b?;

    let published = round.b_bus.at.len();
    println!(
        "{published} deltas published on B in {:.2}s ({:.0}/s); expected {}",
        round.elapsed.as_secs_f64(),
        published as f64 / round.elapsed.as_secs_f64().max(1e-9),
        args.deltas
    );
    println!();
    println!(
        "{:<42} | {:>6} {:>7} | {:>10} {:>10} {:>10} {:>10}",
        "from B's local bus to", "n", "missing", "p50", "p99", "mean", "max"
    );
    println!("{}", "-".repeat(104));
    let mut out = Vec::new();
    for (label, to) in [
        ("SSE from node B (same node, baseline)", &round.b_sse),
        ("node A's local bus (the NOTIFY hop)", &round.a_bus),
        ("SSE from node A (cross node)", &round.a_sse),
    ] {
        let (lat, missing, early) = delays(&round.b_bus, to);
        let s = stats(lat);
        println!(
            "{:<42} | {:>6} {:>7} | {:>10} {:>10} {:>10} {:>10}",
            label,
            s.n,
            missing,
            ms(s.p50),
            ms(s.p99),
            ms(s.mean),
            ms(s.max)
        );
        if early > 0 {
            println!("{:<42} | {early} arrived before B's bus saw them", "");
        }
        out.push(s);
    }
    let (same, cross) = (out[0], out[2]);
    println!();
    println!(
        "cross node / same node: p50 {}, p99 {}",
        ratio(cross.p50.as_secs_f64(), same.p50.as_secs_f64()),
        ratio(cross.p99.as_secs_f64(), same.p99.as_secs_f64())
    );
    for (label, r) in [
        ("B's bus", &round.b_bus),
        ("A's bus", &round.a_bus),
        ("A's SSE", &round.a_sse),
        ("B's SSE", &round.b_sse),
    ] {
        if r.duplicates > 0 || r.lagged > 0 {
            println!(
                "  {label}: {} duplicates, {} events lost to lag",
                r.duplicates, r.lagged
            );
        }
    }
    if round.a_actors > 0 {
        println!(
            "WARNING: node A ran {} session actor(s) during the round: some turns may have run on A",
            round.a_actors
        );
    }
    let odd: Vec<String> = round
        .statuses
        .iter()
        .filter(|s| **s != TurnStatus::Completed)
        .map(|s| format!("{s:?}"))
        .collect();
    if !odd.is_empty() {
        println!(
            "WARNING: {} of {} turns did not complete: {}",
            odd.len(),
            round.statuses.len(),
            odd.join(", ")
        );
    }
    Ok(())
}

/// `turns` messages whose echoes stream `per_turn` deltas each ("echo:" and
/// then one distinct word per delta), `total` deltas in all (0: no limit).
fn delta_messages(turns: usize, per_turn: usize, total: usize) -> Vec<String> {
    let mut left = if total == 0 { turns * per_turn } else { total };
    let mut next = 0usize;
    let mut out = Vec::with_capacity(turns);
    for _ in 0..turns {
        let n = per_turn.min(left).max(2);
        left = left.saturating_sub(n);
        let words: Vec<String> = (0..n - 1).map(|i| format!("d{:06}", next + i)).collect();
        next += n - 1;
        out.push(words.join(" "));
    }
    out
}

/// Latencies of the deltas seen at both `from` and `to`; how many of
/// `from`'s never reached `to`; how many reached `to` first.
fn delays(from: &Arrivals, to: &Arrivals) -> (Vec<Duration>, usize, usize) {
    let (mut lat, mut missing, mut early) = (Vec::with_capacity(from.at.len()), 0, 0);
    for (key, t0) in &from.at {
        match to.at.get(key) {
            Some(t1) => match t1.checked_duration_since(*t0) {
                Some(d) => lat.push(d),
                None => {
                    early += 1;
                    lat.push(Duration::ZERO);
                }
            },
            None => missing += 1,
        }
    }
    (lat, missing, early)
}

/// Posts `messages` to node B and follows their turns on the four
/// observation points until every turn has ended on both streams.
async fn delta_round(
    a: &Server,
    b: &Server,
    id: SessionId,
    messages: &[String],
) -> anyhow::Result<DeltaRound> {
    let turns = messages.len();
    let words: usize = messages.iter().map(|m| m.split(' ').count() + 1).sum();
    // Generous: the agent's own pace is a small part of it.
    let patience = PATIENCE + Duration::from_millis(20) * words as u32;
    let deadline = tokio::time::Instant::now() + patience;
    let after = b.engine.session(LOCAL, id).await?.last_seq;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // The bus readers are OS threads blocked on the channel, not tasks, so a
    // busy runtime does not delay their timestamps.
    let stop_turn = baton_core::TurnId::new();
    let b_bus = read_bus(b.engine.bus().subscribe(id), stop_turn);
    let a_bus = read_bus(a.engine.bus().subscribe(id), stop_turn);
    // No overall timeout on these clients: a stream lives as long as its round.
    let sse_client = reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(5))
        .build()
        .context("building the SSE client")?;
    let mut streams = Vec::new();
    for node in [a, b] {
        let resp = sse_client
            .get(format!(
                "{}/v1/sessions/{id}/stream?after={after}",
                node.http.base
            ))
            .send()
            .await
            .context("opening a stream")?;
        if resp.status() != reqwest::StatusCode::OK {
            bail!("opening a stream: {}", resp.status());
        }
        // The handler subscribed to its bus before answering: nothing from
        // here on is missed.
        streams.push(tokio::spawn(read_sse(resp, turns, deadline)));
    }
    let a_engine = a.engine.clone();
    let mut monitor_stop = stop_rx.clone();
    let monitor = tokio::spawn(async move {
        let mut most = 0usize;
        loop {
            most = most.max(a_engine.active_actors());
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                _ = monitor_stop.changed() => return most,
            }
        }
    });
    let start = Instant::now();
    for m in messages {
        let (_, status, body) = b.http.timed_post(id, m).await?;
        if status != reqwest::StatusCode::CREATED {
            bail!(
                "posting to node B: {status} {}",
                String::from_utf8_lossy(&body)
            );
        }
    }
    let mut sse = Vec::new();
    for s in streams {
        sse.push(s.await.context("a stream reader panicked")??);
    }
    let elapsed = start.elapsed();
    // Every delta reached both buses before the last `turn_ended` reached
    // the streams; a moment more for good measure.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _ = stop_tx.send(true);
    // A local-only sentinel (never relayed to the other node) ends the readers.
    for node in [a, b] {
        node.engine.bus().deliver(
            id,
            BusEvent::Delta {
                turn_id: stop_turn,
                epoch: 0,
                text: String::new(),
                run: 0,
                offset: 0,
            },
        );
    }
    let b_sse = sse.pop().context("B's stream")?;
    let a_sse = sse.pop().context("A's stream")?;
    let all = b.engine.store().turns(id).await?;
    let statuses = all[all.len().saturating_sub(turns)..]
        .iter()
        .map(|t| t.status)
        .collect();
    Ok(DeltaRound {
        b_bus: join_bus_reader(b_bus).await?,
        a_bus: join_bus_reader(a_bus).await?,
        a_sse,
        b_sse,
        a_actors: monitor.await.context("the monitor panicked")?,
        statuses,
        elapsed,
    })
}

/// Records, on a thread of its own, the deltas a node's local bus delivers
/// until the delta of turn `stop` arrives.
fn read_bus(
    mut rx: tokio::sync::broadcast::Receiver<BusEvent>,
    stop: baton_core::TurnId,
) -> std::thread::JoinHandle<Arrivals> {
    use tokio::sync::broadcast::error::RecvError;

    std::thread::spawn(move || {
        let mut log = Arrivals::default();
        loop {
            let ev = rx.blocking_recv();
            let now = Instant::now();
            match ev {
                Ok(BusEvent::Delta { turn_id, .. }) if turn_id == stop => return log,
                Ok(BusEvent::Delta { turn_id, text, .. }) => {
                    log.record((turn_id.to_string(), text), now)
                }
                Ok(_) => {}
                Err(RecvError::Lagged(n)) => log.lagged += n,
                Err(RecvError::Closed) => return log,
            }
        }
    })
}

/// Waits (off the runtime) for a bus reader thread, at most `PATIENCE`.
async fn join_bus_reader(t: std::thread::JoinHandle<Arrivals>) -> anyhow::Result<Arrivals> {
    let joined = tokio::task::spawn_blocking(move || t.join());
    match tokio::time::timeout(PATIENCE, joined).await {
        Ok(Ok(Ok(log))) => Ok(log),
        Ok(_) => bail!("a bus reader panicked"),
        Err(_) => bail!("a bus reader did not stop in {PATIENCE:?}"),
    }
}

/// Records the deltas an SSE stream delivers until `turns` turns have ended
/// on it.
async fn read_sse(
    resp: reqwest::Response,
    turns: usize,
    deadline: tokio::time::Instant,
) -> anyhow::Result<Arrivals> {
    use eventsource_stream::Eventsource;
    use futures_util::StreamExt;

    let mut events = resp.bytes_stream().eventsource();
    let mut log = Arrivals::default();
    let mut ended = 0usize;
    while ended < turns {
        let ev = match tokio::time::timeout_at(deadline, events.next()).await {
            Err(_) => bail!("timed out: {ended} of {turns} turns ended on a stream"),
            Ok(None) => bail!("a stream ended early ({ended} of {turns} turns)"),
            Ok(Some(Err(e))) => bail!("reading a stream: {e}"),
            Ok(Some(Ok(ev))) => ev,
        };
        let now = Instant::now();
        let data: Value = serde_json::from_str(&ev.data).unwrap_or(Value::Null);
        match ev.event.as_str() {
            "delta" => {
                let turn = data["turn_id"].as_str().unwrap_or_default().to_owned();
                let text = data["text"].as_str().unwrap_or_default().to_owned();
                log.record((turn, text), now);
            }
            "entry" if data["type"] == json!(EntryType::TurnEnded) => ended += 1,
            _ => {}
        }
    }
    Ok(log)
}
