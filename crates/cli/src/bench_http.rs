//! `baton bench http`: posts per second over HTTP on the embedded store,
//! beside the raw batched SQLite ceiling measured in the same run.
//!
//! The server and the load generator run in this one process, on the same
//! cores, as a team would first try Baton. Every post goes to one of many
//! sessions whose turn hangs, so it is stored and queued (the whole post
//! path: HTTP, the route, the engine, the store's writer, its commit) and
//! no agent output competes with it. The ceiling is what SQLite itself
//! commits on the same disk with nothing in front of it: one thread
//! inserting rows of the same shape, 1,024 to a transaction by default,
//! with the same durability (WAL, `synchronous=FULL`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::json;

use crate::bench::{ms, stats, Scratch, Server};
use crate::ServeConfig;

/// `baton bench http` flags.
#[derive(Clone, Debug, Args)]
pub struct HttpBenchArgs {
    /// Concurrent HTTP/1.1 keep-alive connections, each posting back to back.
    #[arg(long, default_value_t = 256)]
    pub connections: usize,
    /// Sessions the posts are spread over, each with a turn that hangs.
    #[arg(long, default_value_t = 1000)]
    pub sessions: usize,
    /// Seconds of load (and of the ceiling's measurement).
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Rows per transaction of the ceiling (bigger batches raise it: one
    /// flush is shared by more rows).
    #[arg(long, default_value_t = 1024)]
    pub ceiling_batch: usize,
    /// Directory for the scratch databases (a fresh subdirectory is made and
    /// removed); default: the system temp dir.
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

pub async fn run(args: HttpBenchArgs) -> anyhow::Result<()> {
    if !(1..=1024).contains(&args.connections) {
        bail!("--connections must be between 1 and 1024");
    }
    if !(1..=100_000).contains(&args.sessions) {
        bail!("--sessions must be between 1 and 100000");
    }
    if !(1..=100_000).contains(&args.ceiling_batch) {
        bail!("--ceiling-batch must be between 1 and 100000");
    }
    if !(0.5..=600.0).contains(&args.seconds) {
        bail!("--seconds must be between 0.5 and 600");
    }
    let window = Duration::from_secs_f64(args.seconds);
    let scratch = Scratch::new(args.dir.as_deref())?;
    println!("baton bench http");
    println!(
        "  {} connections post back to back for {:.1}s to {} sessions whose turns hang (every post is stored and queued)",
        args.connections, args.seconds, args.sessions
    );
    println!(
        "  ceiling: one thread inserting rows of the same shape into SQLite, {} per transaction (WAL, synchronous=FULL), same disk",
        args.ceiling_batch
    );
    println!("  scratch dir {}", scratch.path().display());
    println!();

    eprintln!("  ceiling…");
    let ceiling_db = scratch.path().join("ceiling.db");
    let (sessions, batch) = (args.sessions, args.ceiling_batch);
    let ceiling =
        tokio::task::spawn_blocking(move || ceiling(&ceiling_db, sessions, batch, window))
            .await
            .context("the ceiling's thread panicked")??;

    eprintln!("  server and sessions…");
    let mut cfg = ServeConfig::embedded(scratch.path().join("baton.db").to_string_lossy());
    cfg.queue_capacity = 100_000_000;
    // The cap protects a server; here it must not refuse the load: a
    // client may open a connection while another is being returned.
    cfg.max_connections = (args.connections * 4 + 64) as u32;
    let server = Server::start_with(&cfg).await?;
    let result = load(&server, &args, window).await;
    let stopped = server.stop().await;
    let (posted, lat, elapsed, cpu) = result?;
    stopped?;

    let s = stats(lat);
    let rate = posted as f64 / elapsed.as_secs_f64();
    println!(
        "{:>11} | {:>10} {:>10} {:>10} | {:>12} | {:>14}",
        "connections", "posts/s", "p50", "p99", "ceiling/s", "posts/ceiling"
    );
    println!("{}", "-".repeat(80));
    println!(
        "{:>11} | {:>10.0} {:>10} {:>10} | {:>12.0} | {:>13.2}x",
        args.connections,
        rate,
        ms(s.p50),
        ms(s.p99),
        ceiling,
        rate / ceiling.max(1.0)
    );
    if let Some(cpu) = cpu {
        println!(
            "  process CPU (server and load generator): {:.1} µs per post, {:.2} cores busy",
            cpu.as_secs_f64() * 1e6 / posted.max(1) as f64,
            cpu.as_secs_f64() / elapsed.as_secs_f64()
        );
    }
    Ok(())
}

/// Rows per second SQLite commits from one thread, in transactions of
/// `batch` rows, over `window`.
fn ceiling(db: &Path, sessions: usize, batch: usize, window: Duration) -> anyhow::Result<f64> {
    let c = rusqlite::Connection::open(db).context("opening the ceiling's database")?;
    c.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
         CREATE TABLE entries (session_id TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL,
             role TEXT, content TEXT, policy TEXT, disposition TEXT, created_at INTEGER NOT NULL,
             PRIMARY KEY (session_id, seq));",
    )
    .context("creating the ceiling's table")?;
    let ids: Vec<String> = (0..sessions)
        .map(|_| uuid::Uuid::new_v4().to_string())
        .collect();
    let mut seqs = vec![0i64; sessions];
    let start = Instant::now();
    let mut rows = 0u64;
    while start.elapsed() < window {
        let tx = c.unchecked_transaction().context("a ceiling transaction")?;
        {
            let mut st = tx
                .prepare_cached(
                    "INSERT INTO entries (session_id, seq, kind, role, content, policy, disposition, created_at) \
                     VALUES (?1, ?2, 'message', 'user', ?3, 'queue', '{\"type\":\"queued\",\"position\":1}', ?4)",
                )
                .context("preparing the ceiling's insert")?;
            for _ in 0..batch {
                let k = fastrand::usize(0..sessions);
                seqs[k] += 1;
                st.execute(rusqlite::params![
                    ids[k],
                    seqs[k],
                    "bench message",
                    start.elapsed().as_micros() as i64
                ])
                .context("a ceiling insert")?;
            }
        }
        tx.commit().context("a ceiling commit")?;
        rows += batch as u64;
    }
    Ok(rows as f64 / start.elapsed().as_secs_f64())
}

type Load = (u64, Vec<Duration>, Duration, Option<Duration>);

/// Creates the sessions, then runs the load: what was posted, the
/// latencies, how long it took, and the process CPU it used.
async fn load(server: &Server, args: &HttpBenchArgs, window: Duration) -> anyhow::Result<Load> {
    let base = server.base().to_owned();
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(args.connections)
        .timeout(Duration::from_secs(60))
        .build()
        .context("building the HTTP client")?;
    let mut ids = Vec::with_capacity(args.sessions);
    while ids.len() < args.sessions {
        let n = (args.sessions - ids.len()).min(32);
        let creates = (0..n).map(|_| server.http().create(Some("/hang")));
        ids.extend(futures_util::future::try_join_all(creates).await?);
    }
    let ids: Arc<[baton_core::SessionId]> = ids.into();
    // Warm every connection, so no measured post pays a connect.
    let warm = (0..args.connections).map(|_| client.get(format!("{base}/healthz")).send());
    futures_util::future::try_join_all(warm)
        .await
        .context("warming the connections")?;

    eprintln!("  load…");
    let cpu0 = crate::bench::process_cpu();
    let start = Instant::now();
    let deadline = start + window;
    let tasks: Vec<_> = (0..args.connections)
        .map(|w| {
            let (client, base, ids) = (client.clone(), base.clone(), ids.clone());
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut k = 0u64;
                while Instant::now() < deadline {
                    let id = &ids[fastrand::usize(0..ids.len())];
                    let t0 = Instant::now();
                    let r = client
                        .post(format!("{base}/v1/sessions/{id}/messages"))
                        .json(&json!({ "content": format!("load {w}/{k}"), "policy": "queue" }))
                        .send()
                        .await
                        .context("posting")?;
                    let status = r.status();
                    r.bytes().await.context("reading a post's answer")?;
                    if status != reqwest::StatusCode::CREATED {
                        bail!("a post was answered {status}");
                    }
                    lat.push(t0.elapsed());
                    k += 1;
                }
                Ok::<Vec<Duration>, anyhow::Error>(lat)
            })
        })
        .collect();
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.context("a load task panicked")??);
    }
    let elapsed = start.elapsed();
    let cpu = crate::bench::process_cpu()
        .zip(cpu0)
        .map(|(b, a)| b.saturating_sub(a));
    Ok((lat.len() as u64, lat, elapsed, cpu))
}
