//! An executable model of one session: what the store's transactions and the
//! engine's actor do, in memory. It decides with the stores' own procedure
//! ([`crate::flow`]) and runs the engine's [`crate::turn`] machine; only its
//! rows are vectors.
//!
//! It exists so that random interleavings of messages (every policy, steering
//! included), agent output, steered input taken or not, stops, cancels,
//! timeouts, lease loss, a debounce window and time passing can be checked
//! against the invariants I4–I8 by property tests, without a database or a
//! clock. The real stores and engine are then tested against the same
//! invariants with real concurrency.

use crate::flow::{Accepted, Post, Refusal, SessionState, Start, Stored};
use crate::turn::{Action, Event, TurnMachine};
use crate::{Disposition, EntryType, NewEntry, Policy, Role, Seq, TurnId, TurnStatus, Waiting};

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

#[derive(Clone)]
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

/// The in-memory session: a store whose rows are vectors, deciding with
/// [`crate::flow`] as the real stores do, and running each turn's
/// [`TurnMachine`] as the engine does.
#[derive(Clone)]
pub struct SessionModel {
    /// The log: `log[i]` has seq `i + 1`.
    pub log: Vec<NewEntry>,
    /// User messages accepted (stored), in order.
    pub accepted: Vec<Seq>,
    /// The waiting messages (what a store finds after the cursor).
    waiting: Vec<Waiting>,
    /// The session row.
    state: SessionState,
    active: Option<Active>,
    capacity: u64,
    /// Steered input taken by running turns, in order.
    pub taken: Vec<Taken>,
    /// Whether the agent takes input mid-turn.
    takes_input: bool,
    /// The clock (µs).
    now: i64,
    /// The messages accepted under an idempotency key: (key, request, seq,
    /// disposition).
    keys: Vec<(String, String, Seq, Disposition)>,
}

