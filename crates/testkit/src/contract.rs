//! The store contract suite: what every [`Store`] implementation must do,
//! written once and run against each backend.
//!
//! Each public `async fn` here (besides the helpers [`base_config`] and
//! [`check_log`]) checks one contract and panics with a message naming the
//! violated rule. They take a factory, `open(config)`, that returns
//! a fresh [`SharedStore`] honouring the [`StoreConfig`] it is given (lease
//! TTL, queue capacity, bounded recovery), so a contract can open the store
//! shape it needs. `crates/store/tests/contract.rs` runs every function
//! against SQLite and PostgreSQL; other crates may reuse them for their own
//! stores.
//!
//! The suite owns the store-level meaning of the invariants in
//! `DESIGN.md`: I1 (gapless `seq` under concurrency), I3 (idempotent posts and
//! creates), I4 (one active turn, fencing by lease epoch, takeover by
//! `recover`), I5–I8 at the store (causality, FIFO consumption, one terminal
//! entry, nothing accepted after it), I10 (owner isolation), the busy
//! policies and queue capacity, pagination, deletion, and permission
//! requests answered exactly once (and closed by a turn's end or a
//! takeover). Durability across a reopen (I2) and the embedded store's file
//! lock are SQLite-specific and live in the test binary.
//!
//! The functions are written for a database shared with concurrent tests:
//! every contract uses fresh random owners and node names, asserts only about
//! the sessions it created, and deletes them at the end. `recover` is global by
//! nature (it takes over *any* session whose lease expired, or with
//! `all_foreign` any session at all), so contracts that call it hold an
//! in-process exclusive lock and all others a shared one: inside one test
//! binary no contract's lease is taken over by another contract's recovery.
//! That lock is per process, so the workspace's PostgreSQL tests also give
//! each test a schema of its own ([`crate::pg::PgSchema`]): a test
//! runner that runs every test in its own process, or another test binary's
//! sweepers, then never see (or take over) a contract's sessions.

use std::future::Future;
use std::time::Duration;

use baton_core::{
    DispositionType, Entry, EntryType, InputRange, NewEntry, PermissionInfo, PermissionOptionInfo,
    PermissionState, Policy, Role, Seq, Session, SessionId, SessionStatus, ToolInfo, Turn, TurnId,
    TurnStatus,
};
use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use baton_store::{
    AnswerPermission, Begin, CreateSession, Lease, PostMessage, Posted, Recovered, SharedStore,
    Store, StoreConfig, StoreError, Take,
};

pub use steer::{
    debounce_windows_hold_a_burst, recovery_closes_calls_made_before_steered_input,
    steered_input_joins_the_running_turn_or_the_next, steers_race_the_end_of_turns,
};

// ---------------------------------------------------------------------------
// Helpers

/// Contracts that call `recover` take this exclusively; the others share it.
static RECOVERY: RwLock<()> = RwLock::const_new(());

async fn shared() -> RwLockReadGuard<'static, ()> {
    RECOVERY.read().await
}

async fn exclusive() -> RwLockWriteGuard<'static, ()> {
    RECOVERY.write().await
}

/// A short lease, for contracts where expiry matters.
const SHORT_TTL: Duration = Duration::from_millis(200);

/// Comfortably past [`SHORT_TTL`]: the lease has expired by the store's clock.
const PAST_TTL: Duration = Duration::from_millis(450);

/// A lease long enough that a takeover's fresh lease cannot expire again
/// while a racing recovery waits for the row lock, even on a loaded machine.
const RACE_TTL: Duration = Duration::from_millis(1000);

/// Comfortably past [`RACE_TTL`].
const PAST_RACE_TTL: Duration = Duration::from_millis(1300);

/// The configuration contracts start from: a long lease (expiry never happens
/// by accident), a queue that never fills by accident, a small pool.
pub fn base_config() -> StoreConfig {
    StoreConfig {
        lease_ttl: Duration::from_secs(30),
        queue_capacity: 100_000,
        max_recoveries: 3,
        max_connections: 8,
        ..StoreConfig::default()
    }
}

/// A name nobody else uses (owners, nodes, keys).
fn unique(label: &str) -> String {
    format!("{label}-{}", uuid::Uuid::new_v4())
}

/// Asserts that `$e` is `Err` matching `$p`, with context.
macro_rules! expect_err {
    ($e:expr, $p:pat $(if $guard:expr)?, $($ctx:tt)+) => {
        match $e {
            Err($p) $(if $guard)? => {}
            other => panic!(
                "{}: expected Err({}), got {:?}",
                format_args!($($ctx)+),
                stringify!($p),
                other
            ),
        }
    };
}

/// One contract's view of a store: its own owner and node.
struct Fixture {
    store: SharedStore,
    owner: String,
    node: String,
    agent: String,
}

impl Fixture {
    async fn open<Fut: Future<Output = SharedStore>>(
        open: impl Fn(StoreConfig) -> Fut,
        cfg: StoreConfig,
    ) -> Self {
        Self::on(open(cfg).await)
    }

    fn on(store: SharedStore) -> Self {
        Self {
            store,
            owner: unique("owner"),
            node: unique("node"),
            agent: "contract-agent".to_owned(),
        }
    }

    /// The same owner on another node.
    fn on_node(&self, label: &str) -> Self {
        Self {
            store: self.store.clone(),
            owner: self.owner.clone(),
            node: unique(label),
            agent: self.agent.clone(),
        }
    }

    fn create_req(&self, policy: Policy) -> CreateSession {
        CreateSession {
            owner: self.owner.clone(),
            agent: self.agent.clone(),
            policy,
            metadata: serde_json::json!({"suite": "contract"}),
            idempotency_key: None,
            fingerprint: "{}".to_owned(),
            message: None,
            permission: None,
            node: self.node.clone(),
            debounce_ms: 0,
        }
    }

    /// A new idle session with no entries.
    async fn session(&self, policy: Policy) -> SessionId {
        let created = self
            .store
            .create_session(self.create_req(policy))
            .await
            .expect("create_session without a message");
        assert!(created.created, "a create without a key always creates");
        assert!(
            created.committed.is_empty(),
            "a create without a message commits no entry"
        );
        assert!(
            created.lease.is_none(),
            "a create without a message takes no lease"
        );
        assert_eq!(created.session.last_seq, 0, "a new session's log is empty");
        assert_eq!(
            created.session.status,
            SessionStatus::Idle,
            "a new session is idle"
        );
        created.session.id
    }

    /// A message from this fixture's owner and node, session policy, no key.
    fn msg(&self, id: SessionId, content: &str) -> PostMessage {
        PostMessage {
            owner: self.owner.clone(),
            session_id: id,
            content: content.to_owned(),
            policy: None,
            idempotency_key: None,
            node: self.node.clone(),
            mid_turn_agents: Vec::new(),
        }
    }

    fn msg_with(&self, id: SessionId, content: &str, policy: Policy) -> PostMessage {
        PostMessage {
            policy: Some(policy),
            ..self.msg(id, content)
        }
    }

    async fn post(&self, req: PostMessage) -> Posted {
        let what = format!("post_message {:?} ({:?})", req.content, req.policy);
        self.store
            .post_message(req)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e:?}"))
    }

    /// Posts to an idle session: the message starts a turn and takes the lease.
    async fn start(&self, id: SessionId, content: &str) -> (Posted, TurnId, Lease) {
        let p = self.post(self.msg(id, content)).await;
        assert_eq!(
            p.disposition.kind,
            DispositionType::Started,
            "a message to an idle session starts a turn"
        );
        let turn = p
            .disposition
            .turn_id
            .expect("a started disposition names its turn");
        let lease = p
            .lease
            .clone()
            .expect("a turn started on a free lease hands the lease to the posting node");
        assert_eq!(
            lease.owner, self.node,
            "the lease belongs to the posting node"
        );
        assert_eq!(lease.session_id, id, "the lease is for this session");
        (p, turn, lease)
    }

    async fn view(&self, id: SessionId) -> Session {
        self.store
            .session(&self.owner, id)
            .await
            .expect("session() of one's own session")
    }

    async fn last_seq(&self, id: SessionId) -> Seq {
        self.store
            .entries(id, 0, 0)
            .await
            .expect("entries() of an existing session")
            .last_seq
    }

    async fn turns(&self, id: SessionId) -> Vec<Turn> {
        self.store
            .turns(id)
            .await
            .expect("turns() of an existing session")
    }

    async fn log(&self, id: SessionId) -> Vec<Entry> {
        check_log(&*self.store, &self.owner, id).await
    }

    /// Ends `turn` with its single terminal entry.
    async fn end(
        &self,
        lease: &Lease,
        turn: TurnId,
        status: TurnStatus,
        reason: Option<&str>,
    ) -> baton_store::Ended {
        self.store
            .end_turn(
                lease,
                turn,
                status,
                reason.map(str::to_owned),
                vec![NewEntry::turn_ended(
                    turn,
                    status,
                    reason.map(str::to_owned),
                )],
            )
            .await
            .unwrap_or_else(|e| panic!("end_turn({turn}, {status:?}) with a live lease: {e:?}"))
    }

    /// Deletes everything this fixture's owner created.
    async fn cleanup(&self) {
        let sessions = self
            .store
            .sessions(&self.owner)
            .await
            .expect("sessions() for cleanup");
        for s in sessions {
            self.store
                .delete_session(&self.owner, s.id)
                .await
                .expect("delete_session for cleanup");
        }
    }
}

fn recovered(all: &[Recovered], id: SessionId) -> Option<Recovered> {
    let mut mine = all.iter().filter(|r| r.lease.session_id == id);
    let first = mine.next().cloned();
    assert!(mine.next().is_none(), "recover returned session {id} twice");
    first
}

fn ended_entry(e: &Entry, turn: TurnId, status: TurnStatus) -> bool {
    e.kind == EntryType::TurnEnded && e.turn_id == Some(turn) && e.status == Some(status)
}

/// Reads a session's whole log and checks the invariants any log must keep,
/// whatever happened to it; returns the entries.
///
/// - I1: seq is exactly 1..=n, `last_seq` is n, every entry is this session's.
/// - I4: at most one turn is starting or running, and the session names it.
/// - I5: a turn's input messages precede its `turn_started`, which precedes
///   every entry of the turn; steered messages it took (its record's input
///   reaching past its `turn_started`'s) precede its `turn_ended`.
/// - I6: every user message up to the last consumed one is in exactly one
///   turn's input, turns consume in FIFO order, and the rest are `queued`.
/// - I7/I8: an ended turn has exactly one `turn_ended` (with its status), and
///   nothing of the turn follows it; a live turn has none.
pub async fn check_log(store: &dyn Store, owner: &str, id: SessionId) -> Vec<Entry> {
    let page = store
        .entries(id, 0, u32::MAX)
        .await
        .expect("entries() of an existing session");
    let log = page.entries;
    for (i, e) in log.iter().enumerate() {
        assert_eq!(
            e.seq,
            i as Seq + 1,
            "I1: session {id}: entry #{i} has seq {} (log: {log:#?})",
            e.seq
        );
        assert_eq!(
            e.session_id, id,
            "entry {} belongs to another session",
            e.seq
        );
    }
    for w in log.windows(2) {
        assert!(
            w[0].created_at <= w[1].created_at,
            "session {id}: entry {} is stamped {:?}, before entry {} ({:?}): \
             the store's clock runs with the log",
            w[1].seq,
            w[1].created_at,
            w[0].seq,
            w[0].created_at
        );
    }
    assert_eq!(
        page.last_seq,
        log.len() as Seq,
        "I1: last_seq must equal the number of entries"
    );

    let turns = store
        .turns(id)
        .await
        .expect("turns() of an existing session");
    let live: Vec<&Turn> = turns.iter().filter(|t| !t.status.is_terminal()).collect();
    assert!(live.len() <= 1, "I4: more than one active turn: {live:?}");

    let mut prev_to: Seq = 0;
    let mut prev_end: Option<baton_core::Timestamp> = None;
    for t in &turns {
        assert!(
            prev_end.is_none_or(|end| end <= t.started_at),
            "turn {} started at {:?}, before the previous turn ended ({prev_end:?})",
            t.id,
            t.started_at
        );
        prev_end = t.ended_at;
        assert!(
            t.input.from <= t.input.to,
            "turn {} has an empty input range {:?}",
            t.id,
            t.input
        );
        assert!(
            t.input.from > prev_to,
            "I6: turn {} input {:?} overlaps or precedes the previous turn's",
            t.id,
            t.input
        );
        prev_to = t.input.to;
        let starts: Vec<&Entry> = log
            .iter()
            .filter(|e| e.kind == EntryType::TurnStarted && e.turn_id == Some(t.id))
            .collect();
        assert_eq!(
            starts.len(),
            1,
            "turn {} must have exactly one turn_started entry",
            t.id
        );
        let started = starts[0];
        let first = started.input.expect("turn_started carries its input");
        assert!(
            first.from == t.input.from && first.to <= t.input.to,
            "turn_started of {} carries the turn's first input ({first:?}; record {:?})",
            t.id,
            t.input
        );
        for bound in [t.input.from, t.input.to] {
            let e = bound.checked_sub(1).and_then(|i| log.get(i as usize));
            assert!(
                e.is_some_and(|e| e.kind == EntryType::Message && e.role == Some(Role::User)),
                "turn {} input bound {bound} must be a user message, is {e:?}",
                t.id
            );
        }
        assert!(
            first.to < started.seq,
            "I5: turn {} starts (seq {}) before its input {:?}",
            t.id,
            started.seq,
            first
        );
        let ends: Vec<&Entry> = log
            .iter()
            .filter(|e| e.kind == EntryType::TurnEnded && e.turn_id == Some(t.id))
            .collect();
        if t.status.is_terminal() {
            assert_eq!(
                ends.len(),
                1,
                "I7: ended turn {} ({:?}) must have exactly one turn_ended",
                t.id,
                t.status
            );
            assert_eq!(
                ends[0].status,
                Some(t.status),
                "turn_ended of {} carries the turn's status",
                t.id
            );
            assert!(t.ended_at.is_some(), "ended turn {} has an ended_at", t.id);
        } else {
            assert!(ends.is_empty(), "live turn {} has a turn_ended entry", t.id);
            assert!(t.ended_at.is_none(), "live turn {} has an ended_at", t.id);
        }
        let end_seq = ends.first().map_or(Seq::MAX, |e| e.seq);
        assert!(
            t.input.to < end_seq,
            "I5: turn {} took input {} after its end (seq {end_seq})",
            t.id,
            t.input.to
        );
        for e in log.iter().filter(|e| e.turn_id == Some(t.id)) {
            assert!(
                e.seq >= started.seq,
                "I5: entry {} of turn {} precedes its turn_started",
                e.seq,
                t.id
            );
            assert!(
                e.seq <= end_seq,
                "I8: entry {} of turn {} follows its turn_ended",
                e.seq,
                t.id
            );
        }
    }

    let users: Vec<&Entry> = log.iter().filter(|e| e.role == Some(Role::User)).collect();
    for u in &users {
        assert!(
            u.turn_id.is_none(),
            "a user message belongs to the session, not a turn: {u:?}"
        );
        let consumers = turns
            .iter()
            .filter(|t| t.input.from <= u.seq && u.seq <= t.input.to)
            .count();
        let expected = usize::from(u.seq <= prev_to);
        assert_eq!(
            consumers, expected,
            "I6: user message {} is consumed by {consumers} turns",
            u.seq
        );
    }
    let waiting = users.iter().filter(|u| u.seq > prev_to).count() as u64;

    let s = store
        .session(owner, id)
        .await
        .expect("session() of one's own session");
    assert_eq!(
        s.last_seq, page.last_seq,
        "session().last_seq agrees with entries()"
    );
    assert_eq!(
        s.queued, waiting,
        "session().queued counts the user messages no turn consumed"
    );
    assert_eq!(
        s.turn_id,
        live.first().map(|t| t.id),
        "session().turn_id names the active turn"
    );
    let status = if live.is_empty() {
        SessionStatus::Idle
    } else {
        SessionStatus::Running
    };
    assert_eq!(
        s.status, status,
        "session().status is running exactly while a turn is active"
    );
    log
}

