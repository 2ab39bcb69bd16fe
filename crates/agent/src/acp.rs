//! The ACP driver: real agents over the Agent Client Protocol, as
//! subprocesses speaking JSON-RPC on stdio (`agent-client-protocol` 5).
//!
//! One process per configured agent, spawned on first use and shared by that
//! agent's sessions (one ACP session per Baton session). Baton spawns the
//! process itself — so the working directory, an environment built from an
//! allow-list only (no server secrets), the stderr tail and the kill are its
//! own — and connects the crate's client over the pipes.
//!
//! What keeps the invariants:
//! - **One prompt in flight per ACP session, by construction.** A Baton
//!   session's turn holds that session's slot (an async mutex) from before
//!   its set-up until its prompt answered or was abandoned; the next turn,
//!   from this actor or from one that superseded it, waits for the slot.
//! - **Attribution by protocol** (`baton_core::late`). An update is routed
//!   to a turn only while that turn's prompt is in flight on its ACP session
//!   (a [`PromptGate`]: opened right before `session/prompt` is sent, gone
//!   when its response arrives). JSON-RPC on one pipe is ordered, so every
//!   update the agent sent before answering is handled before the answer;
//!   what arrives after it, after `session/cancel`, or on an abandoned ACP
//!   session is dropped and counted (`late_updates`). The one case the
//!   protocol cannot order, an agent still talking after it answered while
//!   the next prompt is on its way, is covered by a quiet window: the next
//!   prompt on that ACP session waits `quiet_after_answer` (after a cancelled
//!   prompt `quiet_after_cancel`) from the answer, and what arrives meanwhile
//!   is dropped. A `session/load` replay is routed to no turn.
//! - **Forced stops are isolated.** A turn forced off its ACP session (it
//!   ignored `session/cancel` past the drain deadline, its lease was lost, its
//!   output could not be stored) never fails another session's turn: when no
//!   other session is prompting or setting up on the process, the process is
//!   restarted (the session resumes with `session/resume` or `session/load`
//!   where the agent supports them); otherwise only that ACP session is
//!   abandoned (closed with `session/close` where supported) and the Baton
//!   session continues in a new ACP session, losing the agent's own memory
//!   of the conversation unless it can load it.
//! - **Starting is bounded.** Spawning, `initialize` and opening or loading
//!   the session take at most `start_timeout` together; the engine renews the
//!   turn's lease meanwhile, and checks the turn's [`Fence`] right before the
//!   prompt goes out.
//! - Process death fails every turn on it with the exit status and stderr
//!   tail. A process whose pipes close is retired before any turn on it ends
//!   (and killed if it lingers), so the next turn never joins a dead
//!   connection. A process that keeps dying at start backs off, and turns
//!   fail at once with a clear reason meanwhile.
//! - Updates reach the engine through a bounded channel: a turn whose engine
//!   is slow to store stalls the agent's pipe (backpressure) rather than
//!   buffering without limit.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_client_protocol::schema::ProtocolVersion;
use agent_client_protocol::v1::schema::{
    CancelNotification, CloseSessionRequest, ContentBlock, InitializeRequest, LoadSessionRequest,
    NewSessionRequest, PromptRequest, RequestPermissionOutcome, RequestPermissionRequest,
    RequestPermissionResponse, ResumeSessionRequest, SelectedPermissionOutcome,
    SessionNotification, SessionUpdate, StopReason as AcpStop, TextContent, ToolCallStatus,
};
use agent_client_protocol::v1::ConnectionTo;
use agent_client_protocol::{Agent, ByteStreams};
use async_trait::async_trait;
use baton_core::late::{LateReason, PromptGate};
use baton_core::turn::{AgentOutput, StopReason};
use baton_core::{PermissionInfo, PermissionOptionInfo, SessionId, ToolInfo};
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot};
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

use crate::{
    AgentDriver, AgentError, AgentEvent, TurnControl, TurnHandle, TurnInput, EVENT_CAPACITY,
};

pub use baton_core::PermissionPolicy;

/// Environment variables an agent gets unless told otherwise. Nothing else
/// of the server's environment reaches it.
pub const DEFAULT_ENV_ALLOW: &[&str] =
    &["PATH", "HOME", "USER", "LANG", "LC_ALL", "TMPDIR", "TERM"];

/// How to run one ACP agent.
#[derive(Clone, Debug)]
pub struct AcpConfig {
    /// The agent's name in Baton.
    pub name: String,
    /// The command line, split like a shell would.
    pub command: Vec<String>,
    /// The process's working directory (default: the server's).
    pub cwd: Option<PathBuf>,
    /// Environment variables passed through from the server's.
    pub env_allow: Vec<String>,
    /// What permission requests get.
    pub permission: PermissionPolicy,
    /// How long starting a turn may take in all: spawning the process,
    /// `initialize`, and opening, resuming or loading the session.
    pub start_timeout: Duration,
    /// How long turns fail at once after the process died at start, before
    /// it is started again; doubled at each further failed start, up to
    /// `MAX_RESTART_BACKOFF`.
    pub restart_backoff: Duration,
    /// How long a session stays quiet after a cancelled prompt: its next
    /// turn waits this long, and what the agent sends meanwhile is dropped
    /// (ACP updates name no request, so late output of a cancelled prompt
    /// would otherwise read as the next turn's).
    pub quiet_after_cancel: Duration,
    /// The same after a prompt answered normally: an agent that still
    /// talks after its answer is not heard in the next turn. Zero turns it
    /// off (for agents known to stop talking when they answer).
    pub quiet_after_answer: Duration,
}

