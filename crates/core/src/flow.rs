//! The decision procedure of one session's log, for one write or a whole
//! batch of posts.
//!
//! A store reads a session's [`SessionState`] (the decision columns of its
//! row), asks these functions what happens, writes the rows they describe
//! and saves the state back; it decides nothing itself. Everything a post
//! or a turn's end decides is here: the seq of each new entry, healing a
//! queue left waiting (or a debounce window that is due) before anything
//! else, the disposition under each policy, capacity, the cursor, the turn
//! a message starts, interrupting, steering, and a window's start time.
//! Idempotency across a batch is decided by [`post_batch`].
//!
//! The functions are pure and deterministic (turn ids come from the
//! caller), so the embedded store, PostgreSQL's batches and the in-memory
//! [`crate::model`] run the same code, and the model's property tests test
//! it rather than a copy.

use std::collections::HashMap;

use crate::policy::{decide, ActiveTurn, Debounce, Decision, NextTurn, QueueSummary};
use crate::{Disposition, InputRange, Policy, Seq, TurnId};

/// What the decisions of a session read and change: the decision columns
/// of its row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionState {
    /// The last seq given (I1: the next entry gets `last_seq + 1`).
    pub last_seq: Seq,
    /// The last user message handed to a turn: everything after it waits.
    pub cursor: Seq,
    /// The turn starting or running.
    pub active: Option<TurnId>,
    /// Whether a cancel was asked for the active turn (it takes no more
    /// input); `None` when the store has not read it. Only a steered
    /// message needs it.
    pub cancelling: Option<bool>,
    /// The waiting messages, summarized (kept in step with `cursor`).
    pub queue: QueueSummary,
    /// The session's default policy.
    pub policy: Policy,
    /// The debounce window, in ms (0: off).
    pub debounce_ms: i64,
    /// The window open now: its first message's arrival and when its turn
    /// starts (store clock, µs), or neither.
    pub pending_first: Option<i64>,
    pub pending_until: Option<i64>,
}

/// A fact a decision needs that the state does not hold: the store reads
/// it and asks again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// The seq of the first user message after the cursor (the first one
    /// waiting), to start the turn that is due.
    FirstWaiting,
    /// Whether a cancel was asked for the active turn.
    Cancelling(TurnId),
}

/// A turn this procedure started: its `turn_started` entry goes at `seq`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Start {
    pub turn: TurnId,
    pub input: InputRange,
    pub seq: Seq,
}

/// A new user message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Post {
    /// Its policy override (the session's policy otherwise).
    pub policy: Option<Policy>,
    /// Whether the session's agent takes input mid-turn.
    pub agent_takes_input: bool,
    /// How many messages may wait.
    pub capacity: u64,
    /// The store's clock (µs).
    pub now: i64,
    /// The ids to give the turns this post may start: a due turn healed
    /// first, and the turn it starts itself.
    pub heal_turn: TurnId,
    pub turn: TurnId,
}

/// Why a message is refused; nothing of it is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `reject` on a busy session (`409 session_busy`).
    Busy { turn: TurnId },
    /// The queue is at capacity (`429 queue_full`).
    QueueFull { capacity: u64 },
}

/// What an accepted message does. The store writes, in this order: the
/// healed turn (its record and its `turn_started` entry), the message at
/// `seq`, the turn it started, the cancel request; then the state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Accepted {
    /// A turn that was due (a queue left waiting, or a debounce window that
    /// closed) started before the message was decided, so nothing
    /// overtakes what waited.
    pub healed: Option<Start>,
    /// The message's seq.
    pub seq: Seq,
    /// The policy it counts as while it waits; stored with it.
    pub waits_as: Policy,
    pub disposition: Disposition,
    /// The turn this message started (the session was idle).
    pub started: Option<Start>,
    /// The turn this message interrupts: ask it to cancel.
    pub cancel: Option<TurnId>,
    /// The running turn the message was steered to.
    pub steer: Option<TurnId>,
    /// The session debounces: its turn starts then.
    pub pending_until: Option<i64>,
}

/// The turn named is not the session's active one (it ended first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotActive;

/// Why an active turn could not take input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TakeRefusal {
    /// The turn is not the active one (it ended first; its end gave the
    /// input to the next turn).
    NotActive,
    /// No steered message waits at `upto` or after it.
    NoSteer,
}

