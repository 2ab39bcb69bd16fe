//! Busy policies: what happens to a user message that arrives while a turn
//! runs, and how waiting messages are grouped into turns.
//!
//! Both stores call [`decide`] and [`plan_turns`] inside the transaction that
//! stores the message, with the session row locked, so the decision and the
//! write are one atomic step (no check-then-act across an await).
//!
//! Two rules beyond the busy policies live here too:
//! - **Steering.** A `steer` message waits in the queue like a `merge` one
//!   (it gathers every message before it), and the running turn may *take*
//!   it: the agent accepted it mid-turn, and [`QueueSummary::take`] moves it
//!   (with everything before it) out of the queue into that turn. Whatever
//!   the turn did not take when it ends is still waiting, so the transaction
//!   that ends the turn hands it to the next one (I6: consumed exactly once).
//! - **Debounce.** On a session with a debounce window, a message that would
//!   start a turn on an idle session waits instead ([`Debounce`]); the turn
//!   starts once no message came for the window (at most 10 windows after
//!   the first), with every waiting message.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{InputRange, Seq, Timestamp, TurnId};

/// What to do with a message that arrives while a turn runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Run after the current turn; one turn per message, FIFO.
    #[default]
    Queue,
    /// Run after the current turn, together with every message waiting then.
    Merge,
    /// Cancel the current turn, then run with every message waiting.
    Interrupt,
    /// Refuse with `409 session_busy`; nothing is stored.
    Reject,
    /// Hand the message to the running turn when its agent takes input
    /// mid-turn; otherwise the same as `queue`.
    Steer,
}

impl Policy {
    /// The name stored in the database and shown on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queue => "queue",
            Self::Merge => "merge",
            Self::Interrupt => "interrupt",
            Self::Reject => "reject",
            Self::Steer => "steer",
        }
    }

    /// Whether a waiting message with this policy pulls every message before
    /// it into its own turn. A steered message does: the running turn takes
    /// it with every message before it, or the next turn does.
    fn gathers(self) -> bool {
        matches!(self, Self::Merge | Self::Interrupt | Self::Steer)
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown policy name.
#[derive(Debug, thiserror::Error)]
#[error("unknown policy {0:?}: expected queue, merge, interrupt, reject or steer")]
pub struct UnknownPolicy(pub String);

impl FromStr for Policy {
    type Err = UnknownPolicy;
    fn from_str(s: &str) -> Result<Self, UnknownPolicy> {
        Ok(match s {
            "queue" => Self::Queue,
            "merge" => Self::Merge,
            "interrupt" => Self::Interrupt,
            "reject" => Self::Reject,
            "steer" => Self::Steer,
            _ => return Err(UnknownPolicy(s.to_owned())),
        })
    }
}

/// A user message stored and waiting for a turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Waiting {
    pub seq: Seq,
    pub policy: Policy,
}

/// Splits the waiting messages (in `seq` order) into the turns that will
/// consume them, in order.
///
/// A `merge` or `interrupt` message takes every message waiting before it
/// into its own turn ("all messages waiting at that moment go together");
/// `queue` messages after the last such message get one turn each. Messages
/// are never reordered and each lands in exactly one turn (I6).
pub fn plan_turns(waiting: &[Waiting]) -> Vec<InputRange> {
    let mut turns = Vec::new();
    let mut rest = waiting;
    while let Some(first) = rest.first() {
        let take = rest
            .iter()
            .rposition(|w| w.policy.gathers())
            .map_or(1, |last| last + 1);
        turns.push(InputRange {
            from: first.seq,
            to: rest[take - 1].seq,
        });
        rest = &rest[take..];
    }
    turns
}

/// The input of the next turn, if anything is waiting.
pub fn next_input(waiting: &[Waiting]) -> Option<InputRange> {
    plan_turns(waiting).into_iter().next()
}