/// The longest wait between two failed starts.
pub const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(30);

impl AcpConfig {
    /// A configuration for `name` running `command` (shell-split).
    pub fn new(name: impl Into<String>, command: &str) -> Result<Self, String> {
        let command = shlex::split(command)
            .ok_or_else(|| format!("cannot split {command:?} like a shell"))?;
        if command.is_empty() {
            return Err("the agent's command is empty".into());
        }
        Ok(Self {
            name: name.into(),
            command,
            cwd: None,
            env_allow: DEFAULT_ENV_ALLOW.iter().map(|s| (*s).to_owned()).collect(),
            permission: PermissionPolicy::default(),
            start_timeout: Duration::from_secs(60),
            restart_backoff: Duration::from_millis(500),
            quiet_after_cancel: Duration::from_millis(300),
            quiet_after_answer: Duration::from_millis(250),
        })
    }
}

/// The turn whose prompt is in flight on one ACP session.
struct Sink {
    /// Which prompt: a prompt, cancel or stop of an earlier turn on the same
    /// ACP session (resumed on a new process) must not touch this one.
    turn: u64,
    gate: PromptGate,
    tx: mpsc::Sender<AgentEvent>,
    /// The process it runs on: only that process's death ends it.
    generation: u64,
    /// Tells the prompt's task that the turn was forced off the session.
    abandon: Option<oneshot::Sender<()>>,
    /// What this turn's permission requests get.
    policy: PermissionPolicy,
    /// Requests waiting for the user's answer (policy `ask`), by request id.
    /// Dropping one answers it `cancelled`, so a turn that ends, is forced
    /// off or loses its process leaves no request unanswered.
    asks: HashMap<String, Reply>,
}

/// The answer owed to one `session/request_permission`. Sending it goes into
/// the connection's outgoing queue at once, so an answer sent before
/// `session/cancel` reaches the agent before it; dropped unsent, it answers
/// `cancelled` (the spec's answer for a request nobody will answer).
struct Reply(Option<Box<dyn FnOnce(RequestPermissionOutcome) + Send>>);

impl Reply {
    fn new(send: impl FnOnce(RequestPermissionOutcome) + Send + 'static) -> Self {
        Self(Some(Box::new(send)))
    }

    fn send(mut self, outcome: RequestPermissionOutcome) {
        if let Some(send) = self.0.take() {
            send(outcome);
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if let Some(send) = self.0.take() {
            send(RequestPermissionOutcome::Cancelled);
        }
    }
}

/// State shared with the connection's handlers (which run inside its
/// dispatch loop: they route, and wait only for room in a turn's channel).
#[derive(Default)]
struct Shared {
    /// The agent's name, for logs.
    name: String,
    /// ACP session id → the turn whose prompt is in flight on it.
    sinks: Mutex<HashMap<String, Sink>>,
    /// ACP sessions given up after a forced stop: never prompted again.
    abandoned: Mutex<HashSet<String>>,
    /// The last bytes the process wrote to stderr.
    stderr: Mutex<VecDeque<u8>>,
    status: Mutex<Status>,
    /// Numbers the turns started on this agent.
    turns: AtomicU64,
    /// Updates dropped as late.
    late: AtomicU64,
    /// ACP session id → until when it stays quiet after its last answer.
    quiet_until: Mutex<HashMap<String, Instant>>,
}

#[derive(Clone, Debug, Default)]
struct Status {
    state: &'static str,
    pid: Option<u32>,
    capabilities: Value,
    starts: u64,
    last_exit: Option<String>,
}

const STDERR_TAIL: usize = 4096;

impl Shared {
    fn stderr_tail(&self) -> String {
        let buf = self.stderr.lock().unwrap_or_else(|p| p.into_inner());
        let bytes: Vec<u8> = buf.iter().copied().collect();
        String::from_utf8_lossy(&bytes).trim().to_owned()
    }

    /// Where an update arriving now on `session` goes, or why it is late.
    fn target(&self, session: &str) -> Result<mpsc::Sender<AgentEvent>, LateReason> {
        let sinks = self.sinks.lock().unwrap_or_else(|p| p.into_inner());
        match sinks.get(session) {
            Some(sink) => sink.gate.admit().map(|_| sink.tx.clone()),
            None if self
                .abandoned
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(session) =>
            {
                Err(LateReason::Abandoned)
            }
            None => Err(LateReason::NoPrompt),
        }
    }

    /// Drops an update that came too late, and counts it.
    fn late(&self, session: &str, why: LateReason, what: &str) {
        self.late.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(agent = %self.name, session, reason = why.as_str(), what, "dropped a late agent update");
    }

