//! Baton's durable log: the [`Store`] trait and its SQL implementation for
//! SQLite (embedded, one file) and PostgreSQL (several nodes).
//!
//! The store is where the contract becomes physical:
//! - **I1** `seq` comes from the session row's counter, bumped in the same
//!   transaction as the insert; `PRIMARY KEY (session_id, seq)` is the backstop.
//! - **I2** a write returns only after its transaction commits (SQLite:
//!   WAL, `synchronous=FULL`, group commit; PostgreSQL: its own WAL).
//! - **I3** `UNIQUE (session_id, idempotency_key)`; a retry returns the stored
//!   entry and disposition, a different body is a conflict.
//! - **I4** the session row names its single active turn and carries the lease
//!   (owner, epoch, expiry); every write of a turn is fenced by its epoch.
//! - **I6** the session's `consumed_seq` cursor advances only when a turn is
//!   created, or when the running turn takes steered input, in the same
//!   transaction; the end of a turn hands whatever it did not take to the
//!   next turn in the transaction that ends it.
//! - A debounce window is stored on the session row (`pending_until`), so
//!   the turn it holds back starts from stored state: on any node, after a
//!   restart.
//!
//! Every decision (seq, policy, capacity, the cursor, which turn starts) is
//! made by `baton_core::flow` inside the transaction that stores its result,
//! with the session row locked: the store reads rows and writes what the
//! procedure decided. The contract suite every store must pass lives in the
//! `baton-testkit` crate, out of the production build.

mod db;
mod pg_writer;
mod sql;
mod stats;
mod writer;

use std::sync::Arc;

use async_trait::async_trait;
use baton_core::{
    Disposition, Entry, Epoch, NewEntry, PermissionPolicy, PermissionStatus, Policy, Seq, Session,
    SessionId, SessionStatus, Timestamp, Turn, TurnId, TurnStatus,
};

pub use sql::{pg_timeouts, PgTimeouts, SqlStore, StoreConfig};
pub use stats::CommitStats;

/// What a store operation can answer besides success.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No such session for this owner (also: another owner's session, I10).
    #[error("session not found")]
    NotFound,
    /// The policy is `reject` and a turn is running.
    #[error("session is busy with turn {turn_id}")]
    SessionBusy { turn_id: TurnId },
    /// The session's queue is at capacity.
    #[error("the session's queue is full ({capacity} {} waiting)", if *capacity == 1 { "message" } else { "messages" })]
    QueueFull { capacity: usize },
    /// The idempotency key was used with a different request.
    #[error("idempotency key already used with a different request")]
    IdempotencyConflict,
    /// The lease moved on: this writer was fenced off (I4).
    #[error("stale lease epoch {epoch}: the session's lease is held by someone else")]
    StaleEpoch { epoch: Epoch },
    /// The turn is not the session's active turn any more (it ended).
    #[error("turn {turn_id} is not active")]
    TurnNotActive { turn_id: TurnId },
    /// The database cannot be reached right now.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// No permission request with this id in the session.
    #[error("no permission request {request_id:?} in this session")]
    PermissionNotFound { request_id: String },
    /// The answer names an option the request did not offer.
    #[error("permission request {request_id:?} offers no option {option_id:?}")]
    UnknownOption {
        request_id: String,
        option_id: String,
    },
    /// The request was already answered otherwise, or closed.
    #[error("permission request {:?} is already {}", .0.request_id, .0.state.as_str())]
    PermissionClosed(Box<PermissionStatus>),
    /// A backstop of the schema fired: a unique index the store's own
    /// transactions never violate (the `(session_id, seq)` key, the
    /// one-active-turn index, …). Not contention, so never retried: a bug,
    /// or a row written behind the store's back.
    #[error("invariant breach: {detail} (constraint {constraint})")]
    InvariantBreach { constraint: String, detail: String },
    /// Anything else, with context.
    #[error("store error: {0}")]
    Internal(String),
}

