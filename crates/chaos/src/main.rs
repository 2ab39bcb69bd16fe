//! The `baton-chaos` binary: `run` (load, faults, check, figures) against
//! servers it starts (SQLite, or a PostgreSQL cluster behind its own
//! proxies) or against a deployment's URLs; `verify` (the checker's pass
//! over every session of some owners, e.g. after a fuzzer).
//!
//! Exit status: 0 when every guarantee held, 1 when one was violated.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use baton_chaos::figures::Figures;
use baton_chaos::run::{self, Cluster, ProcessFaults, RunConfig};
use baton_chaos::servers::{Node, Proxy};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "baton-chaos", version, about = "Baton's guarantees as figures")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load and faults, then the checker's verdict and the figures.
    Run(Box<RunArgs>),
    /// Check every session of the given owners (brought to rest first).
    Verify(VerifyArgs),
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Store {
    /// One server on a fresh embedded store (SQLite).
    Sqlite,
    /// `--nodes` servers on `--database-url`, each behind its own proxy.
    Postgres,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Fault {
    /// SIGKILL a server, restart it.
    Kill,
    /// SIGTERM a server during turns, restart it.
    Term,
    /// Cut a node off from PostgreSQL for a while (its proxy).
    Cut,
    /// Demo-agent directives in messages (/sleep, /fail, /hang, /stubborn).
    Directives,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Existing servers to drive (repeatable; no process faults then).
    #[arg(long = "url")]
    urls: Vec<String>,
    /// The owner's bearer token for `--url`.
    #[arg(long)]
    token: Option<String>,
    /// A second owner's token for `--url`: isolation probes.
    #[arg(long)]
    other_token: Option<String>,
    /// Start servers on this store instead of using `--url`.
    #[arg(long, value_enum)]
    store: Option<Store>,
    /// PostgreSQL to run the nodes on (a database of its own: the run
    /// writes to it).
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// Nodes on PostgreSQL.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// The `baton` binary (default: next to this one).
    #[arg(long)]
    baton: Option<PathBuf>,
    /// An ACP agent binary (e.g. `acp-peer`) that a fifth of the sessions
    /// use, with crash and hang directives.
    #[arg(long)]
    acp_peer: Option<PathBuf>,
    /// The seed of every random choice and fault.
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long, default_value_t = 12)]
    clients: usize,
    #[arg(long, default_value_t = 30)]
    sessions: usize,
    #[arg(long, default_value_t = 4)]
    readers: usize,
    /// Stop after this many acknowledged messages…
    #[arg(long, default_value_t = 1_000)]
    messages: u64,
    /// … or this many seconds of load.
    #[arg(long, default_value_t = 60)]
    duration_secs: u64,
    /// Mean pause between process faults, in ms.
    #[arg(long, default_value_t = 3_000)]
    fault_every_ms: u64,
    /// Fault classes (comma-separated; default: every one the store allows).
    #[arg(long, value_enum, value_delimiter = ',')]
    faults: Option<Vec<Fault>>,
    /// Print the figures as JSON.
    #[arg(long)]
    json: bool,
    /// Write the whole history (JSON) here, to re-check or inspect.
    #[arg(long)]
    history_out: Option<PathBuf>,
}