    /// Takes the sink of `turn` on `session`: whoever takes it ends the turn.
    fn take_sink(&self, session: &str, turn: u64) -> Option<Sink> {
        let mut sinks = self.sinks.lock().unwrap_or_else(|p| p.into_inner());
        match sinks.get(session) {
            Some(s) if s.turn == turn => sinks.remove(session),
            _ => None,
        }
    }

    /// How many prompts are in flight on the process of `generation`.
    fn in_flight_on(&self, generation: u64) -> usize {
        let sinks = self.sinks.lock().unwrap_or_else(|p| p.into_inner());
        sinks
            .values()
            .filter(|s| s.generation == generation)
            .count()
    }

    /// Ends every turn on the process of `generation`: it exited.
    fn fail_all(&self, generation: u64, why: &str) {
        let sinks: Vec<Sink> = {
            let mut all = self.sinks.lock().unwrap_or_else(|p| p.into_inner());
            let doomed: Vec<String> = all
                .iter()
                .filter(|(_, s)| s.generation == generation)
                .map(|(k, _)| k.clone())
                .collect();
            doomed.iter().filter_map(|k| all.remove(k)).collect()
        };
        for s in sinks {
            let stop = if s.gate.admit() == Err(LateReason::AfterCancel) {
                StopReason::Cancelled
            } else {
                StopReason::Failed(why.to_owned())
            };
            // The turn's engine is waiting for this (or has moved on).
            tokio::spawn(async move {
                let _ = s.tx.send(AgentEvent::Stopped(stop)).await;
            });
        }
    }
}

/// A live process and its connection.
struct Process {
    cx: ConnectionTo<Agent>,
    generation: u64,
    load_session: bool,
    /// `session/resume` (no replay) is advertised.
    resume: bool,
    /// `session/close` is advertised.
    close: bool,
    /// ACP sessions opened or loaded on this process.
    known: Mutex<HashSet<String>>,
    /// Turns setting up a session on it (not yet prompting): a forced stop
    /// must not kill the process under them.
    setting_up: AtomicU64,
    life: Life,
    /// Keeps the process running while it is the launcher's.
    _keep: mpsc::UnboundedSender<()>,
}

impl Process {
    fn knows(&self, id: &str) -> bool {
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
    }

    fn learn(&self, id: &str) {
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_owned());
    }

    fn forget(&self, id: &str) {
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }
}

/// Counts a turn setting up on a process for as long as it lives.
struct SettingUp(Arc<Process>);

impl SettingUp {
    fn new(p: &Arc<Process>) -> Self {
        p.setting_up.fetch_add(1, Ordering::SeqCst);
        Self(p.clone())
    }
}

