//! What a run observed, as plain data: the stored log and turns of every
//! session read back at the end, and every client-side observation made
//! during the run (each message's acknowledgements, each stream reader's
//! events). The checker ([`crate::check`]) judges a [`History`] without any
//! I/O, so hand-made histories test it.
//!
//! These are the wire shapes of Baton's HTTP API, read independently of the
//! server's own types: the tool checks what a client sees.

use serde::{Deserialize, Serialize};

/// A seq range `from..=to` (a turn's input).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Range {
    pub from: u64,
    pub to: u64,
}

/// One stored entry, as `GET /entries` and the stream's `entry` events carry it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    pub seq: u64,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub role: Option<String>,
    #[serde(default)]
    pub turn_id: Option<String>,
    #[serde(default)]
    pub content: Option<String>,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub input: Option<Range>,
}

impl LogEntry {
    /// A user message.
    pub fn is_user_message(&self) -> bool {
        self.kind == "message" && self.role.as_deref() == Some("user")
    }
}

/// One turn, as `GET /turns` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TurnRecord {
    pub id: String,
    pub status: String,
    pub input: Range,
    /// RFC 3339 UTC with microseconds, fixed width, so strings compare as times.
    pub started_at: String,
    #[serde(default)]
    pub ended_at: Option<String>,
}

/// A `2xx` answer to a message post (or a create with a message: seq 1).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub status: u16,
    pub seq: u64,
    /// The disposition's type (`started`, `queued`, …).
    pub disposition: String,
    /// The disposition's turn (`started`, `steered`, `interrupting`).
    pub turn_id: Option<String>,
}

/// One logical message: one idempotency key, one content, any number of
/// attempts (retries of the same key), each `2xx` recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageHistory {
    pub key: String,
    /// Unique in the run, so the log shows where (and how often) it landed.
    pub content: String,
    /// The policy in force for it (the message's, else the session's).
    pub policy: String,
    pub acks: Vec<Ack>,
}

/// An event a stream reader received.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamEvent {
    Entry(LogEntry),
    Delta { turn_id: String },
}

/// One connection of a stream reader: opened after `after`, then every
/// event it received until it disconnected.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamRead {
    pub after: u64,
    pub events: Vec<StreamEvent>,
}

/// Everything known about one session.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionHistory {
    pub id: String,
    /// Deleted during the run: its log is gone, so its messages are not
    /// looked for (the runner checks it answers `404`).
    pub deleted: bool,
    /// Idle with nothing queued when read back: every turn must have ended
    /// and every message must have been consumed.
    pub quiesced: bool,
    /// Not at rest but waiting as its policy says: idle, its messages held
    /// by a debounce window that closes at this time, after the read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debounce_until: Option<String>,
    pub log: Vec<LogEntry>,
    pub turns: Vec<TurnRecord>,
    pub messages: Vec<MessageHistory>,
    pub streams: Vec<StreamRead>,
}

/// A request whose answer the contract fixes: another owner's session, or
/// a deleted one, must be `404` (I10).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    pub what: String,
    pub expected: u16,
    pub got: u16,
}

/// A whole run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    pub sessions: Vec<SessionHistory>,
    pub probes: Vec<Probe>,
}