/// A store `Result`.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The right to run a session's turns: held by one node, fenced by `epoch`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub session_id: SessionId,
    pub owner: String,
    pub epoch: Epoch,
}

/// `POST /v1/sessions`.
#[derive(Clone, Debug)]
pub struct CreateSession {
    pub owner: String,
    pub agent: String,
    pub policy: Policy,
    pub metadata: serde_json::Value,
    pub idempotency_key: Option<String>,
    /// The request body in canonical form, compared on a retry (I3).
    pub fingerprint: String,
    pub message: Option<String>,
    /// What the agent's permission requests get in this session (`None`:
    /// the agent's own policy).
    pub permission: Option<PermissionPolicy>,
    /// The node creating it, which takes the lease if a turn starts.
    pub node: String,
    /// The session's debounce window in milliseconds (0: off).
    pub debounce_ms: u64,
}

/// The result of creating a session.
#[derive(Clone, Debug)]
pub struct Created {
    pub session: Session,
    /// False when an idempotent retry returned the existing session.
    pub created: bool,
    /// Entries committed by this call, in order (for the live bus).
    pub committed: Vec<Entry>,
    /// The lease this node took, if a turn started.
    pub lease: Option<Lease>,
}

/// `POST /v1/sessions/{id}/messages`.
#[derive(Clone, Debug)]
pub struct PostMessage {
    pub owner: String,
    pub session_id: SessionId,
    pub content: String,
    /// A per-message override of the session's policy.
    pub policy: Option<Policy>,
    pub idempotency_key: Option<String>,
    pub node: String,
    /// The agents that take input mid-turn: a `steer` message joins the
    /// running turn only if the session's agent is one of them.
    pub mid_turn_agents: Vec<String>,
}

/// The result of posting a message.
#[derive(Clone, Debug)]
pub struct Posted {
    /// The stored user message.
    pub entry: Entry,
    pub disposition: Disposition,
    /// True when an idempotent retry returned the original.
    pub replayed: bool,
    /// Entries committed by this call, in order (for the live bus).
    pub committed: Vec<Entry>,
    /// The lease this node took, if a turn started and the lease was free.
    pub lease: Option<Lease>,
    /// The turn asked to cancel (interrupt), for a prompt wake-up.
    pub cancel: Option<TurnId>,
    /// The turn this message started, already `running` under `lease`, when
    /// the post was made with [`Store::post_message_to_run`] and this node
    /// took the lease: the worker prompts it without a `take_turn` of its
    /// own (one durable commit fewer before the agent sees the message).
    pub begun: Option<TurnToRun>,
    /// The turn the message was steered to, for a prompt wake-up.
    pub steer: Option<TurnId>,
    /// The session debounces: its turn starts then (store clock, µs).
    pub pending_until: Option<i64>,
}

/// Steered messages waiting for the running turn.
#[derive(Clone, Debug)]
pub struct SteerBatch {
    /// The last of them: the turn takes everything up to it.
    pub upto: Seq,
    /// The user messages, in order.
    pub messages: Vec<Entry>,
}

/// A turn a debounce window held back, started.
#[derive(Clone, Debug)]
pub struct DueStart {
    /// The lease this node took to run it, if it was free.
    pub lease: Option<Lease>,
    /// The `turn_started` entry.
    pub committed: Vec<Entry>,
}

/// What a look for due debounce windows did.
#[derive(Clone, Debug, Default)]
pub struct Due {
    pub started: Vec<DueStart>,
    /// When the earliest window still open closes (store clock, µs).
    pub next: Option<i64>,
    /// The store's clock when it looked (µs).
    pub now: i64,
}

/// A page of a session's log.
#[derive(Clone, Debug)]
pub struct Page {
    pub entries: Vec<Entry>,
    pub last_seq: Seq,
}