impl Drop for SettingUp {
    fn drop(&mut self) {
        self.0.setting_up.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How long a process whose pipes closed may take to exit by itself before
/// it is killed: its own exit status and last stderr say why it went.
const EXIT_GRACE: Duration = Duration::from_secs(2);

/// How long a prompt whose pipes closed waits, after the kill, for the
/// process's exit to end its turn.
const REAP_PATIENCE: Duration = Duration::from_secs(10);

/// One process's life, shared by its connection, its prompts and its turns'
/// controls.
#[derive(Clone)]
struct Life {
    /// Cleared the moment the process is known to be useless (its pipes
    /// closed, it exited, or it is being killed): no new turn joins it. It is
    /// cleared before any turn on it ends, so the turn that follows starts a
    /// new process rather than prompting a dead one.
    alive: Arc<std::sync::atomic::AtomicBool>,
    /// Weak: the process is also killed once the last strong sender (its
    /// `Process` and the controls of turns on it) is gone, so a dropped
    /// driver leaves no process behind.
    kill: mpsc::WeakUnboundedSender<()>,
    /// Becomes true once the process was reaped and the turns registered on
    /// it then were failed (a turn that registered later ends through its
    /// own prompt's error).
    exited: tokio::sync::watch::Receiver<bool>,
    /// Becomes true once its stderr reached end of file: all it wrote there
    /// is in the tail.
    stderr_closed: tokio::sync::watch::Receiver<bool>,
}

/// How long the stderr tail may wait for end of file once the process is
/// gone (a grandchild may hold the pipe open).
const STDERR_PATIENCE: Duration = Duration::from_secs(1);

impl Life {
    fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    /// No new turn joins the process from now on.
    fn retire(&self) {
        self.alive.store(false, Ordering::SeqCst);
    }

    fn kill(&self) {
        self.retire();
        // No sender left means the reaper is killing it already.
        if let Some(kill) = self.kill.upgrade() {
            let _ = kill.send(());
        }
    }

    /// The last of what the process wrote to stderr, once it all arrived.
    async fn last_words(&self, shared: &Shared) -> String {
        let mut closed = self.stderr_closed.clone();
        let _ = tokio::time::timeout(STDERR_PATIENCE, closed.wait_for(|c| *c)).await;
        shared.stderr_tail()
    }

    /// The connection's pipes closed: retire the process, let it exit by
    /// itself for a moment, then kill it; returns once it was reaped (or
    /// `REAP_PATIENCE` after the kill).
    async fn pipes_closed(&self) {
        self.retire();
        let mut exited = self.exited.clone();
        if tokio::time::timeout(EXIT_GRACE, exited.wait_for(|e| *e))
            .await
            .is_err()
        {
            self.kill();
            let _ = tokio::time::timeout(REAP_PATIENCE, exited.wait_for(|e| *e)).await;
        }
    }
}

struct Launcher {
    process: Option<Arc<Process>>,
    /// Consecutive processes that died before serving a turn.
    failed_starts: u32,
    retry_at: Option<Instant>,
}

/// An ACP agent.
pub struct AcpDriver {
    cfg: AcpConfig,
    shared: Arc<Shared>,
    // A tokio mutex: spawning awaits, and two spawns must not race. Held
    // only to get the live process, never across a session's set-up.
    launcher: tokio::sync::Mutex<Launcher>,
    generation: AtomicU64,
    /// Baton session → its slot: held by a turn from before its set-up
    /// until its prompt answered or was abandoned (at most one prompt in
    /// flight per ACP session). A std mutex, held only to look up a slot.
    slots: Mutex<HashMap<SessionId, Arc<tokio::sync::Mutex<()>>>>,
}

impl AcpDriver {
    /// A driver for `cfg`; the process starts on first use.
    pub fn new(cfg: AcpConfig) -> Self {
        let shared = Arc::new(Shared {
            name: cfg.name.clone(),
            ..Shared::default()
        });
        shared
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .state = "not_started";
        Self {
            cfg,
            shared,
            launcher: tokio::sync::Mutex::new(Launcher {
                process: None,
                failed_starts: 0,
                retry_at: None,
            }),
            generation: AtomicU64::new(0),
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// The slot of a Baton session.
    fn slot(&self, session: SessionId) -> Arc<tokio::sync::Mutex<()>> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        // Forget the slots nobody holds or waits for.
        if slots.len() > 1024 {
            slots.retain(|_, s| Arc::strong_count(s) > 1);
        }
        slots.entry(session).or_default().clone()
    }

    fn unavailable(&self, why: impl std::fmt::Display) -> AgentError {
        AgentError::Unavailable(format!("agent {:?}: {why}", self.cfg.name))
    }

    async fn spawn(&self) -> Result<Process, AgentError> {
        let mut cmd = tokio::process::Command::new(&self.cfg.command[0]);
        cmd.args(&self.cfg.command[1..])
            .env_clear()
            .envs(
                self.cfg
                    .env_allow
                    .iter()
                    .filter_map(|k| std::env::var(k).ok().map(|v| (k.clone(), v))),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(dir) = &self.cfg.cwd {
            cmd.current_dir(dir);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| self.unavailable(format!("cannot start {:?}: {e}", self.cfg.command)))?;
        let (Some(stdin), Some(stdout), Some(mut stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(self.unavailable("the process has no stdio pipes"));
        };
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        self.shared
            .stderr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        {
            let mut st = self.shared.status.lock().unwrap_or_else(|p| p.into_inner());
            st.state = "starting";
            st.pid = child.id();
            st.starts += 1;
        }
        let shared = self.shared.clone();
        let (stderr_closed_tx, stderr_closed) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            while let Ok(n) = stderr.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                let mut tail = shared.stderr.lock().unwrap_or_else(|p| p.into_inner());
                tail.extend(&buf[..n]);
                while tail.len() > STDERR_TAIL {
                    tail.pop_front();
                }
            }
            stderr_closed_tx.send_replace(true);
        });

        let (kill_tx, mut kill_rx) = mpsc::unbounded_channel::<()>();
        let (exited_tx, exited_rx) = tokio::sync::watch::channel(false);
        let life = Life {
            alive: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            kill: kill_tx.downgrade(),
            exited: exited_rx,
            stderr_closed,
        };

        // The connection: handlers route and return at once.
        let (cx_tx, cx_rx) = oneshot::channel::<ConnectionTo<Agent>>();
        let (close_tx, close_rx) = oneshot::channel::<()>();
        let on_update = self.shared.clone();
        let on_permission = self.shared.clone();
        let transport = ByteStreams::new(stdin.compat_write(), stdout.compat());
        let on_close = life.clone();
        tokio::spawn(async move {
            let result = agent_client_protocol::Client
                .v1()
                .on_receive_notification(
                    async move |n: SessionNotification, _cx| {
                        route(&on_update, n).await;
                        Ok(())
                    },
                    agent_client_protocol::on_receive_notification!(),
                )
                .on_receive_request(
                    async move |req: RequestPermissionRequest, responder, _cx| {
                        let reply = Reply::new(move |outcome| {
                            if let Err(e) =
                                responder.respond(RequestPermissionResponse::new(outcome))
                            {
                                tracing::debug!(error = %e, "answering session/request_permission");
                            }
                        });
                        permission(&on_permission, req, reply).await;
                        Ok(())
                    },
                    agent_client_protocol::on_receive_request!(),
                )
                .connect_with(transport, async move |cx: ConnectionTo<Agent>| {
                    let _ = cx_tx.send(cx);
                    let _ = close_rx.await;
                    Ok(())
                })
                .await;
            if let Err(e) = result {
                tracing::debug!(error = %e, "ACP connection ended");
            }
            // Also when the process closed its pipes but lingers: it can
            // serve no turn.
            on_close.pipes_closed().await;
        });

        // The process's life: killed on request, reaped on exit; either
        // way every turn on it ends.
        let (shared, reaper, name) = (self.shared.clone(), life.clone(), self.cfg.name.clone());
        tokio::spawn(async move {
            let status = tokio::select! {
                s = child.wait() => s,
                _ = kill_rx.recv() => {
                    let _ = child.start_kill();
                    child.wait().await
                }
            };
            reaper.retire();
            let _ = close_tx.send(());
            let status = match status {
                Ok(s) => s.to_string(),
                Err(e) => format!("unknown status ({e})"),
            };
            let tail = reaper.last_words(&shared).await;
            let why = if tail.is_empty() {
                format!("agent {name:?} process exited ({status})")
            } else {
                format!("agent {name:?} process exited ({status}): {tail}")
            };
            tracing::warn!(agent = %name, exit = %status, %why, "agent process ended");
            {
                let mut st = shared.status.lock().unwrap_or_else(|p| p.into_inner());
                // A launcher that already gave up on this process says more.
                if st.state != "backing_off" {
                    st.state = "exited";
                }
                st.pid = None;
                st.last_exit = Some(why.clone());
            }
            shared.fail_all(generation, &why);
            exited_tx.send_replace(true);
        });

        // Bounded by the caller's start timeout as a whole.
        let cx = match cx_rx.await {
            Ok(cx) => cx,
            Err(_) => return Err(self.died(&life, "while connecting").await),
        };
        let init = match cx
            .send_request(InitializeRequest::new(ProtocolVersion::V1))
            .block_task()
            .await
        {
            Ok(init) => init,
            Err(e) => return Err(self.died(&life, &format!("at initialize ({e})")).await),
        };
        let load_session = init.agent_capabilities.load_session;
        let caps = &init.agent_capabilities.session_capabilities;
        let (resume, close) = (caps.resume.is_some(), caps.close.is_some());
        {
            let mut st = self.shared.status.lock().unwrap_or_else(|p| p.into_inner());
            st.state = "running";
            st.capabilities = serde_json::to_value(&init.agent_capabilities).unwrap_or(Value::Null);
        }
        Ok(Process {
            cx,
            generation,
            load_session,
            resume,
            close,
            known: Mutex::new(HashSet::new()),
            setting_up: AtomicU64::new(0),
            life,
            _keep: kill_tx,
        })
    }

    /// An error for a process that vanished during set-up, with its stderr.
    async fn died(&self, life: &Life, when: &str) -> AgentError {
        // Its stderr closes only once it is gone, and it is of no use now.
        life.kill();
        let tail = life.last_words(&self.shared).await;
        let tail = if tail.is_empty() {
            "no stderr"
        } else {
            tail.as_str()
        };
        self.unavailable(format!("the process failed {when}: {tail}"))
    }

    /// The live process, spawning one if needed (with back-off after
    /// repeated deaths at start).
    async fn process(&self) -> Result<Arc<Process>, AgentError> {
        let mut l = self.launcher.lock().await;
        if l.process.as_ref().is_some_and(|p| !p.life.is_alive()) {
            l.process = None;
        }
        if let Some(p) = &l.process {
            return Ok(p.clone());
        }
        if let Some(at) = l.retry_at.filter(|at| *at > Instant::now()) {
            let last = self
                .shared
                .status
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .last_exit
                .clone();
            return Err(self.unavailable(format!(
                "it failed to start {} times in a row (last: {}); next attempt in {} ms",
                l.failed_starts,
                last.unwrap_or_else(|| "unknown".into()),
                at.saturating_duration_since(Instant::now()).as_millis()
            )));
        }
        match self.spawn().await {
            Ok(p) => {
                let p = Arc::new(p);
                tracing::info!(agent = %self.cfg.name, generation = p.generation, "agent process started");
                l.process = Some(p.clone());
                Ok(p)
            }
            Err(e) => {
                l.failed_starts += 1;
                tracing::warn!(agent = %self.cfg.name, command = ?self.cfg.command, error = %e, failed_starts = l.failed_starts, "agent process failed to start");
                let backoff = self
                    .cfg
                    .restart_backoff
                    .saturating_mul(2u32.saturating_pow(l.failed_starts.min(16) - 1));
                l.retry_at = Some(Instant::now() + backoff.min(MAX_RESTART_BACKOFF));
                let mut st = self.shared.status.lock().unwrap_or_else(|p| p.into_inner());
                st.state = "backing_off";
                st.last_exit = Some(e.to_string());
                Err(e)
            }
        }
    }

    /// A process served a session: it started well.
    async fn started_well(&self) {
        let mut l = self.launcher.lock().await;
        l.failed_starts = 0;
        l.retry_at = None;
    }

    /// A process that cannot even open a session is restarted.
    async fn discard(&self, p: &Process) {
        p.life.kill();
        let mut l = self.launcher.lock().await;
        if l.process
            .as_ref()
            .is_some_and(|q| q.generation == p.generation)
        {
            l.process = None;
        }
    }

    /// The ACP session for this Baton session on `p`: the known one, a
    /// `session/resume` or `session/load` of the stored one, or a new one
    /// (reported back). An abandoned session is never used again.
    async fn session(
        &self,
        p: &Process,
        stored: Option<&str>,
    ) -> Result<(String, bool), AgentError> {
        let cwd = self
            .cfg
            .cwd
            .clone()
            .or_else(|| std::env::current_dir().ok())
            .unwrap_or_else(|| PathBuf::from("/"));
        let abandoned = |id: &str| {
            self.shared
                .abandoned
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(id)
        };
        if let Some(id) = stored.filter(|id| !abandoned(id)) {
            if p.knows(id) {
                return Ok((id.to_owned(), false));
            }
            // No sink is registered meanwhile: a load's replayed history is
            // routed nowhere, so it is not stored again.
            let reopened = if p.resume {
                p.cx.send_request(ResumeSessionRequest::new(id.to_owned(), cwd.clone()))
                    .block_task()
                    .await
                    .map(|_| ())
            } else if p.load_session {
                p.cx.send_request(LoadSessionRequest::new(id.to_owned(), cwd.clone()))
                    .block_task()
                    .await
                    .map(|_| ())
            } else {
                Ok(())
            };
            match reopened {
                Ok(()) if p.resume || p.load_session => {
                    p.learn(id);
                    return Ok((id.to_owned(), false));
                }
                Ok(()) => {}
                Err(e) => {
                    tracing::warn!(agent = %self.cfg.name, session = id, error = %e, "resuming the ACP session failed; starting a new one");
                }
            }
        }
        let created = match p
            .cx
            .send_request(NewSessionRequest::new(cwd))
            .block_task()
            .await
        {
            Ok(created) => created,
            Err(e)
                if agent_client_protocol::is_incoming_transport_closed(&e)
                    || agent_client_protocol::is_connection_terminated(&e) =>
            {
                return Err(self.died(&p.life, &format!("at session/new ({e})")).await)
            }
            Err(e) => return Err(self.unavailable(format!("session/new failed: {e}"))),
        };
        let id = created.session_id.0.to_string();
        p.learn(&id);
        Ok((id, true))
    }

    /// Starts a turn (its time bounded by the caller).
    async fn start_turn(&self, input: TurnInput) -> Result<TurnHandle, AgentError> {
        // Wait for the session's previous prompt to answer or be abandoned.
        let guard = self.slot(input.session_id).lock_owned().await;
        let process = self.process().await?;
        let setting_up = SettingUp::new(&process);
        let (session, created) = match self.session(&process, input.agent_session.as_deref()).await
        {
            Ok(s) => s,
            Err(e) => {
                self.discard(&process).await;
                return Err(e);
            }
        };
        self.started_well().await;

        let quiet = self
            .shared
            .quiet_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&session);
        if let Some(until) = quiet {
            tokio::time::sleep_until(until.into()).await;
        }
        // Everything above may have taken long: a turn whose lease lapsed
        // meanwhile is over (another worker may run it now).
        if !input.fence.holds() {
            return Err(self.unavailable("the turn's lease lapsed before its prompt could be sent"));
        }
        let (tx, rx) = mpsc::channel(EVENT_CAPACITY);
        if created {
            let _ = tx.try_send(AgentEvent::AgentSession(session.clone()));
        }
        let turn = self.shared.turns.fetch_add(1, Ordering::Relaxed);
        let (abandon_tx, abandon_rx) = oneshot::channel::<()>();
        let gate = PromptGate::open(turn);
        self.shared
            .sinks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                session.clone(),
                Sink {
                    turn,
                    gate,
                    tx,
                    generation: process.generation,
                    abandon: Some(abandon_tx),
                    policy: input.permission.unwrap_or(self.cfg.permission),
                    asks: HashMap::new(),
                },
            );
        drop(setting_up);
        let blocks: Vec<ContentBlock> = input
            .messages
            .iter()
            .map(|m| ContentBlock::Text(TextContent::new(m.clone())))
            .collect();
        let prompt = process
            .cx
            .send_request(PromptRequest::new(session.clone(), blocks));
        let (shared, sid, prompt_life) =
            (self.shared.clone(), session.clone(), process.life.clone());
        let (quiet_after_cancel, quiet_after_answer) =
            (self.cfg.quiet_after_cancel, self.cfg.quiet_after_answer);
        tokio::spawn(async move {
            // Released when this task ends: the session's next prompt may go.
            let _slot = guard;
            let answer = tokio::select! {
                answer = prompt.block_task() => answer,
                // Forced off the session (or its process died): whoever took
                // the sink ended the turn. Dropping the request tells the
                // agent with `$/cancel_request`.
                _ = abandon_rx => return,
            };
            if let Err(e) = &answer {
                if agent_client_protocol::is_incoming_transport_closed(e)
                    || agent_client_protocol::is_connection_terminated(e)
                {
                    // The process is gone or going. Retire it before this
                    // turn ends, so the next turn cannot be sent to it; its
                    // exit ends the turn, with the exit status and stderr.
                    prompt_life.pipes_closed().await;
                }
            }
            // Every update of a prompt is handled before its response: what
            // comes from now on is late. Whoever takes the sink ends the turn
            // (this, or the process's death, or a forced stop).
            let Some(sink) = shared.take_sink(&sid, turn) else {
                return;
            };
            let cancelled = sink.gate.admit() == Err(LateReason::AfterCancel);
            let quiet = if cancelled {
                quiet_after_cancel
            } else {
                quiet_after_answer
            };
            if !quiet.is_zero() {
                shared
                    .quiet_until
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(sid.clone(), Instant::now() + quiet);
            }
            let stop = match answer {
                _ if cancelled => StopReason::Cancelled,
                Ok(resp) => match resp.stop_reason {
                    AcpStop::EndTurn => StopReason::Completed,
                    AcpStop::Cancelled => StopReason::Cancelled,
                    other => StopReason::Failed(format!("the agent stopped: {other:?}")),
                },
                Err(e) => StopReason::Failed(format!("session/prompt failed: {e}")),
            };
            let _ = sink.tx.send(AgentEvent::Stopped(stop)).await;
        });
        tracing::debug!(session = %session, generation = process.generation, "ACP prompt sent");
        Ok(TurnHandle {
            events: rx,
            control: Box::new(Control {
                shared: self.shared.clone(),
                session,
                turn,
                process,
            }),
        })
    }
}

