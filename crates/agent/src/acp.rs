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
//! - Updates are routed by ACP session id to the one turn running on it; the
//!   engine never overlaps turns of a session, so neither do prompts.
//! - Once a cancel is sent, the turn's sink stops forwarding (an update the
//!   agent sends after `session/cancel` is neither streamed nor stored), and
//!   once the prompt answers, the sink is gone (late updates are dropped, I8).
//!   A `session/load` history replay is routed to no sink, so it is never
//!   stored as new output.
//! - Process death fails every turn on it with the exit status and stderr
//!   tail. A process whose pipes close is retired before any turn on it ends
//!   (and killed if it lingers), so the next turn never joins a dead
//!   connection: it respawns the process, and resumes its ACP session with
//!   `session/load` when the agent supports it. A process that keeps dying at
//!   start backs off, and turns fail at once with a clear reason meanwhile.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_client_protocol::schema::ProtocolVersion;
use agent_client_protocol::v1::schema::{
    CancelNotification, ContentBlock, InitializeRequest, LoadSessionRequest, NewSessionRequest,
    PermissionOptionKind, PromptRequest, RequestPermissionOutcome, RequestPermissionRequest,
    RequestPermissionResponse, SelectedPermissionOutcome, SessionNotification, SessionUpdate,
    StopReason as AcpStop, TextContent, ToolCallStatus,
};
use agent_client_protocol::v1::ConnectionTo;
use agent_client_protocol::{Agent, ByteStreams};
use async_trait::async_trait;
use baton_core::turn::{AgentOutput, StopReason};
use baton_core::ToolInfo;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot};
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

use crate::{AgentDriver, AgentError, AgentEvent, TurnControl, TurnHandle, TurnInput};

/// What an agent's permission requests get.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PermissionPolicy {
    /// Approve (once) every tool call the agent asks about.
    Allow,
    /// Refuse every one (the default: an unattended server grants nothing).
    #[default]
    Deny,
}

impl std::str::FromStr for PermissionPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "allow" => Ok(Self::Allow),
            "deny" => Ok(Self::Deny),
            _ => Err(format!(
                "permission policy must be allow or deny, not {s:?}"
            )),
        }
    }
}

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
    /// How long `initialize` and session set-up may take.
    pub setup_timeout: Duration,
    /// How long turns fail at once after the process died at start, before
    /// it is started again; doubled at each further failed start, up to
    /// `MAX_RESTART_BACKOFF`.
    pub restart_backoff: Duration,
    /// How long a session stays quiet after a cancelled prompt: its next
    /// turn waits this long, and what the agent sends meanwhile is dropped
    /// (ACP updates name no request, so late output of a cancelled prompt
    /// would otherwise read as the next turn's).
    pub quiet_after_cancel: Duration,
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
            setup_timeout: Duration::from_secs(15),
            restart_backoff: Duration::from_millis(500),
            quiet_after_cancel: Duration::from_millis(300),
        })
    }
}

/// The turn running on one ACP session.
struct Sink {
    /// Which turn: a prompt, cancel or stop of an earlier turn on the same
    /// ACP session (resumed on a new process) must not touch this one.
    turn: u64,
    tx: mpsc::UnboundedSender<AgentEvent>,
    /// The process it runs on: only that process's death ends it.
    generation: u64,
    /// The reply so far (stored as one message when the prompt answers).
    text: String,
    /// A cancel was sent: forward nothing more.
    cancelled: bool,
}

/// State shared with the connection's handlers (which run inside its
/// dispatch loop: they only route, never await).
#[derive(Default)]
struct Shared {
    /// ACP session id → the turn running on it.
    sinks: Mutex<HashMap<String, Sink>>,
    /// The last bytes the process wrote to stderr.
    stderr: Mutex<VecDeque<u8>>,
    status: Mutex<Status>,
    /// Numbers the turns started on this agent.
    turns: AtomicU64,
    /// ACP session id → until when it stays quiet after a cancelled prompt.
    /// ACP updates carry no request id, so output an agent sends after
    /// answering a cancelled prompt would look like the next turn's; with no
    /// turn registered during this window it is dropped instead.
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

    fn with_sink(&self, session: &str, f: impl FnOnce(&mut Sink)) {
        let mut sinks = self.sinks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(sink) = sinks.get_mut(session).filter(|s| !s.cancelled) {
            f(sink);
        }
    }

