//! A session's actor: runs the session's turns on this node, one at a time,
//! for as long as it holds the lease.
//!
//! The loop: take the session's starting turn from the store, run it to its
//! end, repeat; when nothing is left, release the lease — a release the store
//! refuses if a turn was created meanwhile, so a message that arrives during
//! the release is never stranded.
//!
//! Running a turn means feeding a [`TurnMachine`] every event (agent output,
//! cancel announcements, heartbeats, timers, shutdown) and doing exactly what
//! it returns. Every write carries the lease; a stale-epoch or turn-not-active
//! answer means someone else owns the session now, and the actor stops
//! without another write.

use std::sync::Arc;
use std::time::Duration;

use baton_agent::{AgentEvent, TurnControl, TurnInput};
use baton_core::turn::{Action, Event, StopReason, TurnMachine};
use baton_core::TurnStatus;
use baton_store::{Begin, Lease, StoreError, TurnToRun};
use tokio::sync::{broadcast, mpsc};
use tokio::time::{sleep, sleep_until, Instant};

use crate::bus::BusEvent;
use crate::Inner;

/// How a turn's run ended for the actor.
enum Outcome {
    /// The turn ended and was recorded; look for the next one.
    Done,
    /// The lease is gone (or the session): stop without writing.
    Fenced,
}