/// What [`SessionModel::post_keyed`] answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Stored at `seq` with this disposition (`replayed`: a retry).
    Stored {
        seq: Seq,
        disposition: Disposition,
        replayed: bool,
    },
    Refused(Refusal),
    KeyConflict,
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
            state: SessionState::new(Policy::Queue, window_ms as i64),
            active: None,
            capacity,
            taken: Vec::new(),
            takes_input,
            now: 0,
            keys: Vec::new(),
        }
    }

    /// The session row as the stores would hold it.
    pub fn state(&self) -> SessionState {
        self.state
    }

    /// Saves the session row a batch decided (see [`SessionModel::accept`]).
    pub fn save(&mut self, state: SessionState) {
        self.state = state;
    }

    /// The clock (µs).
    pub fn now(&self) -> i64 {
        self.now
    }

    /// Whether the agent takes input mid-turn.
    pub fn takes_input(&self) -> bool {
        self.takes_input
    }

    /// How many messages may wait.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The first waiting message (what a store reads for
    /// [`crate::flow::Need::FirstWaiting`]).
    pub fn first_waiting(&self) -> Option<Seq> {
        self.waiting.first().map(|w| w.seq)
    }

    /// What the session stores under `key`, for a request `request`.
    pub fn stored(&self, key: &str, request: &str) -> Stored {
        match self.keys.iter().find(|k| k.0 == key) {
            None => Stored::None,
            Some(k) if k.1 == request => Stored::Same,
            Some(_) => Stored::Different,
        }
    }

    /// Whether a turn is starting or running.
    pub fn is_busy(&self) -> bool {
        self.active.is_some()
    }

    /// Whether messages wait for a debounce window to close.
    pub fn is_pending(&self) -> bool {
        self.state.pending_until.is_some()
    }

    /// Checks the debounce window: it is open only on a session with no turn
    /// and messages waiting, and closes no later than 10 windows after its
    /// first message.
    pub fn check_window(&self) -> Result<(), String> {
        let window = self.state.debounce_ms * 1000;
        match (self.state.pending_first, self.state.pending_until) {
            (None, None) => Ok(()),
            (Some(_), Some(_)) if self.active.is_some() || self.waiting.is_empty() => Err(format!(
                "a window is open with turn {:?} and {} waiting",
                self.active.as_ref().map(|a| a.id),
                self.waiting.len()
            )),
            (Some(first), Some(until)) if until > first + crate::policy::DEBOUNCE_CAP * window => {
                Err(format!(
                    "window from {first} closes at {until}: past the cap"
                ))
            }
            (Some(_), Some(_)) => Ok(()),
            (first, until) => Err(format!("a window half open: {first:?} {until:?}")),
        }
    }

    /// Whether messages wait for a turn.
    pub fn has_waiting(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// Stores `e` at the next seq the procedure gives.
    fn append(&mut self, e: NewEntry) -> Seq {
        let seq = self.state.next_seq();
        self.put(seq, e);
        seq
    }

    /// Stores `e` at `seq`, which must be the log's next (I1).
    fn put(&mut self, seq: Seq, e: NewEntry) {
        assert_eq!(
            seq,
            self.log.len() as Seq + 1,
            "the procedure gave seq {seq} to a log of {}",
            self.log.len()
        );
        self.log.push(e);
    }

    /// Applies one event.
    pub fn step(&mut self, event: ModelEvent) {
        match event {
            ModelEvent::Post(policy) => {
                self.post_keyed(policy, None, "m");
            }
            ModelEvent::Begin => self.feed(Event::Started),
            ModelEvent::Turn(e) => self.feed(e),
            ModelEvent::Cancel => self.feed(Event::CancelRequested {
                reason: "cancelled by user".into(),
            }),
            ModelEvent::SteerNoticed => self.feed(Event::InputWaiting),
            ModelEvent::AgentTakesInput => {
                if let Some(upto) = self.active.as_ref().map(|a| a.offered) {
                    if upto > self.state.cursor {
                        self.feed(Event::AgentTookInput(upto));
                    }
                }
            }
            ModelEvent::Advance(ms) => self.now += i64::from(ms) * 1000,
            ModelEvent::Sweep => self.heal(),
            ModelEvent::WorkerDied => {
                if let Some(active) = self.active.as_mut() {
                    let id = active.id;
                    if active
                        .machine
                        .handle(Event::LeaseLost)
                        .contains(&Action::Abandon)
                    {
                        // What the sweeper does for a dead worker's turn.
                        self.finish(
                            id,
                            vec![NewEntry::turn_ended(
                                id,
                                TurnStatus::Lost,
                                Some("worker lost".into()),
                            )],
                        );
                    }
                }
            }
        }
    }

    /// Starts the turn that is due, if one is (what the sweeper and a turn's
    /// end do; a post does it first).
    fn heal(&mut self) {
        let first = self.first_waiting();
        if let Ok(Some(start)) = self.state.heal(self.now, first, TurnId::new()) {
            self.started(start);
        }
    }

    /// A user message arrives with `policy` (and, for a retry, the key and
    /// request it carries). One message at a time: the reference for
    /// [`crate::flow::post_batch`].
    pub fn post_keyed(&mut self, policy: Policy, key: Option<&str>, request: &str) -> Answer {
        self.post_with(policy, key, request, [TurnId::new(), TurnId::new()])
    }

    /// [`SessionModel::post_keyed`], giving the turns it may start (a due
    /// one healed first, and its own) these ids.
    pub fn post_with(
        &mut self,
        policy: Policy,
        key: Option<&str>,
        request: &str,
        turns: [TurnId; 2],
    ) -> Answer {
        if let Some(key) = key {
            if let Some(k) = self.keys.iter().find(|k| k.0 == key) {
                return if k.1 == request {
                    Answer::Stored {
                        seq: k.2,
                        disposition: k.3,
                        replayed: true,
                    }
                } else {
                    Answer::KeyConflict
                };
            }
        }
        let post = Post {
            policy: Some(policy),
            agent_takes_input: self.takes_input,
            capacity: self.capacity,
            now: self.now,
            heal_turn: turns[0],
            turn: turns[1],
        };
        let decided = match self.state.post(&post, self.first_waiting()) {
            Ok(d) => d,
            // The model always knows the first waiting message and whether
            // the active turn was asked to cancel.
            Err(need) => panic!("the model lacks {need:?}"),
        };
        let a = match decided {
            Err(refusal) => return Answer::Refused(refusal),
            Ok(a) => a,
        };
        self.accept(&a);
        if let Some(key) = key {
            self.keys
                .push((key.to_owned(), request.to_owned(), a.seq, a.disposition));
        }
        Answer::Stored {
            seq: a.seq,
            disposition: a.disposition,
            replayed: false,
        }
    }

    /// Writes what an accepted message decided, as a store does.
    pub fn accept(&mut self, a: &Accepted) {
        if let Some(healed) = a.healed {
            self.started(healed);
        }
        self.put(a.seq, NewEntry::user_message("m"));
        self.accepted.push(a.seq);
        match a.started {
            Some(start) => self.started(start),
            None => self.waiting.push(Waiting {
                seq: a.seq,
                policy: a.waits_as,
            }),
        }
        if a.cancel.is_some() {
            self.feed(Event::CancelRequested {
                reason: "interrupted".into(),
            });
        }
    }

    /// Records a turn the procedure started.
    fn started(&mut self, start: Start) {
        self.put(start.seq, NewEntry::turn_started(start.turn, start.input));
        self.waiting.retain(|w| w.seq > start.input.to);
        self.active = Some(Active {
            id: start.turn,
            machine: TurnMachine::new(start.turn),
            offered: start.input.to,
        });
    }

    /// The turn took the waiting messages up to `upto` (the store's
    /// `take_input`: only what waits, only up to the last steered message).
    fn take(&mut self, upto: Seq) {
        let Some(turn) = self.active.as_ref().map(|a| a.id) else {
            return;
        };
        if self.state.may_take(turn, upto) != Ok(true) {
            return;
        }
        let count = self.waiting.iter().filter(|w| w.seq <= upto).count() as u64;
        self.state.take(upto, count);
        self.waiting.retain(|w| w.seq > upto);
        self.taken.push(Taken {
            at: self.log.len(),
            turn,
            upto,
        });
    }

    fn feed(&mut self, event: Event) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let id = active.id;
        let actions = active.machine.handle(event);
        if active.machine.is_draining() {
            self.state.cancel_requested();
        }
        for action in actions {
            match action {
                Action::Append(e) => {
                    self.append(*e);
                }
                Action::End { entries, .. } => self.finish(id, entries),
                Action::OfferInput => {
                    if let (Some(a), Some(last)) =
                        (self.active.as_mut(), self.state.queue.last_steer)
                    {
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
    fn finish(&mut self, turn: TurnId, entries: Vec<NewEntry>) {
        for e in entries {
            self.append(e);
        }
        if self.state.end(turn).is_ok() {
            self.active = None;
            self.heal();
        }
    }

    /// Drives the session until no turn runs and nothing waits.
    pub fn quiesce(&mut self) {
        while self.active.is_some() || self.state.pending_until.is_some() {
            if let Some(until) = self.state.pending_until {
                self.now = self.now.max(until);
                self.heal();
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
    use crate::{InputRange, ToolInfo};
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

    /// One post of a random batch: its session, policy, key (if any) and
    /// request (two requests may share a key: a retry, or a conflict).
    fn batch_post() -> impl Strategy<Value = (usize, Policy, Option<u8>, u8)> {
        (
            0usize..3,
            policy(),
            prop_oneof![Just(None), (0u8..4).prop_map(Some)],
            0u8..2,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]
        /// A batch of posts to several sessions, decided at once by
        /// `flow::post_batch` and then written, leaves every session with
        /// the log, the state and the answers that posting them one at a
        /// time leaves: sessions in random states (turns running or
        /// cancelling, queues near capacity, windows open or due), every
        /// policy, retries and reused keys inside the batch and against
        /// keys stored before it.
        #[test]
        fn a_batch_decides_what_one_post_after_another_decides(
            histories in proptest::collection::vec(proptest::collection::vec(event(), 0..40), 3),
            before in proptest::collection::vec(batch_post(), 0..6),
            batch in proptest::collection::vec(batch_post(), 1..40),
            capacity in 1u64..6,
            takes_input in any::<bool>(),
            window_ms in prop_oneof![Just(0u64), Just(100), Just(400)],
        ) {
            use crate::flow::{post_batch, BatchPost, Facts, Outcome};
            let key = |k: Option<u8>| k.map(|k| format!("k{k}"));
            let request = |r: u8| format!("r{r}");
            let mut one: Vec<SessionModel> = histories
                .into_iter()
                .map(|h| {
                    let mut m = SessionModel::with(capacity, takes_input, window_ms);
                    for e in h {
                        m.step(e);
                    }
                    m
                })
                .collect();
            for (s, p, k, r) in &before {
                one[*s].post_keyed(*p, key(*k).as_deref(), &request(*r));
            }
            let mut batched = one.clone();

            // The batch, as a store decides it: facts read first, then
            // every post at once.
            let keys: Vec<Option<String>> = batch.iter().map(|b| key(b.2)).collect();
            let requests: Vec<String> = batch.iter().map(|b| request(b.3)).collect();
            let ids: Vec<[TurnId; 2]> = batch.iter().map(|_| [TurnId::new(), TurnId::new()]).collect();
            let mut states: Vec<SessionState> = batched.iter().map(SessionModel::state).collect();
            let facts: Vec<Facts> = batched
                .iter()
                .map(|m| Facts {
                    first_waiting: m.state().due(m.now()).and(m.first_waiting()),
                })
                .collect();
            let posts: Vec<BatchPost> = batch
                .iter()
                .enumerate()
                .map(|(i, (s, p, _, _))| {
                    let m = &batched[*s];
                    BatchPost {
                        session: *s,
                        post: Post {
                            policy: Some(*p),
                            agent_takes_input: m.takes_input(),
                            capacity: m.capacity(),
                            now: m.now(),
                            heal_turn: ids[i][0],
                            turn: ids[i][1],
                        },
                        key: keys[i].as_deref(),
                        request: &requests[i],
                        stored: keys[i]
                            .as_deref()
                            .map_or(Stored::None, |k| m.stored(k, &requests[i])),
                    }
                })
                .collect();
            let outcomes = post_batch(&mut states, &facts, &posts);
            // Written as a store writes a batch: the rows of what each
            // accepted post decided, and each session's row once.
            for (m, s) in batched.iter_mut().zip(&states) {
                m.save(*s);
            }
            for (o, (s, _, _, _)) in outcomes.iter().zip(&batch) {
                if let Outcome::Accepted(a) = o {
                    batched[*s].accept(a);
                }
            }

            // One at a time, with the same turn ids.
            for (i, (s, p, _, _)) in batch.iter().enumerate() {
                let got = one[*s].post_with(*p, keys[i].as_deref(), &requests[i], ids[i]);
                let seq_of = |o: &Outcome| match o {
                    Outcome::Accepted(a) => Some((a.seq, a.disposition)),
                    _ => None,
                };
                match (&outcomes[i], got) {
                    (Outcome::Accepted(a), Answer::Stored { seq, disposition, replayed: false }) => {
                        prop_assert_eq!((a.seq, a.disposition), (seq, disposition));
                    }
                    (Outcome::ReplayOf(e), Answer::Stored { seq, disposition, replayed: true }) => {
                        prop_assert_eq!(seq_of(&outcomes[*e]), Some((seq, disposition)));
                    }
                    (Outcome::Replay, Answer::Stored { replayed: true, .. }) => {}
                    (Outcome::Refused(r), Answer::Refused(q)) => prop_assert_eq!(*r, q),
                    (Outcome::KeyConflict, Answer::KeyConflict) => {}
                    (b, o) => prop_assert!(false, "post {}: batch {:?}, one at a time {:?}", i, b, o),
                }
            }
            for (s, (b, o)) in batched.iter().zip(&one).enumerate() {
                prop_assert_eq!(b.state(), o.state(), "session {}'s row", s);
                prop_assert_eq!(&b.log, &o.log, "session {}'s log", s);
                prop_assert_eq!(&b.accepted, &o.accepted);
                if let Err(why) = b.check(false) {
                    return Err(TestCaseError::fail(why));
                }
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