    /// Takes the sink of `turn` on `session`: whoever takes it ends the turn.
    fn take_sink(&self, session: &str, turn: u64) -> Option<Sink> {
        let mut sinks = self.sinks.lock().unwrap_or_else(|p| p.into_inner());
        match sinks.get(session) {
            Some(s) if s.turn == turn => sinks.remove(session),
            _ => None,
        }
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
            let _ = s.tx.send(AgentEvent::Stopped(if s.cancelled {
                StopReason::Cancelled
            } else {
                StopReason::Failed(why.to_owned())
            }));
        }
    }
}

/// A live process and its connection.
struct Process {
    cx: ConnectionTo<Agent>,
    generation: u64,
    load_session: bool,
    /// ACP sessions opened or loaded on this process.
    known: HashSet<String>,
    life: Life,
    /// Keeps the process running while it is the launcher's.
    keep: mpsc::UnboundedSender<()>,
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
    process: Option<Process>,
    /// Consecutive processes that died before serving a turn.
    failed_starts: u32,
    retry_at: Option<Instant>,
}

/// An ACP agent.
pub struct AcpDriver {
    cfg: AcpConfig,
    shared: Arc<Shared>,
    // A tokio mutex: spawning and session set-up await, and must not race.
    launcher: tokio::sync::Mutex<Launcher>,
    generation: AtomicU64,
}