pub(crate) async fn run(inner: Arc<Inner>, lease: Lease, mut bus: broadcast::Receiver<BusEvent>) {
    let session = lease.session_id;
    let mut failures = 0u32;
    loop {
        if *inner.shutdown.borrow() {
            // Leave the queue for the next start-up or another node.
            let _ = inner.store.release_lease(&lease, true).await;
            break;
        }
        let step = match inner.store.next_turn(&lease).await {
            Ok(Some(turn)) => run_turn(&inner, &lease, turn, &mut bus).await.map(Some),
            Ok(None) => match inner.store.release_lease(&lease, false).await {
                Ok(true) => break,
                // A turn was created since we looked: go round again. (If the
                // active turn is one this actor lost track of, the pause keeps
                // this from spinning until the lease lapses and the sweeper
                // ends that turn `lost`.)
                Ok(false) => {
                    sleep(Duration::from_millis(20)).await;
                    Ok(None)
                }
                Err(e) => Err(e),
            },
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

/// Stops the agent's turn if the actor leaves early (a dropped future).
struct Agent {
    events: Option<mpsc::UnboundedReceiver<AgentEvent>>,
    control: Option<Box<dyn TurnControl>>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(c) = &self.control {
            c.force_stop();
        }
    }
}

async fn next_agent_event(
    events: &mut Option<mpsc::UnboundedReceiver<AgentEvent>>,
) -> Option<AgentEvent> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn at(deadline: Option<Instant>) {
    match deadline {
        Some(d) => sleep_until(d).await,
        None => std::future::pending().await,
    }
}

async fn run_turn(
    inner: &Inner,
    lease: &Lease,
    todo: TurnToRun,
    bus: &mut broadcast::Receiver<BusEvent>,
) -> Result<Outcome, StoreError> {
    let turn_id = todo.turn.id;
    let mut machine = TurnMachine::new(turn_id);
    let mut agent = Agent {
        events: None,
        control: None,
    };
    let mut turn_deadline: Option<Instant> = None;
    let mut drain_deadline: Option<Instant> = None;
    let mut shutdown = inner.shutdown.subscribe();
    let mut heartbeat =
        tokio::time::interval_at(Instant::now() + inner.cfg.heartbeat, inner.cfg.heartbeat);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_renewal = Instant::now();
    // Each fires once; afterwards the select must not poll it again.
    let mut shutdown_seen = false;
    let mut bus_open = true;

    let first = match inner.store.begin_turn(lease, turn_id).await {
        Ok(Begin::Run) => vec![Event::Started],
        Ok(Begin::Cancelled(reason)) => vec![Event::CancelRequested { reason }, Event::Started],
        Err(StoreError::StaleEpoch { .. } | StoreError::TurnNotActive { .. }) => {
            return Ok(Outcome::Fenced)
        }
        Err(e) => return Err(e),
    };
    let mut pending: std::collections::VecDeque<Event> = first.into();
    if *shutdown.borrow() {
        pending.push_back(Event::CancelRequested {
            reason: "shutdown".into(),
        });
    }

    loop {
        // Feed everything pending, performing the actions in order.
        while let Some(event) = pending.pop_front() {
            for action in machine.handle(event) {
                match action {
                    Action::SendPrompt => {
                        let driver = inner.agents.get(&todo.agent);
                        let input = TurnInput {
                            session_id: lease.session_id,
                            turn_id,
                            messages: todo
                                .inputs
                                .iter()
                                .filter_map(|e| e.content.clone())
                                .collect(),
                            agent_session: todo.agent_session.clone(),
                        };
                        let started = match driver {
                            Some(d) => d.start(input).await.map_err(|e| e.to_string()),
                            None => Err(format!("no agent named {:?} on this node", todo.agent)),
                        };
                        match started {
                            Ok(handle) => {
                                agent.events = Some(handle.events);
                                agent.control = Some(handle.control);
                            }
                            Err(why) => {
                                pending.push_back(Event::AgentStopped(StopReason::Failed(why)))
                            }
                        }
                    }
                    Action::ArmTurnDeadline => {
                        turn_deadline = Some(Instant::now() + inner.cfg.turn_timeout)
                    }
                    Action::SendCancel => {
                        if let Some(c) = &agent.control {
                            c.cancel();
                        }
                    }
                    Action::ArmDrainDeadline => {
                        drain_deadline = Some(Instant::now() + inner.cfg.cancel_drain)
                    }
                    Action::PublishDelta(text) => {
                        inner
                            .bus
                            .publish(lease.session_id, BusEvent::Delta { turn_id, text });
                    }
                    Action::Append(entry) => {
                        match inner.store.append_output(lease, turn_id, vec![entry]).await {
                            Ok(committed) => inner.bus.publish_entries(&committed),
                            Err(
                                StoreError::StaleEpoch { .. } | StoreError::TurnNotActive { .. },
                            ) => {
                                pending.push_front(Event::LeaseLost);
                            }
                            Err(e) => {
                                // Output that cannot be stored ends the turn: a
                                // transcript with a hole must not look complete.
                                tracing::warn!(error = %e, "could not store agent output");
                                pending.push_front(Event::AgentStopped(StopReason::Failed(
                                    format!("could not store the agent's output: {e}"),
                                )));
                            }
                        }
                    }
                    Action::ForceStop => {
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
                        agent.events = None;
                        return end(inner, lease, turn_id, status, reason, entries).await;
                    }
                    Action::Abandon => return Ok(Outcome::Fenced),
                }
            }
        }

        let event = tokio::select! {
            ev = next_agent_event(&mut agent.events) => match ev {
                Some(AgentEvent::Delta(text)) => Event::AgentDelta(text),
                Some(AgentEvent::Output(out)) => Event::AgentOutput(out),
                Some(AgentEvent::Stopped(stop)) => Event::AgentStopped(stop),
                Some(AgentEvent::AgentSession(id)) => {
                    // Kept with the session so a restarted agent can resume
                    // it; a failure here costs only that resumption.
                    if let Err(e) = inner.store.set_agent_session(lease, &id).await {
                        tracing::warn!(error = %e, "could not record the agent's session id");
                    }
                    continue;
                }
                None => {
                    agent.events = None;
                    Event::AgentStopped(StopReason::Failed("the agent stopped without finishing the turn".into()))
                }
            },
            msg = bus.recv(), if bus_open => match msg {
                Ok(BusEvent::Cancel { turn_id: t, reason }) if t == turn_id => Event::CancelRequested { reason },
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
            // as failed once a heartbeat has passed, so self-fencing happens
            // before the lease can expire, not whenever the driver gives up.
            _ = heartbeat.tick() => match tokio::time::timeout(inner.cfg.heartbeat, inner.store.renew_lease(lease))
                .await
                .unwrap_or_else(|_| Err(StoreError::Unavailable("lease renewal timed out".into())))
            {
                Ok(renewal) => {
                    last_renewal = Instant::now();
                    match renewal.cancel {
                        Some((t, reason)) if t == turn_id => Event::CancelRequested { reason },
                        _ => continue,
                    }
                }
                Err(StoreError::StaleEpoch { .. }) => Event::LeaseLost,
                Err(e) => {
                    tracing::warn!(error = %e, "lease renewal failed");
                    // Self-fencing: stop while the lease is still ours, when
                    // the next renewal could no longer land before it expires
                    // (another worker may own the session after that).
                    if last_renewal.elapsed() + 2 * inner.cfg.heartbeat >= inner.lease_ttl() {
                        Event::LeaseLost
                    } else {
                        continue;
                    }
                }
            },
            _ = at(turn_deadline) => {
                turn_deadline = None;
                Event::TurnDeadline
            }
            _ = at(drain_deadline) => {
                drain_deadline = None;
                Event::DrainDeadline
            }
            _ = crate::stopped(&mut shutdown), if !shutdown_seen => {
                shutdown_seen = true;
                Event::CancelRequested { reason: "shutdown".into() }
            }
        };
        pending.push_back(event);
    }
}

/// Records the turn's end; retried briefly if the store is unreachable.
async fn end(
    inner: &Inner,
    lease: &Lease,
    turn_id: baton_core::TurnId,
    status: TurnStatus,
    reason: Option<String>,
    entries: Vec<baton_core::NewEntry>,
) -> Result<Outcome, StoreError> {
    let mut attempt = 0u32;
    loop {
        match inner
            .store
            .end_turn(lease, turn_id, status, reason.clone(), entries.clone())
            .await
        {
            Ok(ended) => {
                inner.bus.publish_entries(&ended.committed);
                return Ok(Outcome::Done);
            }
            Err(
                StoreError::StaleEpoch { .. }
                | StoreError::TurnNotActive { .. }
                | StoreError::NotFound,
            ) => return Ok(Outcome::Fenced),
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
