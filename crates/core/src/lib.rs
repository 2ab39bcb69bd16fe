//! Baton's domain: identifiers, entries, turns, busy policies, and the
//! sans-I/O logic that decides what happens to a session.
//!
//! Nothing in this crate performs I/O or reads a clock: it has no tokio or
//! sqlx dependency, so the compiler keeps it pure. The stores decide every
//! write with [`flow`] (which builds on [`policy`]) inside their transactions,
//! and the engine executes the [`turn::TurnMachine`]'s actions, so the
//! ordering and policy rules that the invariants rest on (I4–I8) are written
//! once, here, and tested exhaustively without a database: the [`model`]
//! runs the same procedure over in-memory rows.

pub mod entry;
pub mod export;
pub mod flow;
pub mod id;
pub mod late;
pub mod model;
pub mod permission;
pub mod policy;
pub mod session;
pub mod time;
pub mod turn;

pub use entry::{
    Entry, EntryType, InputRange, NewEntry, PermissionInfo, PermissionOptionInfo, Role, ToolInfo,
};
pub use id::{IdError, SessionId, TurnId};
pub use permission::{PermissionPolicy, PermissionState, PermissionStatus};
pub use policy::{Decision, Disposition, DispositionType, NextTurn, Policy, QueueSummary, Waiting};
pub use session::{Session, SessionStatus, Turn, TurnStatus};
pub use time::Timestamp;

/// A position in a session's log. Assigned by the store at commit: 1, 2, 3 …
/// with no gap and no duplicate (I1).
pub type Seq = u64;

/// A lease's fencing token. Every claim of a session's lease increments it;
/// a write carrying an older epoch is refused (I4).
pub type Epoch = i64;
