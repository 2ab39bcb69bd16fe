//! `baton serve` configuration: every flag also reads an environment
//! variable, and [`ServeConfig::validate`] checks every value before the
//! server touches the disk or the network.
//!
//! Values given as flags are taken whole; only the environment forms of the
//! repeatable flags (`BATON_TOKENS`, `BATON_ACP`, …) are lists, split by
//! [`ServeConfig::read_env_lists`].

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use baton_core::Policy;
use clap::Args;

/// The embedded store's file when neither `--db` nor `--database-url` is set.
pub const DEFAULT_DB: &str = "./baton.db";

/// `baton serve` flags.
#[derive(Clone, Debug, Args)]
pub struct ServeConfig {
    /// Address to listen on, as HOST:PORT; a host name is resolved
    /// (`localhost:7700`), `127.0.0.1:0` picks a free port.
    #[arg(long, env = "BATON_LISTEN", default_value = "127.0.0.1:7700", value_parser = parse_listen)]
    pub listen: SocketAddr,
    /// The embedded store's file (SQLite) [default: ./baton.db].
    #[arg(long, env = "BATON_DB")]
    pub db: Option<String>,
    /// The store as a URL: `postgres://…` or `postgresql://…` (PostgreSQL),
    /// or `sqlite:PATH` (the embedded store). Anything else is refused.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// The agent of sessions created without one.
    #[arg(long, env = "BATON_DEFAULT_AGENT", default_value = "demo")]
    pub default_agent: String,
    /// A bearer token as OWNER:SECRET (repeatable; env BATON_TOKENS, a
    /// comma-separated list, read when no --token is given). With none,
    /// every request is owner `local`.
    #[arg(long = "token", value_parser = parse_token)]
    pub tokens: Vec<(String, String)>,
    /// The busy policy of sessions created without one.
    #[arg(long, env = "BATON_POLICY", default_value = "queue")]
    pub policy: Policy,
    /// The debounce window of sessions created without one, in ms: a
    /// message that would start a turn on an idle session waits until no
    /// message came for this long (at most 10 windows), and the turn takes
    /// every message waiting then. 0: off.
    #[arg(long, env = "BATON_DEBOUNCE_MS", default_value_t = 0)]
    pub debounce_ms: u64,
    /// How long an agent gets to stop after a cancel before it is forced.
    #[arg(long, env = "BATON_CANCEL_DRAIN_MS", default_value_t = 5_000)]
    pub cancel_drain_ms: u64,
    /// A turn's time budget.
    #[arg(long, env = "BATON_TURN_TIMEOUT_MS", default_value_t = 600_000)]
    pub turn_timeout_ms: u64,
    /// Lease lifetime without renewal.
    #[arg(long, env = "BATON_LEASE_MS", default_value_t = 10_000)]
    pub lease_ms: u64,
    /// Lease renewal period.
    #[arg(long, env = "BATON_HEARTBEAT_MS", default_value_t = 3_000)]
    pub heartbeat_ms: u64,
    /// How often to look for sessions whose worker vanished.
    #[arg(long, env = "BATON_SWEEP_MS", default_value_t = 2_000)]
    pub sweep_ms: u64,
    /// Messages that may wait for a turn per session.
    #[arg(long, env = "BATON_QUEUE_CAPACITY", default_value_t = 1_000)]
    pub queue_capacity: usize,
    /// PostgreSQL only: the group-commit lanes of this node. Writes to one
    /// session queue in one lane; each lane commits what waits in it as one
    /// transaction. More lanes commit more batches at once, fewer make
    /// bigger batches: about the database's cores.
    #[arg(long, env = "BATON_PG_LANES", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub pg_lanes: u16,
    /// Largest request body, in bytes.
    #[arg(long, env = "BATON_MAX_BODY_BYTES", default_value_t = 256 * 1024)]
    pub max_body_bytes: usize,
    /// How long a request body may take to arrive in full; past it the
    /// request is answered `408 request_timeout`.
    #[arg(long, env = "BATON_BODY_TIMEOUT_MS", default_value_t = 30_000)]
    pub body_timeout_ms: u64,
    /// How long a request's head (request line and headers) may take to
    /// arrive in full, also while a kept-alive connection waits for its next
    /// request; past it the connection is closed.
    #[arg(long, env = "BATON_HEADER_TIMEOUT_MS", default_value_t = 10_000)]
    pub header_timeout_ms: u64,
    /// How long a connection with no request in flight may stay silent
    /// before it is closed (a live stream is never idle).
    #[arg(long, env = "BATON_IDLE_TIMEOUT_MS", default_value_t = 60_000)]
    pub idle_timeout_ms: u64,
    /// The most connections held open at once (streams included); past it a
    /// new connection is answered `503 too_many_connections` and closed.
    #[arg(long, env = "BATON_MAX_CONNECTIONS", default_value_t = 1_024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// An ACP agent as NAME=COMMAND (repeatable; the command is split like a
    /// shell would; env BATON_ACP, a `;`-separated list, read when no --acp
    /// is given).
    #[arg(long = "acp", value_parser = parse_pair)]
    pub acp: Vec<(String, String)>,
    /// An ACP agent's working directory as NAME=DIR (repeatable; env
    /// BATON_ACP_CWD, `;`-separated).
    #[arg(long = "acp-cwd", value_parser = parse_pair)]
    pub acp_cwd: Vec<(String, String)>,
    /// Extra environment variables an ACP agent may see, as NAME=VAR,VAR
    /// (repeatable). Only PATH, HOME, USER, LANG, LC_ALL, TMPDIR, TERM and
    /// these pass through; nothing else of the server's environment does
    /// (env BATON_ACP_ENV, `;`-separated).
    #[arg(long = "acp-env", value_parser = parse_pair)]
    pub acp_env: Vec<(String, String)>,
    /// What an ACP agent's permission requests get, as NAME=allow|deny|ask
    /// (default deny; `ask`: the user answers through the API). A session
    /// may set its own at creation (env BATON_ACP_PERMISSION, `;`-separated).
    #[arg(long = "acp-permission", value_parser = parse_pair)]
    pub acp_permission: Vec<(String, String)>,
    /// How long an ACP agent that died at start is left alone (turns fail at
    /// once meanwhile); doubled at each further failed start, up to 30 s.
    #[arg(long, env = "BATON_ACP_RESTART_BACKOFF_MS", default_value_t = 500)]
    pub acp_restart_backoff_ms: u64,
    /// How long an ACP session stays quiet after a cancelled prompt: the
    /// next turn waits, and late output of the cancelled one is dropped.
    #[arg(long, env = "BATON_ACP_QUIET_AFTER_CANCEL_MS", default_value_t = 300)]
    pub acp_quiet_after_cancel_ms: u64,
    /// The same after a prompt answered normally: an agent still talking
    /// after its answer is not heard in the next turn (0: off).
    #[arg(long, env = "BATON_ACP_QUIET_AFTER_ANSWER_MS", default_value_t = 250)]
    pub acp_quiet_after_answer_ms: u64,
    /// How long an ACP agent may take to start a turn in all: spawn,
    /// `initialize`, opening or loading the session. The turn's lease is
    /// renewed meanwhile; past it the turn ends `failed`.
    #[arg(long, env = "BATON_ACP_START_TIMEOUT_MS", default_value_t = 60_000)]
    pub acp_start_timeout_ms: u64,
    /// On SIGTERM, how long running turns may go on before they are
    /// cancelled (0: cancel at once). A second signal forces.
    #[arg(long, env = "BATON_SHUTDOWN_GRACE_MS", default_value_t = 30_000)]
    pub shutdown_grace_ms: u64,
    /// How long a permission request waits for the user's answer (policy
    /// `ask`) before it is answered `cancelled`.
    #[arg(long, env = "BATON_PERMISSION_TIMEOUT_MS", default_value_t = 600_000)]
    pub permission_timeout_ms: u64,
    /// The largest stored assistant message, tool result or run of text, in
    /// bytes; past it the turn ends `failed` and nothing partial is stored.
    #[arg(long, env = "BATON_MAX_OUTPUT_BYTES", default_value_t = 1 << 20)]
    pub max_output_bytes: usize,
    /// How log lines on stderr look: `text` for people, `json` (one object
    /// a line, the event's fields at the top level) for log pipelines.
    #[arg(long, env = "BATON_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// The demo agent's pause between streamed words.
    #[arg(long, env = "BATON_DEMO_WORD_DELAY_MS", default_value_t = 20)]
    pub demo_word_delay_ms: u64,
}

