//! An executable model of one session: what the store's transactions and the
//! engine's actor do, in memory, built from the same [`crate::policy`] and
//! [`crate::turn`] logic they use.
//!
//! It exists so that random interleavings of messages (every policy), agent
//! output, stops, cancels, timeouts and lease loss can be checked against the
//! invariants I4–I8 by property tests, without a database or a clock. The
//! real stores and engine are then tested against the same invariants with
//! real concurrency.

use crate::policy::{decide, ActiveTurn, Decision, NextTurn, QueueSummary};
use crate::turn::{Action, Event, TurnMachine};
use crate::{EntryType, InputRange, NewEntry, Policy, Role, Seq, TurnId, TurnStatus, Waiting};

/// Something that happens to a session.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelEvent {
    /// A user message arrives with this policy.
    Post(Policy),
    /// The engine moves the starting turn to running.
    Begin,
    /// An event for the active turn (agent output, stops, timers).
    Turn(Event),
    /// `POST /cancel`.
    Cancel,
    /// The worker running the turn dies; recovery ends it `lost`.
    WorkerDied,
}

struct Active {
    id: TurnId,
    machine: TurnMachine,
}

/// The in-memory session.
pub struct SessionModel {
    /// The log: `log[i]` has seq `i + 1`.
    pub log: Vec<NewEntry>,
    /// User messages accepted (stored), in order.
    pub accepted: Vec<Seq>,
    waiting: Vec<Waiting>,
    /// What the stores keep instead of reading `waiting`.
    queue: QueueSummary,
    active: Option<Active>,
    capacity: u64,
}

impl SessionModel {
    /// An idle, empty session whose queue holds `capacity` messages.
    pub fn new(capacity: u64) -> Self {
        Self {
            log: Vec::new(),
            accepted: Vec::new(),
            waiting: Vec::new(),
            queue: QueueSummary::default(),
            active: None,
            capacity,
        }
    }

    /// Whether a turn is starting or running.
    pub fn is_busy(&self) -> bool {
        self.active.is_some()
    }

    /// Whether messages wait for a turn.
    pub fn has_waiting(&self) -> bool {
        !self.waiting.is_empty()
    }

    fn append(&mut self, e: NewEntry) -> Seq {
        self.log.push(e);
        self.log.len() as Seq
    }

    /// Applies one event.
    pub fn step(&mut self, event: ModelEvent) {
        match event {
            ModelEvent::Post(policy) => self.post(policy),
            ModelEvent::Begin => self.feed(Event::Started),
            ModelEvent::Turn(e) => self.feed(e),
            ModelEvent::Cancel => self.feed(Event::CancelRequested {
                reason: "cancelled by user".into(),
            }),
            ModelEvent::WorkerDied => {
                if let Some(active) = self.active.as_mut() {
                    let id = active.id;
                    if active
                        .machine
                        .handle(Event::LeaseLost)
                        .contains(&Action::Abandon)
                    {
                        // What the sweeper does for a dead worker's turn.
                        self.finish(vec![NewEntry::turn_ended(
                            id,
                            TurnStatus::Lost,
                            Some("worker lost".into()),
                        )]);
                    }
                }
            }
        }
    }

    fn post(&mut self, policy: Policy) {
        let new_turn = TurnId::new();
        let active = self.active.as_ref().map(|a| ActiveTurn { id: a.id });
        match decide(active, &self.queue, self.capacity, policy, new_turn) {
            Decision::Reject { .. } | Decision::QueueFull { .. } => {}
            Decision::Accept {
                start,
                cancel_active,
                ..
            } => {
                let seq = self.append(NewEntry::user_message("m"));
                self.accepted.push(seq);
                if start {
                    self.start(new_turn, InputRange { from: seq, to: seq });
                } else {
                    self.waiting.push(Waiting { seq, policy });
                    self.queue.push(seq, policy);
                }
                if cancel_active {
                    self.feed(Event::CancelRequested {
                        reason: "interrupted".into(),
                    });
                }
            }
        }
    }

    fn start(&mut self, id: TurnId, input: InputRange) {
        self.append(NewEntry::turn_started(id, input));
        self.active = Some(Active {
            id,
            machine: TurnMachine::new(id),
        });
    }

