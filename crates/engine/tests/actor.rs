//! The session actor against scripted agents on a real embedded store: how
//! it batches an agent's output into transactions, keeps the live bus in
//! the agent's order, stays responsive to a cancel while an agent floods it
//! with output, ends a turn whose output the store refuses, fences itself
//! when its lease renewals hang, and stores random agent scripts in the
//! order they were produced, whatever ends the turn, with exports every
//! model API accepts.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use baton_agent::{
    AgentDriver, AgentError, AgentEvent, Agents, TurnControl, TurnHandle, TurnInput,
};
use baton_core::turn::{AgentOutput, StopReason};
use baton_core::{
    Entry, EntryType, NewEntry, Policy, Seq, Session, SessionId, ToolInfo, Turn, TurnId, TurnStatus,
};
use baton_engine::{Bus, BusEvent, Engine, EngineConfig};
use baton_store::{
    Begin, CreateSession, Created, Due, Ended, Lease, Page, PostMessage, Posted, Recovered,
    Renewal, Result as StoreResult, SessionPage, SessionQuery, SqlStore, SteerBatch, Store,
    StoreConfig, StoreError, Take, TurnToRun,
};
use tokio::sync::{broadcast, mpsc};

/// An agent whose whole turn is already in its channel when `start` returns.
struct Burst(Vec<AgentEvent>);

struct NoControl;

impl TurnControl for NoControl {
    fn cancel(&self) {}
    fn force_stop(&self) {}
}

#[async_trait]
impl AgentDriver for Burst {
    async fn start(&self, _input: TurnInput) -> Result<TurnHandle, AgentError> {
        let (tx, rx) = mpsc::channel(self.0.len().max(1));
        for ev in &self.0 {
            let _ = tx.try_send(ev.clone());
        }
        Ok(TurnHandle {
            events: rx,
            control: Box::new(NoControl),
        })
    }
}

/// An agent that streams deltas without ever pausing until it is cancelled,
/// then stops `cancelled`.
struct Flood;

struct FloodControl(Arc<AtomicBool>);

impl TurnControl for FloodControl {
    fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    fn force_stop(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[async_trait]
impl AgentDriver for Flood {
    async fn start(&self, _input: TurnInput) -> Result<TurnHandle, AgentError> {
        let (tx, rx) = mpsc::channel(baton_agent::EVENT_CAPACITY);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        tokio::spawn(async move {
            // Bounded: a broken actor fails the test, never hangs the machine.
            for i in 0..2_000_000u64 {
                if flag.load(Ordering::SeqCst) {
                    let _ = tx.send(AgentEvent::Stopped(StopReason::Cancelled)).await;
                    return;
                }
                if tx.send(AgentEvent::Delta(format!("{i} "))).await.is_err() {
                    return;
                }
                if i % 64 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            let _ = tx.send(AgentEvent::Stopped(StopReason::Completed)).await;
        });
        Ok(TurnHandle {
            events: rx,
            control: Box::new(FloodControl(stop)),
        })
    }
}

struct Fixture {
    engine: Engine,
    _dir: tempfile::TempDir,
}

async fn engine(name: &str, driver: Arc<dyn AgentDriver>) -> Fixture {
    engine_on(name, driver, |store| Arc::new(store)).await
}

/// [`engine`] on the embedded store as `wrap` presents it.
async fn engine_on(
    name: &str,
    driver: Arc<dyn AgentDriver>,
    wrap: impl FnOnce(SqlStore) -> Arc<dyn Store>,
) -> Fixture {
    engine_with(name, driver, wrap, EngineConfig::default()).await
}

/// [`engine_on`] with `cfg` (its lease TTL is also the store's).
async fn engine_with(
    name: &str,
    driver: Arc<dyn AgentDriver>,
    wrap: impl FnOnce(SqlStore) -> Arc<dyn Store>,
    cfg: EngineConfig,
) -> Fixture {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store_cfg = StoreConfig {
        lease_ttl: cfg.lease_ttl,
        ..StoreConfig::default()
    };
    let store = SqlStore::open_sqlite(&dir.path().join("baton.db"), store_cfg)
        .await
        .expect("open the embedded store");
    let mut agents = Agents::default();
    agents.insert(name, driver);
    let cfg = EngineConfig {
        cancel_drain: Duration::from_secs(30),
        ..cfg
    };
    let engine = Engine::new(wrap(store), Bus::default(), agents, cfg);
    engine.start().await.expect("engine start");
    Fixture { engine, _dir: dir }
}

async fn session(f: &Fixture, agent: &str) -> SessionId {
    f.engine
        .create_session(CreateSession {
            owner: "o".into(),
            agent: agent.into(),
            policy: Policy::Queue,
            metadata: serde_json::json!({}),
            idempotency_key: None,
            fingerprint: "{}".into(),
            message: None,
            permission: None,
            node: f.engine.node().to_owned(),
            debounce_ms: 0,
        })
        .await
        .expect("create a session")
        .session
        .id
}

async fn post(f: &Fixture, id: SessionId, content: &str) {
    f.engine
        .post_message(PostMessage {
            owner: "o".into(),
            session_id: id,
            content: content.into(),
            policy: None,
            idempotency_key: None,
            node: f.engine.node().to_owned(),
            mid_turn_agents: Vec::new(),
        })
        .await
        .expect("post a message");
}

/// What the bus carried for the session until its first `turn_ended`.
#[derive(Debug, PartialEq)]
enum Seen {
    Entry(EntryType, Option<String>),
    Delta(String),
}

async fn until_turn_ended(rx: &mut broadcast::Receiver<BusEvent>) -> (Vec<Seen>, Vec<Entry>) {
    let mut seen = Vec::new();
    let mut entries = Vec::new();
    let deadline = tokio::time::sleep(Duration::from_secs(20));
    tokio::pin!(deadline);
    loop {
        let ev = tokio::select! {
            ev = rx.recv() => ev.expect("the bus stays open and this subscriber keeps up"),
            _ = &mut deadline => panic!("no turn_ended within 20 s; saw {seen:?}"),
        };
        match ev {
            BusEvent::Entry(e) => {
                seen.push(Seen::Entry(e.kind, e.content.clone()));
                let ended = e.kind == EntryType::TurnEnded;
                entries.push(*e);
                if ended {
                    return (seen, entries);
                }
            }
            BusEvent::Delta { text, .. } => seen.push(Seen::Delta(text)),
            _ => {}
        }
    }
}

/// Waits until the bus carries a delta: the session's turn runs.
async fn until_delta(rx: &mut broadcast::Receiver<BusEvent>) {
    loop {
        match tokio::time::timeout(Duration::from_secs(20), rx.recv()).await {
            Ok(Ok(BusEvent::Delta { .. })) => return,
            Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
            other => panic!("waiting for a delta within 20 s: {other:?}"),
        }
    }
}

/// Output that arrives in one burst is stored in one transaction with the
/// turn's end (one commit, not one per entry); a delta between two outputs
/// splits them, so the bus still shows stored output before the deltas that
/// follow it, exactly in the agent's order. Each run of text is stored as
/// its own message, before the output that ended it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_is_one_transaction_and_the_bus_keeps_the_agents_order() {
    let call = ToolInfo {
        id: "c".into(),
        name: Some("grep".into()),
        arguments: None,
    };
    let script = vec![
        AgentEvent::Delta("one".into()),
        AgentEvent::Output(AgentOutput::ToolCall(call)),
        AgentEvent::Output(AgentOutput::ToolResult {
            id: "c".into(),
            content: "found".into(),
        }),
        AgentEvent::Delta("two".into()),
        AgentEvent::Output(AgentOutput::System("note".into())),
        AgentEvent::Stopped(StopReason::Completed),
    ];
    let f = engine("burst", Arc::new(Burst(script))).await;
    let id = session(&f, "burst").await;
    let mut rx = f.engine.bus().subscribe(id);
    post(&f, id, "go").await;
    let (seen, entries) = until_turn_ended(&mut rx).await;
    use EntryType::*;
    assert_eq!(
        seen,
        vec![
            Seen::Entry(Message, Some("go".into())),
            Seen::Entry(TurnStarted, None),
            Seen::Delta("one".into()),
            Seen::Entry(Message, Some("one".into())),
            Seen::Entry(ToolCall, None),
            Seen::Entry(ToolResult, Some("found".into())),
            Seen::Delta("two".into()),
            Seen::Entry(Message, Some("two".into())),
            Seen::Entry(Message, Some("note".into())),
            Seen::Entry(TurnEnded, None),
        ],
        "the bus shows the agent's order"
    );
    let ended = entries.last().expect("turn_ended");
    assert_eq!(ended.status, Some(TurnStatus::Completed));
    // Entries of one transaction carry its one timestamp.
    let (one, result, two, note) = (&entries[2], &entries[4], &entries[5], &entries[6]);
    assert_eq!(
        one.created_at, result.created_at,
        "the first burst is one transaction"
    );
    assert_eq!(
        (two.created_at, note.created_at),
        (ended.created_at, ended.created_at),
        "the last burst is stored with turn_ended, in its transaction"
    );
    assert_eq!(
        (one.seq + 3, two.seq + 1, note.seq + 1),
        (two.seq, note.seq, ended.seq),
        "I1: gapless"
    );
    f.engine.shutdown().await;
}

/// An agent that never pauses cannot starve the actor: a cancel still ends
/// the turn, and the session takes its next message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_agent_is_still_cancelled() {
    // The output cap well above what the flood can send (2,000,000 short
    // deltas), so a slow machine that lets the text pile up before the
    // cancel lands still ends the turn by the cancel, not by the cap.
    let cfg = EngineConfig {
        max_output_bytes: 64 << 20,
        ..EngineConfig::default()
    };
    let f = engine_with("flood", Arc::new(Flood), |store| Arc::new(store), cfg).await;
    let id = session(&f, "flood").await;
    let mut rx = f.engine.bus().subscribe(id);
    post(&f, id, "go").await;
    // Wait until it floods, then cancel.
    until_delta(&mut rx).await;
    f.engine.cancel("o", id, None).await.expect("cancel");
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match rx.recv().await {
                Ok(BusEvent::Entry(e)) if e.kind == EntryType::TurnEnded => return *e,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("bus closed: {e}"),
            }
        }
    })
    .await
    .expect("the cancel reached the actor and the turn ended within 20 s");
    assert_eq!(ended.status, Some(TurnStatus::Cancelled));
    assert_eq!(
        ended.reason.as_deref(),
        Some("cancelled by user"),
        "ended by the cancel, not forced at the drain deadline (30 s)"
    );
    f.engine.shutdown().await;
}