impl SessionState {
    /// A new, empty, idle session.
    pub fn new(policy: Policy, debounce_ms: i64) -> Self {
        Self {
            last_seq: 0,
            cursor: 0,
            active: None,
            cancelling: None,
            queue: QueueSummary::default(),
            policy,
            debounce_ms,
            pending_first: None,
            pending_until: None,
        }
    }

    /// Gives the next seq (I1).
    pub fn next_seq(&mut self) -> Seq {
        self.last_seq += 1;
        self.last_seq
    }

    /// The turn that is due now, if any: messages wait, no turn is active,
    /// and no debounce window holds them past `now`. Starting it needs the
    /// first waiting message ([`Need::FirstWaiting`]).
    pub fn due(&self, now: i64) -> Option<NextTurn> {
        if self.active.is_some() || self.pending_until.is_some_and(|until| until > now) {
            return None;
        }
        self.queue.next()
    }

    /// Starts the due turn `next` (from [`SessionState::due`]) as `turn`,
    /// `first` being the first waiting message.
    pub fn start_due(&mut self, next: NextTurn, first: Seq, turn: TurnId) -> Start {
        let to = match next {
            NextTurn::First => first,
            NextTurn::UpTo(to) => to,
        };
        self.queue.consume(next);
        self.start(turn, InputRange { from: first, to })
    }

    /// Starts `turn` on `input`; its `turn_started` entry takes the next seq.
    fn start(&mut self, turn: TurnId, input: InputRange) -> Start {
        self.active = Some(turn);
        self.cancelling = Some(false);
        self.cursor = input.to;
        // A turn takes what a debounce window held back: the window closes.
        self.pending_first = None;
        self.pending_until = None;
        Start {
            turn,
            input,
            seq: self.next_seq(),
        }
    }

    /// Starts the due turn, if one is: `first_waiting` is the store's answer
    /// to [`Need::FirstWaiting`], if it read it.
    pub fn heal(
        &mut self,
        now: i64,
        first_waiting: Option<Seq>,
        turn: TurnId,
    ) -> Result<Option<Start>, Need> {
        let Some(next) = self.due(now) else {
            return Ok(None);
        };
        let first = first_waiting.ok_or(Need::FirstWaiting)?;
        Ok(Some(self.start_due(next, first, turn)))
    }

    /// Decides a new message. On `Ok(Ok(_))` the state holds the message's
    /// effects; on a refusal or a need it is unchanged. `first_waiting` is
    /// the store's answer to [`Need::FirstWaiting`], if it read it.
    pub fn post(
        &mut self,
        post: &Post,
        first_waiting: Option<Seq>,
    ) -> Result<Result<Accepted, Refusal>, Need> {
        let mut s = *self;
        let healed = s.heal(post.now, first_waiting, post.heal_turn)?;
        let policy = post.policy.unwrap_or(s.policy);
        let active = match s.active {
            Some(id) => Some(ActiveTurn {
                id,
                takes_input: policy == Policy::Steer
                    && post.agent_takes_input
                    && !s.cancelling.ok_or(Need::Cancelling(id))?,
            }),
            None => None,
        };
        let debounce = Debounce {
            window: s.debounce_ms.saturating_mul(1000),
            first: s.pending_first,
            now: post.now,
        };
        let decision = decide(active, &s.queue, post.capacity, policy, post.turn, debounce);
        let (disposition, start, cancel_active, waits_as, pending_until) = match decision {
            Decision::Reject { turn_id } => return Ok(Err(Refusal::Busy { turn: turn_id })),
            Decision::QueueFull { capacity } => return Ok(Err(Refusal::QueueFull { capacity })),
            Decision::Accept {
                disposition,
                start,
                cancel_active,
                waits_as,
                pending_until,
            } => (disposition, start, cancel_active, waits_as, pending_until),
        };
        let seq = s.next_seq();
        let started = if start {
            Some(s.start(post.turn, InputRange { from: seq, to: seq }))
        } else {
            s.queue.push(seq, waits_as);
            if let Some(until) = pending_until {
                s.pending_first.get_or_insert(post.now);
                s.pending_until = Some(until);
            }
            None
        };
        let cancel = match active {
            Some(a) if cancel_active => {
                s.cancelling = Some(true);
                Some(a.id)
            }
            _ => None,
        };
        let steer = (waits_as == Policy::Steer)
            .then_some(disposition.turn_id)
            .flatten();
        *self = s;
        Ok(Ok(Accepted {
            healed,
            seq,
            waits_as,
            disposition,
            started,
            cancel,
            steer,
            pending_until,
        }))
    }