/// A listen address: `IP:PORT`, or `HOST:PORT` resolved now (an IPv4
/// address preferred), so a name that does not resolve is refused before
/// anything else happens.
fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if !s.contains(':') {
        return Err(format!("expected HOST:PORT, got {s:?}"));
    }
    let addrs: Vec<SocketAddr> = s
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {s:?}: {e}"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .ok_or_else(|| format!("{s:?} resolves to no address"))
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, value)) if !name.is_empty() && !value.is_empty() => {
            Ok((name.to_owned(), value.to_owned()))
        }
        _ => Err(format!("expected NAME=VALUE, got {s:?}")),
    }
}

fn parse_token(s: &str) -> Result<(String, String), String> {
    match s.split_once(':') {
        Some((owner, secret)) if !owner.is_empty() && !secret.is_empty() => {
            Ok((owner.to_owned(), secret.to_owned()))
        }
        _ => Err(format!("expected OWNER:SECRET, got {s:?}")),
    }
}

impl ServeConfig {
    /// A configuration with every default, on the embedded store at `db`.
    pub fn embedded(db: impl Into<String>) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            db: Some(db.into()),
            database_url: None,
            default_agent: "demo".into(),
            tokens: Vec::new(),
            policy: Policy::Queue,
            debounce_ms: 0,
            cancel_drain_ms: 5_000,
            turn_timeout_ms: 600_000,
            lease_ms: 10_000,
            heartbeat_ms: 3_000,
            sweep_ms: 2_000,
            queue_capacity: 1_000,
            pg_lanes: 2,
            max_body_bytes: 256 * 1024,
            body_timeout_ms: 30_000,
            header_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            max_connections: 1_024,
            demo_word_delay_ms: 20,
            log_format: LogFormat::Text,
            acp: Vec::new(),
            acp_cwd: Vec::new(),
            acp_env: Vec::new(),
            acp_permission: Vec::new(),
            acp_restart_backoff_ms: 500,
            acp_quiet_after_cancel_ms: 300,
            acp_quiet_after_answer_ms: 250,
            acp_start_timeout_ms: 60_000,
            shutdown_grace_ms: 30_000,
            permission_timeout_ms: 600_000,
            max_output_bytes: 1 << 20,
        }
    }

    /// The ACP agents configured, with their options.
    pub fn acp_agents(&self) -> Result<Vec<baton_agent::AcpConfig>, String> {
        let mut out: Vec<baton_agent::AcpConfig> = Vec::new();
        for (name, command) in &self.acp {
            if name == "demo" {
                return Err("--acp: the name demo is taken by the built-in agent".into());
            }
            if out.iter().any(|a| &a.name == name) {
                return Err(format!("--acp: agent {name:?} is defined twice"));
            }
            let mut cfg = baton_agent::AcpConfig::new(name.clone(), command)
                .map_err(|e| format!("--acp {name}: {e}"))?;
            cfg.restart_backoff = std::time::Duration::from_millis(self.acp_restart_backoff_ms);
            cfg.quiet_after_cancel =
                std::time::Duration::from_millis(self.acp_quiet_after_cancel_ms);
            cfg.quiet_after_answer =
                std::time::Duration::from_millis(self.acp_quiet_after_answer_ms);
            cfg.start_timeout = std::time::Duration::from_millis(self.acp_start_timeout_ms);
            for (n, dir) in &self.acp_cwd {
                if n == name {
                    cfg.cwd = Some(dir.into());
                }
            }
            for (n, vars) in &self.acp_env {
                if n == name {
                    cfg.env_allow
                        .extend(vars.split(',').filter(|v| !v.is_empty()).map(str::to_owned));
                }
            }
            for (n, p) in &self.acp_permission {
                if n == name {
                    cfg.permission = p
                        .parse()
                        .map_err(|e| format!("--acp-permission {name}: {e}"))?;
                }
            }
            out.push(cfg);
        }
        for (n, _) in self
            .acp_cwd
            .iter()
            .chain(&self.acp_env)
            .chain(&self.acp_permission)
        {
            if !self.acp.iter().any(|(name, _)| name == n) {
                return Err(format!(
                    "an option names agent {n:?}, which no --acp defines"
                ));
            }
        }
        Ok(out)
    }

    /// The store to open, from `--db` or `--database-url` (never both).
    pub fn store_target(&self) -> Result<StoreTarget, String> {
        match (&self.db, &self.database_url) {
            (Some(_), Some(_)) => Err(
                "both --db (BATON_DB) and --database-url (DATABASE_URL) are set; give one".into(),
            ),
            (Some(db), None) if db.is_empty() => Err("--db is empty".into()),
            (Some(db), None) => Ok(StoreTarget::File(PathBuf::from(db))),
            (None, Some(url)) => StoreTarget::from_url(url),
            (None, None) => Ok(StoreTarget::File(PathBuf::from(DEFAULT_DB))),
        }
    }

    /// The store, for messages and logs (never a password).
    pub fn store_display(&self) -> String {
        match self.store_target() {
            Ok(t) => t.to_string(),
            Err(_) => "(invalid store setting)".into(),
        }
    }

    /// Fills the repeatable flags not given on the command line from their
    /// environment lists (`BATON_TOKENS` comma-separated; `BATON_ACP`,
    /// `BATON_ACP_CWD`, `BATON_ACP_ENV`, `BATON_ACP_PERMISSION`
    /// `;`-separated). `var` reads one variable.
    pub fn read_env_lists(&mut self, var: impl Fn(&str) -> Option<String>) -> Result<(), String> {
        fn fill(
            into: &mut Vec<(String, String)>,
            name: &str,
            sep: char,
            parse: fn(&str) -> Result<(String, String), String>,
            var: &dyn Fn(&str) -> Option<String>,
        ) -> Result<(), String> {
            if !into.is_empty() {
                return Ok(());
            }
            if let Some(list) = var(name) {
                for item in list.split(sep).map(str::trim).filter(|i| !i.is_empty()) {
                    into.push(parse(item).map_err(|e| format!("{name}: {e}"))?);
                }
            }
            Ok(())
        }
        fill(&mut self.tokens, "BATON_TOKENS", ',', parse_token, &var)?;
        fill(&mut self.acp, "BATON_ACP", ';', parse_pair, &var)?;
        fill(&mut self.acp_cwd, "BATON_ACP_CWD", ';', parse_pair, &var)?;
        fill(&mut self.acp_env, "BATON_ACP_ENV", ';', parse_pair, &var)?;
        fill(
            &mut self.acp_permission,
            "BATON_ACP_PERMISSION",
            ';',
            parse_pair,
            &var,
        )?;
        Ok(())
    }

    /// Checks every setting that clap's types do not, before anything is
    /// opened, bound or created; returns what the server is built from.
    pub fn validate(&self) -> Result<Validated, String> {
        let target = self.store_target()?;
        let positive = [
            ("--lease-ms", self.lease_ms),
            ("--heartbeat-ms", self.heartbeat_ms),
            ("--sweep-ms", self.sweep_ms),
            ("--turn-timeout-ms", self.turn_timeout_ms),
            ("--acp-start-timeout-ms", self.acp_start_timeout_ms),
            ("--queue-capacity", self.queue_capacity as u64),
            ("--max-body-bytes", self.max_body_bytes as u64),
            ("--max-output-bytes", self.max_output_bytes as u64),
        ];
        for (flag, value) in positive {
            if value == 0 {
                return Err(format!("{flag} must be at least 1"));
            }
        }
        if self.heartbeat_ms >= self.lease_ms {
            return Err(format!(
                "--heartbeat-ms ({}) must be shorter than --lease-ms ({}): a lease must be renewed before it expires",
                self.heartbeat_ms, self.lease_ms
            ));
        }
        if self.debounce_ms > baton_api::sessions::MAX_DEBOUNCE_MS {
            return Err(format!(
                "--debounce-ms ({}) must be at most {} (one hour)",
                self.debounce_ms,
                baton_api::sessions::MAX_DEBOUNCE_MS
            ));
        }
        let mut owners = std::collections::HashMap::new();
        for (owner, secret) in &self.tokens {
            if let Some(other) = owners.insert(secret.as_str(), owner.as_str()) {
                if other != owner {
                    return Err(format!(
                        "--token: owners {other:?} and {owner:?} have the same secret"
                    ));
                }
            }
        }
        let acp = self.acp_agents()?;
        if self.default_agent != "demo" && !acp.iter().any(|a| a.name == self.default_agent) {
            let mut known = vec!["demo".to_owned()];
            known.extend(acp.iter().map(|a| a.name.clone()));
            return Err(format!(
                "--default-agent {:?} is not a configured agent (configured: {})",
                self.default_agent,
                known.join(", ")
            ));
        }
        Ok(Validated { target, acp })
    }

    pub fn cancel_drain(&self) -> Duration {
        Duration::from_millis(self.cancel_drain_ms)
    }
    pub fn turn_timeout(&self) -> Duration {
        Duration::from_millis(self.turn_timeout_ms)
    }
    pub fn lease_ttl(&self) -> Duration {
        Duration::from_millis(self.lease_ms)
    }
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }
    pub fn sweep_interval(&self) -> Duration {
        Duration::from_millis(self.sweep_ms)
    }
    /// The HTTP connection limits.
    pub fn limits(&self) -> crate::serve::Limits {
        crate::serve::Limits {
            header_timeout: Duration::from_millis(self.header_timeout_ms.max(1)),
            idle_timeout: Duration::from_millis(self.idle_timeout_ms.max(1)),
            max_connections: self.max_connections.max(1) as usize,
        }
    }
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }
}