// ---------------------------------------------------------------------------
// 1. I1 + I3 under real concurrency

/// Thirty-two tasks post to four sessions at once, each message with its own
/// idempotency key and retried 0–2 extra times (sometimes concurrently). Every
/// log is gapless, every acknowledged message is stored exactly once, and every
/// retry got the original entry and disposition back. About a quarter of the
/// messages ask for `reject`: they are refused (the session is busy from its
/// first message on) and stored nothing, while sharing transactions with the
/// accepted ones.
pub async fn concurrent_posts_keep_order_and_exactly_once<Fut: Future<Output = SharedStore>>(
    open: impl Fn(StoreConfig) -> Fut,
) {
    const SESSIONS: usize = 4;
    const TASKS: usize = 32;
    const PER_TASK: usize = 12;
    let _g = shared().await;
    let f = Fixture::open(open, base_config()).await;
    let mut ids = Vec::new();
    for _ in 0..SESSIONS {
        ids.push(f.session(Policy::Queue).await);
    }

    /// Every attempt at posting one message (one idempotency key).
    struct Ack {
        session: SessionId,
        content: String,
        policy: Option<Policy>,
        attempts: Vec<Result<Posted, StoreError>>,
    }

    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let store = f.store.clone();
        let session = ids[t % SESSIONS];
        let (owner, node) = (f.owner.clone(), f.node.clone());
        tasks.push(tokio::spawn(async move {
            let mut acks = Vec::new();
            for i in 0..PER_TASK {
                let content = format!("task {t} message {i}");
                // Some messages ask for `reject`: refused jobs then share the
                // SQLite group commit with accepted ones.
                let policy = (fastrand::u8(0..4) == 0).then_some(Policy::Reject);
                let req = PostMessage {
                    owner: owner.clone(),
                    session_id: session,
                    content: content.clone(),
                    policy,
                    idempotency_key: Some(format!("key-{t}-{i}")),
                    node: node.clone(),
                    mid_turn_agents: Vec::new(),
                };
                let tries = 1 + fastrand::usize(0..=2);
                let attempts = if fastrand::bool() {
                    futures_util::future::join_all(
                        (0..tries).map(|_| store.post_message(req.clone())),
                    )
                    .await
                } else {
                    let mut v = Vec::new();
                    for _ in 0..tries {
                        v.push(store.post_message(req.clone()).await);
                    }
                    v
                };
                acks.push(Ack {
                    session,
                    content,
                    policy,
                    attempts,
                });
            }
            acks
        }));
    }
    let mut acks = Vec::new();
    for t in futures_util::future::join_all(tasks).await {
        acks.extend(t.expect("a posting task panicked"));
    }
    assert_eq!(acks.len(), TASKS * PER_TASK);

    // I3: one original per stored key; every retry replays it exactly. A
    // rejected key stored nothing, so its retries are rejected too (the
    // session never goes idle: nobody runs its turn).
    let mut stored: Vec<(&Ack, &Posted)> = Vec::new();
    for a in &acks {
        let ok: Vec<&Posted> = a.attempts.iter().filter_map(|r| r.as_ref().ok()).collect();
        for r in &a.attempts {
            match r {
                Ok(_) => {}
                Err(StoreError::SessionBusy { .. }) if a.policy == Some(Policy::Reject) => {}
                Err(e) => panic!("posting {:?} ({:?}) failed: {e:?}", a.content, a.policy),
            }
        }
        if ok.is_empty() {
            continue;
        }
        assert_eq!(
            ok.len(),
            a.attempts.len(),
            "{:?}: once a key is stored, every attempt gets it back",
            a.content
        );
        let originals: Vec<&&Posted> = ok.iter().filter(|p| !p.replayed).collect();
        assert_eq!(
            originals.len(),
            1,
            "I3: {:?} was posted {} times with one key; exactly one must be stored",
            a.content,
            a.attempts.len(),
        );
        let o = *originals[0];
        assert_eq!(
            o.entry.content.as_deref(),
            Some(a.content.as_str()),
            "the stored entry is the message"
        );
        assert_eq!(
            o.entry.session_id, a.session,
            "stored in the session it was posted to"
        );
        assert_eq!(
            o.entry.role,
            Some(Role::User),
            "a posted message is a user message"
        );
        assert_eq!(
            o.committed.first(),
            Some(&o.entry),
            "the original's committed entries start with the message"
        );
        for r in ok.iter().filter(|p| p.replayed) {
            assert_eq!(
                r.entry, o.entry,
                "I3: a retry of {:?} returns the original entry (same seq)",
                a.content
            );
            assert_eq!(
                r.disposition, o.disposition,
                "I3: a retry of {:?} returns the original disposition",
                a.content
            );
            assert!(r.committed.is_empty(), "I3: a retry commits nothing");
            assert!(
                r.lease.is_none() && r.cancel.is_none(),
                "I3: a retry has no side effects"
            );
        }
        stored.push((a, o));
    }

    // I1: every log is 1..=n; every stored message is in it once, at its
    // acknowledged seq, and no rejected one is; the first started the turn
    // (whatever its policy) and the rest queued, in seq order with positions
    // 1, 2, 3 …; every rejection named that turn.
    for &id in &ids {
        let log = f.log(id).await;
        let mut mine: Vec<&Posted> = stored
            .iter()
            .filter(|(a, _)| a.session == id)
            .map(|(_, p)| *p)
            .collect();
        mine.sort_by_key(|p| p.entry.seq);
        let users = log.iter().filter(|e| e.role == Some(Role::User)).count();
        assert_eq!(
            users,
            mine.len(),
            "I3: session {id} stores exactly the acknowledged messages"
        );
        for p in &mine {
            assert_eq!(
                log.get((p.entry.seq - 1) as usize),
                Some(&p.entry),
                "the log holds the acknowledged entry at its seq"
            );
            let copies = log.iter().filter(|e| e.content == p.entry.content).count();
            assert_eq!(
                copies, 1,
                "I3: {:?} is stored {copies} times",
                p.entry.content
            );
        }
        assert_eq!(
            log.len(),
            mine.len() + 1,
            "the log is the messages plus one turn_started"
        );
        let first = mine[0];
        assert_eq!(first.entry.seq, 1, "the first message is entry 1");
        assert_eq!(
            first.disposition.kind,
            DispositionType::Started,
            "the first message starts the turn"
        );
        let turn = first.disposition.turn_id.expect("started names the turn");
        assert_eq!(
            log[1].kind,
            EntryType::TurnStarted,
            "entry 2 is the turn start"
        );
        assert_eq!(log[1].turn_id, Some(turn));
        assert_eq!(log[1].input, Some(InputRange { from: 1, to: 1 }));
        for (i, p) in mine.iter().enumerate().skip(1) {
            assert_eq!(
                p.disposition.kind,
                DispositionType::Queued,
                "later messages queue behind the turn"
            );
            assert_eq!(
                p.disposition.position,
                Some(i as u64),
                "queue positions follow seq order without gaps (seq {})",
                p.entry.seq
            );
        }
        for a in acks.iter().filter(|a| a.session == id) {
            for r in &a.attempts {
                if let Err(StoreError::SessionBusy { turn_id }) = r {
                    assert_eq!(*turn_id, turn, "a rejection names the active turn");
                    assert!(
                        !log.iter()
                            .any(|e| e.content.as_deref() == Some(a.content.as_str())),
                        "a rejected message is never stored"
                    );
                }
            }
        }
        assert_eq!(f.view(id).await.queued, (mine.len() - 1) as u64);
    }
    let rejected = acks
        .iter()
        .filter(|a| a.attempts.iter().all(Result::is_err))
        .count();
    let reject_asked = acks
        .iter()
        .filter(|a| a.policy == Some(Policy::Reject))
        .count();
    assert!(
        rejected <= reject_asked && rejected + SESSIONS >= reject_asked,
        "only a session's very first message may be stored despite asking for reject \
         ({rejected} of {reject_asked} rejected)"
    );
    f.cleanup().await;
}

// ---------------------------------------------------------------------------
// 2. Idempotency conflicts

/// The same key with a different content or a different policy override is
/// `IdempotencyConflict` and stores nothing; keys are scoped per session.
pub async fn idempotency_conflicts_store_nothing<Fut: Future<Output = SharedStore>>(
    open: impl Fn(StoreConfig) -> Fut,
) {
    let _g = shared().await;
    let f = Fixture::open(open, base_config()).await;
    let id = f.session(Policy::Queue).await;
    let keyed = |content: &str, policy: Option<Policy>, key: &str| PostMessage {
        policy,
        idempotency_key: Some(key.to_owned()),
        ..f.msg(id, content)
    };

    let first = f.post(keyed("hello", None, "k1")).await;
    assert!(!first.replayed);
    assert_eq!(first.entry.seq, 1);
    let last = f.last_seq(id).await;

    expect_err!(
        f.store
            .post_message(keyed("hello, changed", None, "k1"))
            .await,
        StoreError::IdempotencyConflict,
        "same key, different content"
    );
    expect_err!(
        f.store
            .post_message(keyed("hello", Some(Policy::Merge), "k1"))
            .await,
        StoreError::IdempotencyConflict,
        "same key, different policy override"
    );
    expect_err!(
        f.store
            .post_message(keyed("hello", Some(Policy::Queue), "k1"))
            .await,
        StoreError::IdempotencyConflict,
        "same key, an explicit policy where the original had none"
    );
    assert_eq!(f.last_seq(id).await, last, "a conflict stores nothing");

    let again = f.post(keyed("hello", None, "k1")).await;
    assert!(again.replayed, "the conflicts did not disturb the original");
    assert_eq!(again.entry, first.entry);
    assert_eq!(again.disposition, first.disposition);

    // While busy: a queued message with an explicit policy.
    let q = f.post(keyed("later", Some(Policy::Queue), "k2")).await;
    assert_eq!(q.disposition.kind, DispositionType::Queued);
    expect_err!(
        f.store.post_message(keyed("later", None, "k2")).await,
        StoreError::IdempotencyConflict,
        "same key, override dropped"
    );
    expect_err!(
        f.store
            .post_message(keyed("later", Some(Policy::Interrupt), "k2"))
            .await,
        StoreError::IdempotencyConflict,
        "same key, override changed"
    );
    let q2 = f.post(keyed("later", Some(Policy::Queue), "k2")).await;
    assert!(q2.replayed);
    assert_eq!((q2.entry.seq, q2.disposition), (q.entry.seq, q.disposition));
    assert_eq!(
        f.last_seq(id).await,
        q.entry.seq,
        "nothing stored by the conflicts"
    );
    assert_eq!(
        f.view(id).await.queued,
        1,
        "the conflicts did not queue anything"
    );
    assert_eq!(
        f.store
            .renew_lease(&first.lease.clone().expect("the first post took the lease"))
            .await
            .expect("renew")
            .cancel,
        None,
        "the conflicting interrupt did not ask the turn to cancel"
    );

    // Keys are per session: the same key elsewhere is a new message.
    let other = f.session(Policy::Queue).await;
    let elsewhere = f
        .post(PostMessage {
            idempotency_key: Some("k1".to_owned()),
            ..f.msg(other, "another body")
        })
        .await;
    assert!(
        !elsewhere.replayed,
        "an idempotency key is scoped to its session"
    );
    assert_eq!(elsewhere.entry.seq, 1);

    let log = f.log(id).await;
    assert!(
        log.iter()
            .all(|e| !matches!(e.content.as_deref(), Some("hello, changed"))),
        "a conflicting body must never be stored"
    );
    f.log(other).await;
    f.cleanup().await;
}

