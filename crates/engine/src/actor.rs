//! A session's actor: runs the session's turns on this node, one at a time,
//! for as long as it holds the lease.
//!
//! The loop: take the session's starting turn from the store, run it to its
//! end, repeat; when nothing is left, the same transaction that found nothing
//! releases the lease, so a message that arrives after it finds the lease
//! free (and its node starts the turn), and one that arrives before it is
//! taken — never stranded, never waited for.
//!
//! Running a turn means feeding a [`TurnMachine`] every event (agent output,
//! cancel announcements, heartbeats, timers, shutdown) and doing exactly what
//! it returns. Every write carries the lease; a stale-epoch or turn-not-active
//! answer means someone else owns the session now, and the actor stops
//! without another write.
//!
//! Steered messages reach the running turn the same way a cancel does: the
//! bus wakes the actor (from any node), and every renewal reads whether any
//! wait (for a wake-up the bus lost). The actor reads them from the store and
//! hands them to the agent; when the agent says it took them, the store
//! makes them the turn's input. If the turn ends first, its end hands them
//! to the next turn instead — the store decides which, under the session's
//! lock.
//!
//! Nothing the actor awaits while it holds a lease can outlive the lease:
//! starting the agent runs inside the turn's select loop, so heartbeats keep
//! renewing while a slow agent boots; every store call is cut at the moment
//! self-fencing is due ([`Lease clock`](LeaseClock)), and the actor then
//! stops, fenced, before the lease can expire. The agent's [`Fence`] asks
//! the same clock right before the prompt goes out, and deltas are published
//! only while it holds (and carry the epoch, for streams to drop a
//! superseded worker's).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_agent::{AgentError, AgentEvent, Fence, SteerInput, TurnControl, TurnHandle, TurnInput};
use baton_core::turn::{Action, AgentOutput, Event, StopReason, TurnMachine};
use baton_core::{Entry, EntryType, NewEntry, TurnStatus};
use baton_store::{Begin, Lease, StoreError, Take, TurnToRun};
use tokio::sync::{broadcast, mpsc};
use tokio::time::{sleep, sleep_until, Instant};

use crate::bus::BusEvent;
use crate::Inner;

/// How many already-arrived agent events one round takes at most.
const DRAIN_MAX: usize = 256;

/// How a turn's run ended for the actor.
enum Outcome {
    /// The turn ended and was recorded; look for the next one.
    Done,
    /// The lease is gone (or the session): stop without writing.
    Fenced,
}

pub(crate) async fn run(
    inner: Arc<Inner>,
    lease: Lease,
    mut bus: broadcast::Receiver<BusEvent>,
    mut begun: Option<TurnToRun>,
) {
    let session = lease.session_id;
    let mut failures = 0u32;
    // Between turns the lease was just extended (by `take_turn` or the
    // claim that spawned this actor).
    let clock = LeaseClock::new(inner.lease_ttl(), inner.cfg.heartbeat, lease.epoch);
    loop {
        // A turn the post began with the lease is `running` already: run it,
        // also when the node started stopping meanwhile (running turns get
        // the shutdown grace; handing it over would end it `lost`).
        let first = begun.take();
        if first.is_none() && *inner.stopping.borrow() {
            // Leave the queue for the next start-up or another node, and
            // tell the other nodes at once.
            if let Ok(Ok(true)) =
                tokio::time::timeout(clock.remaining(), inner.store.release_lease(&lease, true))
                    .await
            {
                inner.bus.publish(session, BusEvent::Released);
            }
            break;
        }
        let asked = Instant::now();
        let pre_begun = first.is_some();
        let taken = match first {
            Some(turn) => Ok(Take::Run(Box::new(turn), Begin::Run)),
            None => clock.bounded(inner.store.take_turn(&lease)).await,
        };
        let step = match taken {
            Ok(Take::Run(turn, begun)) => {
                // `begin` extended the lease (the post's claim did, for a
                // turn begun there: the clock started after it).
                if !pre_begun {
                    clock.renewed(asked);
                }
                run_turn(&inner, &lease, &clock, *turn, begun, &mut bus)
                    .await
                    .map(Some)
            }
            Ok(Take::Released) => break,
            // The active turn is one this actor lost track of: nothing here
            // can run it, so the actor stops without renewing. The lease
            // lapses and the sweeper (of any node) ends that turn `lost`
            // and hands the queue on; asking again meanwhile would only
            // spin write transactions.
            Ok(Take::Busy) => {
                tracing::warn!(%session, "the session's running turn is not this worker's; leaving it to lapse");
                break;
            }
            Err(e) => Err(e),
        };
        match step {
            Ok(Some(Outcome::Fenced)) => break,
            Ok(_) => failures = 0,
            Err(StoreError::StaleEpoch { .. } | StoreError::NotFound) => break,
            Err(e) => {
                // The store is unreachable: back off. If this lasts past the
                // lease, renewals fail and another node (or the next start)
                // takes over; this actor's writes are fenced off then.
                failures += 1;
                tracing::warn!(error = %e, failures, "session actor could not reach the store");
                if Duration::from_millis(200) * failures > inner.store_lease_budget() {
                    break;
                }
                sleep(Duration::from_millis(200) * failures.min(10)).await;
            }
        }
    }
    inner.actor_exited(session, lease.epoch);
    inner.bus.prune(session);
}

