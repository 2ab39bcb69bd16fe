//! `baton serve` configuration: every flag also reads an environment variable.

use std::net::SocketAddr;
use std::time::Duration;

use baton_core::Policy;
use clap::Args;

/// `baton serve` flags.
#[derive(Clone, Debug, Args)]
pub struct ServeConfig {
    /// Address to listen on (`127.0.0.1:0` picks a free port).
    #[arg(long, env = "BATON_LISTEN", default_value = "127.0.0.1:7700")]
    pub listen: SocketAddr,
    /// The embedded store's file (SQLite).
    #[arg(long, env = "BATON_DB", default_value = "./baton.db")]
    pub db: String,
    /// A PostgreSQL URL; when set, it is used instead of the embedded store.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// The agent of sessions created without one.
    #[arg(long, env = "BATON_DEFAULT_AGENT", default_value = "demo")]
    pub default_agent: String,
    /// Bearer tokens as OWNER:SECRET (repeatable; env: comma-separated).
    /// With none, every request is owner `local`.
    #[arg(long = "token", env = "BATON_TOKENS", value_delimiter = ',', value_parser = parse_token)]
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
    /// Largest request body, in bytes.
    #[arg(long, env = "BATON_MAX_BODY_BYTES", default_value_t = 256 * 1024)]
    pub max_body_bytes: usize,
    /// An ACP agent as NAME=COMMAND (repeatable; the command is split like a
    /// shell would; env: `;`-separated).
    #[arg(long = "acp", env = "BATON_ACP", value_delimiter = ';', value_parser = parse_pair)]
    pub acp: Vec<(String, String)>,
    /// An ACP agent's working directory as NAME=DIR (repeatable).
    #[arg(long = "acp-cwd", env = "BATON_ACP_CWD", value_delimiter = ';', value_parser = parse_pair)]
    pub acp_cwd: Vec<(String, String)>,
    /// Extra environment variables an ACP agent may see, as NAME=VAR,VAR
    /// (repeatable). Only PATH, HOME, USER, LANG, LC_ALL, TMPDIR, TERM and
    /// these pass through; nothing else of the server's environment does.
    #[arg(long = "acp-env", env = "BATON_ACP_ENV", value_delimiter = ';', value_parser = parse_pair)]
    pub acp_env: Vec<(String, String)>,
    /// What an ACP agent's permission requests get, as NAME=allow|deny|ask
    /// (default deny; `ask`: the user answers through the API). A session
    /// may set its own at creation.
    #[arg(long = "acp-permission", env = "BATON_ACP_PERMISSION", value_delimiter = ';', value_parser = parse_pair)]
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
    /// The demo agent's pause between streamed words.
    #[arg(long, env = "BATON_DEMO_WORD_DELAY_MS", default_value_t = 20)]
    pub demo_word_delay_ms: u64,
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
            db: db.into(),
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
            max_body_bytes: 256 * 1024,
            demo_word_delay_ms: 20,
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
        let mut out = Vec::new();
        for (name, command) in &self.acp {
            if name == "demo" {
                return Err("the name demo is taken by the built-in agent".into());
            }
            let mut cfg = baton_agent::AcpConfig::new(name.clone(), command)?;
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
                    cfg.permission = p.parse()?;
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

    /// The store to open: the PostgreSQL URL if set, else the file.
    pub fn store_target(&self) -> String {
        self.database_url.clone().unwrap_or_else(|| self.db.clone())
    }

    /// The store, for messages (no password).
    pub fn store_display(&self) -> String {
        match &self.database_url {
            Some(url) => match url.split_once('@') {
                Some((_, host)) => format!("postgres://…@{host}"),
                None => url.clone(),
            },
            None => self.db.clone(),
        }
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
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }
}