#[derive(clap::Args)]
struct VerifyArgs {
    /// The servers.
    #[arg(long = "url", required = true)]
    urls: Vec<String>,
    /// Owners' tokens (repeatable); each one's sessions are checked and
    /// probed as every other.
    #[arg(long = "token")]
    tokens: Vec<String>,
    #[arg(long)]
    json: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    match real_main().await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("baton-chaos: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn real_main() -> anyhow::Result<bool> {
    match Cli::parse().command {
        Command::Run(args) => run_cmd(*args).await,
        Command::Verify(args) => verify_cmd(args).await,
    }
}

const TOKEN_A: &str = "chaos-owner-a";
const TOKEN_B: &str = "chaos-owner-b";

/// `postgres://user@host:port/db?x` → (`host:port`, a rebuilt URL pointing
/// at `127.0.0.1:proxy`).
fn split_pg_url(url: &str) -> anyhow::Result<(String, impl Fn(u16) -> String)> {
    let (scheme, rest) = url
        .split_once("://")
        .context("the database URL has no scheme")?;
    let (auth, rest) = match rest.rsplit_once('@') {
        Some((a, r)) => (format!("{a}@"), r),
        None => (String::new(), rest),
    };
    let (hostport, tail) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let upstream = if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:5432")
    };
    let (scheme, tail) = (scheme.to_owned(), tail.to_owned());
    Ok((upstream, move |port: u16| {
        format!("{scheme}://{auth}127.0.0.1:{port}{tail}")
    }))
}

async fn run_cmd(a: RunArgs) -> anyhow::Result<bool> {
    let seed = a.seed.unwrap_or_else(|| fastrand::u64(..1_000_000));
    let all = [Fault::Kill, Fault::Term, Fault::Cut, Fault::Directives];
    let faults = a.faults.clone().unwrap_or_else(|| all.to_vec());
    let has = |f| faults.contains(&f);
    let mut cfg = RunConfig {
        seed,
        clients: a.clients,
        sessions: a.sessions,
        readers: a.readers,
        messages: a.messages,
        duration: Duration::from_secs(a.duration_secs),
        fault_every: Duration::from_millis(a.fault_every_ms),
        process_faults: ProcessFaults::default(),
        directives: has(Fault::Directives),
        acp_agent: None,
        other_token: a.other_token.clone(),
        store: "url".into(),
    };
    let mut scratch: Option<PathBuf> = None;
    let (urls, token, cluster) = match a.store {
        None => {
            anyhow::ensure!(!a.urls.is_empty(), "give --url or --store");
            (a.urls.clone(), a.token.clone(), None)
        }
        Some(store) => {
            let bin = match &a.baton {
                Some(b) => b.clone(),
                None => std::env::current_exe()
                    .context("locating this binary")?
                    .with_file_name("baton"),
            };
            anyhow::ensure!(bin.exists(), "no baton binary at {}", bin.display());
            let mut common: Vec<String> = [
                "--token",
                &format!("a:{TOKEN_A}"),
                "--token",
                &format!("b:{TOKEN_B}"),
                "--demo-word-delay-ms",
                "1",
                "--cancel-drain-ms",
                "500",
                "--turn-timeout-ms",
                "20000",
                "--shutdown-grace-ms",
                "300",
                "--lease-ms",
                "2000",
                "--heartbeat-ms",
                "500",
                "--sweep-ms",
                "500",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            if let Some(peer) = &a.acp_peer {
                anyhow::ensure!(peer.exists(), "no ACP peer at {}", peer.display());
                common.push("--acp".into());
                common.push(format!("peer={}", peer.display()));
                cfg.acp_agent = Some("peer".into());
            }
            cfg.other_token = Some(TOKEN_B.into());
            let mut nodes = Vec::new();
            let mut proxies = Vec::new();
            match store {
                Store::Sqlite => {
                    let dir = std::env::temp_dir()
                        .join(format!("baton-chaos-{}-{seed}", std::process::id()));
                    std::fs::create_dir_all(&dir)
                        .with_context(|| format!("creating {}", dir.display()))?;
                    let mut args = common.clone();
                    args.push("--db".into());
                    args.push(dir.join("baton.db").display().to_string());
                    nodes.push(Node::new("sqlite".into(), bin, args, None)?);
                    scratch = Some(dir);
                    cfg.store = "sqlite".into();
                    cfg.process_faults = ProcessFaults {
                        sigkill: has(Fault::Kill),
                        sigterm: has(Fault::Term),
                        cut: false,
                    };
                }
                Store::Postgres => {
                    let url = a
                        .database_url
                        .clone()
                        .context("--store postgres needs --database-url")?;
                    let (upstream, via) = split_pg_url(&url)?;
                    for i in 0..a.nodes.max(1) {
                        let proxy = Proxy::start(upstream.clone()).await?;
                        nodes.push(Node::new(
                            format!("node{i}"),
                            bin.clone(),
                            common.clone(),
                            Some(via(proxy.port)),
                        )?);
                        proxies.push(proxy);
                    }
                    cfg.store = "postgres".into();
                    cfg.process_faults = ProcessFaults {
                        sigkill: has(Fault::Kill),
                        sigterm: has(Fault::Term),
                        cut: has(Fault::Cut),
                    };
                }
            }
            for n in &mut nodes {
                n.start().await?;
            }
            let urls = nodes.iter().map(|n| n.url.clone()).collect();
            let cluster = Arc::new(tokio::sync::Mutex::new(Cluster { nodes, proxies }));
            (urls, Some(TOKEN_A.to_owned()), Some(cluster))
        }
    };
    let result = run::run(cfg, urls, token, cluster.clone()).await;
    if let Some(c) = cluster {
        let mut c = c.lock().await;
        for n in &mut c.nodes {
            n.terminate(Duration::from_secs(10)).await?;
        }
    }
    if let Some(dir) = scratch {
        let _ = std::fs::remove_dir_all(dir);
    }
    let (figures, history, _report) = result?;
    if let Some(path) = &a.history_out {
        let text = serde_json::to_vec(&history).context("serializing the history")?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    print(&figures, a.json)?;
    Ok(figures.passed)
}

fn print(figures: &Figures, json: bool) -> anyhow::Result<()> {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(figures).context("serializing the figures")?
        );
    } else {
        print!("{figures}");
    }
    Ok(())
}