/// An agent that answers each turn with its last message, at once.
struct Echo;

#[async_trait]
impl AgentDriver for Echo {
    async fn start(&self, input: TurnInput) -> Result<TurnHandle, AgentError> {
        let (tx, rx) = mpsc::channel(2);
        let last = input.messages.last().cloned().unwrap_or_default();
        let _ = tx.try_send(AgentEvent::Output(AgentOutput::Message(last)));
        let _ = tx.try_send(AgentEvent::Stopped(StopReason::Completed));
        Ok(TurnHandle {
            events: rx,
            control: Box::new(NoControl),
        })
    }
}

/// Renewals answer at once.
const RENEWALS_ANSWER: u8 = 0;
/// Renewals never answer.
const RENEWALS_HANG: u8 = 1;
/// The next renewal lands but answers `SLOW_RENEWAL` late; later ones hang.
const RENEWALS_SLOW_THEN_HANG: u8 = 2;
const SLOW_RENEWAL: Duration = Duration::from_millis(1_500);

/// The embedded store, with faults: it refuses (as a database refuses a row
/// it cannot take) any write of output whose text or tool is "poison"; its
/// lease renewals answer, hang (a database that stopped answering) or land
/// late, as `renewals` says; and it tells `stored` of each mid-turn output
/// it stored.
struct FaultyStore {
    store: Arc<SqlStore>,
    /// What lease renewals do: one of the `RENEWALS_*` modes.
    renewals: Arc<AtomicU8>,
    /// When the last renewal that was answered began.
    renewed: Arc<Mutex<Option<Instant>>>,
    /// Told each time mid-turn output was stored.
    stored: Arc<tokio::sync::Notify>,
    /// Once set, recovery sweeps fail too (a node cut off from the
    /// database cannot take sessions over either).
    no_sweeps: Arc<AtomicBool>,
    /// While set, closing permission requests fails.
    no_closing: Arc<AtomicBool>,
    /// Once set, recording steered input a turn took fails.
    refuse_takes: Arc<AtomicBool>,
    /// While set, `take_turn` answers `Busy` (a running turn that is not
    /// the asking worker's).
    busy_takes: Arc<AtomicBool>,
    /// How many times `take_turn` was asked.
    takes: Arc<AtomicUsize>,
}

impl FaultyStore {
    fn new(store: SqlStore) -> Self {
        Self::sharing(Arc::new(store))
    }

    /// Over a store other nodes use too.
    fn sharing(store: Arc<SqlStore>) -> Self {
        Self {
            store,
            renewals: Arc::default(),
            renewed: Arc::default(),
            stored: Arc::default(),
            no_sweeps: Arc::default(),
            no_closing: Arc::default(),
            refuse_takes: Arc::default(),
            busy_takes: Arc::default(),
            takes: Arc::default(),
        }
    }
}

fn poisoned(entries: &[NewEntry]) -> bool {
    entries.iter().any(|e| {
        e.content.as_deref() == Some("poison")
            || e.tool.as_ref().and_then(|t| t.name.as_deref()) == Some("poison")
    })
}

fn refused() -> StoreError {
    StoreError::Internal("injected: the database refused the row".into())
}