    /// A cancel was asked for the active turn.
    pub fn cancel_requested(&mut self) {
        if self.active.is_some() {
            self.cancelling = Some(true);
        }
    }

    /// The active `turn` ends (its terminal entries take seqs from
    /// [`SessionState::next_seq`]); the next turn is then due if messages
    /// wait ([`SessionState::heal`]).
    pub fn end(&mut self, turn: TurnId) -> Result<(), NotActive> {
        if self.active != Some(turn) {
            return Err(NotActive);
        }
        self.active = None;
        self.cancelling = None;
        Ok(())
    }

    /// Whether the active `turn` may take the waiting messages up to the
    /// steered message `upto`: `Ok(false)` if it already has them.
    pub fn may_take(&self, turn: TurnId, upto: Seq) -> Result<bool, TakeRefusal> {
        if self.active != Some(turn) {
            return Err(TakeRefusal::NotActive);
        }
        if upto <= self.cursor {
            return Ok(false);
        }
        if self.queue.last_steer.is_none_or(|l| upto > l) {
            return Err(TakeRefusal::NoSteer);
        }
        Ok(true)
    }

    /// The active turn took the `count` waiting messages up to `upto`
    /// (after [`SessionState::may_take`] said it may).
    pub fn take(&mut self, upto: Seq, count: u64) {
        self.queue.take(upto, count);
        self.cursor = upto;
    }
}

/// Whether an earlier request with a post's idempotency key is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    /// No message with this key is stored.
    None,
    /// The stored message is this request (same content, same policy).
    Same,
    /// The key was used for a different request.
    Different,
}

/// One post of a batch.
#[derive(Clone, Debug)]
pub struct BatchPost<'a> {
    /// Which of the batch's sessions it goes to.
    pub session: usize,
    pub post: Post,
    /// Its idempotency key, what identifies the request (its content and
    /// requested policy), and what the store holds under the key.
    pub key: Option<&'a str>,
    pub request: &'a str,
    pub stored: Stored,
}

/// What happened to one post of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Accepted(Accepted),
    Refused(Refusal),
    /// A retry of the message stored under its key: answer with it.
    Replay,
    /// A retry of an earlier post of this batch: answer with its outcome.
    ReplayOf(usize),
    /// Its key was used for a different request (`409`).
    KeyConflict,
    /// A fact the store did not read: run it on its own.
    Need(Need),
}

/// The facts a store read for one session of a batch before deciding.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    /// The first waiting message, if the store read it (it must when
    /// [`SessionState::due`] is set at the batch's start).
    pub first_waiting: Option<Seq>,
}