    fn feed(&mut self, event: Event) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        for action in active.machine.handle(event) {
            match action {
                Action::Append(e) => {
                    self.append(*e);
                }
                Action::End { entries, .. } => self.finish(entries),
                Action::Abandon
                | Action::SendPrompt
                | Action::ArmTurnDeadline
                | Action::SendCancel
                | Action::ArmDrainDeadline
                | Action::PublishDelta(_)
                | Action::ForceStop => {}
            }
        }
    }

    /// The end-of-turn transaction: terminal entries, then the next turn.
    fn finish(&mut self, entries: Vec<NewEntry>) {
        for e in entries {
            self.append(e);
        }
        self.active = None;
        let (Some(next), Some(first)) = (self.queue.next(), self.waiting.first()) else {
            return;
        };
        let to = match next {
            NextTurn::First => first.seq,
            NextTurn::UpTo(to) => to,
        };
        let input = InputRange {
            from: first.seq,
            to,
        };
        self.queue.consume(next);
        self.waiting.retain(|w| w.seq > to);
        self.start(TurnId::new(), input);
    }

    /// Drives the session until no turn runs and nothing waits.
    pub fn quiesce(&mut self) {
        while self.active.is_some() {
            self.step(ModelEvent::Begin);
            self.step(ModelEvent::Cancel);
            self.step(ModelEvent::Turn(Event::DrainDeadline));
        }
    }

    /// Checks I4–I8 over the log; `complete` adds the end-state checks (every
    /// turn ended, every accepted message consumed).
    pub fn check(&self, complete: bool) -> Result<(), String> {
        check_log(&self.log, &self.accepted, complete)
    }
}