#[async_trait]
impl Store for FaultyStore {
    async fn ping(&self) -> StoreResult<()> {
        self.store.ping().await
    }
    async fn create_session(&self, req: CreateSession) -> StoreResult<Created> {
        self.store.create_session(req).await
    }
    async fn session(&self, owner: &str, id: SessionId) -> StoreResult<Session> {
        self.store.session(owner, id).await
    }
    async fn session_by_key(&self, owner: &str, key: &str) -> StoreResult<Option<Session>> {
        self.store.session_by_key(owner, key).await
    }
    async fn list_sessions(&self, owner: &str, query: &SessionQuery) -> StoreResult<SessionPage> {
        self.store.list_sessions(owner, query).await
    }
    async fn delete_session(&self, owner: &str, id: SessionId) -> StoreResult<()> {
        self.store.delete_session(owner, id).await
    }
    async fn post_message(&self, req: PostMessage) -> StoreResult<Posted> {
        self.store.post_message(req).await
    }
    async fn post_message_to_run(&self, req: PostMessage) -> StoreResult<Posted> {
        self.store.post_message_to_run(req).await
    }
    async fn entries(&self, id: SessionId, after: Seq, limit: u32) -> StoreResult<Page> {
        self.store.entries(id, after, limit).await
    }
    async fn turns(&self, id: SessionId) -> StoreResult<Vec<Turn>> {
        self.store.turns(id).await
    }
    async fn request_cancel(
        &self,
        owner: &str,
        id: SessionId,
        reason: &str,
        only: Option<TurnId>,
    ) -> StoreResult<Option<TurnId>> {
        self.store.request_cancel(owner, id, reason, only).await
    }
    async fn next_turn(&self, lease: &Lease) -> StoreResult<Option<TurnToRun>> {
        self.store.next_turn(lease).await
    }
    async fn begin_turn(&self, lease: &Lease, turn: TurnId) -> StoreResult<Begin> {
        self.store.begin_turn(lease, turn).await
    }
    async fn append_output(
        &self,
        lease: &Lease,
        turn: TurnId,
        entries: Vec<NewEntry>,
    ) -> StoreResult<Vec<Entry>> {
        if poisoned(&entries) {
            return Err(refused());
        }
        let stored = self.store.append_output(lease, turn, entries).await?;
        self.stored.notify_one();
        Ok(stored)
    }
    async fn end_turn(
        &self,
        lease: &Lease,
        turn: TurnId,
        status: TurnStatus,
        reason: Option<String>,
        entries: Vec<NewEntry>,
    ) -> StoreResult<Ended> {
        if poisoned(&entries) {
            return Err(refused());
        }
        self.store
            .end_turn(lease, turn, status, reason, entries)
            .await
    }
    async fn take_turn(&self, lease: &Lease) -> StoreResult<Take> {
        self.takes.fetch_add(1, Ordering::SeqCst);
        if self.busy_takes.load(Ordering::SeqCst) {
            return Ok(Take::Busy);
        }
        self.store.take_turn(lease).await
    }
    async fn renew_lease(&self, lease: &Lease) -> StoreResult<Renewal> {
        let began = Instant::now();
        let mode = self.renewals.load(Ordering::SeqCst);
        if mode == RENEWALS_HANG {
            std::future::pending::<()>().await;
        }
        let renewal = self.store.renew_lease(lease).await;
        if renewal.is_ok() {
            *self.renewed.lock().expect("renewal clock") = Some(began);
        }
        if mode == RENEWALS_SLOW_THEN_HANG {
            self.renewals.store(RENEWALS_HANG, Ordering::SeqCst);
            tokio::time::sleep(SLOW_RENEWAL).await;
        }
        renewal
    }
    async fn release_lease(&self, lease: &Lease, force: bool) -> StoreResult<bool> {
        self.store.release_lease(lease, force).await
    }
    async fn set_agent_session(&self, lease: &Lease, agent_session: &str) -> StoreResult<()> {
        self.store.set_agent_session(lease, agent_session).await
    }
    async fn answer_permission(
        &self,
        req: baton_store::AnswerPermission,
    ) -> StoreResult<baton_store::Answered> {
        self.store.answer_permission(req).await
    }
    async fn close_permissions(
        &self,
        lease: &Lease,
        turn: TurnId,
        only: Option<String>,
        decided_by: &str,
        reason: &str,
    ) -> StoreResult<Vec<Entry>> {
        if self.no_closing.load(Ordering::SeqCst) {
            return Err(refused());
        }
        self.store
            .close_permissions(lease, turn, only, decided_by, reason)
            .await
    }
    async fn pending_permissions(&self, id: SessionId) -> StoreResult<Vec<Entry>> {
        self.store.pending_permissions(id).await
    }
    async fn permission_decisions(&self, id: SessionId, turn: TurnId) -> StoreResult<Vec<Entry>> {
        self.store.permission_decisions(id, turn).await
    }
    async fn steered_input(
        &self,
        lease: &Lease,
        turn: TurnId,
        after: Seq,
    ) -> StoreResult<Option<SteerBatch>> {
        self.store.steered_input(lease, turn, after).await
    }
    async fn take_input(&self, lease: &Lease, turn: TurnId, upto: Seq) -> StoreResult<()> {
        if self.refuse_takes.load(Ordering::SeqCst) {
            return Err(refused());
        }
        self.store.take_input(lease, turn, upto).await
    }
    async fn start_due(&self, node: &str) -> StoreResult<Due> {
        if self.no_sweeps.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("injected: cut off".into()));
        }
        self.store.start_due(node).await
    }
    async fn recover(&self, node: &str, all_foreign: bool) -> StoreResult<Vec<Recovered>> {
        if self.no_sweeps.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("injected: cut off".into()));
        }
        self.store.recover(node, all_foreign).await
    }
}

/// A worker told `Busy` by `take_turn` (the session's turn is running and
/// it is not this worker's) stops after that one ask: no loop of write
/// transactions while the lease lapses for the sweeper to end that turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_answer_stops_the_worker_instead_of_asking_again() {
    let takes = Arc::new(AtomicUsize::new(0));
    let counted = takes.clone();
    let f = engine_on("echo", Arc::new(Echo), move |store| {
        let mut faulty = FaultyStore::new(store);
        faulty.busy_takes = Arc::new(AtomicBool::new(true));
        faulty.takes = counted;
        Arc::new(faulty)
    })
    .await;
    let id = session(&f, "echo").await;
    let mut rx = f.engine.bus().subscribe(id);
    // The post begins its turn; the worker asks for the next one after it.
    post(&f, id, "hello").await;
    until_turn_ended(&mut rx).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while f.engine.active_actors() > 0 {
        assert!(
            Instant::now() < deadline,
            "the worker kept asking after Busy: {} asks",
            takes.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        takes.load(Ordering::SeqCst),
        1,
        "one ask, then the worker stops"
    );
}

/// A reply the store keeps refusing, arriving with the agent's stop (so it
/// is to be stored inside the turn's end), is given up after a few tries:
/// the actor ends the turn `failed` with only its terminal entry, instead of
/// leaving it to end `lost` when its lease expires; the session then takes
/// its next message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_the_store_refuses_at_the_end_fails_the_turn() {
    let f = engine_on("echo", Arc::new(Echo), |store| {
        Arc::new(FaultyStore::new(store))
    })
    .await;
    let id = session(&f, "echo").await;
    let mut rx = f.engine.bus().subscribe(id);

    post(&f, id, "poison").await;
    let (_, entries) = until_turn_ended(&mut rx).await;
    let ended = entries.last().expect("turn_ended");
    assert_eq!(
        ended.status,
        Some(TurnStatus::Failed),
        "ended failed by the actor, not lost by a takeover: {ended:?}"
    );
    let why = ended.reason.as_deref().unwrap_or_default();
    assert!(
        why.contains("could not store the agent's output") && why.contains("injected"),
        "{why}"
    );

    post(&f, id, "fine").await;
    let (_, entries) = until_turn_ended(&mut rx).await;
    assert_eq!(
        entries.last().and_then(|e| e.status),
        Some(TurnStatus::Completed)
    );
    let log = f
        .engine
        .store()
        .entries(id, 0, 100)
        .await
        .expect("entries")
        .entries;
    let texts: Vec<(EntryType, Option<&str>)> =
        log.iter().map(|e| (e.kind, e.content.as_deref())).collect();
    use EntryType::*;
    assert_eq!(
        texts,
        [
            (Message, Some("poison")),
            (TurnStarted, None),
            (TurnEnded, None),
            (Message, Some("fine")),
            (TurnStarted, None),
            (Message, Some("fine")),
            (TurnEnded, None),
        ],
        "the refused reply is not in the log; the failed turn has exactly one terminal entry"
    );
    f.engine.shutdown().await;
}