// ---------------------------------------------------------------------------
// 3. Idempotent session creation

/// Sixteen concurrent creates with one owner and key give one session, created
/// once; a different body is a conflict; another owner's key is its own.
pub async fn concurrent_creates_return_one_session<Fut: Future<Output = SharedStore>>(
    open: impl Fn(StoreConfig) -> Fut,
) {
    let _g = shared().await;
    let f = Fixture::open(open, base_config()).await;
    let key = unique("create-key");
    let req = CreateSession {
        idempotency_key: Some(key.clone()),
        fingerprint: r#"{"message":"first"}"#.to_owned(),
        message: Some("first".to_owned()),
        ..f.create_req(Policy::Queue)
    };
    let results = futures_util::future::join_all((0..16).map(|_| {
        let (store, req) = (f.store.clone(), req.clone());
        tokio::spawn(async move { store.create_session(req).await })
    }))
    .await;
    let results: Vec<baton_store::Created> = results
        .into_iter()
        .map(|r| {
            r.expect("a create task panicked")
                .expect("an idempotent create")
        })
        .collect();
    let id = results[0].session.id;
    assert!(
        results.iter().all(|c| c.session.id == id),
        "I3: every concurrent create returns the one session"
    );
    let winners: Vec<&baton_store::Created> = results.iter().filter(|c| c.created).collect();
    assert_eq!(
        winners.len(),
        1,
        "I3: exactly one concurrent create creates"
    );
    let w = winners[0];
    assert_eq!(
        w.committed.len(),
        2,
        "the creating call commits the message and the turn start"
    );
    assert_eq!(w.committed[0].content.as_deref(), Some("first"));
    assert_eq!(w.committed[0].seq, 1, "the create's message is entry 1");
    assert_eq!(w.committed[1].kind, EntryType::TurnStarted);
    assert_eq!(w.committed[1].input, Some(InputRange { from: 1, to: 1 }));
    let lease = w
        .lease
        .clone()
        .expect("the first turn's lease goes to the creating node");
    assert_eq!(lease.owner, f.node);
    for c in results.iter().filter(|c| !c.created) {
        assert!(c.committed.is_empty(), "a repeated create commits nothing");
        assert!(c.lease.is_none(), "a repeated create takes no lease");
    }
    let log = f.log(id).await;
    assert_eq!(
        log.len(),
        2,
        "one message and one turn start, whatever the number of creates"
    );
    assert_eq!(
        f.store.sessions(&f.owner).await.expect("sessions()").len(),
        1
    );

    let changed = CreateSession {
        fingerprint: r#"{"message":"second"}"#.to_owned(),
        message: Some("second".to_owned()),
        ..req.clone()
    };
    expect_err!(
        f.store.create_session(changed).await,
        StoreError::IdempotencyConflict,
        "same owner and key, different body"
    );
    assert_eq!(
        f.store.sessions(&f.owner).await.expect("sessions()").len(),
        1,
        "a conflict creates nothing"
    );
    assert_eq!(f.log(id).await, log, "a conflict writes nothing");

    let again = f
        .store
        .create_session(req.clone())
        .await
        .expect("a later retry");
    assert!(!again.created);
    assert_eq!(again.session.id, id);

    let g = Fixture::on(f.store.clone());
    let theirs = g
        .store
        .create_session(CreateSession {
            owner: g.owner.clone(),
            ..req.clone()
        })
        .await
        .expect("the same key for another owner");
    assert!(theirs.created, "idempotency keys are scoped per owner");
    assert_ne!(theirs.session.id, id);
    assert_eq!(theirs.session.owner, g.owner);

    // A session is found by its owner and key, and by nobody else.
    let found = f
        .store
        .session_by_key(&f.owner, &key)
        .await
        .expect("by key");
    assert_eq!(found.map(|s| s.id), Some(id));
    let found = g
        .store
        .session_by_key(&g.owner, &key)
        .await
        .expect("by key");
    assert_eq!(found.map(|s| s.id), Some(theirs.session.id));
    let none = f
        .store
        .session_by_key(&f.owner, &unique("never-used"))
        .await
        .expect("by key");
    assert!(none.is_none(), "an unused key names no session");

    let a = f.session(Policy::Queue).await;
    let b = f.session(Policy::Queue).await;
    assert_ne!(a, b, "creates without a key are independent");
    f.cleanup().await;
    g.cleanup().await;
}

// ---------------------------------------------------------------------------
// 4. Owner isolation

/// Another owner's session answers `NotFound` exactly like a session that does
/// not exist, and nothing they try changes it (I10).
pub async fn sessions_are_isolated_by_owner<Fut: Future<Output = SharedStore>>(
    open: impl Fn(StoreConfig) -> Fut,
) {
    let _g = shared().await;
    let a = Fixture::open(open, base_config()).await;
    let b = Fixture::on(a.store.clone());
    let id = a.session(Policy::Queue).await;
    let (_, _, lease) = a.start(id, "private").await;
    let before = a.log(id).await;
    let b_own = b.session(Policy::Queue).await;
    let missing = SessionId::new();

    for target in [id, missing] {
        let what = if target == id {
            "another owner's session"
        } else {
            "a session that does not exist"
        };
        expect_err!(
            b.store.session(&b.owner, target).await,
            StoreError::NotFound,
            "session() of {what}"
        );
        expect_err!(
            b.store.post_message(b.msg(target, "intrusion")).await,
            StoreError::NotFound,
            "post_message to {what}"
        );
        expect_err!(
            b.store
                .post_message(PostMessage {
                    idempotency_key: Some("k".to_owned()),
                    ..b.msg(target, "intrusion")
                })
                .await,
            StoreError::NotFound,
            "keyed post_message to {what}"
        );
        expect_err!(
            b.store
                .request_cancel(&b.owner, target, "intrusion", None)
                .await,
            StoreError::NotFound,
            "request_cancel of {what}"
        );
        expect_err!(
            b.store.delete_session(&b.owner, target).await,
            StoreError::NotFound,
            "delete_session of {what}"
        );
    }

    assert_eq!(
        a.log(id).await,
        before,
        "I10: another owner's attempts changed nothing"
    );
    let renewal = a
        .store
        .renew_lease(&lease)
        .await
        .expect("the owner's lease is intact");
    assert_eq!(
        renewal.cancel, None,
        "I10: another owner's cancel did not reach the turn"
    );
    let listed: Vec<SessionId> = a
        .store
        .sessions(&a.owner)
        .await
        .expect("sessions()")
        .iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(listed, vec![id], "sessions(owner) lists exactly one's own");
    let theirs = b.store.sessions(&b.owner).await.expect("sessions()");
    assert_eq!(theirs.iter().map(|s| s.id).collect::<Vec<_>>(), vec![b_own]);
    assert!(theirs.iter().all(|s| s.owner == b.owner));
    a.cleanup().await;
    b.cleanup().await;
}

// ---------------------------------------------------------------------------
// 5. Busy policies

/// An idle post starts a turn; while busy, reject refuses and stores nothing,
/// queue answers positions 1, 2, 3, merge merges, interrupt asks the active
/// turn to cancel (seen by the lease holder) and the next turn takes all.
pub async fn busy_policies_apply_atomically<Fut: Future<Output = SharedStore>>(
    open: impl Fn(StoreConfig) -> Fut,
) {
    let _g = shared().await;
    let f = Fixture::open(open, base_config()).await;
    let id = f.session(Policy::Queue).await;

    let (p, t1, lease) = f.start(id, "m1").await;
    assert_eq!(p.entry.seq, 1);
    assert_eq!(p.cancel, None);
    assert_eq!(
        p.committed.len(),
        2,
        "the message and its turn start commit together"
    );
    let ts = &p.committed[1];
    assert_eq!(
        (ts.seq, ts.kind, ts.turn_id),
        (2, EntryType::TurnStarted, Some(t1))
    );
    assert_eq!(
        ts.input,
        Some(InputRange { from: 1, to: 1 }),
        "the turn consumes exactly the message"
    );
    let log = f.log(id).await;
    assert_eq!(log, p.committed, "what was committed is what is stored");

    expect_err!(
        f.store.post_message(f.msg_with(id, "rejected", Policy::Reject)).await,
        StoreError::SessionBusy { turn_id } if turn_id == t1,
        "reject while busy names the active turn"
    );
    assert_eq!(f.last_seq(id).await, 2, "a rejected message is not stored");

    let mut seqs = Vec::new();
    for (i, content) in ["q1", "q2", "q3"].into_iter().enumerate() {
        let q = f.post(f.msg_with(id, content, Policy::Queue)).await;
        assert_eq!(q.disposition.kind, DispositionType::Queued);
        assert_eq!(
            q.disposition.position,
            Some(i as u64 + 1),
            "queue positions count from 1"
        );
        assert_eq!(q.disposition.turn_id, None);
        assert_eq!(
            q.committed,
            vec![q.entry.clone()],
            "a queued message commits only itself"
        );
        assert!(q.lease.is_none() && q.cancel.is_none());
        seqs.push(q.entry.seq);
    }
    let m = f.post(f.msg_with(id, "merged", Policy::Merge)).await;
    assert_eq!(m.disposition.kind, DispositionType::Merged);
    assert!(m.cancel.is_none());
    let q4 = f.post(f.msg(id, "q4")).await;
    assert_eq!(
        q4.disposition.kind,
        DispositionType::Queued,
        "the session's default policy applies"
    );
    assert_eq!(
        q4.disposition.position,
        Some(2),
        "after a merge, everything before it is one turn"
    );

    let renewal = f.store.renew_lease(&lease).await.expect("renew");
    assert_eq!(renewal.cancel, None, "nothing asked the turn to cancel yet");
    let i = f.post(f.msg_with(id, "interrupt", Policy::Interrupt)).await;
    assert_eq!(i.disposition.kind, DispositionType::Interrupting);
    assert_eq!(
        i.disposition.turn_id,
        Some(t1),
        "interrupting names the turn being cancelled"
    );
    assert_eq!(i.cancel, Some(t1), "the post reports the turn to wake up");
    let renewal = f
        .store
        .renew_lease(&lease)
        .await
        .expect("renew after an interrupt");
    match renewal.cancel {
        Some((turn, reason)) => {
            assert_eq!(turn, t1, "the cancel is for the active turn");
            assert!(!reason.is_empty(), "a cancel carries a reason");
        }
        None => panic!("the lease holder must learn of the interrupt on renewal"),
    }
    let v = f.view(id).await;
    assert_eq!(v.status, SessionStatus::Running);
    assert_eq!(v.queued, 6, "q1 q2 q3 merged q4 interrupt are waiting");

    // The interrupted turn ends; the next one takes every waiting message.
    let begin = f.store.begin_turn(&lease, t1).await.expect("begin_turn");
    assert!(
        matches!(begin, Begin::Cancelled(_)),
        "a turn interrupted while starting never runs: {begin:?}"
    );
    let ended = f
        .end(&lease, t1, TurnStatus::Cancelled, Some("interrupted"))
        .await;
    let t2 = ended
        .next
        .expect("waiting messages start the next turn in the same transaction");
    let next = ended
        .committed
        .last()
        .expect("the next turn's start is committed");
    assert_eq!(next.kind, EntryType::TurnStarted);
    assert_eq!(next.turn_id, Some(t2));
    assert_eq!(
        next.input,
        Some(InputRange {
            from: seqs[0],
            to: i.entry.seq
        }),
        "after an interrupt the next turn takes every message waiting"
    );
    let run = f
        .store
        .next_turn(&lease)
        .await
        .expect("next_turn")
        .expect("the next turn waits to start");
    let contents: Vec<&str> = run
        .inputs
        .iter()
        .filter_map(|e| e.content.as_deref())
        .collect();
    assert_eq!(contents, ["q1", "q2", "q3", "merged", "q4", "interrupt"]);
    f.log(id).await;
    f.cleanup().await;
}