/// Where a page of an owner's sessions starts: just past this session in
/// newest-first order (`created_at`, then `id`, both descending).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListCursor {
    pub created_at: Timestamp,
    pub id: SessionId,
}

/// `GET /v1/sessions`: which of the owner's sessions, newest first.
#[derive(Clone, Debug)]
pub struct SessionQuery {
    /// Start after this session (the previous page's last one).
    pub after: Option<ListCursor>,
    /// At most this many sessions.
    pub limit: u32,
    /// Only sessions in this status.
    pub status: Option<SessionStatus>,
    /// Only sessions of this agent.
    pub agent: Option<String>,
}

/// A session as listed, with the time of its latest entry.
#[derive(Clone, Debug, PartialEq)]
pub struct Listed {
    pub session: Session,
    /// The latest entry's time, or the session's creation when it has none.
    pub last_activity_at: Timestamp,
}

impl Listed {
    /// The cursor of the page that follows this session.
    pub fn cursor(&self) -> ListCursor {
        ListCursor {
            created_at: self.session.created_at,
            id: self.session.id,
        }
    }
}

/// One page of an owner's sessions.
#[derive(Clone, Debug)]
pub struct SessionPage {
    /// Newest first.
    pub sessions: Vec<Listed>,
    /// Whether more sessions follow the last one.
    pub more: bool,
}

/// A turn handed to a worker.
#[derive(Clone, Debug)]
pub struct TurnToRun {
    pub turn: Turn,
    pub agent: String,
    /// The user messages it consumes, in order.
    pub inputs: Vec<Entry>,
    /// The agent's own id for this conversation, if it has one.
    pub agent_session: Option<String>,
    /// The session's permission policy, if it set one.
    pub permission: Option<PermissionPolicy>,
}

/// `POST /v1/sessions/{id}/permissions/{request_id}`.
#[derive(Clone, Debug)]
pub struct AnswerPermission {
    pub owner: String,
    pub session_id: SessionId,
    pub request_id: String,
    pub option_id: String,
}

/// The result of answering a permission request.
#[derive(Clone, Debug)]
pub struct Answered {
    /// The `permission_decision` entry.
    pub decision: Entry,
    /// True when an identical retry returned the original decision.
    pub replayed: bool,
}

/// What `begin_turn` found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Begin {
    /// The turn is now `running`: send the prompt.
    Run,
    /// A cancel arrived while it was `starting`: it must not run.
    Cancelled(String),
}

/// What `take_turn` did.
#[derive(Clone, Debug)]
pub enum Take {
    /// The session's starting turn, handed over: `running` now
    /// ([`Begin::Run`]), or cancelled before it ran ([`Begin::Cancelled`]).
    Run(Box<TurnToRun>, Begin),
    /// Nothing was waiting: the lease is given up.
    Released,
    /// The active turn is already running and this holder is not running it
    /// (it lost track of it); the lease is kept until it lapses and the
    /// sweeper ends that turn `lost`.
    Busy,
}

/// What a lease renewal learned.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Renewal {
    /// A cancel requested for the active turn (possibly from another node).
    pub cancel: Option<(TurnId, String)>,
    /// Steered messages wait for the active turn, up to this seq.
    pub steer: Option<(TurnId, Seq)>,
}

/// A session taken over from a worker that vanished.
#[derive(Clone, Debug)]
pub struct Recovered {
    pub lease: Lease,
    /// Entries committed by the takeover (`lost` ends, next `turn_started`).
    pub committed: Vec<Entry>,
}

/// The result of ending a turn.
#[derive(Clone, Debug)]
pub struct Ended {
    /// The terminal entries and, if messages were waiting, the next
    /// `turn_started`.
    pub committed: Vec<Entry>,
    /// Whether a next turn was started in the same transaction.
    pub next: Option<TurnId>,
}