/// An agent that calls a tool, then a second one once the first is stored
/// (so the actor stores each on its own), then stops.
struct Tools(Arc<tokio::sync::Notify>);

#[async_trait]
impl AgentDriver for Tools {
    async fn start(&self, _input: TurnInput) -> Result<TurnHandle, AgentError> {
        let (tx, rx) = mpsc::channel(baton_agent::EVENT_CAPACITY);
        let stored = self.0.clone();
        let stop = Arc::new(tokio::sync::Notify::new());
        let cancelled = stop.clone();
        tokio::spawn(async move {
            let call = |id: &str, name: &str| {
                AgentEvent::Output(AgentOutput::ToolCall(ToolInfo {
                    id: id.into(),
                    name: Some(name.into()),
                    arguments: None,
                }))
            };
            let script = [
                call("stored", "search"),
                call("lost", "poison"),
                AgentEvent::Stopped(StopReason::Completed),
            ];
            for ev in script {
                if tx.send(ev).await.is_err() {
                    return;
                }
                // Bounded: a broken actor fails the test, never hangs it.
                tokio::select! {
                    _ = stored.notified() => {}
                    // The refused output stops the turn: cancel, drain.
                    _ = cancelled.notified() => {
                        let _ = tx.send(AgentEvent::Stopped(StopReason::Cancelled)).await;
                        return;
                    }
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(Duration::from_secs(20)) => {}
                }
            }
        });
        Ok(TurnHandle {
            events: rx,
            control: Box::new(StopOnCancel(stop)),
        })
    }
}

/// Tells the agent's script to stop (it answers `cancelled`).
struct StopOnCancel(Arc<tokio::sync::Notify>);

impl TurnControl for StopOnCancel {
    fn cancel(&self) {
        self.0.notify_one();
    }
    fn force_stop(&self) {
        self.0.notify_one();
    }
}

/// A tool call the store refuses mid-turn stops the turn (cancel, drain) and
/// ends it `failed`; its
/// closing entries answer the stored call and not the refused one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_tool_call_is_not_answered_at_the_end() {
    let stored = Arc::new(tokio::sync::Notify::new());
    let tools = Arc::new(Tools(stored.clone()));
    let f = engine_on("tools", tools, |store| {
        Arc::new(FaultyStore {
            stored,
            ..FaultyStore::new(store)
        })
    })
    .await;
    let id = session(&f, "tools").await;
    let mut rx = f.engine.bus().subscribe(id);
    post(&f, id, "go").await;
    let (_, entries) = until_turn_ended(&mut rx).await;
    assert_eq!(
        entries.last().and_then(|e| e.status),
        Some(TurnStatus::Failed)
    );
    let log = f
        .engine
        .store()
        .entries(id, 0, 100)
        .await
        .expect("entries")
        .entries;
    let tools: Vec<(EntryType, Option<&str>)> = log
        .iter()
        .filter(|e| e.tool.is_some())
        .map(|e| (e.kind, e.tool.as_ref().map(|t| t.id.as_str())))
        .collect();
    assert_eq!(
        tools,
        [
            (EntryType::ToolCall, Some("stored")),
            (EntryType::ToolResult, Some("stored")),
        ],
        "the stored call is answered, the refused one neither stored nor answered: {log:#?}"
    );
    f.engine.shutdown().await;
}

/// An agent that says one word, then waits to be stopped; its control notes
/// when the actor stopped it.
struct Waiter(Arc<Mutex<Option<Instant>>>);

struct WaiterControl(Arc<Mutex<Option<Instant>>>);

impl TurnControl for WaiterControl {
    fn cancel(&self) {
        self.force_stop();
    }
    fn force_stop(&self) {
        self.0
            .lock()
            .expect("stop clock")
            .get_or_insert_with(Instant::now);
    }
}

#[async_trait]
impl AgentDriver for Waiter {
    async fn start(&self, _input: TurnInput) -> Result<TurnHandle, AgentError> {
        let (tx, rx) = mpsc::channel(baton_agent::EVENT_CAPACITY);
        let _ = tx.try_send(AgentEvent::Delta("working".into()));
        // The sender stays in the channel's keeping: the turn never ends by
        // itself.
        std::mem::forget(tx);
        Ok(TurnHandle {
            events: rx,
            control: Box::new(WaiterControl(self.0.clone())),
        })
    }
}

/// Lease renewals that hang (the database stopped answering) must not keep a
/// worker running past its lease: it stops its agent while the lease it last
/// renewed is still its own, so a worker that takes the session over after
/// the lease expires never runs beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_lease_renewals_fence_the_worker_before_its_lease_expires() {
    renewals_fail_then_the_worker_fences(RENEWALS_HANG).await;
}

/// The same when the last renewal that lands answers late: the lease runs
/// from when that renewal began, not from its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_answered_renewal_does_not_stretch_the_lease() {
    renewals_fail_then_the_worker_fences(RENEWALS_SLOW_THEN_HANG).await;
}