/// Past the queue's capacity every accepting policy is `QueueFull` and stores
/// nothing (reject is still `SessionBusy`); the refused key stays unused.
pub async fn queue_capacity_refuses_without_storing<Fut: Future<Output = SharedStore>>(
    open: impl Fn(StoreConfig) -> Fut,
) {
    let _g = shared().await;
    let f = Fixture::open(
        open,
        StoreConfig {
            queue_capacity: 2,
            ..base_config()
        },
    )
    .await;
    let id = f.session(Policy::Queue).await;
    let (_, t1, lease) = f.start(id, "m1").await;
    f.post(f.msg(id, "q1")).await;
    f.post(f.msg(id, "q2")).await;
    let last = f.last_seq(id).await;
    for policy in [Policy::Queue, Policy::Merge, Policy::Interrupt] {
        let req = PostMessage {
            idempotency_key: Some("refused".to_owned()),
            ..f.msg_with(id, "one too many", policy)
        };
        expect_err!(
            f.store.post_message(req).await,
            StoreError::QueueFull { capacity: 2 },
            "a {policy} message past the capacity"
        );
    }
    expect_err!(
        f.store
            .post_message(f.msg_with(id, "busy", Policy::Reject))
            .await,
        StoreError::SessionBusy { .. },
        "reject on a full queue"
    );
    assert_eq!(
        f.last_seq(id).await,
        last,
        "nothing stored past the capacity"
    );
    let renewal = f.store.renew_lease(&lease).await.expect("renew");
    assert_eq!(renewal.cancel, None, "a refused interrupt cancels nothing");
    assert_eq!(f.view(id).await.queued, 2);

    // The running turn's input does not count: once q1 is consumed there is room.
    assert_eq!(
        f.store.begin_turn(&lease, t1).await.expect("begin"),
        Begin::Run
    );
    let ended = f.end(&lease, t1, TurnStatus::Completed, None).await;
    assert!(ended.next.is_some());
    let ok = f
        .post(PostMessage {
            idempotency_key: Some("refused".to_owned()),
            ..f.msg(id, "one too many")
        })
        .await;
    assert!(!ok.replayed, "a refused message's key was never used");
    assert_eq!(ok.disposition.position, Some(2));
    f.log(id).await;
    f.cleanup().await;
}

// ---------------------------------------------------------------------------
// 6. Turn execution

/// A lease holder runs turns: next_turn, begin_turn, append_output, end_turn
/// (which starts the next planned turn atomically); an ended turn accepts
/// nothing more (I8) and stays ended.
pub async fn turns_run_under_a_lease<Fut: Future<Output = SharedStore>>(
    open: impl Fn(StoreConfig) -> Fut,
) {
    let _g = shared().await;
    let f = Fixture::open(open, base_config()).await;
    let id = f.session(Policy::Queue).await;
    let (_, t1, lease) = f.start(id, "m1").await;

    let run = f
        .store
        .next_turn(&lease)
        .await
        .expect("next_turn")
        .expect("a starting turn");
    assert_eq!(run.turn.id, t1);
    assert_eq!(run.turn.status, TurnStatus::Starting);
    assert_eq!(run.turn.input, InputRange { from: 1, to: 1 });
    assert_eq!(run.agent, f.agent);
    assert_eq!(run.inputs.len(), 1);
    assert_eq!(
        (run.inputs[0].seq, run.inputs[0].content.as_deref()),
        (1, Some("m1"))
    );
    assert_eq!(
        f.store.begin_turn(&lease, t1).await.expect("begin_turn"),
        Begin::Run
    );
    assert!(
        f.store
            .next_turn(&lease)
            .await
            .expect("next_turn")
            .is_none(),
        "a running turn is not handed out again"
    );
    expect_err!(
        f.store.begin_turn(&lease, t1).await,
        StoreError::TurnNotActive { .. },
        "begin_turn twice"
    );
    assert_eq!(f.turns(id).await[0].status, TurnStatus::Running);

    let q = f.post(f.msg_with(id, "q", Policy::Queue)).await;
    let m = f.post(f.msg_with(id, "mg", Policy::Merge)).await;
    let tool = ToolInfo {
        id: "call-1".to_owned(),
        name: Some("grep".to_owned()),
        arguments: Some(serde_json::json!({"pattern": "x"})),
    };
    let request = PermissionInfo::request(
        Some("call-1".to_owned()),
        Some("grep".to_owned()),
        vec![PermissionOptionInfo {
            option_id: "ok".to_owned(),
            name: "Allow once".to_owned(),
            kind: "allow_once".to_owned(),
        }],
    );
    let decision = request.decision(Some("ok".to_owned()), "policy");
    let out = f
        .store
        .append_output(
            &lease,
            t1,
            vec![
                NewEntry::assistant_message(t1, "a1"),
                NewEntry::tool_call(t1, tool.clone()),
                NewEntry::permission_request(t1, request.clone()),
                NewEntry::permission_decision(t1, decision.clone()),
                NewEntry::thought(t1, "it should be there"),
                NewEntry::tool_result(t1, "call-1".to_owned(), "found"),
            ],
        )
        .await
        .expect("append_output of the running turn");
    assert_eq!(
        out.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [5, 6, 7, 8, 9, 10],
        "output is appended in order after the messages"
    );
    assert!(out.iter().all(|e| e.turn_id == Some(t1)));
    assert_eq!(out[0].role, Some(Role::Assistant));
    assert_eq!(out[1].tool.as_ref(), Some(&tool), "tool calls round-trip");
    assert_eq!(
        out[2].permission.as_ref(),
        Some(&request),
        "permission requests round-trip"
    );
    assert_eq!(out[3].permission.as_ref(), Some(&decision));
    assert_eq!(
        (out[4].kind, out[4].content.as_deref()),
        (EntryType::Thought, Some("it should be there"))
    );
    let read = f.log(id).await;
    assert_eq!(&read[4..10], &out[..], "read back as written");

    let ended = f.end(&lease, t1, TurnStatus::Completed, None).await;
    assert_eq!(
        ended.committed.len(),
        2,
        "turn_ended and the next turn_started"
    );
    assert!(ended_entry(&ended.committed[0], t1, TurnStatus::Completed));
    assert_eq!(ended.committed[0].seq, 11);
    let t2 = ended
        .next
        .expect("waiting messages start the next turn at once");
    assert_eq!(ended.committed[1].turn_id, Some(t2));
    assert_eq!(
        ended.committed[1].input,
        Some(InputRange {
            from: q.entry.seq,
            to: m.entry.seq
        }),
        "a merge message takes the queued one before it into one turn"
    );
    let turns = f.turns(id).await;
    assert_eq!(
        turns.iter().map(|t| (t.id, t.status)).collect::<Vec<_>>(),
        [(t1, TurnStatus::Completed), (t2, TurnStatus::Starting)]
    );

    // I8 at the store: the ended turn takes nothing more; ended is absorbing.
    let last = f.last_seq(id).await;
    expect_err!(
        f.store.append_output(&lease, t1, vec![NewEntry::assistant_message(t1, "late")]).await,
        StoreError::TurnNotActive { turn_id } if turn_id == t1,
        "append_output after the turn ended"
    );
    expect_err!(
        f.store
            .end_turn(&lease, t1, TurnStatus::Cancelled, None, vec![NewEntry::turn_ended(t1, TurnStatus::Cancelled, None)])
            .await,
        StoreError::TurnNotActive { turn_id } if turn_id == t1,
        "a second end_turn"
    );
    expect_err!(
        f.store.begin_turn(&lease, t1).await,
        StoreError::TurnNotActive { .. },
        "begin_turn of an ended turn"
    );
    assert_eq!(
        f.last_seq(id).await,
        last,
        "I8: nothing of an ended turn is stored"
    );
    assert_eq!(
        f.turns(id).await[0].status,
        TurnStatus::Completed,
        "ended is absorbing"
    );

    f.store
        .set_agent_session(&lease, "agent-conv-1")
        .await
        .expect("set_agent_session");
    let run = f
        .store
        .next_turn(&lease)
        .await
        .expect("next_turn")
        .expect("t2 waits to start");
    assert_eq!(run.turn.id, t2);
    assert_eq!(run.agent_session.as_deref(), Some("agent-conv-1"));
    let contents: Vec<&str> = run
        .inputs
        .iter()
        .filter_map(|e| e.content.as_deref())
        .collect();
    assert_eq!(contents, ["q", "mg"]);
    assert_eq!(
        f.store.begin_turn(&lease, t2).await.expect("begin t2"),
        Begin::Run
    );
    let q3 = f.post(f.msg(id, "q3")).await;
    assert_eq!(q3.disposition.position, Some(1));
    let ended = f.end(&lease, t2, TurnStatus::Failed, Some("boom")).await;
    let t3 = ended.next.expect("a failed turn's queue goes on");
    assert_eq!(ended.committed[0].reason.as_deref(), Some("boom"));
    assert_eq!(
        ended.committed[1].input,
        Some(InputRange {
            from: q3.entry.seq,
            to: q3.entry.seq
        })
    );
    assert_eq!(
        f.store.begin_turn(&lease, t3).await.expect("begin t3"),
        Begin::Run
    );
    let ended = f.end(&lease, t3, TurnStatus::Completed, None).await;
    assert_eq!(ended.next, None, "nothing waits: no next turn");
    assert_eq!(ended.committed.len(), 1);
    let v = f.view(id).await;
    assert_eq!(
        (v.status, v.turn_id, v.queued),
        (SessionStatus::Idle, None, 0)
    );
    let turns = f.turns(id).await;
    assert_eq!(
        turns.iter().map(|t| t.status).collect::<Vec<_>>(),
        [
            TurnStatus::Completed,
            TurnStatus::Failed,
            TurnStatus::Completed
        ]
    );
    assert_eq!(turns[1].reason.as_deref(), Some("boom"));
    f.log(id).await;
    f.cleanup().await;
}

/// A cancel is durable and idempotent (the first reason sticks), a cancel of a
/// starting turn means it never runs, a cancel of a running turn is seen on
/// renewal, waiting messages are untouched, and an idle cancel is `None`.
pub async fn cancel_requests_are_durable_and_idempotent<Fut: Future<Output = SharedStore>>(
    open: impl Fn(StoreConfig) -> Fut,
) {
    let _g = shared().await;
    let f = Fixture::open(open, base_config()).await;
    let id = f.session(Policy::Queue).await;
    assert_eq!(
        f.store
            .request_cancel(&f.owner, id, "nothing", None)
            .await
            .expect("cancel when idle"),
        None
    );

    let (_, t1, lease) = f.start(id, "m1").await;
    assert_eq!(
        f.store
            .request_cancel(&f.owner, id, "first", None)
            .await
            .expect("cancel"),
        Some(t1)
    );
    assert_eq!(
        f.store
            .request_cancel(&f.owner, id, "second", None)
            .await
            .expect("cancel again"),
        Some(t1)
    );
    assert_eq!(
        f.store.renew_lease(&lease).await.expect("renew").cancel,
        Some((t1, "first".to_owned()))
    );
    assert_eq!(
        f.store.begin_turn(&lease, t1).await.expect("begin_turn"),
        Begin::Cancelled("first".to_owned()),
        "a turn cancelled while starting never runs; the first reason sticks"
    );
    assert_eq!(
        f.turns(id).await[0].status,
        TurnStatus::Starting,
        "begin_turn did not run it"
    );
    let ended = f
        .end(&lease, t1, TurnStatus::Cancelled, Some("first"))
        .await;
    assert_eq!(ended.next, None);
    assert_eq!(
        f.store
            .request_cancel(&f.owner, id, "late", None)
            .await
            .expect("cancel when idle"),
        None
    );
    assert_eq!(
        f.store.renew_lease(&lease).await.expect("renew").cancel,
        None
    );

    // The same node still holds the lease: the next turn is its to run.
    let p = f.post(f.msg(id, "m2")).await;
    assert_eq!(p.disposition.kind, DispositionType::Started);
    assert!(
        p.lease.is_none(),
        "the lease is still held, so no new lease is handed out"
    );
    let t2 = p.disposition.turn_id.expect("started names its turn");
    assert_eq!(
        f.store.begin_turn(&lease, t2).await.expect("begin"),
        Begin::Run
    );
    let waiting = f.post(f.msg(id, "waiting")).await;
    assert_eq!(
        f.store
            .request_cancel(&f.owner, id, "stop", None)
            .await
            .expect("cancel"),
        Some(t2)
    );
    assert_eq!(
        f.store.renew_lease(&lease).await.expect("renew").cancel,
        Some((t2, "stop".to_owned()))
    );
    let ended = f.end(&lease, t2, TurnStatus::Cancelled, Some("stop")).await;
    let t3 = ended
        .next
        .expect("a cancel ends the turn only: waiting messages run next");
    assert_eq!(
        ended.committed[1].input,
        Some(InputRange {
            from: waiting.entry.seq,
            to: waiting.entry.seq
        })
    );
    expect_err!(
        f.store
            .end_turn(
                &lease,
                t2,
                TurnStatus::Completed,
                None,
                vec![NewEntry::turn_ended(t2, TurnStatus::Completed, None)]
            )
            .await,
        StoreError::TurnNotActive { .. },
        "a late completion after a cancel"
    );
    let turns = f.turns(id).await;
    assert_eq!(
        turns[1].status,
        TurnStatus::Cancelled,
        "a late completion cannot overwrite cancelled"
    );
    assert_eq!(turns[1].reason.as_deref(), Some("stop"));
    assert_eq!(
        f.store.renew_lease(&lease).await.expect("renew").cancel,
        None,
        "the old turn's cancel does not leak into the next turn"
    );
    assert_eq!(
        f.store.begin_turn(&lease, t3).await.expect("begin t3"),
        Begin::Run
    );
    f.log(id).await;
    f.cleanup().await;
}

// ---------------------------------------------------------------------------
// 7. Fencing and recovery