/// What a store keeps about a session's waiting messages so that deciding
/// on a new message, and starting the next turn, never reads the queue: it
/// is `plan_turns` folded into a few numbers, updated as messages arrive and
/// turns consume them. Property tests check it against [`plan_turns`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueSummary {
    /// Messages waiting for a turn.
    pub waiting: u64,
    /// The last waiting `merge` or `interrupt` message: the next turn takes
    /// everything up to it.
    pub last_gather: Option<Seq>,
    /// Waiting messages after `last_gather` (all of them if there is none);
    /// each runs in its own turn.
    pub after_gather: u64,
    /// The last waiting steered message: the running turn may take every
    /// waiting message up to it. Never after `last_gather` (a steered
    /// message gathers).
    pub last_steer: Option<Seq>,
}

/// How far the next turn reaches into the queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NextTurn {
    /// Just the first waiting message.
    First,
    /// Every waiting message up to and including this seq.
    UpTo(Seq),
}

impl QueueSummary {
    /// A message with `policy` was stored at `seq` and waits.
    pub fn push(&mut self, seq: Seq, policy: Policy) {
        self.waiting += 1;
        if policy.gathers() {
            self.last_gather = Some(seq);
            self.after_gather = 0;
        } else {
            self.after_gather += 1;
        }
        if policy == Policy::Steer {
            self.last_steer = Some(seq);
        }
    }

    /// The running turn took the `count` waiting messages with seq up to
    /// `upto` (steered input, and every message waiting before it).
    pub fn take(&mut self, upto: Seq, count: u64) {
        self.waiting = self.waiting.saturating_sub(count);
        match self.last_gather {
            // The messages taken all come before the gathering one, so what
            // follows it is unchanged.
            Some(g) if g > upto => {}
            // Nothing that gathers is left: every message left runs alone.
            _ => {
                self.last_gather = None;
                self.after_gather = self.waiting;
            }
        }
        if self.last_steer.is_some_and(|s| s <= upto) {
            self.last_steer = None;
        }
    }

    /// How many turns the waiting messages will take (`plan_turns(..).len()`).
    pub fn planned_turns(&self) -> u64 {
        u64::from(self.last_gather.is_some()) + self.after_gather
    }

    /// The next turn's reach, if anything waits.
    pub fn next(&self) -> Option<NextTurn> {
        match (self.waiting, self.last_gather) {
            (0, _) => None,
            (_, Some(to)) => Some(NextTurn::UpTo(to)),
            (_, None) => Some(NextTurn::First),
        }
    }

    /// The next turn took its messages.
    pub fn consume(&mut self, next: NextTurn) {
        match next {
            NextTurn::First => {
                self.waiting = self.waiting.saturating_sub(1);
                self.after_gather = self.after_gather.saturating_sub(1);
            }
            NextTurn::UpTo(_) => {
                self.waiting = self.after_gather;
                self.last_gather = None;
                // A steered message never follows the last gathering one.
                self.last_steer = None;
            }
        }
    }
}

/// What the `201` for a message says happened to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DispositionType {
    Started,
    Queued,
    Merged,
    Interrupting,
    Steered,
    Pending,
}

/// A message's disposition: `started` (with the turn it began), `queued`
/// (with its position: 1 runs next), `merged` (into the next turn),
/// `interrupting` (with the turn being cancelled), `steered` (with the
/// running turn it was handed to), or `pending` (the session debounces: a
/// turn starts at `until` unless another message comes first).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Disposition {
    #[serde(rename = "type")]
    pub kind: DispositionType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub turn_id: Option<TurnId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<u64>,
    /// `pending`: when the turn starts if no other message comes first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub until: Option<Timestamp>,
}

/// The turn that is starting or running, as the deciding transaction sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActiveTurn {
    pub id: TurnId,
    /// Whether it will see a message handed to it now: its agent takes
    /// input mid-turn and no cancel was asked for.
    pub takes_input: bool,
}

/// A session's debounce window, as the deciding transaction sees it. Times
/// are the store's clock, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Debounce {
    /// The window's length (0: off).
    pub window: i64,
    /// When the first message of the window open now arrived (messages are
    /// pending), if one is open.
    pub first: Option<i64>,
    /// Now.
    pub now: i64,
}

/// How many windows after the first pending message a turn starts at the
/// latest, however many messages keep coming.
pub const DEBOUNCE_CAP: i64 = 10;

impl Debounce {
    /// Whether a message that finds no turn running waits.
    pub fn holds(&self) -> bool {
        self.window > 0 || self.first.is_some()
    }