/// When the actor's lease was last extended, and when it must stop on its
/// own: shared with the agent's [`Fence`].
#[derive(Clone)]
struct LeaseClock {
    last: Arc<Mutex<Instant>>,
    fenced: Arc<AtomicBool>,
    due: Duration,
    /// The lease's epoch: a call cut at the fence answers as stale.
    epoch: baton_core::Epoch,
}

impl LeaseClock {
    fn new(ttl: Duration, heartbeat: Duration, epoch: baton_core::Epoch) -> Self {
        Self {
            last: Arc::new(Mutex::new(Instant::now())),
            fenced: Arc::new(AtomicBool::new(false)),
            // Where a renewal failure fences, but never less than half the
            // lease (a heartbeat close to the lease leaves no margin there).
            due: fence_due(ttl, heartbeat).max(ttl / 2),
            epoch,
        }
    }

    /// A renewal that began at `at` landed.
    fn renewed(&self, at: Instant) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if at > *last {
            *last = at;
        }
    }

    fn since_renewal(&self) -> Duration {
        self.last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
    }

    /// How long until self-fencing is due.
    fn remaining(&self) -> Duration {
        self.due.saturating_sub(self.since_renewal())
    }

    /// Whether the lease still holds for this worker.
    fn holds(&self) -> bool {
        !self.fenced.load(Ordering::SeqCst) && self.since_renewal() < self.due
    }

    /// Stops for good: nothing of this worker goes out any more.
    fn fence(&self) {
        self.fenced.store(true, Ordering::SeqCst);
    }

    fn agent_fence(&self) -> Fence {
        let clock = self.clone();
        Fence::new(move || clock.holds())
    }

    /// Runs a store call, cut where self-fencing is due: a store that stops
    /// answering makes the worker stop while the lease is still its own.
    async fn bounded<T>(
        &self,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.remaining(), call).await {
            Ok(r) => r,
            Err(_) => {
                self.fence();
                tracing::warn!("a store call outlived the lease's fence; stopping this worker");
                Err(StoreError::StaleEpoch { epoch: self.epoch })
            }
        }
    }
}

impl Inner {
    /// How long an actor may keep retrying a store that does not answer.
    fn store_lease_budget(&self) -> Duration {
        self.cfg.lease_ttl
    }

    fn lease_ttl(&self) -> Duration {
        self.cfg.lease_ttl
    }
}

/// A driver's start of a turn, polled inside the turn's loop.
type Starting = Pin<Box<dyn Future<Output = Result<TurnHandle, AgentError>> + Send>>;

/// Stops the agent's turn if the actor leaves early (a dropped future).
struct Agent {
    /// The start in progress; dropping it abandons the start (nothing was
    /// prompted yet).
    starting: Option<Starting>,
    events: Option<mpsc::Receiver<AgentEvent>>,
    control: Option<Box<dyn TurnControl>>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(c) = &self.control {
            c.force_stop();
        }
    }
}

/// The turn's permission requests waiting for an answer (policy `ask`):
/// request id → when it times out. An answer reaches the actor on the bus
/// (a `permission_decision` entry, from whichever node took it), or from the
/// store at the next heartbeat if the bus missed it; each is sent to the
/// agent once, and the request forgotten.
#[derive(Default)]
struct Asks {
    waiting: HashMap<String, Instant>,
}

impl Asks {
    /// The earliest timeout.
    fn deadline(&self) -> Option<Instant> {
        self.waiting.values().min().copied()
    }

    /// Sends `decision` to the agent if its request is still waited for.
    fn deliver(&mut self, agent: Option<&dyn TurnControl>, decision: &Entry) {
        let Some(p) = &decision.permission else {
            return;
        };
        if self.waiting.remove(&p.request_id).is_some() {
            if let Some(c) = agent {
                c.answer_permission(&p.request_id, p.option_id.clone());
            }
        }
    }

    /// Answers every waiting request `cancelled` in the store (their
    /// decisions published), then to the agent: before a cancel reaches it,
    /// as the protocol requires. A store failure leaves the requests to the
    /// turn's end, which closes whatever is still pending.
    async fn close_all(
        &mut self,
        inner: &Inner,
        lease: &Lease,
        clock: &LeaseClock,
        turn_id: baton_core::TurnId,
        agent: Option<&dyn TurnControl>,
        reason: &str,
    ) {
        if self.waiting.is_empty() {
            return;
        }
        let by = if reason == "shutdown" {
            "shutdown"
        } else {
            "turn_end"
        };
        let why = format!("the turn is ending: {reason}");
        match clock
            .bounded(
                inner
                    .store
                    .close_permissions(lease, turn_id, None, by, &why),
            )
            .await
        {
            Ok(closed) => inner.bus.publish_entries(&closed),
            Err(e) => tracing::warn!(error = %e, "could not close the turn's permission requests"),
        }
        for (id, _) in self.waiting.drain() {
            if let Some(c) = agent {
                c.answer_permission(&id, None);
            }
        }
    }