/// After a takeover, every write of the old lease is `StaleEpoch` and writes
/// nothing (I4); the running turn of the vanished worker ended `lost` and the
/// queue went on under the new lease.
pub async fn stale_leases_are_fenced<Fut: Future<Output = SharedStore>>(
    open: impl Fn(StoreConfig) -> Fut,
) {
    let _g = exclusive().await;
    let f = Fixture::open(
        open,
        StoreConfig {
            lease_ttl: RACE_TTL,
            ..base_config()
        },
    )
    .await;
    let id = f.session(Policy::Queue).await;
    let (_, t1, old) = f.start(id, "m1").await;
    assert_eq!(
        f.store.begin_turn(&old, t1).await.expect("begin"),
        Begin::Run
    );
    f.store
        .append_output(&old, t1, vec![NewEntry::assistant_message(t1, "partial")])
        .await
        .expect("append before the takeover");
    let m2 = f.post(f.msg(id, "m2")).await;

    tokio::time::sleep(PAST_RACE_TTL).await;
    // Two nodes race to take it over: the loser re-checks under the lock and
    // finds a live lease.
    let (n1, n2) = (unique("node-takeover"), unique("node-takeover"));
    let (r1, r2) = tokio::join!(f.store.recover(&n1, false), f.store.recover(&n2, false));
    let r1 = recovered(&r1.expect("recover"), id);
    let r2 = recovered(&r2.expect("recover"), id);
    let (other, rec) = match (r1, r2) {
        (Some(r), None) => (n1, r),
        (None, Some(r)) => (n2, r),
        (a, b) => panic!(
            "I4: exactly one of two racing recovers must take an expired session over: {a:?} / {b:?}"
        ),
    };
    assert_eq!(rec.lease.owner, other);
    assert!(
        rec.lease.epoch > old.epoch,
        "a takeover bumps the fencing epoch"
    );
    assert_eq!(
        rec.committed.len(),
        2,
        "the lost end and the next turn's start: {:?}",
        rec.committed
    );
    assert!(
        ended_entry(&rec.committed[0], t1, TurnStatus::Lost),
        "a running turn of a vanished worker ends lost"
    );
    let t2 = rec.committed[1].turn_id.expect("the next turn starts");
    assert_eq!(rec.committed[1].kind, EntryType::TurnStarted);
    assert_eq!(
        rec.committed[1].input,
        Some(InputRange {
            from: m2.entry.seq,
            to: m2.entry.seq
        })
    );
    let last = f.last_seq(id).await;

    // The zombie writer is fenced off, whatever it tries.
    macro_rules! stale {
        ($e:expr, $what:literal) => {
            expect_err!($e, StoreError::StaleEpoch { epoch } if epoch == old.epoch, "I4: {} with a taken-over lease", $what)
        };
    }
    let late = |t: TurnId| vec![NewEntry::assistant_message(t, "zombie")];
    let end = |t: TurnId| vec![NewEntry::turn_ended(t, TurnStatus::Completed, None)];
    stale!(
        f.store.append_output(&old, t1, late(t1)).await,
        "append_output"
    );
    stale!(
        f.store.append_output(&old, t2, late(t2)).await,
        "append_output to the new turn"
    );
    stale!(
        f.store
            .end_turn(&old, t1, TurnStatus::Completed, None, end(t1))
            .await,
        "end_turn"
    );
    stale!(
        f.store
            .end_turn(&old, t2, TurnStatus::Completed, None, end(t2))
            .await,
        "end_turn of the new turn"
    );
    stale!(f.store.renew_lease(&old).await, "renew_lease");
    stale!(f.store.begin_turn(&old, t2).await, "begin_turn");
    stale!(f.store.next_turn(&old).await, "next_turn");
    stale!(
        f.store.set_agent_session(&old, "zombie").await,
        "set_agent_session"
    );
    stale!(f.store.release_lease(&old, false).await, "release_lease");
    stale!(
        f.store.release_lease(&old, true).await,
        "forced release_lease"
    );
    assert_eq!(
        f.last_seq(id).await,
        last,
        "I4: the stale lease wrote nothing"
    );

    let turns = f.turns(id).await;
    assert_eq!(turns[0].status, TurnStatus::Lost);
    assert!(turns[0].reason.is_some(), "a lost turn says why");
    assert_eq!(
        turns[1].status,
        TurnStatus::Starting,
        "the fenced begin_turn did not run the new turn"
    );

    // The new holder runs the queue on.
    let new = rec.lease;
    let run = f
        .store
        .next_turn(&new)
        .await
        .expect("next_turn")
        .expect("the next turn waits");
    assert_eq!(run.turn.id, t2);
    assert_eq!(
        f.store.begin_turn(&new, t2).await.expect("begin"),
        Begin::Run
    );

    // Its worker stalls as well, and the same node takes the session back:
    // the owner name is the same, so the epoch alone must fence the stalled
    // worker.
    tokio::time::sleep(PAST_RACE_TTL).await;
    let all = f.store.recover(&other, false).await.expect("recover");
    let again = recovered(&all, id).expect("the same node takes back its expired session");
    assert_eq!(again.lease.owner, new.owner);
    assert!(
        again.lease.epoch > new.epoch,
        "a takeover bumps the epoch, even by the same node"
    );
    assert_eq!(
        again.committed.len(),
        1,
        "the running turn ends lost; nothing waits"
    );
    assert!(ended_entry(&again.committed[0], t2, TurnStatus::Lost));
    let last = f.last_seq(id).await;
    for (what, result) in [
        (
            "append_output",
            f.store.append_output(&new, t2, late(t2)).await.map(drop),
        ),
        (
            "end_turn",
            f.store
                .end_turn(&new, t2, TurnStatus::Completed, None, end(t2))
                .await
                .map(drop),
        ),
        ("renew_lease", f.store.renew_lease(&new).await.map(drop)),
        (
            "release_lease",
            f.store.release_lease(&new, false).await.map(drop),
        ),
    ] {
        expect_err!(
            result,
            StoreError::StaleEpoch { epoch } if epoch == new.epoch,
            "I4: {what} with a lease its own node took back"
        );
    }
    assert_eq!(
        f.last_seq(id).await,
        last,
        "I4: the same-owner stale lease wrote nothing"
    );
    assert!(f
        .store
        .release_lease(&again.lease, false)
        .await
        .expect("release when idle"));
    let log = f.log(id).await;
    assert!(
        !log.iter().any(|e| e.content.as_deref() == Some("zombie")),
        "I4: no zombie output stored"
    );
    f.cleanup().await;
}

/// A `starting` turn whose worker vanished is handed over, not ended (the new
/// holder can begin it); one that is handed over more than `max_recoveries`
/// times ends `failed` and the queue goes on.
pub async fn starting_turns_are_handed_over_then_failed<Fut: Future<Output = SharedStore>>(
    open: impl Fn(StoreConfig) -> Fut,
) {
    const MAX: i64 = 2;
    let _g = exclusive().await;
    let f = Fixture::open(
        open,
        StoreConfig {
            lease_ttl: SHORT_TTL,
            max_recoveries: MAX,
            ..base_config()
        },
    )
    .await;

    // Handed over once, then run by the new holder.
    let a = f.session(Policy::Queue).await;
    let (_, ta, old_a) = f.start(a, "a1").await;
    // Handed over until it fails.
    let b = f.session(Policy::Queue).await;
    let (_, tb, mut lease_b) = f.start(b, "b1").await;
    let b2 = f.post(f.msg(b, "b2")).await;

    tokio::time::sleep(PAST_TTL).await;
    let node = unique("node-handover");
    let all = f.store.recover(&node, false).await.expect("recover");
    let ra = recovered(&all, a).expect("an expired starting turn's session is taken over");
    assert!(
        ra.committed.is_empty(),
        "a starting turn is handed over, not ended: {:?}",
        ra.committed
    );
    assert!(ra.lease.epoch > old_a.epoch);
    let run = f
        .store
        .next_turn(&ra.lease)
        .await
        .expect("next_turn")
        .expect("the handed-over turn");
    assert_eq!(run.turn.id, ta);
    assert_eq!(run.turn.status, TurnStatus::Starting);
    expect_err!(
        f.store.begin_turn(&old_a, ta).await,
        StoreError::StaleEpoch { .. },
        "begin_turn with the lease before the handover"
    );
    assert_eq!(
        f.store.begin_turn(&ra.lease, ta).await.expect("begin"),
        Begin::Run,
        "the new holder runs it"
    );
    f.end(&ra.lease, ta, TurnStatus::Completed, None).await;
    assert!(f
        .store
        .release_lease(&ra.lease, false)
        .await
        .expect("release"));
    f.log(a).await;

    let rb = recovered(&all, b).expect("both expired sessions are taken over");
    assert!(rb.committed.is_empty());
    assert!(rb.lease.epoch > lease_b.epoch);
    lease_b = rb.lease;
    for round in 2..=MAX + 1 {
        tokio::time::sleep(PAST_TTL).await;
        let node = unique("node-handover");
        let all = f.store.recover(&node, false).await.expect("recover");
        let rb = recovered(&all, b)
            .unwrap_or_else(|| panic!("round {round}: the expired session is taken over again"));
        assert!(
            rb.lease.epoch > lease_b.epoch,
            "every takeover bumps the epoch"
        );
        lease_b = rb.lease;
        if round <= MAX {
            assert!(
                rb.committed.is_empty(),
                "round {round}: still handed over ({MAX} allowed)"
            );
            assert_eq!(f.turns(b).await[0].status, TurnStatus::Starting);
        } else {
            assert_eq!(
                rb.committed.len(),
                2,
                "round {round}: the failed end and the next start: {:?}",
                rb.committed
            );
            assert!(
                ended_entry(&rb.committed[0], tb, TurnStatus::Failed),
                "recovery is bounded: the turn ends failed"
            );
            assert_eq!(rb.committed[1].kind, EntryType::TurnStarted);
            assert_eq!(
                rb.committed[1].input,
                Some(InputRange {
                    from: b2.entry.seq,
                    to: b2.entry.seq
                })
            );
        }
    }
    let turns = f.turns(b).await;
    assert_eq!(turns[0].status, TurnStatus::Failed);
    assert!(turns[0].reason.is_some(), "a failed turn says why");
    let run = f
        .store
        .next_turn(&lease_b)
        .await
        .expect("next_turn")
        .expect("the queue goes on");
    assert_eq!(
        f.store
            .begin_turn(&lease_b, run.turn.id)
            .await
            .expect("begin"),
        Begin::Run
    );
    f.end(&lease_b, run.turn.id, TurnStatus::Completed, None)
        .await;
    assert!(f
        .store
        .release_lease(&lease_b, false)
        .await
        .expect("release"));
    f.log(b).await;
    f.cleanup().await;
}

/// `recover(node, false)` leaves live leases alone; `recover(node, true)` (the
/// embedded store at start-up) takes over every session another node holds,
/// even unexpired, but never its own.
pub async fn all_foreign_recovery_takes_unexpired_leases<Fut: Future<Output = SharedStore>>(
    open: impl Fn(StoreConfig) -> Fut,
) {
    let _g = exclusive().await;
    let f = Fixture::open(open, base_config()).await;
    let id = f.session(Policy::Queue).await;
    let (_, t1, old) = f.start(id, "m1").await;
    assert_eq!(
        f.store.begin_turn(&old, t1).await.expect("begin"),
        Begin::Run
    );

    // The worker stored two tool calls and answered one before it vanished.
    let call = |id: &str| {
        NewEntry::tool_call(
            t1,
            ToolInfo {
                id: id.to_owned(),
                name: Some("grep".to_owned()),
                arguments: None,
            },
        )
    };
    f.store
        .append_output(
            &old,
            t1,
            vec![
                call("answered"),
                call("open"),
                NewEntry::tool_result(t1, "answered".to_owned(), "ok"),
            ],
        )
        .await
        .expect("append_output");

    let other = unique("node-restarted");
    let all = f.store.recover(&other, false).await.expect("recover");
    assert!(
        recovered(&all, id).is_none(),
        "an unexpired lease is not taken over"
    );
    let all = f.store.recover(&f.node, true).await.expect("recover");
    assert!(
        recovered(&all, id).is_none(),
        "all_foreign never takes a node's own session"
    );
    f.store
        .renew_lease(&old)
        .await
        .expect("the lease is untouched");

    let all = f
        .store
        .recover(&other, true)
        .await
        .expect("recover all foreign");
    let rec = recovered(&all, id).expect("all_foreign takes over an unexpired foreign lease");
    assert_eq!(rec.lease.owner, other);
    assert!(rec.lease.epoch > old.epoch);
    assert_eq!(
        rec.committed.len(),
        2,
        "the open call is closed, the running turn ends lost; nothing waits"
    );
    let closed = &rec.committed[0];
    assert_eq!(
        (
            closed.kind,
            closed.tool.as_ref().map(|t| t.id.as_str()),
            closed.status
        ),
        (EntryType::ToolResult, Some("open"), Some(TurnStatus::Lost)),
        "the open call gets a result carrying the turn's status"
    );
    assert_eq!(closed.reason, rec.committed[1].reason);
    assert_eq!(
        closed.created_at, rec.committed[1].created_at,
        "in the recovery's transaction"
    );
    assert!(ended_entry(&rec.committed[1], t1, TurnStatus::Lost));
    expect_err!(
        f.store.renew_lease(&old).await,
        StoreError::StaleEpoch { .. },
        "renew_lease of the taken-over lease"
    );
    let v = f.view(id).await;
    assert_eq!(v.status, SessionStatus::Idle);
    assert!(f
        .store
        .release_lease(&rec.lease, false)
        .await
        .expect("release"));
    f.log(id).await;
    f.cleanup().await;
}

