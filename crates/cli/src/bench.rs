//! `baton bench`: measures the embedded store's durable append path and the
//! HTTP message path, each next to a baseline measured in the same run.
//!
//! - `baton bench append` — appends/s and latency of `Store::post_message` on
//!   the SQLite store (WAL, `synchronous=FULL`, group commit) at several
//!   writer counts, beside a raw baseline: one `INSERT` per transaction with
//!   sqlx's SQLite driver directly, same pragmas, same directory, same writer
//!   counts (writers contend on SQLite's lock with `busy_timeout`).
//! - `baton bench post` — latency of `POST /v1/sessions/{id}/messages` until
//!   its `201`, over real HTTP on 127.0.0.1 against an embedded server, for a
//!   session with a turn in flight (mid-turn) and for an idle session.
//!
//! Everything runs in a scratch directory that is removed at the end, talks
//! only to 127.0.0.1, and is bounded in count and time.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use baton_core::{Policy, SessionId, SessionStatus, TurnStatus};
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

/// Runs the benchmarks.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let bench = async {
        match args.command {
            BenchCommand::Append(a) => append(a).await,
            BenchCommand::Post(p) => post(p).await,
        }
    };
    tokio::select! {
        r = bench => r,
        _ = crate::shutdown_signal() => bail!("interrupted"),
    }
}

// ---------------------------------------------------------------------------
// Shared helpers

/// A scratch directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(parent: Option<&Path>) -> anyhow::Result<Self> {
        let base = parent
            .map(Path::to_path_buf)
            .unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!("baton-bench-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }

    fn path(&self) -> &Path {
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
struct Stats {
    n: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
    mean: Duration,
}

fn stats(mut v: Vec<Duration>) -> Stats {
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

fn ms(d: Duration) -> String {
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
}

impl Run {
    fn rate(&self) -> f64 {
        if self.elapsed.is_zero() {
            0.0
        } else {
            self.ok as f64 / self.elapsed.as_secs_f64()
        }
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
    let creates = (0..sessions).map(|_| {
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
                    node: NODE.into(),
                })
                .await
                .map(|c| c.session.id)
        }
    });
    let ids: Vec<SessionId> = futures_util::future::try_join_all(creates)
        .await
        .context("creating the sessions")?;
    let ids = Arc::new(ids);
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
    drop(store);
    // Let the writer task close its connection (checkpoint) before the next run.
    tokio::time::sleep(Duration::from_millis(300)).await;
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
const LOCAL: &str = "local";

struct Http {
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

    async fn create(&self, message: Option<&str>) -> anyhow::Result<SessionId> {
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

struct Server {
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
        if !cfg.listen.ip().is_loopback() {
            bail!("the benchmark server must listen on loopback");
        }
        let app = App::build(&cfg)
            .await
            .context("starting the embedded server")?;
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

    async fn stop(mut self) -> anyhow::Result<()> {
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
        let deadline = Instant::now() + PATIENCE;
        while self.engine.active_actors() > 0 {
            if Instant::now() > deadline {
                bail!("session actors still running after {PATIENCE:?}");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(())
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
fn ends(lat: &[Duration]) -> (Duration, Duration) {
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