/// The log lines' format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where the store lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreTarget {
    /// The embedded store's file.
    File(PathBuf),
    /// A PostgreSQL URL.
    Postgres(String),
}

impl StoreTarget {
    /// Reads `--database-url`: `postgres://…`, `postgresql://…` or
    /// `sqlite:PATH` (also `sqlite://PATH`, `sqlite:///ABSOLUTE`). The
    /// message of a refusal names the scheme, never the rest (a password).
    pub fn from_url(url: &str) -> Result<Self, String> {
        const EXPECTED: &str =
            "expected postgres://…, postgresql://… or sqlite:PATH (a plain file: --db PATH)";
        let Some((scheme, rest)) = url.split_once(':') else {
            return Err(format!(
                "--database-url is not a URL (no scheme): {EXPECTED}"
            ));
        };
        match scheme.to_ascii_lowercase().as_str() {
            "postgres" | "postgresql" => {
                if !rest.starts_with("//") {
                    return Err(format!(
                        "--database-url: a {scheme} URL starts with {scheme}://"
                    ));
                }
                Ok(Self::Postgres(url.to_owned()))
            }
            "sqlite" => {
                let path = rest.strip_prefix("//").unwrap_or(rest);
                if path.contains('?') {
                    return Err(
                        "--database-url: sqlite URL options (`?…`) are not supported; the embedded store sets its own"
                            .into(),
                    );
                }
                if path.is_empty() || path == ":memory:" {
                    return Err(
                        "--database-url: a sqlite URL names a file (sqlite:PATH); an in-memory store is not durable"
                            .into(),
                    );
                }
                Ok(Self::File(PathBuf::from(path)))
            }
            "" => Err(format!(
                "--database-url is not a URL (no scheme): {EXPECTED}"
            )),
            other => Err(format!(
                "--database-url: unsupported scheme {other:?}: {EXPECTED}"
            )),
        }
    }
}