async fn verify_cmd(a: VerifyArgs) -> anyhow::Result<bool> {
    let tokens: Vec<Option<String>> = if a.tokens.is_empty() {
        vec![None]
    } else {
        a.tokens.iter().cloned().map(Some).collect()
    };
    let (history, report) = run::verify(a.urls, tokens).await?;
    let sessions = history.sessions.len();
    let entries: usize = history.sessions.iter().map(|s| s.log.len()).sum();
    let waiting: Vec<_> = history
        .sessions
        .iter()
        .filter_map(|s| Some((s.id.as_str(), s.debounce_until.as_deref()?)))
        .collect();
    if a.json {
        let waiting: Vec<_> = waiting
            .iter()
            .map(|(id, until)| serde_json::json!({"session": id, "pending_until": until}))
            .collect();
        let out = serde_json::json!({
            "sessions": sessions,
            "entries": entries,
            "waiting_for_debounce": waiting,
            "violations": report.violations,
            "details": report.details,
            "passed": report.violations.total() == 0,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&out).context("serializing the verdict")?
        );
    } else {
        println!(
            "baton-chaos verify: {sessions} sessions, {entries} entries, {} violation(s)",
            report.violations.total()
        );
        for (id, until) in &waiting {
            println!("  session {id} waits for its debounce window (until {until})");
        }
        for d in &report.details {
            println!("  ! {d}");
        }
    }
    Ok(report.violations.total() == 0)
}

#[cfg(test)]
mod tests {
    use super::split_pg_url;

    #[test]
    fn a_database_url_is_pointed_at_the_proxy() -> anyhow::Result<()> {
        let (up, via) = split_pg_url("postgres://postgres:pw@db.local:6543/test?sslmode=disable")?;
        assert_eq!(up, "db.local:6543");
        assert_eq!(
            via(7000),
            "postgres://postgres:pw@127.0.0.1:7000/test?sslmode=disable"
        );
        let (up, via) = split_pg_url("postgres://127.0.0.1/test")?;
        assert_eq!(up, "127.0.0.1:5432");
        assert_eq!(via(1), "postgres://127.0.0.1:1/test");
        Ok(())
    }
}