impl AcpDriver {
    /// A driver for `cfg`; the process starts on first use.
    pub fn new(cfg: AcpConfig) -> Self {
        let shared = Arc::new(Shared::default());
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
        }
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
        let policy = self.cfg.permission;
        let transport = ByteStreams::new(stdin.compat_write(), stdout.compat());
        let on_close = life.clone();
        tokio::spawn(async move {
            let result = agent_client_protocol::Client
                .v1()
                .on_receive_notification(
                    async move |n: SessionNotification, _cx| {
                        route(&on_update, n);
                        Ok(())
                    },
                    agent_client_protocol::on_receive_notification!(),
                )
                .on_receive_request(
                    async move |req: RequestPermissionRequest, responder, _cx| {
                        responder.respond(permission(&on_permission, policy, req))
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
            tracing::warn!(agent = %name, %why, "agent process ended");
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

        let cx = match tokio::time::timeout(self.cfg.setup_timeout, cx_rx).await {
            Ok(Ok(cx)) => cx,
            Ok(Err(_)) => return Err(self.died(&life, "while connecting").await),
            Err(_) => return Err(self.unavailable("the connection did not come up")),
        };
        let init = match tokio::time::timeout(
            self.cfg.setup_timeout,
            cx.send_request(InitializeRequest::new(ProtocolVersion::V1))
                .block_task(),
        )
        .await
        {
            Ok(Ok(init)) => init,
            Ok(Err(e)) => return Err(self.died(&life, &format!("at initialize ({e})")).await),
            Err(_) => return Err(self.unavailable("initialize timed out")),
        };
        let load_session = init.agent_capabilities.load_session;
        {
            let mut st = self.shared.status.lock().unwrap_or_else(|p| p.into_inner());
            st.state = "running";
            st.capabilities = serde_json::to_value(&init.agent_capabilities).unwrap_or(Value::Null);
        }
        Ok(Process {
            cx,
            generation,
            load_session,
            known: HashSet::new(),
            life,
            keep: kill_tx,
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
    async fn process<'a>(&self, l: &'a mut Launcher) -> Result<&'a mut Process, AgentError> {
        if l.process.as_ref().is_some_and(|p| !p.life.is_alive()) {
            l.process = None;
        }
        if l.process.is_none() {
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
                Ok(p) => l.process = Some(p),
                Err(e) => {
                    l.failed_starts += 1;
                    let backoff = self
                        .cfg
                        .restart_backoff
                        .saturating_mul(2u32.saturating_pow(l.failed_starts.min(16) - 1));
                    l.retry_at = Some(Instant::now() + backoff.min(MAX_RESTART_BACKOFF));
                    let mut st = self.shared.status.lock().unwrap_or_else(|p| p.into_inner());
                    st.state = "backing_off";
                    st.last_exit = Some(e.to_string());
                    return Err(e);
                }
            }
        }
        l.process
            .as_mut()
            .ok_or_else(|| self.unavailable("no process"))
    }

    /// The ACP session for this Baton session on `p`: the known one, a
    /// `session/load` of the stored one, or a new one (reported back).
    async fn session(
        &self,
        p: &mut Process,
        stored: Option<&str>,
    ) -> Result<(String, bool), AgentError> {
        let cwd = self
            .cfg
            .cwd
            .clone()
            .or_else(|| std::env::current_dir().ok())
            .unwrap_or_else(|| PathBuf::from("/"));
        if let Some(id) = stored {
            if p.known.contains(id) {
                return Ok((id.to_owned(), false));
            }
            if p.load_session {
                // No sink is registered while it loads: the replayed history
                // is routed nowhere, so it is not stored again.
                let loaded = tokio::time::timeout(
                    self.cfg.setup_timeout,
                    p.cx.send_request(LoadSessionRequest::new(id.to_owned(), cwd.clone()))
                        .block_task(),
                )
                .await;
                if let Ok(Ok(_)) = loaded {
                    p.known.insert(id.to_owned());
                    return Ok((id.to_owned(), false));
                }
                tracing::warn!(agent = %self.cfg.name, session = id, "session/load failed; starting a new ACP session");
            }
        }
        let created = match tokio::time::timeout(
            self.cfg.setup_timeout,
            p.cx.send_request(NewSessionRequest::new(cwd)).block_task(),
        )
        .await
        {
            Ok(Ok(created)) => created,
            Ok(Err(e)) => return Err(self.died(&p.life, &format!("at session/new ({e})")).await),
            Err(_) => return Err(self.unavailable("session/new timed out")),
        };
        let id = created.session_id.0.to_string();
        p.known.insert(id.clone());
        Ok((id, true))
    }
}

/// Maps one `session/update` to the turn running on its session.
fn route(shared: &Shared, n: SessionNotification) {
    let session = n.session_id.0.to_string();
    shared.with_sink(&session, |sink| {
        let event = match n.update {
            SessionUpdate::AgentMessageChunk(chunk) => match chunk.content {
                ContentBlock::Text(t) => {
                    sink.text.push_str(&t.text);
                    Some(AgentEvent::Delta(t.text))
                }
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
        if let Some(e) = event {
            let _ = sink.tx.send(e);
        }
    });
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

/// Answers a permission request by policy, and records it in the turn.
fn permission(
    shared: &Shared,
    policy: PermissionPolicy,
    req: RequestPermissionRequest,
) -> RequestPermissionResponse {
    let session = req.session_id.0.to_string();
    let cancelled = shared
        .sinks
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&session)
        .is_none_or(|s| s.cancelled);
    let wanted: &[PermissionOptionKind] = match policy {
        PermissionPolicy::Allow => &[
            PermissionOptionKind::AllowOnce,
            PermissionOptionKind::AllowAlways,
        ],
        PermissionPolicy::Deny => &[
            PermissionOptionKind::RejectOnce,
            PermissionOptionKind::RejectAlways,
        ],
    };
    let choice = (!cancelled)
        .then(|| {
            wanted
                .iter()
                .find_map(|k| req.options.iter().find(|o| o.kind == *k))
        })
        .flatten();
    let call = req.tool_call.tool_call_id.0.to_string();
    let title = req.tool_call.fields.title.clone().unwrap_or_default();
    let (note, outcome) = match choice {
        Some(option) => (
            format!(
                "permission {} for tool call {call} {title:?} (policy: {})",
                if policy == PermissionPolicy::Allow {
                    "granted"
                } else {
                    "refused"
                },
                if policy == PermissionPolicy::Allow {
                    "allow"
                } else {
                    "deny"
                }
            ),
            RequestPermissionOutcome::Selected(SelectedPermissionOutcome::new(
                option.option_id.clone(),
            )),
        ),
        None => (
            format!("permission request for tool call {call} {title:?} answered cancelled"),
            RequestPermissionOutcome::Cancelled,
        ),
    };
    shared.with_sink(&session, |sink| {
        let _ = sink.tx.send(AgentEvent::Output(AgentOutput::System(note)));
    });
    RequestPermissionResponse::new(outcome)
}

struct Control {
    shared: Arc<Shared>,
    session: String,
    turn: u64,
    cx: ConnectionTo<Agent>,
    life: Life,
    /// Keeps the process running while this turn may need it.
    _keep: mpsc::UnboundedSender<()>,
}

impl TurnControl for Control {
    fn cancel(&self) {
        let first = {
            let mut sinks = self.shared.sinks.lock().unwrap_or_else(|p| p.into_inner());
            match sinks.get_mut(&self.session) {
                Some(s) if s.turn == self.turn && !s.cancelled => {
                    s.cancelled = true;
                    true
                }
                _ => false,
            }
        };
        if first {
            if let Err(e) = self
                .cx
                .send_notification(CancelNotification::new(self.session.clone()))
            {
                tracing::warn!(error = %e, "sending session/cancel");
            }
        }
    }

    fn force_stop(&self) {
        // The agent did not drain: restart the process. Other sessions' turns
        // on it end `failed`; the next turn resumes with session/load.
        if self.shared.take_sink(&self.session, self.turn).is_some() {
            // Dead from now on for new turns, before the kill lands, so the
            // next turn starts a new process instead of joining this one.
            self.life.kill();
        }
    }
}

#[async_trait]
impl AgentDriver for AcpDriver {
    async fn start(&self, input: TurnInput) -> Result<TurnHandle, AgentError> {
        let mut launcher = self.launcher.lock().await;
        let process = self.process(&mut launcher).await?;
        let (session, created) = match self.session(process, input.agent_session.as_deref()).await {
            Ok(s) => s,
            Err(e) => {
                // A process that cannot even open a session is restarted.
                process.life.kill();
                launcher.process = None;
                return Err(e);
            }
        };
        let (cx, generation, life, keep) = (
            process.cx.clone(),
            process.generation,
            process.life.clone(),
            process.keep.clone(),
        );
        launcher.failed_starts = 0;
        launcher.retry_at = None;
        drop(launcher);

        let quiet = self
            .shared
            .quiet_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&session);
        if let Some(until) = quiet {
            tokio::time::sleep_until(until.into()).await;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        if created {
            let _ = tx.send(AgentEvent::AgentSession(session.clone()));
        }
        let turn = self.shared.turns.fetch_add(1, Ordering::Relaxed);
        self.shared
            .sinks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                session.clone(),
                Sink {
                    turn,
                    tx: tx.clone(),
                    generation,
                    text: String::new(),
                    cancelled: false,
                },
            );
        let blocks: Vec<ContentBlock> = input
            .messages
            .iter()
            .map(|m| ContentBlock::Text(TextContent::new(m.clone())))
            .collect();
        let prompt = cx.send_request(PromptRequest::new(session.clone(), blocks));
        let (shared, sid, prompt_life) = (self.shared.clone(), session.clone(), life.clone());
        let quiet_after_cancel = self.cfg.quiet_after_cancel;
        tokio::spawn(async move {
            let answer = prompt.block_task().await;
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
            // Every update of a prompt is handled before its response: the
            // sink now holds the whole reply. Whoever takes the sink ends the
            // turn (this, or the process's death, or a forced stop).
            let Some(sink) = shared.take_sink(&sid, turn) else {
                return;
            };
            if sink.cancelled {
                shared
                    .quiet_until
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(sid.clone(), Instant::now() + quiet_after_cancel);
            }
            let stop = match answer {
                _ if sink.cancelled => StopReason::Cancelled,
                Ok(resp) => {
                    if !sink.text.is_empty() {
                        let _ = sink
                            .tx
                            .send(AgentEvent::Output(AgentOutput::Message(sink.text.clone())));
                    }
                    match resp.stop_reason {
                        AcpStop::EndTurn => StopReason::Completed,
                        AcpStop::Cancelled => StopReason::Cancelled,
                        other => StopReason::Failed(format!("the agent stopped: {other:?}")),
                    }
                }
                Err(e) => StopReason::Failed(format!("session/prompt failed: {e}")),
            };
            let _ = sink.tx.send(AgentEvent::Stopped(stop));
        });
        tracing::debug!(session = %session, generation, "ACP prompt sent");
        Ok(TurnHandle {
            events: rx,
            control: Box::new(Control {
                shared: self.shared.clone(),
                session,
                turn,
                cx,
                life,
                _keep: keep,
            }),
        })
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
            "permission": if self.cfg.permission == PermissionPolicy::Allow { "allow" } else { "deny" },
            "process": {
                "status": st.state,
                "pid": st.pid,
                "starts": st.starts,
                "last_exit": st.last_exit,
            },
            "capabilities": st.capabilities,
        })
    }
}