    /// Times out the waiting requests whose deadline passed: each is closed
    /// `cancelled` by `timeout` unless an answer was stored first, and the
    /// agent gets whichever decision holds.
    async fn time_out(
        &mut self,
        inner: &Inner,
        lease: &Lease,
        clock: &LeaseClock,
        turn_id: baton_core::TurnId,
        agent: Option<&dyn TurnControl>,
    ) -> Option<Event> {
        let now = Instant::now();
        let due: Vec<String> = self
            .waiting
            .iter()
            .filter(|(_, d)| **d <= now)
            .map(|(id, _)| id.clone())
            .collect();
        let limit = inner.cfg.permission_timeout.as_millis();
        for id in due {
            let why = format!("no answer within the permission timeout ({limit} ms)");
            let closed = clock
                .bounded(inner.store.close_permissions(
                    lease,
                    turn_id,
                    Some(id.clone()),
                    "timeout",
                    &why,
                ))
                .await;
            match closed {
                Ok(closed) if !closed.is_empty() => {
                    inner.bus.publish_entries(&closed);
                    for d in &closed {
                        self.deliver(agent, d);
                    }
                }
                // Answered meanwhile: that answer holds.
                Ok(_) => match clock
                    .bounded(inner.store.permission_decisions(lease.session_id, turn_id))
                    .await
                {
                    Ok(decisions) => {
                        for d in decisions
                            .iter()
                            .filter(|d| d.permission.as_ref().is_some_and(|p| p.request_id == id))
                        {
                            self.deliver(agent, d);
                        }
                        // Never stored (its output was refused): nobody
                        // can answer it, so the agent hears `cancelled`.
                        if self.waiting.remove(&id).is_some() {
                            if let Some(c) = agent {
                                c.answer_permission(&id, None);
                            }
                        }
                    }
                    Err(StoreError::StaleEpoch { .. }) => return Some(Event::LeaseLost),
                    Err(e) => {
                        tracing::warn!(error = %e, "reading permission decisions");
                        self.waiting.insert(id, now + Duration::from_secs(1));
                    }
                },
                Err(StoreError::StaleEpoch { .. } | StoreError::TurnNotActive { .. }) => {
                    return Some(Event::LeaseLost)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not time out a permission request; retrying");
                    self.waiting.insert(id, now + Duration::from_secs(1));
                }
            }
        }
        None
    }

    /// Delivers answers the bus may have missed (a lagging channel, a
    /// notification lost while a listener reconnected); the event the
    /// machine must see if the read outlived the fence.
    async fn catch_up(
        &mut self,
        inner: &Inner,
        lease: &Lease,
        clock: &LeaseClock,
        turn_id: baton_core::TurnId,
        agent: Option<&dyn TurnControl>,
    ) -> Option<Event> {
        if self.waiting.is_empty() {
            return None;
        }
        match clock
            .bounded(inner.store.permission_decisions(lease.session_id, turn_id))
            .await
        {
            Ok(decisions) => {
                for d in &decisions {
                    self.deliver(agent, d);
                }
            }
            Err(StoreError::StaleEpoch { .. }) => return Some(Event::LeaseLost),
            Err(e) => tracing::warn!(error = %e, "reading permission decisions"),
        }
        None
    }
}

async fn next_agent_event(events: &mut Option<mpsc::Receiver<AgentEvent>>) -> Option<AgentEvent> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn started(starting: &mut Option<Starting>) -> Result<TurnHandle, AgentError> {
    match starting {
        Some(f) => f.as_mut().await,
        None => std::future::pending().await,
    }
}