/// Checks a session's log against I4–I8. `accepted` are the seqs of the user
/// messages that were acknowledged. With `complete`, also requires that every
/// turn ended and every accepted message was consumed.
pub fn check_log(log: &[NewEntry], accepted: &[Seq], complete: bool) -> Result<(), String> {
    let mut running: Option<TurnId> = None;
    let mut ended: Vec<TurnId> = Vec::new();
    let mut consumed: Vec<Seq> = Vec::new();
    let user_seqs: Vec<Seq> = log
        .iter()
        .zip(1..)
        .filter(|(e, _)| e.kind == EntryType::Message && e.role == Some(Role::User))
        .map(|(_, s)| s)
        .collect();
    if user_seqs != accepted {
        return Err(format!(
            "stored user messages {user_seqs:?} != accepted {accepted:?}"
        ));
    }
    for (e, seq) in log.iter().zip(1..) {
        if let Some(t) = e.turn_id {
            if ended.contains(&t) {
                return Err(format!(
                    "I8: seq {seq} belongs to turn {t}, which already ended"
                ));
            }
        }
        match e.kind {
            EntryType::TurnStarted => {
                if let Some(r) = running {
                    return Err(format!("I4: turn started at {seq} while {r} runs"));
                }
                running = e.turn_id;
                let input = e.input.ok_or("turn_started without input")?;
                let mine: Vec<Seq> = user_seqs
                    .iter()
                    .copied()
                    .filter(|s| (input.from..=input.to).contains(s))
                    .collect();
                if mine.first() != Some(&input.from) || mine.last() != Some(&input.to) {
                    return Err(format!("input {input:?} is not bounded by user messages"));
                }
                if input.to >= seq {
                    return Err(format!(
                        "I5: turn at {seq} consumes later message {}",
                        input.to
                    ));
                }
                consumed.extend(mine);
            }
            EntryType::TurnEnded => {
                if running != e.turn_id {
                    return Err(format!("I7: turn_ended at {seq} for a turn not running"));
                }
                ended.extend(e.turn_id);
                running = None;
            }
            EntryType::Message
            | EntryType::Thought
            | EntryType::ToolCall
            | EntryType::ToolResult
            | EntryType::PermissionRequest
            | EntryType::PermissionDecision => {
                if e.turn_id.is_some() && e.turn_id != running {
                    return Err(format!("I8: output at {seq} outside its turn"));
                }
            }
        }
    }
    // I6: each message consumed once, FIFO: consumption order is seq order.
    if consumed.windows(2).any(|w| w[0] >= w[1]) {
        return Err(format!(
            "I6: consumption out of order or twice: {consumed:?}"
        ));
    }
    if !accepted.starts_with(&consumed) {
        return Err(format!(
            "I6: consumed {consumed:?} skips part of accepted {accepted:?}"
        ));
    }
    if complete {
        if let Some(r) = running {
            return Err(format!("I7: turn {r} never ended"));
        }
        if consumed != accepted {
            return Err(format!(
                "I6: consumed {consumed:?} != accepted {accepted:?}"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::turn::{AgentOutput, StopReason};
    use crate::ToolInfo;
    use proptest::prelude::*;

    fn policy() -> impl Strategy<Value = Policy> {
        prop_oneof![
            Just(Policy::Queue),
            Just(Policy::Merge),
            Just(Policy::Interrupt),
            Just(Policy::Reject)
        ]
    }

    fn event() -> impl Strategy<Value = ModelEvent> {
        prop_oneof![
            4 => policy().prop_map(ModelEvent::Post),
            3 => Just(ModelEvent::Begin),
            2 => Just(ModelEvent::Turn(Event::AgentDelta("tok".into()))),
            2 => Just(ModelEvent::Turn(Event::AgentOutput(AgentOutput::Message("hi".into())))),
            1 => Just(ModelEvent::Turn(Event::AgentOutput(AgentOutput::ToolCall(ToolInfo {
                id: "t1".into(),
                name: None,
                arguments: None,
            })))),
            3 => Just(ModelEvent::Turn(Event::AgentStopped(StopReason::Completed))),
            1 => Just(ModelEvent::Turn(Event::AgentStopped(StopReason::Cancelled))),
            1 => Just(ModelEvent::Turn(Event::AgentStopped(StopReason::Failed("x".into())))),
            1 => Just(ModelEvent::Cancel),
            1 => Just(ModelEvent::Turn(Event::TurnDeadline)),
            1 => Just(ModelEvent::Turn(Event::DrainDeadline)),
            1 => Just(ModelEvent::WorkerDied),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn invariants_hold_under_random_interleavings(
            events in proptest::collection::vec(event(), 0..80),
            capacity in 1u64..6,
        ) {
            let mut m = SessionModel::new(capacity);
            for e in events {
                m.step(e);
                // "Something waits ⇒ a turn is active" is what lets a message
                // decide against the active turn alone.
                prop_assert!(!m.has_waiting() || m.is_busy());
                if let Err(why) = m.check(false) {
                    return Err(TestCaseError::fail(why));
                }
            }
            m.quiesce();
            if let Err(why) = m.check(true) {
                return Err(TestCaseError::fail(why));
            }
        }
    }

    #[test]
    fn interrupt_cancels_then_runs_everything_waiting() {
        let mut m = SessionModel::new(10);
        m.step(ModelEvent::Post(Policy::Queue)); // 1 msg, 2 turn_started
        m.step(ModelEvent::Begin);
        m.step(ModelEvent::Post(Policy::Queue)); // 3
        m.step(ModelEvent::Post(Policy::Interrupt)); // 4, cancels turn 1
        m.step(ModelEvent::Turn(Event::AgentStopped(StopReason::Cancelled))); // 5 ended, 6 started
        let kinds: Vec<_> = m.log.iter().map(|e| (e.kind, e.status, e.input)).collect();
        assert_eq!(
            kinds[4],
            (EntryType::TurnEnded, Some(TurnStatus::Cancelled), None)
        );
        assert_eq!(kinds[5].2, Some(InputRange { from: 3, to: 4 }));
        assert!(m.check(false).is_ok());
    }

    #[test]
    fn check_log_catches_a_reply_before_its_input() {
        let t = TurnId::new();
        let log = vec![
            NewEntry::turn_started(t, InputRange { from: 2, to: 2 }),
            NewEntry::user_message("late"),
        ];
        assert!(check_log(&log, &[2], false).is_err());
    }
}