/// `release_lease(_, false)` refuses while a turn is active and frees the
/// lease when idle; a freed lease is dead and the next started turn hands out
/// a new one; a held lease is not handed to another node; a forced release
/// leaves the active turn for `recover` at once.
pub async fn release_lease_only_when_idle<Fut: Future<Output = SharedStore>>(
    open: impl Fn(StoreConfig) -> Fut,
) {
    let _g = exclusive().await;
    let f = Fixture::open(open, base_config()).await;
    let id = f.session(Policy::Queue).await;
    let (_, t1, lease) = f.start(id, "m1").await;
    assert!(
        !f.store.release_lease(&lease, false).await.expect("release"),
        "no release while a turn is active"
    );
    f.store
        .renew_lease(&lease)
        .await
        .expect("a refused release keeps the lease");
    assert_eq!(
        f.store.begin_turn(&lease, t1).await.expect("begin"),
        Begin::Run
    );
    f.end(&lease, t1, TurnStatus::Completed, None).await;
    assert!(
        f.store.release_lease(&lease, false).await.expect("release"),
        "an idle session's lease is released"
    );
    expect_err!(
        f.store.renew_lease(&lease).await,
        StoreError::StaleEpoch { .. },
        "renew after release"
    );

    let g = f.on_node("node-second");
    let (_, t2, second) = g.start(id, "m2").await;
    assert!(second.epoch > lease.epoch, "a new lease has a new epoch");

    // Idle again but still held by the second node: a third node's post
    // starts the turn without getting the lease; the holder runs it.
    g.end(&second, t2, TurnStatus::Completed, None).await;
    let h = f.on_node("node-third");
    let p = h.post(h.msg(id, "m3")).await;
    assert_eq!(p.disposition.kind, DispositionType::Started);
    assert!(
        p.lease.is_none(),
        "I4: a live lease is never handed to a second node"
    );
    let t3 = p.disposition.turn_id.expect("started names its turn");
    let run = g
        .store
        .next_turn(&second)
        .await
        .expect("next_turn")
        .expect("the holder sees the new turn");
    assert_eq!(run.turn.id, t3);

    // A forced release leaves the turn for the next recover, at once.
    assert!(g
        .store
        .release_lease(&second, true)
        .await
        .expect("forced release"));
    let node = unique("node-sweeper");
    let all = f.store.recover(&node, false).await.expect("recover");
    let rec = recovered(&all, id)
        .expect("a session with an active turn and a free lease is recovered at once");
    assert!(rec.lease.epoch > second.epoch);
    assert!(rec.committed.is_empty(), "the starting turn is handed over");
    assert_eq!(
        f.store.begin_turn(&rec.lease, t3).await.expect("begin"),
        Begin::Run
    );
    f.end(&rec.lease, t3, TurnStatus::Completed, None).await;
    f.log(id).await;
    f.cleanup().await;
}

/// `take_turn`, the worker's step: it begins the starting turn with its
/// inputs (or reports the cancel that came before it ran), answers `Busy`
/// while a turn runs, and releases the lease in the same transaction that
/// finds the session idle. Raced against posts from another node, every
/// turn those posts start is either taken by the holder or comes with the
/// lease for the poster: none is stranded (I4, I6).
pub async fn take_turn_begins_or_releases<Fut: Future<Output = SharedStore>>(
    open: impl Fn(StoreConfig) -> Fut,
) {
    let _g = shared().await;
    let f = Fixture::open(open, base_config()).await;
    let id = f.session(Policy::Queue).await;
    let (p1, t1, lease) = f.start(id, "m1").await;
    let p2 = f.post(f.msg(id, "m2")).await;
    assert_eq!(p2.disposition.kind, DispositionType::Queued);

    match f.store.take_turn(&lease).await.expect("take_turn") {
        Take::Run(todo, Begin::Run) => {
            assert_eq!(todo.turn.id, t1, "the starting turn is handed over");
            assert_eq!(todo.inputs, vec![p1.entry.clone()], "with its inputs only");
            assert_eq!(todo.agent, f.agent);
        }
        other => panic!("a starting turn is begun, got {other:?}"),
    }
    assert_eq!(
        f.turns(id).await[0].status,
        TurnStatus::Running,
        "take_turn moves the turn to running"
    );
    assert!(
        matches!(f.store.take_turn(&lease).await, Ok(Take::Busy)),
        "a running turn is not handed over twice, nor the lease released"
    );
    f.store
        .renew_lease(&lease)
        .await
        .expect("Busy keeps the lease");

    let t2 = f
        .end(&lease, t1, TurnStatus::Completed, None)
        .await
        .next
        .expect("the queued message starts the next turn");
    assert_eq!(
        f.store
            .request_cancel(&f.owner, id, "user", None)
            .await
            .expect("cancel"),
        Some(t2)
    );
    match f.store.take_turn(&lease).await.expect("take_turn") {
        Take::Run(todo, Begin::Cancelled(reason)) => {
            assert_eq!(todo.turn.id, t2);
            assert_eq!(reason, "user", "the cancel's reason is reported");
            assert_eq!(todo.inputs, vec![p2.entry.clone()]);
        }
        other => panic!("a turn cancelled while starting is reported so, got {other:?}"),
    }
    assert_eq!(
        f.turns(id).await[1].status,
        TurnStatus::Starting,
        "a turn cancelled before it ran never runs"
    );
    f.end(&lease, t2, TurnStatus::Cancelled, Some("user")).await;

    assert!(
        matches!(f.store.take_turn(&lease).await, Ok(Take::Released)),
        "an idle session's lease is released"
    );
    expect_err!(
        f.store.renew_lease(&lease).await,
        StoreError::StaleEpoch { .. },
        "renew after take_turn released"
    );
    expect_err!(
        f.store.take_turn(&lease).await,
        StoreError::StaleEpoch { .. },
        "take_turn after release"
    );

    // The race. Each round starts idle with the lease held.
    let poster = f.on_node("node-poster");
    let (_, t3, mut holder) = poster.start(id, "m3").await;
    assert!(matches!(
        f.store.take_turn(&holder).await,
        Ok(Take::Run(_, Begin::Run))
    ));
    f.end(&holder, t3, TurnStatus::Completed, None).await;
    let (mut taken, mut handed) = (0, 0);
    for round in 0..60 {
        // Both orders must happen: which is spawned first alternates.
        let take = {
            let (store, lease) = (f.store.clone(), holder.clone());
            async move { store.take_turn(&lease).await }
        };
        let post = {
            let (store, req) = (f.store.clone(), poster.msg(id, &format!("race {round}")));
            async move { store.post_message(req).await }
        };
        let (take, post) = if round % 2 == 0 {
            (tokio::spawn(take), tokio::spawn(post))
        } else {
            let post = tokio::spawn(post);
            (tokio::spawn(take), post)
        };
        let take = take.await.expect("take task").expect("take_turn");
        let posted = post.await.expect("post task").expect("post");
        let turn = posted
            .disposition
            .turn_id
            .expect("an idle session starts a turn");
        match take {
            Take::Run(todo, Begin::Run) => {
                assert!(
                    posted.lease.is_none(),
                    "round {round}: the holder took the turn, so the lease was not free"
                );
                assert_eq!(todo.turn.id, turn);
                taken += 1;
            }
            Take::Released => {
                let lease = posted.lease.clone().unwrap_or_else(|| {
                    panic!("round {round}: the lease was released, so the post's turn must come with it (else it is stranded)")
                });
                assert!(lease.epoch > holder.epoch, "a new lease has a new epoch");
                holder = lease;
                match f.store.take_turn(&holder).await.expect("take_turn") {
                    Take::Run(todo, Begin::Run) => assert_eq!(todo.turn.id, turn),
                    other => panic!("round {round}: the new holder runs the turn, got {other:?}"),
                }
                handed += 1;
            }
            other => panic!("round {round}: nothing was running, got {other:?}"),
        }
        f.end(&holder, turn, TurnStatus::Completed, None).await;
    }
    eprintln!("take_turn race: {taken} rounds taken by the holder, {handed} handed to the poster");
    assert!(
        taken > 0 && handed > 0,
        "the race ran both ways ({taken} taken, {handed} handed)"
    );
    let log = f.log(id).await;
    assert_eq!(
        log.iter()
            .filter(|e| e.kind == EntryType::TurnEnded)
            .count(),
        63,
        "every message's turn ran and ended once"
    );
    f.cleanup().await;
}

// ---------------------------------------------------------------------------
// 8. Reads

/// `entries` pages in seq order with a correct `last_seq`; `turns` is oldest
/// first with statuses and input ranges; `session`/`sessions` agree.
pub async fn reads_page_and_agree<Fut: Future<Output = SharedStore>>(
    open: impl Fn(StoreConfig) -> Fut,
) {
    let _g = shared().await;
    let f = Fixture::open(open, base_config()).await;
    let id = f.session(Policy::Queue).await;
    let v = f.view(id).await;
    assert_eq!(
        (v.status, v.turn_id, v.queued, v.last_seq),
        (SessionStatus::Idle, None, 0, 0)
    );
    assert_eq!(v.owner, f.owner);
    assert_eq!(v.agent, f.agent);
    assert_eq!(v.policy, Policy::Queue);
    assert_eq!(v.metadata, serde_json::json!({"suite": "contract"}));
    let page = f
        .store
        .entries(id, 0, 10)
        .await
        .expect("entries of an empty session");
    assert!(page.entries.is_empty());
    assert_eq!(page.last_seq, 0);

    let (_, t1, lease) = f.start(id, "m1").await;
    let v = f.view(id).await;
    assert_eq!(
        (v.status, v.turn_id, v.queued, v.last_seq),
        (SessionStatus::Running, Some(t1), 0, 2)
    );
    assert_eq!(
        f.store.begin_turn(&lease, t1).await.expect("begin"),
        Begin::Run
    );
    f.store
        .append_output(
            &lease,
            t1,
            (1..=3)
                .map(|i| NewEntry::assistant_message(t1, format!("a{i}")))
                .collect(),
        )
        .await
        .expect("append");
    let q1 = f.post(f.msg(id, "q1")).await;
    let q2 = f.post(f.msg(id, "q2")).await;
    assert_eq!(f.view(id).await.queued, 2);
    let ended = f.end(&lease, t1, TurnStatus::Completed, None).await;
    let t2 = ended.next.expect("next turn");
    let v = f.view(id).await;
    assert_eq!(
        (v.status, v.turn_id, v.queued, v.last_seq),
        (SessionStatus::Running, Some(t2), 1, 9)
    );

    let full = f.log(id).await;
    assert_eq!(full.len(), 9);
    for limit in [1, 2, 4, 100] {
        let mut after = 0;
        let mut walked = Vec::new();
        loop {
            let page = f.store.entries(id, after, limit).await.expect("a page");
            assert_eq!(page.last_seq, 9, "every page reports the log's end");
            assert!(
                page.entries.len() <= limit as usize,
                "a page holds at most `limit` entries"
            );
            let Some(last) = page.entries.last() else {
                break;
            };
            assert!(
                page.entries.iter().all(|e| e.seq > after),
                "a page starts after the cursor"
            );
            after = last.seq;
            walked.extend(page.entries);
        }
        assert_eq!(
            walked, full,
            "walking pages of {limit} yields the whole log in order"
        );
    }
    let page = f.store.entries(id, 4, 3).await.expect("a middle page");
    assert_eq!(
        page.entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [5, 6, 7]
    );
    assert_eq!(
        page.entries[1].content.as_deref(),
        Some("q1"),
        "q1 was posted after three outputs"
    );
    assert!(f
        .store
        .entries(id, 9, 10)
        .await
        .expect("past the end")
        .entries
        .is_empty());
    assert!(f
        .store
        .entries(id, 1_000, 10)
        .await
        .expect("far past the end")
        .entries
        .is_empty());
    assert!(f
        .store
        .entries(id, 0, 0)
        .await
        .expect("limit 0")
        .entries
        .is_empty());
    expect_err!(
        f.store.entries(SessionId::new(), 0, 10).await,
        StoreError::NotFound,
        "entries of a missing session"
    );

    let turns = f.turns(id).await;
    assert_eq!(turns.len(), 2);
    assert_eq!(
        (turns[0].id, turns[0].status, turns[0].input),
        (t1, TurnStatus::Completed, InputRange { from: 1, to: 1 })
    );
    assert_eq!(
        (turns[1].id, turns[1].status, turns[1].input),
        (
            t2,
            TurnStatus::Starting,
            InputRange {
                from: q1.entry.seq,
                to: q1.entry.seq
            }
        )
    );
    assert!(turns[0].ended_at.is_some() && turns[1].ended_at.is_none());
    assert!(
        turns[0].started_at <= turns[1].started_at,
        "turns are listed oldest first"
    );
    assert!(
        turns[0].ended_at.is_some_and(|e| e <= turns[1].started_at),
        "a turn never starts before the previous one ended (store clock)"
    );
    assert!(f
        .store
        .turns(SessionId::new())
        .await
        .expect("turns of a missing session")
        .is_empty());
    assert_eq!(q2.entry.seq, 7);

    let others = [
        f.session(Policy::Merge).await,
        f.session(Policy::Reject).await,
    ];
    let listed = f.store.sessions(&f.owner).await.expect("sessions()");
    let mut ids: Vec<SessionId> = listed.iter().map(|s| s.id).collect();
    ids.sort();
    let mut want = vec![id, others[0], others[1]];
    want.sort();
    assert_eq!(
        ids, want,
        "sessions(owner) lists exactly the owner's sessions"
    );
    assert!(
        listed
            .windows(2)
            .all(|w| w[0].created_at <= w[1].created_at),
        "sessions are listed oldest first"
    );
    let listed_main = listed.iter().find(|s| s.id == id).expect("listed");
    assert_eq!(
        (listed_main.status, listed_main.queued, listed_main.last_seq),
        (SessionStatus::Running, 1, 9)
    );
    assert_eq!(
        listed.iter().find(|s| s.id == others[0]).map(|s| s.policy),
        Some(Policy::Merge)
    );
    f.cleanup().await;
}

