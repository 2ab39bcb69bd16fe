//! The session engine: runs turns, one at a time per session, on whichever
//! node holds the session's lease.
//!
//! - The [`Engine`] is what the API calls. Every state change goes through a
//!   store transaction first (policy decisions included); the engine then
//!   publishes what was committed and, if the transaction handed this node a
//!   lease, spawns the session's actor. There is no check-then-act across an
//!   await: the guard is the transaction itself.
//! - One actor (a tokio task, [`actor`]) per session with work on this node;
//!   idle sessions cost no task. It executes the `baton_core::turn`
//!   machine's actions: prompt, stream, store, cancel, drain, end.
//! - Heartbeats renew the lease; an actor that cannot renew stops its turn at
//!   once and writes nothing more (self-fencing; the store refuses stale
//!   epochs anyway).
//! - A sweeper takes over sessions whose lease expired with a turn active
//!   (crash recovery: the dead worker's turn ends `lost`, the queue goes on),
//!   and starts the turns of debounce windows that are due. The windows are
//!   stored, so any node's sweeper may start one, also after a restart; the
//!   node that opened or moved a window wakes its sweeper right when it is
//!   due.

mod actor;
pub mod bus;
pub mod metrics;
pub mod pg_bus;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_agent::Agents;
use baton_core::Entry;
use baton_core::TurnId;
use baton_core::{Session, SessionId};
use baton_store::{
    AnswerPermission, Answered, CreateSession, Created, Lease, PostMessage, Posted, Result,
    SharedStore,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

pub use bus::{Bus, BusEvent, Relay};

/// How the engine runs turns.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// This node's name in leases; unique per process.
    pub node: String,
    /// How long an agent gets to stop after a cancel before it is forced.
    pub cancel_drain: Duration,
    /// A turn's time budget.
    pub turn_timeout: Duration,
    /// How often a running turn renews its lease.
    pub heartbeat: Duration,
    /// How long a lease lasts unrenewed (the store's setting; an actor that
    /// cannot renew for this long stops itself).
    pub lease_ttl: Duration,
    /// How often the sweeper looks for sessions whose worker vanished.
    pub sweep_interval: Duration,
    /// Whether this process owns the store alone (the embedded store): then
    /// at start-up every lease not its own is a dead process's.
    pub sole_owner: bool,
    /// The cap on one stored message, tool result or run of text.
    pub max_output_bytes: usize,
    /// How long running turns may go on after shutdown begins before they
    /// are cancelled (zero: cancel at once).
    pub shutdown_grace: Duration,
    /// How long a permission request waits for the user's answer before it
    /// is answered `cancelled`.
    pub permission_timeout: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            node: format!("node-{}", uuid::Uuid::new_v4().simple()),
            cancel_drain: Duration::from_secs(5),
            turn_timeout: Duration::from_secs(600),
            heartbeat: Duration::from_secs(3),
            lease_ttl: Duration::from_secs(10),
            sweep_interval: Duration::from_secs(2),
            sole_owner: true,
            max_output_bytes: baton_core::turn::DEFAULT_MAX_OUTPUT,
            shutdown_grace: Duration::from_secs(30),
            permission_timeout: Duration::from_secs(600),
        }
    }
}

struct ActorSlot {
    epoch: i64,
    task: JoinHandle<()>,
}

pub(crate) struct Inner {
    pub store: SharedStore,
    pub bus: Bus,
    pub agents: Agents,
    pub cfg: EngineConfig,
    /// Actors on this node by session. A std mutex: held only to insert or
    /// remove, never across an await. An entry is replaced by a newer epoch's
    /// actor and removed by its own actor as it exits.
    actors: Mutex<HashMap<SessionId, ActorSlot>>,
    /// Flips to true once, when shutdown begins: actors take no new turn
    /// (they release their leases between turns).
    pub stopping: watch::Sender<bool>,
    /// Flips to true once, when the shutdown grace is over: actors cancel
    /// their running turns.
    pub shutdown: watch::Sender<bool>,
    /// Flips to true once every actor has exited: streams end.
    closed: watch::Sender<bool>,
    /// The agents that take input mid-turn (a `steer` joins their turns).
    mid_turn_agents: Vec<String>,
    /// When the earliest debounce window this node knows of is due; the
    /// sweeper sleeps until then. A std mutex, never held across an await.
    due_at: Mutex<Option<tokio::time::Instant>>,
    /// Wakes the sweeper when `due_at` moved earlier.
    due_moved: tokio::sync::Notify,
    /// Turns ended on this node.
    pub turn_metrics: metrics::TurnMetrics,
}

