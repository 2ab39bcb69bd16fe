//! Agent drivers: how Baton hands a turn's input to an agent and gets its
//! output back.
//!
//! A driver starts one turn at a time per session and returns a
//! [`TurnHandle`]: a channel of [`AgentEvent`]s for this turn only, and a
//! [`TurnControl`] to cancel it (politely) or force it to stop. Because each
//! turn has its own channel, output of a turn the engine has moved on from
//! cannot be mistaken for the next turn's (I8): the engine drops the channel.
//! The channel is bounded ([`EVENT_CAPACITY`]): an agent that talks faster
//! than its turn is stored waits (backpressure), it is never buffered
//! without limit. What counts as late is decided in `baton_core::late`.

pub mod acp;
pub mod demo;

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use baton_core::turn::{AgentOutput, StopReason};
pub use baton_core::PermissionPolicy;
use baton_core::{PermissionInfo, Seq, SessionId, TurnId};
use tokio::sync::mpsc;

pub use acp::{AcpConfig, AcpDriver};
pub use demo::DemoAgent;

/// How many events of one turn may wait for the engine.
pub const EVENT_CAPACITY: usize = 256;

/// Whether the worker running a turn still holds the session's lease. A
/// driver asks right before it sends the prompt, after everything that may
/// have taken long (spawning, `initialize`, loading): a turn whose lease
/// lapsed meanwhile (and that another worker may be running now) is never
/// prompted.
#[derive(Clone)]
pub struct Fence(Arc<dyn Fn() -> bool + Send + Sync>);

impl Fence {
    /// A fence that asks `holds`.
    pub fn new(holds: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        Self(Arc::new(holds))
    }

    /// A fence that always holds (tools and tests without a lease).
    pub fn open() -> Self {
        Self::new(|| true)
    }

    /// Whether the lease still holds.
    pub fn holds(&self) -> bool {
        (self.0)()
    }
}

impl std::fmt::Debug for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Fence").field(&self.holds()).finish()
    }
}

/// A driver could not start a turn.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The agent is not available (its process cannot start, …).
    #[error("agent unavailable: {0}")]
    Unavailable(String),
}

/// What a turn asks of the agent.
#[derive(Clone, Debug)]
pub struct TurnInput {
    pub session_id: SessionId,
    pub turn_id: TurnId,
    /// The user messages the turn consumes, in order.
    pub messages: Vec<String>,
    /// The agent's own id for this conversation, if it gave one before.
    pub agent_session: Option<String>,
    /// Checked right before the prompt is sent.
    pub fence: Fence,
    /// The session's permission policy, if it set one (else the agent's).
    pub permission: Option<PermissionPolicy>,
}

/// Something the agent did during a turn.
#[derive(Clone, Debug, PartialEq)]
pub enum AgentEvent {
    /// A chunk of the agent's text: streamed at once; each run of text
    /// between two other outputs is stored as one assistant message.
    Delta(String),
    /// A chunk of the agent's reasoning (`agent_thought_chunk`): not
    /// streamed; each run of it between two other outputs is stored as one
    /// `thought` entry.
    Thought(String),
    /// Output to store.
    Output(AgentOutput),
    /// The agent finished the prompt. The last event of a turn.
    Stopped(StopReason),
    /// The agent's own id for this conversation, to keep with the session so
    /// a restarted agent can resume it.
    AgentSession(String),
    /// The agent asks permission and waits (policy `ask`): the engine stores
    /// the request, and sends the answer with
    /// [`TurnControl::answer_permission`]. A request never answered is
    /// answered `cancelled` when the turn ends.
    AskPermission(PermissionInfo),
    /// The agent took the steered messages handed to it up to this seq: they
    /// are this turn's input now. Sent before any output that answers them.
    InputTaken(Seq),
}

/// Steered messages handed to a running turn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SteerInput {
    /// The last of them (the turn takes everything up to it).
    pub upto: Seq,
    /// Their contents, in order.
    pub messages: Vec<String>,
}

/// Stops a running turn.
pub trait TurnControl: Send + Sync {
    /// Asks the agent to stop; it should drain and report `Stopped`.
    fn cancel(&self);
    /// Stops the turn's work now, without waiting for the agent.
    fn force_stop(&self);
    /// Answers the permission request `request_id` of this turn: the chosen
    /// option, or `None` for `cancelled`. Unknown or already answered
    /// requests are ignored.
    fn answer_permission(&self, request_id: &str, option_id: Option<String>) {
        let _ = (request_id, option_id);
    }
    /// Hands steered messages to the running turn. An agent that takes them
    /// reports [`AgentEvent::InputTaken`] at its next step; one that does not
    /// (or whose turn ends first) leaves them to the next turn. Only called
    /// on drivers that [take mid-turn input](AgentDriver::takes_mid_turn_input).
    fn steer(&self, _input: SteerInput) {}
}

/// A started turn.
pub struct TurnHandle {
    pub events: mpsc::Receiver<AgentEvent>,
    pub control: Box<dyn TurnControl>,
}

/// An agent Baton can run turns on.
#[async_trait]
pub trait AgentDriver: Send + Sync + 'static {
    /// Starts a turn. The driver must not overlap turns of one session; the
    /// engine never asks it to.
    async fn start(&self, input: TurnInput) -> Result<TurnHandle, AgentError>;

    /// Whether a running turn takes more input (steered messages, through
    /// [`TurnControl::steer`]). ACP has one prompt at a time per session, so
    /// ACP agents do not.
    fn takes_mid_turn_input(&self) -> bool {
        false
    }

    /// What `GET /v1/agents` shows about this agent.
    fn describe(&self) -> serde_json::Value {
        serde_json::json!({ "kind": "custom" })
    }

    /// Updates that arrived when no prompt of a live turn was in flight,
    /// dropped (see `baton_core::late`).
    fn late_updates(&self) -> u64 {
        0
    }
}

/// The agents a server knows, by name.
#[derive(Clone, Default)]
pub struct Agents {
    by_name: BTreeMap<String, Arc<dyn AgentDriver>>,
}

impl Agents {
    /// Just the built-in demo agent.
    pub fn with_demo(demo: DemoAgent) -> Self {
        let mut agents = Self::default();
        agents.insert("demo", Arc::new(demo));
        agents
    }

    /// Adds or replaces an agent.
    pub fn insert(&mut self, name: impl Into<String>, driver: Arc<dyn AgentDriver>) {
        self.by_name.insert(name.into(), driver);
    }

    /// The agent called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<dyn AgentDriver>> {
        self.by_name.get(name).cloned()
    }

    /// The agents' names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    /// Every agent with its name, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Arc<dyn AgentDriver>)> {
        self.by_name.iter().map(|(k, v)| (k.as_str(), v))
    }
}