async fn renewals_fail_then_the_worker_fences(mode: u8) {
    let stopped = Arc::new(Mutex::new(None));
    let (renewals, renewed) = (Arc::new(AtomicU8::new(RENEWALS_ANSWER)), Arc::default());
    let cfg = EngineConfig {
        heartbeat: Duration::from_millis(300),
        lease_ttl: Duration::from_millis(3_000),
        ..EngineConfig::default()
    };
    let f = engine_with(
        "waiter",
        Arc::new(Waiter(stopped.clone())),
        |store| {
            Arc::new(FaultyStore {
                renewals: renewals.clone(),
                renewed: Arc::clone(&renewed),
                ..FaultyStore::new(store)
            })
        },
        cfg.clone(),
    )
    .await;
    let id = session(&f, "waiter").await;
    let mut rx = f.engine.bus().subscribe(id);
    post(&f, id, "go").await;
    until_delta(&mut rx).await;
    // Let a renewal land, then the database falters.
    let patience = Instant::now() + Duration::from_secs(20);
    while renewed.lock().expect("renewal clock").is_none() {
        assert!(Instant::now() < patience, "no renewal within 20 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    renewals.store(mode, Ordering::SeqCst);
    while stopped.lock().expect("stop clock").is_none() {
        assert!(
            Instant::now() < patience,
            "the worker kept its agent running with its renewals failing"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stopped_at = stopped.lock().expect("stop clock").expect("stopped");
    let renewed_at = renewed.lock().expect("renewal clock").expect("renewed");
    assert!(
        stopped_at < renewed_at + cfg.lease_ttl,
        "the agent was stopped {:?} after the last renewal that landed began, \
         past the lease's {:?}",
        stopped_at - renewed_at,
        cfg.lease_ttl
    );
    f.engine.shutdown().await;
}

// ---------------------------------------------------------------------------
// Takeovers under random start delays: a property of the engine

/// An agent that counts the prompts in flight per session (and the most
/// ever seen at once), tags every word with its turn, and, at the turn
/// numbered `hang_at`, makes node A's lease renewals hang and talks until it
/// is forced off (so node B must take the session over).
struct Probe {
    delays: Vec<u64>,
    hang_at: usize,
    late: bool,
    starts: std::sync::atomic::AtomicUsize,
    in_flight: Arc<Mutex<std::collections::HashMap<SessionId, usize>>>,
    most: Arc<std::sync::atomic::AtomicUsize>,
    a_renewals: Arc<AtomicU8>,
    a_no_sweeps: Arc<AtomicBool>,
}

/// Ends one prompt's flight once, on whichever comes first.
struct Flight {
    session: SessionId,
    done: AtomicBool,
    in_flight: Arc<Mutex<std::collections::HashMap<SessionId, usize>>>,
    stop: Arc<tokio::sync::Notify>,
}

impl Flight {
    fn land(&self) {
        if !self.done.swap(true, Ordering::SeqCst) {
            let mut m = self.in_flight.lock().expect("in-flight map");
            if let Some(n) = m.get_mut(&self.session) {
                *n -= 1;
            }
        }
    }
}

struct FlightControl(Arc<Flight>);

impl TurnControl for FlightControl {
    fn cancel(&self) {
        self.0.stop.notify_one();
    }
    fn force_stop(&self) {
        // Synchronous: once forced, the agent does nothing more for it.
        self.0.land();
        self.0.stop.notify_one();
    }
}

#[async_trait]
impl AgentDriver for Probe {
    async fn start(&self, input: TurnInput) -> Result<TurnHandle, AgentError> {
        let n = self.starts.fetch_add(1, Ordering::SeqCst);
        let delay = self
            .delays
            .get(n % self.delays.len().max(1))
            .copied()
            .unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        if !input.fence.holds() {
            return Err(AgentError::Unavailable("fenced before the prompt".into()));
        }
        {
            let mut m = self.in_flight.lock().expect("in-flight map");
            let c = m.entry(input.session_id).or_default();
            *c += 1;
            self.most.fetch_max(*c, Ordering::SeqCst);
        }
        let hang = n == self.hang_at;
        if hang {
            self.a_no_sweeps.store(true, Ordering::SeqCst);
            self.a_renewals.store(RENEWALS_HANG, Ordering::SeqCst);
        }
        let flight = Arc::new(Flight {
            session: input.session_id,
            done: AtomicBool::new(false),
            in_flight: self.in_flight.clone(),
            stop: Arc::new(tokio::sync::Notify::new()),
        });
        let (tx, rx) = mpsc::channel(baton_agent::EVENT_CAPACITY);
        let (f, late, turn) = (flight.clone(), self.late, input.turn_id);
        tokio::spawn(async move {
            let words = if hang { 10_000 } else { 3 };
            for _ in 0..words {
                tokio::select! {
                    _ = f.stop.notified() => {
                        f.land();
                        let _ = tx.send(AgentEvent::Stopped(StopReason::Cancelled)).await;
                        return;
                    }
                    _ = tokio::time::sleep(Duration::from_millis(40)) => {}
                }
                if tx
                    .send(AgentEvent::Delta(format!("{turn} ")))
                    .await
                    .is_err()
                {
                    f.land();
                    return;
                }
            }
            // Landed before it says so: the next prompt may follow at once.
            f.land();
            let _ = tx.send(AgentEvent::Stopped(StopReason::Completed)).await;
            if late {
                // Talks after its answer: never stored in any turn.
                let _ = tx.send(AgentEvent::Delta("LATE ".into())).await;
            }
        });
        Ok(TurnHandle {
            events: rx,
            control: Box::new(FlightControl(flight)),
        })
    }
}

fn takeover_config(node: &str) -> EngineConfig {
    EngineConfig {
        node: node.into(),
        heartbeat: Duration::from_millis(250),
        lease_ttl: Duration::from_millis(3_000),
        sweep_interval: Duration::from_millis(100),
        cancel_drain: Duration::from_millis(300),
        sole_owner: false,
        ..EngineConfig::default()
    }
}

/// One run: `messages` queued on node A; the agent's starts are delayed by
/// `delays`; at start `hang_at` node A's renewals hang, and node B takes the
/// session over. Whatever the timing: never two prompts in flight on one
/// session, every stored word in the turn that produced it, every turn
/// ended (the one A lost `lost`, the others `completed`), seqs gapless.
async fn takeover_run(delays: Vec<u64>, messages: usize, hang_at: usize, late: bool) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = Arc::new(
        SqlStore::open_sqlite(
            &dir.path().join("baton.db"),
            StoreConfig {
                lease_ttl: Duration::from_millis(3_000),
                ..StoreConfig::default()
            },
        )
        .await
        .expect("open the embedded store"),
    );
    let a_store = FaultyStore::sharing(store.clone());
    let a_renewals = a_store.renewals.clone();
    let a_no_sweeps = a_store.no_sweeps.clone();
    let probe = Arc::new(Probe {
        delays,
        hang_at,
        late,
        starts: Default::default(),
        in_flight: Default::default(),
        most: Default::default(),
        a_renewals,
        a_no_sweeps,
    });
    let mut agents = Agents::default();
    agents.insert("probe", probe.clone() as Arc<dyn AgentDriver>);
    let a = Engine::new(
        Arc::new(a_store),
        Bus::default(),
        agents.clone(),
        takeover_config("a"),
    );
    let b = Engine::new(
        Arc::new(FaultyStore::sharing(store.clone())),
        Bus::default(),
        agents,
        takeover_config("b"),
    );
    a.start().await.expect("engine a");
    b.start().await.expect("engine b");
    let fa = Fixture {
        engine: a.clone(),
        _dir: dir,
    };
    let id = session(&fa, "probe").await;
    for i in 0..messages {
        post(&fa, id, &format!("m{i}")).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let turns = loop {
        let turns = store.turns(id).await.expect("turns");
        let idle = store
            .session("o", id)
            .await
            .expect("session")
            .turn_id
            .is_none();
        if idle && turns.len() == messages && turns.iter().all(|t| t.ended_at.is_some()) {
            break turns;
        }
        assert!(
            Instant::now() < deadline,
            "the session never settled: {turns:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        probe.most.load(Ordering::SeqCst),
        1,
        "two prompts were in flight on one session"
    );
    let entries = store.entries(id, 0, 1_000).await.expect("entries").entries;
    let seqs: Vec<Seq> = entries.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=entries.len() as Seq).collect::<Vec<_>>(), "I1");
    for e in entries
        .iter()
        .filter(|e| e.kind == EntryType::Message && e.turn_id.is_some())
    {
        let own = e.turn_id.map(|t| t.to_string()).unwrap_or_default();
        let content = e.content.as_deref().unwrap_or_default();
        assert!(
            content.split_whitespace().all(|w| w == own),
            "output of another turn (or late output) stored in {own}: {content:?}"
        );
    }
    for (i, t) in turns.iter().enumerate() {
        let want = if i == hang_at {
            TurnStatus::Lost
        } else {
            TurnStatus::Completed
        };
        assert_eq!(t.status, want, "turn {i}: {t:?}");
    }
    a.shutdown().await;
    b.shutdown().await;
}

mod takeover {
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4, failure_persistence: None, ..ProptestConfig::default() })]
        #[test]
        fn takeovers_under_random_start_delays_keep_one_prompt_in_flight(
            delays in proptest::collection::vec(0u64..700, 1..5),
            messages in 2usize..5,
            hang in 0usize..4,
            late in any::<bool>(),
        ) {
            let hang_at = hang % messages;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("a runtime");
            rt.block_on(super::takeover_run(delays, messages, hang_at, late));
        }
    }
}