impl std::fmt::Display for StoreTarget {
    /// The file, or the URL without its password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(path) => write!(f, "file {}", path.display()),
            Self::Postgres(url) => write!(f, "postgresql {}", redact(url)),
        }
    }
}

/// A URL with the password of its user info (if any) replaced by `***`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let auth_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(auth_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            let masked = if userinfo.contains(':') { ":***" } else { "" };
            let query = if tail.contains("password=") {
                "?…"
            } else {
                ""
            };
            let path = tail.split('?').next().unwrap_or("");
            format!("{scheme}://{user}{masked}@{host}{path}{query}")
        }
        None => {
            let path = tail.split('?').next().unwrap_or("");
            let query = if tail.contains('?') { "?…" } else { "" };
            format!("{scheme}://{authority}{path}{query}")
        }
    }
}

/// What a valid configuration yields.
#[derive(Debug)]
pub struct Validated {
    pub target: StoreTarget,
    pub acp: Vec<baton_agent::AcpConfig>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn database_urls_are_read_by_scheme() {
        let pg = "postgres://u:pw@h:5432/db";
        assert_eq!(
            StoreTarget::from_url(pg),
            Ok(StoreTarget::Postgres(pg.into()))
        );
        let pg = "postgresql://h/db";
        assert_eq!(
            StoreTarget::from_url(pg),
            Ok(StoreTarget::Postgres(pg.into()))
        );
        for (url, path) in [
            ("sqlite:a.db", "a.db"),
            ("sqlite://a.db", "a.db"),
            ("sqlite:///tmp/a.db", "/tmp/a.db"),
        ] {
            assert_eq!(
                StoreTarget::from_url(url),
                Ok(StoreTarget::File(PathBuf::from(path))),
                "{url}"
            );
        }
        for (url, says) in [
            ("notaurl", "not a URL"),
            ("mysql://root:secret@h/db", "unsupported scheme \"mysql\""),
            ("postgres:h/db", "starts with postgres://"),
            ("sqlite::memory:", "not durable"),
            ("sqlite:", "names a file"),
            ("sqlite:a.db?mode=ro", "not supported"),
        ] {
            let e = StoreTarget::from_url(url).expect_err(url);
            assert!(e.contains(says), "{url}: {e}");
            assert!(!e.contains("secret"), "{url}: a password in {e}");
        }
    }