/// Baton's durable log. Every method is one transaction.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The store's commit measurements, if it keeps them.
    fn commit_stats(&self) -> Option<CommitStats> {
        None
    }
    /// Checks that the database answers.
    async fn ping(&self) -> Result<()>;
    /// How many times each schema backstop fired
    /// ([`StoreError::InvariantBreach`]), by constraint name, since the
    /// store was opened.
    fn invariant_breaches(&self) -> Vec<(String, u64)> {
        Vec::new()
    }
    /// Returns once every write sent before it has committed (the embedded
    /// writer's last batch is on disk); used at shutdown.
    async fn flush(&self) -> Result<()> {
        Ok(())
    }
    /// Creates a session (idempotent per owner and key); with a `message`,
    /// stores it as entry 1 and starts the first turn in the same transaction.
    async fn create_session(&self, req: CreateSession) -> Result<Created>;
    /// The owner's session, or `NotFound` (I10).
    async fn session(&self, owner: &str, id: SessionId) -> Result<Session>;
    /// The owner's session created with this idempotency key, if any.
    async fn session_by_key(&self, owner: &str, key: &str) -> Result<Option<Session>>;
    /// A page of the owner's sessions, newest first.
    async fn list_sessions(&self, owner: &str, query: &SessionQuery) -> Result<SessionPage>;
    /// All the owner's sessions, oldest first (paging through
    /// [`Store::list_sessions`]).
    async fn sessions(&self, owner: &str) -> Result<Vec<Session>> {
        let mut out = Vec::new();
        let mut query = SessionQuery {
            after: None,
            limit: 1000,
            status: None,
            agent: None,
        };
        loop {
            let page = self.list_sessions(owner, &query).await?;
            query.after = page.sessions.last().map(Listed::cursor);
            out.extend(page.sessions.into_iter().map(|l| l.session));
            if !page.more || query.after.is_none() {
                break;
            }
        }
        out.reverse();
        Ok(out)
    }
    /// Deletes a session and all it holds; `NotFound` if not the owner's.
    async fn delete_session(&self, owner: &str, id: SessionId) -> Result<()>;
    /// Stores a user message and applies the busy policy atomically.
    async fn post_message(&self, req: PostMessage) -> Result<Posted>;
    /// [`Store::post_message`] for a node that runs the turn the message
    /// starts, if any, itself and at once: when the message starts a turn and
    /// this node takes the lease, the same transaction also begins the turn
    /// (`running`, fenced by the new epoch) and returns it in
    /// [`Posted::begun`]. A worker that then vanishes before prompting leaves
    /// a `running` turn, which recovery ends `lost` (never runs twice).
    /// Stores that cannot begin in the post return no `begun` turn; the
    /// worker then takes it with [`Store::take_turn`].
    async fn post_message_to_run(&self, req: PostMessage) -> Result<Posted> {
        self.post_message(req).await
    }
    /// Entries with `seq > after`, at most `limit`, in order. No owner check:
    /// callers check ownership first.
    async fn entries(&self, id: SessionId, after: Seq, limit: u32) -> Result<Page>;
    /// The session's turns in the order of their input (the seq of the
    /// first message each consumes), which is the order they ran in,
    /// whatever the clocks that stamped them said.
    async fn turns(&self, id: SessionId) -> Result<Vec<Turn>>;
    /// Asks the active turn to cancel — with `only`, only if that is the
    /// active turn; returns the turn asked, or `None` when nothing was
    /// (idle, or `only` names a turn that is not the active one).
    async fn request_cancel(
        &self,
        owner: &str,
        id: SessionId,
        reason: &str,
        only: Option<TurnId>,
    ) -> Result<Option<TurnId>>;

    /// The session's turn waiting to start under this lease, if any.
    async fn next_turn(&self, lease: &Lease) -> Result<Option<TurnToRun>>;
    /// Moves a turn `starting → running` unless a cancel is pending.
    async fn begin_turn(&self, lease: &Lease, turn: TurnId) -> Result<Begin>;
    /// Stores a running turn's output (fenced by the lease epoch).
    async fn append_output(
        &self,
        lease: &Lease,
        turn: TurnId,
        entries: Vec<NewEntry>,
    ) -> Result<Vec<Entry>>;
    /// Ends a turn with its terminal entries and starts the next turn if
    /// messages wait, in one transaction (fenced).
    async fn end_turn(
        &self,
        lease: &Lease,
        turn: TurnId,
        status: TurnStatus,
        reason: Option<String>,
        entries: Vec<NewEntry>,
    ) -> Result<Ended>;
    /// The worker's next step, in one transaction: begin the session's
    /// starting turn (as [`Store::next_turn`] then [`Store::begin_turn`]), or,
    /// when no turn is active, give the lease up (as
    /// [`Store::release_lease`]). Nothing can slip between the look and the
    /// release, so no message is stranded and no worker has to poll.
    async fn take_turn(&self, lease: &Lease) -> Result<Take>;
    /// Extends the lease; `StaleEpoch` if it was lost.
    async fn renew_lease(&self, lease: &Lease) -> Result<Renewal>;
    /// Gives the lease up. Without `force` it refuses (returns false) while a
    /// turn is active, so a turn created concurrently is never orphaned.
    async fn release_lease(&self, lease: &Lease, force: bool) -> Result<bool>;
    /// Records a user's answer to a pending permission request of the
    /// session's running turn: the `permission_decision` entry and the
    /// request's new state in one transaction, exactly once. An identical
    /// retry returns the original decision; another answer, or one after
    /// the request was closed, is [`StoreError::PermissionClosed`].
    async fn answer_permission(&self, req: AnswerPermission) -> Result<Answered>;
    /// Closes `turn`'s pending permission requests (with `only`, just that
    /// one) as `cancelled` by `decided_by`, with `reason` (fenced). Returns
    /// the decisions written: none for a request answered meanwhile.
    async fn close_permissions(
        &self,
        lease: &Lease,
        turn: TurnId,
        only: Option<String>,
        decided_by: &str,
        reason: &str,
    ) -> Result<Vec<Entry>>;
    /// The session's pending permission requests (their `permission_request`
    /// entries), oldest first. No owner check: callers check first.
    async fn pending_permissions(&self, id: SessionId) -> Result<Vec<Entry>>;
    /// The `permission_decision` entries of `turn`'s requests, oldest first.
    async fn permission_decisions(&self, id: SessionId, turn: TurnId) -> Result<Vec<Entry>>;
    /// Records the agent's own id for the session (fenced).
    async fn set_agent_session(&self, lease: &Lease, agent_session: &str) -> Result<()>;
    /// The steered messages waiting for `turn` after seq `after`, if any
    /// (a read; fenced).
    async fn steered_input(
        &self,
        lease: &Lease,
        turn: TurnId,
        after: Seq,
    ) -> Result<Option<SteerBatch>>;
    /// The running `turn`'s agent took the waiting messages up to `upto`:
    /// they become its input (its record's `input.to` moves to `upto`). A
    /// turn that ended has nothing to take: its end handed them to the next
    /// turn (`TurnNotActive`). Fenced; taking again what was taken is a
    /// no-op.
    async fn take_input(&self, lease: &Lease, turn: TurnId, upto: Seq) -> Result<()>;
    /// Starts the turns of debounce windows that are due (claiming their
    /// leases for `node` where free) and says when the next one is.
    async fn start_due(&self, node: &str) -> Result<Due>;
    /// Takes over sessions with an active turn whose lease is free or expired
    /// (or, with `all_foreign`, held by anyone but `node`: the embedded store
    /// at start-up). A `running` turn of a vanished worker ends `lost` and the
    /// queue continues.
    async fn recover(&self, node: &str, all_foreign: bool) -> Result<Vec<Recovered>>;
}

/// A shared store.
pub type SharedStore = Arc<dyn Store>;