// ---------------------------------------------------------------------------
// Output order and exports under random agent scripts: a property of the
// engine

/// How a scripted turn ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ending {
    /// The agent completes.
    Complete,
    /// The user cancels; the agent stops.
    Cancel,
    /// The agent fails.
    Fail,
    /// The turn's time runs out; the agent stops when told.
    Timeout,
    /// The user cancels; the agent ignores it and is forced at the drain
    /// deadline.
    Forced,
    /// The worker vanishes (its renewals hang, it fences itself); another
    /// node ends the turn `lost`.
    Lost,
}

/// One step of an agent's script.
#[derive(Clone, Debug)]
enum Step {
    Text(String),
    Thought(String),
    /// A tool call with this name.
    Call(String),
    /// The result of the open call at this index (modulo), if any is open.
    Result(usize),
    /// A permission request and its decision, for the open call at this
    /// index (modulo), or for no stored call when none is open.
    Permission(usize),
}

/// An agent that plays a script, then ends as `ending` says.
struct Scripted {
    events: Vec<AgentEvent>,
    ending: Ending,
}

/// Tells a scripted agent to stop; it answers (or not) as its ending says.
struct ScriptControl {
    cancel: Arc<tokio::sync::Notify>,
    kill: Arc<tokio::sync::Notify>,
}

impl TurnControl for ScriptControl {
    fn cancel(&self) {
        self.cancel.notify_one();
    }
    fn force_stop(&self) {
        self.kill.notify_one();
    }
}

