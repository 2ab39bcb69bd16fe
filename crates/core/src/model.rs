//! An executable model of one session: what the store's transactions and the
//! engine's actor do, in memory, built from the same [`crate::policy`] and
//! [`crate::turn`] logic they use.
//!
//! It exists so that random interleavings of messages (every policy, steering
//! included), agent output, steered input taken or not, stops, cancels,
//! timeouts, lease loss, a debounce window and time passing can be checked
//! against the invariants I4–I8 by property tests, without a database or a
//! clock. The real stores and engine are then tested against the same
//! invariants with real concurrency.

use crate::policy::{decide, ActiveTurn, Debounce, Decision, NextTurn, QueueSummary};
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
    /// The worker learns that steered messages wait (the bus, a renewal).
    SteerNoticed,
    /// The agent takes the input last offered to it, at its next step.
    AgentTakesInput,
    /// This many milliseconds pass.
    Advance(u16),
    /// The sweeper (any node) looks for debounce windows that are due.
    Sweep,
}

struct Active {
    id: TurnId,
    machine: TurnMachine,
    /// The last seq offered to the agent as steered input.
    offered: Seq,
}

/// A turn took steered input: recorded when the log held `at` entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Taken {
    pub at: usize,
    pub turn: TurnId,
    pub upto: Seq,
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
    /// Steered input taken by running turns, in order.
    pub taken: Vec<Taken>,
    /// The last user message handed to a turn (the durable cursor).
    cursor: Seq,
    /// Whether the agent takes input mid-turn.
    takes_input: bool,
    /// The debounce window (µs; 0: off), the clock, and the window open now
    /// as (first message's arrival, when its turn starts).
    window: i64,
    now: i64,
    pending: Option<(i64, i64)>,
}

impl SessionModel {
    /// An idle, empty session whose queue holds `capacity` messages.
    pub fn new(capacity: u64) -> Self {
        Self::with(capacity, false, 0)
    }

    /// [`SessionModel::new`], with an agent that takes input mid-turn or
    /// not, and a debounce window of `window_ms` (0: off).
    pub fn with(capacity: u64, takes_input: bool, window_ms: u64) -> Self {
        Self {
            log: Vec::new(),
            accepted: Vec::new(),
            waiting: Vec::new(),
            queue: QueueSummary::default(),
            active: None,
            capacity,
            taken: Vec::new(),
            cursor: 0,
            takes_input,
            window: window_ms as i64 * 1000,
            now: 0,
            pending: None,
        }
    }

    /// Whether a turn is starting or running.
    pub fn is_busy(&self) -> bool {
        self.active.is_some()
    }

