//! The `baton` binary's library: configuration and the composition root.
//!
//! [`App::build`] opens the store, binds the listener, recovers what a
//! previous process left, and wires store → engine → API; [`App::run_until`]
//! serves until a shutdown signal, then stops accepting, cancels running
//! turns (reason `shutdown`), drains them and returns. Tests embed servers
//! through the same two calls on `127.0.0.1:0`.

pub mod bench;
pub mod bench_acp;
pub mod bench_http;
pub mod chat;
pub mod config;
pub mod serve;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use baton_agent::{Agents, DemoAgent};
use baton_api::{ApiConfig, AppState, Auth, Metrics};
use baton_engine::{Bus, Engine, EngineConfig};
use baton_store::{SharedStore, SqlStore, StoreConfig};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::{ServeConfig, StoreTarget};

/// How long requests still in flight may go on once the engine has stopped
/// at shutdown (a stream sends the last entries and ends well within it).
const REQUEST_DRAIN: Duration = Duration::from_secs(5);

/// A built server, listening but not yet serving.
pub struct App {
    listener: TcpListener,
    addr: SocketAddr,
    engine: Engine,
    state: AppState,
    limits: serve::Limits,
}

impl App {
    /// Checks the configuration, binds, opens the store, recovers; ready
    /// to serve. Nothing is created on disk before every setting was
    /// checked and the address bound.
    pub async fn build(cfg: &ServeConfig) -> anyhow::Result<Self> {
        let config::Validated { target, acp } = cfg
            .validate()
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        let listener = TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("binding {}", cfg.listen))?;
        let addr = listener.local_addr().context("reading the bound address")?;
        let store_cfg = StoreConfig {
            lease_ttl: cfg.lease_ttl(),
            queue_capacity: cfg.queue_capacity,
            pg_lanes: usize::from(cfg.pg_lanes),
            ..StoreConfig::default()
        };
        let sql = match &target {
            StoreTarget::File(path) => SqlStore::open_sqlite(path, store_cfg).await,
            StoreTarget::Postgres(url) => SqlStore::open_postgres(url, store_cfg).await,
        }
        .with_context(|| format!("opening the store ({target})"))?;
        tracing::info!(store = %target, "store opened");
        let sole_owner = sql.is_embedded();
        let store: SharedStore = Arc::new(sql);
        let mut agents = Agents::with_demo(DemoAgent {
            word_delay: std::time::Duration::from_millis(cfg.demo_word_delay_ms),
            ..DemoAgent::default()
        });
        for acp in acp {
            tracing::info!(agent = %acp.name, kind = "acp", command = ?acp.command, "agent configured");
            let name = acp.name.clone();
            agents.insert(name, Arc::new(baton_agent::AcpDriver::new(acp)));
        }
        tracing::info!(agent = "demo", kind = "demo", "agent configured");
        let engine_cfg = EngineConfig {
            cancel_drain: cfg.cancel_drain(),
            turn_timeout: cfg.turn_timeout(),
            heartbeat: cfg.heartbeat(),
            lease_ttl: cfg.lease_ttl(),
            sweep_interval: cfg.sweep_interval(),
            sole_owner,
            max_output_bytes: cfg.max_output_bytes,
            shutdown_grace: cfg.shutdown_grace(),
            permission_timeout: std::time::Duration::from_millis(cfg.permission_timeout_ms),
            ..EngineConfig::default()
        };
        let bus = match &target {
            // Several nodes may share the database: fan out across them.
            StoreTarget::Postgres(url) if !sole_owner => baton_engine::pg_bus::connect(
                url,
                &engine_cfg.node,
                baton_store::pg_timeouts(engine_cfg.lease_ttl),
            )
            .await
            .context("connecting the cross-node bus (LISTEN/NOTIFY)")?,
            _ => Bus::default(),
        };
        let engine = Engine::new(store, bus, std::mem::take(&mut agents), engine_cfg);
        engine
            .start()
            .await
            .context("recovering sessions left by a previous run")?;
        let state = AppState {
            engine: engine.clone(),
            auth: Arc::new(Auth::new(cfg.tokens.iter().cloned())),
            cfg: Arc::new(ApiConfig {
                max_body: cfg.max_body_bytes,
                body_timeout: Duration::from_millis(cfg.body_timeout_ms.max(1)),
                default_agent: cfg.default_agent.clone(),
                default_policy: cfg.policy,
                default_debounce_ms: cfg.debounce_ms,
            }),
            metrics: Arc::new(Metrics::for_engine(&engine)),
        };
        if cfg.tokens.is_empty() {
            tracing::info!(auth = "none", "no tokens: every request is owner local");
        } else {
            let mut owners: Vec<&str> = cfg.tokens.iter().map(|(o, _)| o.as_str()).collect();
            owners.sort_unstable();
            owners.dedup();
            tracing::info!(auth = "bearer", owners = ?owners, "bearer tokens required");
        }
        tracing::info!(%addr, default_agent = %cfg.default_agent, policy = %cfg.policy, "listening");
        Ok(Self {
            listener,
            addr,
            engine,
            state,
            limits: cfg.limits(),
        })
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The engine (for tests).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Serves until `signal` resolves, then shuts down gracefully.
    pub async fn run_until(
        self,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        self.run_until_forced(signal, std::future::pending()).await
    }

    /// [`App::run_until`], where `force` resolving during the shutdown ends
    /// the grace and the drain at once (a second signal).
    pub async fn run_until_forced(
        self,
        signal: impl Future<Output = ()> + Send + 'static,
        force: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let engine = self.engine.clone();
        let router = baton_api::router(self.state);
        let stop = CancellationToken::new();
        let kill = CancellationToken::new();
        let mut server = tokio::spawn(serve::serve(
            self.listener,
            router,
            self.limits,
            stop.clone(),
            kill.clone(),
        ));
        signal.await;
        tracing::info!("shutting down: no new connections");
        // Connections with nothing in flight (idle, or a request still
        // half-sent) close now; the others finish their response.
        stop.cancel();
        // Lets running turns finish within the grace, then cancels the
        // rest; ends streams once the turns are over.
        engine.shutdown_with(force).await;
        match tokio::time::timeout(REQUEST_DRAIN, &mut server).await {
            Ok(joined) => joined.context("the HTTP server task panicked")?,
            Err(_) => {
                tracing::warn!("closing connections whose request did not finish in time");
                kill.cancel();
                server.await.context("the HTTP server task panicked")?;
            }
        }
        // An actor a late request spawned releases its lease at once.
        engine.wait_idle(Duration::from_secs(2)).await;
        if let Err(e) = engine.store().flush().await {
            tracing::warn!(error = %e, "flushing the store at shutdown");
        }
        tracing::info!("shut down cleanly");
        Ok(())
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