#[async_trait]
impl AgentDriver for Scripted {
    async fn start(&self, _input: TurnInput) -> Result<TurnHandle, AgentError> {
        let (tx, rx) = mpsc::channel(baton_agent::EVENT_CAPACITY);
        let cancel = Arc::new(tokio::sync::Notify::new());
        let kill = Arc::new(tokio::sync::Notify::new());
        let (events, ending) = (self.events.clone(), self.ending);
        let (cancelled, killed) = (cancel.clone(), kill.clone());
        tokio::spawn(async move {
            for ev in events {
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
            let stop = match ending {
                Ending::Complete => Some(StopReason::Completed),
                Ending::Fail => Some(StopReason::Failed("scripted failure".into())),
                Ending::Cancel | Ending::Timeout => {
                    tokio::select! {
                        _ = cancelled.notified() => Some(StopReason::Cancelled),
                        _ = killed.notified() => None,
                        _ = tx.closed() => None,
                    }
                }
                // Ignores cancels: only a forced stop (or the actor
                // dropping the turn) ends it.
                Ending::Forced | Ending::Lost => {
                    tokio::select! {
                        _ = killed.notified() => None,
                        _ = tx.closed() => None,
                    }
                }
            };
            if let Some(stop) = stop {
                let _ = tx.send(AgentEvent::Stopped(stop)).await;
            }
        });
        Ok(TurnHandle {
            events: rx,
            control: Box::new(ScriptControl { cancel, kill }),
        })
    }
}

/// The agent's events for `steps`, and the calls it made, in order.
fn play(steps: &[Step]) -> Vec<AgentEvent> {
    let mut events = Vec::new();
    let mut open: Vec<String> = Vec::new();
    let mut calls = 0;
    for step in steps {
        match step {
            Step::Text(t) => events.push(AgentEvent::Delta(t.clone())),
            Step::Thought(t) => events.push(AgentEvent::Thought(t.clone())),
            Step::Call(name) => {
                calls += 1;
                let id = format!("call {calls}");
                open.push(id.clone());
                events.push(AgentEvent::Output(AgentOutput::ToolCall(ToolInfo {
                    id,
                    name: Some(name.clone()),
                    arguments: Some(serde_json::json!({ "n": calls })),
                })));
            }
            Step::Result(i) => {
                if open.is_empty() {
                    continue;
                }
                let id = open.remove(i % open.len());
                events.push(AgentEvent::Output(AgentOutput::ToolResult {
                    content: format!("result of {id}"),
                    id,
                }));
            }
            Step::Permission(i) => {
                let call = if open.is_empty() {
                    "never called".to_owned()
                } else {
                    open[i % open.len()].clone()
                };
                let request = baton_core::PermissionInfo::request(
                    Some(call),
                    Some("edit".into()),
                    vec![baton_core::PermissionOptionInfo {
                        option_id: "yes".into(),
                        name: "Allow once".into(),
                        kind: "allow_once".into(),
                    }],
                );
                let decision = request.decision(Some("yes".into()), "policy");
                events.push(AgentEvent::Output(AgentOutput::PermissionRequest(request)));
                events.push(AgentEvent::Output(AgentOutput::PermissionDecision(
                    decision,
                )));
            }
        }
    }
    events
}

/// An entry's shape, for comparing what was stored with what was produced.
type Shape = (
    EntryType,
    Option<String>,
    Option<String>,
    Option<TurnStatus>,
);

fn shape(e: &NewEntry) -> Shape {
    (
        e.kind,
        e.content.clone(),
        e.tool
            .as_ref()
            .map(|t| t.id.clone())
            .or_else(|| e.permission.as_ref().map(|p| p.request_id.clone())),
        e.status,
    )
}

/// What the turn must have stored, in order, for what the agent produced:
/// each run of text or of thought as one entry before the output that
/// ended it; a trailing run of text only on completion, a trailing run of
/// thought on any end the worker records (not on loss); then a result for
/// each call left open, carrying the turn's status; then `turn_ended`.
/// Returns the entries and how many of them precede the trailing run.
fn expected(turn: TurnId, events: &[AgentEvent], status: TurnStatus) -> (Vec<Shape>, usize) {
    let mut out: Vec<NewEntry> = Vec::new();
    let mut run = String::new();
    let mut thinking = false;
    let mut open: Vec<String> = Vec::new();
    let flush = |out: &mut Vec<NewEntry>, run: &mut String, thinking: bool| {
        if !run.is_empty() {
            let text = std::mem::take(run);
            out.push(if thinking {
                NewEntry::thought(turn, text)
            } else {
                NewEntry::assistant_message(turn, text)
            });
        }
    };
    for ev in events {
        match ev {
            AgentEvent::Delta(t) => {
                if thinking {
                    flush(&mut out, &mut run, true);
                }
                thinking = false;
                run.push_str(t);
            }
            AgentEvent::Thought(t) => {
                if !thinking {
                    flush(&mut out, &mut run, false);
                }
                thinking = true;
                run.push_str(t);
            }
            AgentEvent::Output(o) => {
                flush(&mut out, &mut run, thinking);
                out.push(match o.clone() {
                    AgentOutput::ToolCall(t) => {
                        open.push(t.id.clone());
                        NewEntry::tool_call(turn, t)
                    }
                    AgentOutput::ToolResult { id, content } => {
                        open.retain(|o| *o != id);
                        NewEntry::tool_result(turn, id, content)
                    }
                    AgentOutput::PermissionRequest(p) => NewEntry::permission_request(turn, p),
                    AgentOutput::PermissionDecision(p) => NewEntry::permission_decision(turn, p),
                    AgentOutput::Message(m) => NewEntry::assistant_message(turn, m),
                    AgentOutput::System(m) => NewEntry::system_message(turn, m),
                });
            }
            // Taken input moves the turn's record, not its entries.
            AgentEvent::Stopped(_)
            | AgentEvent::AgentSession(_)
            | AgentEvent::AskPermission(_)
            | AgentEvent::InputTaken(_) => {}
        }
    }
    let flushed = out.len();
    let keep_trailing = match status {
        TurnStatus::Completed => true,
        TurnStatus::Lost => false,
        _ => thinking,
    };
    if keep_trailing {
        flush(&mut out, &mut run, thinking);
    }
    let mut shapes: Vec<Shape> = out.iter().map(shape).collect();
    for id in open {
        shapes.push((EntryType::ToolResult, None, Some(id), Some(status)));
    }
    shapes.push((EntryType::TurnEnded, None, None, Some(status)));
    (shapes, flushed)
}

fn order_config(node: &str, ending: Ending) -> EngineConfig {
    EngineConfig {
        node: node.into(),
        heartbeat: Duration::from_millis(100),
        lease_ttl: Duration::from_millis(1_500),
        sweep_interval: Duration::from_millis(100),
        cancel_drain: if ending == Ending::Forced {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(30)
        },
        turn_timeout: if ending == Ending::Timeout {
            Duration::from_millis(300)
        } else {
            Duration::from_secs(60)
        },
        sole_owner: false,
        ..EngineConfig::default()
    }
}

/// Waits until `check` holds on the session's log.
async fn until_log(
    store: &dyn Store,
    id: SessionId,
    what: &str,
    check: impl Fn(&[Entry]) -> bool,
) -> Vec<Entry> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = store.entries(id, 0, 1_000).await.expect("entries").entries;
        if check(&log) {
            return log;
        }
        assert!(Instant::now() < deadline, "{what} within 30 s: {log:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One run: the script's turn on node A, ended as `ending` says (node B
/// takes over when A's worker vanishes). The stored order is the produced
/// order, every call is answered, and both exports pass their API's checks
/// whatever the range.
async fn order_run(steps: Vec<Step>, ending: Ending, cut: (u64, u64)) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = Arc::new(
        SqlStore::open_sqlite(
            &dir.path().join("baton.db"),
            StoreConfig {
                lease_ttl: Duration::from_millis(1_500),
                ..StoreConfig::default()
            },
        )
        .await
        .expect("open the embedded store"),
    );
    let events = play(&steps);
    let mut agents = Agents::default();
    agents.insert(
        "scripted",
        Arc::new(Scripted {
            events: events.clone(),
            ending,
        }) as Arc<dyn AgentDriver>,
    );
    let a_store = FaultyStore::sharing(store.clone());
    let (a_renewals, a_no_sweeps) = (a_store.renewals.clone(), a_store.no_sweeps.clone());
    let a = Engine::new(
        Arc::new(a_store),
        Bus::default(),
        agents.clone(),
        order_config("a", ending),
    );
    a.start().await.expect("engine a");
    // B only sweeps: it takes the session over once A's lease expires.
    let b = Engine::new(
        Arc::new(FaultyStore::sharing(store.clone())),
        Bus::default(),
        agents,
        order_config("b", ending),
    );
    b.start().await.expect("engine b");
    let fa = Fixture {
        engine: a.clone(),
        _dir: dir,
    };
    let id = session(&fa, "scripted").await;
    post(&fa, id, "go").await;
    let started = until_log(store.as_ref(), id, "the turn starts", |log| {
        log.iter().any(|e| e.kind == EntryType::TurnStarted)
    })
    .await;
    let turn = started
        .iter()
        .find_map(|e| {
            (e.kind == EntryType::TurnStarted)
                .then_some(e.turn_id)
                .flatten()
        })
        .expect("a turn id");
    let status = match ending {
        Ending::Complete => TurnStatus::Completed,
        Ending::Cancel | Ending::Forced => TurnStatus::Cancelled,
        Ending::Fail => TurnStatus::Failed,
        Ending::Timeout => TurnStatus::TimedOut,
        Ending::Lost => TurnStatus::Lost,
    };
    let (want, flushed) = expected(turn, &events, status);
    // Stops that drop what the agent did not deliver yet (a forced stop, a
    // vanished worker) come once its output up to the trailing run is stored.
    if matches!(ending, Ending::Forced | Ending::Lost) {
        until_log(store.as_ref(), id, "the agent's output is stored", |log| {
            log.len() >= 2 + flushed
        })
        .await;
    }
    match ending {
        Ending::Cancel | Ending::Forced => {
            a.cancel("o", id, None).await.expect("cancel");
        }
        Ending::Lost => {
            a_no_sweeps.store(true, Ordering::SeqCst);
            a_renewals.store(RENEWALS_HANG, Ordering::SeqCst);
        }
        Ending::Complete | Ending::Fail | Ending::Timeout => {}
    }
    let log = until_log(store.as_ref(), id, "the turn ends", |log| {
        log.iter().any(|e| e.kind == EntryType::TurnEnded)
    })
    .await;
    let stored: Vec<Shape> = log[2..]
        .iter()
        .map(|e| {
            let closing = e.kind == EntryType::ToolResult && e.status.is_some();
            (
                e.kind,
                if closing { None } else { e.content.clone() },
                e.tool
                    .as_ref()
                    .map(|t| t.id.clone())
                    .or_else(|| e.permission.as_ref().map(|p| p.request_id.clone())),
                e.status,
            )
        })
        .collect();
    assert_eq!(stored, want, "stored order != produced order ({ending:?})");
    let ended = log.last().expect("turn_ended");
    if ending == Ending::Forced {
        assert!(
            ended
                .reason
                .as_deref()
                .is_some_and(|r| r.contains("forced")),
            "{ended:?}"
        );
    }
    for closing in log
        .iter()
        .filter(|e| e.kind == EntryType::ToolResult && e.status.is_some())
    {
        assert_eq!(
            (closing.reason.as_deref(), closing.created_at),
            (ended.reason.as_deref(), ended.created_at),
            "a closing result carries the turn's reason, in the transaction of its end"
        );
    }
    let last = log.len() as u64;
    for opts in [
        baton_core::export::Options::default(),
        baton_core::export::Options {
            include_thoughts: true,
            include_running: true,
            ..Default::default()
        },
        baton_core::export::Options {
            after: cut.0 % last,
            upto: Some(cut.0 % last + cut.1 % last),
            include_thoughts: true,
            ..Default::default()
        },
    ] {
        let openai = baton_core::export::openai(&log, &opts);
        baton_core::export::check::openai(&openai)
            .unwrap_or_else(|e| panic!("OpenAI export ({opts:?}): {e}\n{openai:#?}\nof {log:#?}"));
        let anthropic = baton_core::export::anthropic(&log, &opts);
        baton_core::export::check::anthropic(&anthropic).unwrap_or_else(|e| {
            panic!("Anthropic export ({opts:?}): {e}\n{anthropic:#?}\nof {log:#?}")
        });
    }
    a.shutdown().await;
    b.shutdown().await;
}

mod order {
    use proptest::prelude::*;