    /// Whether messages wait for a debounce window to close.
    pub fn is_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Checks the debounce window: it is open only on a session with no turn
    /// and messages waiting, and closes no later than 10 windows after its
    /// first message.
    pub fn check_window(&self) -> Result<(), String> {
        match self.pending {
            None => Ok(()),
            Some(_) if self.active.is_some() || self.waiting.is_empty() => Err(format!(
                "a window is open with turn {:?} and {} waiting",
                self.active.as_ref().map(|a| a.id),
                self.waiting.len()
            )),
            Some((first, until)) if until > first + crate::policy::DEBOUNCE_CAP * self.window => {
                Err(format!(
                    "window from {first} closes at {until}: past the cap"
                ))
            }
            Some(_) => Ok(()),
        }
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
            ModelEvent::SteerNoticed => self.feed(Event::InputWaiting),
            ModelEvent::AgentTakesInput => {
                if let Some(upto) = self.active.as_ref().map(|a| a.offered) {
                    if upto > self.cursor {
                        self.feed(Event::AgentTookInput(upto));
                    }
                }
            }
            ModelEvent::Advance(ms) => self.now += i64::from(ms) * 1000,
            ModelEvent::Sweep => self.start_due(),
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

    /// Starts the pending turn if its window is due (what the sweeper, and
    /// any post, does first).
    fn start_due(&mut self) {
        if self.pending.is_some_and(|(_, until)| until <= self.now) {
            self.pending = None;
            self.start_next();
        }
    }

    fn post(&mut self, policy: Policy) {
        self.start_due();
        let new_turn = TurnId::new();
        let active = self.active.as_ref().map(|a| ActiveTurn {
            id: a.id,
            takes_input: self.takes_input && !a.machine.is_draining(),
        });
        let debounce = Debounce {
            window: self.window,
            first: self.pending.map(|(first, _)| first),
            now: self.now,
        };
        match decide(
            active,
            &self.queue,
            self.capacity,
            policy,
            new_turn,
            debounce,
        ) {
            Decision::Reject { .. } | Decision::QueueFull { .. } => {}
            Decision::Accept {
                start,
                cancel_active,
                waits_as,
                pending_until,
                ..
            } => {
                let seq = self.append(NewEntry::user_message("m"));
                self.accepted.push(seq);
                if start {
                    self.start(new_turn, InputRange { from: seq, to: seq });
                } else {
                    self.waiting.push(Waiting {
                        seq,
                        policy: waits_as,
                    });
                    self.queue.push(seq, waits_as);
                }
                if let Some(until) = pending_until {
                    let first = self.pending.map_or(self.now, |(first, _)| first);
                    self.pending = Some((first, until));
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
        self.cursor = input.to;
        self.active = Some(Active {
            id,
            machine: TurnMachine::new(id),
            offered: input.to,
        });
    }

    /// The turn took the waiting messages up to `upto` (the store's
    /// `take_input`: only what waits, only up to the last steered message).
    fn take(&mut self, upto: Seq) {
        let Some(active) = self.active.as_ref() else {
            return;
        };
        if upto <= self.cursor || self.queue.last_steer.is_none_or(|l| upto > l) {
            return;
        }
        let count = self.waiting.iter().filter(|w| w.seq <= upto).count() as u64;
        self.queue.take(upto, count);
        self.waiting.retain(|w| w.seq > upto);
        self.cursor = upto;
        self.taken.push(Taken {
            at: self.log.len(),
            turn: active.id,
            upto,
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
                Action::OfferInput => {
                    if let (Some(a), Some(last)) = (self.active.as_mut(), self.queue.last_steer) {
                        a.offered = a.offered.max(last);
                    }
                }
                Action::TakeInput(upto) => self.take(upto),
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
        self.start_next();
    }

    /// Starts the next planned turn, if anything waits.
    fn start_next(&mut self) {
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
        while self.active.is_some() || self.pending.is_some() {
            if let Some((_, until)) = self.pending {
                self.now = self.now.max(until);
                self.start_due();
            }
            self.step(ModelEvent::Begin);
            self.step(ModelEvent::Cancel);
            self.step(ModelEvent::Turn(Event::DrainDeadline));
        }
    }

    /// Checks I4–I8 over the log; `complete` adds the end-state checks (every
    /// turn ended, every accepted message consumed).
    pub fn check(&self, complete: bool) -> Result<(), String> {
        check_log(&self.log, &self.accepted, &self.taken, complete)
    }
}

/// Checks a session's log against I4–I8. `accepted` are the seqs of the user
/// messages that were acknowledged; `taken`, the steered input running turns
/// took (which the log shows only in the turns' records). With `complete`,
/// also requires that every turn ended and every accepted message was
/// consumed.
pub fn check_log(
    log: &[NewEntry],
    accepted: &[Seq],
    taken: &[Taken],
    complete: bool,
) -> Result<(), String> {
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
    let mut takes = taken.iter().peekable();
    let mut take = |at: usize, running: Option<TurnId>, consumed: &mut Vec<Seq>| {
        while let Some(t) = takes.next_if(|t| t.at <= at) {
            if running != Some(t.turn) {
                return Err(format!(
                    "steered input taken by {} while it is not running",
                    t.turn
                ));
            }
            let after = consumed.last().copied().unwrap_or(0);
            let mine: Vec<Seq> = user_seqs
                .iter()
                .copied()
                .filter(|s| *s > after && *s <= t.upto && *s as usize <= t.at)
                .collect();
            if mine.last() != Some(&t.upto) {
                return Err(format!(
                    "turn {} took up to {}, not a waiting message",
                    t.turn, t.upto
                ));
            }
            consumed.extend(mine);
        }
        Ok(())
    };
    for (e, seq) in log.iter().zip(1..) {
        take(seq as usize - 1, running, &mut consumed)?;
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
    take(log.len(), running, &mut consumed)?;
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
            Just(Policy::Reject),
            Just(Policy::Steer)
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
            2 => Just(ModelEvent::SteerNoticed),
            2 => Just(ModelEvent::AgentTakesInput),
            2 => (0u16..300).prop_map(ModelEvent::Advance),
            2 => Just(ModelEvent::Sweep),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn invariants_hold_under_random_interleavings(
            events in proptest::collection::vec(event(), 0..80),
            capacity in 1u64..6,
            takes_input in any::<bool>(),
            window_ms in prop_oneof![Just(0u64), Just(100), Just(400)],
        ) {
            let mut m = SessionModel::with(capacity, takes_input, window_ms);
            for e in events {
                m.step(e);
                // "Something waits ⇒ a turn is active, or a debounce window
                // is open" is what lets a message decide against the active
                // turn alone.
                prop_assert!(!m.has_waiting() || m.is_busy() || m.is_pending());
                if let Err(why) = m.check(false).and_then(|()| m.check_window()) {
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
    fn a_steered_message_is_taken_by_the_running_turn_or_runs_next() {
        let mut m = SessionModel::with(10, true, 0);
        m.step(ModelEvent::Post(Policy::Queue)); // 1 msg, 2 turn_started
        m.step(ModelEvent::Begin);
        m.step(ModelEvent::Post(Policy::Steer)); // 3
        m.step(ModelEvent::SteerNoticed);
        m.step(ModelEvent::AgentTakesInput);
        assert_eq!(m.taken.len(), 1);
        assert_eq!(m.taken[0].upto, 3);
        m.step(ModelEvent::Post(Policy::Steer)); // 4
        m.step(ModelEvent::SteerNoticed);
        // The turn ends before the agent takes 4: the next turn runs it.
        m.step(ModelEvent::Turn(Event::AgentStopped(StopReason::Completed))); // 5, 6
        m.step(ModelEvent::AgentTakesInput);
        assert_eq!(m.taken.len(), 1, "a later take belongs to no turn");
        assert_eq!(m.log[5].input, Some(InputRange { from: 4, to: 4 }));
        m.quiesce();
        assert!(m.check(true).is_ok(), "{:?}", m.check(true));
    }

    #[test]
    fn a_burst_within_the_window_is_one_turn() {
        let mut m = SessionModel::with(10, false, 400);
        for _ in 0..5 {
            m.step(ModelEvent::Post(Policy::Queue));
            m.step(ModelEvent::Advance(100));
            m.step(ModelEvent::Sweep);
            assert!(!m.is_busy(), "no turn while messages keep coming");
        }
        m.step(ModelEvent::Advance(299));
        m.step(ModelEvent::Sweep);
        assert!(!m.is_busy());
        m.step(ModelEvent::Advance(1));
        m.step(ModelEvent::Sweep);
        assert!(m.is_busy());
        assert_eq!(m.log[5].input, Some(InputRange { from: 1, to: 5 }));
        assert!(m.check(false).is_ok());
    }

    #[test]
    fn check_log_catches_a_reply_before_its_input() {
        let t = TurnId::new();
        let log = vec![
            NewEntry::turn_started(t, InputRange { from: 2, to: 2 }),
            NewEntry::user_message("late"),
        ];
        assert!(check_log(&log, &[2], &[], false).is_err());
    }
}