/// Routes one `session/update` to the turn whose prompt is in flight on its
/// session; anything else is late (`baton_core::late`). Waits for room in
/// the turn's channel: backpressure on the agent's pipe.
async fn route(shared: &Shared, n: SessionNotification) {
    let session = n.session_id.0.to_string();
    let event = match n.update {
        SessionUpdate::AgentMessageChunk(chunk) => match chunk.content {
            ContentBlock::Text(t) => Some(AgentEvent::Delta(t.text)),
            _ => None,
        },
        SessionUpdate::AgentThoughtChunk(chunk) => match chunk.content {
            ContentBlock::Text(t) => Some(AgentEvent::Thought(t.text)),
            _ => None,
        },
        SessionUpdate::ToolCall(call) => {
            Some(AgentEvent::Output(AgentOutput::ToolCall(ToolInfo {
                id: call.tool_call_id.0.to_string(),
                name: Some(call.title.clone()),
                arguments: call.raw_input.clone(),
            })))
        }
        SessionUpdate::ToolCallUpdate(update) => match update.fields.status {
            Some(status @ (ToolCallStatus::Completed | ToolCallStatus::Failed)) => {
                let content = update
                    .fields
                    .content
                    .as_ref()
                    .map(|c| text_of(&serde_json::to_value(c).unwrap_or(Value::Null)))
                    .filter(|t| !t.is_empty())
                    .unwrap_or_else(|| format!("{status:?}").to_lowercase());
                Some(AgentEvent::Output(AgentOutput::ToolResult {
                    id: update.tool_call_id.0.to_string(),
                    content,
                }))
            }
            _ => None,
        },
        SessionUpdate::Plan(plan) => {
            let lines: Vec<String> = plan
                .entries
                .iter()
                .map(|e| {
                    format!(
                        "- [{}] {}",
                        serde_json::to_value(&e.status)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_owned))
                            .unwrap_or_default(),
                        e.content
                    )
                })
                .collect();
            Some(AgentEvent::Output(AgentOutput::System(format!(
                "plan:\n{}",
                lines.join("\n")
            ))))
        }
        _ => None,
    };
    let Some(event) = event else { return };
    match shared.target(&session) {
        Ok(tx) => {
            // The turn may have ended meanwhile: then nobody listens.
            let _ = tx.send(event).await;
        }
        Err(why) => shared.late(&session, why, "session/update"),
    }
}

