//! Agent drivers: how Baton hands a turn's input to an agent and gets its
//! output back.
//!
//! A driver starts one turn at a time per session and returns a
//! [`TurnHandle`]: a channel of [`AgentEvent`]s for this turn only, and a
//! [`TurnControl`] to cancel it (politely) or force it to stop. Because each
//! turn has its own channel, output of a turn the engine has moved on from
//! cannot be mistaken for the next turn's (I8): the engine drops the channel.

pub mod acp;
pub mod demo;

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use baton_core::turn::{AgentOutput, StopReason};
use baton_core::{SessionId, TurnId};
use tokio::sync::mpsc;

pub use acp::{AcpConfig, AcpDriver, PermissionPolicy};
pub use demo::DemoAgent;

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
}

/// Something the agent did during a turn.
#[derive(Clone, Debug, PartialEq)]
pub enum AgentEvent {
    /// A transient chunk of output (streamed, never stored).
    Delta(String),
    /// Output to store.
    Output(AgentOutput),
    /// The agent finished the prompt. The last event of a turn.
    Stopped(StopReason),
    /// The agent's own id for this conversation, to keep with the session so
    /// a restarted agent can resume it.
    AgentSession(String),
}

/// Stops a running turn.
pub trait TurnControl: Send + Sync {
    /// Asks the agent to stop; it should drain and report `Stopped`.
    fn cancel(&self);
    /// Stops the turn's work now, without waiting for the agent.
    fn force_stop(&self);
}

/// A started turn.
pub struct TurnHandle {
    pub events: mpsc::UnboundedReceiver<AgentEvent>,
    pub control: Box<dyn TurnControl>,
}

/// An agent Baton can run turns on.
#[async_trait]
pub trait AgentDriver: Send + Sync + 'static {
    /// Starts a turn. The driver must not overlap turns of one session; the
    /// engine never asks it to.
    async fn start(&self, input: TurnInput) -> Result<TurnHandle, AgentError>;

    /// What `GET /v1/agents` shows about this agent.
    fn describe(&self) -> serde_json::Value {
        serde_json::json!({ "kind": "custom" })
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
}
