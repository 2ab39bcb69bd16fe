//! Sessions and turns as the API shows them.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{Entry, InputRange, PermissionPolicy, Policy, Seq, SessionId, Timestamp, TurnId};

/// Whether a session has a turn starting or running.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SessionStatus {
    Idle,
    Running,
}

/// A conversation: one ordered log, one turn at a time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Session {
    pub id: SessionId,
    pub owner: String,
    pub agent: String,
    pub policy: Policy,
    pub status: SessionStatus,
    /// The turn starting or running, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub turn_id: Option<TurnId>,
    pub last_seq: Seq,
    /// User messages waiting for a turn.
    pub queued: u64,
    /// The debounce window in milliseconds (0: off).
    #[serde(default)]
    pub debounce_ms: u64,
    /// While a debounce window is open: when its turn starts, unless another
    /// message moves it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub pending_until: Option<Timestamp>,
    pub created_at: Timestamp,
    pub metadata: serde_json::Value,
    /// What the agent's permission requests get in this session, when set
    /// at creation (else the agent's own policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permission: Option<PermissionPolicy>,
    /// The running turn's permission requests waiting for an answer
    /// (`permission_request` entries; shown by `GET /v1/sessions/{id}`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_permissions: Vec<Entry>,
}

/// A turn's lifecycle. `starting → running → ended`; every ended status is
/// absorbing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TurnStatus {
    Starting,
    Running,
    Completed,
    Cancelled,
    Failed,
    TimedOut,
    Lost,
}

impl TurnStatus {
    /// Whether the turn has ended (I7: exactly one terminal entry).
    pub fn is_terminal(self) -> bool {
        !matches!(self, Self::Starting | Self::Running)
    }

    /// The name stored in the database and shown on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Cancelled => "cancelled",
            Self::Failed => "failed",
            Self::TimedOut => "timed_out",
            Self::Lost => "lost",
        }
    }

    /// The inverse of [`TurnStatus::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "starting" => Self::Starting,
            "running" => Self::Running,
            "completed" => Self::Completed,
            "cancelled" => Self::Cancelled,
            "failed" => Self::Failed,
            "timed_out" => Self::TimedOut,
            "lost" => Self::Lost,
            _ => return None,
        })
    }
}

/// One agent turn.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Turn {
    pub id: TurnId,
    pub session_id: SessionId,
    pub status: TurnStatus,
    /// The user messages it consumed: its first input, and any steered
    /// messages it took while it ran.
    pub input: InputRange,
    pub started_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}