/// The engine. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl Engine {
    /// An engine over `store`, publishing to `bus`, running `agents`.
    pub fn new(store: SharedStore, bus: Bus, agents: Agents, cfg: EngineConfig) -> Self {
        let mid_turn_agents = agents
            .iter()
            .filter(|(_, d)| d.takes_mid_turn_input())
            .map(|(name, _)| name.to_owned())
            .collect();
        Self {
            inner: Arc::new(Inner {
                store,
                bus,
                agents,
                cfg,
                actors: Mutex::new(HashMap::new()),
                stopping: watch::channel(false).0,
                shutdown: watch::channel(false).0,
                closed: watch::channel(false).0,
                mid_turn_agents,
                due_at: Mutex::new(None),
                due_moved: tokio::sync::Notify::new(),
                turn_metrics: metrics::TurnMetrics::default(),
            }),
        }
    }

    /// Remembers that a debounce window is due `in_` from now, and wakes
    /// the sweeper if that is earlier than what it waits for.
    fn due_in(&self, in_: Duration) {
        let at = tokio::time::Instant::now() + in_;
        let mut due = self.inner.due_at.lock().unwrap_or_else(|p| p.into_inner());
        if due.is_none_or(|d| at < d) {
            *due = Some(at);
            self.inner.due_moved.notify_one();
        }
    }

    /// Recovers what a previous process left behind and starts the sweeper.
    pub async fn start(&self) -> Result<()> {
        self.sweep(self.inner.cfg.sole_owner).await?;
        let engine = self.clone();
        let mut stop = self.inner.shutdown.subscribe();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(engine.inner.cfg.sweep_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let bus = engine.inner.bus.clone();
            loop {
                let due = *engine
                    .inner
                    .due_at
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                tokio::select! {
                    _ = tick.tick() => {}
                    // Another node (or this one) handed a session over: take
                    // it now rather than at the next tick.
                    _ = bus.released() => {}
                    // A debounce window is due, or one closes earlier now.
                    _ = async { match due {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    } } => {}
                    _ = engine.inner.due_moved.notified() => continue,
                    _ = stopped(&mut stop) => break,
                }
                if let Err(e) = engine.sweep(false).await {
                    tracing::warn!(error = %e, "sweep failed; will retry");
                }
            }
        });
        Ok(())
    }

    /// Takes over sessions whose worker vanished and runs their queues.
    pub async fn sweep(&self, all_foreign: bool) -> Result<()> {
        if *self.inner.stopping.borrow() {
            return Ok(());
        }
        // Forgotten first (a failed look must not leave a wake-up in the
        // past, which would spin); the look below sets the next one.
        *self.inner.due_at.lock().unwrap_or_else(|p| p.into_inner()) = None;
        for r in self
            .inner
            .store
            .recover(&self.inner.cfg.node, all_foreign)
            .await?
        {
            tracing::info!(session = %r.lease.session_id, epoch = r.lease.epoch, node = %self.inner.cfg.node, entries = r.committed.len(), "lease takeover: took over a session whose worker vanished");
            self.inner.bus.publish_entries(&r.committed);
            self.spawn_actor(r.lease);
        }
        let due = self.inner.store.start_due(&self.inner.cfg.node).await?;
        for started in due.started {
            self.inner.bus.publish_entries(&started.committed);
            if let Some(lease) = started.lease {
                tracing::info!(session = %lease.session_id, "a debounce window closed; its turn starts");
                self.spawn_actor(lease);
            }
        }
        if let Some(next) = due.next {
            let wait = u64::try_from(next.saturating_sub(due.now)).unwrap_or(0);
            // At least a millisecond: a window the store's clock has not
            // reached yet is looked at again, never in a tight loop.
            self.due_in(Duration::from_micros(wait).max(Duration::from_millis(1)));
        }
        Ok(())
    }

    /// Turn counts and durations of this node.
    pub fn turn_metrics(&self) -> &metrics::TurnMetrics {
        &self.inner.turn_metrics
    }

    /// The store.
    pub fn store(&self) -> &SharedStore {
        &self.inner.store
    }

    /// The live bus.
    pub fn bus(&self) -> &Bus {
        &self.inner.bus
    }

    /// The agents this node can run.
    pub fn agents(&self) -> &Agents {
        &self.inner.agents
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.inner.cfg.node
    }

    /// Creates a session; with a first message, its turn starts here.
    pub async fn create_session(&self, req: CreateSession) -> Result<Created> {
        let created = self.inner.store.create_session(req).await?;
        self.inner.bus.publish_entries(&created.committed);
        if let Some(lease) = created.lease.clone() {
            self.spawn_actor(lease);
        }
        if let Some(until) = created.session.pending_until {
            let wait = until
                .micros()
                .saturating_sub(created.session.created_at.micros());
            self.due_in(Duration::from_micros(u64::try_from(wait).unwrap_or(0)));
        }
        Ok(created)
    }

    /// Stores a message and carries out its disposition.
    pub async fn post_message(&self, mut req: PostMessage) -> Result<Posted> {
        req.mid_turn_agents = self.inner.mid_turn_agents.clone();
        let session = req.session_id;
        // A node that is stopping takes no new turn: the store leaves one this
        // message starts `starting`, for the next start-up or another node.
        let run_here = !*self.inner.stopping.borrow();
        // Subscribed before the post commits, so a cancel of the turn it
        // begins, announced the moment it is committed, reaches the worker.
        let early = run_here.then(|| self.inner.bus.subscribe(session));
        let result = if run_here {
            self.inner.store.post_message_to_run(req).await
        } else {
            self.inner.store.post_message(req).await
        };
        let mut posted = match result {
            Ok(p) => p,
            Err(e) => {
                drop(early);
                self.inner.bus.prune(session);
                return Err(e);
            }
        };
        self.inner.bus.publish_entries(&posted.committed);
        if let Some(turn_id) = posted.steer {
            self.inner
                .bus
                .publish(posted.entry.session_id, BusEvent::Steer { turn_id });
        }
        if let Some(until) = posted.pending_until {
            // The entry was stamped by the same clock in the same transaction.
            let wait = until.saturating_sub(posted.entry.created_at.micros());
            self.due_in(Duration::from_micros(u64::try_from(wait).unwrap_or(0)));
        }
        if let Some(turn_id) = posted.cancel {
            self.announce_cancel(
                posted.entry.session_id,
                turn_id,
                format!("interrupted by message {}", posted.entry.seq),
            );
        }
        match posted.lease.clone() {
            Some(lease) => self.spawn_actor_with(lease, early, posted.begun.take()),
            None => {
                drop(early);
                self.inner.bus.prune(session);
            }
        }
        Ok(posted)
    }

    /// Cancels the session's starting or running turn, if any; with
    /// `only`, only if that is the active turn (a stale cancel cancels
    /// nothing).
    pub async fn cancel(
        &self,
        owner: &str,
        id: SessionId,
        only: Option<TurnId>,
    ) -> Result<Option<TurnId>> {
        let reason = "cancelled by user";
        let turn = self
            .inner
            .store
            .request_cancel(owner, id, reason, only)
            .await?;
        if let Some(turn_id) = turn {
            self.announce_cancel(id, turn_id, reason.to_owned());
        }
        Ok(turn)
    }

    /// Cancels the session's turn, waits for it to end (drained, forced at
    /// the drain deadline), then deletes the session.
    pub async fn delete(&self, owner: &str, id: SessionId) -> Result<()> {
        let reason = "session deleted";
        let mut live = self.inner.bus.subscribe(id);
        if let Some(turn_id) = self
            .inner
            .store
            .request_cancel(owner, id, reason, None)
            .await?
        {
            self.announce_cancel(id, turn_id, reason.to_owned());
            // The turn's node records its end; bounded, for a node that died
            // (its lease then ends the turn `lost` anyway, or the delete
            // removes it).
            let patience = self.inner.cfg.cancel_drain + Duration::from_secs(2);
            let ended = async {
                loop {
                    match tokio::time::timeout(Duration::from_millis(250), live.recv()).await {
                        Ok(Ok(BusEvent::Entry(e)))
                            if e.kind == baton_core::EntryType::TurnEnded
                                && e.turn_id == Some(turn_id) =>
                        {
                            return;
                        }
                        Ok(Ok(_))
                        | Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
                        // Across nodes the bus is a hint: ask the store.
                        _ => {
                            if self
                                .inner
                                .store
                                .turns(id)
                                .await
                                .map(|ts| {
                                    ts.iter().any(|t| t.id == turn_id && t.ended_at.is_some())
                                })
                                .unwrap_or(true)
                            {
                                return;
                            }
                        }
                    }
                }
            };
            if tokio::time::timeout(patience, ended).await.is_err() {
                tracing::warn!(session = %id, turn = %turn_id, "deleting a session whose turn did not end in time");
            }
        }
        drop(live);
        let deleted = self.inner.store.delete_session(owner, id).await;
        self.inner.bus.prune(id);
        deleted
    }

    /// The owner's session.
    pub async fn session(&self, owner: &str, id: SessionId) -> Result<Session> {
        self.inner.store.session(owner, id).await
    }

    /// The owner's session with its pending permission requests.
    pub async fn session_with_permissions(&self, owner: &str, id: SessionId) -> Result<Session> {
        let mut session = self.inner.store.session(owner, id).await?;
        if session.turn_id.is_some() {
            session.pending_permissions = self.inner.store.pending_permissions(id).await?;
        }
        Ok(session)
    }

    /// The pending permission requests of the owner's session.
    pub async fn permissions(&self, owner: &str, id: SessionId) -> Result<Vec<Entry>> {
        self.inner.store.session(owner, id).await?;
        self.inner.store.pending_permissions(id).await
    }

    /// Answers a permission request, exactly once. The decision is
    /// published: the node running the turn (this one or another, through
    /// the bus's relay) hears it at once and sends it to the agent.
    pub async fn answer_permission(&self, req: AnswerPermission) -> Result<Answered> {
        let answered = self.inner.store.answer_permission(req).await?;
        if !answered.replayed {
            self.inner
                .bus
                .publish_entries(std::slice::from_ref(&answered.decision));
        }
        Ok(answered)
    }

    /// Tells whichever node runs `turn_id` (this one included) to cancel it.
    /// The request is already durable; this only makes it prompt.
    fn announce_cancel(&self, session: SessionId, turn_id: TurnId, reason: String) {
        self.inner
            .bus
            .publish(session, BusEvent::Cancel { turn_id, reason });
    }

    /// Runs the session's turns on this node under `lease`.
    fn spawn_actor(&self, lease: Lease) {
        self.spawn_actor_with(lease, None, None);
    }

    /// Spawns the session's actor for `lease`, on `events` if the caller
    /// subscribed already, starting with the turn `begun` if the store began
    /// it in the transaction that gave the lease.
    fn spawn_actor_with(
        &self,
        lease: Lease,
        events: Option<tokio::sync::broadcast::Receiver<BusEvent>>,
        begun: Option<baton_store::TurnToRun>,
    ) {
        let mut actors = self.inner.actors.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = actors.get(&lease.session_id) {
            if slot.epoch >= lease.epoch && !slot.task.is_finished() {
                return;
            }
            // A superseded actor (its lease was taken over) is stopped: its
            // turn's agent work is forced off the agent session, which the
            // driver releases before the new actor's prompt may go out.
            slot.task.abort();
        }
        let session = lease.session_id;
        let epoch = lease.epoch;
        // Subscribe before the task starts so no cancel announced from now on
        // can be missed.
        let events = events.unwrap_or_else(|| self.inner.bus.subscribe(session));
        let span = tracing::info_span!("session", %session, epoch);
        let task =
            tokio::spawn(actor::run(self.inner.clone(), lease, events, begun).instrument(span));
        actors.insert(session, ActorSlot { epoch, task });
    }

    /// Stops: no new turn starts on this node (leases of sessions with work
    /// waiting are released, for another node or the next start); running
    /// turns may finish within the shutdown grace, then are cancelled
    /// (reason `shutdown`), drained and ended. Returns once every actor has
    /// exited, also ones spawned meanwhile (bounded: grace, drain deadline
    /// and a margin), then ends the streams.
    pub async fn shutdown(&self) {
        self.shutdown_with(std::future::pending()).await;
    }

    /// [`Engine::shutdown`], where `force` resolving ends the grace at once
    /// and forces running turns off their agents without a drain.
    pub async fn shutdown_with(&self, force: impl std::future::Future<Output = ()>) {
        let running = self.active_actors();
        tracing::info!(
            running,
            grace_ms = self.inner.cfg.shutdown_grace.as_millis() as u64,
            "shutting down: no new turns; running turns may finish within the grace"
        );
        self.inner.stopping.send_replace(true);
        let mut force = std::pin::pin!(force);
        let mut forced = false;
        tokio::select! {
            _ = self.idle() => {}
            _ = tokio::time::sleep(self.inner.cfg.shutdown_grace) => {}
            _ = &mut force => forced = true,
        }
        if self.active_actors() > 0 {
            tracing::info!(
                running = self.active_actors(),
                forced,
                "shutdown: cancelling the turns still running"
            );
        }
        self.inner.shutdown.send_replace(true);
        let limit = self.inner.cfg.cancel_drain + Duration::from_secs(5);
        tokio::select! {
            r = tokio::time::timeout(limit, self.idle()) => if r.is_err() {
                tracing::warn!("some turns did not finish within the shutdown deadline");
            },
            _ = &mut force, if !forced => {
                tracing::warn!("shutdown forced: stopping the remaining turns now");
            }
        }
        let tasks: Vec<JoinHandle<()>> = {
            let mut actors = self.inner.actors.lock().unwrap_or_else(|p| p.into_inner());
            actors.drain().map(|(_, slot)| slot.task).collect()
        };
        for t in &tasks {
            t.abort();
        }
        let _ = futures_util::future::join_all(tasks).await;
        self.inner.closed.send_replace(true);
    }

    /// Waits up to `limit` for every actor on this node to exit.
    pub async fn wait_idle(&self, limit: Duration) {
        let _ = tokio::time::timeout(limit, self.idle()).await;
    }

    /// Resolves once no actor runs on this node.
    async fn idle(&self) {
        while self.active_actors() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Becomes true once shutdown has stopped this node's turns (streams
    /// end on it, after sending what those turns stored last).
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.inner.closed.subscribe()
    }

    /// Number of actors running on this node.
    pub fn active_actors(&self) -> usize {
        let actors = self.inner.actors.lock().unwrap_or_else(|p| p.into_inner());
        actors.values().filter(|s| !s.task.is_finished()).count()
    }
}

/// Resolves once shutdown has begun.
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not `Send`; drop it here.
    let _ = rx.wait_for(|s| *s).await.map(|_| ());
}

impl Inner {
    /// Called by an actor as it exits: forget it unless a newer one replaced it.
    pub(crate) fn actor_exited(&self, session: SessionId, epoch: i64) {
        let mut actors = self.actors.lock().unwrap_or_else(|p| p.into_inner());
        if actors.get(&session).is_some_and(|s| s.epoch == epoch) {
            actors.remove(&session);
        }
    }
}