    use super::{Ending, Step};

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => "[a-z]{1,6} ?".prop_map(Step::Text),
            1 => "[a-z]{1,6} ?".prop_map(Step::Thought),
            2 => prop_oneof![Just("grep"), Just("write file"), Just("read.me")]
                .prop_map(|n| Step::Call(n.to_owned())),
            2 => (0usize..4).prop_map(Step::Result),
            1 => (0usize..4).prop_map(Step::Permission),
        ]
    }

    fn ending() -> impl Strategy<Value = Ending> {
        prop_oneof![
            Just(Ending::Complete),
            Just(Ending::Cancel),
            Just(Ending::Fail),
            Just(Ending::Timeout),
            Just(Ending::Forced),
            Just(Ending::Lost),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]
        #[test]
        fn stored_order_is_produced_order_and_exports_are_valid(
            steps in proptest::collection::vec(step(), 0..24),
            ending in ending(),
            cut in (any::<u64>(), any::<u64>()),
        ) {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("a runtime");
            rt.block_on(super::order_run(steps, ending, cut));
        }
    }
}

/// A cancel answers the turn's waiting permission requests first; when the
/// store refuses that, the turn's end closes them in its own transaction,
/// before its terminal entry: a request is never left open, and the agent
/// still hears `cancelled` (the turn drains instead of hanging).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_close_leaves_the_request_to_the_turns_end() {
    let refuse = Arc::new(AtomicBool::new(true));
    let flag = refuse.clone();
    let f = engine_on(
        "demo",
        Arc::new(baton_agent::DemoAgent::default()),
        move |store| {
            let mut faulty = FaultyStore::new(store);
            faulty.no_closing = flag;
            Arc::new(faulty)
        },
    )
    .await;
    let id = session(&f, "demo").await;
    let mut rx = f.engine.bus().subscribe(id);
    post(&f, id, "/ask go").await;
    loop {
        match tokio::time::timeout(Duration::from_secs(20), rx.recv()).await {
            Ok(Ok(BusEvent::Entry(e))) if e.kind == EntryType::PermissionRequest => break,
            Ok(Ok(_)) => {}
            other => panic!("waiting for the permission request: {other:?}"),
        }
    }
    f.engine.cancel("o", id, None).await.expect("cancel");
    let (_, entries) = until_turn_ended(&mut rx).await;
    assert!(
        refuse.load(Ordering::SeqCst),
        "the close was refused throughout"
    );
    let ended = entries.last().expect("turn_ended");
    assert_eq!(ended.status, Some(TurnStatus::Cancelled), "{ended:?}");
    let decisions: Vec<&Entry> = entries
        .iter()
        .filter(|e| e.kind == EntryType::PermissionDecision)
        .collect();
    assert_eq!(decisions.len(), 1, "{entries:?}");
    let d = decisions[0];
    let p = d.permission.as_ref().expect("the decision's permission");
    assert_eq!(p.outcome.as_deref(), Some("cancelled"));
    assert_eq!(p.decided_by.as_deref(), Some("turn_end"));
    assert_eq!(d.reason.as_deref(), Some("the turn ended cancelled"));
    // The agent heard `cancelled` before the cancel, so it may have stored
    // its own result for the call first; else the end's synthetic result
    // comes after the decision. Either way only results and the end follow.
    let after: Vec<EntryType> = entries
        .iter()
        .filter(|e| e.seq > d.seq)
        .map(|e| e.kind)
        .collect();
    assert_eq!(after.last(), Some(&EntryType::TurnEnded), "{entries:#?}");
    assert!(
        after[..after.len() - 1]
            .iter()
            .all(|k| *k == EntryType::ToolResult),
        "only the results that close calls, then the turn's end: {entries:#?}"
    );
    let results = entries
        .iter()
        .filter(|e| e.kind == EntryType::ToolResult)
        .count();
    assert_eq!(results, 1, "the call is answered once: {entries:#?}");
    assert!(f
        .engine
        .store()
        .pending_permissions(id)
        .await
        .expect("pending")
        .is_empty());
}

/// Steering's fault path: the agent took a steered message but the store
/// refuses to record it. The turn must not go on as if the agent had not
/// seen it: it ends `failed`, saying why, and the message — still waiting in
/// the log — runs in the next turn (I6: consumed exactly once, by the turn
/// whose record lists it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steered_message_the_store_cannot_record_fails_the_turn_and_runs_next() {
    let faulty = Arc::new(std::sync::OnceLock::new());
    let keep = faulty.clone();
    let demo = baton_agent::DemoAgent {
        word_delay: Duration::from_millis(1),
        ..Default::default()
    };
    let f = engine_on("demo", Arc::new(demo), move |store| {
        let s = Arc::new(FaultyStore::new(store));
        s.refuse_takes.store(true, Ordering::SeqCst);
        let _ = keep.set(s.clone());
        s
    })
    .await;
    let id = session(&f, "demo").await;
    let mut rx = f.engine.bus().subscribe(id);
    post(&f, id, "/sleep 2000 a long answer").await;
    until_delta(&mut rx).await;
    let steered = f
        .engine
        .post_message(PostMessage {
            owner: "o".into(),
            session_id: id,
            content: "mind the tests".into(),
            policy: Some(Policy::Steer),
            idempotency_key: None,
            node: f.engine.node().to_owned(),
            mid_turn_agents: Vec::new(),
        })
        .await
        .expect("post a steer");
    assert_eq!(
        steered.disposition.kind,
        baton_core::DispositionType::Steered,
        "the engine knows the demo agent takes mid-turn input"
    );
    let (_, entries) = until_turn_ended(&mut rx).await;
    let ended = entries.last().expect("turn_ended");
    assert_eq!(ended.status, Some(TurnStatus::Failed), "{ended:?}");
    assert!(
        ended
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("could not record the steered input")),
        "{ended:?}"
    );
    let (_, next) = until_turn_ended(&mut rx).await;
    let store = faulty.get().expect("the store");
    let turns = store.turns(id).await.expect("turns");
    assert_eq!(turns.len(), 2, "{turns:?}");
    assert_eq!(turns[0].input.to, 1, "the failed turn's record: {turns:?}");
    assert_eq!(
        turns[1].input,
        baton_core::InputRange {
            from: steered.entry.seq,
            to: steered.entry.seq
        }
    );
    assert!(
        next.iter()
            .any(|e| e.content.as_deref() == Some("echo: mind the tests")),
        "the next turn ran it: {next:?}"
    );
    f.engine.shutdown().await;
}