// ---------------------------------------------------------------------------
// 10. Deletion

/// Deleting a session removes its entries and turns; afterwards it is
/// `NotFound` everywhere, its lease is dead, and other sessions are untouched.
pub async fn delete_removes_everything<Fut: Future<Output = SharedStore>>(
    open: impl Fn(StoreConfig) -> Fut,
) {
    let _g = shared().await;
    let f = Fixture::open(open, base_config()).await;
    let id = f.session(Policy::Queue).await;
    let (_, t1, lease) = f.start(id, "m1").await;
    assert_eq!(
        f.store.begin_turn(&lease, t1).await.expect("begin"),
        Begin::Run
    );
    f.store
        .append_output(&lease, t1, vec![NewEntry::assistant_message(t1, "a1")])
        .await
        .expect("append");
    f.post(f.msg(id, "q1")).await;
    let keep = f.session(Policy::Queue).await;
    let (_, _, keep_lease) = f.start(keep, "kept").await;
    let kept = f.log(keep).await;

    f.store
        .delete_session(&f.owner, id)
        .await
        .expect("delete_session");
    expect_err!(
        f.store.session(&f.owner, id).await,
        StoreError::NotFound,
        "session() after delete"
    );
    expect_err!(
        f.store.entries(id, 0, 10).await,
        StoreError::NotFound,
        "entries() after delete"
    );
    assert!(
        f.store
            .turns(id)
            .await
            .expect("turns() after delete")
            .is_empty(),
        "turns are deleted"
    );
    expect_err!(
        f.store.post_message(f.msg(id, "after")).await,
        StoreError::NotFound,
        "post after delete"
    );
    expect_err!(
        f.store.request_cancel(&f.owner, id, "x", None).await,
        StoreError::NotFound,
        "cancel after delete"
    );
    expect_err!(
        f.store.delete_session(&f.owner, id).await,
        StoreError::NotFound,
        "a second delete"
    );
    expect_err!(
        f.store.renew_lease(&lease).await,
        StoreError::StaleEpoch { .. },
        "renew of a deleted session's lease"
    );
    expect_err!(
        f.store
            .append_output(&lease, t1, vec![NewEntry::assistant_message(t1, "zombie")])
            .await,
        StoreError::StaleEpoch { .. },
        "append to a deleted session"
    );
    let all = f.store.sessions(&f.owner).await.expect("sessions()");
    assert_eq!(all.iter().map(|s| s.id).collect::<Vec<_>>(), vec![keep]);
    assert_eq!(
        f.log(keep).await,
        kept,
        "deleting one session leaves the others untouched"
    );
    f.store
        .renew_lease(&keep_lease)
        .await
        .expect("the other session's lease is intact");
    f.cleanup().await;
}

/// The store refuses, writing nothing, output a running turn may not store
/// (I7's backstop: no second terminal entry, no user message in a turn's
/// output, nothing of another turn) and an end that is not terminal or does
/// not close with the turn's one `turn_ended`.
pub async fn output_and_ends_are_checked<Fut: Future<Output = SharedStore>>(
    open: impl Fn(StoreConfig) -> Fut,
) {
    let _g = shared().await;
    let f = Fixture::open(open, base_config()).await;
    let id = f.session(Policy::Queue).await;
    let (_, t1, lease) = f.start(id, "m1").await;
    assert_eq!(
        f.store.begin_turn(&lease, t1).await.expect("begin"),
        Begin::Run
    );
    let other = TurnId::new();
    let bad_output = [
        (
            "a turn_ended",
            NewEntry::turn_ended(t1, TurnStatus::Completed, None),
        ),
        (
            "a turn_started",
            NewEntry::turn_started(t1, InputRange { from: 1, to: 1 }),
        ),
        ("a user message", NewEntry::user_message("from the agent?")),
        (
            "another turn's message",
            NewEntry::assistant_message(other, "hi"),
        ),
    ];
    for (what, e) in bad_output {
        expect_err!(
            f.store
                .append_output(&lease, t1, vec![NewEntry::assistant_message(t1, "ok"), e])
                .await,
            StoreError::Internal(_),
            "output with {what}"
        );
    }
    let ended = |status| vec![NewEntry::turn_ended(t1, status, None)];
    let bad_ends = [
        (
            "a running status",
            TurnStatus::Running,
            ended(TurnStatus::Running),
        ),
        (
            "no turn_ended",
            TurnStatus::Completed,
            vec![NewEntry::assistant_message(t1, "bye")],
        ),
        (
            "a turn_ended of another status",
            TurnStatus::Completed,
            ended(TurnStatus::Failed),
        ),
        ("turn_ended not last", TurnStatus::Completed, {
            let mut v = ended(TurnStatus::Completed);
            v.push(NewEntry::assistant_message(t1, "after the end"));
            v
        }),
        ("two turn_ended", TurnStatus::Completed, {
            let mut v = ended(TurnStatus::Completed);
            v.extend(ended(TurnStatus::Completed));
            v
        }),
    ];
    for (what, status, entries) in bad_ends {
        expect_err!(
            f.store.end_turn(&lease, t1, status, None, entries).await,
            StoreError::Internal(_),
            "an end with {what}"
        );
    }
    let log = check_log(&*f.store, &f.owner, id).await;
    assert_eq!(log.len(), 2, "nothing refused was written: {log:#?}");
    // The turn is untouched: its output and its end are still taken.
    f.store
        .append_output(&lease, t1, vec![NewEntry::assistant_message(t1, "ok")])
        .await
        .expect("output");
    f.end(&lease, t1, TurnStatus::Completed, None).await;
    let log = check_log(&*f.store, &f.owner, id).await;
    assert_eq!(log.len(), 4);
    f.cleanup().await;
}

// ---------------------------------------------------------------------------
// Listing sessions

/// Pages through the owner's sessions with `query`; returns them in order
/// and the number of pages.
async fn list_all(
    f: &Fixture,
    mut query: baton_store::SessionQuery,
) -> (Vec<baton_store::Listed>, usize) {
    let mut out: Vec<baton_store::Listed> = Vec::new();
    let mut pages = 0;
    loop {
        let page = f
            .store
            .list_sessions(&f.owner, &query)
            .await
            .expect("list_sessions");
        pages += 1;
        assert!(
            page.sessions.len() <= query.limit as usize,
            "a page holds at most its limit"
        );
        let last = page.sessions.last().map(baton_store::Listed::cursor);
        out.extend(page.sessions);
        match last {
            Some(cursor) if page.more => query.after = Some(cursor),
            _ => return (out, pages),
        }
    }
}

fn everything(limit: u32) -> baton_store::SessionQuery {
    baton_store::SessionQuery {
        after: None,
        limit,
        status: None,
        agent: None,
    }
}

/// `list_sessions` pages an owner's sessions newest first by a keyset
/// cursor: past 1,000 sessions nothing is cut off, no session is skipped or
/// repeated (also when sessions are created between pages), the filters
/// hold, and the last activity is the latest entry's time.
pub async fn sessions_list_newest_first_in_pages<Fut: Future<Output = SharedStore>>(
    open: impl Fn(StoreConfig) -> Fut,
) {
    use futures_util::StreamExt;
    let _g = shared().await;
    let f = Fixture::open(open, base_config()).await;
    let other = Fixture::on(f.store.clone());
    let bystander = other.session(Policy::Queue).await;
    let created: Vec<SessionId> = futures_util::stream::iter(0..1003)
        .map(|_| f.session(Policy::Queue))
        .buffer_unordered(32)
        .collect()
        .await;
    let odd = f
        .store
        .create_session(CreateSession {
            agent: "other-agent".to_owned(),
            ..f.create_req(Policy::Merge)
        })
        .await
        .expect("create with another agent")
        .session
        .id;
    let busy = created[0];
    f.start(busy, "keep me busy").await;

    let (listed, pages) = list_all(&f, everything(1000)).await;
    assert_eq!(pages, 2, "1,004 sessions are two pages of 1,000");
    let mut ids: Vec<SessionId> = listed.iter().map(|l| l.session.id).collect();
    assert!(
        listed
            .windows(2)
            .all(|w| (w[0].session.created_at, w[0].session.id)
                > (w[1].session.created_at, w[1].session.id)),
        "newest first, ties by id, nothing twice"
    );
    ids.sort();
    let mut want = created.clone();
    want.push(odd);
    want.sort();
    assert_eq!(ids, want, "every session of the owner, and only those");
    assert!(
        !ids.contains(&bystander),
        "another owner's session is not listed"
    );

    // Small pages, with a session created between two of them: it is newer
    // than the cursor, so the pages that follow neither skip nor repeat.
    let first = f
        .store
        .list_sessions(&f.owner, &everything(7))
        .await
        .expect("first page");
    assert!(first.more);
    let late = f.session(Policy::Queue).await;
    let mut rest = everything(7);
    rest.after = first.sessions.last().map(baton_store::Listed::cursor);
    let (tail, _) = list_all(&f, rest).await;
    let paged: Vec<SessionId> = first
        .sessions
        .iter()
        .chain(&tail)
        .map(|l| l.session.id)
        .collect();
    assert_eq!(
        paged,
        listed.iter().map(|l| l.session.id).collect::<Vec<_>>(),
        "pages of 7 see the same order as pages of 1,000"
    );
    assert!(!paged.contains(&late));
    let newest = f
        .store
        .list_sessions(&f.owner, &everything(1))
        .await
        .expect("newest");
    assert_eq!(
        newest.sessions[0].session.id, late,
        "the newest comes first"
    );

    // Filters.
    let running = baton_store::SessionQuery {
        status: Some(SessionStatus::Running),
        ..everything(1000)
    };
    let (only_busy, _) = list_all(&f, running).await;
    assert_eq!(
        only_busy.iter().map(|l| l.session.id).collect::<Vec<_>>(),
        vec![busy]
    );
    let idle = baton_store::SessionQuery {
        status: Some(SessionStatus::Idle),
        ..everything(300)
    };
    let (idle, _) = list_all(&f, idle).await;
    assert_eq!(idle.len(), 1004, "every session but the busy one");
    assert!(idle.iter().all(|l| l.session.id != busy));
    let by_agent = baton_store::SessionQuery {
        agent: Some("other-agent".to_owned()),
        ..everything(1000)
    };
    let (only_odd, _) = list_all(&f, by_agent).await;
    assert_eq!(
        only_odd.iter().map(|l| l.session.id).collect::<Vec<_>>(),
        vec![odd]
    );

    // Last activity: the latest entry's time, or the creation.
    let log = f.log(busy).await;
    let busy_listed = listed
        .iter()
        .find(|l| l.session.id == busy)
        .expect("listed");
    assert_eq!(
        busy_listed.last_activity_at,
        log.last().expect("the busy session has entries").created_at
    );
    let quiet = listed.iter().find(|l| l.session.id == odd).expect("listed");
    assert_eq!(quiet.last_activity_at, quiet.session.created_at);

    // The unpaged read goes past 1,000 too, oldest first.
    let all = f.store.sessions(&f.owner).await.expect("sessions()");
    assert_eq!(all.len(), 1005);
    assert_eq!(all.last().map(|s| s.id), Some(late));

    f.cleanup().await;
    other.cleanup().await;
}

/// A permission request of `turn` asked with `options` (all `allow_once`).
fn asked(turn: TurnId, options: &[&str]) -> NewEntry {
    NewEntry::permission_request(
        turn,
        PermissionInfo::request(
            Some(unique("call")),
            Some("run".to_owned()),
            options
                .iter()
                .map(|o| PermissionOptionInfo {
                    option_id: (*o).to_owned(),
                    name: (*o).to_owned(),
                    kind: "allow_once".to_owned(),
                })
                .collect(),
        ),
    )
}

fn request_id(e: &Entry) -> String {
    e.permission
        .as_ref()
        .map(|p| p.request_id.clone())
        .expect("a permission entry carries its request")
}