    /// When the pending turn starts if a message arrives now and no other
    /// follows: a window from now, never more than [`DEBOUNCE_CAP`] windows
    /// after the first.
    pub fn until(&self) -> i64 {
        let first = self.first.unwrap_or(self.now);
        (self.now + self.window).min(first + DEBOUNCE_CAP * self.window)
    }
}

/// The outcome of [`decide`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Refuse: the session is busy (`409 session_busy`); store nothing.
    Reject { turn_id: TurnId },
    /// Refuse: the queue is at capacity (`429 queue_full`); store nothing.
    QueueFull { capacity: u64 },
    /// Store the message. If `start` is set the session was idle and a turn
    /// consuming just this message begins in the same transaction; else it
    /// waits, counted in the queue as `waits_as`. If `cancel_active` is set
    /// the running turn must be cancelled. With `pending_until` the session
    /// debounces: the turn starts then, unless another message moves it.
    Accept {
        disposition: Disposition,
        start: bool,
        cancel_active: bool,
        waits_as: Policy,
        pending_until: Option<i64>,
    },
}

/// Decides what happens to a new message with `policy`, given the active turn
/// (if any), a summary of the messages already waiting, the queue's capacity
/// and the session's debounce window. `turn_id` is the id to give a turn
/// started now.
///
/// Callers keep "something waits ⇒ a turn is active, or a debounce window is
/// open" (a turn's end starts the next one in the same transaction, and a
/// window that is due starts its turn before anything else is decided).
pub fn decide(
    active: Option<ActiveTurn>,
    queue: &QueueSummary,
    capacity: u64,
    policy: Policy,
    turn_id: TurnId,
    debounce: Debounce,
) -> Decision {
    let Some(active) = active else {
        if debounce.holds() {
            if queue.waiting >= capacity {
                return Decision::QueueFull { capacity };
            }
            let until = debounce.until();
            return Decision::Accept {
                disposition: Disposition {
                    kind: DispositionType::Pending,
                    turn_id: None,
                    position: None,
                    until: Some(Timestamp(until)),
                },
                start: false,
                cancel_active: false,
                // The pending turn takes every message waiting when it starts.
                waits_as: Policy::Merge,
                pending_until: Some(until),
            };
        }
        return Decision::Accept {
            disposition: Disposition {
                kind: DispositionType::Started,
                turn_id: Some(turn_id),
                position: None,
                until: None,
            },
            start: true,
            cancel_active: false,
            waits_as: policy,
            pending_until: None,
        };
    };
    // A steer the running turn would not see is a plain `queue`: never
    // `steered` for a message the turn will not be handed.
    let policy = match policy {
        Policy::Steer if !active.takes_input => Policy::Queue,
        p => p,
    };
    let (kind, turn, position) = match policy {
        Policy::Reject => return Decision::Reject { turn_id: active.id },
        _ if queue.waiting >= capacity => return Decision::QueueFull { capacity },
        Policy::Queue => (
            DispositionType::Queued,
            None,
            Some(queue.planned_turns() + 1),
        ),
        Policy::Merge => (DispositionType::Merged, None, Some(1)),
        Policy::Interrupt => (DispositionType::Interrupting, Some(active.id), None),
        Policy::Steer => (DispositionType::Steered, Some(active.id), None),
    };
    Decision::Accept {
        disposition: Disposition {
            kind,
            turn_id: turn,
            position,
            until: None,
        },
        start: false,
        cancel_active: policy == Policy::Interrupt,
        waits_as: policy,
        pending_until: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(seq: Seq, policy: Policy) -> Waiting {
        Waiting { seq, policy }
    }

    fn r(from: Seq, to: Seq) -> InputRange {
        InputRange { from, to }
    }

    fn policy() -> impl proptest::strategy::Strategy<Value = Policy> {
        proptest::prop_oneof![
            proptest::strategy::Just(Policy::Queue),
            proptest::strategy::Just(Policy::Merge),
            proptest::strategy::Just(Policy::Interrupt),
            proptest::strategy::Just(Policy::Steer),
        ]
    }

    /// One step of the summary property: a message arrives, the next turn
    /// starts, or the running turn takes the steered input waiting.
    #[derive(Clone, Debug)]
    enum Step {
        Arrive(Policy),
        NextTurn,
        /// Takes up to the last steered message, or (with `true`) up to an
        /// earlier one, as when a later steer arrived after the offer.
        Take(bool),
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::strategy::Strategy;
        proptest::prop_oneof![
            4 => policy().prop_map(Step::Arrive),
            2 => proptest::strategy::Just(Step::NextTurn),
            1 => proptest::bool::ANY.prop_map(Step::Take),
        ]
    }

    proptest::proptest! {
        /// The summary the stores keep answers exactly what `plan_turns`
        /// over the full queue answers, through arrivals, consumption by the
        /// next turn and steered input taken by the running one.
        #[test]
        fn summary_agrees_with_plan_turns(steps in proptest::collection::vec(step(), 0..60)) {
            let mut queue: Vec<Waiting> = Vec::new();
            let mut q = QueueSummary::default();
            let mut seq = 0;
            for step in steps {
                match step {
                    Step::Arrive(p) => {
                        seq += 1;
                        queue.push(w(seq, p));
                        q.push(seq, p);
                    }
                    Step::Take(earlier) => {
                        let steers: Vec<Seq> = queue.iter().filter(|m| m.policy == Policy::Steer).map(|m| m.seq).collect();
                        proptest::prop_assert_eq!(q.last_steer, steers.last().copied());
                        let upto = if earlier { steers.first() } else { steers.last() };
                        if let Some(&upto) = upto {
                            let count = queue.iter().filter(|m| m.seq <= upto).count() as u64;
                            q.take(upto, count);
                            queue.retain(|m| m.seq > upto);
                        }
                    }
                    Step::NextTurn => {
                        let expected = next_input(&queue);
                        let got = q.next();
                        match (expected, got) {
                            (None, None) => {}
                            (Some(r), Some(NextTurn::First)) => {
                                proptest::prop_assert_eq!(r.from, r.to);
                                proptest::prop_assert_eq!(r.from, queue[0].seq);
                            }
                            (Some(r), Some(NextTurn::UpTo(to))) => proptest::prop_assert_eq!(r.to, to),
                            (e, g) => proptest::prop_assert!(false, "plan {:?} vs summary {:?}", e, g),
                        }
                        if let Some(n) = got {
                            q.consume(n);
                        }
                        if let Some(r) = expected {
                            queue.retain(|m| m.seq > r.to);
                        }
                    }
                }
                proptest::prop_assert_eq!(q.waiting, queue.len() as u64);
                proptest::prop_assert_eq!(q.planned_turns(), plan_turns(&queue).len() as u64);
                proptest::prop_assert_eq!(
                    q.last_steer,
                    queue.iter().rev().find(|m| m.policy == Policy::Steer).map(|m| m.seq)
                );
            }
        }
    }

    #[test]
    fn queue_messages_get_one_turn_each() {
        let plan = plan_turns(&[w(3, Policy::Queue), w(5, Policy::Queue)]);
        assert_eq!(plan, vec![r(3, 3), r(5, 5)]);
    }

    #[test]
    fn merge_gathers_everything_before_it() {
        let plan = plan_turns(&[
            w(3, Policy::Queue),
            w(4, Policy::Merge),
            w(6, Policy::Queue),
        ]);
        assert_eq!(plan, vec![r(3, 4), r(6, 6)]);
        let plan = plan_turns(&[w(3, Policy::Merge), w(4, Policy::Interrupt)]);
        assert_eq!(plan, vec![r(3, 4)]);
        // A steered message the running turn did not take runs next, with
        // everything before it.
        let plan = plan_turns(&[
            w(3, Policy::Queue),
            w(5, Policy::Steer),
            w(7, Policy::Queue),
        ]);
        assert_eq!(plan, vec![r(3, 5), r(7, 7)]);
    }

    fn off() -> Debounce {
        Debounce::default()
    }

    #[test]
    fn idle_session_starts_a_turn_whatever_the_policy() {
        let t = TurnId::new();
        for p in [
            Policy::Queue,
            Policy::Merge,
            Policy::Interrupt,
            Policy::Reject,
            Policy::Steer,
        ] {
            let d = decide(None, &QueueSummary::default(), 10, p, t, off());
            assert!(matches!(
                d,
                Decision::Accept { start: true, disposition: Disposition { kind: DispositionType::Started, turn_id: Some(id), .. }, .. } if id == t
            ));
        }
    }

    fn summary(waiting: &[Waiting]) -> QueueSummary {
        let mut q = QueueSummary::default();
        for w in waiting {
            q.push(w.seq, w.policy);
        }
        q
    }

    #[test]
    fn busy_session_applies_the_policy() {
        let active = Some(ActiveTurn {
            id: TurnId::new(),
            takes_input: false,
        });
        let t = TurnId::new();
        let waiting = summary(&[w(3, Policy::Queue)]);
        assert_eq!(
            decide(active, &waiting, 10, Policy::Reject, t, off()),
            Decision::Reject {
                turn_id: active.map(|a| a.id).unwrap_or_default()
            }
        );
        let Decision::Accept { disposition, .. } =
            decide(active, &waiting, 10, Policy::Queue, t, off())
        else {
            panic!("queue accepts");
        };
        assert_eq!(disposition.position, Some(2));
        let Decision::Accept { cancel_active, .. } =
            decide(active, &waiting, 10, Policy::Interrupt, t, off())
        else {
            panic!("interrupt accepts");
        };
        assert!(cancel_active);
        assert_eq!(
            decide(active, &waiting, 1, Policy::Queue, t, off()),
            Decision::QueueFull { capacity: 1 }
        );
    }

    #[test]
    fn steer_joins_a_turn_that_takes_input_and_queues_otherwise() {
        let id = TurnId::new();
        let waiting = summary(&[w(3, Policy::Queue)]);
        let takes = Some(ActiveTurn {
            id,
            takes_input: true,
        });
        let Decision::Accept {
            disposition,
            waits_as,
            cancel_active,
            start,
            ..
        } = decide(takes, &waiting, 10, Policy::Steer, TurnId::new(), off())
        else {
            panic!("steer accepts");
        };
        assert_eq!(disposition.kind, DispositionType::Steered);
        assert_eq!(disposition.turn_id, Some(id));
        assert_eq!(waits_as, Policy::Steer);
        assert!(!cancel_active && !start);

        let deaf = Some(ActiveTurn {
            id,
            takes_input: false,
        });
        let Decision::Accept {
            disposition,
            waits_as,
            ..
        } = decide(deaf, &waiting, 10, Policy::Steer, TurnId::new(), off())
        else {
            panic!("steer accepts");
        };
        assert_eq!(disposition.kind, DispositionType::Queued);
        assert_eq!(disposition.position, Some(2));
        assert_eq!(waits_as, Policy::Queue);
        assert_eq!(
            decide(takes, &waiting, 1, Policy::Steer, TurnId::new(), off()),
            Decision::QueueFull { capacity: 1 }
        );
    }

    #[test]
    fn an_idle_session_that_debounces_holds_the_message() {
        let window = 400_000;
        let d = Debounce {
            window,
            first: None,
            now: 1_000_000,
        };
        let Decision::Accept {
            disposition,
            start,
            pending_until,
            waits_as,
            ..
        } = decide(
            None,
            &QueueSummary::default(),
            10,
            Policy::Reject,
            TurnId::new(),
            d,
        )
        else {
            panic!("a debounced message is accepted");
        };
        assert!(!start);
        assert_eq!(disposition.kind, DispositionType::Pending);
        assert_eq!(pending_until, Some(1_400_000));
        assert_eq!(disposition.until, Some(Timestamp(1_400_000)));
        assert_eq!(waits_as, Policy::Merge);
        // Later messages move the start, never past 10 windows after the first.
        let later = Debounce {
            first: Some(1_000_000),
            now: 4_900_000,
            ..d
        };
        assert_eq!(later.until(), 5_000_000);
        let capped = Debounce {
            now: 4_700_000,
            ..later
        };
        assert_eq!(capped.until(), 5_000_000);
        let early = Debounce {
            now: 1_100_000,
            ..later
        };
        assert_eq!(early.until(), 1_500_000);
        let full = summary(&[w(3, Policy::Merge)]);
        assert_eq!(
            decide(None, &full, 1, Policy::Queue, TurnId::new(), later),
            Decision::QueueFull { capacity: 1 }
        );
    }
}
