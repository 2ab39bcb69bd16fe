//! Entries: the records of a session's log, ordered by `seq`.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{Seq, SessionId, Timestamp, TurnId, TurnStatus};

/// What an entry records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EntryType {
    /// A message from the user, the assistant or the system.
    Message,
    /// A run of the agent's reasoning (`agent_thought_chunk`s), stored in
    /// order with its other output; left out of exports unless asked for.
    Thought,
    /// The agent called a tool.
    ToolCall,
    /// A tool call's result (synthetic `cancelled` ones included).
    ToolResult,
    /// The agent asked permission to run a tool call; carries
    /// [`PermissionInfo`] with the options it offered.
    PermissionRequest,
    /// The answer to a permission request; carries [`PermissionInfo`] with
    /// the chosen option (or the `cancelled` outcome) and who decided.
    PermissionDecision,
    /// A turn began; carries the input range it consumes.
    TurnStarted,
    /// A turn's single terminal entry (I7), with its status and reason.
    TurnEnded,
}

impl EntryType {
    /// The name stored in the database and shown on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Message => "message",
            Self::Thought => "thought",
            Self::ToolCall => "tool_call",
            Self::ToolResult => "tool_result",
            Self::PermissionRequest => "permission_request",
            Self::PermissionDecision => "permission_decision",
            Self::TurnStarted => "turn_started",
            Self::TurnEnded => "turn_ended",
        }
    }

    /// The inverse of [`EntryType::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "message" => Self::Message,
            "thought" => Self::Thought,
            "tool_call" => Self::ToolCall,
            "tool_result" => Self::ToolResult,
            "permission_request" => Self::PermissionRequest,
            "permission_decision" => Self::PermissionDecision,
            "turn_started" => Self::TurnStarted,
            "turn_ended" => Self::TurnEnded,
            _ => return None,
        })
    }
}

/// Who wrote a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    User,
    Assistant,
    System,
}

impl Role {
    /// The name stored in the database and shown on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Assistant => "assistant",
            Self::System => "system",
        }
    }

    /// The inverse of [`Role::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "user" => Self::User,
            "assistant" => Self::Assistant,
            "system" => Self::System,
            _ => return None,
        })
    }
}

/// The seq range of the user messages a turn consumed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub struct InputRange {
    pub from: Seq,
    pub to: Seq,
}

/// A tool call or tool result's identity and arguments.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ToolInfo {
    /// The agent's id for the call; a result names the call it answers.
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<serde_json::Value>,
}

/// One option a permission request offers the user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PermissionOptionInfo {
    pub option_id: String,
    pub name: String,
    /// `allow_once`, `allow_always`, `reject_once` or `reject_always`.
    pub kind: String,
}

/// A permission request or decision: which request, for which tool call,
/// what was offered and what was chosen, by whom.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PermissionInfo {
    /// The runtime's id for the request; its decision names the same id.
    pub request_id: String,
    /// The tool call the permission is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// On requests: the options offered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<PermissionOptionInfo>,
    /// On decisions: the chosen option; none when the outcome is `cancelled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub option_id: Option<String>,
    /// On decisions: `selected` or `cancelled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    /// On decisions: `policy`, `user:<owner>`, `timeout`, `turn_end` or
    /// `shutdown`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
}

impl PermissionInfo {
    /// A new request, with a fresh `request_id`.
    pub fn request(
        tool_call_id: Option<String>,
        title: Option<String>,
        options: Vec<PermissionOptionInfo>,
    ) -> Self {
        Self {
            request_id: uuid::Uuid::new_v4().to_string(),
            tool_call_id,
            title,
            options,
            ..Self::default()
        }
    }

    /// The decision answering this request: `option_id` chosen (`selected`),
    /// or none (`cancelled`), by `decided_by`.
    pub fn decision(&self, option_id: Option<String>, decided_by: impl Into<String>) -> Self {
        Self {
            request_id: self.request_id.clone(),
            tool_call_id: self.tool_call_id.clone(),
            title: self.title.clone(),
            options: Vec::new(),
            outcome: Some(
                if option_id.is_some() {
                    "selected"
                } else {
                    "cancelled"
                }
                .to_owned(),
            ),
            option_id,
            decided_by: Some(decided_by.into()),
        }
    }

    /// The option a decision chose, looked up among a request's options.
    pub fn chosen<'a>(&self, request: &'a PermissionInfo) -> Option<&'a PermissionOptionInfo> {
        let id = self.option_id.as_deref()?;
        request.options.iter().find(|o| o.option_id == id)
    }
}

/// A committed entry of a session's log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Entry {
    pub seq: Seq,
    pub session_id: SessionId,
    #[serde(rename = "type")]
    pub kind: EntryType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub turn_id: Option<TurnId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<TurnStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<InputRange>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<ToolInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permission: Option<PermissionInfo>,
    pub created_at: Timestamp,
}