/// Permission requests are answered exactly once: of many concurrent
/// answers one is stored; an identical retry returns it; any other answer,
/// and any answer once the request was closed (by `close_permissions` or
/// the turn's end, which closes what is still pending before its terminal
/// entry), is refused with the request's state. Bad answers write nothing;
/// another owner sees nothing; closing is fenced by the lease.
pub async fn permission_answers_are_exactly_once<Fut: Future<Output = SharedStore>>(
    open: impl Fn(StoreConfig) -> Fut,
) {
    let _g = shared().await;
    let f = Fixture::open(open, base_config()).await;
    let id = f.session(Policy::Queue).await;
    let (_, t, lease) = f.start(id, "go").await;
    assert_eq!(
        f.store.begin_turn(&lease, t).await.expect("begin"),
        Begin::Run
    );
    let answer = |request: String, option: &str| AnswerPermission {
        owner: f.owner.clone(),
        session_id: id,
        request_id: request,
        option_id: option.to_owned(),
    };

    // Many answers at once, three options among them.
    let options = ["a", "b", "c"];
    let req = f
        .store
        .append_output(&lease, t, vec![asked(t, &options)])
        .await
        .expect("store a request")
        .remove(0);
    let rid = request_id(&req);
    assert_eq!(
        f.store.pending_permissions(id).await.expect("pending"),
        vec![req.clone()]
    );
    let tasks: Vec<_> = (0..24)
        .map(|i| {
            let store = f.store.clone();
            let a = answer(rid.clone(), options[i % 3]);
            tokio::spawn(async move { (a.option_id.clone(), store.answer_permission(a).await) })
        })
        .collect();
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.expect("an answering task"));
    }
    let fresh: Vec<_> = results
        .iter()
        .filter_map(|(o, r)| match r {
            Ok(a) if !a.replayed => Some((o.clone(), a.decision.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        fresh.len(),
        1,
        "exactly one answer is recorded: {results:?}"
    );
    let (winner, decision) = fresh[0].clone();
    for (option, result) in &results {
        match result {
            Ok(a) => assert!(
                *option == winner && a.decision == decision,
                "only the winning option is replayed, as the original: {result:?}"
            ),
            Err(StoreError::PermissionClosed(s)) => {
                assert_ne!(*option, winner);
                assert_eq!(s.state, PermissionState::Answered);
                assert_eq!(s.option_id.as_deref(), Some(winner.as_str()));
                assert_eq!(s.decision_seq, Some(decision.seq));
            }
            other => panic!("an answer gets the decision or a conflict: {other:?}"),
        }
    }
    let p = decision
        .permission
        .as_ref()
        .expect("the decision's permission");
    assert_eq!(
        p.decided_by.as_deref(),
        Some(format!("user:{}", f.owner).as_str())
    );
    assert_eq!(decision.turn_id, Some(t));
    assert!(f
        .store
        .pending_permissions(id)
        .await
        .expect("pending")
        .is_empty());
    assert_eq!(
        f.store
            .permission_decisions(id, t)
            .await
            .expect("decisions"),
        vec![decision.clone()]
    );

    // Bad answers write nothing.
    let last = f.last_seq(id).await;
    expect_err!(
        f.store.answer_permission(answer("nope".into(), "a")).await,
        StoreError::PermissionNotFound { .. },
        "an unknown request"
    );
    expect_err!(
        f.store.answer_permission(answer(rid.clone(), "z")).await,
        StoreError::UnknownOption { .. },
        "an option never offered"
    );
    let stranger = AnswerPermission {
        owner: unique("stranger"),
        ..answer(rid.clone(), &winner)
    };
    expect_err!(
        f.store.answer_permission(stranger).await,
        StoreError::NotFound,
        "I10: another owner's session"
    );
    assert_eq!(
        f.last_seq(id).await,
        last,
        "I11: refused answers write nothing"
    );

    // A timeout and an answer race: one decision, whichever came first.
    let req = f
        .store
        .append_output(&lease, t, vec![asked(t, &options)])
        .await
        .expect("store a request")
        .remove(0);
    let rid = request_id(&req);
    let (closed, answered) = tokio::join!(
        f.store
            .close_permissions(&lease, t, Some(rid.clone()), "timeout", "no answer"),
        f.store.answer_permission(answer(rid.clone(), "b"))
    );
    let closed = closed.expect("close_permissions");
    match (&closed[..], &answered) {
        ([d], Err(StoreError::PermissionClosed(s))) => {
            assert_eq!(s.state, PermissionState::Cancelled);
            assert_eq!(d.reason.as_deref(), Some("no answer"));
            let p = d.permission.as_ref().expect("permission");
            assert_eq!(
                (p.outcome.as_deref(), p.decided_by.as_deref()),
                (Some("cancelled"), Some("timeout"))
            );
        }
        ([], Ok(a)) => assert!(!a.replayed),
        other => panic!("exactly one of a timeout and an answer decides: {other:?}"),
    }
    let decided = f
        .store
        .permission_decisions(id, t)
        .await
        .expect("decisions");
    assert_eq!(decided.len(), 2, "{decided:?}");

    // Closing is fenced.
    let stale = Lease {
        epoch: lease.epoch - 1,
        ..lease.clone()
    };
    expect_err!(
        f.store
            .close_permissions(&stale, t, None, "turn_end", "x")
            .await,
        StoreError::StaleEpoch { .. },
        "I4: close_permissions with a stale lease"
    );

    // The turn's end closes what still waits, before its terminal entry.
    let req = f
        .store
        .append_output(&lease, t, vec![asked(t, &options)])
        .await
        .expect("store a request")
        .remove(0);
    let rid = request_id(&req);
    let ended = f.end(&lease, t, TurnStatus::Completed, None).await;
    assert_eq!(ended.committed.len(), 2, "{:?}", ended.committed);
    let d = &ended.committed[0];
    assert_eq!(d.kind, EntryType::PermissionDecision);
    assert_eq!(request_id(d), rid);
    let p = d.permission.as_ref().expect("permission");
    assert_eq!(
        (p.outcome.as_deref(), p.decided_by.as_deref()),
        (Some("cancelled"), Some("turn_end"))
    );
    assert!(ended_entry(&ended.committed[1], t, TurnStatus::Completed));
    match f.store.answer_permission(answer(rid, "a")).await {
        Err(StoreError::PermissionClosed(s)) => assert_eq!(s.state, PermissionState::Cancelled),
        other => panic!("an answer after the turn ended is refused: {other:?}"),
    }
    assert!(f
        .store
        .pending_permissions(id)
        .await
        .expect("pending")
        .is_empty());
    f.log(id).await;
    f.cleanup().await;
}

/// A worker that vanished while its turn waited for an answer: the
/// takeover ends the turn `lost` and closes the request in the same
/// transaction, before the terminal entry.
pub async fn recovery_closes_waiting_permission_requests<Fut: Future<Output = SharedStore>>(
    open: impl Fn(StoreConfig) -> Fut,
) {
    let _g = exclusive().await;
    let f = Fixture::open(
        open,
        StoreConfig {
            lease_ttl: SHORT_TTL,
            ..base_config()
        },
    )
    .await;
    let id = f.session(Policy::Queue).await;
    let (_, t, lease) = f.start(id, "go").await;
    assert_eq!(
        f.store.begin_turn(&lease, t).await.expect("begin"),
        Begin::Run
    );
    let req = f
        .store
        .append_output(&lease, t, vec![asked(t, &["a"])])
        .await
        .expect("store a request")
        .remove(0);
    tokio::time::sleep(PAST_TTL).await;
    let rec = recovered(
        &f.store
            .recover(&unique("rescuer"), false)
            .await
            .expect("recover"),
        id,
    )
    .expect("the expired session is taken over");
    assert_eq!(rec.committed.len(), 2, "{:?}", rec.committed);
    let d = &rec.committed[0];
    assert_eq!(d.kind, EntryType::PermissionDecision);
    assert_eq!(request_id(d), request_id(&req));
    assert_eq!(
        d.permission.as_ref().and_then(|p| p.outcome.as_deref()),
        Some("cancelled")
    );
    assert!(ended_entry(&rec.committed[1], t, TurnStatus::Lost));
    assert!(f
        .store
        .pending_permissions(id)
        .await
        .expect("pending")
        .is_empty());
    f.log(id).await;
    f.cleanup().await;
}

/// A post made by the node that will run its turn begins that turn in the
/// same transaction: the turn is `running` under the new lease, handed back
/// with its input, and never handed out again by `take_turn`. A message that
/// queues, or finds the lease held by another node, begins nothing. A worker
/// that vanishes before prompting such a turn leaves it `running`, so
/// recovery ends it `lost` instead of running it twice.
pub async fn post_to_run_begins_the_turn_it_starts<Fut: Future<Output = SharedStore>>(
    open: impl Fn(StoreConfig) -> Fut,
) {
    let _g = exclusive().await;
    let f = Fixture::open(
        open,
        StoreConfig {
            lease_ttl: SHORT_TTL,
            ..base_config()
        },
    )
    .await;
    let id = f.session(Policy::Queue).await;
    let p1 = f
        .store
        .post_message_to_run(f.msg(id, "m1"))
        .await
        .expect("post_message_to_run");
    assert_eq!(p1.disposition.kind, DispositionType::Started);
    let t1 = p1.disposition.turn_id.expect("a started turn");
    let lease = p1.lease.clone().expect("the posting node takes the lease");
    let begun = p1.begun.clone().expect("the turn is begun in the post");
    assert_eq!(begun.turn.id, t1);
    assert_eq!(begun.turn.status, TurnStatus::Running);
    assert_eq!(
        begun.inputs,
        vec![p1.entry.clone()],
        "its input is the message"
    );
    assert_eq!(begun.agent, f.agent);
    let stored = f.turns(id).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].status, TurnStatus::Running, "durably running");
    assert_eq!(stored[0].input, begun.turn.input);
    assert!(
        matches!(f.store.take_turn(&lease).await, Ok(Take::Busy)),
        "a turn begun in its post is never handed out again"
    );

    // Queued behind it: nothing begun, no lease.
    let p2 = f
        .store
        .post_message_to_run(f.msg(id, "m2"))
        .await
        .expect("post_message_to_run");
    assert_eq!(p2.disposition.kind, DispositionType::Queued);
    assert!(p2.begun.is_none() && p2.lease.is_none());
    // The next turn starts from the end, as `starting`, for take_turn.
    let t2 = f
        .end(&lease, t1, TurnStatus::Completed, None)
        .await
        .next
        .expect("the queued message starts the next turn");
    match f.store.take_turn(&lease).await.expect("take_turn") {
        Take::Run(todo, Begin::Run) => assert_eq!(todo.turn.id, t2),
        other => panic!("the queued turn is taken as before, got {other:?}"),
    }
    f.end(&lease, t2, TurnStatus::Completed, None).await;
    assert!(matches!(
        f.store.take_turn(&lease).await,
        Ok(Take::Released)
    ));

    // The worker vanishes before prompting: the turn ends `lost`, once.
    let p3 = f
        .store
        .post_message_to_run(f.msg(id, "m3"))
        .await
        .expect("post_message_to_run");
    let t3 = p3.begun.as_ref().expect("begun").turn.id;
    tokio::time::sleep(PAST_TTL).await;
    let other = unique("node-recover");
    let all = f.store.recover(&other, false).await.expect("recover");
    let r = recovered(&all, id).expect("the expired session is taken over");
    assert!(
        r.committed.iter().any(|e| e.kind == EntryType::TurnEnded
            && e.turn_id == Some(t3)
            && e.status == Some(TurnStatus::Lost)),
        "a begun turn whose worker vanished ends lost: {:?}",
        r.committed
    );
    f.store
        .release_lease(&r.lease, false)
        .await
        .expect("release after recovery");

    // Another node holds the lease: a post there begins nothing.
    let holder = f.on_node("node-holder");
    let ph = holder
        .store
        .post_message_to_run(holder.msg(id, "m4"))
        .await
        .expect("post_message_to_run");
    let hl = ph.lease.clone().expect("free lease taken by the holder");
    assert!(ph.begun.is_some());
    let p5 = f
        .store
        .post_message_to_run(f.msg(id, "m5"))
        .await
        .expect("post_message_to_run");
    assert!(
        p5.begun.is_none() && p5.lease.is_none(),
        "queued behind the holder's turn"
    );
    let t5 = holder
        .end(
            &hl,
            ph.begun.expect("begun").turn.id,
            TurnStatus::Completed,
            None,
        )
        .await
        .next
        .expect("m5 runs next, under the holder's lease");
    holder.end(&hl, t5, TurnStatus::Completed, None).await;
    f.log(id).await;
    f.cleanup().await;
}

mod steer;

/// Names no row can hold (a NUL byte, which PostgreSQL's text refuses and
/// SQLite keeps) find nothing on both stores, rather than failing on one:
/// a session list filtered by such an agent is empty, and an answer to such
/// a permission request finds no request.
pub async fn nul_bytes_in_lookups_find_nothing<Fut: Future<Output = SharedStore>>(
    open: impl Fn(StoreConfig) -> Fut,
) {
    let _g = shared().await;
    let f = Fixture::open(open, base_config()).await;
    let id = f.session(Policy::Queue).await;
    let page = f
        .store
        .list_sessions(
            &f.owner,
            &baton_store::SessionQuery {
                agent: Some(format!("{}\0", f.agent)),
                ..everything(10)
            },
        )
        .await
        .expect("listing by an agent name with a NUL byte");
    assert!(page.sessions.is_empty() && !page.more, "{page:?}");
    expect_err!(
        f.store
            .answer_permission(AnswerPermission {
                owner: f.owner.clone(),
                session_id: id,
                request_id: "req\0".to_owned(),
                option_id: "a".to_owned(),
            })
            .await,
        StoreError::PermissionNotFound { .. },
        "an answer to a request id with a NUL byte"
    );
    f.cleanup().await;
}