/// The text inside tool-call content, however nested.
fn text_of(v: &Value) -> String {
    match v {
        Value::Object(m) => match m.get("text") {
            Some(Value::String(s)) => s.clone(),
            _ => m
                .values()
                .map(text_of)
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join("\n"),
        },
        Value::Array(a) => a
            .iter()
            .map(text_of)
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// Answers a permission request by the turn's policy and records it in the
/// turn, or (policy `ask`) hands it to the engine and keeps the answer owed
/// until the user's choice arrives through [`Control`]: the dispatch loop is
/// never held waiting for a person.
async fn permission(shared: &Shared, req: RequestPermissionRequest, reply: Reply) {
    let session = req.session_id.0.to_string();
    let target = shared.target(&session);
    let policy = shared
        .sinks
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&session)
        .map_or(PermissionPolicy::Deny, |s| s.policy);
    let request = PermissionInfo::request(
        Some(req.tool_call.tool_call_id.0.to_string()),
        req.tool_call.fields.title.clone(),
        req.options
            .iter()
            .map(|o| PermissionOptionInfo {
                option_id: o.option_id.0.to_string(),
                name: o.name.clone(),
                kind: serde_json::to_value(o.kind)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
            })
            .collect(),
    );
    let tx = match target {
        Ok(tx) => tx,
        Err(why) => {
            // The spec: a request of a cancelled (or no longer running)
            // prompt is answered `cancelled` (dropping the reply does).
            shared.late(&session, why, "session/request_permission");
            return;
        }
    };
    if policy == PermissionPolicy::Ask {
        let id = request.request_id.clone();
        let unheard = {
            let mut sinks = shared.sinks.lock().unwrap_or_else(|p| p.into_inner());
            match sinks.get_mut(&session) {
                Some(sink) => {
                    sink.asks.insert(id, reply);
                    None
                }
                None => Some(reply),
            }
        };
        if unheard.is_some() {
            // The turn ended meanwhile: the reply drops here, outside the
            // lock, answering `cancelled`.
            return;
        }
        let _ = tx.send(AgentEvent::AskPermission(request)).await;
        return;
    }
    let choice = baton_core::permission::policy_choice(policy, &request.options)
        .map(|o| o.option_id.clone());
    let decision = request.decision(choice.clone(), "policy");
    // The request and its decision, in that order, before the agent hears
    // the answer (and before any output that follows it).
    for out in [
        AgentOutput::PermissionRequest(request),
        AgentOutput::PermissionDecision(decision),
    ] {
        let _ = tx.send(AgentEvent::Output(out)).await;
    }
    reply.send(match choice {
        Some(option) => RequestPermissionOutcome::Selected(SelectedPermissionOutcome::new(option)),
        None => RequestPermissionOutcome::Cancelled,
    });
}

struct Control {
    shared: Arc<Shared>,
    session: String,
    turn: u64,
    /// Keeps the process running while this turn may need it.
    process: Arc<Process>,
}

impl Control {
    fn send_cancel(&self) {
        if let Err(e) = self
            .process
            .cx
            .send_notification(CancelNotification::new(self.session.clone()))
        {
            tracing::warn!(error = %e, "sending session/cancel");
        }
    }
}

impl TurnControl for Control {
    fn cancel(&self) {
        let (first, asks) = {
            let mut sinks = self.shared.sinks.lock().unwrap_or_else(|p| p.into_inner());
            match sinks.get_mut(&self.session).filter(|s| s.turn == self.turn) {
                Some(s) => (s.gate.cancel(self.turn), std::mem::take(&mut s.asks)),
                None => (false, HashMap::new()),
            }
        };
        // The spec: every pending permission request is answered
        // `cancelled` before the cancel (the engine answers them first; this
        // catches any it did not know of yet).
        drop(asks);
        if first {
            self.send_cancel();
        }
    }

    fn answer_permission(&self, request_id: &str, option_id: Option<String>) {
        let reply = {
            let mut sinks = self.shared.sinks.lock().unwrap_or_else(|p| p.into_inner());
            sinks
                .get_mut(&self.session)
                .filter(|s| s.turn == self.turn)
                .and_then(|s| s.asks.remove(request_id))
        };
        if let Some(reply) = reply {
            reply.send(match option_id {
                Some(id) => RequestPermissionOutcome::Selected(SelectedPermissionOutcome::new(id)),
                None => RequestPermissionOutcome::Cancelled,
            });
        }
    }

    fn force_stop(&self) {
        let Some(mut sink) = self.shared.take_sink(&self.session, self.turn) else {
            return;
        };
        // Waiting requests are answered `cancelled` first; a forced stop
        // without a cancel first (a lost lease, a deleted session) still
        // tells the agent.
        sink.asks.clear();
        if sink.gate.cancel(self.turn) {
            self.send_cancel();
        }
        let p = &self.process;
        let others = self.shared.in_flight_on(p.generation);
        let setting_up = p.setting_up.load(Ordering::SeqCst);
        if others == 0 && setting_up == 0 {
            // Nobody else is on the process: restart it. The next turn
            // resumes the ACP session where the agent supports it.
            tracing::info!(agent = %self.shared.name, session = %self.session, "forced stop: restarting the agent process (no other session on it)");
            p.life.kill();
        } else {
            // Other sessions are mid-prompt on it: give up this ACP session
            // only; the Baton session goes on in a new one.
            tracing::info!(agent = %self.shared.name, session = %self.session, others, "forced stop: abandoning the ACP session; the process keeps serving the others");
            self.shared
                .abandoned
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(self.session.clone());
            p.forget(&self.session);
            if p.close {
                p.cx.send_request(CloseSessionRequest::new(self.session.clone()))
                    .detach();
            }
        }
        if let Some(abandon) = sink.abandon.take() {
            let _ = abandon.send(());
        }
    }
}

#[async_trait]
impl AgentDriver for AcpDriver {
    async fn start(&self, input: TurnInput) -> Result<TurnHandle, AgentError> {
        let limit = self.cfg.start_timeout;
        match tokio::time::timeout(limit, self.start_turn(input)).await {
            Ok(started) => started,
            Err(_) => Err(self.unavailable(format!(
                "it did not start the turn within the start timeout ({} ms: spawn, initialize and session set-up)",
                limit.as_millis()
            ))),
        }
    }

    fn late_updates(&self) -> u64 {
        self.shared.late.load(Ordering::Relaxed)
    }

    fn describe(&self) -> Value {
        let st = self
            .shared
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        json!({
            "kind": "acp",
            "command": self.cfg.command,
            "cwd": self.cfg.cwd,
            "permission": self.cfg.permission.as_str(),
            "process": {
                "status": st.state,
                "pid": st.pid,
                "starts": st.starts,
                "last_exit": st.last_exit,
            },
            "capabilities": st.capabilities,
            "start_timeout_ms": self.cfg.start_timeout.as_millis() as u64,
            "late_updates": self.late_updates(),
        })
    }
}