async fn at(deadline: Option<Instant>) {
    match deadline {
        Some(d) => sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// How long after its last renewal began a worker stops on its own when no
/// renewal lands: two heartbeats before the lease would expire, so that it
/// stops while the lease is still its own.
fn fence_due(ttl: Duration, heartbeat: Duration) -> Duration {
    ttl.saturating_sub(2 * heartbeat)
}

/// How long one lease renewal may take: until self-fencing is due, and at
/// least one heartbeat.
fn renewal_budget(ttl: Duration, heartbeat: Duration, since_renewal: Duration) -> Duration {
    fence_due(ttl, heartbeat)
        .saturating_sub(since_renewal)
        .max(heartbeat)
}

async fn run_turn(
    inner: &Inner,
    lease: &Lease,
    clock: &LeaseClock,
    todo: TurnToRun,
    begun: Begin,
    bus: &mut broadcast::Receiver<BusEvent>,
) -> Result<Outcome, StoreError> {
    let turn_id = todo.turn.id;
    let started_at = Instant::now();
    tracing::info!(
        session = %lease.session_id,
        turn = %turn_id,
        agent = %todo.agent,
        inputs = todo.inputs.len(),
        "turn started"
    );
    let mut machine = TurnMachine::with_max_output(turn_id, inner.cfg.max_output_bytes);
    let mut agent = Agent {
        starting: None,
        events: None,
        control: None,
    };
    let mut turn_deadline: Option<Instant> = None;
    let mut drain_deadline: Option<Instant> = None;
    let mut shutdown = inner.shutdown.subscribe();
    let mut heartbeat =
        tokio::time::interval_at(Instant::now() + inner.cfg.heartbeat, inner.cfg.heartbeat);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Each fires once; afterwards the select must not poll it again.
    let mut shutdown_seen = false;
    let mut bus_open = true;
    let mut asks = Asks::default();
    // Why the turn is being cancelled, for the permission requests it
    // closes first.
    let mut ending = String::new();
    // Steering: whether this turn's agent takes input mid-turn, the last
    // seq handed to it, and whether a steer was announced before the agent
    // had started (it is handed over once it has).
    let takes_input = inner
        .agents
        .get(&todo.agent)
        .is_some_and(|d| d.takes_mid_turn_input());
    let mut offered = todo.turn.input.to;
    let mut steer_early = false;

    let first = match begun {
        Begin::Run => vec![Event::Started],
        Begin::Cancelled(reason) => vec![Event::CancelRequested { reason }, Event::Started],
    };
    let mut pending: std::collections::VecDeque<Event> = first.into();
    // Output the machine asked to store, not yet written: consecutive
    // appends share one transaction, and the last ones share `end_turn`'s
    // (a reply and its `turn_ended` commit together: one sync, not two).
    let mut unsaved: Vec<NewEntry> = Vec::new();
    // Tool calls and results of output the store refused mid-turn: the
    // turn's closing entries must not answer calls that were never stored,
    // and must answer stored calls whose results were lost.
    let mut lost: Vec<(EntryType, String)> = Vec::new();
    let mut drained = false;
    if *shutdown.borrow() {
        pending.push_back(Event::CancelRequested {
            reason: "shutdown".into(),
        });
    }

    loop {
        // Feed everything pending, performing the actions in order.
        while let Some(event) = pending.pop_front() {
            match &event {
                Event::CancelRequested { reason } | Event::Failure { reason } => {
                    ending.clone_from(reason)
                }
                Event::TurnDeadline => ending = "turn timed out".into(),
                _ => {}
            }
            for action in machine.handle(event) {
                match action {
                    Action::SendPrompt => match inner.agents.get(&todo.agent) {
                        Some(driver) => {
                            let input = TurnInput {
                                session_id: lease.session_id,
                                turn_id,
                                messages: todo
                                    .inputs
                                    .iter()
                                    .filter_map(|e| e.content.clone())
                                    .collect(),
                                agent_session: todo.agent_session.clone(),
                                fence: clock.agent_fence(),
                                permission: todo.permission,
                            };
                            // Polled in the loop below, beside heartbeats and
                            // cancels: a slow start renews the lease.
                            agent.starting =
                                Some(Box::pin(async move { driver.start(input).await }));
                        }
                        None => pending.push_back(Event::AgentStopped(StopReason::Failed(
                            format!("no agent named {:?} on this node", todo.agent),
                        ))),
                    },
                    Action::ArmTurnDeadline => {
                        turn_deadline = Some(Instant::now() + inner.cfg.turn_timeout)
                    }
                    Action::SendCancel => {
                        if !asks.waiting.is_empty() && !unsaved.is_empty() {
                            // The requests are closed in the store, after
                            // the output that holds them.
                            if let Some(ev) =
                                save(inner, lease, clock, turn_id, &mut unsaved, &mut lost).await
                            {
                                pending.push_back(ev);
                            }
                        }
                        asks.close_all(
                            inner,
                            lease,
                            clock,
                            turn_id,
                            agent.control.as_deref(),
                            &ending,
                        )
                        .await;
                        if let Some(c) = &agent.control {
                            c.cancel();
                        } else if agent.starting.take().is_some() {
                            // Still starting: the prompt never went out, so
                            // the agent has nothing to drain.
                            pending.push_back(Event::AgentStopped(StopReason::Cancelled));
                        }
                    }
                    Action::ArmDrainDeadline => {
                        drain_deadline = Some(Instant::now() + inner.cfg.cancel_drain)
                    }
                    Action::PublishDelta(text) => {
                        // Keep the bus in the machine's order: stored output
                        // before the deltas that follow it.
                        if !unsaved.is_empty() {
                            if let Some(ev) =
                                save(inner, lease, clock, turn_id, &mut unsaved, &mut lost).await
                            {
                                pending.push_front(ev);
                                continue;
                            }
                        }
                        // A worker past its fence publishes nothing (its
                        // lease may be someone else's by now).
                        if !clock.holds() {
                            pending.push_front(Event::LeaseLost);
                            continue;
                        }
                        // The delta is the end of the machine's current run:
                        // readers place it by run and offset.
                        let (run, offset) = machine.text_run().map_or((0, 0), |(run, so_far)| {
                            (run, so_far.len().saturating_sub(text.len()) as u64)
                        });
                        inner.bus.publish(
                            lease.session_id,
                            BusEvent::Delta {
                                turn_id,
                                epoch: lease.epoch,
                                text,
                                run,
                                offset,
                            },
                        );
                    }
                    Action::Append(entry) => unsaved.push(*entry),
                    Action::ForceStop => {
                        agent.starting = None;
                        if let Some(c) = agent.control.take() {
                            c.force_stop();
                        }
                        agent.events = None;
                    }
                    Action::End {
                        status,
                        reason,
                        entries,
                    } => {
                        agent.starting = None;
                        agent.events = None;
                        let closing = if lost.is_empty() {
                            entries
                        } else {
                            let ended = entries.last().cloned().unwrap_or_else(|| {
                                NewEntry::turn_ended(turn_id, status, reason.clone())
                            });
                            reclose(turn_id, &lost, &entries, ended)
                        };
                        let last = End {
                            status,
                            reason,
                            output: unsaved,
                            closing,
                            lost,
                        };
                        return end(
                            inner,
                            lease,
                            clock,
                            (turn_id, &todo.agent, started_at),
                            last,
                        )
                        .await;
                    }
                    Action::Abandon => {
                        clock.fence();
                        return Ok(Outcome::Fenced);
                    }
                    Action::OfferInput => {
                        if !takes_input {
                            continue;
                        }
                        let Some(control) = &agent.control else {
                            steer_early = true;
                            continue;
                        };
                        match clock
                            .bounded(inner.store.steered_input(lease, turn_id, offered))
                            .await
                        {
                            Ok(Some(batch)) => {
                                offered = batch.upto;
                                control.steer(SteerInput {
                                    upto: batch.upto,
                                    messages: batch
                                        .messages
                                        .into_iter()
                                        .filter_map(|e| e.content)
                                        .collect(),
                                });
                            }
                            Ok(None) => {}
                            Err(
                                StoreError::StaleEpoch { .. } | StoreError::TurnNotActive { .. },
                            ) => {
                                pending.push_front(Event::LeaseLost);
                            }
                            // The next renewal says again that input waits.
                            Err(e) => tracing::warn!(error = %e, "could not read steered messages"),
                        }
                    }
                    Action::TakeInput(upto) => {
                        match clock
                            .bounded(inner.store.take_input(lease, turn_id, upto))
                            .await
                        {
                            Ok(()) => {
                                tracing::debug!(turn = %turn_id, upto, "the agent took steered input")
                            }
                            Err(
                                StoreError::StaleEpoch { .. } | StoreError::TurnNotActive { .. },
                            ) => {
                                pending.push_front(Event::LeaseLost);
                            }
                            // The agent saw input the log cannot give it: the
                            // turn must not go on as if it had not.
                            Err(e) => pending.push_front(Event::Failure {
                                reason: format!(
                                    "could not record the steered input the agent took: {e}"
                                ),
                            }),
                        }
                    }
                }
            }
        }

        // What the agent has already sent joins this round, so output that
        // arrives in a burst (a reply and its stop) is stored in one
        // transaction. Bounded, and once per wait, so an agent that never
        // pauses cannot starve heartbeats and cancels.
        if !drained {
            drained = true;
            if let Some(rx) = &mut agent.events {
                for _ in 0..DRAIN_MAX {
                    let Ok(ev) = rx.try_recv() else { break };
                    if let Some(ev) = agent_event(inner, lease, clock, &mut asks, ev).await {
                        pending.push_back(ev);
                    }
                }
                if !pending.is_empty() {
                    continue;
                }
            }
        }
        if !unsaved.is_empty() {
            if let Some(ev) = save(inner, lease, clock, turn_id, &mut unsaved, &mut lost).await {
                pending.push_back(ev);
            }
            continue;
        }

        drained = false;
        let event = tokio::select! {
            start = started(&mut agent.starting) => {
                agent.starting = None;
                match start {
                    Ok(handle) => {
                        agent.events = Some(handle.events);
                        agent.control = Some(handle.control);
                        if std::mem::take(&mut steer_early) {
                            pending.push_back(Event::InputWaiting);
                        }
                        continue;
                    }
                    Err(e) => Event::AgentStopped(StopReason::Failed(e.to_string())),
                }
            }
            ev = next_agent_event(&mut agent.events) => match ev {
                Some(ev) => match agent_event(inner, lease, clock, &mut asks, ev).await {
                    Some(ev) => ev,
                    None => continue,
                },
                None => {
                    agent.events = None;
                    Event::AgentStopped(StopReason::Failed("the agent stopped without finishing the turn".into()))
                }
            },
            msg = bus.recv(), if bus_open => match msg {
                Ok(BusEvent::Cancel { turn_id: t, reason }) if t == turn_id => Event::CancelRequested { reason },
                Ok(BusEvent::Entry(e))
                    if e.kind == EntryType::PermissionDecision && e.turn_id == Some(turn_id) =>
                {
                    asks.deliver(agent.control.as_deref(), &e);
                    continue;
                }
                Ok(BusEvent::Steer { turn_id: t }) if t == turn_id && takes_input => Event::InputWaiting,
                Ok(BusEvent::TextWanted { turn_id: t }) if t == turn_id => {
                    // A reader resuming this turn gets the run streamed so
                    // far; the deltas after it follow on the bus in order.
                    if let Some((run, so_far)) = machine.text_run() {
                        if clock.holds() && !machine.is_ended() {
                            inner.bus.publish(
                                lease.session_id,
                                BusEvent::TextSoFar {
                                    turn_id,
                                    epoch: lease.epoch,
                                    run,
                                    offset: 0,
                                    text: so_far.to_owned(),
                                },
                            );
                        }
                    }
                    continue;
                }
                Ok(_) => continue,
                // Missed announcements are caught by the next heartbeat,
                // which reads the durable cancel request.
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => {
                    bus_open = false;
                    continue;
                }
            },
            // A renewal that hangs (a database that stopped answering) counts
            // as failed when self-fencing is due, so that happens before the
            // lease can expire, not whenever the driver gives up. A renewal
            // that is merely slow still lands, and a stale epoch it reports
            // fences at once.
            _ = heartbeat.tick() => {
                // The store stamps the new expiry when the renewal begins, so
                // that, not its answer, is when the lease was last extended.
                let asked = Instant::now();
                let budget = renewal_budget(inner.lease_ttl(), inner.cfg.heartbeat, clock.since_renewal());
                match tokio::time::timeout(budget, inner.store.renew_lease(lease))
                    .await
                    .unwrap_or_else(|_| Err(StoreError::Unavailable("lease renewal timed out".into())))
                {
                    Ok(renewal) => {
                        clock.renewed(asked);
                        if let Some(ev) = asks
                            .catch_up(inner, lease, clock, turn_id, agent.control.as_deref())
                            .await
                        {
                            ev
                        } else {
                            match (renewal.cancel, renewal.steer) {
                                (Some((t, reason)), _) if t == turn_id => Event::CancelRequested { reason },
                                (_, Some((t, upto))) if t == turn_id && takes_input && upto > offered => {
                                    Event::InputWaiting
                                }
                                _ => continue,
                            }
                        }
                    }
                    Err(StoreError::StaleEpoch { .. }) => Event::LeaseLost,
                    Err(e) => {
                        tracing::warn!(error = %e, "lease renewal failed");
                        // Self-fencing: stop while the lease is still ours, when
                        // the next renewal could no longer land before it expires
                        // (another worker may own the session after that).
                        if clock.since_renewal() >= fence_due(inner.lease_ttl(), inner.cfg.heartbeat) {
                            Event::LeaseLost
                        } else {
                            continue;
                        }
                    }
                }
            }
            _ = at(turn_deadline) => {
                turn_deadline = None;
                Event::TurnDeadline
            }
            _ = at(drain_deadline) => {
                drain_deadline = None;
                tracing::warn!(
                    session = %lease.session_id,
                    turn = %turn_id,
                    agent = %todo.agent,
                    drain_ms = inner.cfg.cancel_drain.as_millis() as u64,
                    "forced stop: the agent did not stop within the cancel drain"
                );
                Event::DrainDeadline
            }
            _ = at(asks.deadline()) => {
                match asks.time_out(inner, lease, clock, turn_id, agent.control.as_deref()).await {
                    Some(ev) => ev,
                    None => continue,
                }
            }
            _ = crate::stopped(&mut shutdown), if !shutdown_seen => {
                shutdown_seen = true;
                Event::CancelRequested { reason: "shutdown".into() }
            }
        };
        pending.push_back(event);
    }
}

/// The machine's event for an agent's event (`None`: handled here).
async fn agent_event(
    inner: &Inner,
    lease: &Lease,
    clock: &LeaseClock,
    asks: &mut Asks,
    ev: AgentEvent,
) -> Option<Event> {
    match ev {
        AgentEvent::AskPermission(p) => {
            // Stored (and streamed) before the loop waits again, so it can be
            // answered; the answer comes back through `Asks`.
            asks.waiting.insert(
                p.request_id.clone(),
                Instant::now() + inner.cfg.permission_timeout,
            );
            Some(Event::AgentOutput(AgentOutput::PermissionRequest(p)))
        }
        AgentEvent::Delta(text) => Some(Event::AgentDelta(text)),
        AgentEvent::Thought(text) => Some(Event::AgentThought(text)),
        AgentEvent::Output(out) => Some(Event::AgentOutput(out)),
        AgentEvent::Stopped(stop) => Some(Event::AgentStopped(stop)),
        AgentEvent::InputTaken(upto) => Some(Event::AgentTookInput(upto)),
        AgentEvent::AgentSession(id) => {
            // Kept with the session so a restarted agent can resume it; a
            // failure here costs only that resumption.
            match clock
                .bounded(inner.store.set_agent_session(lease, &id))
                .await
            {
                Ok(()) => None,
                Err(StoreError::StaleEpoch { .. }) => Some(Event::LeaseLost),
                Err(e) => {
                    tracing::warn!(error = %e, "could not record the agent's session id");
                    None
                }
            }
        }
    }
}

/// Stores the turn's unsaved output in one transaction and publishes it;
/// on failure, the event the machine must see next.
async fn save(
    inner: &Inner,
    lease: &Lease,
    clock: &LeaseClock,
    turn_id: baton_core::TurnId,
    unsaved: &mut Vec<NewEntry>,
    lost: &mut Vec<(EntryType, String)>,
) -> Option<Event> {
    let batch = std::mem::take(unsaved);
    let tools = tool_ids(&batch);
    match clock
        .bounded(inner.store.append_output(lease, turn_id, batch))
        .await
    {
        Ok(committed) => {
            inner.bus.publish_entries(&committed);
            None
        }
        Err(e @ (StoreError::StaleEpoch { .. } | StoreError::TurnNotActive { .. })) => {
            tracing::warn!(
                session = %lease.session_id,
                turn = %turn_id,
                epoch = lease.epoch,
                error = %e,
                "write refused: the turn's output was fenced off"
            );
            Some(Event::LeaseLost)
        }
        Err(e) => {
            // Output that cannot be stored ends the turn: a transcript with
            // a hole must not look complete. The agent is cancelled and
            // drained like for any stop; only this turn is affected.
            tracing::warn!(session = %lease.session_id, turn = %turn_id, error = %e, "write refused: could not store agent output");
            lost.extend(tools);
            Some(Event::Failure {
                reason: format!("could not store the agent's output: {e}"),
            })
        }
    }
}

/// How a turn ends: its output not yet stored, and the machine's closing
/// entries (results for tool calls left open, then `turn_ended`).
struct End {
    status: TurnStatus,
    reason: Option<String>,
    output: Vec<NewEntry>,
    closing: Vec<NewEntry>,
    /// Tool entries of output already refused mid-turn.
    lost: Vec<(EntryType, String)>,
}

/// Tries of a turn's end with its output before that output is given up.
const TRIES_WITH_OUTPUT: u32 = 3;

/// Records the turn's end, with its last output in the same transaction;
/// retried briefly if the store fails.
///
/// If the store keeps refusing the end with the output for a reason other
/// than reachability, the output is given up: the turn ends `failed`, as
/// when storing output fails mid-turn (a transcript with a hole must not
/// look complete), with its tool calls closed ([`reclose`]), rather
/// than being left to end `lost` once its lease expires.
async fn end(
    inner: &Inner,
    lease: &Lease,
    clock: &LeaseClock,
    (turn_id, agent, started_at): (baton_core::TurnId, &str, Instant),
    last: End,
) -> Result<Outcome, StoreError> {
    let End {
        mut status,
        mut reason,
        output,
        closing,
        mut lost,
    } = last;
    let mut with_output = !output.is_empty();
    let mut entries: Vec<NewEntry> = output.iter().chain(&closing).cloned().collect();
    let mut attempt = 0u32;
    loop {
        let asked = Instant::now();
        match clock
            .bounded(
                inner
                    .store
                    .end_turn(lease, turn_id, status, reason.clone(), entries.clone()),
            )
            .await
        {
            Ok(ended) => {
                // `end_turn` extended the lease for the next turn.
                clock.renewed(asked);
                let took = ended
                    .committed
                    .iter()
                    .any(|e| e.kind == EntryType::TurnStarted);
                inner.bus.publish_entries(&ended.committed);
                let seconds = started_at.elapsed().as_secs_f64();
                inner.turn_metrics.ended(agent, status.as_str(), seconds);
                tracing::info!(
                    session = %lease.session_id,
                    turn = %turn_id,
                    agent,
                    status = status.as_str(),
                    duration_ms = (seconds * 1000.0) as u64,
                    reason = reason.as_deref().unwrap_or(""),
                    next_turn = took,
                    "turn ended"
                );
                return Ok(Outcome::Done);
            }
            Err(
                e @ (StoreError::StaleEpoch { .. }
                | StoreError::TurnNotActive { .. }
                | StoreError::NotFound),
            ) => {
                tracing::warn!(
                    session = %lease.session_id,
                    turn = %turn_id,
                    agent,
                    epoch = lease.epoch,
                    error = %e,
                    "write refused: the end of the turn was fenced off"
                );
                return Ok(Outcome::Fenced);
            }
            Err(e)
                if with_output
                    && attempt + 1 >= TRIES_WITH_OUTPUT
                    && !matches!(e, StoreError::Unavailable(_)) =>
            {
                tracing::warn!(error = %e, "could not store a turn's last output; ending it failed without it");
                with_output = false;
                attempt = 0;
                status = TurnStatus::Failed;
                reason = Some(format!("could not store the agent's output: {e}"));
                lost.extend(tool_ids(&output));
                let ended = NewEntry::turn_ended(turn_id, status, reason.clone());
                entries = reclose(turn_id, &lost, &closing, ended);
            }
            Err(e) if attempt < 10 => {
                attempt += 1;
                tracing::warn!(error = %e, attempt, "could not record the end of a turn; retrying");
                sleep(Duration::from_millis(100) * attempt).await;
            }
            // The lease will expire and the turn will be ended `lost` by
            // whoever takes the session over.
            Err(_) => return Ok(Outcome::Fenced),
        }
    }
}

/// The tool calls and results among `entries`, as (kind, call id).
fn tool_ids(entries: &[NewEntry]) -> Vec<(EntryType, String)> {
    entries
        .iter()
        .filter(|e| matches!(e.kind, EntryType::ToolCall | EntryType::ToolResult))
        .filter_map(|e| e.tool.as_ref().map(|t| (e.kind, t.id.clone())))
        .collect()
}

/// A turn's closing entries when output with the tool entries `lost` was
/// never stored: every stored tool call not answered by a stored result
/// gets one (for the calls the machine saw open, and for each call whose
/// result was lost; never for a call that was itself lost), then `ended`.
fn reclose(
    turn_id: baton_core::TurnId,
    lost: &[(EntryType, String)],
    closing: &[NewEntry],
    ended: NewEntry,
) -> Vec<NewEntry> {
    let lost_call = |id: &String| lost.contains(&(EntryType::ToolCall, id.clone()));
    let machine_open = closing
        .iter()
        .filter(|e| e.kind == EntryType::ToolResult)
        .filter_map(|e| e.tool.as_ref().map(|t| t.id.clone()));
    let lost_results = lost
        .iter()
        .filter(|(kind, _)| *kind == EntryType::ToolResult)
        .map(|(_, id)| id.clone());
    let mut open: Vec<String> = Vec::new();
    for id in machine_open.chain(lost_results) {
        if !lost_call(&id) && !open.contains(&id) {
            open.push(id);
        }
    }
    let status = ended.status.unwrap_or(TurnStatus::Failed);
    let reason = ended.reason.clone();
    let mut entries: Vec<NewEntry> = open
        .into_iter()
        .map(|id| NewEntry::tool_closed(turn_id, id, status, reason.as_deref()))
        .collect();
    entries.push(ended);
    entries
}

#[cfg(test)]
mod tests {
    use baton_core::{EntryType, NewEntry, ToolInfo, TurnId, TurnStatus};

    use std::time::Duration;

    use super::{reclose, renewal_budget, tool_ids};

    /// A slow renewal may take until fencing is due; a hung one ends in time
    /// for the fence to land a heartbeat before the lease expires.
    #[test]
    fn a_renewal_may_take_until_fencing_is_due() {
        let ms = Duration::from_millis;
        assert_eq!(renewal_budget(ms(2_000), ms(50), ms(0)), ms(1_900));
        assert_eq!(renewal_budget(ms(2_000), ms(50), ms(1_000)), ms(900));
        assert_eq!(renewal_budget(ms(2_000), ms(50), ms(1_890)), ms(50));
        assert_eq!(renewal_budget(ms(1_200), ms(1_000), ms(0)), ms(1_000));
    }

    fn call(turn: TurnId, id: &str) -> NewEntry {
        NewEntry::tool_call(
            turn,
            ToolInfo {
                id: id.into(),
                name: None,
                arguments: None,
            },
        )
    }

    /// Giving up unstored output closes exactly the stored calls left
    /// unanswered: the machine's open calls, and calls answered only in the
    /// lost output; never a call that was itself lost.
    #[test]
    fn given_up_output_leaves_no_stored_call_open() {
        let t = TurnId::new();
        let output = vec![
            NewEntry::assistant_message(t, "lost reply"),
            call(t, "lost-call"),
            NewEntry::tool_result(t, "stored-call-1".into(), "lost answer"),
        ];
        let closing = vec![
            NewEntry::tool_result(t, "lost-call".into(), "cancelled"),
            NewEntry::tool_result(t, "stored-call-2".into(), "cancelled"),
            NewEntry::turn_ended(t, TurnStatus::Completed, None),
        ];
        let ended = NewEntry::turn_ended(t, TurnStatus::Failed, Some("why".into()));
        let entries = reclose(t, &tool_ids(&output), &closing, ended);
        let shape: Vec<(EntryType, Option<&str>)> = entries
            .iter()
            .map(|e| (e.kind, e.tool.as_ref().map(|x| x.id.as_str())))
            .collect();
        assert_eq!(
            shape,
            [
                (EntryType::ToolResult, Some("stored-call-2")),
                (EntryType::ToolResult, Some("stored-call-1")),
                (EntryType::TurnEnded, None),
            ]
        );
        let ended = entries.last().expect("turn_ended");
        assert_eq!(ended.status, Some(TurnStatus::Failed));
        assert_eq!(ended.reason.as_deref(), Some("why"));
    }
}