/// Decides a batch of posts, in order, to the sessions `states` (changed in
/// place): what one post after another would decide, each as if the ones
/// before it had committed. A post refused, or in conflict, changes
/// nothing; a later post with the key of an earlier accepted one replays
/// it.
pub fn post_batch(
    states: &mut [SessionState],
    facts: &[Facts],
    posts: &[BatchPost<'_>],
) -> Vec<Outcome> {
    // The accepted posts by (session, key): what a retry replays.
    let mut keys: HashMap<(usize, &str), usize> = HashMap::new();
    let mut out = Vec::with_capacity(posts.len());
    for (i, p) in posts.iter().enumerate() {
        if let Some(key) = p.key {
            if let Some(&earlier) = keys.get(&(p.session, key)) {
                out.push(if posts[earlier].request == p.request {
                    Outcome::ReplayOf(earlier)
                } else {
                    Outcome::KeyConflict
                });
                continue;
            }
            match p.stored {
                Stored::None => {}
                Stored::Same => {
                    out.push(Outcome::Replay);
                    continue;
                }
                Stored::Different => {
                    out.push(Outcome::KeyConflict);
                    continue;
                }
            }
        }
        let s = &mut states[p.session];
        // A heal moves the cursor: the first waiting message is known only
        // before the first turn the batch starts on this session, which is
        // the only time one can be due (a post never leaves one due).
        let first = facts.get(p.session).and_then(|f| f.first_waiting);
        let outcome = match s.post(&p.post, first.filter(|&f| f > s.cursor)) {
            Err(need) => Outcome::Need(need),
            Ok(Err(refusal)) => Outcome::Refused(refusal),
            Ok(Ok(accepted)) => {
                if let Some(key) = p.key {
                    keys.insert((p.session, key), i);
                }
                Outcome::Accepted(accepted)
            }
        };
        out.push(outcome);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DispositionType;

    fn post(policy: Policy, now: i64) -> Post {
        Post {
            policy: Some(policy),
            agent_takes_input: true,
            capacity: 10,
            now,
            heal_turn: TurnId::new(),
            turn: TurnId::new(),
        }
    }

    fn accept(s: &mut SessionState, p: Policy, first: Option<Seq>) -> Accepted {
        match s.post(&post(p, 0), first) {
            Ok(Ok(a)) => a,
            other => panic!("accepted, not {other:?}"),
        }
    }

    #[test]
    fn an_idle_session_starts_a_turn_on_the_message() {
        let mut s = SessionState::new(Policy::Queue, 0);
        let a = accept(&mut s, Policy::Queue, None);
        assert_eq!(a.seq, 1);
        let started = a.started.expect("a turn starts");
        assert_eq!(started.seq, 2);
        assert_eq!(started.input, InputRange { from: 1, to: 1 });
        assert_eq!(s.active, Some(started.turn));
        assert_eq!(s.cursor, 1);
        assert_eq!(s.last_seq, 2);
    }

    #[test]
    fn a_refusal_or_a_need_leaves_the_state_as_it_was() {
        let mut s = SessionState::new(Policy::Queue, 0);
        accept(&mut s, Policy::Queue, None);
        let before = s;
        let r = s.post(&post(Policy::Reject, 0), None);
        assert!(matches!(r, Ok(Err(Refusal::Busy { .. }))));
        assert_eq!(s, before);
        s.cancelling = None;
        let before = s;
        let r = s.post(&post(Policy::Steer, 0), None);
        assert!(matches!(r, Err(Need::Cancelling(_))));
        assert_eq!(s, before);
    }

    #[test]
    fn a_queue_left_waiting_is_healed_before_the_message_is_decided() {
        let mut s = SessionState::new(Policy::Queue, 0);
        // Two messages wait with no turn active (as a crash between
        // transactions of an older version could leave it).
        s.last_seq = 5;
        s.cursor = 3;
        s.queue.push(4, Policy::Queue);
        s.queue.push(5, Policy::Queue);
        assert_eq!(
            s.post(&post(Policy::Queue, 0), None),
            Err(Need::FirstWaiting)
        );
        let a = accept(&mut s, Policy::Queue, Some(4));
        let healed = a.healed.expect("the waiting queue starts first");
        assert_eq!(healed.input, InputRange { from: 4, to: 4 });
        assert_eq!(healed.seq, 6);
        assert_eq!(a.seq, 7);
        assert_eq!(a.disposition.kind, DispositionType::Queued);
        assert_eq!(a.disposition.position, Some(2));
    }

    #[test]
    fn an_interrupt_stops_later_steers_in_the_same_batch() {
        let mut states = [SessionState::new(Policy::Queue, 0)];
        accept(&mut states[0], Policy::Queue, None);
        let posts: Vec<BatchPost> = [Policy::Steer, Policy::Interrupt, Policy::Steer]
            .into_iter()
            .map(|p| BatchPost {
                session: 0,
                post: post(p, 1),
                key: None,
                request: "",
                stored: Stored::None,
            })
            .collect();
        let out = post_batch(&mut states, &[Facts::default()], &posts);
        let kinds: Vec<_> = out
            .iter()
            .map(|o| match o {
                Outcome::Accepted(a) => a.disposition.kind,
                other => panic!("accepted, not {other:?}"),
            })
            .collect();
        assert_eq!(
            kinds,
            [
                DispositionType::Steered,
                DispositionType::Interrupting,
                DispositionType::Queued
            ]
        );
    }

    #[test]
    fn a_retry_in_the_same_batch_replays_and_a_reused_key_conflicts() {
        let mut states = [SessionState::new(Policy::Queue, 0)];
        let bp = |key, request, stored| BatchPost {
            session: 0,
            post: post(Policy::Queue, 0),
            key: Some(key),
            request,
            stored,
        };
        let posts = [
            bp("a", "hello", Stored::None),
            bp("a", "hello", Stored::None),
            bp("a", "other", Stored::None),
            bp("b", "x", Stored::Same),
            bp("c", "x", Stored::Different),
        ];
        let out = post_batch(&mut states, &[Facts::default()], &posts);
        assert!(matches!(out[0], Outcome::Accepted(_)));
        assert_eq!(out[1], Outcome::ReplayOf(0));
        assert_eq!(out[2], Outcome::KeyConflict);
        assert_eq!(out[3], Outcome::Replay);
        assert_eq!(out[4], Outcome::KeyConflict);
        assert_eq!(states[0].last_seq, 2, "one message and its turn");
    }
}