/// An entry before the store gives it a `seq` and a time.
#[derive(Clone, Debug, PartialEq)]
pub struct NewEntry {
    pub kind: EntryType,
    pub role: Option<Role>,
    pub turn_id: Option<TurnId>,
    pub content: Option<String>,
    pub status: Option<TurnStatus>,
    pub reason: Option<String>,
    pub input: Option<InputRange>,
    pub tool: Option<ToolInfo>,
    pub permission: Option<PermissionInfo>,
}

impl NewEntry {
    fn bare(kind: EntryType) -> Self {
        Self {
            kind,
            role: None,
            turn_id: None,
            content: None,
            status: None,
            reason: None,
            input: None,
            tool: None,
            permission: None,
        }
    }

    /// A user's message (no turn: user input belongs to the session).
    pub fn user_message(content: impl Into<String>) -> Self {
        Self {
            role: Some(Role::User),
            content: Some(content.into()),
            ..Self::bare(EntryType::Message)
        }
    }

    /// A message the agent produced in `turn`.
    pub fn assistant_message(turn: TurnId, content: impl Into<String>) -> Self {
        Self {
            role: Some(Role::Assistant),
            turn_id: Some(turn),
            content: Some(content.into()),
            ..Self::bare(EntryType::Message)
        }
    }

    /// A run of the agent's reasoning in `turn`.
    pub fn thought(turn: TurnId, content: impl Into<String>) -> Self {
        Self {
            turn_id: Some(turn),
            content: Some(content.into()),
            ..Self::bare(EntryType::Thought)
        }
    }

    /// The agent asked permission in `turn`.
    pub fn permission_request(turn: TurnId, permission: PermissionInfo) -> Self {
        Self {
            turn_id: Some(turn),
            permission: Some(permission),
            ..Self::bare(EntryType::PermissionRequest)
        }
    }

    /// A permission request of `turn` was answered.
    pub fn permission_decision(turn: TurnId, permission: PermissionInfo) -> Self {
        Self {
            turn_id: Some(turn),
            permission: Some(permission),
            ..Self::bare(EntryType::PermissionDecision)
        }
    }

    /// A note the runtime records in `turn` (a plan).
    pub fn system_message(turn: TurnId, content: impl Into<String>) -> Self {
        Self {
            role: Some(Role::System),
            turn_id: Some(turn),
            content: Some(content.into()),
            ..Self::bare(EntryType::Message)
        }
    }

    /// The agent called a tool.
    pub fn tool_call(turn: TurnId, tool: ToolInfo) -> Self {
        Self {
            turn_id: Some(turn),
            tool: Some(tool),
            ..Self::bare(EntryType::ToolCall)
        }
    }

    /// A tool call's result.
    pub fn tool_result(turn: TurnId, call_id: String, content: impl Into<String>) -> Self {
        Self {
            turn_id: Some(turn),
            content: Some(content.into()),
            tool: Some(ToolInfo {
                id: call_id,
                name: None,
                arguments: None,
            }),
            ..Self::bare(EntryType::ToolResult)
        }
    }

    /// The result that closes tool call `call_id`, left open when `turn`
    /// ended with `status` (and `reason`): it carries both, so the
    /// transcript pairs every call with a result (I7 for tools).
    pub fn tool_closed(
        turn: TurnId,
        call_id: String,
        status: TurnStatus,
        reason: Option<&str>,
    ) -> Self {
        let content = match reason {
            Some(why) => format!(
                "tool call not completed: the turn ended {} ({why})",
                status.as_str()
            ),
            None => format!(
                "tool call not completed: the turn ended {}",
                status.as_str()
            ),
        };
        Self {
            status: Some(status),
            reason: reason.map(str::to_owned),
            ..Self::tool_result(turn, call_id, content)
        }
    }

    /// A turn began with `input`.
    pub fn turn_started(turn: TurnId, input: InputRange) -> Self {
        Self {
            turn_id: Some(turn),
            input: Some(input),
            ..Self::bare(EntryType::TurnStarted)
        }
    }

    /// A turn's terminal entry.
    pub fn turn_ended(turn: TurnId, status: TurnStatus, reason: Option<String>) -> Self {
        Self {
            turn_id: Some(turn),
            status: Some(status),
            reason,
            ..Self::bare(EntryType::TurnEnded)
        }
    }

    /// This entry as committed at `seq`.
    pub fn committed(self, session_id: SessionId, seq: Seq, created_at: Timestamp) -> Entry {
        Entry {
            seq,
            session_id,
            kind: self.kind,
            role: self.role,
            turn_id: self.turn_id,
            content: self.content,
            status: self.status,
            reason: self.reason,
            input: self.input,
            tool: self.tool,
            permission: self.permission,
            created_at,
        }
    }
}