    #[test]
    fn passwords_never_show() {
        assert_eq!(redact("postgres://u:pw@h:5/db"), "postgres://u:***@h:5/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("postgres://h/db?password=x"), "postgres://h/db?…");
        assert_eq!(redact("postgres://u:p@w@h/db"), "postgres://u:***@h/db");
    }

    #[test]
    fn flags_are_whole_and_env_lists_are_split() {
        let mut cfg = ServeConfig::embedded("x.db");
        cfg.tokens = vec![("a".into(), "s,t".into())];
        cfg.acp = vec![("x".into(), "sh -c 'a; b'".into())];
        let env = |k: &str| match k {
            "BATON_TOKENS" => Some("b:1,c:2".to_owned()),
            "BATON_ACP" => Some("y=one;z=two".to_owned()),
            "BATON_ACP_ENV" => Some("x=A,B;y=C".to_owned()),
            _ => None,
        };
        cfg.read_env_lists(env).unwrap();
        assert_eq!(cfg.tokens, vec![("a".to_owned(), "s,t".to_owned())]);
        assert_eq!(cfg.acp, vec![("x".to_owned(), "sh -c 'a; b'".to_owned())]);
        assert_eq!(
            cfg.acp_env,
            vec![
                ("x".to_owned(), "A,B".to_owned()),
                ("y".to_owned(), "C".to_owned())
            ]
        );
        let mut cfg = ServeConfig::embedded("x.db");
        cfg.read_env_lists(env).unwrap();
        assert_eq!(cfg.tokens.len(), 2);
        assert_eq!(cfg.acp.len(), 2);
    }

    #[test]
    fn host_names_resolve() {
        let addr = parse_listen("localhost:7700").unwrap();
        assert!(addr.ip().is_loopback(), "{addr}");
        assert_eq!(addr.port(), 7700);
        assert!(parse_listen("nonsense").is_err());
    }
}
